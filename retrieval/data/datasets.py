"""The map-style datasets the DataModule's loaders read, and the frame loading they share.

- ``SplitData``: one split flattened into records, captions and the caption → video map.
- ``_VideoLoader``, ``cached_video``, ``FRAME_CACHE``: decode (or read from the in-memory
  frame cache), sample and transform one video's frames.
- ``TrainDataset`` (one item per (video, caption) pair), ``VideoDataset`` (each video once)
  and ``CaptionDataset`` (each caption once): the items of the batch contract in
  ``retrieval.data.datamodule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from retrieval.data.formats import VideoRecord
from retrieval.data.transforms import ClipTransform
from retrieval.data.video import pad_frames, read_frames, sample_indices


@dataclass
class SplitData:
    """One split, flattened: records, every caption, and the caption → video map."""

    records: list[VideoRecord]
    captions: list[str]
    caption_video: torch.Tensor  # [num_captions] int64

    @classmethod
    def from_records(cls, records: list[VideoRecord]) -> SplitData:
        captions = [caption for record in records for caption in record.captions]
        owner = [i for i, record in enumerate(records) for _ in record.captions]
        return cls(records, captions, torch.tensor(owner, dtype=torch.long))


class _VideoLoader:
    """Decodes and transforms one record's frames (shared by the train and eval datasets).

    With ``cache``, every frame of a video is decoded the first time it is read and kept in
    :data:`FRAME_CACHE` (one per process: the main process, or each persistent worker; shared
    by every loader and DataModule of that process, so ``vtr compare`` decodes each clip once
    for all methods); later reads sample from memory with the same sampler.
    """

    def __init__(self, num_frames: int, mode: str, segments: int | None, transform: ClipTransform,
                 cache: bool = False, sampler: str = "vtr") -> None:
        self.num_frames, self.mode, self.segments, self.transform = num_frames, mode, segments, transform
        self.cache, self.sampler = cache, sampler

    def __call__(self, record: VideoRecord) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cache:
            frames, mask = read_frames(record.path, self.num_frames, self.mode, self.segments, sampler=self.sampler,
                                       video_id=record.video_id)
        else:
            video = cached_video(record)
            index = sample_indices(len(video), self.num_frames, self.mode, self.segments, sampler=self.sampler)
            frames, mask = pad_frames(video[index], self.num_frames)
        return self.transform(frames, mask), torch.from_numpy(mask)


FRAME_CACHE: dict[tuple[str, int, int], np.ndarray] = {}
"""Every decoded frame of the videos read with ``cache_frames``, keyed by (path, size, mtime)."""


def cached_video(record: VideoRecord) -> np.ndarray:
    """All frames ``[n, H, W, 3]`` of a video, decoded on first use (a changed file is decoded again)."""
    stat = Path(record.path).stat()
    key = (str(record.path), stat.st_size, stat.st_mtime_ns)
    if key not in FRAME_CACHE:
        FRAME_CACHE[key] = read_frames(record.path, None, video_id=record.video_id)[0]
    return FRAME_CACHE[key]


class TrainDataset(Dataset):
    """One item per (video, caption) pair of a split."""

    def __init__(self, data: SplitData, load: _VideoLoader, tokenizer) -> None:
        self.data, self.load, self.tokenizer = data, load, tokenizer

    def __len__(self) -> int:
        return len(self.data.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        video = int(self.data.caption_video[index])
        frames, mask = self.load(self.data.records[video])
        return {
            "frames": frames,
            "frame_mask": mask,
            "tokens": self.tokenizer([self.data.captions[index]])[0],
            "video_index": torch.tensor(video),
            "caption_index": torch.tensor(index),
        }


class VideoDataset(Dataset):
    """Each video of a split once (evaluation gallery)."""

    def __init__(self, data: SplitData, load: _VideoLoader) -> None:
        self.data, self.load = data, load

    def __len__(self) -> int:
        return len(self.data.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        frames, mask = self.load(self.data.records[index])
        return {"frames": frames, "frame_mask": mask, "video_index": torch.tensor(index)}


class CaptionDataset(Dataset):
    """Each caption of a split once (evaluation queries), with the index of its video."""

    def __init__(self, data: SplitData, tokenizer) -> None:
        self.data, self.tokenizer = data, tokenizer

    def __len__(self) -> int:
        return len(self.data.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.tokenizer([self.data.captions[index]])[0],
            "caption_index": torch.tensor(index),
            "video_index": self.data.caption_video[index],
        }


def first_pair_per_video(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without pairs whose video already appeared earlier in it (Prompt Switch's
    official ``collate_fn``)."""
    index = batch["video_index"]
    seen_before = (index[:, None] == index[None, :]).tril(diagonal=-1).any(dim=1)  # [B]
    return {key: value[~seen_before] for key, value in batch.items()}


def collate_first_pair_per_video(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``default_collate``, then :func:`first_pair_per_video` (``data.drop_duplicate_videos``)."""
    return first_pair_per_video(default_collate(items))
