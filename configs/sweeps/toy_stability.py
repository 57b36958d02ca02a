"""The paper's stability ablation on the 2-D ring of 8 Gaussians (Lu & Song 2024, Sec. 4).

Which of the three training tricks (tangent normalization, tangent warmup, adaptive
weighting) and which time-embedding scales (c_noise(t) = s * t, positional) keep sCT
stable. Points: all 2x2x2 trick combinations at s = 10, then s in {1, 100, 1000} with
every trick on, s = 1000 with every trick off, and a random Fourier time embedding
(std 16, the instability-prone choice). To fit a shared 2-core CPU the MLP is width 128
with batch 256 (the recipe: 256 / 512) and each point trains 2000 steps (~2-3 min).

    nice -n 10 python -m launch.sweep --sweep=configs/sweeps/toy_stability.py \
        --base=configs/toy2d_sct.py
    python -m scm_jax.report --root=runs/sweeps/toy_stability
"""

from scm_jax import sweep

BASE = 'configs/toy2d_sct.py'

TRICKS = {
    'loss.tangent_norm': [True, False],
    'loss.tangent_warmup_steps': [1000, 0],
    'loss.adaptive_weight': [True, False],
}
ALL_OFF = {'loss.tangent_norm': False, 'loss.tangent_warmup_steps': 0,
           'loss.adaptive_weight': False}


def get_sweep():
  points = sweep.chain(
      sweep.fixed({'model.time_embed_scale': 10.0}, sweep.grid(TRICKS)),
      sweep.grid({'model.time_embed_scale': [1.0, 100.0, 1000.0]}),
      [dict(ALL_OFF, **{'model.time_embed_scale': 1000.0})],
      [{'model.time_embed_kind': 'fourier', 'model.fourier_scale': 16.0}],
  )
  return sweep.fixed({'model.width': 128, 'train.batch_size': 256,
                      'train.num_steps': 2000, 'train.sample_every': 2000,
                      'train.ckpt_every': 1000}, points)
