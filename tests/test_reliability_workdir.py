"""Fault class: the workdir itself. A second training started on a busy workdir, a lock
left by a crash, a workdir that is a file or not writable, a disk that fills up, resumes
that replay logged steps: each gives one line (or nothing at all) and loses nothing."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from scm_jax.errors import WorkdirError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.infra import files
from scm_jax.infra import lock as lock_lib
from scm_jax.train.loop import train_and_evaluate
from tests import helpers

SHORT = {'model.width': 32, 'model.depth': 1, 'train.batch_size': 32,
         'train.ckpt_every': 10, 'train.log_every': 5, 'train.keep_ckpts': 5}


def _run(workdir, check=False, **overrides):
  p = subprocess.run(helpers.toy_cli_args(workdir, **{**SHORT, **overrides}), cwd=helpers.REPO,
                     env=helpers.env(), capture_output=True, text=True, timeout=600)
  if check:
    assert p.returncode == 0, p.stderr[-3000:]
  return p


def _one_error_line(p, *needles):
  assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
  lines = [l for l in p.stderr.splitlines() if l.strip()]
  assert 'Traceback' not in p.stderr and len(lines) <= 3, p.stderr[-3000:]
  assert lines[-1].startswith('error: '), p.stderr[-3000:]
  for n in needles:
    assert n in lines[-1], (n, lines[-1])
  return lines[-1]


def test_second_training_on_a_busy_workdir_is_refused_and_the_first_goes_on(tmp_path):
  workdir = str(tmp_path / 'run')
  first = helpers.launch_toy(workdir, **{**SHORT, 'train.num_steps': 100})
  assert helpers.wait_until(first, lambda: helpers.logged_step(workdir) >= 10)
  first.send_signal(signal.SIGSTOP)  # paused, holding the lock: it cannot finish meanwhile
  second = _run(workdir, **{'train.num_steps': 100})
  first.send_signal(signal.SIGCONT)
  line = _one_error_line(second, 'is in use by', f'pid {first.pid}', 'another --workdir')
  assert 'host ' in line
  assert first.wait(timeout=600) == 0, open(workdir + '.log').read()[-3000:]
  assert ckpt_lib.Checkpointer(workdir, read_only=True).steps()[-1] == 100
  # After a crash (SIGKILL: no clean-up at all) the lock is free again.
  crashed = helpers.launch_toy(workdir, **{**SHORT, 'train.num_steps': 300})
  assert helpers.wait_until(crashed, lambda: helpers.logged_step(workdir) >= 110)
  crashed.send_signal(signal.SIGKILL)
  crashed.wait()
  p = _run(workdir, check=True, **{'train.num_steps': 120})
  assert 'resumed from step' in p.stderr


def test_file_lock_without_flock_detects_stale_owners(tmp_path):
  """The fallback for filesystems without flock: O_EXCL file + heartbeat."""
  lock = lock_lib.WorkdirLock(str(tmp_path), use_flock=False, heartbeat_s=0.05)
  with lock:
    with pytest.raises(WorkdirError, match=f'in use by host .* pid {os.getpid()}'):
      lock_lib.WorkdirLock(str(tmp_path), use_flock=False).acquire()
    mtime = os.path.getmtime(lock.path)
    time.sleep(0.3)
    assert os.path.getmtime(lock.path) > mtime  # the heartbeat keeps it fresh
  assert not os.path.exists(lock.path)  # released
  path = os.path.join(str(tmp_path), lock_lib.LOCK_FILE)
  dead = subprocess.Popen(['true'])
  dead.wait()
  me = lock_lib.WorkdirLock(str(tmp_path), use_flock=False)
  json.dump(dict(me.owner, pid=dead.pid), open(path, 'w'))  # a crashed owner, this host
  me.acquire().release()
  json.dump(dict(me.owner, host='elsewhere', pid=1), open(path, 'w'))
  with pytest.raises(WorkdirError, match='host elsewhere pid 1'):  # alive as far as we know
    lock_lib.WorkdirLock(str(tmp_path), use_flock=False, stale_s=60).acquire()
  old = time.time() - 120
  os.utime(path, (old, old))  # ... until its heartbeat is older than stale_s
  lock_lib.WorkdirLock(str(tmp_path), use_flock=False, stale_s=60).acquire().release()


def _mount_tmpfs(path, options):
  """Mounts a tmpfs at `path` (the test is skipped where mounting is not allowed)."""
  os.makedirs(path)
  p = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
                     capture_output=True, text=True)
  if p.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here ({p.stderr.strip()})')
  return path


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('not a directory')
  _one_error_line(_run(str(path)), 'is a file, not a directory')


def test_read_only_workdir_is_one_line(tmp_path):
  if os.geteuid() != 0:  # permissions bind an ordinary user
    locked = str(tmp_path / 'locked')
    os.makedirs(locked, mode=0o555)
    reason = 'Permission denied'
  else:  # root ignores them: a read-only filesystem then
    locked = _mount_tmpfs(str(tmp_path / 'locked'), 'ro,size=1m')
    reason = 'Read-only file system'
  try:
    _one_error_line(_run(os.path.join(locked, 'run')), 'cannot write to --workdir', reason)
  finally:
    if os.geteuid() == 0:
      subprocess.run(['umount', locked], check=False)


@pytest.fixture
def small_disk(tmp_path):
  """A 2.5 MiB filesystem (tmpfs): room for two toy checkpoints, not three."""
  mount = _mount_tmpfs(str(tmp_path / 'small_disk'), 'size=2560k')
  yield mount
  subprocess.run(['umount', mount], check=False)


def test_disk_full_stops_in_one_line_and_keeps_the_previous_checkpoint(small_disk):
  workdir = os.path.join(small_disk, 'run')
  p = _run(workdir, **{'train.num_steps': 100})
  line = _one_error_line(p, 'not enough free space to save checkpoint step', 'MiB are free',
                         'is intact')
  intact = int(line.split('checkpoint step ')[-1].split(' ')[0])
  assert len(p.stderr.splitlines()) <= 3  # no log storm
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  assert ckpt.steps()[-1] == intact  # the last complete checkpoint is there and loads
  ckpt.close()
  state, _ = helpers.final_state(workdir)
  assert int(state.step) == intact
  before = helpers.tree_digest(os.path.join(workdir, 'checkpoints'))
  p = _run(workdir, **{'train.num_steps': 100})  # still full: refused again, nothing lost
  _one_error_line(p, 'not enough free space')
  after = helpers.tree_digest(os.path.join(workdir, 'checkpoints'))
  assert {k: v for k, v in after.items() if 'tmp' not in k} == before


def test_disk_full_is_checked_before_each_save(tmp_path, monkeypatch):
  """The same decision in-process (where no small filesystem can be mounted): free space
  below one checkpoint stops the run before Orbax writes anything."""
  workdir = str(tmp_path / 'run')
  c = helpers.toy_config(**{**SHORT, 'train.num_steps': 20})
  train_and_evaluate(c, workdir)
  before = helpers.tree_digest(os.path.join(workdir, 'checkpoints'))
  usage = shutil.disk_usage(workdir)
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=4096))
  c = helpers.toy_config(**{**SHORT, 'train.num_steps': 40})
  with pytest.raises(ckpt_lib.DiskFullError, match='step 30 .* 0.0 MiB are free.*step 20 is '
                     'intact'):
    train_and_evaluate(c, workdir)
  assert helpers.tree_digest(os.path.join(workdir, 'checkpoints')) == before


def test_metrics_rows_stay_unique_by_step_after_resumes(tmp_path):
  """A resume replays the steps after its checkpoint: their rows replace the old ones."""
  workdir = str(tmp_path / 'run')
  train_and_evaluate(helpers.toy_config(**{**SHORT, 'train.num_steps': 30}), workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '30'))  # as if killed before it
  first = {r['step']: r for r in files.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}
  p = _run(workdir, check=True, **{'train.num_steps': 40})
  assert 'resumed from step 20' in p.stderr
  # Nothing a user cannot act on: no Orbax warnings about its own metadata files.
  assert not [l for l in p.stderr.splitlines() if 'WARNING' in l or l.startswith('W1')], p.stderr
  rows = files.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40]
  assert [rows[i]['loss'] for i in range(4)] == [first[s]['loss'] for s in (5, 10, 15, 20)]
