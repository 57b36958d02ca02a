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
  it = single.iterator(0, prefetch=0)
  for _ in range(num_steps):
    b = next(it)
    s_a, m_a = sharded.step(s_a, b)
    s_b, m_b = single.step(s_b, b)
    np.testing.assert_allclose(m_a['loss'], m_b['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(s_a)), jax.tree.leaves(jax.device_get(s_b))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  return m_a
