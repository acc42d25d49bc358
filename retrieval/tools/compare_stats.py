"""``vtr compare``'s statistics and provenance: across seeds, against a reference, across machines.

- **Per-query results** (:func:`save_per_query`): ``RetrievalModule.per_query["test"]`` of each
  method and seed, as ``per_query.safetensors`` beside its checkpoint; every interval below is
  recomputed from these files, so a table can be re-derived without retraining.
- **Summary** (:func:`summary_rows`): per method, the mean and the sample standard deviation
  (ddof 1; empty for one seed) across seeds of every accuracy column, and a 95 % percentile
  bootstrap interval over test queries (:func:`pooled_interval`): the per-query results of all
  seeds pooled and resampled *within* each seed (a stratified bootstrap), so the interval is
  centred on the mean across seeds and, for one seed, is exactly the ``_lo`` / ``_hi`` that
  ``RetrievalModule`` logged. It measures how much the numbers depend on which test queries
  were drawn; the std measures how much they depend on the seed (data and initialisation).
- **Paired comparison** (:func:`paired_rows`): each method minus the reference on the same
  queries (same seed, same test split), per seed with ``retrieval.metrics.paired_difference``
  and, with several seeds, pooled the same stratified way (``seed = "all"``).
- **Provenance** (:func:`provenance`): what two machines must share for their runs to be
  comparable (versions, CPU, threads, kernels' instruction set) and checksums of the inputs
  (``retrieval.pretrain.backbone_checksum`` of the pretrained backbone's tensors,
  ``retrieval.data.synthetic.dataset_checksum`` of each generated dataset).
"""

from __future__ import annotations

import platform
import statistics
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import retrieval
from retrieval.bench.results import device_name
from retrieval.data.synthetic import dataset_checksum
from retrieval.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL, bootstrap_means, paired_difference
from retrieval.pretrain import backbone_checksum

ACCURACY = ("t2v_R@1", "t2v_R@5", "static_R@1", "temporal_R@1", "temporal_pair_acc")
PAIRED = ("t2v_R@1", "temporal_pair_acc")  # the columns compared against the reference
PER_QUERY_FILE = "per_query.safetensors"


def save_per_query(per_query: dict[str, Tensor], path: Path, **metadata: str) -> None:
    """One evaluation's per-query results (``RetrievalMetrics.per_query``) as safetensors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in per_query.items()}, str(path), metadata=metadata)


def load_per_query(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


def query_scores(per_query: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each accuracy column's per-query scores in percent (its mean is the column): hits at
    rank 1 / 5 over all captions, R@1 hits of static and of temporal captions, pair wins."""
    ranks, kind = per_query["t2v_ranks"], per_query["query_kind"]
    return {
        "t2v_R@1": 100.0 * (ranks <= 1).double(), "t2v_R@5": 100.0 * (ranks <= 5).double(),
        "static_R@1": 100.0 * (ranks[kind == 0] <= 1).double(), "temporal_R@1": 100.0 * (ranks[kind == 1] <= 1).double(),
        "temporal_pair_acc": 100.0 * per_query["pair_wins"].double(),
    }


def pooled_interval(vectors: list[Tensor], resamples: int = BOOTSTRAP_RESAMPLES,
                    level: float = CI_LEVEL) -> tuple[float, float, float]:
    """Mean of the per-seed means of ``vectors`` (one per seed) and its stratified bootstrap
    interval: each seed's queries are resampled on their own (seed ``i`` draws from generator
    seed ``BOOTSTRAP_SEED + i``) and the resampled means averaged. One vector: exactly
    ``retrieval.metrics.bootstrap_ci``."""
    means = torch.stack([bootstrap_means(v, resamples, BOOTSTRAP_SEED + i) for i, v in enumerate(vectors)]).mean(0)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return statistics.fmean(v.double().mean().item() for v in vectors), low, high


def _std(values: list[float]) -> float | str:
    return statistics.stdev(values) if len(values) > 1 else ""


def summary_rows(rows: list[dict], scores: dict[tuple[int, str], dict[str, Tensor]], columns: list[str]) -> list[dict]:
    """Per method (in first-seen order): ``seeds``, and for every accuracy column its mean,
    ``_std`` across seeds and ``_lo`` / ``_hi`` (:func:`pooled_interval` of ``scores``, keyed
    (seed, method)); the other numeric ``columns`` (timings, post-processed rows) as mean and std."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary = {"method": method, "fusion_free": mine[0]["fusion_free"], "seeds": " ".join(str(r["seed"]) for r in mine)}
        for column in columns:
            values = [r[column] for r in mine if column in r]
            if not values or not isinstance(values[0], float):
                continue
            summary[column], summary[f"{column}_std"] = statistics.fmean(values), _std(values)
            if column in ACCURACY:
                _, summary[f"{column}_lo"], summary[f"{column}_hi"] = pooled_interval(
                    [scores[r["seed"], method][column] for r in mine])
        out.append(summary)
    return out


def paired_rows(methods: list[str], seeds: list[int], reference: str,
                scores: dict[tuple[int, str], dict[str, Tensor]]) -> list[dict]:
    """Each method minus ``reference`` on the same queries, for :data:`PAIRED` columns: one
    row per seed, and with several seeds a pooled row (``seed = "all"``, stratified)."""
    out = []
    for method in methods:
        if method == reference:
            continue
        for column in PAIRED:
            pairs = [(scores[s, method][column], scores[s, reference][column]) for s in seeds]
            for seed, (a, b) in zip(seeds, pairs):
                out.append({"method": method, "reference": reference, "metric": column, "seed": seed,
                            "queries": len(a), **paired_difference(a, b)})
            if len(seeds) > 1:
                difference, low, high = pooled_interval([a.double() - b.double() for a, b in pairs])
                out.append({"method": method, "reference": reference, "metric": column, "seed": "all",
                            "queries": sum(len(a) for a, _ in pairs), "difference": difference, "lo": low,
                            "hi": high, "excludes_zero": low > 0 or high < 0})
    return out


def _git_commit() -> str | None:
    """The checkout's commit, ``-dirty`` when it has uncommitted changes; None outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True, text=True,
                              cwd=Path(retrieval.__file__).parent, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(backbone: Path, data_roots: dict[int, Path], **run: object) -> dict:
    """What makes two runs comparable: software, CPU, threads, and the inputs' checksums.

    Args:
        backbone: the pretrained backbone checkpoint (``pretrained_backbone``'s path).
        data_roots: each seed's generated dataset folder.
        run: the run's own parameters (preset, seeds, methods, ...), recorded as given.
    """
    import av
    import numpy

    return {
        **run,
        "vtr": retrieval.__version__, "git_commit": _git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": numpy.__version__, "av": av.__version__,
        "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
        "device": device_name(torch.device("cpu")), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "backbone": {"path": str(backbone), "checksum": backbone_checksum(backbone)},
        "data": {str(seed): {"root": str(root), "checksum": dataset_checksum(root)} for seed, root in data_roots.items()},
    }
