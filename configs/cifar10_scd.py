"""sCD on CIFAR-10 (Lu & Song 2024, G.2; paper FID 1-step 3.66, 2-step 2.52).

    python -m scm_jax.train --config=configs/cifar10_teacher.py --workdir=runs/c10_teacher
    python -m scm_jax.train --config=configs/cifar10_scd.py --workdir=runs/c10_scd \\
        --config.teacher.workdir=runs/c10_teacher

As configs/cifar10_sct.py with dropout 0 and dx_t/dt from the teacher's PF-ODE; the
student starts from the teacher's EMA (unconditional, as the paper's CIFAR-10 results).
"""

from configs import paper


def get_config(arg: str = ''):
  del arg  # one size
  return paper.cifar10('scd')
