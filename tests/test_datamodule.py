"""VideoTextDataModule: batch contract, evaluation maps, pair batches (also under DDP), skip policy."""

import logging
import os
import random
import shutil
from types import SimpleNamespace

import av
import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DistributedSampler

from retrieval.data import synthetic
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.datasets import FRAME_CACHE
from retrieval.data.sampler import PairBatchSampler
from retrieval.data.transforms import ClipTransform, normalize_frames
from retrieval.data.video import VideoDecodeError, read_frames

SMALL = {"synthetic_num_train": 24, "synthetic_num_val": 12, "synthetic_num_test": 12}


def _datamodule(root, **kwargs) -> VideoTextDataModule:
    options = {"root": str(root), **SMALL, "batch_size": 8, "eval_batch_size": 5, **kwargs}
    dm = VideoTextDataModule(**options)
    dm.prepare_data()
    return dm


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm") / "synthetic"
    synthetic.generate(root, num_train=24, num_val=12, num_test=12, progress=False)
    return root


@pytest.fixture(scope="module")
def dm(root):
    dm = _datamodule(root)
    dm.setup("fit")
    return dm


def test_train_batch_contract(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (8, 8, 3, 64, 64) and batch["frames"].dtype == torch.uint8  # normalised on the device
    assert batch["frame_mask"].dtype == torch.bool and batch["frame_mask"].all()
    assert batch["tokens"].shape == (8, 32) and batch["tokens"].dtype == torch.long
    assert (batch["tokens"][:, 0] == 49406).all()  # open_clip SOT
    assert batch["video_index"].dtype == torch.long and batch["caption_index"].dtype == torch.long
    owner = [v for v, record in enumerate(dm.records("train")) for _ in record.captions]
    assert [owner[c] for c in batch["caption_index"].tolist()] == batch["video_index"].tolist()


def test_val_loaders_cover_every_video_and_caption_once(dm):
    videos, captions = dm.val_dataloader()
    video_batches, caption_batches = list(videos), list(captions)
    assert video_batches[0]["frames"].shape == (5, 8, 3, 64, 64)
    seen_videos = torch.cat([b["video_index"] for b in video_batches])
    assert seen_videos.tolist() == list(range(dm.num_eval_videos("val"))) == list(range(12))
    caption_index = torch.cat([b["caption_index"] for b in caption_batches])
    caption_video = torch.cat([b["video_index"] for b in caption_batches])
    assert caption_index.tolist() == list(range(36))  # 12 videos × 3 captions
    assert torch.equal(caption_video, dm.eval_caption_video("val"))
    records = dm.records("val")
    tokenizer = open_clip.get_tokenizer("vtr-tiny", context_length=32)
    for i in (0, 17, 35):
        expected = tokenizer([records[int(caption_video[i])].captions[i % 3]])[0]
        assert torch.equal(torch.cat([b["tokens"] for b in caption_batches])[i], expected)


def test_eval_annotations(dm):
    notes = dm.eval_annotations("validate")
    partner = notes["video_partner"]
    assert torch.equal(partner[partner], torch.arange(12))
    assert torch.equal(notes["caption_kind"], notes["video_kind"][notes["caption_video"]])
    assert notes["video_kind"].tolist().count(1) == 6  # half temporal
    with pytest.raises(ValueError, match="stage"):
        dm.eval_annotations("train")


def test_pair_batches_keep_pairs_together(dm):
    records = dm.records("train")
    position = {r.video_id: i for i, r in enumerate(records)}
    info = synthetic.pair_info(dm.root)
    partner = {i: position[info[r.video_id].partner] for i, r in enumerate(records)}
    loader = dm.train_dataloader()
    assert len(loader) == 3  # 12 pairs, 4 per batch
    seen = []
    for batch in loader:
        videos = set(batch["video_index"].tolist())
        assert len(videos) == 8 and all(partner[v] in videos for v in videos)
        seen += sorted(videos)
    assert sorted(seen) == list(range(24))


def _epoch(sampler: PairBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_pair_sampler_seeded_and_sharded():
    pairs = [([4 * p, 4 * p + 1], [4 * p + 2, 4 * p + 3]) for p in range(10)]
    data = list(range(40))
    single = PairBatchSampler(DistributedSampler(data, num_replicas=1, rank=0), 4, pairs=pairs, seed=1)
    assert _epoch(single, 0) == _epoch(single, 0) != _epoch(single, 1)
    assert len(single) == 5 == len(_epoch(single, 2))
    shards = [PairBatchSampler(DistributedSampler(data, num_replicas=2, rank=r), 4, pairs=pairs, seed=1)
              for r in range(2)]
    batches = [_epoch(s, 3) for s in shards]
    assert len(batches[0]) == len(batches[1]) == len(shards[0]) == 2  # 5 batches → 2 per rank
    flat = [i for rank in batches for batch in rank for i in batch]
    assert len(flat) == len(set(flat)) == 16
    padded = PairBatchSampler(DistributedSampler(data, num_replicas=2, rank=1), 4, False, pairs=pairs)
    assert len(padded) == len(_epoch(padded, 0)) == 3
    with pytest.raises(ValueError, match="even"):
        PairBatchSampler(DistributedSampler(data, num_replicas=1, rank=0), 5, pairs=pairs)


def test_pair_sampler_resumes_mid_epoch_then_follows_set_epoch():
    pairs = [([4 * p, 4 * p + 1], [4 * p + 2, 4 * p + 3]) for p in range(10)]
    layout = DistributedSampler(list(range(40)), num_replicas=1, rank=0)
    epochs = [_epoch(PairBatchSampler(layout, 4, pairs=pairs, seed=1), e) for e in range(3)]

    def fresh(resume):  # Lightning iterates a resumed loader before it calls set_epoch: epoch 0 here
        return PairBatchSampler(DistributedSampler(list(range(40)), num_replicas=1, rank=0), 4, pairs=pairs, seed=1,
                                resume=resume)

    resumed = fresh((1, 2))
    assert list(resumed) == epochs[1][2:]
    assert _epoch(resumed, 2) == epochs[2]
    assert list(fresh((1, 5))) == epochs[2]  # saved at the end of epoch 1


def test_lightning_injects_its_distributed_sampler(dm):
    """What Lightning does to a training loader under DDP: re-create the batch sampler."""
    with _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    sharded = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2, rank=1))
    assert isinstance(sharded.batch_sampler, PairBatchSampler)
    assert sharded.batch_sampler.sampler.num_replicas == 2 and len(sharded) == 1


