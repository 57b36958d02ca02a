"""One line instead of a crash dump when a process of a multi-process job is lost.

When a process dies (SIGKILL, OOM, a lost host) or stops answering, JAX's distributed
runtime notices within `distributed.peer_timeout_s` (heartbeats; at once if the
coordinator, process 0, is the one lost, because its service's sockets close) and
aborts every survivor from a C++ thread: a FATAL log line, gRPC details and a stack
trace, with no Python code running in between. So the survivors never hang, but nothing
in the dying process can replace that dump with a readable line.

`start_guard` therefore routes the process's stderr (fd 2) through a small child
process (this file, run as a script with only the standard library) that copies
everything through, except the runtime's own report of the loss: log lines of the
coordination service, the distributed client and the preemption sync manager are held
back for `HOLD_S`; if the runtime's FATAL line follows, they and the stack trace are
dropped and, once the process is gone, replaced by one line naming the lost process
(`summary`). Held lines that no FATAL line follows are passed on, late but in order.
The guard ignores the signals a scheduler sends, so it outlives the process it serves
and exits when the pipe closes.
"""

import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Optional

HOLD_S = 2.0          # how long runtime log lines wait for a FATAL line that may follow
PARTIAL_HOLD_S = 0.3  # how long an unterminated line that may be a log line waits
MAX_REPORT = 1 << 16  # bytes of the runtime's report kept for the summary
_GUARD = None         # the guard process of this process, once started

# absl/glog prefix: 'F1207 15:52:04.387885   11354 client.h:80] '.
_LOG_LINE = re.compile(rb'^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([^:\]\s]+):\d+\] ')
_RUNTIME_SOURCES = re.compile(rb'coordination|client\.(h|cc)$|preemption_sync|distributed')
# A survivor's report that the coordination service (process 0) is gone or silent: its
# sockets closed, or an RPC to it (e.g. the heartbeat) ran past its deadline.
_COORDINATOR_LOST = re.compile(
    r'leader task|Failed to send RPC to coordination service|coordination service is '
    r'(unavailable|unreachable)|DEADLINE_EXCEEDED', re.IGNORECASE)
_UNHEALTHY = re.compile(r'tasks are unhealthy[^:]*:\s*((?:\d+[\s,]*)+)')
_TASK = re.compile(r'/task:(\d+)')


def summary(report: str, process_index: int, num_processes: int,
            peer_timeout_s: float) -> str:
  """The one line that replaces the runtime's fatal report `report` (pure)."""
  where = (f'process {process_index} stops too rather than wait for it. Relaunch all '
           f'{num_processes} processes: training resumes from the newest complete '
           'checkpoint.')
  lost = []
  for match in _UNHEALTHY.finditer(report):  # the service's own verdict names them
    lost += [int(v) for v in re.findall(r'\d+', match.group(1))]
  if process_index != 0 and not lost and _COORDINATOR_LOST.search(report):
    return (f'error: lost process 0 of {num_processes}, the coordinator (its distributed '
            f'service stopped answering: it died, hangs or its host is gone); {where}')
  lost += [int(v) for v in _TASK.findall(report)]
  lost = sorted({v for v in lost if v != process_index and 0 <= v < num_processes})
  if lost:
    names = ', '.join(str(v) for v in lost)
    return (f'error: lost process{"es" if len(lost) > 1 else ""} {names} of '
            f'{num_processes} (no heartbeat for {peer_timeout_s:g} s: died, killed or '
            f'hung); {where}')
  fatal = [l for l in report.splitlines() if _LOG_LINE.match(l.encode())]
  reason = fatal[-1].split('] ', 1)[-1] if fatal else report.strip().splitlines()[0]
  return f'error: the JAX distributed runtime stopped this process ({reason[:300]}); {where}'


