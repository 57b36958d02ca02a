"""Fault injection across fault classes: a short training interrupted, in a fixed number of
rounds, by random faults (SIGKILL at a random moment, SIGTERM, a second training started
on the same workdir, damage to the newest checkpoint's arrays / meta / data position),
then finished. The final state must equal the uninterrupted run's, bit for bit."""

import glob
import json
import os
import random
import signal
import subprocess
import time

import pytest

from scm_jax.train.loop import train_and_evaluate
from tests import helpers

RUN = {'train.num_steps': 600, 'train.ckpt_every': 25, 'train.keep_ckpts': 2}
ROUNDS = 12
FAULTS = ('kill', 'sigterm', 'concurrent_start', 'flip_array_byte', 'edit_meta',
          'edit_data_position')


def _steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit()) if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []


def _damage(workdir, fault, rng):
  """Damages the newest of >= 2 checkpoints (the older one is the fallback); returns
  what was done."""
  steps = _steps(workdir)
  if len(steps) < 2:
    return 'nothing to damage (fewer than 2 checkpoints)'
  step_dir = os.path.join(workdir, 'checkpoints', str(steps[-1]))
  if fault == 'flip_array_byte':
    path = rng.choice(glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True))
    data = bytearray(open(path, 'rb').read())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    open(path, 'wb').write(bytes(data))
  elif fault == 'edit_meta':
    path = os.path.join(step_dir, 'meta', 'metadata')
    meta = json.load(open(path))
    meta['nonfinite_rollbacks'] = [{'failed_step': 1, 'restored_step': 0}]
    json.dump(meta, open(path, 'w'))
  else:
    path = os.path.join(step_dir, 'data', 'process_0-of-1.json')
    state = json.load(open(path))
    state['step'] += rng.randint(1, 50)
    json.dump(state, open(path, 'w'))
  return f'damaged step {steps[-1]}'


@pytest.mark.slow  # ~12 process launches: several minutes on 2 cores
def test_random_faults_then_finish_equals_the_uninterrupted_run(tmp_path):
  reference_dir = str(tmp_path / 'reference')
  reference = train_and_evaluate(helpers.toy_config(**RUN), reference_dir).state
  workdir = str(tmp_path / 'faulty')
  rng = random.Random(2026)
  faults = list(FAULTS) * (ROUNDS // len(FAULTS))  # every fault twice, in random order
  rng.shuffle(faults)
  report = []
  for i, fault in enumerate(faults):
    p = helpers.launch_toy(workdir, **RUN)
    started = lambda: any(m in open(workdir + '.log').read()  # noqa: E731
                          for m in ('resumed from step', 'starting from scratch'))
    assert helpers.wait_until(p, started, timeout=600), open(workdir + '.log').read()[-2000:]
    log = open(workdir + '.log').read()
    start = int(log.split('resumed from step ')[1].split()[0]) if 'resumed' in log else 0
    target = min(start + rng.randint(10, 60), 590)
    if not helpers.wait_until(p, lambda: helpers.logged_step(workdir) >= target, timeout=600):
      report.append((i, fault, 'run finished first'))
      break
    if fault == 'sigterm':
      p.send_signal(signal.SIGTERM)
      assert p.wait(timeout=300) == 143, open(workdir + '.log').read()[-2000:]
      outcome = f'checkpointed at step {_steps(workdir)[-1]}, exit 143'
    elif fault == 'concurrent_start':
      p.send_signal(signal.SIGSTOP)  # paused, holding the lock: it cannot finish meanwhile
      second = subprocess.run(helpers.toy_cli_args(workdir, **RUN), cwd=helpers.REPO,
                              env=helpers.env(), capture_output=True, text=True, timeout=600)
      assert second.returncode == 2 and f'pid {p.pid}' in second.stderr, second.stderr
      p.send_signal(signal.SIGCONT)
      time.sleep(rng.uniform(0, 3))
      assert p.poll() is None or p.returncode == 0  # the first run went on
      p.kill()
      p.wait()
      outcome = 'second start refused (lock), first went on, then killed'
    else:
      time.sleep(rng.uniform(0, 2))
      p.kill()
      p.wait()
      outcome = 'killed'
      if fault != 'kill':
        outcome += '; ' + _damage(workdir, fault, rng)
    report.append((i, fault, outcome))
    print(f'round {i}: {fault}: {outcome}; checkpoints {_steps(workdir)}', flush=True)
  p = helpers.finish_toy(workdir, **RUN)
  state, _ = helpers.final_state(workdir)
  assert int(state.step) == 600
  helpers.assert_states_equal(state, reference)
  unusable = os.path.join(workdir, 'checkpoints_unusable')
  damaged = [r for r in report if 'damaged step' in r[2]]
  assert not damaged or os.listdir(unusable)  # damaged steps were moved aside, not used
