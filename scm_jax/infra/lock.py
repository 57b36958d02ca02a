"""One writer per workdir: a lock file naming its owner.

Two trainings in one workdir would delete each other's in-flight checkpoints and lose
work. `WorkdirLock` holds `<workdir>/lock` for the life of a training run:

- where the filesystem supports it (local disks, most cluster filesystems), an
  exclusive `fcntl.flock` on the file: the kernel releases it when the owner dies, so
  a crash never leaves a stale lock;
- otherwise the file's existence is the lock (created with O_EXCL). The owner rewrites
  it every `heartbeat_s` seconds from a background thread; a lock whose owner process
  is gone (same host) or whose heartbeat is older than `stale_s` (any host) is stale
  and taken over, with a warning naming the old owner.

The file holds the owner's host, pid, start time and command line, which the error a
second writer gets quotes. Multi-process jobs take it once (process 0).
"""

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

from scm_jax.errors import WorkdirError

LOCK_FILE = 'lock'


def _describe(owner: dict) -> str:
  started = owner.get('started')
  when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started)) if started else '?'
  return (f'host {owner.get("host", "?")} pid {owner.get("pid", "?")} (started {when}: '
          f'{owner.get("command", "?")})')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """Context manager holding the workdir lock; WorkdirError if another process has it."""

  def __init__(self, workdir: str, heartbeat_s: float = 30.0, stale_s: float = 300.0,
               use_flock: Optional[bool] = None):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self._use_flock = use_flock
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.owner = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(),
                  'command': ' '.join(sys.argv)[:300]}

  def acquire(self) -> 'WorkdirLock':
    if self._use_flock is not False:
      try:
        return self._acquire_flock()
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise
        if self._use_flock:
          raise
        logging.warning('%s: this filesystem has no flock (%s); using a heartbeat lock.',
                        self.path, e.strerror)
    return self._acquire_file()

  def _acquire_flock(self) -> 'WorkdirLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirError(self._busy(self._read())) from None
    except OSError:
      os.close(fd)
      raise
    self._fd = fd
    self._write()
    return self

  def _acquire_file(self) -> 'WorkdirLock':
    for _ in range(2):
      try:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        break
      except FileExistsError:
        owner = self._read()
        if not self._stale(owner):
          raise WorkdirError(self._busy(owner)) from None
        logging.warning('taking over the stale lock of %s in %s', _describe(owner), self.path)
        os.remove(self.path)
    else:
      raise WorkdirError(f'could not take the lock {self.path}; remove it if no training '
                         'runs in this workdir.')
    self._write()
    self._thread = threading.Thread(target=self._beat, name='workdir-lock', daemon=True)
    self._thread.start()
    return self

  def _stale(self, owner: dict) -> bool:
    if owner.get('host') == self.owner['host'] and isinstance(owner.get('pid'), int):
      return not _alive(owner['pid'])
    try:
      return time.time() - os.path.getmtime(self.path) > self.stale_s
    except OSError:
      return True

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        os.utime(self.path)
      except OSError:
        pass

  def _read(self) -> dict:
    """The owner recorded in the lock file ({} if unreadable). The owner may be writing
    it at this moment, so an unparsable file is read again a few times."""
    for _ in range(10):
      try:
        with open(self.path) as f:
          return json.load(f)
      except ValueError:
        time.sleep(0.05)
      except OSError:
        break
    return {}

  def _write(self) -> None:
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(self.owner).encode(), 0)
    os.fsync(self._fd)

  def _busy(self, owner: dict) -> str:
    return (f'the workdir {os.path.dirname(self.path)} is in use by {_describe(owner)}. '
            'Stop that run, wait for it to finish, or use another --workdir.')

  def release(self) -> None:
    if self._fd is None:
      return
    self._stop.set()
    if self._thread is not None:  # file lock: the file is the lock
      self._thread.join()
      self._thread = None
      os.remove(self.path)
    # flock: closing releases it. The file stays (unlinking it could let a second
    # process lock a new file while a third still holds the old one).
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()
