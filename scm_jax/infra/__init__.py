"""Infrastructure a run stands on: no math, no training logic.

  sharding     device mesh, parameter sharding rules, batch placement
  distributed  multi-process start-up (jax.distributed)
  checkpoint   Orbax checkpoints: atomic saves, fingerprints, fallback on corruption
  files        atomic file writes, the metrics.jsonl reader
  writers      TensorBoard / JSONL metrics and PNG images
  visualize    image grids and scatter plots
"""
