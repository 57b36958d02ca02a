"""Check lowering: python -m scm_jax.check_lowering --config=RECIPE [--platforms=cuda,tpu].

Lowers the recipe's sharded train step, its sampler and its exported generator for
GPUs and TPUs on this (CPU) machine, over a mesh of --devices host devices, with
synthetic data of the recipe's shapes (scm_jax/train/lowering.py): a kernel or
operation that a platform cannot lower fails here, before a device is rented. Prints
one row per program and platform (whether its Pallas kernels are in it); exits 1 if
any failed, with one line each.

    python -m scm_jax.check_lowering --config=configs/imagenet512_scd.py:dit_xxl \\
        --devices=8 --config.model.attn_impl=pallas
"""

import sys

import jax
from absl import flags
from ml_collections import config_flags

from scm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe (configs/*.py[:arg]).',
                                          lock_config=False)
_PLATFORMS = flags.DEFINE_list('platforms', ['cuda', 'tpu'], 'Platforms to lower for.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'Host (CPU) devices of the mesh.',
                                lower_bound=1)
_PROGRAMS = flags.DEFINE_list('programs', ['train_step', 'sampler', 'generator'],
                              'Programs to lower.')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  # Before anything touches a backend: the mesh is made of CPU devices.
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', _DEVICES.value)
  from scm_jax import config as config_lib
  from scm_jax.errors import ConfigError
  from scm_jax.export import build
  from scm_jax.train import lowering
  config = cli.config_value(_CONFIG)
  config_lib.validate_config(config)
  platforms = build.check_platforms(_PLATFORMS.value)
  bad = [p for p in _PROGRAMS.value if p not in lowering.PROGRAMS]
  if bad:
    raise ConfigError(f'--programs={",".join(bad)}: choose among {",".join(lowering.PROGRAMS)}.')
  exp = lowering.synthetic_experiment(config)
  results = lowering.check(exp, platforms, _PROGRAMS.value)
  print(f'{config.model.name} {config.loss.kind}, attn_impl={config.model.get("attn_impl")}, '
        f'dtype={config.model.get("dtype")}, mesh {dict(exp.mesh.shape)}, batch '
        f'{config.train.batch_size}, jax {jax.__version__}')
  print(lowering.format_results(results))
  if not all(r.ok for r in results):
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
