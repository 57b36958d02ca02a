"""scm-jax: continuous-time consistency models (sCM, Lu & Song 2024) in JAX.

Modules follow the algorithm: `trigflow` (the diffusion process), `losses` (diffusion,
sCT/sCD), `sampling`, `models/`, `data/`, `train/` (state, step, loop), `sharding`,
`checkpoint`; `train`, `sample` and `evaluate` are also the command-line entry points.
"""

__version__ = '0.1.0'
