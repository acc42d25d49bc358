"""``RetrievalModule``: the one Lightning system that trains and evaluates any ``Retriever``.

It is composed of a retriever (``retrieval.retriever.Retriever``: the method, plain PyTorch),
the optimiser/schedule config and the evaluation options, and holds everything that is the
same for all methods (DESIGN.md): the training step (features gathered across ranks with
gradients, symmetric InfoNCE over the retriever's ``training_logits``, logit-scale clamp,
auxiliary terms), evaluation (each video and caption encoded once, gathered with their dataset
indices, the distributed sampler's padding duplicates dropped, ``score`` applied in gallery
chunks, one metric path whatever the dataset, features released after the epoch), exact
resumption (the torch random states travel in the checkpoint and are restored when training
restarts), parameter groups (CLIP lr vs new-module lr, from the retriever's ``param_groups``;
no decay on norms, biases, embeddings and the logit scale) and the step-wise warmup-cosine
schedule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import Tensor, nn

from retrieval.data.transforms import normalize_frames
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.losses import gather_with_grad, symmetric_infonce, world
from retrieval.metrics import RetrievalMetrics, summarize
from retrieval.postprocess import Postprocess
from retrieval.retriever import Retriever

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
    """Shared training and evaluation of a text-video retriever.

    Args:
        retriever: the method (``--model.retriever.class_path`` and its ``init_args``).
        optim: optimiser and schedule.
        eval_chunk_size: gallery videos (and queries) per ``score`` call at evaluation; None
            keeps the retriever's own (a memory bound of its scorer).

    The hyperparameters (checkpoints, logger files) hold the retriever's ``config`` (class path
    and arguments, the activation as built), so a checkpoint alone rebuilds it
    (``retrieval.recipes.retriever_from_checkpoint``).
    """

    def __init__(self, retriever: Retriever, optim: OptimConfig = OptimConfig(),
                 eval_chunk_size: int | None = None) -> None:
        super().__init__()
        if isinstance(retriever, dict):  # a checkpoint's hparams (load_from_checkpoint): its saved config
            retriever = Retriever.from_config(retriever)
        if isinstance(optim, dict):  # a checkpoint's hparams
            optim = OptimConfig(**{**optim, "betas": tuple(optim.get("betas", OptimConfig.betas))})
        self.retriever = retriever
        self.optim = optim
        if eval_chunk_size is not None:
            retriever.set_chunk_size(eval_chunk_size)
        # checkpoints and logger files keep the whole recipe as plain data
        self.save_hyperparameters({"retriever": retriever.config, "optim": asdict(optim),
                                   "eval_chunk_size": eval_chunk_size})
        self._eval_buffers: dict[str, list] = {"video": [], "text": []}
        self.per_query: dict[str, dict[str, Tensor]] = {}
        """The last evaluation's per-query results by stage (``RetrievalMetrics.per_query``: ranks,
        pair wins; a few ints per query), what paired comparisons and the results table resample."""
        self._rng_to_restore: dict[str, Tensor | list[Tensor]] | None = None

    # ------------------------------------------------------------------ training
    def contrastive_losses(self, text: TextFeatures, video: VideoFeatures) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The weighted symmetric InfoNCE terms of this rank's pairs against the global batch,
        and the retriever's ``training_logits`` of this rank's in-batch pairs."""
        retriever = self.retriever
        rank, world_size = world()
        b = len(text)
        if world_size == 1:
            logits = retriever.training_logits(text, video)
            targets = torch.arange(b, device=next(iter(logits.values())).device)
            rows, columns, local = logits, {k: v.mT for k, v in logits.items()}, logits
        else:
            all_text, all_video = gather_with_grad(text), gather_with_grad(video)
            targets = torch.arange(b, device=self.device) + rank * b
            rows = retriever.training_logits(text, all_video)
            columns = {k: v.mT for k, v in retriever.training_logits(all_text, video).items()}
            local = {k: v[..., rank * b:(rank + 1) * b] for k, v in rows.items()}
        losses = {}
        for name, weight in retriever.loss_weights.items():
            loss = symmetric_infonce(rows[name], columns[name], targets)
            losses[name] = loss if weight == 1.0 else weight * loss
        return losses, local

    def on_after_batch_transfer(self, batch: dict[str, Tensor], dataloader_idx: int) -> dict[str, Tensor]:
        """The loader's uint8 frames normalised on the model's device (``normalize_frames``)."""
        if "frames" in batch:
            batch["frames"] = normalize_frames(batch["frames"], batch["frame_mask"])
        return batch

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        text = self.retriever.encode_text(batch["tokens"])
        video = self.retriever.encode_video(batch["frames"], batch["frame_mask"])
        terms, logits = self.contrastive_losses(text, video)
        terms.update(self.retriever.auxiliary_losses(batch, text, video, logits))
        total = sum(terms.values())
        bs = len(text)
        self.log("train/loss", total, prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=bs, sync_dist=True)
        self.log("train/logit_scale", self.retriever.logit_scale(), batch_size=bs)
        return total

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.retriever.clip.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

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
        group_of = {id(p): group for group, params in self.retriever.param_groups().items() for p in params}
        lrs = {"clip": self.optim.clip_lr, "new": self.optim.lr}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.retriever.named_parameters():  # groups keep the module order of their parameters
            if not p.requires_grad:
                continue
            no_decay = not self.optim.decay_all and (p.ndim < 2 or "embedding" in name or "logit_scale" in name)
            groups.setdefault((group_of[id(p)] == "clip", no_decay), []).append(p)
        param_groups = [
            {
                "params": params,
                "lr": lrs["clip" if is_clip else "new"],
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
            feats = self.retriever.prepare_gallery(self.retriever.encode_video(batch["frames"], batch["frame_mask"]))
            self._eval_buffers["video"].append((batch["video_index"], feats))
        else:
            feats = self.retriever.encode_text(batch["tokens"])
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
        """All ranks' evaluation features, each video and caption once, in dataset order; the
        buffers are emptied.

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
    def evaluate(self, text: TextFeatures, video: VideoFeatures, caption_video: Tensor,
                 annotations: dict[str, Tensor] | None = None, stage: str = "test") -> dict[str, float]:
        """The metric suite of ``score`` over the gallery; the queries are split evenly across ranks.

        ``annotations`` (the synthetic benchmark's ``caption_kind`` and ``video_partner``,
        as ``VideoTextDataModule.eval_annotations`` gives them) add R@1 by caption kind and the
        temporal pair accuracy, from the same score rows. Every R@K and the pair accuracy
        carry their bootstrap interval (``_lo`` / ``_hi``, ``retrieval.metrics``); the per-query
        results are kept in :attr:`per_query` under ``stage``.
        """
        rank, world_size = world()
        device = caption_video.device
        views = {k: annotations[k].to(device) for k in ("caption_kind", "video_partner") if k in (annotations or {})}
        metric = RetrievalMetrics(len(video), video_partner=views.get("video_partner")).to(device)
        kind = views.get("caption_kind")
        per_rank = -(-len(text) // world_size)
        first, last = rank * per_rank, min(len(text), (rank + 1) * per_rank)
        if first >= last:  # more ranks than queries: still take part in the metric's sync
            metric.update(torch.empty(0, len(video), device=device), caption_video[:0], None if kind is None else kind[:0])
        chunk = self.retriever.eval_chunk_size
        for q0 in range(first, last, chunk):
            q1 = min(last, q0 + chunk)
            metric.update(self.retriever.score_gallery(text[q0:q1], video), caption_video[q0:q1],
                          None if kind is None else kind[q0:q1])
        with metric.sync_context():  # every rank's rows (a no-op in one process)
            per_query = metric.per_query()
        self.per_query[stage] = {k: v.cpu() for k, v in per_query.items()}
        return summarize(per_query)

    def _log_eval(self, stage: str) -> None:
        text, video, caption_video = self.gather_eval_features()
        annotations = getattr(self.trainer.datamodule, "eval_annotations", lambda _: {})(stage)
        metrics = self.evaluate(text, video, caption_video, annotations, stage)
        for callback in self.trainer.callbacks:  # DSL / QB-Norm: their own labelled rows, beside the plain ones
            if isinstance(callback, Postprocess):
                metrics.update(callback.evaluation_rows(self, stage, text, video, caption_video))
        del text, video  # the features are released here, not kept until the next epoch
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=False, rank_zero_only=False)
        self.log(f"{stage}/t2v_R1", metrics["t2v/R@1"], prog_bar=True)


class FreezeVisionTower(BaseFinetuning):
    """CLIP's vision tower frozen for the whole run (CLIP4Clip's ``freeze_layer_num`` at its
    maximum): a method's own modules, the text tower and what a method places inside the ViT
    (Prompt Switch's cube and aggregation, STAN's branch) still train. ``vtr compare``'s default;
    with ``vtr fit``, add it to ``trainer.callbacks`` (``experiments/trainer/cpu-quick.yaml``)."""

    def freeze_before_training(self, pl_module: RetrievalModule) -> None:
        self.freeze(pl_module.retriever.clip.visual)

    def finetune_function(self, pl_module: RetrievalModule, epoch: int, optimizer) -> None:
        """Never unfrozen."""


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique values of ``index`` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    positions = torch.arange(len(index), device=index.device)
    first = torch.full((len(unique),), len(index), device=index.device, dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, "amin")
    return unique, first
