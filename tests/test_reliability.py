"""Fault injection: preemption signals, SIGKILL + resume, corrupted checkpoints, NaN steps,
incompatible checkpoints and bad inputs. Every test injects a real fault and checks what
the run did with numbers (bit-exact states, exact step counts, untouched files)."""

import glob
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from configs import toy2d_sct
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax import data as data_lib
from scm_jax.data.base import DataSource, batch_indices
from scm_jax.errors import DataError
from scm_jax.train import nonfinite
from scm_jax.train import preemption
from scm_jax.train.experiment import Experiment, load_experiment
from scm_jax.train.loop import train_and_evaluate
from tests import helpers

# A small MLP on the 2-D ring: ~300 steps/s here, so kills can land between steps.
TOY = {
    'model.width': 64, 'model.depth': 2, 'data.num_train': 4096,
    'train.batch_size': 64, 'train.num_steps': 300, 'train.ckpt_every': 100,
    'train.keep_ckpts': 2, 'train.log_every': 10, 'train.sample_every': 0,
    'train.progress_bar': False,
}


def toy_config(**overrides):
  c = toy2d_sct.get_config()
  for key, value in {**TOY, **overrides}.items():
    section, field = key.split('.')
    c[section][field] = value
  return c


def _cli_args(workdir, **overrides):
  return ([sys.executable, '-m', 'scm_jax.train', '--config=configs/toy2d_sct.py',
           f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in {**TOY, **overrides}.items()])


def _launch(workdir, **overrides) -> subprocess.Popen:
  """Starts training; its stderr goes to <workdir>.log (a pipe nobody reads could fill)."""
  with open(workdir + '.log', 'w') as log:
    return subprocess.Popen(_cli_args(workdir, **overrides), cwd=helpers.REPO,
                            env=helpers.env(), stdout=subprocess.DEVNULL, stderr=log)


def _wait_until(proc, condition, timeout=300.0, poll=0.002):
  """Polls condition() until it holds (True) or proc exits (False)."""
  end = time.time() + timeout
  while time.time() < end:
    if condition():
      return True
    if proc.poll() is not None:
      return condition()
    time.sleep(poll)
  raise AssertionError('timed out waiting for the training process')


def _logged_step(workdir) -> int:
  try:
    lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
    return json.loads(lines[-1])['step'] if lines else 0
  except (OSError, ValueError):  # absent, or a line being written
    return 0


def _tmp_dirs(workdir):
  return glob.glob(os.path.join(workdir, 'checkpoints', '*orbax-checkpoint-tmp*'))


