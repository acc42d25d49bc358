"""The CLIP backbone every method is built on (composition, not inheritance).

:class:`CLIPBackbone` wraps an open_clip model chosen by name. ``pretrained`` is ``None``
(random init), an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``) or a local
checkpoint path; both go through ``open_clip.create_model``, so users with weights get the
real ones and this repository tests the same code path on tiny configs it registers
(``retrieval/model_configs/vtr-*.json``).

The activation is the one the weights were trained with. open_clip builds ``ViT-B-32`` with
``nn.GELU`` whatever the tag and only warns, while OpenAI's weights (and every tag whose
pretrained config says ``quick_gelu``) were trained with QuickGELU; both CLIP towers and every
head block copied from them would run the wrong activation (scores move by 1-4.5 % relative).
``quick_gelu`` (:func:`weights_quick_gelu`) decides it:

- ``None`` (default): a tag gets what its pretrained config says (``openai``: QuickGELU);
  random init gets what the model config says (``ViT-B-32``, ``vtr-tiny``, ``vtr-micro``: GELU;
  ``ViT-B-32-quickgelu``: QuickGELU); a local checkpoint records no activation, so the model
  config decides, unless that name's published weights disagree with it (a ``ViT-B-32`` file
  may hold OpenAI's QuickGELU weights or LAION's GELU ones): then ``quick_gelu`` must be set;
- ``True`` / ``False``: that activation; an error where it contradicts the tag's weights or
  the model name (``-quickgelu`` configs).

What methods use:

- text: :meth:`encode_text` runs the text tower itself at ``L = max_words`` tokens
  (open_clip's own ``encode_text`` adds all 77 positional rows and fails on shorter tokens),
  returning the EOT sentence feature ``[Q, D]`` and per-token features ``[Q, L, D]``;
- video: :meth:`encode_frames` gives per-frame projected CLS ``[B, T, D]``; methods that modify
  the vision tower use its pieces: :meth:`frame_tokens` (patch embed + class/positional
  embeddings + ``ln_pre``), :attr:`vision_blocks`, :meth:`project_cls` (``ln_post`` + ``proj``);
- the text blocks and positional embedding, from which CLIP4Clip-style temporal transformers
  are initialised.
"""

from __future__ import annotations

import os

import open_clip
import torch
from einops import rearrange
from torch import Tensor, nn

import retrieval  # noqa: F401  (registers vtr's tiny configs with open_clip)


def weights_quick_gelu(name: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> bool:
    """Whether ``name`` with ``pretrained`` must be built with QuickGELU (else ``nn.GELU``).

    Args:
        name: a known open_clip model name.
        pretrained: ``None``, an open_clip pretrained tag, or a local checkpoint path.
        quick_gelu: ``None`` for what the weights need (module docstring), or the activation
            asked for.

    Raises:
        ValueError: ``quick_gelu`` contradicts the tag's weights or the model config, or is
            ``None`` for a local checkpoint whose model name has weights of both activations.
    """
    config = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    if pretrained is not None and not os.path.isfile(pretrained):  # a tag
        needed = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        if quick_gelu is not None and quick_gelu != needed:
            raise ValueError(
                f"quick_gelu={quick_gelu} contradicts the weights: {name!r} {pretrained!r} was trained with "
                f"{'QuickGELU' if needed else 'GELU'} (open_clip's pretrained config: quick_gelu={needed}); leave "
                f"quick_gelu unset (None) or set it to {needed}"
            )
        choice = needed
    elif quick_gelu is not None:
        choice = quick_gelu
    elif pretrained is None or config:
        choice = config
    else:  # a local checkpoint: it records no activation, the model config does unless it is ambiguous
        quick_tags = [t for t in open_clip.list_pretrained_tags_by_model(name)
                      if open_clip.get_pretrained_cfg(name, t).get("quick_gelu", False)]
        if quick_tags:
            alias = f"{name}-quickgelu"
            hint = f" (or name the model {alias!r} for QuickGELU weights)" if alias in open_clip.list_models() else ""
            raise ValueError(
                f"pretrained={pretrained!r} is a local checkpoint of {name!r}, whose published weights use "
                f"QuickGELU ({', '.join(quick_tags)}) or GELU (the others), and the file does not say which: "
                f"set quick_gelu=True or False to the activation it was trained with{hint}"
            )
        choice = config
    if config and not choice:
        raise ValueError(
            f"quick_gelu=False contradicts the model config of {name!r}, which is built with QuickGELU; "
            f"use the name without '-quickgelu' for GELU"
        )
    return choice


def create_clip(name: str, pretrained: str | None = None, quick_gelu: bool | None = None) -> nn.Module:
    """Build an open_clip CLIP model by name, with optional weights, in the activation they need.

    Args:
        name: an open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-32"`` or
            vtr's ``"vtr-tiny"``.
        pretrained: ``None`` for random init, an open_clip pretrained tag, or a path to a local
            checkpoint (a state dict saved with ``torch.save``).
        quick_gelu: ``None`` for the activation the weights were trained with, or ``True`` /
            ``False`` (see :func:`weights_quick_gelu`).

    Raises:
        ValueError: unknown model name or pretrained tag, with the known ones listed; an
            activation that contradicts the weights (names ``quick_gelu``).
        FileNotFoundError: ``pretrained`` looks like a path but no file is there.
    """
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; known: vtr-tiny, vtr-micro, {open_clip.list_models()[:8]}...")
    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
                raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} for {name!r} does not exist")
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {name!r}; known tags: {tags}")
    force = weights_quick_gelu(name, pretrained, quick_gelu)
    # force_quick_gelu=True on a "-quickgelu" config changes nothing; False leaves the config's GELU
    return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=force)


