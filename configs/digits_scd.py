"""Class-conditional sCD on scikit-learn's 8x8 digits: teacher first, then distill.

    python -m scm_jax.train --config=configs/digits_scd.py:teacher --workdir=runs/digits_teacher
    python -m scm_jax.train --config=configs/digits_scd.py --workdir=runs/digits_scd \\
        --config.teacher.workdir=runs/digits_teacher
    python -m scm_jax.sample --workdir=runs/digits_scd --steps=1 --num=100 --labels=0,1,2,3,4,5,6,7,8,9
    python -m scm_jax.train --config=configs/digits_scd.py:vsd --workdir=runs/digits_vsd \
        --config.teacher.workdir=runs/digits_teacher --config.teacher.student_workdir=runs/digits_scd

Stage 'teacher': TrigFlow diffusion with a label embedding (10 classes + the null class)
and 10% label dropout, so classifier-free guidance is available. Stage 'student' (the
default): sCD from the teacher's EMA, starting from the teacher's weights (the paper's
initialization), same architecture. --config.teacher.guidance=W distills the guided
teacher velocity; stage 'guided' trains a guidance-conditioned student instead (input s,
s ~ U[1, 2]; `scm_jax.sample --guidance=s` then costs one evaluation per step). The U-Net
is the digits default (24 channels, batch 64). Stage 'vsd': sCD + adaptive VSD
(Appendix C) for a few hundred steps after sCD, from the sCD run's weights
(teacher.student_workdir), F_phi from the teacher; its variants (F_phi warm-up, several
F_phi updates per step, the residual's units, the weight head) are loss.vsd_* fields,
compared by `python -m benchmarks.digits_vsd` (docs/training.md).

Stages 'edm2_teacher' / 'edm2_student': the same with a small EDM2 in NVlabs' own
parameterization (`edm2_plain`), the layout of their released networks; docs/teachers.md
runs it through `python -m scm_jax.import_edm2` (export, import, then sCD).
"""

from configs import digits_sct
from configs import toy2d_scd
from scm_jax.config import base_config


STAGES = ('teacher', 'student', 'guided', 'vsd', 'edm2_teacher', 'edm2_student')


def edm2_plain(c):
  """A small EDM2 in its own parameterization (EDM2's config G: EDM c_noise, Fourier
  features, scalar modulation, its uncertainty head): the architecture of NVlabs'
  released networks, at digits size (8x8 -> 4x4, attention at 4x4)."""
  from scm_jax.models import edm2
  c.model = base_config('edm2').model
  c.model.update(dict(channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,),
                      channels_per_head=16, logvar_channels=32, num_classes=10, dropout=0.1,
                      **edm2.PLAIN))
  return c


def get_config(stage: str = 'student'):
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; use configs/digits_scd.py[:{"|:".join(STAGES)}]')
  c = digits_sct.get_config()  # the digits U-Net, data and logging
  c.model.channels = 24
  c.model.num_classes = 10
  c.train.batch_size = 64
  c.train.sample_every = 500
  c.train.ckpt_every = 500
  # EDM2 power EMA, used for sampling and as the teacher's weights: its averaging window
  # is relative to the run's length, so a short student run does not keep a share of
  # the teacher's weights (ema_0.999 after 1500 steps still holds 22% of them).
  c.ema.sigma_rels = (0.05, 0.1)
  c.sample.ema = 'pema_0.05'
  if stage.startswith('edm2'):
    c = edm2_plain(c)
  if stage in ('teacher', 'edm2_teacher'):
    c.loss.kind = 'diffusion'
    c.loss.label_dropout = 0.1
    c.optim.lr = 1e-3
    c.train.num_steps = 3000
    c.sample.ode_steps = 18
    return c
  c.loss.kind = 'scd'
  c.loss.tangent_warmup_steps = 500
  c.optim.lr = 1e-4  # fine-tuning from the teacher (the paper's rate; 1e-3 was worse on the toy)
  c.optim.warmup_steps = 0
  c.train.num_steps = 1500
  c.teacher.ema = 'pema_0.05'
  c.teacher.guidance = 1.0
  c.teacher.init_student = True
  if stage == 'edm2_student':  # from an imported EDM2 teacher (its raw weights)
    c.teacher.ema = ''
    # Forced weight normalization keeps every weight row at norm sqrt(fan_in), so an Adam
    # step is ~10x smaller relative to the weights than in the U-Net: 1e-3 (measured
    # better than 1e-4, docs/teachers.md).
    c.optim.lr = 1e-3
    c.train.num_steps = 1000
  if stage == 'guided':  # a guidance-conditioned student: input s ~ U[1, 2] (App. G.2)
    c.model.guidance_embed = True
    c.teacher.guidance_max = 2.0
  if stage == 'vsd':
    toy2d_scd.set_vsd_stage(c, num_steps=400)
  return c
