"""Step time of the paper's sCD variants relative to plain sCD, in one process.

    python -m benchmarks.scm_variants [--config=configs/toy2d_scd.py] [--batch=512]
        [--repeats=20] [--out=FILE.json]

Each variant is the library's jitted `Experiment` step of the recipe with one change:
multistep (loss.segments=4), discrete-time (loss.time_derivative='discrete'), the
two-pass forward (loss.shared_forward=False) and sCD + VSD (loss.kind='scd_vsd': the
student's 1-step samples, the VSD term and one F_phi update). The teacher is the
recipe's architecture with the student's initial weights (its cost is what matters), a
jit argument as in training. Calls are interleaved; medians and ratios to sCD printed.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'toy2d_scd.py'),
    'sCD recipe whose model and data are benchmarked.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch (0: config.train.batch_size).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls first.')
_OUT = flags.DEFINE_string('out', None, 'JSON output path.')

VARIANTS = {
    'sCD': {},
    'sCD two-pass forward': {'loss.shared_forward': False},
    'multistep sCD (M=4)': {'loss.segments': 4, 'sample.steps': (4,)},
    'discrete-time sCD': {'loss.time_derivative': 'discrete'},
    'sCD + VSD': {'loss.kind': 'scd_vsd'},
    'sCD (again)': {},  # the same program last: the spread of the ratios from order/noise
}


def main(argv):
  del argv
  from scm_jax import config as config_lib
  from scm_jax.core import teachers
  from scm_jax.infra import sharding as sharding_lib
  from scm_jax.train.experiment import Experiment
  base = _CONFIG.value
  base.loss.kind = 'scd'
  if _BATCH.value:
    base.train.batch_size = _BATCH.value
  base.train.progress_bar = False
  base.data.prefetch = 0
  calls, teacher_fn = {}, None
  for name, overrides in VARIANTS.items():
    c = config_lib.apply_overrides(base.copy_and_resolve_references(), overrides)
    if teacher_fn is None:  # the student's init weights as the teacher
      probe = Experiment(c, dxdt_fn=lambda x, t, l: x)
      params = probe.init_state().params
      teacher_fn = teachers.make_dxdt_fn(teachers.from_flax_model(probe.model), params,
                                         c.trigflow.sigma_d)
    exp = Experiment(c, dxdt_fn=teacher_fn)
    state = exp.init_state()
    batch = sharding_lib.put_batch(next(exp.data_stream(prefetch=0)), exp.mesh)
    calls[name] = common.stateful(exp.jit_step, state, batch, *exp.teacher_args)
  timings = common.time_interleaved(calls, _REPEATS.value, _WARMUP.value)
  ref = timings['sCD']['median_s']
  rows = [{'name': n, 'ms': 1e3 * t['median_s'], 'ratio': t['median_s'] / ref, **t}
          for n, t in timings.items()]
  info = common.device_info()
  print(f'\n{info["device_kind"]} x{info["device_count"]} ({info["platform"]}), model '
        f'{base.model.name}, batch {base.train.batch_size}, median of {_REPEATS.value}')
  common.print_table(rows, [('name', 'step', 's'), ('ms', 'median ms', '.2f'),
                            ('ratio', 'vs sCD', '.2f')])
  common.write_json(_OUT.value or common.default_out('scm_variants'), {
      'config': {'model': base.model.to_dict(), 'batch': base.train.batch_size,
                 'data': base.data.name}, 'rows': rows})


if __name__ == '__main__':
  app.run(main)
