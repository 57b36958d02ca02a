"""Fault class: a checkpoint on disk is damaged or belongs to another run. Corrupted or
truncated arrays, meta or data-position files fall back to the previous step (moved
aside, nothing unpickled); the fingerprint catches any flipped bit whatever the mesh;
an incompatible checkpoint is refused with every difference listed and nothing touched."""

import glob
import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest

from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.infra import fingerprint
from scm_jax.train import workdir as workdir_lib
from scm_jax.train.experiment import Experiment
from scm_jax.train.loop import train_and_evaluate
from tests import helpers


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


FAULTS = ('bit_flip', 'truncated_array', 'truncated_meta', 'missing_state', 'garbage_meta',
          'truncated_data', 'missing_data', 'edited_meta', 'empty_meta', 'edited_data',
          'other_step')


def _edit_json(path, change):
  value = json.load(open(path))
  change(value)
  json.dump(value, open(path, 'w'))


def _inject(step_dir, fault):
  data_file = os.path.join(step_dir, 'data', 'process_0-of-1.json')
  meta_file = os.path.join(step_dir, 'meta', 'metadata')
  if fault == 'edited_meta':  # valid JSON, one value changed by hand
    _edit_json(meta_file, lambda m: m.update(num_classes=m['num_classes'] + 1))
  elif fault == 'empty_meta':  # a valid but empty meta
    open(meta_file, 'w').write('{}')
  elif fault == 'edited_data':  # the data position moved on by 100 batches, valid JSON
    _edit_json(data_file, lambda d: d.update(step=d['step'] + 100))
  elif fault == 'other_step':  # a copy of step 20's directory posing as step 30
    shutil.rmtree(step_dir)
    shutil.copytree(os.path.join(os.path.dirname(step_dir), '20'), step_dir)
  elif fault == 'bit_flip':  # silent: the arrays still load, only the fingerprint knows
    _flip_byte(_largest_array_file(step_dir))
  elif fault == 'truncated_array':
    _truncate(_largest_array_file(step_dir))
  elif fault == 'truncated_meta':
    _truncate(os.path.join(step_dir, 'meta', 'metadata'))
  elif fault == 'missing_state':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  elif fault == 'garbage_meta':
    open(os.path.join(step_dir, 'meta', 'metadata'), 'w').write('{"format_version": 2, "st')
  elif fault == 'truncated_data':
    _truncate(data_file)
  else:
    os.remove(data_file)


REASONS = {'edited_meta': 'altered after it was written',
           'empty_meta': 'lacks format_version, step, fingerprint',
           'edited_data': 'differs from the one recorded in its metadata',
           'other_step': 'is that of step 20, not of its directory 30'}


def test_corrupted_newest_checkpoint_falls_back_and_training_recovers(tmp_path, monkeypatch,
                                                                      caplog):
  """Every damage to the newest step (its arrays, its meta, its data position, or a
  directory holding another step) falls back to the previous one, moved aside."""
  source = str(tmp_path / 'run')
  c = helpers.toy_config(**{'train.num_steps': 30, 'train.ckpt_every': 10,
                            'train.keep_ckpts': 3})
  train_and_evaluate(c, source)
  good, _ = helpers.final_state(source)
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
    stream = exp.data_stream(prefetch=0)
    with caplog.at_level(logging.WARNING):
      caplog.clear()
      state, meta = ckpt.restore_latest(
          exp.abstract_state, workdir_lib.compatibility(workdir, exp.abstract_state),
          data=stream)
    ckpt.close()
    assert int(state.step) == meta['step'] == stream.step == 20, fault
    reason = [l for l in caplog.text.splitlines() if 'step 30:' in l]
    assert len(reason) == 1, (fault, caplog.text)  # the reason, in one line
    if fault in REASONS:
      assert REASONS[fault] in reason[0], (fault, reason)
    assert os.listdir(os.path.join(workdir, ckpt_lib.UNUSABLE_DIR)) == ['30'], fault  # kept
    assert not helpers.tmp_dirs(workdir), fault
  # Training goes on from step 20 and reproduces step 30 bit for bit.
  train_and_evaluate(c, workdir)
  state, _ = helpers.final_state(workdir)
  helpers.assert_states_equal(state, good)


