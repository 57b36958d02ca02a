"""Infrastructure a run stands on: no math, no training logic.

  sharding     device mesh, parameter sharding rules, batch placement
  distributed  multi-process start-up (jax.distributed), leaving a job that failed
  lost_process the one-line report of a lost process (stderr guard)
  checkpoint   Orbax checkpoints: atomic saves, fingerprints, fallback on corruption
  formats      checkpoint format versions and the migration of older ones
  fingerprint  checksums of arrays, metas and data positions
  lock         one writer per workdir
  files        atomic file writes; readers of user-editable JSON, JSONL and .npz files
  writers      TensorBoard / JSONL metrics and PNG images
  visualize    image grids and scatter plots
"""
