"""The stage timers, the one way vtr times a method (``vtr bench latency``, ``vtr compare``, ``vtr bench frontier``).

- offline (:func:`time_offline`): ``encode_video`` throughput (videos/s, ms/video) on real-shaped frames;
- online (:func:`time_online`): per-query latency of ``encode_text + score_gallery + topk`` over a
  gallery of N videos tiled from real features (:func:`retrieval.bench.gallery.gallery_from`), for
  query batches of 1 and 64: median, p10 and p90 over repeated timed runs after warm-up, device
  synchronised, under ``torch.inference_mode()``; split into text-encode and score+top-k time;
  with the peak memory and matmul time of :mod:`retrieval.bench.meters`;
- :func:`encode_videos`: the real gallery features the online stage's gallery is tiled from.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Any

import torch
from torch import Tensor

from retrieval.bench.floors import synchronize
from retrieval.bench.meters import MatmulTime, peak_memory_mb
from retrieval.features import TextFeatures, VideoFeatures
from retrieval.retriever import Retriever

TEXT_RUNS = 5
"""Query batches whose text encoding is timed (the scorer's repeats cycle over them)."""


# ---------------------------------------------------------------------- timing primitives
def time_online(
    model: Retriever,
    tokens: Tensor,
    gallery: VideoFeatures,
    batch_size: int,
    k: int = 10,
    repeats: int = 20,
    warmup: int = 3,
    chunk_size: int | None = None,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Per-query latency of ``encode_text + score_gallery + topk`` over ``gallery``.

    The text tower's time does not depend on N: it is timed on its own over ``TEXT_RUNS``
    batches (each the next ``batch_size`` queries of ``tokens``, cycling), and the scorer's
    warm-up and repeats (``score_gallery + topk``) cycle over those encoded batches. The
    ms/query quantiles are the text median plus the scorer's quantiles. Times are wall-clock
    with the device synchronised around each timed call.

    Args:
        model: the method (put in eval mode here); on the gallery's device and dtype.
        tokens: ``[Q, L]`` token ids of real captions.
        gallery: the precomputed ``VideoFeatures`` of N videos.
        batch_size: queries per run.
        k: top-k (clamped at N).
        repeats: timed runs.
        warmup: untimed runs first.
        chunk_size: gallery videos per ``score`` call (default: the model's ``eval_chunk_size``).
        max_seconds: a time budget: when the requested runs would exceed it, warm-up stops
            after one run and fewer repeats (at least 3) are timed.

    Returns:
        ``ms_per_query_median`` (= ``_p50``), ``_p10``, ``_p90``, ``_p99``, ``text_ms`` and
        ``score_ms`` (medians per query), ``repeats`` (runs timed), ``peak_mem_mb``, ``mem_method``,
        ``matmul_ms`` (per query: the part of one more ``score_gallery`` spent in matmuls,
        :class:`MatmulTime`).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    device = gallery.device
    model.eval()
    tokens = tokens.to(device)
    k = min(k, len(gallery))
    runs = itertools.count()

    def next_batch() -> Tensor:
        start = next(runs) * batch_size
        return tokens[torch.arange(start, start + batch_size) % len(tokens)]

    def encode() -> tuple[TextFeatures, float]:
        batch = next_batch()
        synchronize(device)
        start = time.perf_counter()
        text = model.encode_text(batch)
        synchronize(device)
        return text, time.perf_counter() - start

    def run(text: TextFeatures) -> float:
        synchronize(device)
        start = time.perf_counter()
        model.score_gallery(text, gallery, chunk_size).topk(k, dim=1)
        synchronize(device)
        return time.perf_counter() - start

    with torch.inference_mode():
        # the text tower does not depend on N: timed on its own (a new batch each run, after one
        # untimed run), outside the scorer's repeats, which cycle over the batches it encoded
        encode()
        encoded = [encode() for _ in range(min(repeats, TEXT_RUNS))]
        texts = [text for text, _ in encoded]
        text_s = statistics.median(seconds for _, seconds in encoded)
        spent: list[float] = []
        for i in range(warmup):
            spent.append(run(texts[i % len(texts)]))
            if max_seconds is not None and spent[-1] * (warmup + repeats) > max_seconds:
                break  # one warm-up run is enough for a point this slow
        if max_seconds is not None:
            per_run = max(spent[-1] if spent else run(texts[0]), 1e-9)
            remaining = max_seconds - sum(spent) - per_run  # the memory run comes last
            repeats = max(3, min(repeats, int(remaining / per_run)))
        times = [run(texts[i % len(texts)]) for i in range(repeats)]
        peak, method = peak_memory_mb(lambda: (model.encode_text(next_batch()), run(texts[0])), device)
        with MatmulTime(device) as matmul:
            model.score_gallery(texts[0], gallery, chunk_size)
    text_ms = 1e3 * text_s / batch_size
    score = [1e3 * t / batch_size for t in times]
    quantiles = torch.quantile(torch.tensor(score, dtype=torch.float64),
                               torch.tensor([0.5, 0.1, 0.9, 0.99], dtype=torch.float64)).tolist()
    median, p10, p90, p99 = (text_ms + q for q in quantiles)
    return {
        "ms_per_query_median": median,
        "ms_per_query_p50": median,
        "ms_per_query_p10": p10,
        "ms_per_query_p90": p90,
        "ms_per_query_p99": p99,
        "text_ms": text_ms,
        "score_ms": quantiles[0],
        "repeats": repeats,
        "peak_mem_mb": peak,
        "mem_method": method,
        "matmul_ms": 1e3 * matmul.seconds / batch_size,
    }


def time_offline(
    model: Retriever, frames: Tensor, frame_mask: Tensor, batch_size: int, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Throughput of the offline stage (``encode_video``, then ``prepare_gallery``) on batches of ``batch_size`` videos.

    Args:
        frames: ``[B, T, 3, H, W]`` on the model's device (cycled when B < ``batch_size``).
        frame_mask: ``[B, T]``.

    Returns:
        ``ms_per_video`` (median), ``videos_per_s`` and ``repeats``.
    """
    device = frames.device
    index = torch.arange(batch_size) % len(frames)
    batch, mask = frames[index], frame_mask[index]
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            model.prepare_gallery(model.encode_video(batch, mask))
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    per_video = statistics.median(times) / batch_size
    return {"ms_per_video": 1e3 * per_video, "videos_per_s": 1.0 / per_video, "repeats": repeats}


def encode_videos(model: Retriever, frames: Tensor, frame_mask: Tensor, batch_size: int) -> VideoFeatures:
    """``encode_video`` + ``prepare_gallery`` over ``frames`` in batches, concatenated (real gallery features)."""
    with torch.inference_mode():
        parts = [model.prepare_gallery(model.encode_video(frames[i : i + batch_size], frame_mask[i : i + batch_size]))
                 for i in range(0, len(frames), batch_size)]
    return VideoFeatures.cat(parts)