def _finish(workdir, **overrides):
  p = subprocess.run(_cli_args(workdir, **overrides), cwd=helpers.REPO, env=helpers.env(),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def _final_state(workdir):
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  _, state = load_experiment(workdir)
  return jax.device_get(state), meta


def assert_states_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run (in this process: the CLI must agree with the library)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train_and_evaluate(toy_config(), workdir)
  return _final_state(workdir)


# -------------------------------------------------------------------- SIGKILL / SIGTERM

def test_sigkill_at_several_points_then_resume_is_bit_exact(tmp_path, reference):
  workdir = str(tmp_path / 'killed')
  saved = lambda step: os.path.exists(os.path.join(workdir, 'checkpoints', str(step)))
  # 1. While the async save of step 200 is being written (its temporary directory exists).
  p = _launch(workdir)
  assert _wait_until(p, lambda: any(d.endswith('/200.orbax-checkpoint-tmp')
                                    for d in _tmp_dirs(workdir))), open(workdir + '.log').read()
  p.kill()
  p.wait()
  caught_mid_save = bool(_tmp_dirs(workdir)) and not saved(200)
  assert saved(100)
  # 2. Between checkpoints: restarted from 100, step 200 saved, ~50 more steps done.
  p = _launch(workdir)
  assert _wait_until(p, lambda: saved(200) and _logged_step(workdir) >= 250)
  p.kill()
  p.wait()
  assert not _tmp_dirs(workdir)  # the leftover of kill 1 was removed at the next start
  log = open(workdir + '.log').read()
  assert 'resumed from step 100' in log, log[-3000:]
  # 3. Relaunch to the end: the same bits as the uninterrupted run.
  p = _finish(workdir)
  assert 'resumed from step 200' in p.stderr
  state, meta = _final_state(workdir)
  ref_state, ref_meta = reference
  assert int(state.step) == 300 and meta['data']['step'] == ref_meta['data']['step'] == 300
  assert_states_equal(state, ref_state)
  assert caught_mid_save, 'kill 1 did not land during the save (machine too slow?)'


def _interrupt(workdir, sig, first_logged):
  """Launches, sends `sig` once step `first_logged` is logged, checks the clean exit."""
  p = _launch(workdir)
  assert _wait_until(p, lambda: _logged_step(workdir) >= first_logged)
  p.send_signal(sig)
  p.wait(timeout=300)
  err = open(workdir + '.log').read()
  assert p.returncode == 128 + sig, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  line = [l for l in err.splitlines() if f'stopped by {sig.name} after step' in l]
  assert line, err[-3000:]
  stopped_at = int(line[0].split('after step ')[1].split(';')[0])
  assert stopped_at >= first_logged
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert ckpt.latest_step() == stopped_at  # saved at the step boundary, not at ckpt_every
  assert ckpt.read_meta(stopped_at)['data']['step'] == stopped_at
  return stopped_at


def test_sigterm_checkpoints_the_next_step_and_exits_cleanly(tmp_path, reference):
  workdir = str(tmp_path / 'preempted')
  _interrupt(workdir, signal.SIGTERM, 120)
  _finish(workdir)
  state, _ = _final_state(workdir)
  assert_states_equal(state, reference[0])


@pytest.mark.slow
def test_sigint_then_sigkill_at_random_moments_many_times(tmp_path, reference):
  """The exhaustive variant: Ctrl-C, then 8 SIGKILLs at random times, then finish."""
  workdir = str(tmp_path / 'chaos')
  _interrupt(workdir, signal.SIGINT, 50)
  rng = random.Random(1)
  for _ in range(8):
    p = _launch(workdir)
    time.sleep(rng.uniform(1.0, 25.0))
    p.kill()
    p.wait()
  _finish(workdir)
  state, _ = _final_state(workdir)
  assert_states_equal(state, reference[0])


def test_preemption_handler_flags_then_aborts_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionHandler() as handler:
    assert not handler.stop_requested(1, None)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.stop_requested(2, None) and handler.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGTERM) is before
  e = preemption.Preempted(7, signal.SIGTERM, '/w')
  assert e.exit_code == 143 and 'after step 7' in str(e)
  with preemption.PreemptionHandler(enabled=False):
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------ checkpoint validation

def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_byte(path):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x10
  open(path, 'wb').write(bytes(data))


def _truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


def _no_pickle(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('something was unpickled')
  monkeypatch.setattr(pickle, 'load', refuse)
  monkeypatch.setattr(pickle, 'loads', refuse)
  monkeypatch.setattr(pickle, 'Unpickler', refuse)


FAULTS = ('bit_flip', 'truncated_array', 'truncated_meta', 'missing_state', 'garbage_meta')


def _inject(step_dir, fault):
  if fault == 'bit_flip':  # silent: the arrays still load, only the fingerprint knows
    _flip_byte(_largest_array_file(step_dir))
  elif fault == 'truncated_array':
    _truncate(_largest_array_file(step_dir))
  elif fault == 'truncated_meta':
    _truncate(os.path.join(step_dir, 'meta', 'metadata'))
  elif fault == 'missing_state':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  else:
    open(os.path.join(step_dir, 'meta', 'metadata'), 'w').write('{"format_version": 1, "st')


def test_corrupted_newest_checkpoint_falls_back_and_training_recovers(tmp_path, monkeypatch):
  source = str(tmp_path / 'run')
  c = toy_config(**{'train.num_steps': 30, 'train.ckpt_every': 10, 'train.keep_ckpts': 3})
  train_and_evaluate(c, source)
  good, _ = _final_state(source)
  exp = Experiment(c)
  _no_pickle(monkeypatch)  # checkpoints load without unpickling anything
  for fault in FAULTS:
    workdir = str(tmp_path / fault)
    shutil.copytree(source, workdir)
    _inject(os.path.join(workdir, 'checkpoints', '30'), fault)
    # A crash in the middle of a later save leaves a temporary directory behind.
    shutil.copytree(os.path.join(workdir, 'checkpoints', '20'),
                    os.path.join(workdir, 'checkpoints', '40.orbax-checkpoint-tmp'))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=3)
    state, meta = ckpt.restore_latest(exp.abstract_state)
    ckpt.close()
    assert int(state.step) == 20 and meta['data']['step'] == 20, fault
    assert os.listdir(os.path.join(workdir, ckpt_lib.UNUSABLE_DIR)) == ['30'], fault  # kept
    assert not _tmp_dirs(workdir), fault
  # Training goes on from step 20 and reproduces step 30 bit for bit.
  train_and_evaluate(c, workdir)
  state, _ = _final_state(workdir)
  assert_states_equal(state, good)


