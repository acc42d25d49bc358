"""Exact top-k inner products over a stored fusion-free gallery: fp32, bf16/fp16 or int8.

A fusion-free query is one product with the gallery and a top-k. At a million videos that is a
memory-bound read of the gallery (2 GB at D = 512 in fp32), so what matters is reading it once
and writing little else.

- :func:`quantize` / :func:`dequantize`: the stores (int8: symmetric, one fp32 scale per vector).
- :func:`exact_topk`: the search. Three kernels, one definition of the scores:

  - ``"torch"`` (any device): the gallery scored in chunks (``[rows, D] x [D, B]`` into one
    preallocated buffer), each chunk's top k kept, the candidates merged at the end.
  - ``"inductor"`` (the CPU's fast path for a few queries): one pass that reads each stored
    code once and converts it in registers, compiled by ``torch.compile`` (Inductor's C++ on
    the CPU, so it needs a C++ compiler there; the first call compiles, about 15 s cold, then
    Inductor's on-disk cache serves later processes). A quantised store then costs its own
    bytes: eager torch has no fused int8 or bf16 product with an fp32 query, and its int8
    ``_int_mm`` and bf16 GEMV ran at 4-5x their read floor at batch 1 on this project's CPU.
    Each chunk's top k is taken on 32 slices of it at once (one thread's ``topk`` over 1M
    scores took 1.8 ms, slices 0.7 ms). Meant for batch 1 to about 8; a larger batch is a
    GEMM, which the ``"torch"`` kernel's BLAS does better. Between the two, MKL runs the narrow
    GEMM badly: 2-16 fp32 queries over 1M x 512 took 350-465 ms a batch with ``"torch"``,
    and 81, 93, 230 and 332 ms at 2, 4, 8 and 16 queries with ``"inductor"`` (one run).
  - ``"triton"`` (CUDA, or Triton's interpreter): **block-max pruning**, exact. One fused pass
    reads the gallery once and writes only each block's best score per query
    (``[B, N / block]``, 64 rows per block by default), never the ``[B, N]`` score matrix. The true top k
    lie in the k blocks with the largest block maxima: the k-th largest block maximum is a
    score that k distinct videos reach or beat, so it is at most the k-th best score, and a
    video in the top k sits in a block whose maximum is at least that. A second pass scores the
    rows of those k blocks per query and takes their top k. Ties at the k-th block maximum can
    leave out an equally scored block: the result is then another valid top k.

- Scores, every kernel: fp32 store, fp32 products; bf16/fp16 store, the query cast to the
  store's precision (the ``"torch"`` kernel rounds the scores to it too, the ``"inductor"`` and
  ``"triton"`` ones keep them in fp32: their ties are fewer); int8 store, the query quantised
  the same way, the integer product exact, then ``scale_video * scale_query`` (bit for bit the
  same in every kernel).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from retrieval.retriever import batched_gemv, frame_products

STORES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
KERNELS = ("auto", "torch", "inductor", "triton")


def quantize(x: Tensor, store: str) -> tuple[Tensor, Tensor | None]:
    """``x [N, D]`` stored as ``store``: ``(codes, scale)``; int8 is symmetric with one fp32
    scale per vector (``max |x_i| / 127``, round to nearest), other stores have no scale.

    The round-trip error of one element is at most half a step: ``scale_i / 2``.
    """
    if store not in STORES:
        raise ValueError(f"store must be one of {sorted(STORES)}, got {store!r}")
    if store != "int8":
        return x.to(STORES[store]), None
    scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (x / scale).round().clamp(-127, 127).to(torch.int8), scale.float()


def dequantize(codes: Tensor, scale: Tensor | None) -> Tensor:
    """fp32 vectors from :func:`quantize`'s output."""
    return codes.float() if scale is None else codes.float() * scale


