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

One process: a Python signal handler sets a flag that the loop reads after each step.
Several processes (jax.distributed): every host must save the same step, so the decision
comes from JAX's preemption service (`reached_preemption_sync_point`, through Orbax),
which catches SIGTERM on any host and agrees on a step; no Python handler is installed
then, because it would replace the runtime's own SIGTERM notifier.

A second signal while the checkpoint is being written aborts at once (KeyboardInterrupt);
checkpoints are atomic, so the previous one stays usable.
"""

import logging
import signal
import threading
from typing import Optional

import jax

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


class PreemptionHandler:
  """Context manager: `stop_requested(step, checkpointer)` says whether to save and exit.

  Handlers are installed only in the main thread of a single-process run and only while
  the context is open; the previous handlers are restored on exit.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.signum: Optional[int] = None
    self._previous = {}

  def install(self) -> 'PreemptionHandler':
    if (self.enabled and jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
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

  def stop_requested(self, step: int, checkpointer) -> bool:
    """True once a signal arrived (one process) or at the step all hosts agreed on."""
    if self.signum is not None:
      return True
    if jax.process_count() > 1 and checkpointer.reached_preemption(step):
      self.signum = signal.SIGTERM
      return True
    return False
