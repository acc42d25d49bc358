"""The metric suite: R@1/5/10, MdR, MnR in both directions, tie-safe and chunked.

Semantics (pinned by tests on hand-computed matrices):

- rank of the positive = 1 + #candidates scoring strictly higher + #other candidates tying
  with it, so ties count against the query and a constant scorer gets R@1 = 0;
- t2v: every caption is a query over all videos;
- v2t: every video is a query over *caption groups*, a group scored by its best caption
  (CLIP4Clip's ``tensor_video_to_text_sim`` protocol for multi-caption sets);
- R@K in percent; MdR is the median rank (mean of the two middle ones for an even count,
  like ``np.median``, not ``torch.median``); MnR the mean rank;
- every R@K (and the synthetic benchmark's pair accuracy) comes with its 95 % percentile
  bootstrap interval over the queries (``{name}_lo`` / ``{name}_hi``; the pairs for pair
  accuracy): :data:`BOOTSTRAP_RESAMPLES` resamples drawn with a fixed seed, so an interval is
  reproducible, vectorised (:func:`bootstrap_means`). :func:`paired_difference` is the interval
  of the difference of two methods on the same queries (the same resamples for both).

:class:`RetrievalMetrics` consumes the similarity matrix row-chunk by row-chunk, so the full
``[Q, N]`` matrix never has to exist: it keeps the t2v ranks and a ``[N, N]`` running max of
each caption group's scores. It is deliberately not built on ``torchmetrics.retrieval``
(Python loop per query; since 1.7.4 a positive scoring <= 0 counts as a miss).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

RECALL_AT = (1, 5, 10)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95


MAX_CATEGORIES = 64  # distinct values up to which a resample is drawn as category counts


def bootstrap_means(values: Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                    chunk: int = 100) -> Tensor:
    """Means of ``values [n]`` over ``resamples`` bootstrap resamples (n draws with replacement
    each, from a generator seeded with ``seed``): ``[resamples]`` float64.

    A resample's mean depends only on how many of its n draws fall on each distinct value, and
    those counts are multinomial (n, the values' frequencies). Per-query scores take few values
    (a hit is 0 or 100, a paired difference of hits -100, 0 or 100), so the counts are drawn
    directly, as conditional binomials: the same distribution as drawing n indices, in
    ``O(resamples · categories)`` instead of ``O(resamples · n)`` (10k queries: milliseconds).
    Vectors with more than :data:`MAX_CATEGORIES` distinct values draw the indices,
    ``chunk`` resamples at a time.
    """
    if values.dim() != 1 or len(values) == 0:
        raise ValueError(f"bootstrap needs a non-empty [n] vector, got shape {tuple(values.shape)}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    generator = torch.Generator().manual_seed(seed)
    values = values.double().cpu()
    n = len(values)
    distinct, frequency = torch.unique(values, return_counts=True)
    if len(distinct) <= MAX_CATEGORIES:
        left = torch.full((resamples,), float(n), dtype=torch.float64)  # draws not yet given a category
        total = torch.zeros(resamples, dtype=torch.float64)
        remaining = float(n)  # frequency mass of the categories not drawn yet
        for value, count in zip(distinct.tolist()[:-1], frequency.tolist()[:-1]):
            p = torch.full((resamples,), min(1.0, count / remaining), dtype=torch.float64)
            drawn = torch.binomial(left, p, generator=generator)
            total += value * drawn
            left -= drawn
            remaining -= count
        return (total + distinct[-1].item() * left) / n
    out = []
    for start in range(0, resamples, chunk):
        index = torch.randint(n, (min(chunk, resamples - start), n), generator=generator)
        out.append(values[index].mean(dim=1))
    return torch.cat(out)


def bootstrap_ci(values: Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values [n]``: ``(low, high)``."""
    means = bootstrap_means(values, resamples, seed)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return low, high


def paired_difference(a: Tensor, b: Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                      level: float = CI_LEVEL) -> dict[str, float]:
    """Mean of ``a - b`` over the same queries (per-query scores of two methods, e.g. hits in
    percent) and its bootstrap interval; ``excludes_zero`` when the interval does not hold 0.

    Raises:
        ValueError: the two vectors do not score the same number of queries.
    """
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same queries: shapes {tuple(a.shape)} and {tuple(b.shape)}")
    difference = a.double() - b.double()
    low, high = bootstrap_ci(difference, resamples, seed, level)
    return {"difference": difference.mean().item(), "lo": low, "hi": high, "excludes_zero": low > 0 or high < 0}


def positive_ranks(similarity: Tensor, positive: Tensor) -> Tensor:
    """1-based, tie-pessimistic rank of each row's positive column.

    Args:
        similarity: ``[Q, N]`` scores.
        positive: ``[Q]`` column index of each row's positive.

    Returns:
        ``[Q]`` long ranks: ``#(row >= row[positive])``, which counts the positive once.
    """
    if similarity.dim() != 2 or positive.shape != similarity.shape[:1]:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positive {tuple(positive.shape)} do not match")
    pos = similarity.gather(1, positive.long()[:, None])
    if pos.isnan().any():
        raise ValueError("the score of a positive pair is NaN")
    return (similarity >= pos).sum(dim=1, dtype=torch.int32).long()


def summarize_ranks(ranks: Tensor, prefix: str, ci: bool = True) -> dict[str, float]:
    """R@K (percent) with its bootstrap interval (``_lo``, ``_hi``), MdR and MnR of 1-based
    ranks, keyed ``{prefix}/R@1``, ``{prefix}/R@1_lo`` etc."""
    r = ranks.double()
    out = {}
    for k in RECALL_AT:
        hits = (r <= k).double()
        out[f"{prefix}/R@{k}"] = 100.0 * hits.mean().item()
        if ci:
            out[f"{prefix}/R@{k}_lo"], out[f"{prefix}/R@{k}_hi"] = bootstrap_ci(100.0 * hits)
    out[f"{prefix}/MdR"] = torch.quantile(r, 0.5).item()
    out[f"{prefix}/MnR"] = r.mean().item()
    return out


class RetrievalMetrics(Metric):
    """Text-to-video and video-to-text retrieval metrics from similarity rows.

    Call :meth:`update` with consecutive or arbitrary row chunks of the caption x video
    similarity; :meth:`compute` returns ``t2v/R@1 ... v2t/MnR``. Under DDP each rank may
    update with a disjoint set of rows: ranks are concatenated and group maxima max-reduced.

    Args:
        num_videos: N, the gallery size (columns of the similarity).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_videos: int, video_partner: Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_videos < 1:
            raise ValueError("num_videos must be >= 1")
        if video_partner is not None and video_partner.shape != (num_videos,):
            raise ValueError(f"video_partner has shape {tuple(video_partner.shape)}, expected ({num_videos},)")
        self.num_videos = num_videos
        self.add_state("t2v_ranks", default=[], dist_reduce_fx="cat")
        self.add_state("group_max", default=torch.full((num_videos, num_videos), -torch.inf), dist_reduce_fx="max")
        # the synthetic benchmark's view (pair_metrics): each query's kind and, for temporal
        # captions with a partner, whether it scored its own clip strictly above the partner
        self.add_state("query_kind", default=[], dist_reduce_fx="cat")
        self.add_state("pair_wins", default=[], dist_reduce_fx="cat")
        self.video_partner = video_partner

    def update(self, similarity: Tensor, query_video: Tensor, query_kind: Tensor | None = None) -> None:
        """Add rows of the similarity.

        Args:
            similarity: ``[q, N]`` scores of q captions against all N videos.
            query_video: ``[q]`` index of each caption's video.
            query_kind: ``[q]`` 0 for static captions, 1 for temporal ones (the synthetic
                benchmark; with ``video_partner``, adds its view to :meth:`compute`).
        """
        if similarity.shape[1] != self.num_videos:
            raise ValueError(f"similarity has {similarity.shape[1]} columns, expected num_videos={self.num_videos}")
        similarity = similarity.float()
        self.t2v_ranks.append(positive_ranks(similarity, query_video))
        index = query_video.long()[:, None].expand_as(similarity)
        self.group_max.scatter_reduce_(0, index, similarity, "amax")
        if query_kind is None:
            return
        if self.video_partner is None:
            raise ValueError("query_kind needs the metric's video_partner (the pair partner of every video)")
        partner = self.video_partner.to(query_video.device)[query_video]
        rows = torch.arange(len(query_video), device=similarity.device)
        own, other = similarity[rows, query_video], similarity[rows, partner.clamp(min=0)]
        paired = (query_kind == 1) & (partner >= 0)
        self.query_kind.append(query_kind.long())
        self.pair_wins.append(own[paired] > other[paired])

    def per_query(self) -> dict[str, Tensor]:
        """What every metric is a mean or quantile of: ``t2v_ranks [Q]`` and ``v2t_ranks [N]``
        (1-based), and on the synthetic benchmark ``query_kind [Q]`` and ``pair_wins [P]``
        (bool, one per temporal caption with a partner). Paired comparisons and the results
        table resample these."""
        ranks = self.t2v_ranks if isinstance(self.t2v_ranks, Tensor) else torch.cat(self.t2v_ranks)
        if torch.isinf(self.group_max.diagonal()).any():
            missing = torch.isinf(self.group_max.diagonal()).nonzero().flatten()[:10].tolist()
            raise ValueError(f"videos without any caption cannot be v2t queries (video indices {missing} ...)")
        # video j queries the groups: column j of group_max holds every group's best score for j
        best = self.group_max.diagonal()
        v2t = (self.group_max >= best[None, :]).sum(dim=0, dtype=torch.int32).long()
        out = {"t2v_ranks": ranks, "v2t_ranks": v2t}
        kinds, wins = (state if isinstance(state, Tensor) else torch.cat(state) if state else None
                       for state in (self.query_kind, self.pair_wins))
        # under DDP the sync turns an empty list state into an empty tensor: no kinds either way
        if kinds is not None and len(kinds):
            out.update(query_kind=kinds, pair_wins=wins)
        return out

    def compute(self) -> dict[str, float]:
        return summarize(self.per_query())


def summarize(per_query: dict[str, Tensor], ci: bool = True) -> dict[str, float]:
    """The metric suite of :meth:`RetrievalMetrics.per_query`'s output."""
    ranks = per_query["t2v_ranks"]
    out = {**summarize_ranks(ranks, "t2v", ci), **summarize_ranks(per_query["v2t_ranks"], "v2t", ci)}
    if "query_kind" not in per_query:
        return out
    for kind, name in ((0, "static"), (1, "temporal")):
        selected = ranks[per_query["query_kind"] == kind]
        if len(selected):
            hits = (selected <= 1).double()
            out[f"{name}/R@1"] = 100.0 * hits.mean().item()
            if ci:
                out[f"{name}/R@1_lo"], out[f"{name}/R@1_hi"] = bootstrap_ci(100.0 * hits)
    wins = per_query["pair_wins"].double()
    if len(wins):
        out["temporal/pair_acc"] = 100.0 * wins.mean().item()
        if ci:
            out["temporal/pair_acc_lo"], out["temporal/pair_acc_hi"] = bootstrap_ci(100.0 * wins)
    return out


def retrieval_metrics(similarity: Tensor, query_video: Tensor, chunk_size: int = 4096) -> dict[str, float]:
    """All metrics of a full caption x video similarity matrix.

    Args:
        similarity: ``[Q, N]``: row q is caption q's score against every video.
        query_video: ``[Q]`` index of each caption's video.
        chunk_size: rows per chunk (bounds the temporary ``[chunk, N]`` boolean).
    """
    metric = RetrievalMetrics(similarity.shape[1], sync_on_compute=False).to(similarity.device)
    for start in range(0, similarity.shape[0], chunk_size):
        metric.update(similarity[start : start + chunk_size], query_video[start : start + chunk_size])
    return metric.compute()


def pair_metrics(similarity: Tensor, caption_video: Tensor, caption_kind: Tensor, video_partner: Tensor) -> dict[str, float]:
    """The synthetic benchmark's view: R@1 by caption kind, and temporal pair accuracy.

    Args:
        similarity: ``[Q, N]`` caption x video scores.
        caption_video: ``[Q]`` each caption's video.
        caption_kind: ``[Q]`` 0 for static captions, 1 for temporal ones.
        video_partner: ``[N]`` each video's hard negative (-1 when it has none).

    Returns:
        ``static/R@1``, ``temporal/R@1`` (percent) and ``temporal/pair_acc``: the percentage of
        temporal captions scoring their own clip strictly above its partner (ties lose; an
        order-blind model sits at 50).
    """
    metric = RetrievalMetrics(similarity.shape[1], video_partner=video_partner, sync_on_compute=False)
    metric = metric.to(similarity.device)
    metric.update(similarity, caption_video, caption_kind)
    full = summarize(metric.per_query(), ci=False)
    return {k: v for k, v in full.items() if k.startswith(("static/", "temporal/"))}
