"""CIFAR-10 teacher: TrigFlow diffusion with EDM's settings (Lu & Song 2024, G.1).

    python -m scm_jax.train --config=configs/cifar10_teacher.py --workdir=runs/c10_teacher

DDPM++-sized U-Net with positional time embedding and adaptive double normalization,
batch 512, 400k iterations, Adam lr 1e-3 (beta 0.9/0.999, eps 1e-8, EDM's 10 Mimg
ramp-up), dropout 0.13, EDM's time proposal (P_mean -1.2, P_std 1.2), EMA half-life
0.5 Mimg; sampled with EDM's Heun, 18 steps (NFE 35; paper FID 2.15). Then
configs/cifar10_sct.py / cifar10_scd.py start from its EMA. Needs
`tfds build cifar10 --file_format=array_record` on a machine with internet first.
"""

from configs import paper


def get_config(arg: str = ''):
  del arg  # one size
  return paper.cifar10('teacher')
