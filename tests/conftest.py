"""Shared test setup. Tests run on CPU; multi-device tests start their own subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/helpers.py)."""

import os
import sys

import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent XLA cache for the session and its subprocesses: CPU compiles are slow
# (tens of seconds for a U-Net train step on 2 cores) and many tests share programs.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'scm_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402


@pytest.fixture(scope='module')
def fast_compiles():
  """For a module: XLA CPU without most optimizations (compiles several times faster;
  tiny test shapes do not need them). Use: pytestmark = usefixtures('fast_compiles')."""
  import jax
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)
