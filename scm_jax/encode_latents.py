"""Encode a dataset to VAE latents for latent-space training.

  python -m scm_jax.encode_latents --config=configs/imagenet512_scd.py \
      --config.data.name=folder --config.data.path=/data/imagenet/train \
      --config.data.labels_from_subdirs=True --config.data.image_size=512 \
      --vae=/weights/sd-vae-ft-mse.safetensors --out=/data/in512_latents_train.npy

Reads the images of `config.data` (any source: folder, tfds, array, ...) in order,
encodes them with the VAE of `config.vae` (weights from --vae or config.vae.path;
.npz, diffusers .safetensors or .bin), normalizes them with config.vae.shift/scale
and writes float32 latents [N, H/8, W/8, 4] with their labels:
  FILE.npz  keys 'latents', 'label' (in memory; small and medium sets), or
  FILE.npy  written incrementally and memory-mapped at training time, labels in
            FILE.labels.npy (ImageNet-scale sets).
Train on them with data.name='array', data.path=FILE, data.latents=True. Only process
0 of a multi-process job should run this (it is a single-process tool).
"""

import os

import numpy as np
from absl import flags
from ml_collections import config_flags

from scm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe whose data/vae sections to use.')
_VAE = flags.DEFINE_string('vae', None, 'VAE weights (overrides config.vae.path).')
_SPLIT = flags.DEFINE_string('split', None, 'Data split (default config.data.split).')
_OUT = flags.DEFINE_string('out', None, 'Output .npz or .npy file.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Encode only the first N examples (0 = all).',
                              lower_bound=0)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for sampling the posterior (vae.sample_posterior).',
                             lower_bound=0)
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv
  import jax
  from tqdm.auto import tqdm
  from scm_jax import data as data_lib
  from scm_jax.errors import ConfigError
  from scm_jax.models import vae as vae_lib
  from scm_jax.infra import files

  config = cli.config_value(_CONFIG)
  out = _OUT.value
  if not out.endswith(('.npz', '.npy')):
    raise ConfigError(f'--out={out} must end in .npz or .npy.')
  vae_config = config.vae
  if _VAE.value:
    vae_config = vae_config.copy_and_resolve_references()
    vae_config.path = _VAE.value
  vae, params = vae_lib.load_vae(vae_config)
  encode = vae_lib.encode_fn(vae, vae_config)
  source = data_lib.build_source(config.data, _SPLIT.value or config.data.split)
  if len(source.shape) != 3 or source.shape[-1] != vae.in_channels:
    raise ConfigError(f'the VAE takes images [H, W, {vae.in_channels}] but {source.name} '
                      f'gives examples of shape {source.shape}.')
  f = vae.downsample_factor
  if source.shape[0] % f or source.shape[1] % f:
    raise ConfigError(f'image size {source.shape[:2]} is not divisible by the VAE factor {f}; '
                      'set data.image_size.')
  n = min(len(source), _LIMIT.value or len(source))
  latent_shape = (source.shape[0] // f, source.shape[1] // f, vae.latent_channels)
  os.makedirs(os.path.dirname(os.path.abspath(out)) or '.', exist_ok=True)
  labels = np.zeros((n,), np.int32)
  key = jax.random.PRNGKey(_SEED.value)
  bs = int(vae_config.batch_size)
  # Written under a temporary name and renamed: an interrupted run leaves no half file at `out`.
  with files.atomic_path(out, os.path.splitext(out)[1]) as tmp:
    if out.endswith('.npy'):
      latents = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32,
                                          shape=(n,) + latent_shape)
    else:
      latents = np.zeros((n,) + latent_shape, np.float32)
    for start in tqdm(range(0, n, bs), desc='encode', unit='batch'):
      idx = np.arange(start, min(start + bs, n))
      batch = source.get(idx)
      latents[idx] = np.asarray(encode(params, batch['x'], jax.random.fold_in(key, start)))
      labels[idx] = batch['label']
    stats = np.array(latents[:min(n, 1024)])
    if out.endswith('.npy'):
      latents.flush()
      del latents
      np.save(out[:-4] + '.labels.npy', labels)
    else:
      np.savez(tmp, latents=latents, label=labels)
  print(f'wrote {out}: {n} latents of shape {latent_shape} from {source.name}; '
        f'mean {float(np.mean(stats)):.3f}, std {float(np.std(stats)):.3f} '
        f'(sigma_d = {config.trigflow.sigma_d})')


if __name__ == '__main__':
  cli.run(main)
