"""CLIP4Clip's temporal transformer ("seqTransf"), shared by every method that uses it.

SeqTransf, X-CLIP, GLCCL and CLIP2Video all run the same module over per-frame CLIP features:
frame position embeddings initialised from CLIP's *text* positional embedding, the first
``num_layers`` residual blocks of CLIP's text transformer (copied, then trained separately),
a key-padding mask and no causal mask, and a residual connection to the input frames
(ArrowLuo/CLIP4Clip ``modules/modeling.py``, ``sim_header == "seqTransf"``). The copied blocks
take the official blocks' LayerNorm epsilon, 1e-12 (:func:`copy_text_blocks`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from retrieval.backbone import CLIPBackbone

MASKED = -1e6  # CLIP4Clip's additive key-padding value
HEAD_LAYER_NORM_EPS = 1e-12  # CLIP4Clip's until_module.LayerNorm, in every module_cross block


def padding_attn_mask(key_mask: Tensor, num_heads: int, num_queries: int | None = None) -> Tensor:
    """Additive attention mask ``[B * heads, Lq, Lk]`` hiding padded keys (``key_mask`` False)."""
    additive = (~key_mask).to(torch.float32) * MASKED  # [B, Lk]
    lq = num_queries or key_mask.shape[1]
    return repeat(additive, "b k -> (b h) q k", h=num_heads, q=lq)


def run_blocks(blocks: nn.ModuleList, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Run open_clip residual blocks (batch-first) with an optional key-padding mask.

    A mask that hides nothing is dropped: the additive zeros would change no number but would
    cost a ``[B·heads, L, L]`` tensor and the masked attention path.
    """
    mask = None
    if key_mask is not None and not bool(key_mask.all()):
        mask = padding_attn_mask(key_mask, blocks[0].attn.num_heads).to(x.dtype)
    for block in blocks:
        x = block(x, attn_mask=mask)
    return x


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x [B, T, D]`` over the frames where ``mask [B, T]`` is True."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def mean_pool_normalized(frames: Tensor, mask: Tensor) -> Tensor:
    """CLIP4Clip meanP: L2-normalise frames, masked mean, L2-normalise: ``[B, T, D] -> [B, D]``."""
    return F.normalize(masked_mean(F.normalize(frames, dim=-1), mask), dim=-1)


def copy_text_blocks(clip: CLIPBackbone, num_layers: int) -> nn.ModuleList:
    """Independent copies of CLIP's first ``num_layers`` text blocks, with the head blocks' LayerNorm epsilon.

    The official heads are CLIP4Clip's ``module_cross`` blocks (seqTransf, tightTransf, and the
    X-CLIP, GLCCL and CLIP2Video forks), whose ``until_module.LayerNorm`` has eps 1e-12, loaded
    with CLIP's text weights; CLIP's own blocks keep 1e-5. The activation is the backbone's.
    """
    available = len(clip.text_blocks)
    if num_layers > available:
        raise ValueError(f"{num_layers} temporal layers need {num_layers} CLIP text blocks; {clip.name!r} has {available}")
    blocks = nn.ModuleList(copy.deepcopy(clip.text_blocks[i]) for i in range(num_layers))
    for module in blocks.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = HEAD_LAYER_NORM_EPS
    return blocks


def text_position_embedding(clip: CLIPBackbone) -> nn.Embedding:
    """A new ``nn.Embedding`` initialised from CLIP's text positional embedding."""
    table = clip.positional_embedding.detach().clone()
    emb = nn.Embedding(table.shape[0], table.shape[1])
    emb.weight.data.copy_(table)
    return emb


class TemporalTransformer(nn.Module):
    """seqTransf: ``frames [B, T, D] -> frames [B, T, D]`` (residual included).

    Args:
        clip: the backbone whose text blocks and positional embedding initialise this module.
        num_layers: transformer depth (CLIP4Clip: 4).
    """

    def __init__(self, clip: CLIPBackbone, num_layers: int = 4) -> None:
        super().__init__()
        if clip.text_width != clip.embed_dim:
            raise ValueError(
                f"seqTransf runs CLIP text blocks (width {clip.text_width}) on frame features "
                f"(width {clip.embed_dim}); {clip.name!r} has different widths"
            )
        self.frame_position_embeddings = text_position_embedding(clip)
        self.blocks = copy_text_blocks(clip, num_layers)

    def forward(self, frames: Tensor, mask: Tensor, positions: Tensor | None = None) -> Tensor:
        t = frames.shape[1]
        if t > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"{t} frames exceed the {self.frame_position_embeddings.num_embeddings} frame positions")
        if positions is None:
            positions = torch.arange(t, device=frames.device)
        x = frames + self.frame_position_embeddings(positions)
        x = run_blocks(self.blocks, x, mask)
        return x + frames
