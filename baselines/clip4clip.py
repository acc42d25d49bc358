"""CLIP4Clip: An Empirical Study of CLIP for End to End Video Clip Retrieval (Luo et al., 2021).

Official code: https://github.com/ArrowLuo/CLIP4Clip (``modules/modeling.py``). Both encoders are
the full CLIP, fine-tuned end to end; the video side is CLIP's per-frame CLS feature followed by
a similarity head:

- :class:`MeanPool` (``meanP``): parameter-free, order-blind mean of the L2-normalised frames;
- :class:`SeqTransf` (``seqTransf``): a 4-layer temporal transformer initialised from CLIP's
  first 4 text blocks, frame positions from CLIP's text positional embedding, a residual to
  the frames, then meanP;
- :class:`TightTransf` (``tightTransf``): a 4-layer cross transformer over the caption and the
  frames of every (text, video) pair — the fusion extreme.

MeanPool and SeqTransf are fusion-free: the video embedding never sees the text, so it is
computed once, offline (``fusion_free``), and a query costs one dot product per video. TightTransf is
text-conditioned: only the frame features can be cached.

Recipe (README): batch 128, 5 epochs, lr 1e-4 for new modules and 1e-7 (``coef_lr 1e-3``) for
CLIP, warmup 10 % then cosine, 12 frames, 32 words. Differences here, on purpose: AdamW with
bias correction instead of BertAdam (which has none and clips per tensor), the shared
warmup-cosine (re-based after warmup) and the shared no-decay rule (norms, biases,
embeddings, logit scale), which the official name filter only partly applies.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat
from open_clip.transformer import QuickGELU
from torch import Tensor, nn

from retrieval.backbone import CLIPBackbone
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever
from retrieval.temporal import (
    TemporalTransformer,
    copy_text_blocks,
    mean_pool_normalized,
    run_blocks,
    text_position_embedding,
)

class MeanPool(Retriever):
    """CLIP4Clip meanP: the video is the mean of its normalised frame features.

    Args:
        shared: ``backbone``, ``pretrained``, ``quick_gelu``, ``num_frames``, ``max_words``
            (:class:`~retrieval.retriever.Retriever`).
    """

    fusion_free = True

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # [Q, D]
        return TextFeatures(embedding=sentence / sentence.norm(dim=-1, keepdim=True))

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

    def __init__(self, num_temporal_layers: int = 4, **shared) -> None:
        super().__init__(**shared)
        self.temporal = TemporalTransformer(self.clip, num_temporal_layers)

    def frame_features(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        x = super().frame_features(frames, frame_mask)  # [B, T, D]
        return self.temporal(x, frame_mask)  # [B, T, D], residual included


def bert_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear with CLIP4Clip's ``init_weights``: weight N(0, 0.02), bias 0."""
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class CrossTransformer(nn.Module):
    """CLIP4Clip's ``CrossModel``: ``[s; F]`` for every pair through CLIP text blocks, pooled.

    Args:
        clip: the backbone whose text blocks and positional embedding initialise this module.
        num_layers: depth (``cross_num_hidden_layers``, 4).
        dropout: dropout on the embedded sequence (``hidden_dropout_prob``, 0.1).
    """

    def __init__(self, clip: CLIPBackbone, num_layers: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if clip.text_width != clip.embed_dim:
            raise ValueError(
                f"tightTransf runs CLIP text blocks (width {clip.text_width}) on features of width "
                f"{clip.embed_dim}; {clip.name!r} has different widths"
            )
        self.position_embeddings = text_position_embedding(clip)  # P
        self.dropout = nn.Dropout(dropout)
        self.blocks = copy_text_blocks(clip, num_layers)
        self.ln_pool = nn.LayerNorm(clip.embed_dim, eps=1e-12)  # CLIP4Clip's BERT-style LayerNorm
        self.dense = bert_linear(clip.embed_dim, clip.embed_dim)  # W_p
        self.activation = QuickGELU()

    def forward(self, sentence: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """Fuse every query with every video: ``[Q, D], [N, T, D], [N, T] -> [Q, N, D]``."""
        q, (n, t, _) = sentence.shape[0], frames.shape
        if 1 + t > self.position_embeddings.num_embeddings:
            raise ValueError(f"1 + {t} frames exceed the {self.position_embeddings.num_embeddings} cross positions")
        tokens = torch.cat([
            repeat(sentence, "q d -> (q n) 1 d", n=n),
            repeat(frames, "n t d -> (q n) t d", q=q),
        ], dim=1)  # [(Q N), 1 + T, D]
        x = self.dropout(tokens + self.position_embeddings.weight[: 1 + t])
        keep = torch.cat([frame_mask.new_ones(n, 1), frame_mask], dim=1)  # [N, 1 + T]
        x = run_blocks(self.blocks, x, repeat(keep, "n s -> (q n) s", q=q))
        pooled = self.activation(self.dense(self.ln_pool(x[:, 0])))  # first token [(Q N), D]
        return rearrange(pooled, "(q n) d -> q n d", q=q)


class TightTransf(Retriever):
    """CLIP4Clip tightTransf (``--sim_header tightTransf`` without ``--loose_type``;
    ``_cross_similarity``, ``module_cross.CrossModel``): the fusion extreme.

    For every (text, video) pair a 4-layer transformer runs over ``[s; f_1 … f_T]`` (the
    caption's EOT feature and the T raw CLIP frame features, plus positions P initialised from
    CLIP's text positional embedding, dropout 0.1), with CLIP's text blocks 0-3 and a key-padding
    mask; the pooler ``QuickGELU(W_p LN(x)_0 + b_p)`` and ``similarity_dense`` ``Linear(D, 1)`` give
    the logit, with **no** logit scale. Only the frame features are cached offline; a query costs
    ≈ (1+T)·4·12·D² ≈ 164 M MACs per video at ViT-B/32, run as ``[Q·N·(1+T), D]`` GEMMs.

    The key-padding mask is laid out per (pair, head), sequence-major, as torch expects: the
    official ``module_cross.py`` (508ffa3) expands it with ``repeat_interleave(n_head, dim=0)``,
    as vtr does, and its blocks' LayerNorms use eps 1e-12, as vtr's copies do.

    Differences from the official code, on purpose: the official loss is per GPU (no
    all-gather, b×b pairs per GPU), vtr uses its shared global loss (2·b·B pairs per rank).

    Args:
        num_cross_layers: depth of the cross transformer (4, CLIP text blocks 0-3).
        dropout: dropout on the embedded sequence (0.1).

    Memory: a ``score`` call over Q queries and a chunk of N videos runs Q·N sequences of 1+T
    tokens; the peak is one block's MLP, about ``Q·N·(1+T)·(4·D + 3·D) · 4`` bytes (hidden layer,
    its activation and the residual stream, fp32) plus the ``[Q·N·heads, 1+T, 1+T]`` mask;
    ≈ 190 MB per 1,000 pairs at T=12, D=512. Hence the small ``eval_chunk_size``.
    """

    eval_chunk_size = 32

    def __init__(self, num_cross_layers: int = 4, dropout: float = 0.1, **shared) -> None:
        super().__init__(**shared)
        self.cross = CrossTransformer(self.clip, num_cross_layers, dropout)
        self.similarity_dense = bert_linear(self.clip.embed_dim, 1)

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # s [Q, D], un-normalised
        return TextFeatures(eot=sentence)

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        self.check_frames(frames, frame_mask)
        return VideoFeatures(frames=self.clip.encode_frames(frames), frame_mask=frame_mask)  # [B, T, D]

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``similarity_dense(pool(cross([s; F])))``: ``[Q, N]`` logits (no logit scale)."""
        fused = self.cross(text.eot, video.frames, video.frame_mask)  # [Q, N, D]
        return self.similarity_dense(fused).squeeze(-1)