class CLIPBackbone(nn.Module):
    """An open_clip CLIP model with the pieces text-video retrievers need.

    Args:
        name: open_clip model name.
        pretrained: ``None``, an open_clip tag, or a local checkpoint path.
        max_words: text length ``L`` (SOT + words + EOT + padding); at most the model's context.
        quick_gelu: ``None`` for the activation the weights were trained with (the tag's
            pretrained config, the model config), or ``True`` / ``False``; a contradiction with
            the weights is an error (:func:`weights_quick_gelu`).

    Attributes:
        quick_gelu: whether both towers (and every block a method copies from them) run QuickGELU.
    """

    def __init__(
        self, name: str = "vtr-tiny", pretrained: str | None = None, max_words: int = 32, quick_gelu: bool | None = None
    ) -> None:
        super().__init__()
        clip = create_clip(name, pretrained, quick_gelu)
        visual = clip.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ValueError(f"{name!r}: vtr needs a ViT vision tower, got {type(visual).__name__}")
        if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type != "tok":
            raise ValueError(f"{name!r}: vtr needs CLS-token pooling (pool_type 'tok', no attention pooling)")
        context = clip.positional_embedding.shape[0]
        if not 2 <= max_words <= context:
            raise ValueError(f"max_words={max_words} must be in [2, {context}] (the text context of {name!r})")
        self.name, self.max_words = name, max_words
        self.quick_gelu = weights_quick_gelu(name, pretrained, quick_gelu)
        self.visual = visual
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.text_transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.logit_scale = clip.logit_scale
        self.register_buffer("causal_mask", clip.attn_mask[:max_words, :max_words].clone(), persistent=False)

    # ------------------------------------------------------------------ sizes
    @property
    def embed_dim(self) -> int:
        """D, the joint embedding width."""
        return self.visual.output_dim

    @property
    def vision_width(self) -> int:
        return self.visual.transformer.width

    @property
    def text_width(self) -> int:
        return self.text_transformer.width

    @property
    def image_size(self) -> int:
        size = self.visual.image_size
        return size[0] if isinstance(size, tuple) else size

    @property
    def vision_blocks(self) -> nn.ModuleList:
        """The ViT's residual attention blocks (batch-first ``[N, tokens, width]``)."""
        return self.visual.transformer.resblocks

    @property
    def text_blocks(self) -> nn.ModuleList:
        """The text transformer's residual blocks; CLIP4Clip-style heads copy the first few."""
        return self.text_transformer.resblocks

    # ------------------------------------------------------------------ text
    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Run the text tower at L tokens.

        Args:
            tokens: ``[Q, L]`` open_clip token ids (SOT ... EOT, 0-padded), ``L <= max_words``.

        Returns:
            ``(sentence [Q, D], words [Q, L, D])``: the projected EOT feature and the projection
            of every position (padding included; use ``tokens != 0`` as the mask).
        """
        length = tokens.shape[1]
        if length > self.max_words:
            raise ValueError(f"tokens have length {length} > max_words={self.max_words}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [Q, L, W]
        x = self.text_transformer(x, attn_mask=self.causal_mask[:length, :length])
        x = self.ln_final(x)
        words = x @ self.text_projection  # [Q, L, D]
        sentence = words[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)]
        return sentence, words

    # ------------------------------------------------------------------ video
    def frame_tokens(self, images: Tensor) -> Tensor:
        """Patch embedding + class and positional embeddings + ``ln_pre``.

        Args:
            images: ``[N, 3, H, W]`` normalised frames.

        Returns:
            ``[N, 1 + P, W]`` tokens ready for :attr:`vision_blocks` (CLS first).
        """
        return self.visual._embeds(images)

    def project_cls(self, cls: Tensor) -> Tensor:
        """``ln_post`` then the visual projection: ``[..., W] -> [..., D]``."""
        return self.visual.ln_post(cls) @ self.visual.proj

    def encode_images(self, images: Tensor) -> Tensor:
        """CLIP image features ``[N, D]`` for ``[N, 3, H, W]`` images."""
        x = self.visual.transformer(self.frame_tokens(images))
        return self.project_cls(x[:, 0])

    def encode_frames(self, frames: Tensor) -> Tensor:
        """Per-frame CLIP features: ``[B, T, 3, H, W] -> [B, T, D]``."""
        b = frames.shape[0]
        feats = self.encode_images(rearrange(frames, "b t c h w -> (b t) c h w"))
        return rearrange(feats, "(b t) d -> b t d", b=b)
