"""The Triton kernels of :func:`retrieval.topk.exact_topk` (imported only where Triton runs:
a CUDA device, or Triton's interpreter). See ``retrieval.topk`` for what they compute and why."""

import triton
import triton.language as tl


@triton.jit
def rows_scores(codes, scale, query, q_scale, row0, dim, n,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr):
    """One query's fp32 scores of rows ``row0 .. row0 + BLOCK_N`` (``-inf`` past ``n``)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        x = tl.load(codes + rows[:, None].to(tl.int64) * dim + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        q = tl.load(query + cols, mask=col_ok, other=0)
        acc += tl.sum(x.to(tl.float32) * q.to(tl.float32)[None, :], axis=1)
    if INT8:
        acc = acc * tl.load(scale + rows, mask=row_ok, other=0.0) * tl.load(q_scale)
    return tl.where(row_ok, acc, float("-inf"))


@triton.jit
def block_max_one(codes, scale, query, q_scale, out, n, dim,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr):
    """One query (a memory-bound GEMV on the CUDA cores): ``out[j]`` = block ``j``'s best score."""
    block = tl.program_id(0)
    s = rows_scores(codes, scale, query, q_scale, block * BLOCK_N, dim, n, BLOCK_N, BLOCK_D, INT8)
    tl.store(out + block, tl.max(s, axis=0))


@triton.jit
def block_max_many(codes, scale, queries_t, q_scale, out, n, b, dim, num_blocks,
                   BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                   INT8: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, INT8_DOT: tl.constexpr):
    """A batch (``tl.dot``): ``out[q, j]`` = query ``q``'s best score over block ``j``.
    ``queries_t`` is ``[D, B]`` (contiguous over the batch, so its tile loads coalesce).
    ``INT8_DOT``: int8 codes multiplied as int8 into an int32 accumulator (exact, the integer
    tensor cores) instead of as fp16."""
    block, query_block = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    qs = query_block * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok, q_ok = rows < n, qs < b
    if INT8 and INT8_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < dim
        x = tl.load(codes + rows[:, None].to(tl.int64) * dim + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0)  # [BLOCK_N, BLOCK_D]
        q = tl.load(queries_t + cols[:, None] * b + qs[None, :],
                    mask=col_ok[:, None] & q_ok[None, :], other=0)  # [BLOCK_D, BLOCK_B]
        if INT8 and INT8_DOT:
            acc = tl.dot(x, q, acc, out_dtype=tl.int32)
        elif INT8:  # |codes| <= 127 are exact in fp16, their products and sums (< 2^24) in fp32
            acc = tl.dot(x.to(tl.float16), q.to(tl.float16), acc)
        elif UPCAST:  # bf16: exact in TF32 (8 of its 10 mantissa bits), so the products stay exact
            acc = tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, q, acc, input_precision=PRECISION)
    s = acc.to(tl.float32)
    if INT8:
        s = s * tl.load(scale + rows, mask=row_ok, other=0.0)[:, None]
        s = s * tl.load(q_scale + qs, mask=q_ok, other=0.0)[None, :]
    s = tl.where(row_ok[:, None], s, float("-inf"))
    tl.store(out + qs * num_blocks + block, tl.max(s, axis=0), mask=q_ok)


@triton.jit
def block_scores(codes, scale, queries, q_scale, blocks, out, out_rows, n, dim, num_picked,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr):
    """``out[q, i * BLOCK_N + r]`` = query ``q``'s score of row ``r`` of its ``i``-th picked block,
    ``out_rows`` the same place's gallery row."""
    query, pick = tl.program_id(0), tl.program_id(1)
    block = tl.load(blocks + query * num_picked + pick)
    s = rows_scores(codes, scale, queries + query * dim, q_scale + query * INT8, block * BLOCK_N, dim, n,
                    BLOCK_N, BLOCK_D, INT8)
    at = (query * num_picked + pick) * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out + at, s)
    tl.store(out_rows + at, block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N))
