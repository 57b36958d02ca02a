"""Preemption: SIGTERM / SIGINT become a checkpoint at the next step boundary and a clean exit.

Cluster schedulers (SLURM, Kubernetes, TPU maintenance events) send SIGTERM some seconds
before they kill a job; SLURM sends SIGUSR2 before the time limit when asked to
(`--signal=USR2@T`, as submitit does); a user stops a run with Ctrl-C (SIGINT). Either way
the loop
finishes the step in flight, saves a checkpoint of it, waits for the write to complete
and raises `Preempted`; the CLI then exits with status 128 + signal (143 for SIGTERM,
130 for SIGINT, 140 for SIGUSR2), which schedulers and retry wrappers read as
"interrupted, relaunch".
Relaunching the same command resumes from that checkpoint, bit-exactly.

A Python signal handler sets a flag that the loop reads after each step. Several
processes (jax.distributed), of which the scheduler may signal only one (one host
preempted): every process must save the same step, so after each step every process
contributes its signal number (0: none) to an all-reduce (max over processes) and acts on the result of the
previous step's reduction, which all processes read at the same step. A signal on any
host thus stops every process one or two steps later, at the same step; reading the
result one step late keeps the host from waiting on the device mid-pipeline (as the
non-finite guard does). JAX's own preemption service is switched off
(infra/distributed.py): it catches SIGTERM alone and agrees through the coordination
service, which on a loaded machine took seconds, long enough for a short run to end
first.

A second signal while the checkpoint is being written aborts at once (KeyboardInterrupt);
checkpoints are atomic, so the previous one stays usable.
"""

import logging
import signal
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signum: int, workdir: str):
    self.step, self.signum, self.workdir = int(step), int(signum), workdir
    name = signal.Signals(signum).name
    super().__init__(f'stopped by {name} after step {self.step}; a checkpoint of that step is '
                     f'in {workdir}. Relaunch the same command to resume.')

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class _AgreedSignal:
  """Multi-process agreement: `__call__(signum)` starts the all-reduce (max) of this
  step's signal numbers (0: none) and returns the previous step's result, the same on
  every process."""

  def __init__(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('p',))
    self._local = jax.local_device_count()
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('p'))
    self._reduce = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    self._pending = None

  def __call__(self, signum: int) -> int:
    previous = self._pending
    local = jax.make_array_from_process_local_data(
        self._sharding, np.full((self._local,), signum, np.int32))
    self._pending = self._reduce(local)
    return 0 if previous is None else int(np.asarray(previous.addressable_data(0)))


class PreemptionHandler:
  """Context manager: `stop_requested(step)` says whether to save and exit.

  Handlers are installed only in the main thread and only while the context is open;
  the previous handlers are restored on exit.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.signum: Optional[int] = None
    self._previous = {}
    self._agreed = None

  def install(self) -> 'PreemptionHandler':
    if self.enabled and threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> 'PreemptionHandler':
    return self.install()

  def __exit__(self, *exc_info):
    self.uninstall()

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # second signal: the user insists
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}: aborting now')
    self.signum = signum
    logging.warning('received %s: saving a checkpoint after the current step, then exiting '
                    '(send it again to abort at once).', signal.Signals(signum).name)

  def stop_requested(self, step: int) -> bool:
    """True once a signal arrived (one process), or, with several processes, at the
    step at which all of them learn that one of them was signalled. Call it once per
    step on every process."""
    del step  # the decision depends on the order of calls, the same on every process
    if jax.process_count() == 1:
      return self.signum is not None
    if self._agreed is None:
      self._agreed = _AgreedSignal()
    agreed = self._agreed(self.signum or 0)
    if agreed:  # every process exits with the same status, 128 + that signal
      self.signum = agreed
    return bool(agreed)
