"""sCD on the 2-D ring of 8 Gaussians: distill a TrigFlow diffusion teacher (minutes on a CPU).

Two stages, one architecture (the student starts from the teacher's weights):

    python -m scm_jax.train --config=configs/toy2d_scd.py:teacher --workdir=runs/toy_teacher
    python -m scm_jax.train --config=configs/toy2d_scd.py --workdir=runs/toy_scd \\
        --config.teacher.workdir=runs/toy_teacher

Class-conditional variant (ring8 labels are the mode index): add
--config.model.num_classes=8 to both, --config.loss.label_dropout=0.1 to the teacher and
--config.teacher.guidance=W to the student.
"""

from configs import toy2d_diffusion
from configs import toy2d_sct


def _power_ema(c):
  """EDM2 power EMA for sampling and as the teacher's weights: its window is relative to
  the run's length, so a student does not keep a share of the teacher's weights (the
  classic 0.999 EMA of a 1500-step student still holds 22% of them)."""
  c.ema.sigma_rels = (0.05, 0.1)
  c.sample.ema = 'pema_0.05'
  return c


def get_config(stage: str = 'student'):
  if stage == 'teacher':
    return _power_ema(toy2d_diffusion.get_config())
  if stage != 'student':
    raise ValueError(f'unknown stage {stage!r}; use configs/toy2d_scd.py[:teacher]')
  c = _power_ema(toy2d_sct.get_config())
  c.loss.kind = 'scd'
  c.loss.tangent_warmup_steps = 500
  # Fine-tuning from the teacher: 1e-4 (the paper's rate) beat sCT's 1e-3 on this toy.
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.teacher.ema = 'pema_0.05'
  c.teacher.guidance = 1.0
  c.teacher.init_student = True
  c.sample.ode_steps = 50
  return c
