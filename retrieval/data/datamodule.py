"""``VideoTextDataModule``: annotation records → decoded, CLIP-normalised, tokenised batches.

Batch contract (B videos or captions, T frames, L = ``max_words`` tokens, S = image size):

- training batch: ``frames`` float32 ``[B, T, 3, S, S]``, ``frame_mask`` bool ``[B, T]``,
  ``tokens`` int64 ``[B, L]``, ``video_index`` int64 ``[B]``, ``caption_index`` int64 ``[B]``;
  one item per (video, caption) pair.
- validation / test: two loaders, ``[videos, captions]``. Videos: ``frames``, ``frame_mask``,
  ``video_index`` (each video once). Captions: ``tokens``, ``caption_index``, ``video_index``
  (each caption once, with the index of its video). ``eval_caption_video(stage)`` is the
  full caption → video map.

Padding frames (clips shorter than T) are zeros with ``frame_mask`` False. Tokens are
open_clip's ``[SOT, ..., EOT, 0, ...]``; the token mask is ``tokens != 0``.
"""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from retrieval.data import synthetic
from retrieval.data.datasets import (
    CaptionDataset,
    SplitData,
    TrainDataset,
    VideoDataset,
    _VideoLoader,
    collate_first_pair_per_video,
)
from retrieval.data.formats import CARVED_VALIDATION, READERS, VideoRecord, read_split
from retrieval.data.probe import BAD_VIDEO_POLICIES, VideoProbe, apply_policy, cache_file, probe_splits
from retrieval.data.sampler import PairBatchSampler
from retrieval.data.transforms import ClipTransform, backbone_image_size
from retrieval.data.video import FRAME_SAMPLERS, SAMPLING_MODES, sample_indices

_EVAL_STAGES = {"val": "val", "validate": "val", "test": "test"}
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
MODEL_SETTINGS = ("backbone", "num_frames", "max_words")
"""Options the data shares with the model: ``vtr fit`` links them from ``model.retriever.init_args``."""


def default_cache_dir() -> Path:
    """``$VTR_CACHE`` if set, else ``~/.cache/vtr``."""
    return Path(os.environ.get("VTR_CACHE") or "~/.cache/vtr").expanduser()