def test_fingerprint_detects_any_single_bit_change():
  state = {'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'n': np.int32(3),
           'k': np.array([1, 2], np.uint32), 'h': np.ones(5, np.float16)}
  base, finite = ckpt_lib.state_fingerprint(state)
  assert finite and len(base) == 4
  for name in state:
    for i in range(np.asarray(state[name]).size):
      for bit in (0, 7, np.asarray(state[name]).dtype.itemsize * 8 - 1):
        changed = {k: np.array(v, copy=True) for k, v in state.items()}
        flat = changed[name].reshape(-1).view(f'u{changed[name].dtype.itemsize}')
        flat[i] ^= np.array(1 << bit, flat.dtype)
        assert ckpt_lib.state_fingerprint(changed)[0] != base, (name, i, bit)
  swapped = dict(state, w=state['w'][::-1])  # same values, other places
  assert ckpt_lib.state_fingerprint(swapped)[0] != base
  assert not ckpt_lib.state_fingerprint(dict(state, w=state['w'] * np.nan))[1]


def test_fingerprint_and_restore_do_not_depend_on_the_mesh(tmp_path):
  """Saved from a data=4 x fsdp=2 mesh of 8 devices, restored onto one device."""
  helpers.run_python(f'''
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from scm_jax.infra import checkpoint as ckpt_lib
      mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
      x = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
      tree = {{'w': jax.device_put(x, NamedSharding(mesh, P('data', 'fsdp'))),
               'b': jax.device_put(np.arange(6, dtype=np.int32), NamedSharding(mesh, P('fsdp')))}}
      ckpt = ckpt_lib.Checkpointer({str(tmp_path)!r})
      ckpt.save(1, tree, {{}})
      ckpt.wait()
      one = NamedSharding(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp')), P())
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), tree)
      restored, meta = ckpt.restore(1, abstract)  # checks the fingerprint
      ckpt.close()
      assert restored['w'].sharding == one
      np.testing.assert_array_equal(restored['w'], x)
      host = ckpt_lib.state_fingerprint(jax.device_get(tree))[0]
      assert meta['fingerprint'] == host == ckpt_lib.state_fingerprint(restored)[0]
      print('OK')
  ''', devices=8)


def test_incompatible_checkpoint_lists_mismatches_and_changes_nothing(tmp_path):
  workdir = str(tmp_path / 'run')
  c = toy_config(**{'train.num_steps': 10, 'train.ckpt_every': 10})
  train_and_evaluate(c, workdir)
  before = helpers.tree_digest(workdir)
  wider = toy_config(**{'train.num_steps': 20, 'model.width': 48, 'model.time_embed_scale': 1.0})
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as info:
    train_and_evaluate(wider, workdir)
  msg = str(info.value)
  assert 'does not match this run' in msg and 'No checkpoint was changed' in msg
  assert 'params/block0/dense0/kernel: checkpoint (64, 64) vs model (48, 48)' in msg
  assert 'config.model.width: checkpoint 64 vs now 48' in msg
  assert 'config.model.time_embed_scale: checkpoint 10.0 vs now 1.0' in msg
  wider.train.check_resume_config = False  # the shape check still refuses
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as info:
    train_and_evaluate(wider, workdir)
  assert 'params/block0/dense0/kernel: checkpoint (64, 64) vs model (48, 48)' in str(info.value)
  same_shapes = toy_config(**{'train.num_steps': 20, 'model.time_embed_scale': 1.0})
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as info:
    train_and_evaluate(same_shapes, workdir)
  msg = str(info.value)  # same shapes: only the config differs, which may be overridden
  assert 'vs model' not in msg and 'check_resume_config=False' in msg
  assert 'config.model.time_embed_scale: checkpoint 10.0 vs now 1.0' in msg
  assert helpers.tree_digest(workdir) == before  # nothing was written or moved


