"""sCD on CIFAR-10 32x32 (Lu & Song 2024, Table 1: sCD 1-step FID 3.66, 2-step 2.52).

    python -m scm_jax.train --config=configs/cifar10_scd.py:teacher --workdir=runs/c10_teacher
    python -m scm_jax.train --config=configs/cifar10_scd.py --workdir=runs/c10_scd \\
        --config.teacher.workdir=runs/c10_teacher

Both stages share the sCT recipe's network (configs/cifar10_sct.py: EDM's DDPM++ size
with positional time embedding and adaptive double normalization), TrigFlow with
sigma_d = 0.5, the time proposal P_mean = -1.0, P_std = 1.4, RAdam at lr 1e-4, batch 512
and EMA 0.9999. The teacher is a TrigFlow diffusion model (unconditional, as the
paper's CIFAR-10 results are); the student starts from its weights, distills its
PF-ODE velocity with tangent warmup over 10k iterations, tangent normalization c = 0.1
and adaptive weighting, and is sampled with 1 or 2 steps (t_mid = 1.1). A power EMA
(sigma_rel 0.05, 0.1) is kept beside the classic one so the EMA length can be picked
after training (`--ema=pema_0.1`).
Needs `tfds build cifar10 --file_format=array_record` on a machine with internet first.
"""

from configs import cifar10_sct


def get_config(stage: str = 'student'):
  if stage not in ('teacher', 'student'):
    raise ValueError(f'unknown stage {stage!r}; use configs/cifar10_scd.py[:teacher]')
  c = cifar10_sct.get_config()
  c.ema.decays = (0.9999,)
  c.ema.sigma_rels = (0.05, 0.1)
  if stage == 'teacher':
    c.loss.kind = 'diffusion'
    c.sample.ode_steps = 18       # EDM's CIFAR-10 Heun budget: NFE 35
    return c
  c.loss.kind = 'scd'
  c.loss.tangent_warmup_steps = 10000
  c.teacher.ema = 'ema_0.9999'
  c.teacher.guidance = 1.0
  c.teacher.init_student = True
  return c
