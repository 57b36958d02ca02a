"""Memory planner: does a recipe fit, and with which microbatches and remat policy?

    python -m scm_jax.plan --config=configs/imagenet512_scd.py:dit_xxl --devices=8 --device_memory=80
    python -m scm_jax.plan --config=configs/imagenet512_scd.py:dit_xxl --devices=8,64 \\
        --config.train.batch_size=2048 [--compile=yes] [--json=plan.json]

Prints per-device GiB of params, optimizer, EMAs, teacher, gradients and activations
(per block and per example, for every remat policy), the largest per-device microbatch
that fits and the smallest `train.microbatches` that fits the recipe's batch. Nothing
is allocated: shapes come from jax.eval_shape and abstract traces (the analytic model of
`scm_jax.train.memory`). With --compile=yes (default: when this process has the devices and
they are not CPUs) the real sharded step is compiled for the recipe as configured and
XLA's own peak is printed too; the CPU backend's peak ignores remat.
"""

import dataclasses
import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from scm_jax import config as config_lib
from scm_jax import models as models_lib
from scm_jax.train import memory

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe (configs/*.py[:arg]).',
                                          lock_config=True)
_DEVICES = flags.DEFINE_list('devices', ['8'], 'Devices the run uses (the mesh is the '
                             "config's, on this many devices); several: one plan each.")
_MEMORY = flags.DEFINE_float('device_memory', 80.0, 'Memory per device, GiB.')
_USABLE = flags.DEFINE_float('usable', 0.9, 'Fraction of it XLA may use (on GPU set '
                             'XLA_PYTHON_CLIENT_MEM_FRACTION to match).')
_COMPILE = flags.DEFINE_enum('compile', 'auto', ['auto', 'yes', 'no'],
                             'Also compile the real step (needs the devices here).')
_MIN_MICRO = flags.DEFINE_integer('min_microbatch', 32, 'Suggest the remat policy with the '
                                  'least recomputation whose microbatch is at least this '
                                  '(under FSDP each microbatch gathers the weights again).')
_JSON = flags.DEFINE_string('json', '', 'Also write the plan as JSON here.')
flags.mark_flag_as_required('config')


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate_config(config)
  model = models_lib.build_model(config.model)
  data_shape = memory.data_shape_of(config)
  table = memory.activation_table(config, model, data_shape)
  plans = []
  for n in map(int, _DEVICES.value):
    plan = memory.make_plan(config, n, _MEMORY.value, _USABLE.value, data_shape, table=table)
    enough = jax.device_count() >= n
    if _COMPILE.value == 'yes' or (_COMPILE.value == 'auto' and enough
                                   and jax.default_backend() != 'cpu'):
      if not enough:
        sys.exit(f'--compile needs {n} devices; this process has {jax.device_count()}.')
      plan.compiled = memory.compiled_step_memory(config, model, data_shape,
                                                  jax.devices()[:n])
    print(memory.format_plan(plan, config))
    print('\n' + memory.suggestion(plan, config, _MIN_MICRO.value) + '\n')
    plans.append(dataclasses.asdict(plan))
  print('Source: the analytic model of scm_jax.train.memory (abstract traces, nothing '
        'allocated)' + ('; compiled: XLA memory_analysis of the real step.'
                        if any(p['compiled'] for p in plans) else '.'))
  if jax.default_backend() == 'cpu':
    print('Note: the CPU backend does not reflect rematerialization in memory_analysis '
          '(its compiled peak is that of model.remat=none); the analytic model does.')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(plans, f, indent=2)


if __name__ == '__main__':
  app.run(main)
