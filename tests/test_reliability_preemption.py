"""Fault class: the process dies or is told to stop. SIGKILL at any moment (inside an async
save too), SIGTERM / SIGINT / SIGUSR2 (checkpoint at the next step, clean exit), then a
relaunch that must end bit-identical to an uninterrupted run."""

import os
import random
import signal
import time

import pytest

from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.train import preemption
from scm_jax.train.loop import train_and_evaluate
from tests import helpers


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run (in this process: the CLI must agree with the library)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train_and_evaluate(helpers.toy_config(), workdir)
  return helpers.final_state(workdir)


def test_sigkill_at_several_points_then_resume_is_bit_exact(tmp_path, reference):
  workdir = str(tmp_path / 'killed')
  saved = lambda step: os.path.exists(os.path.join(workdir, 'checkpoints', str(step)))
  # 1. While the async save of step 200 is being written (its temporary directory exists).
  p = helpers.launch_toy(workdir)
  assert helpers.wait_until(p, lambda: any(d.endswith('/200.orbax-checkpoint-tmp')
                                           for d in helpers.tmp_dirs(workdir))), \
      open(workdir + '.log').read()
  p.kill()
  p.wait()
  caught_mid_save = bool(helpers.tmp_dirs(workdir)) and not saved(200)
  assert saved(100)
  # 2. Between checkpoints: restarted from 100, step 200 saved, ~50 more steps done.
  p = helpers.launch_toy(workdir)
  assert helpers.wait_until(p, lambda: saved(200) and helpers.logged_step(workdir) >= 250)
  p.kill()
  p.wait()
  assert not helpers.tmp_dirs(workdir)  # the leftover of kill 1 was removed at the next start
  log = open(workdir + '.log').read()
  assert 'resumed from step 100' in log, log[-3000:]
  # 3. Relaunch to the end: the same bits as the uninterrupted run.
  p = helpers.finish_toy(workdir)
  assert 'resumed from step 200' in p.stderr
  state, meta = helpers.final_state(workdir)
  ref_state, _ = reference
  assert int(state.step) == meta['step'] == 300
  assert helpers.saved_stream_step(workdir, 300) == 300  # the data position came back too
  helpers.assert_states_equal(state, ref_state)
  assert caught_mid_save, 'kill 1 did not land during the save (machine too slow?)'


def _interrupt(workdir, sig, first_logged):
  """Launches, sends `sig` once step `first_logged` is logged, checks the clean exit."""
  p = helpers.launch_toy(workdir)
  assert helpers.wait_until(p, lambda: helpers.logged_step(workdir) >= first_logged)
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
  ckpt.close()
  assert helpers.saved_stream_step(workdir, stopped_at) == stopped_at
  return stopped_at


def test_sigterm_checkpoints_the_next_step_and_exits_cleanly(tmp_path, reference):
  workdir = str(tmp_path / 'preempted')
  _interrupt(workdir, signal.SIGTERM, 120)
  helpers.finish_toy(workdir)
  state, _ = helpers.final_state(workdir)
  helpers.assert_states_equal(state, reference[0])


@pytest.mark.slow
def test_sigint_then_sigkill_at_random_moments_many_times(tmp_path, reference):
  """The exhaustive variant: Ctrl-C, then 8 SIGKILLs at random times, then finish."""
  workdir = str(tmp_path / 'chaos')
  _interrupt(workdir, signal.SIGINT, 50)
  rng = random.Random(1)
  for _ in range(8):
    p = helpers.launch_toy(workdir)
    time.sleep(rng.uniform(1.0, 25.0))
    p.kill()
    p.wait()
  helpers.finish_toy(workdir)
  state, _ = helpers.final_state(workdir)
  helpers.assert_states_equal(state, reference[0])


def test_preemption_handler_flags_then_aborts_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionHandler() as handler:
    assert not handler.stop_requested(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert handler.stop_requested(2) and handler.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGTERM) is before
  with preemption.PreemptionHandler() as handler:  # SLURM's --signal=USR2@T
    os.kill(os.getpid(), signal.SIGUSR2)
    assert handler.stop_requested(3) and handler.signum == signal.SIGUSR2
  e = preemption.Preempted(7, signal.SIGTERM, '/w')
  assert e.exit_code == 143 and 'after step 7' in str(e)
  assert preemption.Preempted(7, signal.SIGUSR2, '/w').exit_code == 140
  with preemption.PreemptionHandler(enabled=False):
    assert signal.getsignal(signal.SIGTERM) is before
