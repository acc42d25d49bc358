"""Two-stage retrieval: a fusion-free recaller picks each query's top k, a text-conditioned
re-ranker orders those k.

This is how EERCF (AAAI'24), LAVIS's ALPRO/BLIP and mmaction2's VindLU serve a costly scorer
(``/work/shared/reference/two_stage.md``), written as a retriever like any other: the same three
stages, so training's metric suite, ``vtr index``/``vtr search`` and ``vtr bench latency`` use it
unchanged.

- ``encode_video``: both methods' offline features, stored side by side in one
  ``VideoFeatures`` (fields ``recall.*`` and ``rerank.*``): the recaller's one embedding per
  video and the re-ranker's cached frame/token features.
- ``encode_text``: both text towers (they differ even on one backbone: each method fine-tunes
  its own), so a query's text time counts both encodings.
- ``score``: the recaller scores all N videos (one product) and takes the top k; the re-ranker
  scores only those k per query. The k videos take the re-ranker's logits; the other N - k keep
  the recaller's order, shifted to lie strictly below the k (EERCF's clean tail, not LAVIS's
  constant -100, which would tie the whole tail and make MnR and R@K beyond k meaningless).

So with ``k >= N`` it is the re-ranker (its scores, exactly), and with ``k = 1`` its top-1 is the
recaller's top-1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.features import Features, TextFeatures, VideoFeatures
from retrieval.metrics import retrieval_metrics
from retrieval.retriever import Retriever

RECALL, RERANK = "recall.", "rerank."


def join(recall: Features, rerank: Features) -> Features:
    """One bundle of the recaller's and the re-ranker's features (same rows), fields prefixed."""
    if type(recall) is not type(rerank) or len(recall) != len(rerank):
        raise ValueError(f"cannot join {recall!r} and {rerank!r}: need the same kind and row count")
    return type(recall)(**{RECALL + k: v for k, v in recall.items()}, **{RERANK + k: v for k, v in rerank.items()})


def split(features: Features) -> tuple[Features, Features]:
    """The inverse of :func:`join`: ``(recall, rerank)`` features."""
    parts = []
    for prefix in (RECALL, RERANK):
        fields = {k[len(prefix):]: v for k, v in features.items() if k.startswith(prefix)}
        if not fields:
            raise ValueError(f"{features!r} has no {prefix}* fields: not two-stage features (see join())")
        parts.append(type(features)(**fields))
    return parts[0], parts[1]


def combine(recall: Tensor, top: Tensor, kth: Tensor, rerank: Tensor) -> Tensor:
    """The two-stage ``[Q, N]`` scores, written into ``recall`` (in place).

    Args:
        recall: ``[Q, N]`` recaller logits.
        top: ``[Q, k]`` indices of each query's top k by ``recall``.
        kth: ``[Q, 1]`` each query's k-th largest recall logit.
        rerank: ``[Q, k]`` the re-ranker's logits of those k videos.

    Every video outside the top k scores at most ``kth``; shifting the row by
    ``min(rerank) - 1 - kth`` puts the tail at least 1 below the lowest re-ranked logit while
    keeping its order (the shift is one addition per row, monotone under rounding).
    """
    recall.add_(rerank.amin(dim=1, keepdim=True) - 1 - kth)
    return recall.scatter_(1, top, rerank)


class TwoStage(Retriever):
    """Fusion-free recall of the top ``k``, text-conditioned re-rank of those ``k``.

    Args:
        recaller: a fusion-free retriever, or its spec (``{ckpt}``, ``{config, ckpt}`` or
            ``{class_path, init_args, ckpt}``: ``retrieval.recipes.build_two_stage``), as a
            recipe gives it.
        reranker: any retriever (normally text-conditioned), or its spec.
        k: videos re-ranked per query (clamped at the gallery size).
        spec: the plain data that rebuilds this retriever (``{recaller, reranker, k}``, each part
            ``{class_path, init_args, ckpt}``, ``retrieval.recipes.build_two_stage``): its
            :attr:`config`, for indexes and fingerprints.

    It has no backbone of its own, so it skips ``Retriever.__init__`` (the backbone's) and
    reads the shapes from its parts; ``vtr fit`` does not train it (train each part).
    """

    fusion_free = False

    def __init__(self, recaller: Retriever | dict[str, Any], reranker: Retriever | dict[str, Any], k: int,
                 spec: dict[str, Any] | None = None) -> None:
        nn.Module.__init__(self)  # no backbone of its own (see above)
        if isinstance(recaller, dict) or isinstance(reranker, dict):  # a recipe's specs: build the parts
            from retrieval.recipes import build_two_stage

            built = build_two_stage({"recaller": recaller, "reranker": reranker, "k": k})
            recaller, reranker, spec = built.recaller, built.reranker, built.spec
        if not recaller.fusion_free:
            raise ValueError(f"the recaller must be fusion-free (offline); {type(recaller).__name__} is text-conditioned")
        if recaller.clip.image_size != reranker.clip.image_size:
            raise ValueError(f"the recaller's frames are {recaller.clip.image_size}px, the re-ranker's "
                             f"{reranker.clip.image_size}px: both must see the same frames")
        self.recaller, self.reranker = recaller, reranker
        self.spec = dict(spec or {})
        self.k = k

    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, k: int) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k (videos re-ranked per query) must be an int >= 1, got {k!r}")
        self._k = k

    @property
    def config(self) -> dict[str, Any]:
        """``{class_path, init_args: {recaller, reranker, k}}``: what rebuilds this pair."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {**self.spec, "k": self.k}}

    # what the tools read of a method: tokenizer, frame size and count, chunking
    @property
    def clip(self) -> nn.Module:
        return self.reranker.clip

    @property
    def max_words(self) -> int:
        """Tokens per query: the shorter context, so one token tensor is valid for both towers."""
        return min(self.recaller.max_words, self.reranker.max_words)

    @property
    def num_frames(self) -> int:
        return self.reranker.num_frames

    @property
    def eval_chunk_size(self) -> int:
        return self.reranker.eval_chunk_size

    def logit_scale(self) -> Tensor:
        return self.reranker.logit_scale()

    # ------------------------------------------------------------------ the three stages
    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> VideoFeatures:
        return join(self.recaller.encode_video(frames, frame_mask), self.reranker.encode_video(frames, frame_mask))

    def prepare_gallery(self, video: VideoFeatures) -> VideoFeatures:
        recall, rerank = split(video)
        return join(self.recaller.prepare_gallery(recall), self.reranker.prepare_gallery(rerank))

    def encode_text(self, tokens: Tensor) -> TextFeatures:
        """Both towers' features of ``[Q, L]`` tokens, zero-padded (open_clip's pad id) to each one's length."""
        if tokens.shape[1] > self.max_words:
            raise ValueError(f"tokens have {tokens.shape[1]} positions; both towers accept at most {self.max_words}")
        parts = [m.encode_text(F.pad(tokens, (0, m.max_words - tokens.shape[1]))) for m in (self.recaller, self.reranker)]
        return join(*parts)

    def score(self, text: TextFeatures, video: VideoFeatures) -> Tensor:
        """``[Q, N]`` two-stage logits (module docstring)."""
        return self.score_gallery(text, video)

    def score_gallery(self, text: TextFeatures, video: VideoFeatures, chunk_size: int | None = None) -> Tensor:
        """Recall over the whole gallery, re-rank each query's top k (``chunk_size``: the
        re-ranker's gallery chunk, as in ``Retriever.score_gallery``)."""
        recall_text, rerank_text = split(text)
        recall_video, rerank_video = split(video)
        if self.k >= len(video):  # every video re-ranked: the re-ranker itself
            return self.reranker.score_gallery(rerank_text, rerank_video, chunk_size)
        recall = self.recaller.score_gallery(recall_text, recall_video)  # [Q, N]: the recaller's own fast path
        values, top = recall.topk(self.k, dim=1)  # [Q, k]
        # each query re-ranks its own k videos: a per-query call scores Q*k pairs, where one call
        # over the union of the batch's candidates would score Q times as many
        rerank = torch.cat([self.reranker.score_gallery(rerank_text[q:q + 1], rerank_video[top[q]], chunk_size)
                            for q in range(len(top))])  # [Q, k]
        return combine(recall, top, values[:, -1:], rerank.to(recall.dtype))

    @torch.no_grad()
    def similarity(self, text: TextFeatures, video: VideoFeatures, chunk_size: int | None = None) -> Tensor:
        """The full ``[Q, N]`` two-stage score matrix, in query chunks (the re-ranker's own gallery chunks)."""
        chunk = chunk_size or self.eval_chunk_size
        return torch.cat([self.score_gallery(part, video) for _, part in text.chunks(chunk)])

    @torch.no_grad()
    def evaluate(self, text: TextFeatures, video: VideoFeatures, caption_video: Tensor) -> dict[str, float]:
        """The metric suite (``retrieval.metrics``) of the two-stage scores."""
        return retrieval_metrics(self.similarity(text, video), caption_video)
