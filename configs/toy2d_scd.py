"""sCD on the 2-D ring of 8 Gaussians: distill a TrigFlow diffusion teacher (minutes on a CPU).

Two stages, one architecture (the student starts from the teacher's weights):

    python -m scm_jax.train --config=configs/toy2d_scd.py:teacher --workdir=runs/toy_teacher
    python -m scm_jax.train --config=configs/toy2d_scd.py --workdir=runs/toy_scd \\
        --config.teacher.workdir=runs/toy_teacher

Variants of the student (same budget): 'multistep2' / 'multistep4' (loss.segments = M,
sampled in M steps), 'discrete' (discrete-time sCM, loss.time_derivative='discrete'),
and 'vsd': the sCD + adaptive VSD stage after sCD (add
--config.teacher.student_workdir=runs/toy_scd).

Class-conditional variant (ring8 labels are the mode index): add
--config.model.num_classes=8 to both, --config.loss.label_dropout=0.1 to the teacher and
--config.teacher.guidance=W to the student.

Autoguidance (EDM2: the teacher guided by a smaller, less-trained version of itself):
stage 'guide' trains that guide (width 32, 300 steps; add the teacher's
--config.model.num_classes); the student then takes
--config.teacher.guide_workdir=runs/toy_guide --config.teacher.guidance=W (or a
guidance-conditioned student: --config.model.guidance_embed=True
--config.teacher.guidance_max=2).
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


STAGES = ('teacher', 'guide', 'student', 'multistep2', 'multistep4', 'discrete', 'vsd')


def get_config(stage: str = 'student'):
  if stage == 'teacher':
    return _power_ema(toy2d_diffusion.get_config())
  if stage == 'guide':  # autoguidance: a smaller, shorter-trained teacher
    c = _power_ema(toy2d_diffusion.get_config())
    c.model.width = 32
    c.train.num_steps = 300
    c.train.ckpt_every = c.train.sample_every = 300
    return c
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; use configs/toy2d_scd.py[:{"|".join(STAGES)}]')
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
  if stage.startswith('multistep'):
    c.loss.segments = int(stage[len('multistep'):])
    c.sample.steps = (c.loss.segments,)
  elif stage == 'discrete':
    c.loss.time_derivative = 'discrete'
    c.loss.discrete_dt = 0.01
  elif stage == 'vsd':
    set_vsd_stage(c, num_steps=500)
  return c


def set_vsd_stage(c, num_steps: int):
  """sCD + adaptive VSD after sCD (Appendix C, Table 5): lambda_VSD = 1, VSD proposal
  0.4 / 2.0 on 1-step samples from arctan(80 / sigma_d), F_phi (from the teacher) with
  the CM's lr and proposal -0.8 / 1.6; the student from teacher.student_workdir."""
  c.loss.kind = 'scd_vsd'
  c.loss.vsd_weight = 1.0
  c.loss.vsd_p_mean, c.loss.vsd_p_std = 0.4, 2.0
  c.loss.vsd_sigma_max = 80.0
  c.loss.vsd_phi_p_mean, c.loss.vsd_phi_p_std = -0.8, 1.6
  c.loss.tangent_warmup_steps = 0  # the sCD student is past its warmup
  c.train.num_steps = num_steps
  c.teacher.student_ema = c.sample.ema
  return c
