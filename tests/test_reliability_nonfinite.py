"""Fault class: training produces NaN/Inf. Poisoned examples make steps non-finite; the
run stops at exactly the step where the streak reaches its limit, or rolls back to the
checkpoint before it, skips the bad batches and goes on, reproducibly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from scm_jax import data as data_lib
from scm_jax.data.base import DataSource
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.train import nonfinite
from scm_jax.train import workdir as workdir_lib
from scm_jax.train.experiment import Experiment
from scm_jax.train.loop import train_and_evaluate
from tests import helpers


class NanExamples(DataSource):
  """A source with some corrupted (NaN) records, as a bad shard of a custom dataset."""

  def __init__(self, base, bad):
    self.base, self.bad = base, set(int(i) for i in bad)
    self.shape, self.num_classes, self.name = base.shape, base.num_classes, 'nan-examples'

  def __len__(self):
    return len(self.base)

  def __getitem__(self, index):
    return index, self.base[index]

  def decode(self, record):
    index, raw = record
    example = self.base.decode(raw)
    if index in self.bad:
      example = dict(example, x=np.full_like(example['x'], np.nan))
    return example


class _Index(DataSource):
  """Record i decodes to [i, i]: a stream over it shows which records each batch holds
  (the order depends only on the number of records, the seed and the batch layout)."""

  def __init__(self, n):
    self.n, self.shape, self.num_classes, self.name = n, (2,), 0, 'index'

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return index

  def decode(self, record):
    return {'x': np.full(2, record, np.float32), 'label': np.int32(0)}


def nan_source(c, bad_batches):
  """Poisons one record of each of the given (0-based) batches of the training stream."""
  base = data_lib.build_source(c.data, 'train')
  stream = data_lib.make_stream(_Index(len(base)), c.train.batch_size, c.seed, prefetch=0)
  first = {}
  for b in range(max(bad_batches) + 1):
    first[b] = int(next(stream)['x'][0, 0])
  return NanExamples(base, [first[b] for b in bad_batches])


def _nan_config(**overrides):
  return helpers.toy_config(**{'train.num_steps': 30, 'train.ckpt_every': 10,
                               'train.log_every': 5, 'train.max_nonfinite_streak': 4,
                               'train.keep_ckpts': 5, **overrides})


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
  # The stopped run comes with the error (a sweep evaluates it): the state is one step
  # ahead of the check, and its parameters are step 12's, the last good ones.
  run = info.value.run
  assert int(run.state.step) == 17 and int(run.state.nonfinite_streak) == 5
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.state.params))


def test_nan_rollback_skips_bad_batches_and_resumes_exactly(tmp_path):
  c = _nan_config(**{'train.nonfinite_action': 'rollback', 'train.ckpt_every': 7})
  # Batches 12..20 are poisoned. Steps 13..16 fail (batches 12..15); the streak is seen
  # while step 17 runs (batch 16), so: back to step 7, the stream goes on at batch 17.
  # Steps 8..11 (batches 17..20) fail, seen during step 12 (batch 21): back to 7 again,
  # the stream at batch 22; then steps 8..30 train on batches 22..44.
  source = nan_source(c, range(12, 21))
  straight = str(tmp_path / 'straight')
  state = jax.device_get(train_and_evaluate(c, straight, source=source).state)
  _, meta = helpers.final_state(straight)
  assert meta['nonfinite_rollbacks'] == [
      {'failed_step': 16, 'restored_step': 7, 'stream_step': 17},
      {'failed_step': 11, 'restored_step': 7, 'stream_step': 22}]
  assert helpers.saved_stream_step(straight, 30) == 45 and int(state.step) == 30
  assert int(state.nonfinite_total) == 8 and int(state.nonfinite_streak) == 0
  # The step-14 checkpoint (saved mid-streak) was moved aside, not deleted.
  assert os.listdir(os.path.join(straight, ckpt_lib.ROLLED_BACK_DIR)) == ['14']
  # The same numbers by hand: the step-7 state, re-keyed, on batches 22, 23, ...
  exp = Experiment(c, source=source)
  manual, _ = ckpt_lib.Checkpointer(straight, read_only=True).restore(
      7, exp.abstract_state, workdir_lib.compatibility(straight, exp.abstract_state))
  manual = manual.replace(rng=nonfinite.rekey(manual.rng, 1),  # the 2nd rollback's key
                          nonfinite_total=np.int32(8))
  manual = jax.device_put(manual, exp.state_shardings)
  stream = exp.data_stream(prefetch=0)
  for _ in range(22):
    next(stream)
  for _ in range(23):
    manual, _ = exp.step(manual, next(stream))
  helpers.assert_states_equal(jax.device_get(manual), state)
  # Resuming from the step-21 checkpoint (after both rollbacks) gives the same run.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(straight, resumed)
  for step in ('28', '30'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  helpers.assert_states_equal(
      jax.device_get(train_and_evaluate(c, resumed, source=source).state), state)


def test_rollbacks_that_do_not_help_stop_with_a_message(tmp_path):
  c = _nan_config(**{'train.nonfinite_action': 'rollback', 'train.max_rollbacks': 1})
  with pytest.raises(nonfinite.NonFiniteError, match=r'at step 14 after 1 rollback\(s\) that '
                     r'did not get past step 16'):
    train_and_evaluate(c, str(tmp_path / 'run'), source=nan_source(c, range(12, 30)))


def test_guard_checks_each_step_one_step_late_or_at_once():
  c = helpers.toy_config(**{'train.max_nonfinite_streak': 2})
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
