"""STAN: Revisiting Temporal Modeling for CLIP-based Image-to-Video Knowledge Transferring (Liu et al., CVPR 2023).

Official code: https://github.com/farewellthree/STAN (an mmcv 2.0 / HuggingFace re-implementation:
``mmaction/models/backbones/clip_stan_hf.py``, ``recognizers/clip_similarity.py``,
``losses/contractive_loss.py``, ``configs/exp/stan/stan_msrvtt_b32_hf.py``; ``depth=4``,
``time_module="selfattn"``, ``cls_residue=False``).

The Spatial-Temporal Auxiliary Network is a side branch of ``K = 4`` levels fed by the last K
CLIP vision layers (9-12 at ViT-B/32), which run unchanged per frame. The branch holds one video
CLS and the T x P patch tokens:

- level 0 input (from layer L-K+1): video CLS ``1/2 (mean_t CLS_t + class_embedding + pos_0)``;
  patches + CLIP's spatial position embedding + a new temporal embedding;
- level k >= 1 input: the previous level's output plus the current CLIP layer's tokens (its
  frame-mean CLS and its patches), element-wise;
- each level: a temporal module (per patch position, self-attention over the T frames, output
  ``fc`` zero-initialised so the module starts as the identity; the CLS bypasses it; no MLP),
  then a spatial module, a copy of the paired CLIP vision block, run per frame with the video
  CLS duplicated into every frame and averaged back;
- output: each frame's last-layer CLIP CLS plus the branch's video CLS, ``ln_post`` and the
  projection, mean over frames, L2-normalised.

Score ``cos / tau`` with a fixed ``tau = 0.01`` (B/32 MSR-VTT, LSMDC; 0.02 B/16; 0.05 DiDeMo):
:meth:`STAN.logit_scale` returns ``1 / tau``, and CLIP's learned ``logit_scale`` is frozen
(unused, and an unused trainable parameter would stall DDP). Loss: ``NormSoftmaxLoss``, the
row and column cross-entropies summed, i.e. twice the shared symmetric InfoNCE.

Paper vs released code (the code is the default):

- the paper's W_proj^k (Eq. 5-6) on the CLIP tokens entering levels k >= 1 is absent from the
  code: ``use_projection=True`` adds it (bias-free, identity-initialised: not stated in the
  paper, chosen so both variants start equal);
- paper: Adam, weight decay 0.02, cosine annealing; config: AdamW wd 0.05, lr 2e-6 (branch x10),
  betas (0.9, 0.98), eps 1e-8, grad clip 5, 10 epochs, and a LinearLR warm-up from 0.05x that
  spans the whole 10 epochs (its cosine phase starts at epoch 10 and is never reached): here
  ``warmup_ratio=1.0`` (a linear ramp from ~0), the closest shared schedule;
- pixel mean/std: the config uses CLIP's, the author's config in issue #6 ImageNet's; the
  shared data pipeline's CLIP normalisation applies;
- no decay on norms and biases in the config; the shared rule also spares embeddings (CLIP's
  positional/class/token embeddings, the temporal embedding);
- padded frames (``frame_mask`` False), absent from the code, are masked out of the temporal
  attention's keys and out of every mean over frames.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever
from retrieval.temporal import masked_mean, padding_attn_mask

MAX_FRAMES = 64  # rows of the temporal embedding (``STAN_time_embed``)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero a whole sample's residual branch with probability ``p`` (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class TemporalModule(nn.Module):
    """Cross-frame module (``CLIPLayer_AttnTime``): per patch position, attention over the T frames.

    ``x + fc(DropPath(MHA(LN(x))))`` with ``fc`` zero-initialised, so it starts as the identity.

    Args:
        width: token width W.
        num_heads: attention heads (CLIP's vision heads).
        drop_path: DropPath rate of this level.
    """

    def __init__(self, width: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.fc = nn.Linear(width, width)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.drop_path = drop_path

    def forward(self, patches: Tensor, mask: Tensor) -> Tensor:
        """``patches [B, T, P, W]``, ``mask [B, T]`` -> ``[B, T, P, W]``."""
        b, _, p, _ = patches.shape
        x = rearrange(patches, "b t p w -> (b p) t w")
        key_mask = padding_attn_mask(repeat(mask, "b t -> (b p) t", p=p), self.attn.num_heads).to(x.dtype)
        h = self.norm(x)
        h = self.attn(h, h, h, attn_mask=key_mask, need_weights=False)[0]
        x = x + self.fc(drop_path(h, self.drop_path, self.training))
        return rearrange(x, "(b p) t w -> b t p w", b=b)


class SpatialModule(nn.Module):
    """Intra-frame module (``CLIPLayer_Spatial``): a copy of a CLIP vision block run per frame.

    The video CLS joins every frame's attention over ``1 + P`` tokens; its T outputs are averaged
    back into one CLS. DropPath on the attention branch only, as in the code.

    Args:
        block: the CLIP vision block to copy.
        drop_path: DropPath rate of this level.
    """

    def __init__(self, block: nn.Module, drop_path: float) -> None:
        super().__init__()
        self.block = copy.deepcopy(block)
        self.drop_path = drop_path

    def mlp(self, x: Tensor) -> Tensor:
        return self.block.ls_2(self.block.mlp(self.block.ln_2(x)))

    def forward(self, cls: Tensor, patches: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``cls [B, W]``, ``patches [B, T, P, W]``, ``mask [B, T]`` -> the same shapes."""
        b, t = patches.shape[:2]
        x = torch.cat([repeat(cls, "b w -> (b t) 1 w", t=t), rearrange(patches, "b t p w -> (b t) p w")], dim=1)
        h = self.block.ls_1(self.block.attention(self.block.ln_1(x)))  # [(B T), 1+P, W]
        h = rearrange(drop_path(h, self.drop_path, self.training), "(b t) n w -> b t n w", b=b)
        cls = cls + masked_mean(h[:, :, 0], mask)  # [B, W]
        patches = patches + h[:, :, 1:]  # [B, T, P, W]
        return cls + self.mlp(cls), patches + self.mlp(patches)


class STANLevel(nn.Module):
    """One STAN level: temporal module (the CLS bypasses it), then spatial module."""

    def __init__(self, block: nn.Module, num_heads: int, drop_path: float) -> None:
        super().__init__()
        width = block.ln_1.normalized_shape[0]
        self.temporal = TemporalModule(width, num_heads, drop_path)
        self.spatial = SpatialModule(block, drop_path)

    def forward(self, cls: Tensor, patches: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.spatial(cls, self.temporal(patches, mask), mask)


class STAN(Retriever):
    """CLIP with the Spatial-Temporal Auxiliary Network branch on its last K vision layers.

    Args:
        num_levels: K, the branch depth; level k pairs with CLIP vision layer L-K+1+k.
        temperature: the fixed tau of ``cos / tau``.
        drop_path_rate: the last level's DropPath rate (``linspace(0, rate, K)``).
        use_projection: the paper's W_proj on the CLIP tokens entering levels k >= 1 (not in
            the released code).
    """

    fusion_free = True

    def __init__(self, num_levels: int = 4, temperature: float = 0.01, drop_path_rate: float = 0.1,
                 use_projection: bool = False, **shared) -> None:
        super().__init__(**shared)
        blocks = self.clip.vision_blocks
        if not 1 <= num_levels <= len(blocks):
            raise ValueError(f"num_levels={num_levels} must be in [1, {len(blocks)}], the vision depth of "
                             f"{self.clip.name!r}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        if not 1 <= self.num_frames <= MAX_FRAMES:
            raise ValueError(f"num_frames={self.num_frames} must be in [1, {MAX_FRAMES}], STAN's temporal positions")
        self.temperature = temperature
        self.clip.logit_scale.requires_grad_(False)
        self.first_layer = len(blocks) - num_levels
        rates = torch.linspace(0, drop_path_rate, num_levels).tolist()
        heads = blocks[0].attn.num_heads
        self.levels = nn.ModuleList(STANLevel(blocks[self.first_layer + k], heads, rates[k]) for k in range(num_levels))
        self.time_embedding = nn.Embedding(MAX_FRAMES, self.clip.vision_width)
        self.projections = None
        if use_projection:
            width = self.clip.vision_width
            self.projections = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(num_levels - 1))
            for proj in self.projections:
                nn.init.eye_(proj.weight)

    # ------------------------------------------------------------------ video
    def initial_input(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Level-0 input from CLIP layer L-K+1: ``tokens [B, T, 1+P, W]`` -> ``(cls [B, W], patches [B, T, P, W])``."""
        t = tokens.shape[1]
        if t > MAX_FRAMES:
            raise ValueError(f"{t} frames exceed STAN's {MAX_FRAMES} temporal positions")
        visual = self.clip.visual
        pos = visual.positional_embedding  # [1+P, W]
        cls = 0.5 * (masked_mean(tokens[:, :, 0], mask) + visual.class_embedding + pos[0])  # [B, W]
        time = self.time_embedding(torch.arange(t, device=tokens.device))  # [T, W]
        patches = tokens[:, :, 1:] + pos[1:] + rearrange(time, "t w -> t 1 w")  # [B, T, P, W]
        return cls, patches

    def level_input(
        self, level: int, tokens: Tensor, mask: Tensor, cls: Tensor, patches: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Level k >= 1 input: the previous output plus the CLIP layer's frame-mean CLS and patches."""
        layer_cls, layer_patches = masked_mean(tokens[:, :, 0], mask), tokens[:, :, 1:]
        if self.projections is not None:
            proj = self.projections[level - 1]
            layer_cls, layer_patches = proj(layer_cls), proj(layer_patches)
        return cls + layer_cls, patches + layer_patches

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        self.check_frames(frames, frame_mask)
        b = frames.shape[0]
        x = self.clip.frame_tokens(rearrange(frames, "b t c h w -> (b t) c h w"))  # [(B T), 1+P, W]
        cls = patches = None
        for i, block in enumerate(self.clip.vision_blocks):
            x = block(x)
            level = i - self.first_layer
            if level < 0:
                continue
            tokens = rearrange(x, "(b t) n w -> b t n w", b=b)
            if level == 0:
                cls, patches = self.initial_input(tokens, frame_mask)
            else:
                cls, patches = self.level_input(level, tokens, frame_mask, cls, patches)
            cls, patches = self.levels[level](cls, patches, frame_mask)
        frame_cls = rearrange(x[:, 0], "(b t) w -> b t w", b=b)  # last-layer CLS per frame
        features = self.clip.project_cls(frame_cls + rearrange(cls, "b w -> b 1 w"))  # [B, T, D]
        return VideoFeatures(embedding=F.normalize(masked_mean(features, frame_mask), dim=-1))  # [B, D]

    # ------------------------------------------------------------------ text, score, loss
    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # [Q, D]
        return TextFeatures(embedding=F.normalize(sentence, dim=-1))

    def logit_scale(self) -> Tensor:
        """The fixed ``1 / tau`` (STAN learns no temperature)."""
        return self.clip.logit_scale.new_tensor(1.0 / self.temperature)

    @property
    def loss_weights(self) -> dict[str, float]:
        """``NormSoftmaxLoss``: row and column cross-entropies summed (twice the shared mean)."""
        return {"contrastive": 2.0}
