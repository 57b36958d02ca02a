"""sCT on a 2-D ring of 8 Gaussians (per-coordinate std ~0.5 = sigma_d): minutes on a CPU.

The setting of shared/SCM_NOTES.md's toy reference: MLP width 256, time embedding
scale 10 (1000 diverges, 1 works), 6000 steps.
"""

from scm_jax.config import base_config


def get_config():
  c = base_config('mlp')
  c.data.name = 'toy2d'
  c.data.toy = 'ring8'
  c.model.width = 256
  c.model.depth = 4
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
  c.train.num_steps = 6000
  c.train.batch_size = 512
  c.train.log_every = 200
  c.train.sample_every = 2000
  c.train.ckpt_every = 2000
  c.sample.num = 2000
  return c
