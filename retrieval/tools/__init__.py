"""vtr's tools: what trains, indexes, sweeps or prepares, as opposed to what measures (:mod:`retrieval.bench`).

- :mod:`retrieval.tools.compare`: ``vtr compare`` (every method fine-tuned, tested and timed the same way);
- :mod:`retrieval.tools.index`: ``vtr index`` (encode the videos of a split once) and
  :mod:`retrieval.tools.search`: ``vtr search`` (rank them for typed queries);
- :mod:`retrieval.tools.sweep`: ``vtr sweep`` (a grid of ``vtr fit`` runs, each tested on its
  val-selected checkpoint, resumable) and :mod:`retrieval.tools.results`: ``vtr results`` (one
  table, mean ± std over seeds and the CI, from run, compare and sweep folders);
- :mod:`retrieval.tools.wandb_log`: the tools' tables and plots in a wandb run (offline by default);
- :mod:`retrieval.tools.prepare`: ``vtr prepare`` (the lineage's optional re-encode of a video folder).
"""
