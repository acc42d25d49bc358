"""The floors a measured time is judged against, measured on this machine in the same run.

- compute: the scorer's matmul MACs per (query, video) pair, counted by ``FlopCounterMode``,
  at this process's measured square-matmul rate;
- read: the gallery's bytes at the measured read bandwidth, once per query batch.

A two-stage retriever's floor (:func:`two_stage_floor`) is the recaller's over N plus the
re-ranker's over the k re-ranked videos of each query (read once per query, not per batch: each
query gathers its own k).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever
from retrieval.two_stage import TwoStage, split


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` synchronised calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@functools.cache
def matmul_gflops(device: str, dtype: torch.dtype, threads: int) -> float:
    """This process's measured rate of a large square matmul, GFLOP/s (median of 5); int8 is
    ``torch._int_mm`` (int8 x int8 -> int32), counted in the same two operations per MAC.

    ``threads`` is part of the cache key: the rate is measured again when it changes.
    """
    size = 4096 if torch.device(device).type == "cuda" else 1024
    if dtype == torch.int8:
        a, b = (torch.randint(-127, 128, (size, size), dtype=torch.int8, device=device) for _ in range(2))
        product = torch._int_mm
    else:
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
        product = torch.matmul
    times = []
    for i in range(6):
        synchronize(a.device)
        start = time.perf_counter()
        product(a, b)
        synchronize(a.device)
        if i:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def read_probe(device: str | torch.device) -> torch.Tensor:
    """A tensor far larger than the caches (2 GiB of fp32 on CUDA, 256 MiB on the CPU): its sum
    is the read-bandwidth measurement."""
    return torch.ones(2**29 if torch.device(device).type == "cuda" else 2**26, device=device)


def read_gbs(probe: torch.Tensor) -> float:
    """One synchronised sum of ``probe``, as GB/s read."""
    synchronize(probe.device)
    start = time.perf_counter()
    probe.sum()
    synchronize(probe.device)
    return probe.numel() * probe.element_size() / (time.perf_counter() - start) / 1e9


def time_steps_beside_reads(step: Callable[[], Any], probe: torch.Tensor, warmup: int,
                            steps: int) -> tuple[list[float], list[float]]:
    """:func:`time_steps` with a read of ``probe`` just before each step: ``(seconds of each
    step, GB/s of each read)``. A step and its floor are then measured under the same load: on
    this project's shared 2-core host the read rate moved between 23 and 52 GB/s from one
    minute to the next, so a floor measured once per run put one kernel at 1.0x and at 1.3x."""
    for _ in range(warmup):
        read_gbs(probe)
        step()
    times, rates = [], []
    for _ in range(steps):
        rates.append(read_gbs(probe))
        times.append(time_steps(step, probe.device, 0, 1)[0])
    return times, rates


@functools.cache
def memory_bandwidth_gbs(device: str, threads: int) -> float:
    """Measured read bandwidth, GB/s: the median of 5 sums of :func:`read_probe` (one more untimed).

    ``threads`` is part of the cache key: the rate is measured again when it changes.
    """
    probe = read_probe(device)
    read_gbs(probe)
    return statistics.median(read_gbs(probe) for _ in range(5))


@dataclass(frozen=True)
class Floor:
    """The cost model of a scorer on this machine.

    Attributes:
        macs_per_pair: matmul multiply-accumulates per (query, video) pair in ``score``.
        bytes_per_video: bytes of one video's cached features.
        matmul_gflops: measured matmul rate.
        bandwidth_gbs: measured read bandwidth.
    """

    macs_per_pair: float
    bytes_per_video: float
    matmul_gflops: float
    bandwidth_gbs: float

    def compute_ms(self, n: int) -> float:
        """Per-query time of the scorer's MACs over N videos at the matmul rate."""
        return 1e3 * 2 * self.macs_per_pair * n / (self.matmul_gflops * 1e9)

    def bandwidth_ms(self, n: int, batch: int = 1) -> float:
        """Per-query time to read the gallery's cached features once per query batch."""
        return 1e3 * n * self.bytes_per_video / (self.bandwidth_gbs * 1e9) / batch


def scorer_floor(model: Retriever, text: TextFeatures,
                 gallery_chunk: VideoFeatures) -> Floor | TwoStageFloor:
    """Count the scorer's MACs per pair and pair them with this machine's measured rates.

    ``FlopCounterMode`` counts matmul-like ops (mm, bmm, einsum, attention), not elementwise
    ones, so the floor is a lower bound. A fusion-free dot product counts exactly D MACs.

    Args:
        model: the method.
        text: features of at least one query (only the first is used).
        gallery_chunk: a few gallery videos (their count divides the total).
    """
    if isinstance(model, TwoStage):
        return two_stage_floor(model, text, gallery_chunk)
    device = gallery_chunk.device
    m = len(gallery_chunk)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.score(text[:1], gallery_chunk)
    dtype = next(t.dtype for t in gallery_chunk.values() if t.is_floating_point())
    threads = torch.get_num_threads()
    return Floor(
        macs_per_pair=counter.get_total_flops() / 2 / m,
        bytes_per_video=gallery_chunk.nbytes() / m,
        matmul_gflops=matmul_gflops(str(device), dtype, threads),
        bandwidth_gbs=memory_bandwidth_gbs(str(device), threads),
    )


@dataclass(frozen=True)
class TwoStageFloor:
    """The recaller's floor over the whole gallery plus the re-ranker's over ``k`` videos a query.

    ``macs_per_pair`` and ``bytes_per_video`` are the gallery-wide terms (recaller) plus the
    re-ranker's per-video cost, for the CSV; the floors themselves are computed from the parts.
    """

    recall: Floor
    rerank: Floor
    k: int

    @property
    def macs_per_pair(self) -> float:
        return self.recall.macs_per_pair + self.rerank.macs_per_pair

    @property
    def bytes_per_video(self) -> float:
        return self.recall.bytes_per_video + self.rerank.bytes_per_video

    @property
    def matmul_gflops(self) -> float:
        return self.recall.matmul_gflops

    @property
    def bandwidth_gbs(self) -> float:
        return self.recall.bandwidth_gbs

    def compute_ms(self, n: int) -> float:
        if self.k >= n:  # the re-ranker alone, over the gallery
            return self.rerank.compute_ms(n)
        return self.recall.compute_ms(n) + self.rerank.compute_ms(self.k)

    def bandwidth_ms(self, n: int, batch: int = 1) -> float:
        if self.k >= n:  # the re-ranker alone, over the gallery
            return self.rerank.bandwidth_ms(n, batch)
        return self.recall.bandwidth_ms(n, batch) + self.rerank.bandwidth_ms(self.k)


def two_stage_floor(model: TwoStage, text: TextFeatures, gallery_chunk: VideoFeatures) -> TwoStageFloor:
    """:class:`TwoStageFloor` of ``model`` from each part's :func:`scorer_floor`."""
    (recall_text, rerank_text), (recall_video, rerank_video) = split(text), split(gallery_chunk)
    return TwoStageFloor(scorer_floor(model.recaller, recall_text, recall_video),
                         scorer_floor(model.reranker, rerank_text, rerank_video), model.k)
