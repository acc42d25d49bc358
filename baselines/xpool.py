"""X-Pool: Cross-Modal Language-Video Attention for Text-Video Retrieval (Gorti et al., CVPR 2022).

Official code: https://github.com/layer6ai-labs/xpool (``modules/transformer.py``,
``model/clip_transformer.py``, ``modules/metrics.py``).

The video is pooled *by the text*: a single-head cross-attention whose query is the caption and
whose keys and values are the frames, followed by LayerNorm, a residual linear layer and
LayerNorm. With t the EOT text feature and V the (un-normalised) CLIP frame features:

- ``t' = LN₁(t)``, ``V' = LN₁(V)`` (one LayerNorm shared by both modalities);
- ``a_t = softmax_f(⟨W_q t', W_k V'_f⟩ / √D)``, ``r = W_o Σ_f a_f W_v V'_f``;
- ``r' = LN₂(r)``, ``out = LN₃(r' + Dropout(W_lin r'))``;
- ``s(t, v) = σ · cos(t, out)``, σ the CLIP logit scale.

Every Linear (W_q, W_k, W_v, W_o, W_lin) starts at weight I and bias 0 (``_init_parameters``).

Offline, ``encode_video`` caches the keys ``W_k V'`` and the values with ``W_o`` already applied,
``W_o W_v V' + b_o``: because the attention weights sum to one, ``W_o Σ_f a_f u_f + b_o =
Σ_f a_f (W_o u_f + b_o)``, so folding W_o into the cached values is the same function, and it
removes a D×D product per (text, video) pair (methods.md §6.3). ``encode_text`` computes the
query ``W_q LN₁(t)`` once per query. What is left per pair is ``2·T·D + D²`` MACs (attention
logits, weighted sum, W_lin), done as one einsum over the gallery chunk for the logits, one
batched matmul for the pooling and one ``[Q·N, D] × [D, D]`` GEMM for W_lin.

Differences from the official code, on purpose:

- padded frames (vtr's short videos; X-Pool itself always samples 12) are hidden from the
  attention by the frame mask;
- only the single-head attention of the paper's recipe (``num_mha_heads 1``);
- vtr's tokenizer at ``max_words`` tokens instead of HF's ``CLIPTokenizer`` truncating at 77;
- torch's AdamW for X-Pool's copy of HF's (same update); ``decay_all`` reproduces its decay of
  every parameter, and vtr's warmup-cosine is HF's ``get_cosine_schedule_with_warmup``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.features import TextFeatures, VideoFeatures
from retrieval.module import OptimConfig, RetrievalModule

XPOOL_OPTIM = OptimConfig(lr=3e-5, clip_lr=1e-6, weight_decay=0.2, decay_all=True, betas=(0.9, 0.999), eps=1e-6, warmup_ratio=0.1)


def identity_linear(dim: int) -> nn.Linear:
    """A D→D Linear with weight I and bias 0 (X-Pool's ``_init_parameters``)."""
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TextConditionedPooling(nn.Module):
    """X-Pool's cross-modal attention block (the official ``Transformer``).

    Args:
        dim: D.
        dropout: dropout on the residual linear branch (MSR-VTT 9k: 0.3).
    """

    def __init__(self, dim: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)  # LN₁, shared by text and frames
        self.q_proj, self.k_proj = identity_linear(dim), identity_linear(dim)  # W_q, W_k
        self.v_proj, self.out_proj = identity_linear(dim), identity_linear(dim)  # W_v, W_o
        self.layer_norm2 = nn.LayerNorm(dim)  # LN₂
        self.linear_proj = identity_linear(dim)  # W_lin
        self.dropout = nn.Dropout(dropout)
        self.layer_norm3 = nn.LayerNorm(dim)  # LN₃

    def query(self, text: Tensor) -> Tensor:
        """``W_q LN₁(t)``: ``[Q, D] -> [Q, D]``."""
        return self.q_proj(self.layer_norm1(text))

    def keys_values(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Text-independent keys ``W_k V'`` and values ``W_o W_v V'`` (W_o folded): ``[N, T, D]`` each."""
        normed = self.layer_norm1(frames)  # V' [N, T, D]
        return self.k_proj(normed), self.out_proj(self.v_proj(normed))

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, frame_mask: Tensor) -> Tensor:
        """Pool every video for every query: ``[Q, D], [N, T, D] -> [Q, N, D]``."""
        logits = torch.einsum("qd,ntd->qnt", query, keys) / math.sqrt(query.shape[-1])  # [Q, N, T]
        attention = logits.masked_fill(~frame_mask, float("-inf")).softmax(dim=-1)
        pooled = torch.einsum("qnt,ntd->qnd", attention, values)  # r [Q, N, D]
        pooled = self.layer_norm2(pooled)  # r'
        return self.layer_norm3(pooled + self.dropout(self.linear_proj(pooled)))  # [Q, N, D]


class XPool(RetrievalModule):
    """X-Pool: text-conditioned pooling of CLIP frame features.

    Args:
        dropout: dropout of the residual linear branch (0.3 for MSR-VTT 9k and LSMDC, 0.4 for
            MSR-VTT 7k and MSVD).

    Memory: a ``score`` call over Q queries and a chunk of N videos holds about
    ``5 · Q·N·D · 4`` bytes (pooled, normalised, linear, residual and output copies, fp32), plus
    ``2 · Q·N·T · 4`` for the attention; ≈ 10 MB per 1,000 pairs at D=512. Chunks hold
    ``eval_chunk_size`` videos for one query and ``eval_chunk_pairs`` pairs for a batch.
    """

    offline = False

    def __init__(
        self,
        backbone: str = "vtr-tiny",
        pretrained: str | None = None,
        num_frames: int = 12,
        max_words: int = 32,
        optim: OptimConfig = XPOOL_OPTIM,
        eval_chunk_size: int = 256,
        eval_chunk_pairs: int | None = 1024,
        dropout: float = 0.3,
    ) -> None:
        super().__init__(backbone, pretrained, num_frames, max_words, optim, eval_chunk_size)
        self.set_pair_budget(eval_chunk_pairs)
        self.pool_frames = TextConditionedPooling(self.clip.embed_dim, dropout)

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # t [Q, D]
        return TextFeatures(sentence=F.normalize(sentence, dim=-1), query=self.pool_frames.query(sentence))

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        self.check_frames(frames, frame_mask)
        keys, values = self.pool_frames.keys_values(self.clip.encode_frames(frames))  # [B, T, D] each
        return VideoFeatures(frame_keys=keys, frame_values=values, frame_mask=frame_mask)

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``σ · cos(t, pool(V | t))``: ``[Q, N]`` logits."""
        pooled = self.pool_frames(text.query, video.frame_keys, video.frame_values, video.frame_mask[None])  # [Q, N, D]
        # cos(t, out) = ⟨t̂, out⟩ / max(|out|, ε), as F.normalize: no normalised copy of [Q, N, D]
        cosine = torch.linalg.vecdot(pooled, text.sentence[:, None]) / pooled.norm(dim=-1).clamp_min(1e-12)
        return self.logit_scale() * cosine
