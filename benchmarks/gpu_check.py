"""One GPU check: the 1.5B sCD step, 2-step sampling, exported generators and the attention
kernels, in <= 8 min.

    python -m benchmarks.gpu_check [--config=configs/imagenet512_scd.py[:xxl|:dit_xxl]]
        [--out=FILE.json] [--budget_s=470] [--attn_impl=pallas] [--batch=0]
    python -m benchmarks.gpu_check --smoke     # CPU, tiny sizes (tests/test_gpu_check.py)

Sections, each in its own process with a time cap (min(cap, what is left of --budget_s)),
so that a section that fails, runs out of memory or out of time costs only itself; each
writes what it measured as it goes, and the JSON and the Markdown table (FILE.md) are
rewritten after every section:
- env: device, versions, memory limit, peak FLOP/s.
- attention: forward (XLA, blockwise, cuDNN, ours = attn_impl's primal) and JVP (XLA,
  blockwise scan, ours = fused forward + Pallas tangent, the Pallas kernel alone over a
  block-size sweep) and grad times on the model's attention shape, with each variant's
  error against a float32 XLA reference (correct first, then fast).
- ratio: sCT / diffusion and sCD / diffusion step time and FLOPs at the model's width
  with --ratio_depth blocks (the ratio is per block; full depth costs minutes to compile).
- train: the sCD step of the model (bf16, a same-architecture teacher with random
  weights) at the largest per-device microbatch that fits: compiled memory at
  --probe_batch gives the per-example bytes, the prediction is compiled and checked
  against the device's limit (shrunk once if over), then timed; MFU = model FLOPs (XLA
  cost analysis of the same step with plain-XLA attention, whose FLOPs XLA can see) /
  step time / peak.
- sampling: 2-step latent sampling (no VAE decode) at batch 64 (throughput) and 1
  (latency), with the f32 master weights as `Experiment.sample` runs it and with bf16
  weights.
- export: the 1- and 2-step generators exported with scm_jax.export (program through a
  serialization round trip, f32 weights) vs in-process `Experiment.sample` vs Heun-18
  on the same network, batch 1 and 64 (benchmarks/export_latency.py).
Targets (one H100): MFU >= 40%, 2-step >= 200 img/s at batch 64, <= 30 ms at batch 1.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), '..', 'configs', 'imagenet512_scd.py:dit_xxl'),
    'Recipe of the model checked (EDM2-XXL or DiT-XXL).', lock_config=False)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny sizes (CPU, seconds): tests the plumbing.')
_OUT = flags.DEFINE_string('out', None, 'JSON path (the Markdown table goes next to it).')
_BUDGET = flags.DEFINE_float('budget_s', 470., 'Wall-clock budget of all sections.')
_CAPS = flags.DEFINE_list('caps', [], 'Per-section caps in seconds, e.g. train=240,ratio=60.')
_SECTIONS = flags.DEFINE_list('sections', ['env', 'attention', 'train', 'sampling', 'ratio',
                                           'export'],
                              'Sections to run, in order (the last gets what is left).')
_ATTN_IMPL = flags.DEFINE_string('attn_impl', 'pallas', 'model.attn_impl of the model.')
_BATCH = flags.DEFINE_integer('batch', 0, 'Train microbatch (0: the largest that fits).')
_PROBE = flags.DEFINE_integer('probe_batch', 32, 'Batch of the memory probe compile (what '
                              'is timed if no larger batch can be compiled in time).')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 256, 'Upper bound of the microbatch search.')
_MEM_GIB = flags.DEFINE_float('device_memory_gib', 0., 'Memory limit when the device '
                              'reports none (CPU); 0 = the device limit.')
_RATIO_DEPTH = flags.DEFINE_integer('ratio_depth', 4, 'Blocks of the ratio section model.')
_RATIO_BATCH = flags.DEFINE_integer('ratio_batch', 16, 'Batch of the ratio section.')
_ATTN_SHAPE = flags.DEFINE_list('attn_shape', [], 'B,L,H,D of the attention section '
                                '(default: batch 32 at the model\'s tokens and heads).')
_REPEATS = flags.DEFINE_integer('repeats', 10, 'Timed calls per program (median).')
_SECTION = flags.DEFINE_string('section', '', 'Internal: run one section in this process.')
_SECTION_OUT = flags.DEFINE_string('section_out', '', 'Internal: its JSON file.')
_SECTION_CAP = flags.DEFINE_float('section_cap_s', 0., 'Internal: its time cap.')

CAPS = {'env': 40, 'attention': 75, 'train': 200, 'sampling': 120, 'export': 150, 'ratio': 60}
SMOKE_CAPS = {'env': 60, 'attention': 120, 'ratio': 120, 'train': 120, 'sampling': 90,
              'export': 120}
TARGETS = {'train_mfu': 0.40, 'sample_img_s_b64': 200., 'sample_latency_ms_b1': 30.}


class Recorder:
  """A section's results, rewritten to its JSON file after every entry (a killed
  section leaves what it measured)."""

  def __init__(self, path: str):
    self.path, self.data = path, {}

  def __setitem__(self, key, value):
    self.data[key] = value
    if self.path:
      with open(self.path + '.tmp', 'w') as f:
        json.dump(self.data, f, indent=1, default=str)
      os.replace(self.path + '.tmp', self.path)


# ------------------------------------------------------------------ orchestration


def _caps() -> dict:
  caps = dict(SMOKE_CAPS if _SMOKE.value else CAPS)
  for item in _CAPS.value:
    name, seconds = item.split('=')
    caps[name] = float(seconds)
  return caps


def _run_section(name: str, cap: float, path: str) -> dict:
  """Runs one section in a child process (same flags) with a hard timeout."""
  argv = [a for a in sys.argv[1:] if not a.startswith(('--section', '--out'))]
  cmd = [sys.executable, '-m', 'benchmarks.gpu_check', *argv, f'--section={name}',
         f'--section_out={path}', f'--section_cap_s={cap}']
  # Most of the GPU for the microbatch search; one compilation cache for all sections
  # (the same programs recur) and for a rerun on a warm machine.
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION='0.95')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', '/tmp/scm_jax_gpu_check_cache')
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')
  if _SMOKE.value:
    env.update(JAX_PLATFORMS=env.get('JAX_PLATFORMS', 'cpu'),
               JAX_DISABLE_MOST_OPTIMIZATIONS='true')
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cap)
    status, log = ('ok' if p.returncode == 0 else 'failed'), p.stdout + p.stderr
  except subprocess.TimeoutExpired as e:
    status = 'timeout'
    log = ''.join(x.decode() if isinstance(x, bytes) else (x or '') for x in (e.stdout, e.stderr))
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  out = {'status': status, 'seconds': round(time.perf_counter() - t0, 1), 'cap_s': cap,
         **results}
  if status != 'ok':
    out['log_tail'] = log[-3000:]
  return out


def main_orchestrate():
  out = _OUT.value or common.default_out('gpu_check' + ('_smoke' if _SMOKE.value else ''))
  md_path = os.path.splitext(out)[0] + '.md'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  caps, start = _caps(), time.perf_counter()
  report = {'args': {'smoke': _SMOKE.value, 'budget_s': _BUDGET.value, 'argv': sys.argv[1:]},
            'targets': TARGETS, 'sections': {}}
  for name in _SECTIONS.value:
    left = _BUDGET.value - (time.perf_counter() - start)
    if left < 5:
      report['sections'][name] = {'status': 'skipped', 'reason': 'out of budget'}
    else:
      print(f'[gpu_check] {name}: cap {min(caps[name], left):.0f} s', flush=True)
      report['sections'][name] = _run_section(name, min(caps[name], left),
                                              f'{out}.{name}.part')
      print(f'[gpu_check] {name}: {report["sections"][name]["status"]} '
            f'({report["sections"][name]["seconds"]} s)', flush=True)
    report['total_s'] = round(time.perf_counter() - start, 1)
    with open(out, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    with open(md_path, 'w') as f:
      f.write(markdown(report))
  for name in _SECTIONS.value:
    if os.path.exists(f'{out}.{name}.part'):
      os.remove(f'{out}.{name}.part')
  print(markdown(report))
  print(f'wrote {out} and {md_path}')


def _fmt(v, spec='.3g'):
  return common.fmt(v, spec)


def markdown(report: dict) -> str:
  """The summary table against the targets, then one table per section."""
  s = report['sections']
  get = lambda sec, *keys: _dig(s.get(sec, {}), keys)
  smoke = report['args']['smoke']   # tiny sizes: no verdicts
  tick = lambda ok: '' if ok is None or smoke else ('yes' if ok else 'no')
  mfu, img_s, lat = (get('train', 'mfu'), get('sampling', 'throughput_f32_params', 'img_s'),
                     get('sampling', 'latency_f32_params', 'ms'))
  env = s.get('env', {})
  lines = [f"### gpu_check: {env.get('device_kind', '?')} ({env.get('platform', '?')}), "
           f"jax {env.get('jax', '?')}, model {get('train', 'model') or '?'}"
           f"{' (smoke)' if smoke else ''}", '',
           '| metric | value | target | met |', '|---|---|---|---|',
           f"| sCD step, microbatch {_fmt(get('train', 'batch'))} (bf16) | "
           f"{_fmt(get('train', 'step_s'))} s | | |",
           f"| MFU of the sCD step | {_fmt(mfu, '.1%')} | >= 40% | "
           f"{tick(None if mfu is None else mfu >= TARGETS['train_mfu'])} |",
           f"| peak memory (runtime / compiled / limit) | {_fmt(get('train', 'peak_gib'))} / "
           f"{_fmt(get('train', 'compiled_gib'))} / {_fmt(get('train', 'limit_gib'))} GiB | | |",
           f"| sCT / diffusion step time ({_fmt(get('ratio', 'depth'))} blocks) | "
           f"{_fmt(get('ratio', 'sct_over_diffusion_time'))} | | |",
           f"| 2-step sampling, batch {_fmt(get('sampling', 'throughput_f32_params', 'batch'))} | "
           f"{_fmt(img_s, '.1f')} img/s | >= 200 (batch 64) | "
           f"{tick(None if img_s is None else img_s >= TARGETS['sample_img_s_b64'])} |",
           f"| 2-step GFLOP per image / img/s at the bf16 peak | "
           f"{_fmt(get('sampling', 'gflop_per_image_2step'))} / "
           f"{_fmt(get('sampling', 'img_s_at_bf16_peak'), '.1f')} | | |",
           f"| 2-step sampling, batch 1 | {_fmt(lat, '.1f')} ms | <= 30 | "
           f"{tick(None if lat is None else lat <= TARGETS['sample_latency_ms_b1'])} |",
           f"| exported 2-step, batch 1 / in-process | "
           f"{_fmt(get('export', 'sCM 2-step exported', 'latency_ms'), '.1f')} / "
           f"{_fmt(get('export', 'sCM 2-step in-process', 'latency_ms'), '.1f')} ms | | |",
           f"| exported 2-step, batch 64 / in-process | "
           f"{_fmt(get('export', 'sCM 2-step exported', 'img_s'), '.1f')} / "
           f"{_fmt(get('export', 'sCM 2-step in-process', 'img_s'), '.1f')} img/s | | |",
           f"| exported 2-step vs Heun-18: latency / img/s | "
           f"{_fmt(get('export', 'sCM 2-step exported', 'latency_speedup_vs_heun'), '.1f')}x / "
           f"{_fmt(get('export', 'sCM 2-step exported', 'throughput_speedup_vs_heun'), '.1f')}x "
           f"| | |",
           f"| attention forward: ours / cuDNN | {_fmt(get('attention', 'fwd_ours', 'ms'))} / "
           f"{_fmt(get('attention', 'fwd_cudnn', 'ms'))} ms | | |",
           f"| attention JVP: Pallas / XLA | {_fmt(get('attention', 'jvp_ours', 'ms'))} / "
           f"{_fmt(get('attention', 'jvp_xla', 'ms'))} ms | | |", '',
           '| section | status | seconds | cap |', '|---|---|---|---|']
  lines += [f"| {k} | {v.get('status')} | {v.get('seconds', '')} | {v.get('cap_s', '')} |"
            for k, v in s.items()]
  rows = [(k, v) for k, v in s.get('attention', {}).items() if isinstance(v, dict) and 'ms' in v]
  if rows:
    lines += ['', f"Attention {get('attention', 'shape')} ({get('attention', 'dtype')}): median ms, "
              'nominal TFLOP/s (forward 4BHL²D, JVP 12BHL²D, grad 12BHL²D), relative error vs '
              'float32 XLA', '', '| program | ms | TFLOP/s | rel. error |', '|---|---|---|---|']
    lines += [f"| {k} | {_fmt(v['ms'])} | {_fmt(v.get('tflops'))} | {_fmt(v.get('rel_err'), '.2e')} |"
              for k, v in rows]
  rows = [(k, v) for k, v in s.get('export', {}).items() if isinstance(v, dict) and 'nfe' in v]
  if rows:
    lines += ['', 'Exported generators vs in-process sampling (median ms; img/s at batch '
              f"{rows[0][1].get('batch')})", '',
              '| program | NFE | batch-1 ms | img/s | vs in-process (latency, img/s) | '
              'vs Heun-18 (smoke: Heun-2) (latency, img/s) |', '|---|---|---|---|---|---|']
    lines += [f"| {k} | {v['nfe']} | {_fmt(v['latency_ms'])} | {_fmt(v['img_s'])} | "
              f"{_fmt(v['latency_vs_in_process'], '.2f')}, "
              f"{_fmt(v['throughput_vs_in_process'], '.2f')} | "
              f"{_fmt(v.get('latency_speedup_vs_heun'), '.1f')}x, "
              f"{_fmt(v.get('throughput_speedup_vs_heun'), '.1f')}x |" for k, v in rows]
  for sec in ('ratio', 'train', 'sampling', 'env'):
    flat = {k: v for k, v in s.get(sec, {}).items()
            if k not in ('status', 'seconds', 'cap_s', 'log_tail')}
    if flat:
      lines += ['', f'{sec}: ' + ', '.join(f'{k}={_fmt(v) if not isinstance(v, dict) else v}'
                                          for k, v in flat.items())]
  return '\n'.join(lines) + '\n'


def _dig(d, keys):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def main(argv):
  del argv
  if _SECTION.value:
    from benchmarks import gpu_check_sections
    rec = Recorder(_SECTION_OUT.value)
    gpu_check_sections.SECTIONS[_SECTION.value](rec, _section_args())
  else:
    main_orchestrate()


def _section_args():
  """The flags a section needs, as a plain namespace (sections import no flags)."""
  import types
  shape = tuple(int(x) for x in _ATTN_SHAPE.value) if _ATTN_SHAPE.value else None
  return types.SimpleNamespace(
      config=_CONFIG.value, smoke=_SMOKE.value, attn_impl=_ATTN_IMPL.value, batch=_BATCH.value,
      probe_batch=_PROBE.value, max_batch=_MAX_BATCH.value, device_memory_gib=_MEM_GIB.value,
      ratio_depth=_RATIO_DEPTH.value, ratio_batch=_RATIO_BATCH.value, attn_shape=shape,
      repeats=_REPEATS.value, deadline=time.perf_counter() + (_SECTION_CAP.value or 1e9))


if __name__ == '__main__':
  app.run(main)
