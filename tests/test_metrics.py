"""The evaluation semantics, pinned on hand-computed matrices."""

import numpy as np
import pytest
import torch

from retrieval.metrics import RetrievalMetrics, pair_metrics, positive_ranks, retrieval_metrics


def test_ranks_count_ties_against_the_query():
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.5, 0.5], [0.1, 0.2, 0.3]])
    # row 0: positive best -> 1; row 1: ties with two others -> 3; row 2: best -> 1
    assert positive_ranks(sim, torch.arange(3)).tolist() == [1, 3, 1]


def test_constant_scorer_gets_zero_recall_at_one():
    m = retrieval_metrics(torch.zeros(5, 5), torch.arange(5))
    assert m["t2v/R@1"] == 0.0 and m["v2t/R@1"] == 0.0
    assert m["t2v/MdR"] == 5.0 and m["t2v/MnR"] == 5.0


def test_one_caption_per_video_hand_computed():
    sim = torch.tensor(
        [
            [0.9, 0.3, 0.1, 0.0],  # rank 1
            [0.8, 0.7, 0.1, 0.0],  # rank 2
            [0.5, 0.6, 0.4, 0.7],  # rank 4
            [0.1, 0.1, 0.1, 0.2],  # rank 1
        ]
    )
    m = retrieval_metrics(sim, torch.arange(4))
    assert m["t2v/R@1"] == pytest.approx(50.0)
    assert m["t2v/R@5"] == 100.0
    assert m["t2v/MdR"] == pytest.approx(1.5)  # even count: mean of the two middle ranks (1, 2)
    assert m["t2v/MnR"] == pytest.approx(2.0)
    # v2t ranks columns: col0 [.9 .8 .5 .1] -> 1; col1 [.3 .7 .6 .1] -> 1; col2 [.1 .1 .4 .1] -> 1;
    # col3 [0 0 .7 .2] -> positive .2 below .7 -> 2
    assert m["v2t/R@1"] == pytest.approx(75.0)
    assert m["v2t/MnR"] == pytest.approx(1.25)


def test_odd_median_is_the_middle_rank():
    sim = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.9, 0.1]])  # ranks 1, 2, 3
    assert retrieval_metrics(sim, torch.arange(3))["t2v/MdR"] == 2.0


def test_multi_caption_groups_v2t_uses_each_groups_best_caption():
    # captions 0,1 -> video 0; captions 2,3,4 -> video 1; caption 5 -> video 2
    sim = torch.tensor(
        [
            [0.2, 0.9, 0.1],  # t2v rank 2
            [0.8, 0.1, 0.3],  # rank 1
            [0.1, 0.5, 0.6],  # rank 2
            [0.4, 0.3, 0.2],  # rank 2
            [0.0, 0.7, 0.0],  # rank 1
            [0.3, 0.2, 0.25],  # rank 2 (0.3 > 0.25)
        ]
    )
    qv = torch.tensor([0, 0, 1, 1, 1, 2])
    m = retrieval_metrics(sim, qv)
    assert m["t2v/R@1"] == pytest.approx(100 * 2 / 6)
    assert m["t2v/MnR"] == pytest.approx(10 / 6)
    # group maxima G[group, video]: g0 = [.8 .9 .3], g1 = [.4 .7 .6], g2 = [.3 .2 .25]
    # video 0 ranks groups by column 0 [.8 .4 .3] -> 1; video 1 by [.9 .7 .2] -> own .7 is 2nd -> 2;
    # video 2 by [.3 .6 .25] -> own .25 is 3rd -> 3
    assert m["v2t/R@1"] == pytest.approx(100 / 3)
    assert m["v2t/MnR"] == pytest.approx(2.0)
    assert m["v2t/MdR"] == 2.0


def test_matches_numpy_reference_and_is_chunk_invariant():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 5, (50, 20), generator=g).float()  # many ties
    qv = torch.randint(0, 20, (50,), generator=g)
    qv[:20] = torch.arange(20)  # every video has a caption
    s, q = sim.numpy(), qv.numpy()
    ranks = np.array([(s[i] >= s[i, q[i]]).sum() for i in range(len(q))])
    groups = np.stack([s[q == j].max(0) for j in range(20)])  # [group, video]
    v2t = np.array([(groups[:, j] >= groups[j, j]).sum() for j in range(20)])
    full = retrieval_metrics(sim, qv)
    chunked = retrieval_metrics(sim, qv, chunk_size=7)
    assert full == chunked
    assert full["t2v/R@5"] == pytest.approx(100 * (ranks <= 5).mean())
    assert full["t2v/MdR"] == pytest.approx(np.median(ranks))
    assert full["v2t/MnR"] == pytest.approx(v2t.mean())
    assert full["v2t/MdR"] == pytest.approx(np.median(v2t))


