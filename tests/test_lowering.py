"""GPU/TPU lowering on this CPU machine (scm_jax.train.lowering): the sharded sCT and sCD
train steps and the 2-step sampler of EDM2 and DiT, lowered for CUDA and TPU over 8 host
devices, so that a lowering error of another platform fails here. The axes (model,
loss, attention kernel, dtype, remat, microbatches) are covered pairwise in CI, the
full product is slow."""

import itertools
import json
import subprocess
import sys

import pytest

from tests import helpers

AXES = {
    'attn': ('xla', 'flash', 'pallas'),
    'model': ('edm2', 'dit'),
    'loss': ('sct', 'scd'),
    'dtype': ('float32', 'bfloat16'),
    'remat': ('none', 'full'),
    'micro': (1, 2),
}
# Every pair of values of any two axes appears in some row (8 rows: the fewest possible,
# since each attention kernel must meet both values of five binary axes).
ROWS = [dict(zip(AXES, r)) for r in (
    ('pallas', 'dit', 'sct', 'float32', 'full', 1),
    ('flash', 'dit', 'scd', 'float32', 'none', 2),
    ('pallas', 'edm2', 'scd', 'float32', 'none', 2),
    ('xla', 'dit', 'scd', 'bfloat16', 'full', 2),
    ('flash', 'edm2', 'sct', 'bfloat16', 'full', 1),
    ('xla', 'dit', 'sct', 'bfloat16', 'none', 1),
    ('xla', 'edm2', 'sct', 'float32', 'none', 2),
    ('pallas', 'edm2', 'scd', 'bfloat16', 'full', 1),
)]
ALL_ROWS = [dict(zip(AXES, r)) for r in itertools.product(*AXES.values())]


def _name(row) -> str:
  return '-'.join(str(v) for v in row.values())


def row_config(row):
  """A tiny recipe of `row` on 8 devices: DiT on data=2 x fsdp=2 x tensor=2 with its
  tensor-parallel rules, EDM2 on data=4 x fsdp=2; FSDP for the rest."""
  from scm_jax.config import base_config
  from scm_jax.models import dit
  c = base_config(row['model'])
  if row['model'] == 'dit':
    c.model.update(dict(patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=16,
                        attn_block_size=16, attn_block_q=16))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    c.sharding.rules = dit.tensor_parallel_rules()
  else:
    c.model.update(dict(channels=16, channel_mult=(1, 2), num_blocks=1,
                        attn_resolutions=(4,), channels_per_head=8))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 2, 1
  c.model.update(dict(num_classes=10, logvar_channels=16, attn_impl=row['attn'],
                      dtype=row['dtype'], remat=row['remat']))
  c.data.expected_shape = (8, 8, 4)
  c.loss.kind = row['loss']
  c.loss.label_dropout = 0.1
  c.train.batch_size, c.train.microbatches = 16, row['micro']
  c.sharding.strategy, c.sharding.fsdp_min_size = 'fsdp', 16
  return c


_SCRIPT = '''
import json, sys
import jax
from scm_jax.train import lowering
from tests.test_lowering import row_config
rows, out, broken = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == '1'
assert jax.device_count() == 8
report = {}
for row in rows:
  exp = lowering.synthetic_experiment(row_config(row))
  report['-'.join(str(v) for v in row.values())] = [
      r.__dict__ | {'kernels': r.kernels}
      for r in lowering.check(exp, ('cuda', 'tpu'), ('train_step', 'sampler'))]
if broken:
  # A deliberately CPU-only operation (a primitive with a CPU lowering rule alone) in
  # the train step: CUDA and TPU lowering must fail, CPU lowering must not.
  import jax.extend as jex
  from jax.interpreters import mlir
  from scm_jax.train import step
  cpu_only_p = jex.core.Primitive('cpu_only_op')
  cpu_only_p.def_abstract_eval(lambda x: x)
  mlir.register_lowering(cpu_only_p, lambda ctx, x: [x], platform='cpu')
  finite = step.all_finite
  step.all_finite = lambda tree: cpu_only_p.bind(finite(tree))
  exp = lowering.synthetic_experiment(row_config(rows[0]))
  report['broken'] = [r.__dict__ for r in lowering.check(exp, ('cpu', 'cuda', 'tpu'),
                                                          ('train_step',))]
with open(out, 'w') as f:
  json.dump(report, f)
'''


def _lower(rows, tmp_path, broken=False) -> dict:
  out = tmp_path / 'lowered.json'
  p = subprocess.run([sys.executable, '-c', _SCRIPT, json.dumps(rows), str(out),
                      '1' if broken else '0'], cwd=helpers.REPO, env=helpers.env(8),
                     capture_output=True, text=True, timeout=3000)
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.fixture(scope='module')
def lowered(tmp_path_factory):
  return _lower(ROWS, tmp_path_factory.mktemp('lowering'), broken=True)


def test_rows_cover_every_pair_of_axis_values():
  names = list(AXES)
  for a, b in itertools.combinations(names, 2):
    seen = {(r[a], r[b]) for r in ROWS}
    assert seen == set(itertools.product(AXES[a], AXES[b])), (a, b)


def _check_row(row, results):
  assert [(r['program'], r['platform']) for r in results] == [
      ('train_step', 'cuda'), ('train_step', 'tpu'), ('sampler', 'cuda'), ('sampler', 'tpu')]
  for r in results:
    assert r['ok'], (r['program'], r['platform'], r['error'])
    assert r['devices'] == 8               # the sharded programs, over the whole mesh
    # The Pallas tangent (only the train step's jvp has one) lowers through Triton on
    # CUDA and Mosaic on TPU; the other kernels lower to plain XLA.
    assert r['kernels'] == (row['attn'] == 'pallas' and r['program'] == 'train_step'), r


@pytest.mark.parametrize('row', ROWS, ids=_name)
def test_train_step_and_sampler_lower_for_cuda_and_tpu(lowered, row):
  _check_row(row, lowered[_name(row)])


def test_a_cpu_only_op_fails_cuda_and_tpu_lowering(lowered):
  cpu, cuda, tpu = lowered['broken']
  assert cpu['ok'] and not cuda['ok'] and not tpu['ok']
  for r in (cuda, tpu):
    assert 'cpu_only_op' in r['error'] and r['platform'] in r['error'], r['error']


def test_check_lowering_cli():
  p = helpers.run_module('scm_jax.check_lowering', '--config=configs/toy2d_sct.py',
                         '--config.train.batch_size=16', '--config.model.width=16',
                         '--devices=4', '--platforms=cuda,tpu')
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in p.stdout
  for program in ('train_step', 'sampler'):
    for platform in ('cuda', 'tpu'):
      assert f'| {program} | {platform} | yes | 4 | no |' in p.stdout, p.stdout
  assert '| generator | tpu | yes | 1 | no |' in p.stdout


@pytest.mark.slow
def test_full_product_lowers_for_cuda_and_tpu(tmp_path):
  report = _lower(ALL_ROWS, tmp_path)
  failed = []
  for row in ALL_ROWS:
    try:
      _check_row(row, report[_name(row)])
    except AssertionError as e:
      failed.append(f'{_name(row)}: {e}')
  assert not failed, '\n'.join(failed)