def test_other_backbone_sets_image_size(root):
    dm = _datamodule(root, backbone="vtr-micro", eval_num_frames=4, frame_segments=2, num_frames=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()[0]))
    assert batch["frames"].shape == (5, 4, 3, 32, 32)


def test_clip_transform():
    transform = ClipTransform((32, 32))
    frames = np.full((3, 40, 80, 3), 255, dtype=np.uint8)
    mask = np.array([True, True, False])
    out = transform(frames, mask)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8 and (out[:2] == 255).all() and not out[2].any()
    normalised = normalize_frames(out[None], torch.from_numpy(mask)[None])[0]
    white = (1 - torch.tensor(open_clip.OPENAI_DATASET_MEAN)) / torch.tensor(open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(normalised[0, :, 16, 16], white)
    assert normalised.dtype == torch.float32 and not normalised[2].any()  # padding is 0 after normalisation too
    assert normalize_frames(normalised, torch.from_numpy(mask)) is normalised  # float: taken as normalised
    with pytest.raises(TypeError, match="uint8"):
        normalize_frames(out.int(), torch.from_numpy(mask))


def test_loader_frames_normalise_exactly_as_the_float_transform_did():
    """uint8 out of the loader, normalised where the batch lands: bit for bit the float32
    ``(x / 255 - mean) / std`` the transform used to return (masks with padding first or last)."""
    rng = np.random.default_rng(1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    for mask in (np.array([True, True, True, False]), np.array([False, True, True, True])):
        frames = rng.integers(0, 256, size=(4, 40, 52, 3), dtype=np.uint8)
        out = ClipTransform((32, 32))(frames, mask)
        expected = torch.zeros(4, 3, 32, 32)
        expected[torch.from_numpy(mask)] = (out[torch.from_numpy(mask)].float().div_(255) - mean) / std
        assert torch.equal(normalize_frames(out, torch.from_numpy(mask)), expected)


def test_clip_transform_resizes_as_clip_preprocessing_does():
    """CLIP's preprocessing resizes the uint8 image with PIL (bicubic), centre-crops, then
    scales to [0, 1]: the transform agrees to within one uint8 level."""
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(2, 45, 70, 3), dtype=np.uint8)
    out = ClipTransform((32, 32))(frames, np.array([True, True])).float() / 255
    for frame, got in zip(frames, out):
        image = Image.fromarray(frame).resize((int(70 * 32 / 45), 32), Image.BICUBIC)  # (w, h): short side 32
        left = (image.width - 32) // 2
        expected = torch.from_numpy(np.asarray(image.crop((left, 0, left + 32, 32)))).permute(2, 0, 1) / 255
        assert (got - expected).abs().max() <= 1 / 255 + 1e-5


def test_argument_errors(root, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"num_frames \(8\).*segments \(3\)"):
        VideoTextDataModule(root=str(root), frame_segments=3)
    with pytest.raises(ValueError, match="max_words"):
        VideoTextDataModule(root=str(root), max_words=64)
    with pytest.raises(ValueError, match="backbone"):
        VideoTextDataModule(root=str(root), backbone="no-such-model")
    with pytest.raises(ValueError, match="frame_sampler must be one of"):
        VideoTextDataModule(root=str(root), frame_sampler="uniform")
    with pytest.raises(ValueError, match=r"'stan'.*segments \(4\) must equal num_frames \(8\)"):
        VideoTextDataModule(root=str(root), frame_sampler="stan", frame_segments=4)  # random training draw
    with pytest.raises(ValueError, match="known formats"):
        VideoTextDataModule(dataset="kinetics")
    with pytest.raises(ValueError, match="root"):
        VideoTextDataModule(dataset="msrvtt")
    monkeypatch.setenv("VTR_CACHE", str(tmp_path))
    fresh = VideoTextDataModule(**SMALL)
    assert fresh.root.parent == tmp_path / "synthetic"
    assert fresh.root.name == f"v{synthetic.FORMAT_VERSION}-easy-seed0-{SMALL['synthetic_num_train']}-" \
        f"{SMALL['synthetic_num_val']}-{SMALL['synthetic_num_test']}"  # a new format never meets an old folder
    with pytest.raises(RuntimeError, match="prepare_data"):
        fresh.setup("fit")
    with pytest.raises(ValueError, match="fewer than one batch"):
        _datamodule(root, batch_size=32).setup("fit")
    with pytest.raises(ValueError, match=r"data\.val_size=50 applies to \['activitynet', 'msrvtt', 'msrvtt_7k', 'vatex'\].*'synthetic' has its own"):
        VideoTextDataModule(root=str(root), val_size=50)
    with pytest.raises(ValueError, match=r"data\.val_size must be >= 0 \(0: no validation split\); got -1"):
        VideoTextDataModule(dataset="msrvtt", root=str(root), val_size=-1)
    with pytest.raises(ValueError, match="needs probe_videos=True"):
        VideoTextDataModule(root=str(root), on_bad_video="skip", probe_videos=False)


def test_msrvtt_folder_smaller_than_the_default_carve(root, tmp_path):
    """The synthetic root read as MSR-VTT: 24 training ids, too few for the default 450."""
    msrvtt = {"dataset": "msrvtt", "root": str(root), "batch_size": 8}
    with pytest.raises(ValueError, match=(r"^data\.val_size=450 but the msrvtt train list .*MSRVTT_train\.9k\.csv "
                                          r"has 24 ids; set data\.val_size between 0 \(no validation split\) and 23$")):
        VideoTextDataModule(**msrvtt).setup("fit")
    dm = VideoTextDataModule(**msrvtt, val_size=6)
    dm.setup("fit")
    train, val = ([r.video_id for r in dm.records(split)] for split in ("train", "val"))
    ids = [f"video{i}" for i in range(24)]
    assert sorted(train + val) == sorted(ids) and len(val) == 6
    assert set(val) == set(random.Random(0).sample(sorted(ids), 6))  # seed 0, sorted population
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "videos" / "video5.mp4").unlink()
    missing = r"video5 \(train, .*/copy/videos/video5\.\*\): file not found \(tried .mp4"
    with pytest.raises(VideoDecodeError, match=missing):
        VideoTextDataModule(**{**msrvtt, "root": str(copy)}, val_size=6).setup("fit")


