"""Measurement only: how fast vtr's retrievers are, against which floors.

- :mod:`retrieval.bench.latency`: ``vtr bench latency`` (offline encode throughput and online
  per-query latency against gallery size, beside the scorer's compute and bandwidth floors);
- :mod:`retrieval.bench.timing`, :mod:`retrieval.bench.meters`, :mod:`retrieval.bench.floors`:
  the timers, the memory / matmul meters and the floors they report against;
- :mod:`retrieval.bench.gallery` (``vtr bench gallery``: fp32 / fp16 / int8 galleries to 1M,
  FAISS), :mod:`retrieval.bench.frontier` (``vtr bench frontier``: two-stage accuracy against
  ms/query), :mod:`retrieval.bench.train_step` (``vtr bench train``), :mod:`retrieval.bench.loader`
  (``vtr bench loader``), :mod:`retrieval.bench.metrics_time` (``vtr bench metrics``);
- :mod:`retrieval.bench.results`: where result files go, their names, merging and plots.

The tools that train, index or sweep are in :mod:`retrieval.tools`; retrievers are built from
recipes and checkpoints by :mod:`retrieval.recipes`.
"""