def test_fingerprint_detects_any_single_bit_change():
  state = {'w': np.arange(12, dtype=np.float32).reshape(3, 4), 'n': np.int32(3),
           'k': np.array([1, 2], np.uint32), 'h': np.ones(5, np.float16)}
  base, finite = fingerprint.state_fingerprint(state)
  assert finite and len(base) == 4
  for name in state:
    for i in range(np.asarray(state[name]).size):
      for bit in (0, 7, np.asarray(state[name]).dtype.itemsize * 8 - 1):
        changed = {k: np.array(v, copy=True) for k, v in state.items()}
        flat = changed[name].reshape(-1).view(f'u{changed[name].dtype.itemsize}')
        flat[i] ^= np.array(1 << bit, flat.dtype)
        assert fingerprint.state_fingerprint(changed)[0] != base, (name, i, bit)
  swapped = dict(state, w=state['w'][::-1])  # same values, other places
  assert fingerprint.state_fingerprint(swapped)[0] != base
  assert not fingerprint.state_fingerprint(dict(state, w=state['w'] * np.nan))[1]


def test_fingerprint_and_restore_do_not_depend_on_the_mesh(tmp_path):
  """Saved from a data=4 x fsdp=2 mesh of 8 devices, restored onto one device."""
  helpers.run_python(f'''
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from scm_jax.infra import checkpoint as ckpt_lib, fingerprint
      from scm_jax.train import workdir as workdir_lib
      mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
      x = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
      tree = {{'w': jax.device_put(x, NamedSharding(mesh, P('data', 'fsdp'))),
               'b': jax.device_put(np.arange(6, dtype=np.int32), NamedSharding(mesh, P('fsdp')))}}
      ckpt = ckpt_lib.Checkpointer({str(tmp_path)!r})
      ckpt.save(1, tree, {{}})
      ckpt.wait()
      one = NamedSharding(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp')), P())
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), tree)
      validate = workdir_lib.compatibility({str(tmp_path)!r}, abstract)
      restored, meta = ckpt.restore(1, abstract, validate)  # checks the fingerprint
      ckpt.close()
      assert restored['w'].sharding == one
      np.testing.assert_array_equal(restored['w'], x)
      host = fingerprint.state_fingerprint(jax.device_get(tree))[0]
      assert meta['fingerprint'] == host == fingerprint.state_fingerprint(restored)[0]
      print('OK')
  ''', devices=8)


def test_incompatible_checkpoint_lists_mismatches_and_changes_nothing(tmp_path):
  workdir = str(tmp_path / 'run')
  c = helpers.toy_config(**{'train.num_steps': 10, 'train.ckpt_every': 10})
  train_and_evaluate(c, workdir)
  # Everything but the lock file, which records each run's start (infra/lock.py).
  digest = lambda: {k: v for k, v in helpers.tree_digest(workdir).items() if k != 'lock'}
  before = digest()
  wider = helpers.toy_config(**{'train.num_steps': 20, 'model.width': 48,
                                'model.time_embed_scale': 1.0})
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
  same_shapes = helpers.toy_config(**{'train.num_steps': 20, 'model.time_embed_scale': 1.0})
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as info:
    train_and_evaluate(same_shapes, workdir)
  msg = str(info.value)  # same shapes: only the config differs, which may be overridden
  assert 'vs model' not in msg and 'check_resume_config=False' in msg
  assert 'config.model.time_embed_scale: checkpoint 10.0 vs now 1.0' in msg
  other_workers = helpers.toy_config(**{'train.num_steps': 20, 'data.worker_count': 2})
  other_workers.train.check_resume_config = False  # then the data stream itself refuses
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='keep data.worker_count=0'):
    train_and_evaluate(other_workers, workdir)
  assert digest() == before  # nothing was written or moved