# ---------------------------------------------------------------------- non-finite steps

class NanExamples(DataSource):
  """A source with some corrupted (NaN) examples, as a bad shard of a custom dataset."""

  def __init__(self, base, bad):
    self.base, self.bad = base, np.asarray(sorted(bad))
    self.shape, self.num_classes, self.name = base.shape, base.num_classes, 'nan-examples'

  def __len__(self):
    return len(self.base)

  def get(self, indices):
    batch = self.base.get(indices)
    x = batch['x'].copy()
    x[np.isin(indices, self.bad)] = np.nan
    return dict(batch, x=x)


def nan_source(c, bad_batches):
  """Poisons one example of each of the given (0-based) batches of the stream."""
  base = data_lib.build_source(c.data, 'train')
  bad = [batch_indices(b, len(base), c.train.batch_size, c.seed)[0] for b in bad_batches]
  return NanExamples(base, bad)


def _nan_config(**overrides):
  return toy_config(**{'train.num_steps': 30, 'train.ckpt_every': 10, 'train.log_every': 5,
                       'train.max_nonfinite_streak': 4, 'train.keep_ckpts': 5, **overrides})


def test_nan_streak_stops_at_the_exact_step(tmp_path):
  c = _nan_config()
  workdir = str(tmp_path / 'run')
  source = nan_source(c, range(12, 21))  # steps 13..21 see a NaN example
  with pytest.raises(nonfinite.NonFiniteError) as info:
    train_and_evaluate(c, workdir, source=source)
  msg = str(info.value)
  assert msg.startswith('training stopped at step 16: steps 13..16 (4 in a row')
  assert 'loss=nan' in msg and 'those of step 12' in msg
  assert ckpt_lib.Checkpointer(workdir, read_only=True).steps() == [10]
  logs = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [(l['step'], l['nonfinite_total']) for l in logs] == [(5, 0), (10, 0), (15, 3)]
  assert [l['skipped'] for l in logs] == pytest.approx([0, 0, 3 / 5])


