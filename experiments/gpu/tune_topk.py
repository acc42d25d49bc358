"""The sweep behind ``retrieval.topk.TRITON_CONFIG``: the Triton first pass's launch parameters at
1M x 512 (random unit vectors), batch 1 and 64, each store; ms per call by triton.testing.do_bench,
recall@10 against the torch kernel's fp32 top 10; an int8 batch also with ``int8_dot`` (the
integer tensor cores). On a CUDA machine, from the repository root:

    python experiments/gpu/tune_topk.py OUT_DIR        # writes OUT_DIR/tune.csv (about 2 minutes on an H200)
"""
import csv, itertools, os, sys, time
import torch, triton
from triton.testing import do_bench
from retrieval import topk
from retrieval.topk import exact_topk, quantize, recall_at
out = sys.argv[1]
torch.manual_seed(0)
n, d = 1_000_000, 512
g = torch.nn.functional.normalize(torch.randn(n, d, device="cuda"), dim=1)
qs = {b: torch.nn.functional.normalize(torch.randn(b, d, device="cuda"), dim=1) for b in (1, 64)}
truth = {b: exact_topk(q, g, None, 10, kernel="torch")[1] for b, q in qs.items()}
stores = {s: ((g, None) if s == "fp32" else quantize(g, s)) for s in ("fp32", "bf16", "fp16", "int8")}
grid = {1: [dict(block_rows=r, block_d=c, num_warps=w, num_stages=st) for r, c, w, st in
            itertools.product((64, 128, 256), (128, 512), (4, 8), (2, 4))],
        64: [dict(block_rows=r, block_d=c, num_warps=w, num_stages=st) for r, c, w, st in
             itertools.product((64, 128), (64, 128), (4, 8), (3, 4))]}
int8_grid = {1: grid[1], 64: [dict(cfg, int8_dot=dot) for cfg in grid[64] for dot in (False, True)]}
rows, best = [], {}
t0 = time.time()
for b, configs in grid.items():
    for store in (["fp32", "fp16", "int8"] if b == 1 else ["fp32", "bf16", "fp16", "int8"]):
        codes, scale = stores[store]
        for cfg in (int8_grid[b] if store == "int8" else configs):
            try:
                fn = lambda: topk._blockmax_topk(qs[b], codes, scale, 10, cfg)
                rec = recall_at(fn()[1], truth[b])
                ms = do_bench(fn, warmup=5, rep=40)
            except Exception as e:  # a config that does not compile (shared memory, registers)
                print(b, store, cfg, "failed", type(e).__name__, str(e)[:120]); continue
            rows.append({"batch": b, "store": store, "int8_dot": False, **cfg, "ms": ms, "recall": rec})
            if (b, store) not in best or ms < best[b, store][1]:
                best[b, store] = (cfg, ms)
        print(b, store, best[b, store], f"{time.time() - t0:.0f}s", flush=True)
with open(os.path.join(out, "tune.csv"), "w", newline="") as h:
    w = csv.DictWriter(h, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
