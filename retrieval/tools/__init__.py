"""Data tools: ``vtr prepare`` (the lineage's optional re-encode of a video folder)."""
