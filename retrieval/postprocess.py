"""Inference-time re-scoring that papers mark with a star: DSL and QB-Norm.

Both re-score the caption x video similarity after the model has scored it, and both use
information a plain query does not have, so vtr reports them only as their own labelled
rows (``t2v+DSL/R@1``, ``v2t+DSL/R@1``, ``t2v+QB/R@1``), never in place of the plain numbers:

- **DSL** (dual softmax, CAMoE; TS2-Net's "inverted softmax" at test time) uses *every test
  query at once*: each video's prior is a softmax over all Q test captions, so a query's
  scores depend on the other test queries. It cannot serve one online query and is not
  part of any per-query latency. Computed on the full matrix, never in query chunks.
- **QB-Norm** (querybank normalisation, dynamic inverted softmax, Bogolin et al. 2022) uses a
  querybank of *training captions scored against the test gallery*; test queries stay
  independent of each other. Rows it does not re-score keep their raw scores, so one output
  mixes two units: only its t2v ranking means anything (the official code reports t2v only).

Scale: vtr's scores are logits (CLIP's logit scale times the cosine, scale <= 100). DSL's
official inference form (temperature 1) is applied to logits too, as TS2-Net does. QB-Norm's
official ``beta=20`` assumes cosine similarities: on logits at scale 100 the same re-scoring
is ``beta=0.2``; the evaluation option therefore defaults to ``beta = 20 / logit_scale``.
"""

from __future__ import annotations

import logging
import random

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from retrieval.data.formats import read_split
from retrieval.metrics import retrieval_metrics

log = logging.getLogger(__name__)


