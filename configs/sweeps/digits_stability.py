"""Stability ablation on the 8x8 digits U-Net: tricks off, and a large time scale.

Points: every trick on with time scale 10 (the recipe), tangent normalization off,
every trick off (normalization, warmup, adaptive weighting), and time scale 1000.
400 steps each with a 200-step tangent warmup (~3-4 min per point on a shared 2-core
CPU, compile included).

    nice -n 10 python -m launch.sweep --sweep=configs/sweeps/digits_stability.py \
        --base=configs/digits_sct.py --eval_num=500
    python -m scm_jax.report --root=runs/sweeps/digits_stability
"""

from scm_jax import sweep

BASE = 'configs/digits_sct.py'


def get_sweep():
  points = [
      {},
      {'loss.tangent_norm': False},
      {'loss.tangent_norm': False, 'loss.tangent_warmup_steps': 0,
       'loss.adaptive_weight': False},
      {'model.time_embed_scale': 1000.0},
  ]
  # The U-Net of the recipe when these results were measured (32 channels, batch 128).
  common = {'model.channels': 32, 'train.batch_size': 128, 'train.num_steps': 400,
            'loss.tangent_warmup_steps': 200, 'optim.warmup_steps': 100, 'train.sample_every': 400,
            'train.ckpt_every': 200, 'train.log_every': 50}
  return sweep.fixed(common, points)  # a point's own warmup (0) wins
