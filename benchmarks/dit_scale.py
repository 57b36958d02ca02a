"""DiT at scale: parameters, sCM train-step time / compiled memory / FLOPs, 2-step sampling.

  # CPU (the numbers in benchmarks/RESULTS.md):
  python -m benchmarks.dit_scale --sizes=S,B --resolution=32 --batch=8 \
      --variants=xla/none,flash/full --out=benchmarks/dit_scale_cpu.json
  # One GPU, the 1.5B model in bf16 on 64x64x4 latents:
  python -m benchmarks.dit_scale --sizes=XXL --resolution=64 --batch=32 --dtype=bfloat16 \
      --variants=flash/dots_no_batch --out=benchmarks/dit_scale_gpu.json
  # Anywhere, no allocation: FLOPs per step of the 1.5B model from the lowered program.
  python -m benchmarks.dit_scale --sizes=XXL --resolution=64 --batch=1 --flops_only

Each row is one (size, attention impl / remat policy) on the same data: the real jitted,
sharded train step of `Experiment` (sCT loss: one jvp pass + one gradient pass; sCD adds
one teacher forward), timed as the median of --repeats calls after a warm-up call, with
XLA's compile-time memory estimate (arguments + outputs + temporaries - aliased) and FLOPs
(`cost_analysis`). Sampling latency is per image for a batch of --batch, 2 steps
(t_mid = 1.1), jitted. MFU = FLOPs / step time / peak (known GPUs/TPUs, or --peak_tflops).
Prints a table and writes JSON.
"""

import argparse
import json
import os
import statistics
import time


import jax
import jax.numpy as jnp
import numpy as np

from configs import imagenet512_sct
from scm_jax import data as data_lib
from scm_jax.infra import sharding
from scm_jax.train.experiment import Experiment

# Dense peak TFLOP/s per device (datasheets; float32 matmuls run as TF32 on A100/H100).
PEAK_TFLOPS = {'H100': {'bfloat16': 989, 'float32': 495},
               'A100': {'bfloat16': 312, 'float32': 156},
               'TPU v4': {'bfloat16': 275, 'float32': 275},
               'TPU v5': {'bfloat16': 459, 'float32': 459}}


def _config(size, args, impl, remat):
  c = imagenet512_sct.get_config(f'dit_{size.lower()}')
  c.model.dtype = args.dtype
  c.model.attn_impl = impl
  c.model.remat = remat
  c.loss.kind = 'sct'
  c.train.batch_size = args.batch
  c.data.expected_shape = (args.resolution, args.resolution, 4)
  c.data.prefetch = 0
  c.ema.sigma_rels = (0.05,)
  return c


def _source(args):
  rng = np.random.RandomState(0)
  n = max(2 * args.batch, 16)
  x = 0.5 * rng.randn(n, args.resolution, args.resolution, 4).astype(np.float32)
  return data_lib.ArraySource(x, rng.randint(0, 1000, n), num_classes=1000,
                              name='synthetic_latents')


def _flops(compiled_or_lowered) -> float:
  cost = compiled_or_lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def _peak(args):
  if args.peak_tflops:
    return args.peak_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name in kind:
      return peaks[args.dtype] * 1e12 * jax.device_count()
  return None


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_one(size, impl, remat, args, sample_too=True):
  c = _config(size, args, impl, remat)
  exp = Experiment(c, source=_source(args))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(exp.abstract_state.params))
  row = {'size': size, 'attn_impl': impl, 'remat': remat, 'dtype': args.dtype,
         'resolution': args.resolution, 'tokens': (args.resolution // 2) ** 2,
         'batch': args.batch, 'params_M': round(n_params / 1e6, 1)}
  batch_spec = {'x': jax.ShapeDtypeStruct((args.batch,) + exp.data_shape, jnp.float32,
                                          sharding=sharding.batch_sharding(exp.mesh)),
                'label': jax.ShapeDtypeStruct((args.batch,), jnp.int32,
                                              sharding=sharding.batch_sharding(exp.mesh))}
  t0 = time.perf_counter()
  lowered = exp.jit_step.lower(exp.abstract_state, batch_spec)
  if args.flops_only:
    row['train_gflop_per_step'] = round(_flops(lowered) / 1e9, 1)
    row['lower_s'] = round(time.perf_counter() - t0, 1)
    return row
  compiled = lowered.compile()
  row['compile_s'] = round(time.perf_counter() - t0, 1)
  mem = compiled.memory_analysis()
  row['train_mem_MiB'] = round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                                + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20, 1)
  row['train_temp_MiB'] = round(mem.temp_size_in_bytes / 2**20, 1)
  flops = _flops(compiled)
  row['train_gflop_per_step'] = round(flops / 1e9, 1)

  holder = [exp.init_state()]
  batch = sharding.put_batch(next(exp.data_stream(prefetch=0)), exp.mesh)

  def step():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics['loss']
  step()  # warm-up
  row['step_s'] = round(_median_time(step, args.repeats), 3)
  peak = _peak(args)
  row['mfu'] = round(flops / row['step_s'] / peak, 3) if peak else None

  if not sample_too:
    return row
  sample = lambda: exp.sample(holder[0], num=args.batch, steps=2)
  t0 = time.perf_counter()
  sample()  # compile + first run
  row['sample_compile_s'] = round(time.perf_counter() - t0, 1)
  row['sample_2step_s_per_image'] = round(_median_time(sample, args.repeats) / args.batch, 4)
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--sizes', default='S,B', help='DiT sizes: S, B, L, XL, XXL')
  p.add_argument('--variants', default='xla/none,flash/full',
                 help='comma list of attn_impl/remat pairs')
  p.add_argument('--resolution', type=int, default=32, help='latent side (64 = ImageNet 512)')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--flops_only', action='store_true', help='lower only: params and FLOPs')
  p.add_argument('--peak_tflops', type=float, default=0.0)
  p.add_argument('--sample', default='all', choices=['all', 'first', 'none'],
                 help="time 2-step sampling for every variant, each size's first, or none")
  p.add_argument('--out', default='')
  args = p.parse_args()
  rows = []
  for size in args.sizes.split(','):
    for i, variant in enumerate(args.variants.split(',')):
      impl, remat = variant.split('/')
      sample_too = args.sample == 'all' or (args.sample == 'first' and i == 0)
      rows.append(run_one(size, impl, remat, args, sample_too))
      print(json.dumps(rows[-1]), flush=True)
      _write(args, rows)  # after every row: long runs keep what they measured
  keys = list(dict.fromkeys(k for r in rows for k in r))
  print('\n| ' + ' | '.join(keys) + ' |\n|' + '---|' * len(keys))
  for r in rows:
    print('| ' + ' | '.join(str(r.get(k, '')) for k in keys) + ' |')


def _write(args, rows):
  if not args.out:
    return
  d = jax.devices()[0]
  with open(args.out, 'w') as f:
    json.dump({'device': {'platform': d.platform, 'kind': d.device_kind,
                          'count': jax.device_count(), 'cpu_count': os.cpu_count(),
                          'load_avg_1min': os.getloadavg()[0], 'jax': jax.__version__},
               'args': vars(args), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
