"""The metric suite: R@1/5/10, MdR, MnR in both directions, tie-safe and chunked.

Semantics (pinned by tests on hand-computed matrices):

- rank of the positive = 1 + #candidates scoring strictly higher + #other candidates tying
  with it, so ties count against the query and a constant scorer gets R@1 = 0;
- t2v: every caption is a query over all videos;
- v2t: every video is a query over *caption groups*, a group scored by its best caption
  (CLIP4Clip's ``tensor_video_to_text_sim`` protocol for multi-caption sets);
- R@K in percent; MdR is the median rank (mean of the two middle ones for an even count,
  like ``np.median``, not ``torch.median``); MnR the mean rank.

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


def summarize_ranks(ranks: Tensor, prefix: str) -> dict[str, float]:
    """R@K (percent), MdR and MnR of 1-based ranks, keyed ``{prefix}/R@1`` etc."""
    r = ranks.double()
    out = {f"{prefix}/R@{k}": 100.0 * (r <= k).double().mean().item() for k in RECALL_AT}
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

    def compute(self) -> dict[str, float]:
        ranks = self.t2v_ranks if isinstance(self.t2v_ranks, Tensor) else torch.cat(self.t2v_ranks)
        if torch.isinf(self.group_max.diagonal()).any():
            missing = torch.isinf(self.group_max.diagonal()).nonzero().flatten()[:10].tolist()
            raise ValueError(f"videos without any caption cannot be v2t queries (video indices {missing} ...)")
        # video j queries the groups: column j of group_max holds every group's best score for j
        best = self.group_max.diagonal()
        v2t = (self.group_max >= best[None, :]).sum(dim=0, dtype=torch.int32).long()
        return {**summarize_ranks(ranks, "t2v"), **summarize_ranks(v2t, "v2t"), **self._pair_view(ranks)}

    def _pair_view(self, ranks: Tensor) -> dict[str, float]:
        """``static/R@1``, ``temporal/R@1`` and ``temporal/pair_acc`` (see :func:`pair_metrics`)."""
        kinds, wins = (state if isinstance(state, Tensor) else torch.cat(state) if state else None
                       for state in (self.query_kind, self.pair_wins))
        if kinds is None or not len(kinds):  # no kinds given (synced under DDP, an empty list is an empty tensor)
            return {}
        out = {}
        for kind, name in ((0, "static"), (1, "temporal")):
            selected = ranks[kinds == kind]
            if len(selected):
                out[f"{name}/R@1"] = 100.0 * (selected <= 1).double().mean().item()
        if len(wins):
            out["temporal/pair_acc"] = 100.0 * wins.double().mean().item()
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
    return metric._pair_view(torch.cat(metric.t2v_ranks))
