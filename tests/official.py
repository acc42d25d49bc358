"""Float64 restatements of the official code's formulas, written apart from vtr's modules.

Tests compare vtr against these. They read only parameters (a block's ``state_dict``), never a
vtr module's forward, and follow the official code literally: CLIP4Clip's ``module_cross.py``
blocks (``until_module.LayerNorm``, TF style, eps 1e-12; additive -1e6 key-padding mask, no
causal mask), the ``seqTransf`` branch of ``modeling.py`` and CLIP2Video's
``temporal_difference_block`` / ``_similarity_TDB``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

OFFICIAL_EPS = 1e-12  # CLIP4Clip until_module.LayerNorm, used by every module_cross block


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = OFFICIAL_EPS) -> Tensor:
    """``until_module.LayerNorm``: ``w (x - u) / sqrt(s + eps) + b`` with the biased variance s."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return weight * (x - u) / torch.sqrt(s + eps) + bias


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's activation: ``x sigma(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def gelu(x: Tensor) -> Tensor:
    """The exact GELU ``x Phi(x)`` (what random-init ``vtr-tiny`` / ``vtr-micro`` run)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def residual_block(x: Tensor, p: dict[str, Tensor], heads: int, keep: Tensor | None = None,
                   act=quick_gelu) -> Tensor:
    """One ``module_cross.ResidualAttentionBlock`` on ``x [B, L, W]``.

    Args:
        p: the block's parameters (open_clip names: ``ln_1``, ``attn.in_proj_*``, ``mlp.c_fc`` ...).
        heads: attention heads.
        keep: ``[B, L]`` True on the keys to attend to; the others get ``-1e6`` (per sequence).
        act: the MLP activation.
    """
    b, n, w = x.shape
    dh = w // heads
    h = layer_norm(x, p["ln_1.weight"], p["ln_1.bias"])
    q, k, v = (h @ p["attn.in_proj_weight"].T + p["attn.in_proj_bias"]).split(w, dim=-1)

    def split(t: Tensor) -> Tensor:
        return t.reshape(b, n, heads, dh).transpose(1, 2)  # [B, H, L, dh]

    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dh)  # [B, H, L, L]
    if keep is not None:
        logits = logits + (1.0 - keep.to(x.dtype))[:, None, None, :] * -1000000.0
    attended = (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, w)
    x = x + attended @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    h = layer_norm(x, p["ln_2.weight"], p["ln_2.bias"])
    return x + act(h @ p["mlp.c_fc.weight"].T + p["mlp.c_fc.bias"]) @ p["mlp.c_proj.weight"].T + p["mlp.c_proj.bias"]


def transformer(x: Tensor, blocks, heads: int, keep: Tensor | None = None, act=quick_gelu) -> Tensor:
    """``module_cross.Transformer``: the blocks in order (parameters read from each block)."""
    for block in blocks:
        x = residual_block(x, dict(block.state_dict()), heads, keep, act)
    return x


def mean_pool(frames: Tensor, mask: Tensor) -> Tensor:
    """CLIP4Clip meanP: per-frame L2 normalisation, masked mean, L2 normalisation."""
    frames = frames / frames.norm(dim=-1, keepdim=True)
    m = mask.to(frames.dtype).unsqueeze(-1)
    pooled = (frames * m).sum(1) / m.sum(1)
    return pooled / pooled.norm(dim=-1, keepdim=True)


def seq_transf(frames: Tensor, mask: Tensor, positions: Tensor, blocks, heads: int, act=quick_gelu) -> Tensor:
    """CLIP4Clip ``sim_header == "seqTransf"`` before pooling: ``frames + Transformer(frames + P)``."""
    x = frames + positions[: frames.shape[1]]
    return transformer(x, blocks, heads, mask, act) + frames


def symmetric_cross_entropy(logits: Tensor) -> Tensor:
    """``CrossEn`` both ways, averaged: ``1/2 (mean_i -log softmax_j(S)_ii + mean_j -log softmax_i(S)_jj)``."""
    diag = logits.diagonal()
    rows = (torch.logsumexp(logits, dim=1) - diag).mean()
    cols = (torch.logsumexp(logits, dim=0) - diag).mean()
    return 0.5 * (rows + cols)
