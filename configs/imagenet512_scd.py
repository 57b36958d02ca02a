"""ImageNet 512x512 (latent 64x64x4). sCD with a guidance-conditioned student,
s ~ U[1, 2] (Algorithm 1, G.2; Tables 5, 6).

    python -m scm_jax.train --config=configs/imagenet512_teacher.py:xxl --workdir=runs/in512_teacher
    python -m scm_jax.train --config=configs/imagenet512_scd.py:xxl --workdir=runs/in512_scd \\
        --config.teacher.workdir=runs/in512_teacher --config.data.path=/data/in512_{split}.npy

The argument is the size: s, m, l, xl, xxl (default; 1.5B parameters), or an alternative
backbone with the same settings: dit_s .. dit_xxl, unet_s .. unet_xxl. Every number of
the paper's tables lives in configs/paper.py (checked by tests/test_recipes.py). Latents:
`python -m scm_jax.encode_latents` (README, "Latent pipeline").
"""

from configs import paper


def get_config(arg: str = 'xxl'):
  if arg and arg.lower().startswith('edm2_'):  # from an imported NVlabs network
    return paper.edm2_released(arg.lower(), 'imagenet512')
  return paper.imagenet512(arg, 'scd')
