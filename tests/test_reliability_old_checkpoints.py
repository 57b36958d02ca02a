"""Fault class: checkpoints of an older format (infra/formats.py). Real format-1 workdirs,
written by the old code (tests/data/format1/README.md), must load for sampling with every
array in its TrainState field, be refused for resuming with the fix in one line (nothing
changed), and resume through the documented migration when asked; a meta that claims an
older or newer format than its checkpoint has is never read as that format."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scm_jax import data as data_lib
from scm_jax.errors import CheckpointError, IncompatibleCheckpointError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.infra import sharding
from scm_jax.infra.fingerprint import meta_digest
from scm_jax.train.experiment import load_experiment
from tests import helpers

FIXTURES = os.path.join(helpers.REPO, 'tests', 'data', 'format1')
# The late fixture's run (README.md), resumed to step 30.
ARGS = ['--config=configs/toy2d_sct.py', '--config.model.width=16', '--config.model.depth=1',
        '--config.model.time_embed_dim=16', '--config.model.logvar_channels=16',
        '--config.train.batch_size=16', '--config.train.num_steps=30',
        '--config.train.ckpt_every=10', '--config.train.log_every=10',
        '--config.train.sample_every=0', '--config.train.progress_bar=False',
        '--config.data.num_train=256', '--config.data.prefetch=0']


def _copy(name, tmp_path):
  workdir = str(tmp_path / name)
  shutil.copytree(os.path.join(FIXTURES, name), workdir)
  return workdir


def _train(workdir, *extra):
  return subprocess.run([sys.executable, '-m', 'scm_jax.train', f'--workdir={workdir}', *ARGS,
                         *extra], cwd=helpers.REPO, env=helpers.env(), capture_output=True,
                        text=True, timeout=600)


@pytest.mark.parametrize('name', ['early', 'late'])
def test_format1_loads_for_sampling_with_every_array_where_it_was(tmp_path, name):
  workdir = _copy(name, tmp_path)
  _, state = load_experiment(workdir)
  # What Orbax itself reads from the state item, with no scm_jax code in between.
  raw = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '20', 'state'))
  assert int(state.step) == int(raw['step']) == 20
  assert set(raw) == {'step', 'params', 'ema', 'opt_state', 'rng', 'nonfinite_total',
                      'nonfinite_streak'}
  flat = lambda tree: {sharding.path_str(p): x for p, x in  # noqa: E731
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  for field, tree in raw.items():
    got, want = flat(jax.device_get(getattr(state, field))), flat(tree)
    assert sorted(got) == sorted(want), field
    for path, x in got.items():
      np.testing.assert_array_equal(np.asarray(x), np.asarray(want[path]), err_msg=path)
  assert np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])).all()


def test_format1_resume_is_refused_in_one_line_and_nothing_changes(tmp_path):
  workdir = _copy('late', tmp_path)
  before = helpers.tree_digest(workdir)
  p = _train(workdir)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-3000:]
  assert lines[-1].startswith('error: checkpoint step 20 in ') and \
      'older scm_jax (format 1)' in lines[-1] and \
      '--config.train.resume_old_format=True' in lines[-1], p.stderr[-3000:]
  after = helpers.tree_digest(workdir)
  after.pop('lock', None)  # the workdir lock, released
  assert after == before
  # The earliest format (no checksums) takes the same path (in-process: the run's config).
  early = _copy('early', tmp_path)
  exp, _ = load_experiment(early)
  ckpt = ckpt_lib.Checkpointer(early)
  try:
    with pytest.raises(IncompatibleCheckpointError, match='resume_old_format=True'):
      ckpt.restore_latest(exp.abstract_state, lambda *a: None,
                          data=data_lib.make_stream(exp.source, 16, 0, prefetch=0))
  finally:
    ckpt.close()
  assert sorted(os.listdir(early)) == ['checkpoints', 'config.json', 'metrics.jsonl']


@pytest.fixture(scope='module')
def migrated(tmp_path_factory):
  """The late fixture resumed to step 30 with the migration."""
  workdir = _copy('late', tmp_path_factory.mktemp('migrated'))
  old = helpers.tree_digest(os.path.join(workdir, 'checkpoints', '20'))
  p = _train(workdir, '--config.train.resume_old_format=True')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'resumed from step 20' in p.stderr and 'format-1 checkpoint migrated' in p.stderr
  assert helpers.tree_digest(os.path.join(workdir, 'checkpoints', '20')) == old
  return workdir


def test_format1_migration_resumes_from_its_state_after_as_many_batches(migrated):
  state, meta = helpers.final_state(migrated)
  assert int(state.step) == 30 and meta['format_version'] == ckpt_lib.FORMAT_VERSION
  assert helpers.saved_stream_step(migrated, 30) == 30
  # The same as 10 steps from the format-1 state (with the run's config, now in
  # config.json) on the stream after 20 batches.
  exp, start = load_experiment(migrated, step=20)
  stream = exp.data_stream(prefetch=0)
  stream.set_state(stream.state_at(20))
  expected, _ = exp.train(start, 10, stream)
  helpers.assert_states_equal(state, jax.device_get(expected))


def _edit_meta(workdir, step, **fields):
  path = os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')
  meta = dict(json.load(open(path)), **fields)
  meta['digest'] = meta_digest(meta)
  json.dump(meta, open(path, 'w'))


def test_meta_claiming_another_format_is_never_read_as_it(migrated, tmp_path):
  workdir = str(tmp_path / 'w')
  shutil.copytree(migrated, workdir)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    _edit_meta(workdir, 30, format_version=3)
    with pytest.raises(IncompatibleCheckpointError, match=r'newer scm_jax \(format 3 > 2\)'):
      ckpt.restore(30, None, lambda *a: None)
    _edit_meta(workdir, 30, format_version=1)  # would skip the data item and its digests
    with pytest.raises(CheckpointError, match='claims format 1 but the checkpoint has '
                       'format-2 parts'):
      ckpt.read_meta(30)
  finally:
    ckpt.close()


def _points(n=100):
  x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
  return data_lib.ArraySource(x, np.zeros(n, np.int32), name='points', num_classes=0)


@pytest.mark.parametrize('workers,processes,index,batch,step', [
    (0, 1, 0, 8, 29),   # crosses epochs of 100 records
    (0, 2, 1, 8, 13),   # process 1 of 2
    pytest.param(2, 1, 0, 8, 7, marks=pytest.mark.slow),    # grain worker processes
    pytest.param(3, 2, 1, 4, 11, marks=pytest.mark.slow),
])
def test_stream_state_at_equals_the_stream_after_reading_as_many_batches(
    workers, processes, index, batch, step):
  make = lambda: data_lib.make_stream(  # noqa: E731
      _points(), batch, 3, process_index=index, process_count=processes,
      worker_count=workers, prefetch=0)
  read, placed = make(), make()
  try:
    for _ in range(step):
      next(read)
    placed.set_state(placed.state_at(step))
    assert json.loads(placed.get_state()) == json.loads(read.get_state())
    for _ in range(5):
      np.testing.assert_array_equal(next(placed)['x'], next(read)['x'])
  finally:
    read.close()
    placed.close()