def test_nan_rollback_skips_bad_batches_and_resumes_exactly(tmp_path):
  c = _nan_config(**{'train.nonfinite_action': 'rollback', 'train.ckpt_every': 7})
  # Batches 12..20 are poisoned: steps 13..16 fail -> back to step 7, data from batch 16;
  # steps 8..11 (batches 16..19) fail -> back to 7 again, data from batch 20 (one bad).
  source = nan_source(c, range(12, 21))
  straight = str(tmp_path / 'straight')
  state = jax.device_get(train_and_evaluate(c, straight, source=source).state)
  _, meta = _final_state(straight)
  assert meta['nonfinite_rollbacks'] == [
      {'failed_step': 16, 'restored_step': 7, 'data_step': 16},
      {'failed_step': 11, 'restored_step': 7, 'data_step': 20}]
  assert meta['data']['step'] == 30 + 13 and int(state.step) == 30
  assert int(state.nonfinite_total) == 9 and int(state.nonfinite_streak) == 0
  # The step-14 checkpoint (saved mid-streak) was moved aside, not deleted.
  assert os.listdir(os.path.join(straight, ckpt_lib.ROLLED_BACK_DIR)) == ['14']
  # The same numbers by hand: the step-7 state, re-keyed, on batches 20, 21, ...
  exp = Experiment(c, source=source)
  manual, _ = ckpt_lib.Checkpointer(straight, read_only=True).restore(7, exp.abstract_state)
  manual = manual.replace(rng=nonfinite.rekey(manual.rng, 1),  # the 2nd rollback's key
                          nonfinite_total=np.int32(8))
  manual = jax.device_put(manual, exp.state_shardings)
  it = exp.iterator(20, prefetch=0)
  for _ in range(23):
    manual, _ = exp.step(manual, next(it))
  assert_states_equal(jax.device_get(manual), state)
  # Resuming from the step-21 checkpoint (after both rollbacks) gives the same run.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed)
  for step in ('28', '30'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  assert_states_equal(jax.device_get(train_and_evaluate(c, resumed, source=source).state), state)


def test_rollbacks_that_do_not_help_stop_with_a_message(tmp_path):
  c = _nan_config(**{'train.nonfinite_action': 'rollback', 'train.max_rollbacks': 1})
  with pytest.raises(nonfinite.NonFiniteError, match=r'at step 14 after 1 rollback\(s\) that '
                     r'did not get past step 16'):
    train_and_evaluate(c, str(tmp_path / 'run'), source=nan_source(c, range(12, 30)))


def test_guard_checks_each_step_one_step_late_or_at_once():
  c = toy_config(**{'train.max_nonfinite_streak': 2})
  fake = type('State', (), {'nonfinite_streak': np.int32(0), 'nonfinite_total': np.int32(0)})()
  guard = nonfinite.NonfiniteGuard(c.train, fake)
  m = lambda s: {'skipped': np.float32(s), 'loss': np.float32(np.nan if s else 1.0)}
  assert guard.check(1, m(1)) is None      # step 1 is only looked at with step 2
  assert guard.streak == 0
  with pytest.raises(nonfinite.NonFiniteError, match='at step 2: steps 1..2'):
    guard.check(2, m(1), sync=True)
  guard = nonfinite.NonfiniteGuard(c.train, fake)
  guard.check(1, m(1))
  guard.check(2, m(1))
  with pytest.raises(nonfinite.NonFiniteError, match='at step 2:'):
    guard.check(3, m(0))                   # fires for step 2 while step 3 runs
  assert guard.total == 2


# -------------------------------------------------------------------------- bad inputs

def test_sixteen_bit_and_truncated_images_are_rejected_with_the_file(tmp_path):
  root = tmp_path / 'imgs'
  root.mkdir()
  Image.new('RGB', (4, 4), (10, 20, 30)).save(root / 'a.png')
  Image.fromarray((np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)).save(root / 'b16.png')
  Image.new('RGB', (64, 64), (1, 2, 3)).save(root / 'c.png')
  data = open(root / 'c.png', 'rb').read()
  open(root / 'c.png', 'wb').write(data[:len(data) // 2])
  config = data_lib.default_data_config()
  config.update(name='folder', path=str(root), image_size=4)
  source = data_lib.build_source(config, 'train')
  np.testing.assert_allclose(source.get(np.array([0]))['x'][0, 0, 0],
                             np.array([10, 20, 30]) / 127.5 - 1, rtol=1e-6)
  with pytest.raises(DataError, match=r'b16\.png has I;16 pixels.*8-bit'):
    source.get(np.array([1]))
  with pytest.raises(DataError, match=r'c\.png \(corrupt'):
    source.get(np.array([2]))


class _Custom(DataSource):
  def __init__(self, x, labels, num_classes=0):
    self.x, self.labels, self.num_classes = x, labels, num_classes
    self.shape, self.name = (2,), 'custom'

  def __len__(self):
    return 8

  def get(self, indices):
    return {'x': self.x[:len(indices)], 'label': self.labels[:len(indices)]}


@pytest.mark.parametrize('x,labels,classes,match', [
    (np.zeros((4, 3), np.float32), np.zeros(4, np.int32), 0, r'shape \(4, 3\), expected'),
    (np.zeros((4, 2), np.float64), np.zeros(4, np.int32), 0, 'dtype float64'),
    (np.zeros((4, 2), np.float32), np.zeros(4, np.float32), 0, 'integer array'),
    (np.zeros((4, 2), np.float32), np.full(4, 5, np.int32), 3, '3 classes'),
])
def test_custom_source_batches_are_checked(x, labels, classes, match):
  it = data_lib.BatchIterator(_Custom(x, labels, classes), 4, 0, prefetch=1)
  with pytest.raises(DataError, match=f"'custom', batch 0: .*{match}"):
    next(it)
  it.close()


def test_array_file_with_nan_fails_the_cli_in_one_line(tmp_path):
  x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
  x[17, 1] = np.nan
  path = str(tmp_path / 'points.npz')
  np.savez(path, x=x)
  p = helpers.run_module('scm_jax.train', *_cli_args(str(tmp_path / 'w'), **{
      'data.name': 'array', 'data.path': path})[2:], check=False)
  assert p.returncode == 2 and 'Traceback' not in p.stderr
  assert p.stderr.strip().splitlines()[-1] == f'error: Array file {path} contains NaN or Inf values.'
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')
