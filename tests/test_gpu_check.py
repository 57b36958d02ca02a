"""benchmarks/gpu_check.py: the one-command GPU check, run with --smoke on CPU."""

import json
import os

import pytest

from benchmarks import gpu_check_sections as sections
from tests import helpers

GIB = 2 ** 30


def test_microbatch_search_arithmetic():
  """Compiled peak(b) = 10 + 1.5 b GiB, limit 80 GiB (95%: 76): the one-point guess
  (temporaries 2 + b GiB, one 2 GiB gradient) overshoots; the line through two compiled
  points lands on the largest multiple of 8 that fits."""
  peak = lambda b: (10 + 1.5 * b) * GIB
  points = [(8, peak(8), (2 + 8) * GIB)]
  b1 = sections.next_batch(points, 80 * GIB, 2 * GIB, 256)
  assert b1 == 56                                   # 8 + (76 - 22) / 1, down to 8s
  points.append((b1, peak(b1), 0))
  assert sections.largest_fitting(points, 80 * GIB) == 8    # 94 GiB > 76
  b2 = sections.next_batch(points, 80 * GIB, 2 * GIB, 256)
  assert b2 == 40 and peak(40) <= 76 * GIB < peak(48)
  assert sections.next_batch(points, 800 * GIB, 2 * GIB, 256) == 256  # capped
  assert [sections.round_batch(b) for b in (0.5, 7.9, 15, 16, 63.9)] == [1, 7, 15, 16, 56]


def test_gpu_check_smoke(tmp_path):
  """Every section on CPU at tiny sizes, one of them with a cap too short to finish: the
  others still report, the JSON and the Markdown table are written, the capped section
  says 'timeout'."""
  out = str(tmp_path / 'check.json')
  helpers.run_module('benchmarks.gpu_check', '--smoke', f'--out={out}', '--repeats=2',
                     '--caps=ratio=1', timeout=600)
  with open(out) as f:
    report = json.load(f)
  s = report['sections']
  assert [k for k, v in s.items() if v['status'] == 'ok'] == ['env', 'attention', 'train',
                                                               'sampling', 'export']
  assert s['ratio']['status'] == 'timeout' and s['ratio']['cap_s'] == 1
  assert s['env']['platform'] == 'cpu'
  attn = s['attention']
  for name in ('fwd_xla', 'fwd_ours', 'jvp_xla', 'jvp_ours', 'jvp_flash', 'jvp_kernel_16x16',
               'grad_ours'):
    assert attn[name]['ms'] > 0 and attn[name]['rel_err'] < 1e-2, (name, attn[name])
  assert 'fwd_cudnn' not in attn                     # no cuDNN on CPU
  assert s['train']['batch'] == 2 and s['train']['step_s'] > 0
  assert s['train']['model_tflop_per_step'] > 0 and s['train']['mfu'] is None  # no CPU peak
  assert s['sampling']['throughput_f32_params']['img_s'] > 0
  assert s['sampling']['latency_f32_params']['batch'] == 1
  export = s['export']   # benchmarks/export_latency.py on the smoke model
  per_step = export['sCM 1-step exported']['nfe']    # 2 with the recipe's CFG, else 1
  for steps in (1, 2):
    exported, in_process = export[f'sCM {steps}-step exported'], export[f'sCM {steps}-step in-process']
    assert exported['nfe'] == in_process['nfe'] == steps * per_step
    assert exported['latency_ms'] > 0 and exported['img_s'] > 0 and in_process['img_s'] > 0
    assert exported['latency_speedup_vs_heun'] > 0
  assert export['teacher Heun-2 exported']['nfe'] == 3 * per_step   # EDM's Heun: 2N - 1
  md = open(os.path.splitext(out)[0] + '.md').read()
  assert '| exported 2-step, batch 1 / in-process |' in md and '| sCM 2-step exported |' in md
  assert '| MFU of the sCD step |' in md and '| ratio | timeout |' in md
  assert not [p for p in os.listdir(tmp_path) if p.endswith('.part')]


@pytest.mark.slow
def test_gpu_check_smoke_ratio_section(tmp_path):
  out = str(tmp_path / 'check.json')
  helpers.run_module('benchmarks.gpu_check', '--smoke', f'--out={out}', '--repeats=2',
                     '--sections=ratio', timeout=900)
  with open(out) as f:
    ratio = json.load(f)['sections']['ratio']
  assert ratio['status'] == 'ok', ratio
  assert ratio['sct_over_diffusion_flops'] > 1 and ratio['scd_over_diffusion_flops'] > 1
  assert ratio['sct_over_diffusion_time'] > 0
