"""Train: python -m scm_jax.train --config=configs/digits_sct.py --workdir=DIR [--config.x=y].

Resumes from the newest checkpoint in --workdir. See configs/ for recipes.
"""

from absl import flags
from ml_collections import config_flags

from scm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file in configs/.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, samples).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from scm_jax import distributed
  from scm_jax.train import loop  # after flag parsing: a bad flag fails fast
  config = cli.config_value(_CONFIG)
  # Multi-host: join the job before any JAX backend is used (no-op on one process).
  distributed.initialize(config.get('distributed'))
  loop.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
