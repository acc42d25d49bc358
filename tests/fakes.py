"""Small in-memory stand-ins for the data pipeline (module tests must not depend on decoding)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class _Rows(Dataset):
    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class FakeVideoText(L.LightningDataModule):
    """Random videos with 1-3 captions each, in the VideoTextDataModule batch contract."""

    def __init__(self, num_videos: int = 7, num_frames: int = 4, size: int = 64, max_words: int = 32,
                 batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.frames = torch.randn(num_videos, num_frames, 3, size, size, generator=g)
        self.frame_mask = torch.ones(num_videos, num_frames, dtype=torch.bool)
        self.frame_mask[0, -1] = False
        caps_per_video = torch.randint(1, 4, (num_videos,), generator=g)
        self.caption_video = torch.repeat_interleave(torch.arange(num_videos), caps_per_video)
        n_caps = len(self.caption_video)
        tokens = torch.zeros(n_caps, max_words, dtype=torch.long)
        lengths = torch.randint(3, max_words - 2, (n_caps,), generator=g)
        for i, n in enumerate(lengths.tolist()):
            tokens[i, 0] = 49406
            tokens[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
            tokens[i, n] = 49407
        self.tokens = tokens
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        rows = _Rows(frames=self.frames[self.caption_video], frame_mask=self.frame_mask[self.caption_video],
                     tokens=self.tokens, video_index=self.caption_video, caption_index=torch.arange(len(self.tokens)))
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, drop_last=True)

    def _eval(self) -> list[DataLoader]:
        videos = _Rows(frames=self.frames, frame_mask=self.frame_mask, video_index=torch.arange(len(self.frames)))
        captions = _Rows(tokens=self.tokens, caption_index=torch.arange(len(self.tokens)), video_index=self.caption_video)
        return [DataLoader(videos, batch_size=self.batch_size), DataLoader(captions, batch_size=self.batch_size)]

    val_dataloader = _eval
    test_dataloader = _eval