def _truncate(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def opens(monkeypatch):
    """Counts the containers PyAV opens."""
    count = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda file, *a, **k: count.append(file) or real_open(file, *a, **k))
    return count


class _Steps(L.LightningModule):
    """Counts training steps; the probe must stop the run before the first."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps = 0

    def training_step(self, batch, index):
        self.steps += 1
        return self.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_bad_videos_fail_setup_before_training(tmp_path, trainer_kwargs):
    root = tmp_path / "bad"
    dm = _datamodule(root)
    _truncate(root / "videos" / "video30.mp4")  # val
    (root / "videos" / "video3.mp4").write_bytes(b"not a video at all")  # train
    (root / "videos" / "video40.mp4").write_bytes(b"")  # test: not used by fit
    model = _Steps()
    with pytest.raises(VideoDecodeError) as error:
        L.Trainer(**trainer_kwargs, max_steps=2).fit(model, dm)
    assert model.steps == 0
    message = str(error.value)
    assert message.startswith(f"2 unusable videos in {root / 'videos'}: video3 (train), video30 (val)\n")
    assert f"video30 (val, {root / 'videos' / 'video30.mp4'}): " in message
    assert "video40" not in message and "on_bad_video=skip" in message
    with pytest.raises(VideoDecodeError, match=r"^1 unusable video in .*: video40 \(test\)\n"):
        _datamodule(root).setup("test")


def test_skip_policy_drops_and_logs_bad_videos(tmp_path, caplog):
    root = tmp_path / "bad"
    _datamodule(root)
    (root / "videos" / "video25.mp4").write_bytes(b"not a video at all")
    _truncate(root / "videos" / "video30.mp4")
    with caplog.at_level(logging.WARNING, logger="retrieval.data.probe"):
        skipping = _datamodule(root, on_bad_video="skip")
        skipping.setup("validate")
    assert [r.video_id for r in skipping.records("val")] == [f"video{i}" for i in range(24, 36) if i not in (25, 30)]
    assert "skipping val video 'video25'" in caplog.text and "skipping val video 'video30'" in caplog.text
    assert "skipped 2 of 12 val videos" in caplog.text
    partner = skipping.eval_annotations("val")["video_partner"]
    assert (partner == -1).sum() == 2  # the partners of the dropped clips lost their pair
    unprobed = _datamodule(root, probe_videos=False)
    unprobed.setup("validate")  # without the probe the bad file is found by the loader
    with pytest.raises(VideoDecodeError, match="video25"):
        list(unprobed.val_dataloader()[0])


def test_probe_results_are_cached(tmp_path, opens):
    root = tmp_path / "cached"
    dm = _datamodule(root)
    opens.clear()  # the generation's writes
    dm.setup("fit")
    assert len(opens) == len(set(opens)) == 36  # each of the 24 train + 12 val videos once
    opens.clear()
    _datamodule(root).setup("fit")
    assert opens == []
    video = root / "videos" / "video30.mp4"
    stat = video.stat()
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _datamodule(root).setup("fit")
    assert opens == [str(video)]
    opens.clear()
    _truncate(video)
    with pytest.raises(VideoDecodeError, match="video30"):
        _datamodule(root).setup("fit")
    assert opens == [str(video)]
    opens.clear()
    _datamodule(root, probe_videos=False).setup("fit")
    assert opens == []


def test_under_ddp_local_rank_zero_probes_first(tmp_path, opens):
    root = tmp_path / "ddp"
    events = []

    def trainer(rank):
        barrier = lambda name: events.append((rank, "barrier", len(opens)))  # noqa: E731
        strategy = SimpleNamespace(barrier=barrier)
        return SimpleNamespace(world_size=2, local_rank=rank, global_rank=rank, strategy=strategy)

    for rank in (0, 1):
        dm = _datamodule(root)
        dm.trainer = trainer(rank)
        opens.clear()
        dm.setup("validate")
        events.append((rank, "done", len(opens)))
    assert events == [(0, "barrier", 12), (0, "done", 12), (1, "barrier", 0), (1, "done", 0)]


@pytest.mark.parametrize("frames, segments", [(8, None), (12, 6)])
def test_frame_cache_gives_the_same_frames_as_decoding(root, frames, segments):
    plain = _datamodule(root, num_frames=frames, frame_segments=segments)
    cached = _datamodule(root, num_frames=frames, frame_segments=segments, cache_frames=True)
    for dm in (plain, cached):
        dm.setup("fit")
    FRAME_CACHE.clear()
    for a, b in zip(plain.val_dataloader()[0], cached.val_dataloader()[0]):
        assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["frame_mask"], b["frame_mask"])
    assert len(FRAME_CACHE) == cached.num_eval_videos("val")  # each video decoded once


@pytest.mark.parametrize("cache", [False, True])
def test_frame_sampler_reaches_train_and_eval_frames(root, cache):
    # Prompt Switch's recipe on a 16-frame synthetic clip (indices by hand in test_video.py)
    dm = _datamodule(root, num_frames=6, eval_num_frames=12, frame_segments=6, frame_sampler="prompt_switch",
                     train_sampling="uniform", cache_frames=cache)
    dm.setup("fit")
    train_item, video = dm.train_dataloader().dataset[0], next(iter(dm.val_dataloader()[0]))
    for frames, record, index in (
        (train_item["frames"], dm.records("train")[int(train_item["video_index"])], [0, 3, 6, 8, 11, 14]),
        (video["frames"][0], dm.records("val")[0], [0, 2, 5, 8, 10, 13] * 2),
    ):
        every = read_frames(record.path, None)[0]
        assert len(every) == 16
        torch.testing.assert_close(frames, dm.transform(every[index], np.ones(len(index), dtype=bool)))
