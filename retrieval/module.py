"""``RetrievalModule``: the LightningModule every retriever subclasses.

A method implements three stages (DESIGN.md):

- ``encode_video(frames [B,T,3,H,W], frame_mask [B,T]) -> VideoFeatures`` (offline, never sees text);
- ``encode_text(tokens [Q,L]) -> TextFeatures`` (online, once per query);
- ``score(text, video) -> [Q, N]`` logits (online, over the gallery).

and optionally ``auxiliary_losses``. Everything else is here and shared: the training step
(features gathered across ranks with gradients, symmetric InfoNCE, logit-scale clamp),
evaluation (each video and caption encoded once, gathered with their dataset indices, the
distributed sampler's padding duplicates dropped, ``score`` applied in gallery chunks,
metrics split across ranks), exact resumption (the torch random states travel in the
checkpoint and are restored when training restarts), parameter groups (CLIP lr, from the
method's ``clip_lr_parameters``, vs new-module lr; no decay on norms, biases, embeddings and
the logit scale) and the step-wise warmup-cosine schedule.

Training, evaluation, the offline index and the latency benchmark all call the same three
stages: what is timed is what is scored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import Tensor, nn

from retrieval.backbone import CLIPBackbone
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.losses import gather_with_grad, symmetric_infonce, world
from retrieval.metrics import RetrievalMetrics, pair_metrics, retrieval_metrics
from retrieval.postprocess import Postprocess

log = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule of a recipe.

    Attributes:
        lr: learning rate of the new (non-CLIP) parameters.
        clip_lr: learning rate of the CLIP backbone's parameters.
        weight_decay: AdamW's decoupled weight decay.
        decay_all: decay every parameter (X-Pool / Prompt Switch code) instead of excluding
            norms, biases, embeddings and the logit scale.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_ratio: fraction of the total steps spent in linear warmup, then cosine to 0.
    """

    lr: float = 1e-4
    clip_lr: float = 1e-7
    weight_decay: float = 0.2
    decay_all: bool = False
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_ratio: float = 0.1


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then half a cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class RetrievalModule(L.LightningModule):
    """Shared training and evaluation loop of a CLIP-based text-video retriever.

    Args:
        backbone: open_clip model name.
        pretrained: ``None``, an open_clip pretrained tag, or a local checkpoint path.
        num_frames: frames per training video (evaluation may use another count where the
            method allows it).
        max_words: text tokens L, SOT and EOT included.
        optim: optimiser and schedule.
        eval_chunk_size: gallery videos (and queries) scored per ``score`` call at evaluation.
        quick_gelu: the CLIP activation; ``None`` builds the one the weights were trained with
            (``retrieval.backbone.weights_quick_gelu``). The value built is stored in the
            hyperparameters, so a checkpoint rebuilt without its weights runs the same one.
    """

    offline: bool = False
    """True when the method is fusion-free: one embedding per video, dot-product score."""

    eval_chunk_pairs: int | None = None
    """None, or a budget of (query, video) pairs per ``score`` call (text-conditioned methods
    take it as an argument): with Q queries a gallery chunk holds
    ``clamp(eval_chunk_pairs // Q, 16, eval_chunk_size)`` videos, so the per-pair tensors stay
    cache-sized for a single query and for a batch of 64 alike."""

    def __init__(
        self,
        backbone: str = "vtr-tiny",
        pretrained: str | None = None,
        num_frames: int = 12,
        max_words: int = 32,
        optim: OptimConfig = OptimConfig(),
        eval_chunk_size: int = 1024,
        quick_gelu: bool | None = None,
    ) -> None:
        super().__init__()
        if isinstance(optim, dict):  # a checkpoint's hparams
            optim = OptimConfig(**{**optim, "betas": tuple(optim.get("betas", OptimConfig.betas))})
        # checkpoints and logger files keep the recipe as plain data
        self.save_hyperparameters(ignore=["optim"])
        self.save_hyperparameters({**self.hparams, "optim": asdict(optim)})
        self.clip = CLIPBackbone(backbone, pretrained, max_words, quick_gelu)
        # the activation actually built, so a rebuild from the checkpoint without the weights
        # (pretrained=None: tools, ``vtr index``) builds the same one
        self.hparams["quick_gelu"] = self.clip.quick_gelu
        self.num_frames = num_frames
        self.max_words = max_words
        self.optim = optim
        if eval_chunk_size < 1:
            raise ValueError(f"eval_chunk_size must be >= 1, got {eval_chunk_size}")
        self.eval_chunk_size = eval_chunk_size
        self.eval_features: dict[str, tuple[TextFeatures, VideoFeatures, Tensor]] = {}
        self._eval_buffers: dict[str, list] = {"video": [], "text": []}
        self._rng_to_restore: dict[str, Tensor | list[Tensor]] | None = None

    # ------------------------------------------------------------------ the three stages
    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        """Text-independent video features (offline, once per video)."""
        raise NotImplementedError

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        """Query features (online, once per query)."""
        raise NotImplementedError

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``[Q, N]`` logits. Fusion-free default: logit scale times the dot product."""
        if not self.offline:
            raise NotImplementedError(f"{type(self).__name__} is text-conditioned and must implement score()")
        return self.logit_scale() * text.sentence @ video.embedding.T

    def auxiliary_losses(self, batch: dict[str, Tensor], text: TextFeatures, video: VideoFeatures) -> dict[str, Tensor]:
        """Extra weighted loss terms of the method, keyed by name (none by default)."""
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

    def clip_lr_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that train at ``optim.clip_lr`` (the rest train at ``optim.lr``).

        CLIP's by default; a method whose official code gives one of its own modules the CLIP
        learning rate adds it here (Prompt Switch's aggregation).
        """
        return self.clip.parameters()

    def set_pair_budget(self, eval_chunk_pairs: int | None) -> None:
        """Set ``eval_chunk_pairs`` (a text-conditioned method's argument), refusing a value < 1."""
        if eval_chunk_pairs is not None and eval_chunk_pairs < 1:
            raise ValueError(f"eval_chunk_pairs must be >= 1 or None, got {eval_chunk_pairs}")
        self.eval_chunk_pairs = eval_chunk_pairs

    def score_gallery(self, text: TextFeatures, video: VideoFeatures, chunk_size: int | None = None) -> Tensor:
        """``score`` of a few queries over a gallery, in gallery chunks: ``[q, N]``.

        Text-conditioned scorers build per-pair tensors, so chunking the gallery bounds their
        memory by the chunk, whatever N is. A fusion-free score is one ``[q, N]`` product and is
        not chunked unless ``chunk_size`` is given. Without ``chunk_size`` a chunk holds
        ``eval_chunk_size`` videos, or fewer under the ``eval_chunk_pairs`` budget.
        """
        if self.offline and chunk_size is None:  # one [Q, D] x [D, N] product reads the gallery once
            return self.score(text, video)
        chunk = chunk_size or self.eval_chunk_size
        if chunk_size is None and self.eval_chunk_pairs is not None:
            chunk = max(16, min(chunk, self.eval_chunk_pairs // len(text)))
        return torch.cat([self.score(text, part) for _, part in video.chunks(chunk)], dim=1)

    @torch.no_grad()
    def similarity(self, text: TextFeatures, video: VideoFeatures, chunk_size: int | None = None) -> Tensor:
        """The full ``[Q, N]`` score matrix (small sets: analysis, tests)."""
        chunk = chunk_size or self.eval_chunk_size
        return torch.cat([self.score_gallery(part, video, chunk) for _, part in text.chunks(chunk)])

    # ------------------------------------------------------------------ training
    def contrastive_loss(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """Symmetric InfoNCE of this rank's pairs against the global batch."""
        rank, world_size = world()
        b = len(text)
        if world_size == 1:
            logits = self.score(text, video)
            targets = torch.arange(b, device=logits.device)
            return symmetric_infonce(logits, logits.T, targets)
        all_text, all_video = gather_with_grad(text), gather_with_grad(video)
        targets = torch.arange(b, device=self.device) + rank * b
        return symmetric_infonce(self.score(text, all_video), self.score(all_text, video).T, targets)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        text = self.encode_text(batch["tokens"])
        video = self.encode_video(batch["frames"], batch["frame_mask"])
        loss = self.contrastive_loss(text, video)
        terms = {"contrastive": loss, **self.auxiliary_losses(batch, text, video)}
        total = sum(terms.values())
        bs = len(text)
        self.log("train/loss", total, prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs, sync_dist=True)
        self.log("train/logit_scale", self.logit_scale(), batch_size=bs)
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    # ------------------------------------------------------------------ exact resumption
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # dropout, DropPath and random frame sampling draw from these: a resumed run must
        # continue their streams, not restart them from the seed
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # after Lightning has built the loaders (and drawn their seeds), before the first step
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"])
            if "cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["cuda"])
            self._rng_to_restore = None

    def configure_optimizers(self):
        clip_lr_ids = {id(p) for p in self.clip_lr_parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():  # groups keep the module order of their parameters
            if not p.requires_grad:
                continue
            no_decay = not self.optim.decay_all and (p.ndim < 2 or "embedding" in name or "logit_scale" in name)
            groups.setdefault((id(p) in clip_lr_ids, no_decay), []).append(p)
        param_groups = [
            {
                "params": params,
                "lr": self.optim.clip_lr if is_clip else self.optim.lr,
                "weight_decay": 0.0 if no_decay else self.optim.weight_decay,
                "name": f"{'clip' if is_clip else 'new'}{'/no_decay' if no_decay else ''}",
            }
            for (is_clip, no_decay), params in sorted(groups.items())
        ]
        # the fused kernel (CPU and CUDA) updates every tensor in one pass; on the CPU the default
        # per-parameter Python loop is a visible share of a small model's step
        fused = all(p.device.type in ("cpu", "cuda") for group in param_groups for p in group["params"])
        optimizer = torch.optim.AdamW(param_groups, betas=self.optim.betas, eps=self.optim.eps, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(self.optim.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        if "frames" in batch:
            feats = self.encode_video(batch["frames"], batch["frame_mask"])
            self._eval_buffers["video"].append((batch["video_index"], feats))
        else:
            feats = self.encode_text(batch["tokens"])
            self._eval_buffers["text"].append((batch["caption_index"], batch["video_index"], feats))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._eval_buffers = {"video": [], "text": []}

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a partial pass: nothing meaningful to rank
            self._eval_buffers = {"video": [], "text": []}
            return
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _gather_unique(self, index: Tensor, fields: dict[str, Tensor], what: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Gather rows from all ranks, drop the sampler's padding duplicates, sort by index."""
        gathered = self.all_gather({"index": index, **fields})
        # all_gather prepends the world dimension whenever a process group exists, a world of
        # one included (DDP on a single device), and never without one
        if gathered["index"].dim() == 2:
            gathered = {k: v.flatten(0, 1) for k, v in gathered.items()}
        index = gathered.pop("index")
        unique, first = _first_occurrence(index)
        if not torch.equal(unique, torch.arange(len(unique), device=unique.device)):
            raise RuntimeError(f"evaluation {what}: dataset indices are not 0..{len(unique) - 1}; some {what} were never encoded")
        return unique, {k: v[first] for k, v in gathered.items()}

    def gather_eval_features(self) -> tuple[TextFeatures, VideoFeatures, Tensor]:
        """All ranks' evaluation features, each video and caption once, in dataset order.

        Returns:
            ``(text [Q], video [N], caption_video [Q])``.
        """
        videos, texts = self._eval_buffers["video"], self._eval_buffers["text"]
        if not videos or not texts:
            raise RuntimeError("evaluation needs a videos loader and a captions loader (see VideoTextDataModule)")
        video_feats = VideoFeatures.cat([f for _, f in videos])
        _, vfields = self._gather_unique(torch.cat([i for i, _ in videos]), video_feats.as_dict(), "videos")
        text_feats = TextFeatures.cat([f for _, _, f in texts])
        fields = {"caption_video": torch.cat([v for _, v, _ in texts]), **text_feats.as_dict()}
        _, tfields = self._gather_unique(torch.cat([i for i, _, _ in texts]), fields, "captions")
        caption_video = tfields.pop("caption_video")
        self._eval_buffers = {"video": [], "text": []}
        return TextFeatures(**tfields), VideoFeatures(**vfields), caption_video

    @torch.no_grad()
    def evaluate(self, text: TextFeatures, video: VideoFeatures, caption_video: Tensor) -> dict[str, float]:
        """Metrics of ``score`` over the gallery; the queries are split evenly across ranks."""
        rank, world_size = world()
        metric = RetrievalMetrics(len(video)).to(caption_video.device)
        per_rank = -(-len(text) // world_size)
        first, last = rank * per_rank, min(len(text), (rank + 1) * per_rank)
        if first >= last:  # more ranks than queries: still take part in the metric's sync
            metric.update(torch.empty(0, len(video), device=caption_video.device), caption_video[:0])
        for q0 in range(first, last, self.eval_chunk_size):
            q1 = min(last, q0 + self.eval_chunk_size)
            metric.update(self.score_gallery(text[q0:q1], video), caption_video[q0:q1])
        return metric.compute()

    def _log_eval(self, stage: str) -> None:
        text, video, caption_video = self.gather_eval_features()
        self.eval_features[stage] = (text, video, caption_video)
        annotations = getattr(self.trainer.datamodule, "eval_annotations", lambda _: {})(stage)
        if "caption_kind" in annotations:  # the (small) synthetic benchmark: score once, read every view of it
            similarity = self.similarity(text, video)
            metrics = retrieval_metrics(similarity, caption_video)
            metrics.update(pair_metrics(similarity, caption_video, *(annotations[k].to(similarity.device)
                                                                   for k in ("caption_kind", "video_partner"))))
        else:
            metrics = self.evaluate(text, video, caption_video)
        for callback in self.trainer.callbacks:  # DSL / QB-Norm: their own labelled rows, beside the plain ones
            if isinstance(callback, Postprocess):
                metrics.update(callback.evaluation_rows(self, stage, text, video, caption_video))
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=False, rank_zero_only=False)
        self.log(f"{stage}/t2v_R1", metrics["t2v/R@1"], prog_bar=True)


class FreezeVisionTower(BaseFinetuning):
    """CLIP's vision tower frozen for the whole run (CLIP4Clip's ``freeze_layer_num`` at its
    maximum): a method's own modules, the text tower and what a method places inside the ViT
    (Prompt Switch's cube and aggregation, STAN's branch) still train. ``vtr compare``'s default;
    with ``vtr fit``, add it to ``trainer.callbacks`` (``experiments/trainer/cpu-quick.yaml``)."""

    def freeze_before_training(self, pl_module: RetrievalModule) -> None:
        self.freeze(pl_module.clip.visual)

    def finetune_function(self, pl_module: RetrievalModule, epoch: int, optimizer) -> None:
        """Never unfrozen."""


def frame_products(frames: Tensor, operand: Tensor) -> Tensor:
    """Every cached frame of a gallery chunk against every row of a text operand:
    ``[N, T, D], [C, D] -> [N, T, C]`` (text-conditioned scorers, gallery-major).

    One ``[N·T, D] x [D, C]`` GEMM reads the frames once. For a single column (one query's
    vector) it is a batched product against the stride-0 expanded column instead: MKL runs the
    ``[N·T, D] x [D, 1]`` GEMM as a single-threaded gemv at about half the memory's read rate
    on this project's 2-core CPU (throwaway timings: 12 against 27 GB/s over a 246 MB gallery).
    """
    n, t, d = frames.shape
    if len(operand) == 1:
        return torch.bmm(frames, operand.T.expand(n, d, 1))
    return (frames.reshape(n * t, d) @ operand.T).view(n, t, -1)


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``index`` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    positions = torch.arange(len(index), device=index.device)
    first = torch.full((len(unique),), len(index), device=index.device, dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, "amin")
    return unique, first
