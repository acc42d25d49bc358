"""Galleries: tiled from real features, and the fusion-free gallery at a million videos.

- :func:`gallery_from`: a benchmark gallery of N videos tiled from real ``encode_video`` output.
- ``vtr bench gallery``: the fusion-free query at up to N = 1M, batch 1 and 64, with the
  gallery stored in fp32, bf16/fp16 or int8 (one scale per vector, :func:`quantize`), each
  timed beside its read floor (its own bytes at the read bandwidth measured just before each
  of its repeats, :func:`~retrieval.bench.floors.time_steps_beside_reads`) and its
  compute floor (``2 N D`` operations a query at the rate of a large square matmul in the
  store's arithmetic, measured in the same run: int8 by ``torch._int_mm``, fp16 on the CPU in
  fp32, which has no fp16 FMA), and its exact-search recall@10 against the fp32 ranking; FAISS
  (flat, IVF, HNSW) where installed, rows in the same CSV. ``ratio_to_roofline`` divides by the
  larger floor: a batch of 64 is bound by arithmetic, not by the read, on a 2-core CPU.

The exact search is :func:`retrieval.topk.exact_topk`: its ``"torch"`` kernel (chunks, each
chunk's top k), its ``"inductor"`` kernel (one compiled pass converting each code in
registers: the CPU's batch-1 path for quantised stores) and, on CUDA, its ``"triton"`` kernel
(one fused pass writing block maxima, then the rows of the best k blocks), each timed where
``--kernel`` names it; none writes the ``[B, N]`` score matrix back to memory whole. Vectors are random unit Gaussians (seeded):
the top 10 of a random query is then separated by small margins, the hard case for a
quantised store, so its recall@10 is a pessimistic figure; real features tiled would tie.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import Tensor

import retrieval
from retrieval.bench.floors import matmul_gflops, read_probe, time_steps_beside_reads
from retrieval.bench.results import DEFAULT_OUT, device_name, merge_rows, other_load, result_filename
from retrieval.features import VideoFeatures
from retrieval.retriever import Retriever
from retrieval.topk import KERNELS, STORES, exact_topk, quantize, recall_at, resolve_kernel

log = logging.getLogger(__name__)

COLUMNS = ("index", "kernel", "store", "dim", "gallery", "batch", "k", "params", "device", "threads", "ms_per_query_median",
           "ms_per_query_p50", "ms_per_query_p99", "repeats", "read_floor_ms", "ratio_to_floor", "ratio_to_floor_p10", "ratio_to_floor_p90", "compute_floor_ms", "ratio_to_roofline", "bytes_per_video",
           "gallery_mb", "recall_at_k", "bandwidth_gbs", "compute_gflops", "torch", "vtr", "note")
ROW_KEY = ("index", "kernel", "store", "dim", "gallery", "batch", "k", "params", "device", "threads")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def gallery_from(model: Retriever, features: VideoFeatures, n: int, headroom: float = 0.5) -> VideoFeatures:
    """Tile real video features cyclically to ``n`` rows on the model's device.

    Args:
        model: the method (its device receives the gallery).
        features: real ``encode_video`` output.
        n: gallery size.
        headroom: the gallery may take at most this fraction of the free memory (the rest is
            left for scoring).

    Raises:
        MemoryError: the gallery would not fit, with the estimate in the message.
    """
    if n < 1:
        raise ValueError(f"gallery size must be >= 1, got {n}")
    device = next(model.parameters()).device
    per_video = features.nbytes() / len(features)
    needed, free = per_video * n, available_memory_bytes(device)
    if needed > headroom * free:
        raise MemoryError(
            f"a gallery of {n:,} videos needs {needed / 2**30:.2f} GiB ({per_video:,.0f} bytes per video) "
            f"but {device} has {free / 2**30:.2f} GiB free (at most {headroom:.0%} may be used): lower --gallery"
        )
    return features.to(device).repeat_to(n)


# ---------------------------------------------------------------------- ``vtr bench gallery``
def contention_note(device: torch.device, threads: int, sample_s: float = 1.0) -> str:
    """A note for rows timed on a CPU whose other load leaves fewer idle cores than ``threads``.

    The other load is :func:`~retrieval.bench.results.other_load` (the load average counted this
    benchmark's own last minute too, and marked every row of an otherwise idle run contended).

    Then every parallel region waits at its barrier for a thread the OS has descheduled: on this
    project's 2-core host under a concurrent run, a 0.04 ms cast of 65k floats took 10 ms at 2
    threads, and the int8 and bf16 stores' batch-1 search at 1M x 64 (a dozen small parallel ops
    per chunk) 470-800 ms against 17-24 ms at 1 thread: contention, not a slow kernel.
    """
    if device.type != "cpu":
        return ""
    cores, load = psutil.cpu_count() or 1, other_load(sample_s)
    if load + threads <= cores + 0.5:
        return ""
    return (f"contended: host load {load:.1f} on {cores} cores with {threads} threads "
            f"(rerun on an idle host or with --threads {max(1, int(cores - load))})")


def compute_gflops(device: torch.device, store: str) -> float:
    """The measured matmul rate of the arithmetic ``store`` is multiplied in: the store's own,
    except fp16 on the CPU (fp32: an x86 CPU without AVX512-FP16 has no fp16 FMA, and torch's
    CPU fp16 GEMM is a slow fallback that :func:`retrieval.topk.exact_topk` does not use)."""
    dtype = torch.float32 if store == "fp16" and device.type == "cpu" else STORES[store]
    return matmul_gflops(str(device), dtype, torch.get_num_threads())


def _row(index: str, kernel: str, store: str, dim: int, n: int, batch: int, k: int, params: str, times: list[float],
         bytes_per_video: float, rates: list[float], gflops: float, recall: float, device: torch.device) -> dict[str, Any]:
    """One CSV row from ``times`` (seconds per call) and the read rates measured beside them
    (GB/s, one per repeat, :func:`time_steps_beside_reads`): ``ratio_to_floor`` is the median
    time over the floor at the median rate, and its p10/p90 are those of each repeat's time over
    its own repeat's floor (how far the ratio moves on this host)."""
    per_query = sorted(1e3 * t / batch for t in times)
    p50, p99 = (float(torch.quantile(torch.tensor(per_query, dtype=torch.float64), q)) for q in (0.5, 0.99))
    bandwidth = statistics.median(rates)
    floor = 1e3 * n * bytes_per_video / (bandwidth * 1e9) / batch
    paired = torch.tensor([t * rate * 1e9 / (n * bytes_per_video) for t, rate in zip(times, rates)], dtype=torch.float64)
    ratio_p10, ratio_p90 = (float(torch.quantile(paired, q)) for q in (0.1, 0.9))
    compute = 1e3 * 2 * n * dim / (gflops * 1e9)
    return {"index": index, "kernel": kernel, "store": store, "dim": dim, "gallery": n, "batch": batch, "k": k, "params": params,
            "device": device_name(device), "threads": torch.get_num_threads(),
            "ms_per_query_median": statistics.median(per_query), "ms_per_query_p50": p50, "ms_per_query_p99": p99,
            "repeats": len(times), "read_floor_ms": floor, "ratio_to_floor": statistics.median(per_query) / floor,
            "ratio_to_floor_p10": ratio_p10, "ratio_to_floor_p90": ratio_p90, "compute_floor_ms": compute, "ratio_to_roofline": statistics.median(per_query) / max(floor, compute),
            "bytes_per_video": bytes_per_video, "gallery_mb": n * bytes_per_video / 2**20, "recall_at_k": recall,
            "bandwidth_gbs": bandwidth, "compute_gflops": gflops, "torch": torch.__version__, "vtr": retrieval.__version__}


