"""Shared benchmark plumbing: timing, compiled memory / FLOPs, peak FLOPs, tables, JSON.

Rules every benchmark follows (so numbers mean the same on CPU, GPU and TPU):
- all ratios come from one process, one model, one batch;
- each timed call ends in `jax.block_until_ready`; `warmup` untimed calls first (compile,
  autotuning), then the median of `repeats` timed calls, the compared programs
  interleaved (A B A B ...) so load changes on a shared machine hit them alike;
- peak memory is XLA's compile-time estimate from `compiled.memory_analysis()`
  (arguments + outputs + temporaries - aliased/donated), FLOPs come from
  `compiled.cost_analysis()`;
- MFU = achieved FLOP/s / the device's peak, from the table below or --peak_flops.
"""

import json
import os
import platform
import re
import statistics
import time
from typing import Callable, Optional

import jax

# Dense peak FLOP/s per device kind (vendor datasheets). Float32 matmuls on NVIDIA
# Ampere/Hopper run as TF32 under JAX's default precision, so 'f32' there is TF32.
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': {'bf16': 989e12, 'f32': 495e12},
    'NVIDIA H100 PCIe': {'bf16': 756e12, 'f32': 378e12},
    'NVIDIA H200': {'bf16': 989e12, 'f32': 495e12},
    'NVIDIA A100-SXM4-80GB': {'bf16': 312e12, 'f32': 156e12},
    'NVIDIA A100-SXM4-40GB': {'bf16': 312e12, 'f32': 156e12},
    'TPU v4': {'bf16': 275e12, 'f32': 275e12},
    'TPU v5 lite': {'bf16': 197e12, 'f32': 197e12},
    'TPU v5': {'bf16': 459e12, 'f32': 459e12},
    'TPU v6 lite': {'bf16': 918e12, 'f32': 918e12},
}


def device_info() -> dict:
  d = jax.devices()[0]
  return {'platform': d.platform, 'device_kind': d.device_kind, 'device_count': jax.device_count(),
          'jax': jax.__version__, 'host': platform.processor() or platform.machine(),
          'cpu_count': os.cpu_count()}


def peak_flops(dtype: str = 'f32', override: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of all local devices, or None when unknown (CPU: pass --peak_flops)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peaks[dtype] * jax.local_device_count()
  return None


def _stats(times: list[float]) -> dict:
  return {'median_s': statistics.median(times), 'min_s': min(times), 'repeats': len(times)}


def time_fn(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> dict:
  """Median / min wall time of fn(*args) in seconds, blocking on the result each call."""
  return time_interleaved({'fn': lambda: fn(*args)}, repeats, warmup)['fn']


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 10,
                     warmup: int = 2) -> dict[str, dict]:
  """Times zero-argument callables round-robin (A B A B ...), so that load changes on a
  shared machine hit every program alike and their ratios stay fair."""
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: _stats(ts) for name, ts in times.items()}


def stateful(step: Callable, state, *args) -> Callable[[], object]:
  """A zero-argument call of state = step(state, *args)[0] (donated state threaded through)."""
  holder = [state]

  def call():
    out = step(holder[0], *args)
    holder[0] = out[0] if isinstance(out, tuple) else out
    return out
  return call


def compiled_stats(jitted: Callable, *args) -> dict:
  """FLOPs and memory of the compiled program for these arguments (no execution)."""
  compiled = jitted.lower(*args).compile()
  out = {'flops': None, 'bytes_accessed': None, 'peak_bytes': None}
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if cost:
    out['flops'] = float(cost.get('flops', 0.0)) or None
    out['bytes_accessed'] = float(cost.get('bytes accessed', 0.0)) or None
  mem = compiled.memory_analysis()
  if mem is not None:
    out.update(argument_bytes=int(mem.argument_size_in_bytes),
               output_bytes=int(mem.output_size_in_bytes),
               temp_bytes=int(mem.temp_size_in_bytes),
               alias_bytes=int(mem.alias_size_in_bytes))
    out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                         - out['alias_bytes'])
  return out


def mfu(flops: Optional[float], seconds: float, peak: Optional[float]) -> Optional[float]:
  if not flops or not peak:
    return None
  return flops / seconds / peak


def fmt(v, spec: str = '.4g') -> str:
  if v is None:
    return 'n/a'
  return format(v, spec) if isinstance(v, (int, float)) else str(v)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
  """columns: (key, header, format spec). Returns the table as Markdown and prints it."""
  header = '| ' + ' | '.join(h for _, h, _ in columns) + ' |'
  sep = '|' + '|'.join('---' for _ in columns) + '|'
  lines = [header, sep]
  for r in rows:
    lines.append('| ' + ' | '.join(fmt(r.get(k), s) for k, _, s in columns) + ' |')
  text = '\n'.join(lines)
  print(text)
  return text


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'device': device_info(), 'time': time.strftime('%Y-%m-%d %H:%M:%S'), **payload},
              f, indent=2)
  print(f'wrote {path}')


def default_out(name: str) -> str:
  kind = jax.devices()[0].device_kind.replace(' ', '_').replace('/', '_')
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', f'{name}_{kind}.json')


def latest_eval_results(workdir: str) -> dict:
  """The results of the evaluate CLI's newest checkpoint in WORKDIR/eval/metrics_<step>.json
  (other files there, e.g. caches, are not its)."""
  eval_dir = os.path.join(workdir, 'eval')
  steps = [int(m.group(1)) for f in os.listdir(eval_dir)
           if (m := re.fullmatch(r'metrics_(\d+)\.json', f))]
  with open(os.path.join(eval_dir, f'metrics_{max(steps)}.json')) as f:
    return json.load(f)['results']
