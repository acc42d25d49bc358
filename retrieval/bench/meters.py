"""The meters of one scoring run that :mod:`retrieval.bench.timing` reads besides the clock.

What they measure (DESIGN.md, "Efficiency measurement"):

- peak memory of one query batch above what is already resident (model + gallery): on CUDA
  ``torch.cuda.max_memory_allocated``; on the CPU, where torch keeps no allocator statistics,
  the peak of live tensor bytes counted by a dispatch mode on one extra run
  (``mem_method`` names which; kernel-internal scratch buffers are not seen by the latter):
  :func:`peak_memory_mb`, :class:`LiveTensorBytes`;
- ``matmul_ms``: the part of one more scoring run spent inside the ops the compute floor prices
  (:class:`MatmulTime`), so a ratio above the floor splits into the matmuls' own rate at the
  scorer's shapes and everything else (softmaxes, reductions, dispatch).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from retrieval.bench.floors import synchronize


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensors that ops allocate while active, and their peak.

    Outputs that alias an input (in-place ops, views) are not new memory; a tensor's bytes are
    released when the Python tensor dies. Used on the CPU, where the allocator keeps no stats.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, Tensor) or t._base is not None:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in inputs:
                continue
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, storage.nbytes())
        return out


class MatmulTime(TorchDispatchMode):
    """Wall time spent inside the matmul-like ops that ``FlopCounterMode`` prices (mm, addmm,
    bmm, baddbmm, fused attention), each timed on its own with the device synchronised.

    With the compute floor it splits a scorer's time: the matmuls' own rate at the scorer's
    shapes (narrow GEMMs run far below a square matmul's rate) against everything else.
    """

    OPS = frozenset(
        getattr(torch.ops.aten, name).default
        for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                     "_scaled_dot_product_cudnn_attention")
        if hasattr(torch.ops.aten, name)
    )

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.seconds = 0.0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.OPS:
            # composite ops (matmul, linear, einsum) reach a mode whole under inference_mode:
            # decompose them, as FlopCounterMode does, so their mm/bmm are seen
            with self:
                out = func.decompose(*args, **kwargs)
            return func(*args, **kwargs) if out is NotImplemented else out
        synchronize(self.device)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def peak_memory_mb(run: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    """Peak memory one call of ``run`` adds above what is allocated before it, and the method."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_max_memory_allocated"
    with LiveTensorBytes() as counter:
        run()
    return counter.peak / 2**20, "cpu_live_tensor_peak"