def bench_stores(n: int, dim: int, batches: Sequence[int], stores: Sequence[str], k: int = 10, repeats: int = 5,
                 device: str = "cpu", faiss_indexes: Sequence[str] = (), seed: int = 0,
                 kernels: Sequence[str] = ("auto",)) -> list[dict[str, Any]]:
    """Exact top-k over ``n`` random unit vectors stored each way with each of ``kernels`` (and
    the FAISS indexes named in ``faiss_indexes``, of :data:`FAISS_INDEXES`), timed per query
    batch; recall@k against the fp32 top-k of the same queries by the ``"torch"`` kernel."""
    dev = torch.device(device)
    kernels = list(dict.fromkeys(resolve_kernel(kernel, dev) for kernel in kernels))
    generator = torch.Generator().manual_seed(seed)
    gallery = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1).to(dev)
    queries = {b: torch.nn.functional.normalize(torch.randn(b, dim, generator=generator), dim=1).to(dev)
               for b in batches}
    probe = read_probe(dev)
    truth = {b: exact_topk(q, gallery, None, k, kernel="torch")[1] for b, q in queries.items()}
    rows = []
    for store in stores:
        codes, scale = (gallery, None) if store == "fp32" else quantize(gallery, store)
        per_video = codes[0].numel() * codes.element_size() + (4 if scale is not None else 0)
        for kernel in kernels:
            for b, q in queries.items():
                times, rates = time_steps_beside_reads(lambda: exact_topk(q, codes, scale, k, kernel=kernel),
                                                       probe, 1, repeats)
                recall = recall_at(exact_topk(q, codes, scale, k, kernel=kernel)[1], truth[b])
                rows.append(_row("exact", kernel, store, dim, n, b, k, "", times, per_video, rates,
                                 compute_gflops(dev, store), recall, dev))
    if faiss_indexes:
        rows += _faiss_rows(gallery.cpu(), {b: q.cpu() for b, q in queries.items()}, truth, k, repeats,
                            probe if dev.type == "cpu" else read_probe("cpu"), faiss_indexes)
    return rows


