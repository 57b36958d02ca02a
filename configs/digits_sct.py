"""sCT on scikit-learn's bundled 8x8 digits: the embedded default (about 10 min, 2 CPU cores).

A small U-Net (8x8 -> 4x4 with attention at 4x4) with the sCM changes: positional
time embedding of c_noise(t) = t, adaptive double normalization, adaptive weighting.

    configs/digits_sct.py                sCT from scratch
    configs/digits_sct.py:teacher        the TrigFlow diffusion teacher (same U-Net)
    configs/digits_sct.py:from_teacher   sCT from the teacher's EMA (Algorithm 1); pass
                                         --config.teacher.workdir=<the teacher's workdir>
"""

from scm_jax.config import base_config

STAGES = ('', 'teacher', 'from_teacher')


def get_config(stage: str = ''):
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; use configs/digits_sct.py[:teacher|:from_teacher]')
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
  if stage == 'teacher':
    c.loss.kind = 'diffusion'
    c.sample.ode_steps = 18
  elif stage == 'from_teacher':
    # Fine-tuning the teacher's EMA: 10x lower rate (the paper: x0.01 of the teacher's
    # ImageNet rate), no rate warmup, a shorter tangent warmup.
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.loss.tangent_warmup_steps = 500
    c.teacher.ema = 'pema_0.05'
    c.teacher.init_student = True
  return c