def chunk_rows(batch: int, dim: int, budget_bytes: int = 2**20) -> int:
    """Gallery rows per chunk so that a chunk's ``[rows, batch]`` fp32 scores and its
    dequantised ``[rows, dim]`` copy stay in cache."""
    return max(1024, budget_bytes // (4 * (batch + dim)))


def triton_available() -> bool:
    """Whether the Triton kernel can run here: Triton importable, and a CUDA device or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """``"auto"``: Triton on CUDA where it is installed, else torch (``"inductor"`` is asked for by
    name: its first call compiles, which a one-off search would not win back).

    Raises:
        ValueError: an unknown kernel, or ``"triton"`` where it cannot run.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if kernel == "triton" and not (triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError("kernel 'triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    return kernel


def exact_topk(queries: Tensor, codes: Tensor, scale: Tensor | None, k: int, chunk: int | None = None,
               kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact top ``k`` inner products of fp32 ``queries [B, D]`` over a stored gallery.

    Args:
        queries: fp32 ``[B, D]``.
        codes: the store ``[N, D]`` (fp32, bf16, fp16 or int8).
        scale: int8's ``[N, 1]`` scales, else ``None``.
        k: results per query (at most ``N``).
        chunk: rows per chunk of the ``"torch"`` kernel (default: cache-sized on the CPU, up to
            64M scores on CUDA) and of the ``"inductor"`` one (default: 16M scores).
        kernel: ``"auto"``, ``"torch"``, ``"inductor"`` or ``"triton"`` (see the module docstring).

    Returns:
        ``(scores [B, k], indices [B, k])``, best first.
    """
    if (scale is None) == (codes.dtype == torch.int8):
        raise ValueError("an int8 store needs its scales, and only an int8 store has them")
    if queries.dim() != 2 or codes.dim() != 2 or queries.shape[1] != codes.shape[1]:
        raise ValueError(f"queries [B, D] and a gallery [N, D] of the same width, got {tuple(queries.shape)} "
                         f"and {tuple(codes.shape)}")
    kernel = resolve_kernel(kernel, codes.device)
    if kernel == "triton":
        return _blockmax_topk(queries, codes, scale, k)
    if kernel == "inductor":
        return _fused_topk(queries, codes, scale, k, chunk)
    return _chunked_topk(queries, codes, scale, k, chunk)


def _query_operand(queries: Tensor, codes: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The queries as the store scores them: its dtype, or int8 codes with one scale per query."""
    if scale is None:
        return queries.to(codes.dtype), None
    q_codes, q_scale = quantize(queries.float(), "int8")
    return q_codes, q_scale


def _chunked_topk(queries: Tensor, codes: Tensor, scale: Tensor | None, k: int,
                  chunk: int | None) -> tuple[Tensor, Tensor]:
    """The ``"torch"`` kernel.

    Each chunk is scored gallery-major (``[rows, D] x [D, B]``) into one preallocated buffer:
    a fresh output per chunk costs page faults that, on this project's CPU, took longer than
    the product itself. An int8 store is scored by ``torch._int_mm`` (int8 x int8 -> int32,
    the batch padded to 8 columns as the CUDA kernel needs), then scaled per (video, query);
    a batch on the CPU query-major instead (``[B, D] x [D, rows]``, each query's top k along a
    contiguous row: 3.0-3.5 against 4.3 ms a query at 1M x 512, batch 64).
    An fp16 store is multiplied by a batch on the CPU as fp32 (each chunk upcast into one
    cache-sized buffer, the scores rounded back to fp16): torch's CPU fp16 GEMM is a slow
    fallback (one run at 1M x 512, batch 64: 310 ms a query against 8 upcast).
    """
    n, b, k = len(codes), len(queries), min(k, len(codes))
    if codes.device.type == "cuda" and chunk is None:
        # no cache to fit: cache-sized chunks (1024 rows at D = 512) would be launch-bound, ~1k
        # launches per query at 1M; a chunk holds up to 64M scores (256 MB of fp32)
        chunk = max(65536, 2**26 // max(b, 8))
    q, q_scale = _query_operand(queries, codes, scale)
    one_column = scale is None and batched_gemv(codes, b)
    upcast = codes.dtype == torch.float16 and codes.device.type == "cpu" and b > 1
    query_major = scale is not None and codes.device.type == "cpu" and b > 1
    if scale is None:
        chunk = min(n, chunk or (65536 if one_column else chunk_rows(b, codes.shape[1])))
        q_rows = q
        q = (q.float() if upcast else q).T.contiguous()  # [D, B]
        scores = torch.empty(chunk, b, dtype=codes.dtype, device=codes.device)
        if upcast:
            upcast_rows = torch.empty(chunk, codes.shape[1])
            upcast_scores = torch.empty(chunk, b)
    elif query_major:
        chunk = min(n, chunk or 16384)
        q_scale = q_scale.contiguous()  # [B, 1]
    else:  # the int8 kernel is slow on narrow chunks at batch 1 (throwaway timings: 300 ms vs 3 ms)
        chunk = min(n, chunk or max(2048, 65536 // b))
        q = torch.nn.functional.pad(q, (0, 0, 0, -b % 8)).T.contiguous()  # [D, B padded to 8]
        q_scale = q_scale.T  # [1, B]
    values, indices = [], []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        part = codes[start:start + rows]
        if one_column:
            out = frame_products(part[:, None, :], q_rows).view(rows, 1)
        elif upcast:
            out = torch.mm(upcast_rows[:rows].copy_(part), q, out=upcast_scores[:rows])
            out = scores[:rows].copy_(out)
        elif scale is None:
            out = torch.mm(part, q, out=scores[:rows])
        elif query_major:  # [B, rows]: each query's top k along a contiguous row, rows in parallel
            out = torch._int_mm(q, part.T).float().mul_(scale[start:start + rows].T).mul_(q_scale)
            top = out.topk(min(k, rows), dim=1)
            values.append(top.values.T)
            indices.append(top.indices.T + start)
            continue
        else:
            if rows <= 16:  # CUDA's int8 kernel needs more than 16 rows: zero rows, sliced off
                part = torch.nn.functional.pad(part, (0, 0, 0, 17 - rows))
            out = torch._int_mm(part, q)[:rows, :b].float().mul_(scale[start:start + rows]).mul_(q_scale)
        top = out.topk(min(k, rows), dim=0)
        values.append(top.values.float())
        indices.append(top.indices + start)
    values, indices = torch.cat(values).T, torch.cat(indices).T  # [B, chunks * k]
    return best_of(values, indices, k)


# ---------------------------------------------------------------------- the inductor kernel
@functools.cache
def _compiled_products():
    """``[rows, D]`` store x ``[B, D]`` fp32 query operand -> ``[rows, B]`` fp32 scores, one fused
    pass (convert, multiply, sum per row), compiled once per store dtype and batch kind."""

    def products(codes: Tensor, queries: Tensor) -> Tensor:
        return (codes.to(torch.float32)[:, None, :] * queries).sum(-1)

    return torch.compile(products, dynamic=True)


def _fused_topk(queries: Tensor, codes: Tensor, scale: Tensor | None, k: int,
                chunk: int | None) -> tuple[Tensor, Tensor]:
    """The ``"inductor"`` kernel (module docstring).

    The query operand holds the store's values in fp32 (a bf16/fp16 value and an int8 code are
    exact there); every product of two such values is exact in fp32, and an int8 row's sum of
    D products of up to 127 * 127 stays below 2^24 for D up to 1040, so int8 scores are bit for bit
    those of the ``"torch"`` kernel's ``_int_mm`` at every CLIP width (ViT-L: 768).
    """
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    n, b, k = len(codes), len(queries), min(k, len(codes))
    q, q_scale = _query_operand(queries, codes, scale)
    q = q.float()
    chunk = min(n, chunk or max(k, 2**24 // b))
    products = _compiled_products()
    values, indices = [], []
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        try:
            out = products(codes[start:start + rows], q)  # [rows, B]
        except (BackendCompilerFailed, InductorError) as error:
            raise RuntimeError("kernel 'inductor': torch.compile could not build the fused product here "
                               "(on the CPU it needs a working C++ compiler); use kernel='torch'") from error
        if scale is not None:
            out.mul_(scale[start:start + rows]).mul_(q_scale.T)
        top_values, top_indices = split_topk(out.T, min(k, rows))
        values.append(top_values)
        indices.append(top_indices + start)
    values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
    return best_of(values, indices, k)


def best_of(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` of each row of candidate ``scores [B, M]`` and the gallery ``ids [B, M]``
    they stand for: ``(values, ids)``, best first."""
    best = scores.topk(k, dim=1)
    return best.values, ids.gather(1, best.indices)


def split_topk(scores: Tensor, k: int, parts: int = 32) -> tuple[Tensor, Tensor]:
    """The top ``k`` of each row of ``scores [B, M]``, taken on ``parts`` slices of the row at once
    (``topk`` runs rows in parallel, and one row on one thread), then among their winners and
    the ``M mod parts`` leftover columns: ``(values, indices)``, best first. Exact: a row's top k
    lie in the union of its slices' top k."""
    b, m = scores.shape
    parts = min(parts, m // max(k, 1))
    if parts < 2:
        top = scores.topk(k, dim=1)
        return top.values, top.indices
    scores = scores.contiguous()
    width = m // parts
    head = parts * width
    top = scores.as_strided((b, parts, width), (m, width, 1)).topk(k, dim=2)
    offsets = torch.arange(parts, device=scores.device)[:, None] * width
    candidates = torch.cat([top.values.reshape(b, -1), scores[:, head:]], dim=1)
    ids = torch.cat([(top.indices + offsets).reshape(b, -1),
                     torch.arange(head, m, device=scores.device).expand(b, m - head)], dim=1)
    return best_of(candidates, ids, k)


# ---------------------------------------------------------------------- the Triton kernel
@functools.cache
def _kernels():
    """The Triton kernels (``retrieval._topk_triton``), imported on first use."""
    from retrieval import _topk_triton

    return _topk_triton.block_max_one, _topk_triton.block_max_many, _topk_triton.block_scores


TRITON_CONFIG = {
    # one query: rows per block (the pruning unit), columns per step, warps, pipeline stages
    ("one", "fp32"): (128, 128, 4, 2), ("one", "bf16"): (256, 128, 4, 2), ("one", "fp16"): (256, 128, 4, 2),
    ("one", "int8"): (64, 512, 4, 2),
    # a batch (tl.dot over up to 64 queries per program)
    ("many", "fp32"): (128, 64, 8, 3), ("many", "bf16"): (128, 64, 4, 3), ("many", "fp16"): (128, 64, 8, 4),
    ("many", "int8"): (128, 64, 8, 3),
}
"""Launch parameters of the first pass, per (one query or a batch, store): the fastest of a sweep
on an H200 at 1M x 512 (``experiments/gpu/tune_topk.py``, its output
``experiments/results/topk-tune_cuda-nvidia-h200_*.csv``: 16-24 settings each, do_bench)."""
STORE_NAMES = {dtype: name for name, dtype in STORES.items()}


def _blockmax_topk(queries: Tensor, codes: Tensor, scale: Tensor | None, k: int,
                   config: dict | None = None) -> tuple[Tensor, Tensor]:
    """The ``"triton"`` kernel (module docstring): block maxima, then the rows of the best k blocks.

    ``config`` overrides :data:`TRITON_CONFIG`'s launch parameters (``block_rows``, ``block_d``,
    ``num_warps``, ``num_stages``) and may set ``int8_dot``: a batch over an int8 store multiplied
    on the integer tensor cores (int8 x int8 into int32, exact) instead of as fp16. It is off
    until ``experiments/gpu/tune_topk.py`` has timed it on a GPU (written without one).

    One query is scored on the CUDA cores in fp32 (a memory-bound read); a batch of two or more
    by ``tl.dot``: int8 codes as fp16 (exact: integers up to 127, products and sums below 2^24 in
    the fp32 accumulator), fp16 with fp32 accumulation, bf16 as TF32 (a bf16 value is exact in
    TF32: the products are bf16's, accumulated in fp32), fp32 as TF32x3 (three TF32 products, about
    fp32's precision). The second pass re-scores the picked rows in fp32 on the CUDA cores, so
    the scores returned are the store's; the first pass only picks blocks (differences in its
    last bits matter only between blocks whose maxima tie to them).
    """
    block_max_one, block_max_many, block_scores = _kernels()
    codes, queries = codes.contiguous(), queries.contiguous()
    n, dim = codes.shape
    b, k = len(queries), min(k, len(codes))
    q, q_scale = _query_operand(queries, codes, scale)
    q = q.contiguous()
    int8 = scale is not None
    flat_scale = scale.reshape(-1).contiguous() if int8 else codes  # an unused pointer otherwise
    q_scale = q_scale.reshape(-1).contiguous() if int8 else codes
    rows_, cols_, warps_, stages_ = TRITON_CONFIG["one" if b == 1 else "many", STORE_NAMES[codes.dtype]]
    cfg = {"block_rows": rows_, "block_d": cols_, "num_warps": warps_, "num_stages": stages_, **(config or {})}
    rows_per_block = cfg["block_rows"]
    num_blocks = -(-n // rows_per_block)
    maxima = torch.empty(b, num_blocks, dtype=torch.float32, device=codes.device)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if b == 1:
        block_max_one[(num_blocks,)](codes, flat_scale, q, q_scale, maxima, n, dim, BLOCK_N=rows_per_block,
                                     BLOCK_D=cfg["block_d"], INT8=int8, **launch)
    else:
        bf16 = codes.dtype == torch.bfloat16
        block_b = min(64, max(16, 1 << (b - 1).bit_length()))
        block_max_many[(num_blocks, -(-b // block_b))](
            codes, flat_scale, q.T.contiguous(), q_scale, maxima, n, b, dim, num_blocks, BLOCK_N=rows_per_block,
            BLOCK_B=block_b, BLOCK_D=cfg["block_d"], INT8=int8, UPCAST=bf16,
            PRECISION="tf32" if bf16 else "tf32x3", INT8_DOT=bool(cfg.get("int8_dot", False)), **launch)
    picked = maxima.topk(min(k, num_blocks), dim=1).indices.to(torch.int32).contiguous()  # [B, k blocks]
    scores = torch.empty(b, picked.shape[1] * rows_per_block, dtype=torch.float32, device=codes.device)
    rows = torch.empty(scores.shape, dtype=torch.int64, device=codes.device)
    block_scores[(b, picked.shape[1])](codes, flat_scale, q, q_scale, picked, scores, rows, n, dim, picked.shape[1],
                                       BLOCK_N=rows_per_block, BLOCK_D=128, INT8=int8)
    return best_of(scores, rows, k)


def recall_at(found: Tensor, truth: Tensor) -> float:
    """Mean fraction of each row of ``truth`` (ids) that ``found`` holds, in percent."""
    hits = (found[:, :, None] == truth[:, None, :]).any(dim=1).double().mean()
    return 100.0 * hits.item()
