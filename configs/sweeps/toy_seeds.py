"""Seed-to-seed spread of the toy stability setting (the yardstick for toy_stability).

The all-tricks, time scale 10 point of `toy_stability.py` (same size and length) trained
with three seeds (parameter init, time/noise draws and data order all follow config.seed).
Differences between toy_stability points smaller than this spread are noise.

    nice -n 10 python -m launch.sweep --sweep=configs/sweeps/toy_seeds.py
"""

from configs.sweeps import toy_stability
from scm_jax import sweep

BASE = 'configs/toy2d_sct.py'


def get_sweep():
  return sweep.fixed(toy_stability.get_sweep()[0], sweep.grid({'seed': [0, 1, 2]}))
