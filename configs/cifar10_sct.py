"""sCT on CIFAR-10 (Lu & Song 2024, G.2; paper FID 1-step 2.85, 2-step 2.06).

    python -m scm_jax.train --config=configs/cifar10_sct.py --workdir=runs/c10_sct \\
        --config.teacher.workdir=runs/c10_teacher     # Algorithm 1: start from its EMA

RAdam lr 1e-4 (beta 0.9/0.99, eps 1e-8, no schedule), batch 512, dropout 0.20,
P_mean -1.0, P_std 1.4, tangent warmup 10k, tangent normalization c = 0.1, adaptive
weighting, EMA half-life 0.5 Mimg, 1- and 2-step sampling (t_mid 1.1) from
t_max = arctan(80 / 0.5). Without --config.teacher.workdir it trains from scratch.
"""

from configs import paper


def get_config(arg: str = ''):
  del arg  # one size
  return paper.cifar10('sct')