def test_update_order_does_not_matter():
    g = torch.Generator().manual_seed(1)
    sim, qv = torch.randn(30, 10, generator=g), torch.arange(30) % 10
    a, b = RetrievalMetrics(10), RetrievalMetrics(10)
    a.update(sim, qv)
    perm = torch.randperm(30, generator=g)
    for part in perm.split(4):
        b.update(sim[part], qv[part])
    assert a.compute() == b.compute()


def test_negative_scores_are_ranked_like_any_other():
    sim = torch.tensor([[-0.1, -0.5], [-0.9, -0.2]])
    assert retrieval_metrics(sim, torch.arange(2))["t2v/R@1"] == 100.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="columns"):
        RetrievalMetrics(3).update(torch.zeros(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.arange(2))
    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_pair_metrics_hand_computed():
    # 4 videos: 0<->1 a static pair, 2<->3 a temporal pair; one caption each
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.5, 0.4, 0.0, 0.0], [0.0, 0.0, 0.6, 0.6], [0.0, 0.0, 0.2, 0.7]])
    m = pair_metrics(sim, torch.arange(4), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 3, 2]))
    assert m["static/R@1"] == 50.0  # caption 1 loses to video 0
    assert m["temporal/R@1"] == 50.0  # caption 2 ties with its partner: a miss
    assert m["temporal/pair_acc"] == 50.0  # the tie is not a win


# ---------------------------------------------------------------------- bootstrap intervals
from retrieval import metrics as metrics_module  # noqa: E402
from retrieval.metrics import bootstrap_ci, bootstrap_means, paired_difference, summarize  # noqa: E402


def test_bootstrap_interval_is_reproducible_and_holds_the_mean():
    hits = 100.0 * (torch.rand(500, generator=torch.Generator().manual_seed(3)) < 0.3).double()
    low, high = bootstrap_ci(hits)
    assert (low, high) == bootstrap_ci(hits)  # fixed seed
    assert low < hits.mean().item() < high
    assert bootstrap_ci(torch.full((50,), 100.0)) == (100.0, 100.0)  # no spread, no interval
    wide = bootstrap_ci(hits[:50])
    assert wide[1] - wide[0] > high - low  # fewer queries, wider interval


def test_category_counts_draw_the_same_bootstrap_as_resampled_indices(monkeypatch):
    """A resample's mean depends only on its counts per distinct value: drawing the counts
    (conditional binomials) and drawing the indices give the same distribution."""
    values = torch.tensor([-100.0, 0.0, 100.0])[torch.randint(3, (400,), generator=torch.Generator().manual_seed(0))]
    counts = bootstrap_means(values, 20000)
    monkeypatch.setattr(metrics_module, "MAX_CATEGORIES", 0)
    indices = bootstrap_means(values, 20000)
    assert counts.mean().item() == pytest.approx(values.mean().item(), abs=0.1)
    assert counts.mean().item() == pytest.approx(indices.mean().item(), abs=0.1)
    assert counts.std().item() == pytest.approx(indices.std().item(), rel=0.03)
    assert counts.std().item() == pytest.approx(values.std(unbiased=False).item() / 20, rel=0.03)  # sigma / sqrt(n)


def test_paired_difference_of_two_methods_on_the_same_queries():
    g = torch.Generator().manual_seed(1)
    a = 100.0 * (torch.rand(1000, generator=g) < 0.6).double()
    same = paired_difference(a, a.clone())
    assert same == {"difference": 0.0, "lo": 0.0, "hi": 0.0, "excludes_zero": False}
    b = a.clone()
    b[:200] = 0.0  # b misses 200 queries a hits (about 120 of them were hits)
    better = paired_difference(a, b)
    assert better["difference"] > 0 and better["lo"] > 0 and better["excludes_zero"]
    noise = paired_difference(a, 100.0 * (torch.rand(1000, generator=g) < 0.6).double())
    assert noise["lo"] < 0 < noise["hi"] and not noise["excludes_zero"]
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(a, a[:10])


def test_every_recall_carries_its_interval():
    sim = torch.randn(60, 30, generator=torch.Generator().manual_seed(2))
    caption_video = torch.arange(60) % 30
    m = retrieval_metrics(sim, caption_video)
    for direction in ("t2v", "v2t"):
        for k in (1, 5, 10):
            name = f"{direction}/R@{k}"
            assert m[f"{name}_lo"] <= m[name] <= m[f"{name}_hi"]
    metric = RetrievalMetrics(30, video_partner=(torch.arange(30) + 1) % 30)
    metric.update(sim, caption_video, torch.arange(60) % 2)
    full = summarize(metric.per_query())
    assert full["temporal/pair_acc_lo"] <= full["temporal/pair_acc"] <= full["temporal/pair_acc_hi"]
    assert set(summarize(metric.per_query(), ci=False)) == {k for k in full if not k.endswith(("_lo", "_hi"))}
