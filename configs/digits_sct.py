"""sCT on scikit-learn's bundled 8x8 digits: the embedded default (about 10 min, 2 CPU cores).

A small U-Net (8x8 -> 4x4 with attention at 4x4) with the sCM changes: positional
time embedding of c_noise(t) = t, adaptive double normalization, adaptive weighting.
"""

from scm_jax.config import base_config


def get_config():
  c = base_config('unet')
  c.data.name = 'digits'
  c.model.channels = 24
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 2
  c.model.dropout = 0.1
  c.model.time_embed_scale = 10.0
  c.loss.kind = 'sct'
  c.loss.p_mean = -1.0
  c.loss.p_std = 1.4
  c.loss.tangent_warmup_steps = 1000
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.ema.decays = (0.999,)
  # Samples use the EDM2 power EMA: its window is a fraction of the run so far, whereas
  # the classic 0.999 EMA still holds e^-2 = 13.5% of the random init after 2000 steps.
  c.ema.sigma_rels = (0.05,)
  c.sample.ema = 'pema_0.05'
  c.train.num_steps = 2000
  c.train.batch_size = 64
  c.train.log_every = 100
  c.train.sample_every = 1000
  c.train.ckpt_every = 500
  c.sample.num = 100
  return c
