"""Prompt Switch: Efficient CLIP Adaptation for Text-Video Retrieval (Deng et al., ICCV 2023).

Official code: https://github.com/bladewaltz1/PromptSwitch (``model/prompt_clip.py``,
``modules/loss.py``, ``config/all_config.py``), read at 6420d3f. The method is fusion-free: the
video embedding never sees the text, so it is computed once, offline, and a query costs one
dot product per video. What it adds to CLIP:

- **Prompt Cube** P ∈ R^{Np×Np×W} (Np = 6 at ViT-B/32, 27,648 parameters): frame f of a chunk
  of Np frames carries the Np prompt tokens P[f, :] after its patch tokens, in every vision
  layer, with no positional embedding.
- **Prompt switch**: in each layer the Np×Np prompt block of a chunk is transposed across
  (frame, slot) on the LayerNorm-ed copy that feeds attention, and the attention output is added
  back to the un-transposed residual. Frame f attends to LN(P[:, f]) and writes P[f, :], so
  P[p, f] is a dedicated channel from frame p to frame f and every frame's CLS sees the whole
  chunk at every layer, at the cost of Np extra tokens per frame and no new attention weights.
- **Prompt aggregation**: each frame's CLS attends over the nf·Np prompts of its group of nf
  frames (nf = the training frame count, see below) through a new multi-head attention whose
  output projection starts at zero (so the model starts as CLIP), then CLIP's ``ln_post`` and
  projection; frames are mean-pooled.
- **Auxiliary captioner** (training only): a 2-layer transformer decoder over the projected frame
  features predicts the caption, a weighted token cross-entropy (0.25 on frequent words) × 0.5.

The vision tower switches prompts within chunks of Np consecutive frames; the aggregation
groups nf consecutive frames, nf being the training ``num_frames`` at evaluation too (the
official ``CLIPVisionTransformer`` freezes ``nf`` at construction). At the recipe, nf = Np = 6:
training is one chunk, and a 12-frame test video is two independent 6-frame pseudo-clips. With
nf = 6 and Np = 3, a group is two chunks and each frame attends over 18 prompts. The data
layer's sampler (``frame_segments: Np``, ``frame_sampler: prompt_switch``: the official
``VideoCapture`` indices) orders frames chunk-major so that each chunk spans the whole video.
Padded frames (``frame_mask`` False) still run through the tower as zeros, and so still exchange
prompts with their chunk and their group, but are left out of the mean and of the captioner's
memory.

Differences from the official code, on purpose:

- open_clip's tokenizer pads with 0 at a fixed ``max_words``; the official HF tokenizer pads
  with EOT to the longest caption. The caption loss drops every input position from the first
  EOT on (the EOT input and all padding, whatever its id), which is the official mask on
  official inputs; a genuine token 0 ("!") inside a caption is kept.
- the captioner masks padded frames in its memory (the official code never pads frames).
- in-batch duplicate videos are dropped from the training batch before encoding, as the
  official ``collate_fn`` does: a data option (``data.drop_duplicate_videos``, which the recipe
  sets), single-process only (as is the official code): under DDP the ranks' batches would
  differ in size.

Quirks of the official code kept as the default, each with a switch:

- the aggregation attention is named ``clip.vision_model.attn``, so the official name filter
  trains it at the CLIP learning rate (1e-6, not 1e-5). ``aggregation_in_clip_group=True``
  reproduces this (:meth:`PromptSwitch.param_groups` adds it to the CLIP lr group; it is
  still a new parameter, counted by ``new_parameters``); ``False`` trains it at the new-module lr.
- weight decay 0.2 on every parameter (``optim.decay_all``), the prompt cube included.

Third-party slides report batch 128, lr 3e-5 and a N(0, 0.02) cube init; the code's values
(batch 32, lr 1e-6 / 1e-5, std W^-0.5 × 0.02) are the defaults here and in
``experiments/model/prompt_switch.yaml`` (HF AdamW: betas (0.9, 0.999), eps 1e-6).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn

from retrieval.backbone import CLIPBackbone
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever
from retrieval.temporal import mean_pool_normalized

FREQUENT_WORDS = ("in", "on", "of", "to", "about", "this", "that", "a", "an", "the", "and", "there", "here", "is",
                  "are", ".", ",")
"""Words whose caption-loss weight is ``frequent_word_weight`` (with SOT and EOT), official list."""

INITIALIZER_RANGE = 0.02  # HF CLIP's initializer_range, which scales the cube's init


# ---------------------------------------------------------------------- Prompt Cube and switch
class PromptCube(nn.Module):
    """The Prompt Cube P ∈ R^{Np×Np×W}: row f holds the Np prompt tokens of frame f of a chunk.

    Args:
        num_prompts: Np, frames per chunk and prompts per frame.
        width: W, the vision tower's width.
    """

    def __init__(self, num_prompts: int, width: int) -> None:
        super().__init__()
        self.num_prompts = num_prompts
        self.prompts = nn.Parameter(torch.randn(num_prompts, num_prompts, width) * width**-0.5 * INITIALIZER_RANGE)

    def forward(self, tokens: Tensor) -> Tensor:
        """Append row f of the cube to frame f of every chunk: ``[N, S, W] -> [N, S + Np, W]``."""
        chunks = tokens.shape[0] // self.num_prompts
        cube = repeat(self.prompts, "f p w -> (c f) p w", c=chunks).to(tokens.dtype)  # [N, Np, W]
        return torch.cat([tokens, cube], dim=1)


def switch_prompts(tokens: Tensor, num_prompts: int) -> Tensor:
    """Transpose each chunk's prompt block across (frame, slot): frame f's slot p gets P[p, f].

    Args:
        tokens: ``[N, S + Np, W]`` frame tokens, prompts last, N a multiple of Np.
        num_prompts: Np.
    """
    visual, prompts = tokens[:, :-num_prompts], tokens[:, -num_prompts:]
    switched = rearrange(prompts, "(c f) p w -> (c p) f w", f=num_prompts)  # [N, Np, W]
    return torch.cat([visual, switched], dim=1)


def prompt_switch_block(block: nn.Module, x: Tensor, num_prompts: int) -> Tensor:
    """An open_clip ``ResidualAttentionBlock`` with the prompt switch before its attention.

    Only the LayerNorm-ed copy is switched; the attention output at frame f's slot p is added
    to the un-switched residual P[f, p]. Uses the block's own modules (no new parameters).
    """
    h = switch_prompts(block.ln_1(x), num_prompts)  # [N, S + Np, W]
    x = x + block.ls_1(block.attn(h, h, h, need_weights=False)[0])
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class PromptAggregation(nn.Module):
    """Each frame's CLS attends over the nf·Np prompts of its group of nf frames: CLS + MHA(CLS, P, P).

    The official code groups by the training frame count nf (``CLIPVisionTransformer.nf``), not
    by the chunk of Np frames the prompt switch uses; the two agree at its recipe (nf = Np = 6).
    The output projection starts at zero, so at initialisation the module is the identity.

    Args:
        width: W.
        num_heads: heads (the vision tower's: 12 at ViT-B/32).
        group_frames: nf, consecutive frames per group (the training ``num_frames``).
    """

    def __init__(self, width: int, num_heads: int, group_frames: int) -> None:
        super().__init__()
        self.group_frames = group_frames
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, cls: Tensor, prompts: Tensor) -> Tensor:
        """``cls [N, W]`` and ``prompts [N, Np, W]`` of the last layer -> aggregated CLS ``[N, W]``."""
        q = rearrange(cls, "(g f) w -> g f w", f=self.group_frames)  # [G, nf, W]
        kv = rearrange(prompts, "(g f) p w -> g (f p) w", f=self.group_frames)  # [G, nf·Np, W]
        out = q + self.attn(q, kv, kv, need_weights=False)[0]
        return rearrange(out, "g f w -> (g f) w")


# ---------------------------------------------------------------------- auxiliary captioner
def frequent_token_ids() -> list[int]:
    """open_clip BPE ids of :data:`FREQUENT_WORDS`, SOT and EOT (each word must be one token)."""
    tokenizer = SimpleTokenizer()
    ids = [tokenizer.sot_token_id, tokenizer.eot_token_id]
    for word in FREQUENT_WORDS:
        encoded = tokenizer.encode(word)
        if len(encoded) != 1:
            raise ValueError(f"frequent word {word!r} is not a single BPE token: {encoded}")
        ids.extend(encoded)
    return ids


def caption_targets(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Which next-token predictions the caption loss reads, and their targets.

    Inputs are SOT and the words; from the first EOT on (the EOT input, padding) they are dropped.

    Args:
        tokens: ``[B, L]`` SOT ... EOT, padded (EOT has the largest id, so ``argmax`` finds it).

    Returns:
        ``keep [B, L - 1]`` True on the input positions whose prediction counts, and the targets
        ``tokens[:, 1:][keep]`` ``[K]``.
    """
    eot = tokens.argmax(dim=-1)  # [B], first EOT
    positions = torch.arange(tokens.shape[1] - 1, device=tokens.device)
    keep = positions[None, :] < eot[:, None]  # [B, L - 1]
    return keep, tokens[:, 1:][keep]


class Captioner(nn.Module):
    """Training-only caption decoder over the projected frame features.

    A post-norm ReLU ``nn.TransformerDecoder`` (PyTorch defaults, dropout 0) with the CLIP text
    tower's width, heads and FFN size (512 / 8 / 2048 at ViT-B/32), a final LayerNorm, and a
    vocabulary head whose weight starts as a copy of CLIP's token embedding (not tied).

    Args:
        clip: the backbone (widths, token embedding for the head's init).
        num_layers: decoder layers (official: 2).
        frequent_word_weight: class weight of SOT, EOT and :data:`FREQUENT_WORDS`.
    """

    def __init__(self, clip: CLIPBackbone, num_layers: int = 2, frequent_word_weight: float = 0.25) -> None:
        super().__init__()
        d = clip.embed_dim
        if clip.text_width != d:
            raise ValueError(
                f"the captioner reads frame features of width {d} with a head initialised from CLIP's token "
                f"embedding of width {clip.text_width}; {clip.name!r} has different widths (use_captioner=False)"
            )
        text_block = clip.text_blocks[0]
        self.caption_prenorm = nn.LayerNorm(d)
        layer = nn.TransformerDecoderLayer(
            d, text_block.attn.num_heads, dim_feedforward=text_block.mlp.c_fc.out_features, dropout=0.0,
            batch_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(d))
        vocab = clip.token_embedding.num_embeddings
        self.caption_head = nn.Linear(d, vocab)
        with torch.no_grad():
            self.caption_head.weight.copy_(clip.token_embedding.weight)
            self.caption_head.bias.zero_()
        weight = torch.ones(vocab)
        weight[frequent_token_ids()] = frequent_word_weight
        self.register_buffer("class_weight", weight, persistent=False)

    def forward(self, token_embeds: Tensor, frames: Tensor, frame_mask: Tensor, keep: Tensor | None = None) -> Tensor:
        """Next-token logits.

        The decoder is causal, so a prediction depends only on the inputs up to it: with ``keep``
        the sequence is cut after the last kept position and the vocabulary head (``L·V·D`` MACs,
        most of the captioner's cost with CLIP's 49,408 tokens) runs on the kept positions only.
        The kept logits are exactly those of the full sequence.

        Args:
            token_embeds: ``[B, L', D]`` CLIP token + positional embeddings of the input tokens.
            frames: ``[B, T, D]`` un-normalised projected frame features (the memory).
            frame_mask: ``[B, T]`` True on real frames.
            keep: None, or ``[B, L']`` True on the positions whose logits are wanted.

        Returns:
            ``[B, L', V]`` logits, or ``[K, V]`` at the K kept positions (row-major).
        """
        if keep is not None:
            length = int(keep.any(dim=0).nonzero().max()) + 1 if keep.any() else 1
            token_embeds, keep = token_embeds[:, :length], keep[:, :length]
        causal = nn.Transformer.generate_square_subsequent_mask(token_embeds.shape[1], device=frames.device)
        x = self.decoder(
            self.caption_prenorm(token_embeds), frames, tgt_mask=causal, tgt_is_causal=True,
            memory_key_padding_mask=~frame_mask,
        )
        return self.caption_head(x if keep is None else x[keep])


# ---------------------------------------------------------------------- the retriever
class PromptSwitch(Retriever):
    """Prompt Switch: Prompt Cube in the CLIP vision tower, prompt aggregation, mean pooling.

    Args:
        num_frames: training frames per video, nf (official: 6, one chunk); a multiple of
            ``num_prompts``. The aggregation groups nf frames at evaluation too.
        eval_num_frames: evaluation frames (official: 12, two groups); a multiple of ``num_frames``.
        num_prompts: Np, frames per chunk and prompts per frame (official: 6).
        use_captioner: train with the auxiliary caption loss (``--loss clip+caption``).
        num_captioner_layers: caption decoder depth (official: 2).
        frequent_word_weight: caption-loss class weight of frequent words (official: 0.25).
        caption_loss_weight: weight of the caption loss (official ``caption_loss_mult``: 0.5).
        aggregation_in_clip_group: train the aggregation attention at the CLIP lr, as the
            official name filter does (see the module docstring).
        shared: ``backbone``, ``pretrained``, ``quick_gelu``, ``max_words``
            (:class:`~retrieval.retriever.Retriever`).
    """

    fusion_free = True

    def __init__(
        self,
        num_frames: int = 6,
        eval_num_frames: int = 12,
        num_prompts: int = 6,
        use_captioner: bool = True,
        num_captioner_layers: int = 2,
        frequent_word_weight: float = 0.25,
        caption_loss_weight: float = 0.5,
        aggregation_in_clip_group: bool = True,
        **shared,
    ) -> None:
        if num_prompts < 1 or num_frames % num_prompts:
            raise ValueError(
                f"num_frames={num_frames} must be a multiple of num_prompts={num_prompts} (chunks of Np frames)"
            )
        if eval_num_frames % num_frames:
            raise ValueError(f"eval_num_frames={eval_num_frames} must be a multiple of num_frames={num_frames}: the "
                             "aggregation groups frames by the training count, as the official code does")
        super().__init__(num_frames=num_frames, **shared)
        self.eval_num_frames = eval_num_frames
        self.num_prompts = num_prompts
        self.caption_loss_weight = caption_loss_weight
        self.aggregation_in_clip_group = aggregation_in_clip_group
        self.prompt_cube = PromptCube(num_prompts, self.clip.vision_width)
        self.prompt_aggregation = PromptAggregation(
            self.clip.vision_width, self.clip.vision_blocks[0].attn.num_heads, num_frames
        )
        self.captioner = Captioner(self.clip, num_captioner_layers, frequent_word_weight) if use_captioner else None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """CLIP's parameters and, where the official name filter puts them, the aggregation's
        at the CLIP lr; the rest at the new-module lr."""
        groups = super().param_groups()
        if self.aggregation_in_clip_group:
            moved = {id(p) for p in self.prompt_aggregation.parameters()}
            groups = {"clip": [*groups["clip"], *(p for p in groups["new"] if id(p) in moved)],
                      "new": [p for p in groups["new"] if id(p) not in moved]}
        return groups

    # ------------------------------------------------------------------ text
    def encode_text(self, tokens: Tensor) -> TextFeatures:
        sentence, _ = self.clip.encode_text(tokens)  # [Q, D]
        return TextFeatures(embedding=F.normalize(sentence, dim=-1))

    # ------------------------------------------------------------------ video
    def prompted_tokens(self, frames: Tensor) -> Tensor:
        """Frames through the vision tower with the Prompt Cube and the switch.

        Args:
            frames: ``[B, T, 3, H, W]``, T a multiple of Np.

        Returns:
            ``[B·T, 1 + patches + Np, W]`` last-layer tokens (CLS first, prompts last).
        """
        x = self.clip.frame_tokens(rearrange(frames, "b t c h w -> (b t) c h w"))  # [B·T, 1 + P, W]
        x = self.prompt_cube(x)  # [B·T, 1 + P + Np, W]
        for block in self.clip.vision_blocks:
            x = prompt_switch_block(block, x, self.num_prompts)
        return x

    def frame_features(self, frames: Tensor) -> Tensor:
        """Projected, un-normalised frame features ``[B, T, D]`` after prompt aggregation.

        Args:
            frames: ``[B, T, 3, H, W]``, T a multiple of ``num_frames`` (groups of nf frames, each
                ``num_frames / num_prompts`` chunks of Np).
        """
        t = frames.shape[1]
        if t % self.num_frames:
            raise ValueError(
                f"{t} frames cannot be split into groups of num_frames={self.num_frames} (chunks of "
                f"num_prompts={self.num_prompts}): eval_num_frames ({self.eval_num_frames}) must be a multiple of it"
            )
        x = self.prompted_tokens(frames)  # [B·T, S + Np, W]
        cls = self.prompt_aggregation(x[:, 0], x[:, -self.num_prompts :])  # [B·T, W]
        return rearrange(self.clip.project_cls(cls), "(b t) d -> b t d", b=frames.shape[0])

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        """Mean of the normalised frames; with the captioner also the frames it reads."""
        self.check_frames(frames, frame_mask)
        x = self.frame_features(frames)  # [B, T, D]
        embedding = mean_pool_normalized(x, frame_mask)  # [B, D]
        if self.captioner is not None:
            return VideoFeatures(embedding=embedding, frames=x)
        return VideoFeatures(embedding=embedding)

    def prepare_gallery(self, video: VideoFeatures) -> VideoFeatures:
        """The embedding only: the captioner's frames are training's."""
        return VideoFeatures(embedding=video.embedding)

    # ------------------------------------------------------------------ training
    def auxiliary_losses(self, batch: dict[str, Tensor], text: TextFeatures, video: VideoFeatures,
                         logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weighted caption loss, predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``."""
        if self.captioner is None:
            return {}
        tokens = batch["tokens"]
        inputs = tokens[:, :-1]
        with torch.no_grad():  # official: no gradient reaches CLIP's text embeddings this way
            embeds = self.clip.token_embedding(inputs) + self.clip.positional_embedding[: inputs.shape[1]]
        keep, targets = caption_targets(tokens)
        logits = self.captioner(embeds, video.frames, batch["frame_mask"], keep)  # [K, V]
        loss = F.cross_entropy(logits, targets, weight=self.captioner.class_weight)  # weighted mean
        return {"caption": self.caption_loss_weight * loss}