def dual_softmax(similarity: Tensor, temperature: float = 1.0) -> Tensor:
    """DSL at inference: ``S * softmax(S / temperature, dim=0)`` (TS2-Net's test-time form).

    The prior is a softmax over the **query** axis (rows are text queries), one per video
    column; CAMoE's training form also multiplies by Q, a constant that changes no ranking.
    The softmax subtracts each column's max, so nothing overflows. Because the prior
    multiplies the score, a negative score becomes more negative where its prior is large:
    DSL assumes positive scores.

    Args:
        similarity: ``[Q, N]`` scores of every test query against every video.
        temperature: Softmax temperature on the scores' own scale (1 on logits = 0.01 on cosines).

    Returns:
        A new ``[Q, N]`` tensor in the input's dtype; the input is not modified.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [Q, N], got {tuple(similarity.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return similarity * torch.softmax(similarity / temperature, dim=0)


def querybank_normalize(similarity: Tensor, querybank: Tensor, beta: float = 20.0, k: int = 1) -> Tensor:
    """QB-Norm with the dynamic inverted softmax, as ``qb-norm/dynamic_inverted_softmax.py`` computes it.

    1. Retrieved set: the union over querybank rows of each row's top-``k`` videos.
    2. A test row is re-scored when its top-1 video is in the retrieved set; it is replaced
       whole by ``exp(beta * s_qj) / sum_b exp(beta * bank_bj)`` (the sum over the querybank
       only), computed as ``exp(beta * s_qj - logsumexp_b(beta * bank_bj))``: equal to the
       official value wherever that is finite, and finite wherever the ratio is representable
       (the official code overflows once ``beta * s > 88.7`` in float32).
    3. Every other row is returned bit-identical to the input.

    Ties (vtr's rule; the official ``np.argsort`` leaves them to column order): a row's top-1
    and a bank row's top-k take the lowest column index among equal scores.

    Args:
        similarity: ``[Q, N]`` test queries x test videos.
        querybank: ``[B, N]`` querybank queries (training captions) x the same test videos,
            from the same scorer.
        beta: Inverse temperature multiplying the scores (20 on cosines, i.e. 0.2 on logits at
            scale 100).
        k: Top videos per querybank row that make up the retrieved set.

    Returns:
        A new ``[Q, N]`` tensor in the input's dtype; neither input is modified.
    """
    if similarity.dim() != 2 or querybank.dim() != 2 or similarity.shape[1] != querybank.shape[1]:
        raise ValueError(f"similarity [Q, N] and querybank [B, N] must share N; got "
                         f"{tuple(similarity.shape)} and {tuple(querybank.shape)}")
    if not 1 <= k <= similarity.shape[1]:
        raise ValueError(f"k must be in 1 .. {similarity.shape[1]} (the gallery size), got {k}")
    querybank = querybank.to(similarity.dtype)
    bank_top = torch.argsort(querybank, dim=1, descending=True, stable=True)[:, :k]
    retrieved = torch.zeros(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    retrieved[bank_top.flatten()] = True
    top1 = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, 0]
    selected = retrieved[top1]
    out = similarity.clone()
    log_norm = torch.logsumexp(beta * querybank, dim=0)  # [N]
    out[selected] = torch.exp(beta * similarity[selected] - log_norm)
    return out


def _labelled(metrics: dict[str, float], label: str, directions: tuple[str, ...]) -> dict[str, float]:
    """``t2v/R@1`` -> ``t2v+{label}/R@1`` for the kept directions."""
    return {key.replace("/", f"+{label}/", 1): value for key, value in metrics.items()
            if key.split("/")[0] in directions}


class Postprocess(Callback):
    """The evaluation options ``--postprocess.dsl`` and ``--postprocess.qb_norm`` of ``vtr test``.

    On the test split, ``RetrievalModule`` hands this callback the evaluation features after
    its plain metrics; the re-scored metrics are logged beside them as their own rows. The
    full ``[Q, N]`` matrix is scored (DSL needs all test queries at once); under DDP each rank
    computes the same rows (the test sets of the lineage are at most 27,763 x 4,917).

    Args:
        dsl: Report ``t2v+DSL`` and ``v2t+DSL`` (TS2-Net's v2t: the same DSL matrix, ranked
            by video).
        dsl_temperature: DSL's temperature on logits.
        qb_norm: Report ``t2v+QB`` (t2v only: see the module docstring).
        querybank_size: Training captions sampled (fixed seed) and encoded at test time as the
            querybank; all of them when the split has fewer.
        qb_beta: QB-Norm's beta on logits; None: ``20 / logit_scale`` (the official 20 on cosines).
        qb_k: QB-Norm's k.
        seed: Seed of the querybank sample.
    """

    def __init__(self, dsl: bool = False, dsl_temperature: float = 1.0, qb_norm: bool = False,
                 querybank_size: int = 5000, qb_beta: float | None = None, qb_k: int = 1, seed: int = 0) -> None:
        if querybank_size < 1:
            raise ValueError(f"querybank_size must be >= 1, got {querybank_size}")
        self.dsl, self.dsl_temperature, self.qb_norm = dsl, dsl_temperature, qb_norm
        self.querybank_size, self.qb_beta, self.qb_k, self.seed = querybank_size, qb_beta, qb_k, seed

    @torch.no_grad()
    def evaluation_rows(self, module, stage: str, text, video, caption_video: Tensor) -> dict[str, float]:
        """The labelled post-processed metrics of one evaluation (test only; {} otherwise)."""
        if stage != "test" or not (self.dsl or self.qb_norm):
            return {}
        retriever = module.retriever
        similarity = retriever.similarity(text, video)
        rows: dict[str, float] = {}
        if self.dsl:
            log.info("DSL: re-scoring with a prior over all %d test queries at once", len(similarity))
            dsl = dual_softmax(similarity, self.dsl_temperature)
            rows.update(_labelled(retrieval_metrics(dsl, caption_video), "DSL", ("t2v", "v2t")))
        if self.qb_norm:
            bank = retriever.similarity(self._encode_querybank(module), video)
            beta = self.qb_beta if self.qb_beta is not None else 20.0 / float(retriever.logit_scale())
            normalized = querybank_normalize(similarity, bank, beta=beta, k=self.qb_k)
            rows.update(_labelled(retrieval_metrics(normalized, caption_video), "QB", ("t2v",)))
        return rows

    def _encode_querybank(self, module):
        """Text features of a fixed-seed sample of the training split's captions."""
        data = module.trainer.datamodule
        if data is None or not hasattr(data, "tokenizer"):
            raise RuntimeError("qb_norm needs the VideoTextDataModule (its training captions are the querybank)")
        val_size = data.hparams.get("val_size")
        records = read_split(data.hparams.dataset, data.annotations_dir, "train", val_size=val_size)
        captions = [caption for record in records for caption in record.captions]
        if len(captions) > self.querybank_size:
            captions = random.Random(self.seed).sample(captions, self.querybank_size)
        log.info("QB-Norm: querybank of %d training captions against the test gallery", len(captions))
        size = module.retriever.eval_chunk_size
        chunks = [captions[i:i + size] for i in range(0, len(captions), size)]
        features = [module.retriever.encode_text(data.tokenizer(chunk).to(module.device)) for chunk in chunks]
        return type(features[0]).cat(features)
