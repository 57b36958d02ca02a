"""sCD-XXL on ImageNet 512 latents: the 1.5B-parameter DiT-XXL/2 (see imagenet512_scd.py).

  python -m scm_jax.train --config=configs/imagenet512_scd_xxl.py --workdir=runs/in512_xxl
  python -m scm_jax.train --config=configs/imagenet512_scd_xxl.py:unet_xxl ...  # U-Net XXL
"""

from configs import imagenet512_scd

STATED_PARAMS = imagenet512_scd.STATED_PARAMS


def get_config(size: str = 'dit_xxl'):
  if not size.endswith('xxl'):
    raise ValueError(f'imagenet512_scd_xxl takes dit_xxl or unet_xxl, not {size!r}')
  return imagenet512_scd.get_config(size)
