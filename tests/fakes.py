"""Small in-memory stand-ins for the data pipeline (module tests must not depend on decoding)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


SOT, EOT = 49406, 49407  # open_clip's start and end of text


def random_tokens(n: int, max_words: int = 32, generator: torch.Generator | None = None,
                  lengths: list[int] | None = None) -> torch.Tensor:
    """``[n, max_words]`` token ids shaped like real captions: SOT, random words, EOT, 0-padding."""
    lengths = lengths or [3 + (5 * i) % (max_words - 5) for i in range(n)]
    tokens = torch.zeros(n, max_words, dtype=torch.long)
    for i, length in enumerate(lengths):
        tokens[i, 0], tokens[i, length] = SOT, EOT
        tokens[i, 1:length] = torch.randint(1, 49000, (length - 1,), generator=generator)
    return tokens


def random_videos(n: int, t: int, size: int, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32, padded: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised frames ``[n, t, 3, size, size]`` and a mask whose first video has ``padded`` padding frames."""
    frames = torch.randn(n, t, 3, size, size, generator=generator, dtype=dtype)
    mask = torch.ones(n, t, dtype=torch.bool)
    if padded:
        mask[0, -padded:] = False
    return frames, mask


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
        self.frames, self.frame_mask = random_videos(num_videos, num_frames, size, g, padded=1)
        caps_per_video = torch.randint(1, 4, (num_videos,), generator=g)
        self.caption_video = torch.repeat_interleave(torch.arange(num_videos), caps_per_video)
        self.tokens = random_tokens(len(self.caption_video), max_words, g)
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


def t2v_by_hand(model, data: FakeVideoText) -> dict[str, float]:
    """t2v R@1 and MnR of ``model`` (a ``Retriever``, or a ``RetrievalModule`` holding one) on
    ``data``, computed apart from the evaluation loop and the metric code.

    Every caption is scored against every video (``encode_video`` then ``prepare_gallery``, as
    evaluation does) in one ``score`` call; the rank of the positive is 1 + the videos scoring
    strictly higher + the other videos tying with it (DESIGN.md).
    """
    model.eval()
    retriever = getattr(model, "retriever", model)
    with torch.no_grad():
        video = retriever.prepare_gallery(retriever.encode_video(data.frames, data.frame_mask))
        scores = retriever.score(retriever.encode_text(data.tokens), video)
    positive = scores.gather(1, data.caption_video[:, None])  # [Q, 1]
    ranks = 1 + (scores > positive).sum(1) + (scores == positive).sum(1) - 1
    return {"t2v/R@1": 100.0 * (ranks == 1).double().mean().item(), "t2v/MnR": ranks.double().mean().item()}


class Interrupt(L.Callback):
    """Stops a run with an error after ``after_steps`` optimizer steps, as a crash or a pre-emption would."""

    def __init__(self, after_steps: int) -> None:
        self.after_steps = after_steps

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.after_steps:
            raise RuntimeError(f"interrupted after step {trainer.global_step}")
