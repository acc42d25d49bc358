"""``Retriever``: a text-video retriever as plain PyTorch (DESIGN.md, "A retriever is plain PyTorch").

A method implements three stages:

- ``encode_video(frames [B,T,3,H,W], frame_mask [B,T]) -> VideoFeatures`` (offline, never sees text);
- ``encode_text(tokens [Q,L]) -> TextFeatures`` (online, once per query);
- ``score(text, video) -> [Q, N]`` logits (online, over the gallery);

and, where its paper has them, ``prepare_gallery`` (evaluation-only precomputation on the
cached video features), ``training_logits`` / ``loss_weights`` (the score matrices its
contrastive loss is taken over) and ``auxiliary_losses``. Everything here is what the methods
share: the backbone, the logit scale, frame checks, the parameter groups, gallery chunking and
the record of the arguments a retriever was built with (:attr:`Retriever.config`), from which
a checkpoint alone rebuilds it (``retrieval.recipes``).

Training (``retrieval.training.RetrievalModule``), evaluation, the offline index and the
latency benchmark all call the same stages: what is timed is what is scored. Nothing here
imports Lightning: a notebook, a check against official code or another training loop drives
a retriever directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from retrieval.backbone import CLIPBackbone
from retrieval.features import TextFeatures, VideoFeatures


class Retriever(nn.Module):
    """What every text-video retriever shares.

    A subclass's ``__init__`` takes its paper's hyperparameters (the paper's values as
    defaults) and passes ``**shared`` on:

    Args:
        backbone: open_clip model name.
        pretrained: ``None``, an open_clip pretrained tag, or a local checkpoint path.
        quick_gelu: the CLIP activation; ``None`` builds the one the weights were trained with
            (``retrieval.backbone.weights_quick_gelu``). The value built is recorded in
            :attr:`config`, so a rebuild without the weights runs the same one.
        num_frames: frames per training video (evaluation may use another count where the
            method allows it).
        max_words: text tokens L, SOT and EOT included.
    """

    fusion_free: bool = False
    """True when the video side never sees the text: one embedding per video, dot-product score."""

    eval_chunk_size: int = 1024
    """Gallery videos (and queries) per ``score`` call at evaluation: a memory bound of the
    method's scorer (an evaluation option may replace it on an instance)."""

    eval_chunk_pairs: int | None = None
    """None, or a budget of (query, video) pairs per ``score`` call: with Q queries a gallery
    chunk holds ``clamp(eval_chunk_pairs // Q, 16, eval_chunk_size)`` videos, so the per-pair
    tensors stay cache-sized for a single query and for a batch of 64 alike."""

    eval_chunk_pairs_cuda: int | None = None
    """None, or the pair budget per ``score`` call where the gallery is on a CUDA device: a chunk
    then holds ``max(16, eval_chunk_pairs_cuda // Q)`` videos, not capped by ``eval_chunk_size``
    (a CPU cache bound). None: the CPU's rule on every device. The CPU's small chunks leave a GPU
    waiting on thousands of launches: at 1M videos on an H200 (fp16, ViT-B/32, one query),
    X-CLIP, X-Pool and GLCCL took 1.16, 2.12 and 1.75 s with them and 33, 18 and 55 ms with
    chunks of 65,536 videos (``experiments/results/latency_cuda-nvidia-h200_*_chunk65536.csv``),
    the budget those three set."""

    def __init__(
        self,
        backbone: str = "vtr-tiny",
        pretrained: str | None = None,
        quick_gelu: bool | None = None,
        num_frames: int = 12,
        max_words: int = 32,
    ) -> None:
        super().__init__()
        self.clip = CLIPBackbone(backbone, pretrained, max_words, quick_gelu)
        self.num_frames = num_frames
        self.max_words = max_words
        # what rebuilds this retriever (``config``): these arguments, the activation as built, and
        # the paper arguments of every subclass ``__init__`` that called this one
        self._init_args = {"backbone": backbone, "pretrained": pretrained, "quick_gelu": self.clip.quick_gelu,
                           "num_frames": num_frames, "max_words": max_words, **_subclass_arguments(self)}

    @property
    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}``: the arguments this retriever was built with (the
        activation as built), plain data for hyperparameters, indexes and fingerprints."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self._init_args)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Retriever:
        """The retriever a ``{class_path, init_args}`` config (:attr:`config`, a recipe's
        ``model.retriever``) describes, built by the parser ``vtr fit`` builds it with."""
        from jsonargparse import ArgumentParser  # the CLI's parser: a retriever built in code never needs it

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(cls, "retriever", required=True)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
        return instantiate(parser.parse_object({"retriever": config})).retriever

    # ------------------------------------------------------------------ the three stages
    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        """Text-independent video features (offline, once per video)."""
        raise NotImplementedError

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        """Query features (online, once per query)."""
        raise NotImplementedError

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``[Q, N]`` logits. Fusion-free default: logit scale times the dot product."""
        if not self.fusion_free:
            raise NotImplementedError(f"{type(self).__name__} is text-conditioned and must implement score()")
        return self.logit_scale() * text.embedding @ video.embedding.T

    def prepare_gallery(self, video: VideoFeatures) -> VideoFeatures:
        """The features a gallery keeps of ``encode_video``'s output, for evaluation and
        indexes: where a method precomputes what only inference needs (X-Pool's rearranged
        block) or drops what only training reads. The identity by default."""
        return video

    # ------------------------------------------------------------------ training
    @property
    def loss_weights(self) -> dict[str, float]:
        """The weight of each symmetric InfoNCE term, by the names of :meth:`training_logits`."""
        return {"contrastive": 1.0}

    def training_logits(self, text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """The ``[Q, N]`` logit matrices the training loss takes symmetric InfoNCE over, by name
        (weighted by :attr:`loss_weights`). Entries not in ``loss_weights`` (``[..., Q, N]``)
        are not a loss: they reach :meth:`auxiliary_losses`. Default: ``{"contrastive": score}``."""
        return {"contrastive": self.score(text, video)}

    def auxiliary_losses(self, batch: dict[str, Tensor], text: TextFeatures, video: VideoFeatures,
                         logits: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra weighted loss terms of the method, keyed by name (none by default).

        Args:
            batch: the training batch (this rank's).
            text, video: this rank's features.
            logits: :meth:`training_logits` of this rank's in-batch pairs (``[..., B, B]``), as
                the loss scored them.
        """
        return {}

    # ------------------------------------------------------------------ helpers for methods
    def logit_scale(self) -> Tensor:
        """CLIP's learned temperature, ``exp(logit_scale)``, clamped at 100."""
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def check_frames(self, frames: Tensor, frame_mask: Tensor) -> None:
        """Clear errors for frame tensors that do not fit the backbone."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be [B, T, 3, H, W], got {tuple(frames.shape)}")
        if frame_mask.shape != frames.shape[:2]:
            raise ValueError(f"frame_mask {tuple(frame_mask.shape)} does not match frames {tuple(frames.shape[:2])}")
        if not bool(frame_mask.any(dim=1).all()):
            raise ValueError("a video in the batch has no valid frame (frame_mask all False)")
        size = self.clip.image_size
        if frames.shape[-2:] != (size, size):
            raise ValueError(f"frames are {tuple(frames.shape[-2:])}, the backbone {self.clip.name!r} expects {size}x{size}")

    def new_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter that is not CLIP's, whatever learning rate it trains at."""
        clip_ids = {id(p) for p in self.clip.parameters()}
        return (p for p in self.parameters() if id(p) not in clip_ids)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Which parameters train at which learning rate: ``{"clip": ..., "new": ...}``
        (``optim.clip_lr`` and ``optim.lr``). CLIP's vs the rest by default; a method whose
        official code gives one of its own modules the CLIP learning rate moves it (Prompt Switch)."""
        clip_ids = {id(p) for p in self.clip.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"clip": [], "new": []}
        for p in self.parameters():
            groups["clip" if id(p) in clip_ids else "new"].append(p)
        return groups

    def set_pair_budget(self, eval_chunk_pairs: int | None) -> None:
        """Set ``eval_chunk_pairs`` on this instance, on every device (the CUDA budget too),
        refusing a value < 1."""
        if eval_chunk_pairs is not None and eval_chunk_pairs < 1:
            raise ValueError(f"eval_chunk_pairs must be >= 1 or None, got {eval_chunk_pairs}")
        self.eval_chunk_pairs = eval_chunk_pairs
        self.eval_chunk_pairs_cuda = None

    def gallery_chunk(self, queries: int, device: torch.device) -> int:
        """Gallery videos per ``score`` call for ``queries`` queries over a gallery on ``device``:
        ``eval_chunk_pairs_cuda`` on CUDA where set, else ``eval_chunk_size`` under the
        ``eval_chunk_pairs`` budget."""
        if device.type == "cuda" and self.eval_chunk_pairs_cuda is not None:
            return max(16, self.eval_chunk_pairs_cuda // queries)
        if self.eval_chunk_pairs is not None:
            return max(16, min(self.eval_chunk_size, self.eval_chunk_pairs // queries))
        return self.eval_chunk_size

    def set_chunk_size(self, eval_chunk_size: int) -> None:
        """Set ``eval_chunk_size`` on this instance, refusing a value < 1."""
        if eval_chunk_size < 1:
            raise ValueError(f"eval_chunk_size must be >= 1, got {eval_chunk_size}")
        self.eval_chunk_size = eval_chunk_size

    # ------------------------------------------------------------------ gallery chunking
    def score_gallery(self, text: TextFeatures, video: VideoFeatures, chunk_size: int | None = None) -> Tensor:
        """``score`` of a few queries over a gallery, in gallery chunks: ``[q, N]``.

        Text-conditioned scorers build per-pair tensors, so chunking the gallery bounds their
        memory by the chunk, whatever N is. A fusion-free score is one ``[q, N]`` product and is
        not chunked unless ``chunk_size`` is given. Without ``chunk_size`` a chunk holds
        :meth:`gallery_chunk` videos.
        """
        if self.fusion_free and chunk_size is None:  # one [Q, D] x [D, N] product reads the gallery once
            if type(self).score is Retriever.score and batched_gemv(video.embedding, len(text)):
                return self.logit_scale() * frame_products(video.embedding[:, None, :], text.embedding).view(1, -1)
            return self.score(text, video)
        chunk = chunk_size or self.gallery_chunk(len(text), video.device)
        return torch.cat([self.score(text, part) for _, part in video.chunks(chunk)], dim=1)

    @torch.no_grad()
    def similarity(self, text: TextFeatures, video: VideoFeatures, chunk_size: int | None = None) -> Tensor:
        """The full ``[Q, N]`` score matrix (small sets: analysis, tests, post-processing)."""
        chunk = chunk_size or self.eval_chunk_size
        return torch.cat([self.score_gallery(part, video, chunk) for _, part in text.chunks(chunk)])


def batched_gemv(gallery: Tensor, queries: int) -> bool:
    """Whether one query's product with a ``[N, D]`` gallery runs faster as :func:`frame_products`'
    batched products (``gallery[:, None, :]``): one query, fp32 on the CPU, rows of 128 or more.
    MKL runs ``[N, D] x [D, 1]`` as a gemv at a third of the memory's read rate there (2 threads,
    one run, ms for 1M rows: D = 128 75 against 45 batched, D = 512 (500k rows) 101 against 34;
    D = 64 15 against 20, so not below 128)."""
    return queries == 1 and gallery.device.type == "cpu" and gallery.dtype == torch.float32 and gallery.shape[1] >= 128


def frame_products(frames: Tensor, operand: Tensor) -> Tensor:
    """Every cached frame of a gallery chunk against every row of a text operand:
    ``[N, T, D], [C, D] -> [N, T, C]`` (text-conditioned scorers, gallery-major; one query over a
    fusion-free gallery too, as ``[N, 1, D]`` frames, where :func:`batched_gemv` says so).

    One ``[N·T, D] x [D, C]`` GEMM reads the frames once. For a single column (one query's
    vector) it is a batched product against the stride-0 expanded column instead: MKL runs the
    ``[N·T, D] x [D, 1]`` GEMM as a single-threaded gemv at about half the memory's read rate
    on this project's 2-core CPU (throwaway timings: 12 against 27 GB/s over a 246 MB gallery).
    """
    n, t, d = frames.shape
    if len(operand) == 1:
        return torch.bmm(frames, operand.T.expand(n, d, 1))
    return (frames.reshape(n * t, d) @ operand.T).view(n, t, -1)


def _subclass_arguments(retriever: Retriever) -> dict[str, Any]:
    """The named arguments of the subclass ``__init__`` calls on the stack above
    ``Retriever.__init__`` (as Lightning's ``save_hyperparameters`` reads them): a subclass
    passes ``**shared`` on and keeps its paper's arguments, which are read here."""
    args: dict[str, Any] = {}
    frame = inspect.currentframe()
    frame = frame.f_back.f_back if frame is not None and frame.f_back is not None else None  # above Retriever.__init__
    while frame is not None and frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is retriever:
        info = inspect.getargvalues(frame)
        for name in info.args[1:]:
            args.setdefault(name, info.locals[name])
        frame = frame.f_back
    for shared in ("backbone", "pretrained", "quick_gelu", "num_frames", "max_words"):
        args.pop(shared, None)
    return args