class VideoTextDataModule(LightningDataModule):
    """Text-video retrieval data: one DataModule for every dataset format.

    What runs where:

    - ``prepare_data`` (one process per node): generates the synthetic benchmark into
      ``root`` if it is not already there. Nothing for real datasets.
    - ``setup(stage)`` (every process): reads the annotation records of the splits the stage
      needs (fit: train + val; validate: val; test/predict: test) and probes every video of
      those splits (``retrieval.data.probe``: container, video stream, frame count or
      duration, the last frames decode), so a bad file fails here, before training, with
      every bad id listed (``on_bad_video="skip"``: dropped, each id and the total logged).
      Results are cached in ``$VTR_CACHE/video_probe/`` by path, size and mtime: a second
      setup opens no unchanged file. Under DDP one process per node probes first and the
      others read its results.
    - ``state_dict`` / ``load_state_dict`` (checkpoints): the training position, so that a
      run resumed mid-epoch draws exactly the pair batches it had not trained on yet.
    - ``__getitem__`` (DataLoader workers): PyAV decode of the sampled frames, CLIP
      transform, tokenisation. Training samples frames with ``train_sampling``; evaluation
      always samples uniformly with ``eval_num_frames``; both with ``frame_sampler``'s formulas.

    Batches (see the module docstring): training yields (video, caption) items; validation
    and test return two loaders, ``[videos, captions]``, so each video is decoded and
    encoded once and every caption is a query. ``batch_size`` is per device.

    Distributed: evaluation loaders are plain sequential loaders, so Lightning injects its
    ``DistributedSampler`` (which pads with duplicates; ``video_index`` / ``caption_index``
    let the module drop them). Training uses either a shuffled loader (Lightning injects
    the sampler) or, with ``pair_batches``, a ``PairBatchSampler`` that Lightning re-creates
    with the distributed layout (see its docstring).

    Args:
        dataset: Annotation format, a key of ``retrieval.data.formats.READERS``.
        root: Dataset folder. Synthetic: where it is generated (default
            ``$VTR_CACHE/synthetic/v<FORMAT_VERSION>-<parameters>``, ``$VTR_CACHE`` defaulting to
            ``~/.cache/vtr``). Real datasets: the default of ``annotations_dir`` and, with
            ``/videos`` appended, of ``videos_dir``.
        annotations_dir: Folder of the annotation files (real datasets).
        videos_dir: Folder of the video files (real datasets).
        backbone: open_clip model name; used only for the tokenizer and the image size.
            ``backbone``, ``num_frames`` and ``max_words`` are the model's under ``vtr fit``
            (linked: ``MODEL_SETTINGS``).
        num_frames: Frames per training clip.
        eval_num_frames: Frames per evaluation clip (default ``num_frames``).
        frame_segments: Segments of the frame sampler (default: one sample per segment);
            must divide both frame counts. See ``retrieval.data.video.sample_indices``.
        frame_sampler: Where the segments and their frames lie: ``vtr`` (real-valued segment
            bounds), or an official sampler restated, ``prompt_switch`` or ``stan``, which their
            recipes set. See ``retrieval.data.video.sample_indices``.
        max_words: Token context length, SOT and EOT included.
        batch_size: Training items per batch, per device.
        eval_batch_size: Videos or captions per evaluation batch.
        num_workers: DataLoader workers for training and evaluation videos.
        train_sampling: ``random`` (a random frame per segment slot) or ``uniform``.
        on_bad_video: What the setup probe does with unusable videos: ``error`` raises,
            listing every bad id; ``skip`` drops them (each id and the total are logged).
        probe_videos: Probe every video at setup (see above). False opens each video first
            in a loader, where a bad one stops the run; ``skip`` needs the probe.
        val_size: Videos carved from the training list as the validation split, for
            datasets without one (``msrvtt``; None: 450, the lineage's carve). Seeded, logged,
            never a test video; at least 1 and fewer than the training list holds.
        pair_batches: Synthetic only (ignored elsewhere): keep both clips of a pair in the
            same training batch, so the partner is an in-batch hard negative.
        drop_duplicate_videos: Keep one pair per video in each training batch, as Prompt
            Switch's official ``collate_fn`` does (its recipe sets it); single process only:
            under DDP the ranks' batches would differ in size (refused at setup).
        cache_frames: Decode every frame of each video once and keep it in memory, then
            sample from memory (small datasets such as the synthetic default: 4,000 clips of
            16 64x64 frames are 0.8 GB). Each process (main or persistent worker) keeps one
            cache, shared by all its DataModules.
        synthetic_num_train: Synthetic training clips.
        synthetic_num_val: Synthetic validation clips.
        synthetic_num_test: Synthetic test clips.
        synthetic_seed: Seed of the generated clips.
        synthetic_difficulty: ``easy`` or ``hard``.
        seed: Seed of the pair-batch shuffle.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        annotations_dir: str | None = None,
        videos_dir: str | None = None,
        backbone: str = "vtr-tiny",
        num_frames: int = 8,
        eval_num_frames: int | None = None,
        frame_segments: int | None = None,
        frame_sampler: str = "vtr",
        max_words: int = 32,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        train_sampling: str = "random",
        on_bad_video: str = "error",
        probe_videos: bool = True,
        val_size: int | None = None,
        pair_batches: bool = True,
        drop_duplicate_videos: bool = False,
        cache_frames: bool = False,
        synthetic_num_train: int = 4000,
        synthetic_num_val: int = 400,
        synthetic_num_test: int = 400,
        synthetic_seed: int = 0,
        synthetic_difficulty: str = "easy",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset not in READERS:
            raise ValueError(f"unknown dataset {dataset!r}; known formats: {sorted(READERS)}")
        if on_bad_video not in BAD_VIDEO_POLICIES:
            raise ValueError(f"on_bad_video must be one of {BAD_VIDEO_POLICIES}; got {on_bad_video!r}")
        if on_bad_video == "skip" and not probe_videos:
            raise ValueError("on_bad_video='skip' drops the videos the setup probe finds bad: "
                             "it needs probe_videos=True")
        if val_size is not None and dataset not in CARVED_VALIDATION:
            raise ValueError(f"data.val_size={val_size} applies to {sorted(CARVED_VALIDATION)}, which carve a "
                             f"validation split from train; {dataset!r} has its own: leave data.val_size unset")
        if val_size is not None and val_size < 0:
            raise ValueError(f"data.val_size must be >= 0 (0: no validation split); got {val_size}")
        if train_sampling not in SAMPLING_MODES:
            raise ValueError(f"train_sampling must be one of {SAMPLING_MODES}; got {train_sampling!r}")
        if frame_sampler not in FRAME_SAMPLERS:
            raise ValueError(f"frame_sampler must be one of {FRAME_SAMPLERS}; got {frame_sampler!r}")
        self.eval_num_frames = num_frames if eval_num_frames is None else eval_num_frames
        for frames, mode in ((num_frames, train_sampling), (self.eval_num_frames, "uniform")):
            sample_indices(frames, frames, mode, frame_segments, sampler=frame_sampler)  # validates frame_segments
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive; got {batch_size}, {eval_batch_size}")
        self.pair_batches = pair_batches and dataset == "synthetic"
        if self.pair_batches and batch_size % 2:
            raise ValueError(f"pair_batches needs an even batch_size; got {batch_size}")

        self.synthetic_params = {
            "num_train": synthetic_num_train, "num_val": synthetic_num_val, "num_test": synthetic_num_test,
            "seed": synthetic_seed, "difficulty": synthetic_difficulty,
        }
        if dataset == "synthetic":
            tag = "{difficulty}-seed{seed}-{num_train}-{num_val}-{num_test}".format(**self.synthetic_params)
            tag = f"v{synthetic.FORMAT_VERSION}-{tag}"  # a new format never meets an old folder
            self.root = Path(root).expanduser() if root else default_cache_dir() / "synthetic" / tag
            self.annotations_dir, self.videos_dir = self.root, self.root / synthetic.VIDEOS_DIR
        else:
            if root is None and (annotations_dir is None or videos_dir is None):
                raise ValueError(f"dataset {dataset!r} needs root, or both annotations_dir and videos_dir")
            self.root = Path(root).expanduser() if root else None
            self.annotations_dir = Path(annotations_dir or self.root).expanduser()
            self.videos_dir = Path(videos_dir).expanduser() if videos_dir else self.root / "videos"

        self.image_size = backbone_image_size(backbone)
        self.tokenizer = open_clip.get_tokenizer(backbone, context_length=max_words)
        context = open_clip.get_model_config(backbone)["text_cfg"].get("context_length", 77)
        if max_words > context:
            raise ValueError(f"max_words ({max_words}) exceeds {backbone}'s text context length ({context})")
        self.transform = ClipTransform(self.image_size)
        self._splits: dict[str, SplitData] = {}
        self._pairs: dict[str, synthetic.PairInfo] | None = None
        self._resume: tuple[int, int] | None = None

    def prepare_data(self) -> None:
        """Generates the synthetic benchmark if ``root`` does not hold it yet."""
        if self.hparams.dataset == "synthetic":
            synthetic.generate(self.root, **self.synthetic_params)

    def setup(self, stage: str | None = None) -> None:
        """Reads the records of the splits ``stage`` needs (idempotent)."""
        # a contradiction of the options is refused before any file is read
        if stage == "fit" and self.hparams.drop_duplicate_videos and self.trainer is not None \
                and self.trainer.world_size > 1:
            raise ValueError("data.drop_duplicate_videos=true reproduces the official single-GPU collate and would "
                             "give ranks batches of different sizes; set it to false under DDP")
        if self.hparams.dataset == "synthetic":
            if not synthetic.is_complete(self.root, **self.synthetic_params):
                raise RuntimeError(
                    f"no complete synthetic dataset at {self.root} for {self.synthetic_params}; "
                    "call prepare_data() first (the Trainer does)"
                )
            self._pairs = synthetic.pair_info(self.root)
        splits = _STAGE_SPLITS[stage] if stage else ("train", "val", "test")
        records = {split: self._read(split) for split in splits if split not in self._splits}
        if records and self.hparams.probe_videos:
            records = apply_policy(self._probe(records), self.hparams.on_bad_video, self.videos_dir)
        for split, split_records in records.items():
            self._splits[split] = SplitData.from_records(split_records)
        if "train" in splits:
            self._check_train_size()

    def state_dict(self) -> dict[str, int]:
        """The training position when a checkpoint is saved while fitting: the epoch and the
        batches of it already trained on (Lightning's own counter)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        return {"epoch": trainer.current_epoch,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the pair batches where the checkpoint left them (shuffled loaders restart the epoch)."""
        self._resume = (state_dict["epoch"], state_dict["batches_done"]) if state_dict else None
        if self._resume and self._resume[1] and self.pair_batches:
            rank_zero_info(f"resuming epoch {self._resume[0]} after its first {self._resume[1]} pair batches "
                           "(PairBatchSampler restores its position)")

    def _read(self, split: str) -> list[VideoRecord]:
        """The split's records; with the probe, their paths are resolved by ``_probe``."""
        videos_dir = None if self.hparams.probe_videos else self.videos_dir
        return read_split(self.hparams.dataset, self.annotations_dir, split, videos_dir,
                          val_size=self.hparams.val_size)

    def _probe(self, records: dict[str, list[VideoRecord]]) -> dict[str, list[tuple[VideoRecord, VideoProbe]]]:
        """Probes every video of ``records``; under DDP each node's local rank 0 fills the cache first."""
        cache = cache_file(self.videos_dir, default_cache_dir())
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            if trainer.local_rank == 0:
                probe_splits(records, self.videos_dir, cache, progress=trainer.global_rank == 0,
                             dataset=self.hparams.dataset)
            trainer.strategy.barrier("vtr_video_probe")
        return probe_splits(records, self.videos_dir, cache, progress=rank_zero_only.rank == 0,
                            dataset=self.hparams.dataset)

    def _check_train_size(self) -> None:
        batch_size = self.hparams.batch_size
        if self.pair_batches:
            available, needed = len(self._train_pairs()), batch_size // 2
            unit = "pairs"
        else:
            available, needed, unit = len(self._splits["train"].captions), batch_size, "items"
        if available < needed:
            raise ValueError(f"the training split has {available} {unit}, fewer than one batch "
                             f"(batch_size={batch_size}); lower batch_size")

    def _split(self, split: str) -> SplitData:
        if split not in self._splits:
            raise RuntimeError(f"the {split} split is not loaded; call setup() first")
        return self._splits[split]

    def _eval_split(self, stage: str) -> SplitData:
        if stage not in _EVAL_STAGES:
            raise ValueError(f"stage must be one of {sorted(_EVAL_STAGES)}; got {stage!r}")
        return self._split(_EVAL_STAGES[stage])

    def _train_pairs(self) -> list[tuple[list[int], list[int]]]:
        """Per complete pair of the training split, the item indices of each clip's captions."""
        data = self._split("train")
        position = {record.video_id: i for i, record in enumerate(data.records)}
        items: list[list[int]] = [[] for _ in data.records]
        for caption, video in enumerate(data.caption_video.tolist()):
            items[video].append(caption)
        pairs = []
        for i, record in enumerate(data.records):
            partner = position.get(self._pairs[record.video_id].partner, -1)
            if partner > i:
                pairs.append((items[i], items[partner]))
        return pairs

    def records(self, split: str) -> list[VideoRecord]:
        """The loaded records of ``train``, ``val`` or ``test``, in index order."""
        return self._split(split).records

    def num_eval_videos(self, stage: str) -> int:
        """Number of videos of the ``val`` or ``test`` gallery."""
        return len(self._eval_split(stage).records)

    def eval_caption_video(self, stage: str) -> torch.Tensor:
        """int64 ``[num_captions]``: the video index of every caption of ``val`` or ``test``."""
        return self._eval_split(stage).caption_video

    def eval_annotations(self, stage: str) -> dict[str, torch.Tensor]:
        """Evaluation metadata of ``val`` or ``test``.

        Returns:
            ``caption_video`` int64 ``[num_captions]``. For the synthetic benchmark also
            ``video_partner`` int64 ``[num_videos]`` (the partner's video index, -1 if it
            was skipped), ``video_kind`` and ``caption_kind`` int64 (indices into
            ``synthetic.KINDS``: 0 static, 1 temporal).
        """
        data = self._eval_split(stage)
        out = {"caption_video": data.caption_video}
        if self._pairs is None:
            return out
        position = {record.video_id: i for i, record in enumerate(data.records)}
        info = [self._pairs[record.video_id] for record in data.records]
        out["video_partner"] = torch.tensor([position.get(i.partner, -1) for i in info], dtype=torch.long)
        out["video_kind"] = torch.tensor([synthetic.KINDS.index(i.kind) for i in info], dtype=torch.long)
        out["caption_kind"] = out["video_kind"][data.caption_video]
        return out

    def _loader(self, dataset: Dataset, num_workers: int, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=num_workers, persistent_workers=num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        load = _VideoLoader(self.hparams.num_frames, self.hparams.train_sampling, self.hparams.frame_segments,
                            self.transform, self.hparams.cache_frames, self.hparams.frame_sampler)
        dataset = TrainDataset(self._split("train"), load, self.tokenizer)
        workers = self.hparams.num_workers
        collate = {"collate_fn": collate_first_pair_per_video} if self.hparams.drop_duplicate_videos else {}
        if self.pair_batches:
            sampler = PairBatchSampler(
                DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False),
                self.hparams.batch_size, True, pairs=self._train_pairs(), seed=self.hparams.seed,
                resume=self._resume,
            )
            self._resume = None
            return self._loader(dataset, workers, batch_sampler=sampler, **collate)
        return self._loader(dataset, workers, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                            **collate)

    def _eval_dataloaders(self, split: str) -> list[DataLoader]:
        data = self._split(split)
        load = _VideoLoader(self.eval_num_frames, "uniform", self.hparams.frame_segments, self.transform,
                            self.hparams.cache_frames, self.hparams.frame_sampler)
        size = self.hparams.eval_batch_size
        return [
            self._loader(VideoDataset(data, load), self.hparams.num_workers, batch_size=size),
            self._loader(CaptionDataset(data, self.tokenizer), 0, batch_size=size),
        ]

    def val_dataloader(self) -> list[DataLoader]:
        """``[videos loader, captions loader]`` of the validation split."""
        return self._eval_dataloaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        """``[videos loader, captions loader]`` of the test split."""
        return self._eval_dataloaders("test")