class Condenser:
  """The guard's filter: feed it the bytes written to stderr, write what it returns."""

  def __init__(self, process_index: int, num_processes: int, peer_timeout_s: float):
    self._args = (process_index, num_processes, peer_timeout_s)
    self._held: list[bytes] = []  # runtime log lines (and their continuation lines)
    self._held_until = 0.0
    self._partial = b''           # an unterminated line not yet passed on
    self._partial_since = 0.0
    self._mid_line = False        # the start of the current line was passed on already
    self.report: Optional[bytearray] = None  # set once the runtime's FATAL line came

  def feed(self, data: bytes, now: float) -> bytes:
    if self.report is not None:
      self.report += data[:max(0, MAX_REPORT - len(self.report))]
      return b''
    out = []
    lines = (self._partial + data).split(b'\n')
    if not self._partial:
      self._partial_since = now
    self._partial = lines.pop()
    for i, line in enumerate(lines):
      out.append(self._line(line + b'\n', now))
      if self.report is not None:  # the rest is the dump: kept for the summary only
        self.report += b'\n'.join(lines[i + 1:] + [self._partial])
        self._partial = b''
        return b''.join(out)
    if self._partial and not self._held and (self._mid_line or
                                             not self._may_be_log_line(self._partial)):
      out.append(self._flush_held() + self._partial)
      self._partial, self._mid_line = b'', True
    return b''.join(out)

  @staticmethod
  def _may_be_log_line(partial: bytes) -> bool:
    return partial[:1] in (b'I', b'W', b'E', b'F') and len(partial) < 4096

  def _line(self, line: bytes, now: float) -> bytes:
    if self._mid_line:  # the end of a line whose start was passed on
      self._mid_line = False
      return line
    match = _LOG_LINE.match(line)
    if match and _RUNTIME_SOURCES.search(match.group(2)) and match.group(1) != b'I':
      if match.group(1) == b'F':
        self.report = bytearray(b''.join(self._held) + line)
        self._held = []
        return b''
      self._held.append(line)
      self._held_until = now + HOLD_S
      return b''
    if self._held and not match:  # continuation of a held message (gRPC details)
      self._held.append(line)
      self._held_until = now + HOLD_S
      return b''
    return self._flush_held() + line

  def _flush_held(self) -> bytes:
    held, self._held = b''.join(self._held), []
    return held

  def tick(self, now: float) -> bytes:
    """What is due: held lines no FATAL line followed, a stale unterminated line."""
    if self.report is not None:
      return b''
    out = b''
    if self._held and now >= self._held_until:
      out += self._flush_held()
    if self._partial and not self._held and now - self._partial_since >= PARTIAL_HOLD_S:
      out += self._flush_held() + self._partial
      self._partial, self._mid_line = b'', True
    return out

  def close(self) -> bytes:
    """At end of input: the summary line if the runtime aborted, else what is left."""
    if self.report is None:
      return self._flush_held() + self._partial
    return (summary(self.report.decode(errors='replace'), *self._args) + '\n').encode()


def _write_all(fd: int, data: bytes) -> None:
  while data:
    data = data[os.write(fd, data):]


def _guard(process_index: int, num_processes: int, peer_timeout_s: float) -> None:
  """The guard process: stdin (the served process's stderr) -> stdout (the real stderr)."""
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # sent to the whole job: outlive the process
  condenser = Condenser(process_index, num_processes, peer_timeout_s)
  while True:
    ready, _, _ = select.select([0], [], [], 0.1)
    if ready:
      data = os.read(0, 1 << 16)
      if not data:
        break
      _write_all(1, condenser.feed(data, time.monotonic()))
    _write_all(1, condenser.tick(time.monotonic()))
  _write_all(1, condenser.close())


def start_guard(process_index: int, num_processes: int, peer_timeout_s: float) -> None:
  """Routes this process's fd 2 through the guard (see the module docstring)."""
  global _GUARD
  read_end, write_end = os.pipe()
  real_stderr = os.dup(2)
  # -I: standard library only (no scm_jax import, no JAX): starts in milliseconds.
  _GUARD = subprocess.Popen([sys.executable, '-I', '-u', os.path.abspath(__file__),
                             str(process_index), str(num_processes), str(peer_timeout_s)],
                            stdin=read_end, stdout=real_stderr, stderr=real_stderr,
                            start_new_session=True)
  os.close(read_end)
  os.close(real_stderr)
  sys.stderr.flush()
  os.dup2(write_end, 2)
  os.close(write_end)


if __name__ == '__main__':
  _guard(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
