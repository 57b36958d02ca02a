"""Running code in fresh processes (multi-device meshes, CLIs, kill/resume)."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices: int = 1) -> dict:
  e = dict(os.environ)
  e['PYTHONPATH'] = REPO + os.pathsep + e.get('PYTHONPATH', '')
  e['JAX_PLATFORMS'] = 'cpu'
  flags = [f for f in e.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  e['XLA_FLAGS'] = ' '.join(flags)
  return e


def run_python(code: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs a snippet in a new interpreter; raises with its output if it fails."""
  p = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env(devices),
                     capture_output=True, text=True, timeout=timeout)
  if p.returncode != 0:
    raise AssertionError(f'subprocess failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
  return p


def run_module(module: str, *args: str, devices: int = 1, timeout: int = 600,
               check: bool = True) -> subprocess.CompletedProcess:
  """python -m module args...; with check, raises with its output on failure."""
  p = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env(devices),
                     capture_output=True, text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f'{module} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
  return p


def tree_digest(path: str) -> dict:
  """{relative file path: (size, mtime_ns, sha1)} of everything under path."""
  import hashlib
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      with open(full, 'rb') as fh:
        digest = hashlib.sha1(fh.read()).hexdigest()
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def assert_same_steps(sharded, single, num_steps: int):
  """Runs num_steps identical batches through two Experiments (a sharded one and a
  one-device one): same loss at every step and the same final state, to tolerance."""
  import jax
  import numpy as np
  s_a, s_b = sharded.init_state(), single.init_state()
  it = single.data_stream(prefetch=0)
  for _ in range(num_steps):
    b = next(it)
    s_a, m_a = sharded.step(s_a, b)
    s_b, m_b = single.step(s_b, b)
    np.testing.assert_allclose(m_a['loss'], m_b['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(s_a)), jax.tree.leaves(jax.device_get(s_b))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  return m_a


# ------------------------------------------------------------- fault-injection helpers
# Shared by tests/test_reliability_*.py: a small toy run that can be launched, killed and
# relaunched as a CLI process, and the checks on what it left behind.

# A small MLP on the 2-D ring: ~300 steps/s here, so kills can land between steps.
TOY = {
    'model.width': 64, 'model.depth': 2, 'data.num_train': 4096,
    'train.batch_size': 64, 'train.num_steps': 300, 'train.ckpt_every': 100,
    'train.keep_ckpts': 2, 'train.log_every': 10, 'train.sample_every': 0,
    'train.progress_bar': False,
}


def toy_config(**overrides):
  """configs/toy2d_sct.py with TOY and `overrides` ({'train.num_steps': 30, ...})."""
  from configs import toy2d_sct
  from scm_jax import config as config_lib
  return config_lib.apply_overrides(toy2d_sct.get_config(), {**TOY, **overrides})


def toy_cli_args(workdir, **overrides):
  return ([sys.executable, '-m', 'scm_jax.train', '--config=configs/toy2d_sct.py',
           f'--workdir={workdir}'] +
          [f'--config.{k}={v}' for k, v in {**TOY, **overrides}.items()])


def launch_toy(workdir, **overrides) -> subprocess.Popen:
  """Starts toy training; its stderr goes to <workdir>.log (a pipe nobody reads could fill)."""
  with open(workdir + '.log', 'w') as log:
    return subprocess.Popen(toy_cli_args(workdir, **overrides), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=log)


def finish_toy(workdir, **overrides):
  """Runs toy training to the end (resuming); returns the finished process."""
  p = subprocess.run(toy_cli_args(workdir, **overrides), cwd=REPO, env=env(),
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def wait_until(proc, condition, timeout=300.0, poll=0.002):
  """Polls condition() until it holds (True) or proc exits (False)."""
  import time
  end = time.time() + timeout
  while time.time() < end:
    if condition():
      return True
    if proc.poll() is not None:
      return condition()
    time.sleep(poll)
  raise AssertionError('timed out waiting for the training process')


def logged_step(workdir) -> int:
  """The newest step in <workdir>/metrics.jsonl (0 before the first log)."""
  import json
  try:
    lines = open(os.path.join(workdir, 'metrics.jsonl')).read().splitlines()
    return json.loads(lines[-1])['step'] if lines else 0
  except (OSError, ValueError):  # absent, or a line being written
    return 0


def tmp_dirs(workdir):
  import glob
  return glob.glob(os.path.join(workdir, 'checkpoints', '*orbax-checkpoint-tmp*'))


def saved_stream_step(workdir, step, process: int = 0, count: int = 1) -> int:
  """Batches the data stream had handed out when checkpoint `step` was saved (its
  'data' item, as grain's Orbax handler wrote it for process `process` of `count`)."""
  import json
  path = os.path.join(workdir, 'checkpoints', str(step), 'data',
                      f'process_{process}-of-{count}.json')
  return json.load(open(path))['step']


def final_state(workdir):
  """(host TrainState, meta) of a workdir's newest checkpoint."""
  import jax
  from scm_jax.infra import checkpoint as ckpt_lib
  from scm_jax.train.experiment import load_experiment
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    meta = ckpt.read_meta(ckpt.latest_step())
  finally:
    ckpt.close()
  _, state = load_experiment(workdir)
  return jax.device_get(state), meta


def assert_states_equal(a, b):
  """Bit-identical pytrees."""
  import jax
  import numpy as np
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------- multi-process jobs
# 2-process jax.distributed jobs on localhost (tests/test_reliability_multihost.py).

def launch_job(workdir, num_processes: int = 2, **overrides):
  """Starts the toy training as `num_processes` processes joined by jax.distributed on
  localhost (launch/local_job.py: each can be signalled on its own); process i's stderr
  goes to <workdir>.<i>.log."""
  from launch import local_job
  return local_job.start(toy_cli_args(workdir, **overrides)[3:],
                         [f'{workdir}.{i}.log' for i in range(num_processes)], env(), REPO)


def job_log(workdir, i: int) -> str:
  with open(f'{workdir}.{i}.log') as f:
    return f.read()


def error_lines(workdir, i: int, timeout: float = 10.0) -> list:
  """The `error:` lines of process i's log once its stderr guard has written its line
  (the guard writes it just after the process is gone)."""
  import time
  end = time.time() + timeout
  while True:
    lines = [l for l in job_log(workdir, i).splitlines() if l.startswith('error:')]
    if lines or time.time() > end:
      return lines
    time.sleep(0.05)


def stop_job(procs) -> None:
  from launch import local_job
  local_job.stop(procs)
