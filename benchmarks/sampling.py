"""Sampling cost: sCM 1-step / 2-step vs the teacher's N-step Heun PF-ODE (N = 18, 50).

    python -m benchmarks.sampling [--config=configs/digits_sct.py] [--batch=256]
        [--ode_steps=18,50] [--repeats=5] [--peak_flops=...] [--out=FILE.json]

One network (the config's model, random weights: cost does not depend on their values)
runs every sampler, through the same jitted samplers `Experiment.sample` uses, in one
process. Throughput: images/s at --batch; latency: one image. FLOPs per image are
NFE x the compiled forward's FLOPs (XLA's cost analysis counts a loop body once, so the
samplers' own programs would under-count). Writes JSON
(default benchmarks/results/sampling_<device>.json).
"""

import os


import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'digits_sct.py'),
    'Recipe whose model is benchmarked.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch', 256, 'Throughput batch (a multiple of the devices).')
_ODE_STEPS = flags.DEFINE_list('ode_steps', ['18', '50'], 'Teacher Heun steps to compare.')
_SOLVER = flags.DEFINE_string('solver', 'heun', 'Teacher PF-ODE solver.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls first.')
_PEAK = flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s for MFU (default: device table).')
_OUT = flags.DEFINE_string('out', None, 'JSON output path.')


def main(argv):
  del argv
  from scm_jax.evaluation import generate
  from scm_jax.train.experiment import Experiment
  config = _CONFIG.value
  config.data.prefetch = 0
  exp = Experiment(config)
  params = exp.init_state().params
  peak = common.peak_flops('f32', _PEAK.value)
  batch = _BATCH.value
  key = jax.random.PRNGKey(0)

  # FLOPs of one network evaluation per image, from the compiled forward at this batch.
  x = jnp.zeros((batch,) + exp.data_shape)
  t = jnp.full((batch,), 0.7)
  forward = jax.jit(lambda p, a, b: exp.F_fn(p)(a, b))
  fwd = common.compiled_stats(forward, params, x, t)
  fwd_time = common.time_fn(forward, params, x, t, repeats=_REPEATS.value, warmup=_WARMUP.value)
  flops_per_nfe = fwd['flops'] / batch if fwd['flops'] else None

  samplers = [generate.Sampler('consistency', 1), generate.Sampler('consistency', 2)]
  samplers += [generate.Sampler('ode', int(n), _SOLVER.value) for n in _ODE_STEPS.value]
  labels = lambda n: (jnp.arange(n) % exp.num_classes) if exp.num_classes else None
  # The jitted programs Experiment.sample runs (output split over the mesh), timed
  # interleaved at the throughput batch and at batch 1.
  run = lambda n, s: exp._sampler(n, s.method, s.steps, 1.0, s.solver or 'heun')  # pylint: disable=protected-access
  thr = common.time_interleaved(
      {s.name: (lambda s=s: run(batch, s)(params, key, labels(batch))) for s in samplers},
      _REPEATS.value, _WARMUP.value)
  lat = common.time_interleaved(
      {s.name: (lambda s=s: run(1, s)(params, key, labels(1))) for s in samplers},
      _REPEATS.value, _WARMUP.value)
  rows = []
  for s in samplers:
    t_b, t_1 = thr[s.name]['median_s'], lat[s.name]['median_s']
    flops = flops_per_nfe * s.nfe if flops_per_nfe else None
    rows.append({'sampler': ('sCM ' if s.method == 'consistency' else 'teacher ') + s.name,
                 'nfe': s.nfe, 'batch_ms': 1e3 * t_b, 'img_s': batch / t_b,
                 'latency_ms': 1e3 * t_1, 'gflops_per_img': flops / 1e9 if flops else None,
                 'mfu': common.mfu(flops * batch if flops else None, t_b, peak),
                 'throughput': thr[s.name], 'latency': lat[s.name]})
  teachers = [r for r in rows if r['sampler'].startswith('teacher')]
  for r in rows:
    for tr in teachers:
      r[f'speedup_vs_{tr["sampler"].split()[1]}'] = r['img_s'] / tr['img_s']
      r[f'latency_speedup_vs_{tr["sampler"].split()[1]}'] = tr['latency_ms'] / r['latency_ms']

  info = common.device_info()
  print(f'\n{info["device_kind"]} x{info["device_count"]} ({info["platform"]}), model '
        f'{config.model.name} channels={config.model.get("channels")}, throughput batch {batch}, '
        f'latency batch 1, median of {_REPEATS.value}; forward {1e3 * fwd_time["median_s"]:.2f} ms')
  cols = [('sampler', 'sampler', 's'), ('nfe', 'NFE', 'd'), ('batch_ms', f'ms/batch{batch}', '.1f'),
          ('img_s', 'img/s', '.1f'), ('latency_ms', 'latency ms', '.2f'),
          ('gflops_per_img', 'GFLOP/img', '.3g'), ('mfu', 'MFU', '.2%')]
  cols += [(f'speedup_vs_{tr["sampler"].split()[1]}', f'x vs {tr["sampler"].split()[1]}', '.1f')
           for tr in teachers]
  common.print_table(rows, cols)
  if peak is None:
    print('MFU: n/a (no peak FLOP/s for this device; pass --peak_flops)')
  common.write_json(_OUT.value or common.default_out('sampling'), {
      'config': {'model': config.model.to_dict(), 'batch': batch, 'data': config.data.name},
      'peak_flops': peak, 'forward': {**fwd, **fwd_time}, 'rows': rows})


if __name__ == '__main__':
  app.run(main)
