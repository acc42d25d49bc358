"""CLIP4Clip: An Empirical Study of CLIP for End to End Video Clip Retrieval (Luo et al., 2021).

Official code: https://github.com/ArrowLuo/CLIP4Clip (``modules/modeling.py``). Both encoders are
the full CLIP, fine-tuned end to end; the video side is CLIP's per-frame CLS feature followed by
a similarity head:

- :class:`MeanPool` (``meanP``): parameter-free, order-blind mean of the L2-normalised frames;
- :class:`SeqTransf` (``seqTransf``): a 4-layer temporal transformer initialised from CLIP's
  first 4 text blocks, frame positions from CLIP's text positional embedding, a residual to
  the frames, then meanP.

Both are fusion-free: the video embedding never sees the text, so it is computed once,
offline, and a query costs one dot product per video.

Recipe (README): batch 128, 5 epochs, lr 1e-4 for new modules and 1e-7 (``coef_lr 1e-3``) for
CLIP, warmup 10 % then cosine, 12 frames, 32 words. Differences here, on purpose: AdamW with
bias correction instead of BertAdam (which has none and clips per tensor), the shared
warmup-cosine (re-based after warmup) and the shared no-decay rule (norms, biases,
embeddings, logit scale), which the official name filter only partly applies.
"""

from __future__ import annotations

from torch import Tensor

from retrieval.features import TextFeatures, VideoFeatures
from retrieval.module import OptimConfig, RetrievalModule
from retrieval.temporal import TemporalTransformer, mean_pool_normalized

CLIP4CLIP_OPTIM = OptimConfig(lr=1e-4, clip_lr=1e-7, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6, warmup_ratio=0.1)


class MeanPool(RetrievalModule):
    """CLIP4Clip meanP: the video is the mean of its normalised frame features."""

    offline = True

    def __init__(
        self,
        backbone: str = "vtr-tiny",
        pretrained: str | None = None,
        num_frames: int = 12,
        max_words: int = 32,
        optim: OptimConfig = CLIP4CLIP_OPTIM,
        eval_chunk_size: int = 1024,
    ) -> None:
        super().__init__(backbone, pretrained, num_frames, max_words, optim, eval_chunk_size)

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # [Q, D]
        return TextFeatures(sentence=sentence / sentence.norm(dim=-1, keepdim=True))

    def frame_features(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """Per-frame CLIP features ``[B, T, D]``; the hook SeqTransf refines."""
        self.check_frames(frames, frame_mask)
        return self.clip.encode_frames(frames)

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        x = self.frame_features(frames, frame_mask)  # [B, T, D]
        return VideoFeatures(embedding=mean_pool_normalized(x, frame_mask))  # [B, D]


class SeqTransf(MeanPool):
    """CLIP4Clip seqTransf: temporal transformer over frame features, residual, meanP.

    Args:
        num_temporal_layers: depth of the temporal transformer (CLIP4Clip: 4, from CLIP's
            text blocks 0-3).
    """

    def __init__(
        self,
        backbone: str = "vtr-tiny",
        pretrained: str | None = None,
        num_frames: int = 12,
        max_words: int = 32,
        optim: OptimConfig = CLIP4CLIP_OPTIM,
        eval_chunk_size: int = 1024,
        num_temporal_layers: int = 4,
    ) -> None:
        super().__init__(backbone, pretrained, num_frames, max_words, optim, eval_chunk_size)
        self.temporal = TemporalTransformer(self.clip, num_temporal_layers)

    def frame_features(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        x = super().frame_features(frames, frame_mask)  # [B, T, D]
        return self.temporal(x, frame_mask)  # [B, T, D], residual included
