"""sCD + adaptive VSD on ImageNet 512 (Lu & Song 2024, Appendix C, Table 5): 20k
iterations after sCD, from the sCD run's weights, F_phi from the teacher.

    python -m scm_jax.train --config=configs/imagenet512_scd_vsd.py:dit_xxl \\
        --workdir=runs/in512_vsd --config.teacher.workdir=<teacher> \\
        --config.teacher.student_workdir=<the sCD run>
"""

from configs import imagenet512_scd
from configs import toy2d_scd


def get_config(size: str = 'dit_xxl'):
  c = imagenet512_scd.get_config(size)
  # lambda_VSD 1, VSD proposal 0.4 / 2.0 from t_max = arctan(80 / sigma_d); F_phi with
  # the CM's lr and P -0.8 / 1.6, one update per student update; no microbatching.
  toy2d_scd.set_vsd_stage(c, num_steps=20000)
  c.train.microbatches = 1
  return c
