"""sCT train step (one shared forward, and the separate-forward path) vs the diffusion
train step, and jvp-forward vs forward, on one model.

    python -m benchmarks.train_step [--config=configs/digits_sct.py] [--config.model.channels=24]
        [--dit=S] [--batch=64] [--repeats=10] [--peak_flops=...] [--out=FILE.json]

All steps are the library's jitted, sharded `Experiment` steps (same params, same
batch, one process): 'sCT step' computes F_theta, F^- and dF^-/dt from one forward
(loss.shared_forward=True, the default), 'sCT step (separate forward)' with
loss.shared_forward=False. The forward / jvp pair is the network call of the
consistency loss (dropout on, the jvp with tangents for x and t as in
`losses.jvp_F_minus`). --dit=S swaps the recipe's model for a DiT-S/2 (sizes of
models.dit.DIT_SIZES) on the same data. Prints a table and writes JSON (default
benchmarks/results/train_step_<device>.json).
"""

import os


import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'digits_sct.py'),
    'Recipe whose model and data are benchmarked.', lock_config=False)
_BATCH = flags.DEFINE_integer('batch', 0, 'Global batch (0: config.train.batch_size).')
_DIT = flags.DEFINE_string('dit', '', 'Replace the model by a DiT of this size, patch 2 '
                           '(S, B, L, XL, XXL); empty: the recipe\'s model.')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls (median reported).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed calls first.')
_PEAK = flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s for MFU (default: device table).')
_OUT = flags.DEFINE_string('out', None, 'JSON output path.')


# (label, loss.kind, loss.shared_forward) of the compared steps.
STEPS = (('diffusion step', 'diffusion', True), ('sCT step', 'sct', True),
         ('sCT step (separate forward)', 'sct', False))


def _experiment(config, kind: str, shared_forward: bool = True):
  from scm_jax.train.experiment import Experiment
  c = config.copy_and_resolve_references()
  c.loss.kind = kind
  c.loss.shared_forward = shared_forward
  c.train.progress_bar = False
  c.data.prefetch = 0
  return Experiment(c)


def _row(name, timing, stats, batch, peak):
  t = timing['median_s']
  return {'name': name, 'ms': 1e3 * t, 'img_s': batch / t, 'gflops': (stats['flops'] or 0) / 1e9 or None,
          'peak_mb': stats['peak_bytes'] / 2**20 if stats['peak_bytes'] else None,
          'mfu': common.mfu(stats['flops'], t, peak), **timing, **stats}


def main(argv):
  del argv
  from scm_jax.infra import sharding as sharding_lib
  config = _CONFIG.value
  if _DIT.value:
    from scm_jax.config import base_config
    from scm_jax.models import dit
    c = base_config('dit')
    c.model.update(patch_size=2, dropout=config.model.dropout, **dit.dit_size(_DIT.value))
    config.model = c.model
  if _BATCH.value:
    config.train.batch_size = _BATCH.value
  batch_size = config.train.batch_size
  peak = common.peak_flops('f32', _PEAK.value)

  exps = {label: _experiment(config, kind, shared) for label, kind, shared in STEPS}
  host_batch = next(exps['sCT step'].data_stream(prefetch=0))
  calls, stats = {}, {}
  for label, exp in exps.items():
    state = exp.init_state()
    batch = sharding_lib.put_batch(host_batch, exp.mesh)
    stats[label] = common.compiled_stats(exp.jit_step, state, batch)
    calls[label] = common.stateful(exp.jit_step, state, batch)

  # The network call inside the consistency loss: F(x/sigma_d, t) and its jvp.
  exp = exps['sCT step']
  params = exp.init_state().params
  model = exp.model
  x = jnp.asarray(host_batch['x'])
  labels = jnp.asarray(host_batch['label']) if exp.num_classes else None
  t = jnp.full((batch_size,), 0.7, jnp.float32)
  key = jax.random.PRNGKey(0)

  def f(p, x_in, t_in):
    return model.apply({'params': p}, x_in, t_in, labels, train=True, rngs={'dropout': key})[0]
  forward = jax.jit(f)
  jvp = jax.jit(lambda p, x_in, t_in, tx, tt: jax.jvp(lambda a, b: f(p, a, b), (x_in, t_in), (tx, tt)))
  args_f = (params, x, t)
  args_j = (params, x, t, jnp.ones_like(x), jnp.ones_like(t))
  stats['forward'] = common.compiled_stats(forward, *args_f)
  stats['jvp-forward'] = common.compiled_stats(jvp, *args_j)
  pair_f = {'forward': lambda: forward(*args_f), 'jvp-forward': lambda: jvp(*args_j)}
  timings = {**common.time_interleaved(calls, _REPEATS.value, _WARMUP.value),
             **common.time_interleaved(pair_f, _REPEATS.value, _WARMUP.value)}
  rows = [_row(name, timings[name], stats[name], batch_size, peak) for name in timings]

  by = {r['name']: r for r in rows}
  ratio = lambda a, b, k: by[a][k] / by[b][k] if by[a].get(k) and by[b].get(k) else None
  sep = 'sCT step (separate forward)'
  ratios = {
      'sct_over_diffusion_time': ratio('sCT step', 'diffusion step', 'median_s'),
      'sct_over_diffusion_peak_memory': ratio('sCT step', 'diffusion step', 'peak_bytes'),
      'sct_over_diffusion_flops': ratio('sCT step', 'diffusion step', 'flops'),
      'sct_separate_over_diffusion_time': ratio(sep, 'diffusion step', 'median_s'),
      'sct_separate_over_diffusion_peak_memory': ratio(sep, 'diffusion step', 'peak_bytes'),
      'sct_separate_over_diffusion_flops': ratio(sep, 'diffusion step', 'flops'),
      'jvp_over_forward_time': ratio('jvp-forward', 'forward', 'median_s'),
      'jvp_over_forward_peak_memory': ratio('jvp-forward', 'forward', 'peak_bytes'),
      'jvp_over_forward_flops': ratio('jvp-forward', 'forward', 'flops'),
  }
  info = common.device_info()
  width = config.model.get('channels', config.model.get('hidden_size'))
  print(f'\n{info["device_kind"]} x{info["device_count"]} ({info["platform"]}), model '
        f'{config.model.name} width={width}, batch {batch_size}, median of {_REPEATS.value}')
  common.print_table(rows, [('name', 'program', 's'), ('ms', 'median ms', '.2f'),
                            ('img_s', 'img/s', '.1f'), ('gflops', 'GFLOP/call', '.3g'),
                            ('peak_mb', 'peak MB', '.1f'), ('mfu', 'MFU', '.2%')])
  print('\n' + '\n'.join(f'{k}: {common.fmt(v, ".3f")}' for k, v in ratios.items()))
  if peak is None:
    print('MFU: n/a (no peak FLOP/s for this device; pass --peak_flops)')
  common.write_json(_OUT.value or common.default_out('train_step'), {
      'config': {'model': config.model.to_dict(), 'batch': batch_size, 'data': config.data.name},
      'peak_flops': peak, 'rows': rows, 'ratios': ratios})


if __name__ == '__main__':
  app.run(main)
