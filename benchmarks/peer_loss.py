"""How fast a multi-process job reacts to losing or preempting one process.

    python -m benchmarks.peer_loss [--repeats=3] [--peer_timeout_s=10] [--baseline]
        [--out=FILE.json]

Each repeat starts the toy training (configs/toy2d_sct.py, MLP 64x2, batch 64, logging
every step) as 2 processes joined by jax.distributed on localhost (launch/local_job.py,
CPU, gloo), waits for step --at, then injects one fault and measures from the signal:

- kill_worker       SIGKILL to process 1: until process 0 has exited;
- kill_coordinator  SIGKILL to process 0 (it hosts the coordination service): until
                    process 1 has exited;
- hang_worker       SIGSTOP to process 1 (alive, silent): until process 0 has exited;
- sigterm_one       SIGTERM to process 1 only: until both have exited, and how many
                    steps after the signal's step they saved (the same step on both).

'one line' is the fraction of survivors whose stderr holds exactly one `error:` line
naming the lost process (infra/lost_process.py). --baseline adds one kill_worker
with peer_timeout_s=100, JAX's own default heartbeat timeout. Prints a table and writes JSON
(default benchmarks/results/peer_loss_<device>.json).
"""

import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common
from launch import local_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Jobs per fault.')
_PEER_TIMEOUT = flags.DEFINE_integer('peer_timeout_s', 10, 'config.distributed.peer_timeout_s.')
_AT = flags.DEFINE_integer('at', 20, 'Logged step at which the fault is injected.')
_BASELINE = flags.DEFINE_bool('baseline', False, 'Also kill_worker with JAX\'s 100 s.')
_OUT = flags.DEFINE_string('out', None, 'JSON path.')

TOY = ['--config=configs/toy2d_sct.py', '--config.model.width=64', '--config.model.depth=2',
       '--config.data.num_train=4096', '--config.train.batch_size=64',
       '--config.train.num_steps=100000', '--config.train.ckpt_every=50',
       '--config.train.log_every=1', '--config.train.sample_every=0',
       '--config.train.progress_bar=False']


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _logged_step(workdir: str) -> int:
  try:
    lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
    return json.loads(lines[-1])['step'] if lines else 0
  except (OSError, ValueError, IndexError):
    return 0


def _wait(cond, procs, timeout=900.0) -> None:
  end = time.time() + timeout
  while not cond():
    if time.time() > end or any(p.poll() is not None for p in procs):
      raise RuntimeError('the job did not reach the fault step')
    time.sleep(0.005)


def _one_line(log: str, lost: int) -> bool:
  lines = [l for l in log.splitlines() if l.startswith('error:')]
  return len(lines) == 1 and f'lost process {lost} of 2' in lines[0]


def run_once(fault: str, peer_timeout: int, root: str) -> dict:
  workdir = tempfile.mkdtemp(dir=root)
  logs = [f'{workdir}.{i}.log' for i in (0, 1)]
  procs = local_job.start([f'--workdir={workdir}', *TOY,
                           f'--config.distributed.peer_timeout_s={peer_timeout}'],
                          logs, _env(), REPO)
  try:
    _wait(lambda: _logged_step(workdir) >= _AT.value, procs)
    at = _logged_step(workdir)
    victim = 0 if fault == 'kill_coordinator' else 1
    sig = {'hang_worker': signal.SIGSTOP, 'sigterm_one': signal.SIGTERM}.get(fault,
                                                                              signal.SIGKILL)
    t = time.time()
    procs[victim].send_signal(sig)
    waited = procs if fault == 'sigterm_one' else [procs[1 - victim]]
    codes = [p.wait(timeout=peer_timeout + 300) for p in waited]
    row = {'fault': fault, 'peer_timeout_s': peer_timeout, 'seconds': time.time() - t,
           'exit_codes': codes}
    time.sleep(0.5)  # the stderr guard writes its line just after the process is gone
    text = [open(l).read() for l in logs]
    if fault == 'sigterm_one':
      stops = {int(m) for log in text for m in re.findall(r'stopped by SIGTERM after step (\d+)',
                                                          log)}
      row.update(steps_after_signal=(min(stops) - at) if len(stops) == 1 else None,
                 same_step=len(stops) == 1)
    else:
      row['one_line'] = _one_line(text[1 - victim], victim)
    return row
  finally:
    local_job.stop(procs)
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix='peer_loss_')
  plan = [(f, _PEER_TIMEOUT.value, _REPEATS.value)
          for f in ('kill_worker', 'kill_coordinator', 'hang_worker', 'sigterm_one')]
  if _BASELINE.value:
    plan.append(('kill_worker', 100, 1))
  runs = []
  try:
    for fault, timeout, repeats in plan:
      for _ in range(repeats):
        runs.append(run_once(fault, timeout, root))
        print(runs[-1], flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  rows = []
  for fault, timeout, _ in plan:
    rs = [r for r in runs if r['fault'] == fault and r['peer_timeout_s'] == timeout]
    secs = [r['seconds'] for r in rs]
    ok = [r.get('one_line', r.get('same_step')) for r in rs]
    rows.append({'fault': fault, 'peer_timeout_s': timeout, 'median_s': statistics.median(secs),
                 'max_s': max(secs), 'runs': len(rs),
                 'exit_codes': ' '.join(sorted({str(c) for r in rs for c in r['exit_codes']})),
                 'ok': f'{sum(map(bool, ok))}/{len(ok)}',
                 'steps_after_signal': ' '.join(str(r.get('steps_after_signal')) for r in rs)
                 if fault == 'sigterm_one' else ''})
  common.print_table(rows, [('fault', 'fault', ''), ('peer_timeout_s', 'peer_timeout_s', ''),
                            ('median_s', 'median s', '.2f'), ('max_s', 'max s', '.2f'),
                            ('runs', 'runs', ''), ('exit_codes', 'exit codes', ''),
                            ('ok', 'one line / same step', ''),
                            ('steps_after_signal', 'steps after signal', '')])
  common.write_json(_OUT.value or common.default_out('peer_loss'),
                    {'command': ' '.join(sys.argv), 'rows': rows, 'runs': runs})


if __name__ == '__main__':
  app.run(main)
