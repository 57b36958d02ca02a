"""ImageNet 64x64. sCD from the teacher's EMA (Algorithm 1; Tables 4, 8).

    python -m scm_jax.train --config=configs/imagenet64_teacher.py:s --workdir=runs/in64_teacher
    python -m scm_jax.train --config=configs/imagenet64_scd.py:s --workdir=runs/in64_scd \\
        --config.teacher.workdir=runs/in64_teacher

The argument is the size: s (default), m, l, xl (192 / 256 / 320 / 384 channels). Every
number of the paper's tables lives in configs/paper.py (checked by tests/test_recipes.py).
Needs `tfds build imagenet_resized/64x64 --file_format=array_record` first.
"""

from configs import paper


def get_config(arg: str = 's'):
  if arg and arg.lower().startswith('edm2_'):  # from an imported NVlabs network
    return paper.edm2_released(arg.lower(), 'imagenet64')
  return paper.imagenet64(arg, 'scd')