FAISS_INDEXES = ("flat", "ivf", "hnsw")
"""FAISS indexes ``vtr bench gallery --faiss`` can add: exact flat inner product, IVF-Flat
(``nlist = 4 sqrt(N)`` trained on ``64 nlist`` vectors, ``nprobe`` 16) and HNSW (M 32,
``efSearch`` 64; its build is the slow one: minutes per million vectors on two cores)."""


def _faiss_rows(gallery: Tensor, queries: dict[int, Tensor], truth: dict[int, Tensor], k: int, repeats: int,
                probe: Tensor, names: Sequence[str] = FAISS_INDEXES) -> list[dict[str, Any]]:
    """The FAISS indexes ``names`` (inner product) over the fp32 gallery, on the CPU."""
    try:
        import faiss
    except ImportError:
        log.warning("--faiss: faiss is not installed (pip install faiss-cpu): FAISS rows skipped")
        return []
    n, dim = gallery.shape
    x = gallery.numpy()
    nlist = max(1, int(4 * n ** 0.5))

    def build(name: str) -> tuple[Any, str]:
        if name == "flat":
            return faiss.IndexFlatIP(dim), ""
        if name == "ivf":
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.train(x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:min(n, 64 * nlist)].numpy()])
            ivf.nprobe = 16
            return ivf, f"nlist={nlist} nprobe=16"
        hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = 64
        return hnsw, "M=32 efSearch=64"

    rows = []
    for short in names:
        index, params = build(short)
        name = f"faiss-{short}"
        index.add(x)
        for b, q in queries.items():
            qn = q.numpy()
            times, rates = time_steps_beside_reads(lambda: index.search(qn, k), probe, 1, repeats)
            found = torch.from_numpy(index.search(qn, k)[1]).long()
            rows.append(_row(name, "faiss", "fp32", dim, n, b, k, params, times, 4 * dim, rates,
                             compute_gflops(torch.device("cpu"), "fp32"), recall_at(found, truth[b]), torch.device("cpu")))
    return rows


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``vtr bench gallery``'s options."""
    p = sub.add_parser("gallery", help="fusion-free exact top-k at up to 1M videos: fp32/bf16/fp16/int8 stores, "
                       "read floor, recall@k; FAISS optional", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gallery", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64, help="embedding width (vtr-tiny 64, ViT-B/32 512)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--store", nargs="+", choices=sorted(STORES), default=["fp32", "bf16", "fp16", "int8"])
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=["auto"],
                   help="exact-search kernels to time (auto: triton on CUDA where installed, else torch; "
                   "inductor: the compiled one-pass kernel, the CPU's batch-1 path for bf16/fp16/int8 stores)")
    p.add_argument("--faiss", nargs="*", choices=FAISS_INDEXES, default=None, metavar="INDEX",
                   help=f"add FAISS rows (needs faiss-cpu): the indexes named, of {' '.join(FAISS_INDEXES)}; "
                   "all of them when none is named")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (committed: experiments/results)")
    p.set_defaults(tool=__name__)


def run(args: argparse.Namespace) -> None:
    """``vtr bench gallery``: one CSV per device and versions."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.gallery) < 1 or min(args.batch) < 1 or args.k < 1 or args.dim < 1:
        raise SystemExit("vtr bench gallery: --gallery, --batch, --dim and -k must be >= 1")
    device = torch.device(args.device)
    path = args.out / result_filename("gallery", device, "mixed", torch.get_num_threads())
    faiss_indexes = () if args.faiss is None else (args.faiss or FAISS_INDEXES)
    rows = []
    for n in args.gallery:
        note = contention_note(device, torch.get_num_threads())
        if note:
            log.warning("vtr bench gallery N=%d: %s", n, note)
        rows += [{**row, "note": note} for row in bench_stores(n, args.dim, args.batch, args.store, args.k,
                                                               args.repeats, args.device, faiss_indexes,
                                                               kernels=args.kernel)]
        merge_rows(path, rows, COLUMNS, ROW_KEY)
    print(f"{'index':<11}{'kernel':<9}{'store':<6}{'N':>9}{'batch':>6}{'ms/q':>9}{'p99':>9}{'read':>9}"
          f"{'ratio [p10, p90]':>20}"
          f"{'compute':>9}{'roofline':>9}{'recall':>8}")
    for r in rows:
        print(f"{r['index']:<11}{r['kernel']:<9}{r['store']:<6}{r['gallery']:>9}{r['batch']:>6}{r['ms_per_query_median']:>9.3g}"
              f"{r['ms_per_query_p99']:>9.3g}{r['read_floor_ms']:>9.3g}{r['ratio_to_floor']:>7.2f}"
              f" [{r['ratio_to_floor_p10']:.2f}, {r['ratio_to_floor_p90']:.2f}]"
              f"{r['compute_floor_ms']:>9.3g}{r['ratio_to_roofline']:>9.2f}{r['recall_at_k']:>8.1f}")
    print(f"wrote {path}")
