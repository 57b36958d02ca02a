"""EDM2-S (the paper's network) vs the ADM-style unet_s: sCT train step at the same batch.

    python -m benchmarks.edm2_step [--resolution=16] [--batch=2] [--repeats=5]
        [--dtype=float32] [--out=FILE.json]

Both models come from configs/imagenet512_sct.py (`:s` and `:unet_s`: same data, loss,
optimizer and mesh; EDM2 config G with the sCM changes vs the U-Net alternative of
EDM2-S's widths), on synthetic 4-channel latents of --resolution (64 = ImageNet 512;
smaller keeps a CPU run short: the parameter counts do not change, the attention
resolutions 16 and 8 are kept as long as they exist). Steps are the library's jitted
`Experiment` steps, timed interleaved in one process (A B A B ...). Prints a table and
writes JSON (default benchmarks/results/edm2_step_<device>.json).
"""

import argparse

import jax
import numpy as np

from benchmarks import common
from configs import imagenet512_sct
from scm_jax import data as data_lib
from scm_jax.infra import sharding as sharding_lib
from scm_jax.train.experiment import Experiment


def _experiment(arg, args, source):
  c = imagenet512_sct.get_config(arg)
  c.model.dtype = args.dtype
  c.model.remat = 'none'
  c.train.batch_size = args.batch
  c.train.progress_bar = False
  c.data.expected_shape = (args.resolution,) * 2 + (4,)
  c.data.prefetch = 0
  c.mesh.data, c.mesh.fsdp = -1, 1
  return Experiment(c, source=source)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--resolution', type=int, default=16)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--only', default='', help="one model ('edm2_s' or 'unet_s') per process: "
                 'half the memory (two ~300M-parameter Adam states do not fit a small host)')
  p.add_argument('--out', default=None)
  args = p.parse_args()
  rng = np.random.RandomState(0)
  n = max(2 * args.batch, 8)
  source = data_lib.ArraySource(
      0.5 * rng.randn(n, args.resolution, args.resolution, 4).astype(np.float32),
      rng.randint(0, 1000, n), num_classes=1000, name='synthetic_latents')
  calls, stats, params = {}, {}, {}
  for name, arg in (('edm2_s', 's'), ('unet_s', 'unet_s')):
    if args.only and name != args.only:
      continue
    exp = _experiment(arg, args, source)
    params[name] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
    state = exp.init_state()
    batch = sharding_lib.put_batch(next(exp.data_stream(prefetch=0)), exp.mesh)
    stats[name] = common.compiled_stats(exp.jit_step, state, batch)
    calls[name] = common.stateful(exp.jit_step, state, batch)
  timings = common.time_interleaved(calls, args.repeats, args.warmup)
  rows = [{'name': k, 'params_M': params[k] / 1e6, 'ms': 1e3 * timings[k]['median_s'],
           'gflops': (stats[k]['flops'] or 0) / 1e9 or None,
           'peak_mb': stats[k]['peak_bytes'] / 2**20 if stats[k]['peak_bytes'] else None,
           **timings[k], **stats[k]} for k in calls]
  ratio = rows[0]['median_s'] / rows[1]['median_s'] if len(rows) == 2 else None
  info = common.device_info()
  print(f'\n{info["device_kind"]} x{info["device_count"]}, sCT step, batch {args.batch} of '
        f'{args.resolution}x{args.resolution}x4, {args.dtype}, median of {args.repeats}')
  common.print_table(rows, [('name', 'model', 's'), ('params_M', 'params (M)', '.1f'),
                            ('ms', 'median ms', '.1f'), ('gflops', 'GFLOP/step', '.4g'),
                            ('peak_mb', 'peak MB', '.0f')])
  if ratio:
    print(f'edm2_s / unet_s step time: {ratio:.3f}')
  suffix = f'_{args.only}' if args.only else ''
  common.write_json(args.out or common.default_out('edm2_step' + suffix),
                    {'args': vars(args), 'rows': rows, 'edm2_over_unet_time': ratio})


if __name__ == '__main__':
  main()
