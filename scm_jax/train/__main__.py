"""Train: python -m scm_jax.train --config=configs/digits_sct.py --workdir=DIR [--config.x=y].

Resumes from the newest checkpoint in --workdir. See configs/ for recipes. SIGTERM or
SIGINT saves a checkpoint after the current step and exits with status 128 + signal.
In a multi-process job a process that fails alone exits without waiting for the others
(infra/distributed.py), and a lost process makes the others exit with one line.
"""

import sys

from absl import flags
from ml_collections import config_flags

from scm_jax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file in configs/.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, logs, samples).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from scm_jax.infra import distributed
  from scm_jax.train import loop  # after flag parsing: a bad flag fails fast
  from scm_jax.train import preemption
  config = cli.config_value(_CONFIG)
  # Multi-host: join the job before any JAX backend is used (no-op on one process).
  joined = distributed.initialize(config.get('distributed'))
  try:
    loop.train_and_evaluate(config, _WORKDIR.value)
  except preemption.Preempted as e:  # checkpoint saved: exit 128 + signal, no traceback
    print(f'[scm_jax] {e}', file=sys.stderr, flush=True)
    sys.exit(e.exit_code)  # every process saved the same step: a normal, joint exit
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    if not joined:
      raise
    distributed.exit_after_failure(e, config.get('distributed'))


if __name__ == '__main__':
  cli.run(main)
