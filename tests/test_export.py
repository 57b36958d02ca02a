"""scm_jax.export: samplers serialized with jax.export, run by a loader that needs only
jax and numpy, equal to Experiment.sample on the same noise; bad artifacts and inputs
refused in one line."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from scm_jax.export import ArtifactError, artifact, build, load
from scm_jax.models import default_model_config
from tests import helpers

pytestmark = pytest.mark.usefixtures('fast_compiles')

KEY = jax.random.PRNGKey(7)


def tiny_dit(**overrides):
  c = default_model_config('dit')
  c.update(dict(patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=16,
                logvar_channels=16, num_classes=10, **overrides))
  return c


def _config():
  from tests.test_train import tiny_digits_config
  c = tiny_digits_config()
  c.model = tiny_dit()
  c.optim.lr, c.optim.warmup_steps = 1e-2, 0   # weights well away from the zero init
  c.train.num_steps, c.train.ckpt_every, c.train.log_every = 3, 3, 3
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 3-step class-conditional DiT workdir and its (Experiment, state)."""
  from scm_jax.train.experiment import load_experiment
  from scm_jax.train.loop import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp('export') / 'run')
  train_and_evaluate(_config(), workdir)
  exp, state = load_experiment(workdir)
  return workdir, exp, state


def _reference(exp, state, num, steps, method='consistency', **kw):
  """Experiment.sample from KEY, and the noise it drew."""
  x = exp.sample(state, num, steps, key=KEY, method=method, labels=np.arange(num) % 10,
                 ema='params', **kw)
  return x, np.asarray(exp.sampling_noise(KEY, num, method, steps))


# Run in a fresh interpreter where any import of model code fails: the package loader
# and a copy of artifact.py alone.
_BLOCKED_LOADER = '''
import importlib.abc, sys
BLOCKED = ('flax', 'optax', 'orbax', 'ml_collections', 'grain', 'tensorflow',
           'scm_jax.models', 'scm_jax.train', 'scm_jax.core', 'scm_jax.data',
           'scm_jax.export.build', 'scm_jax.config')
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.startswith(BLOCKED):
      raise ImportError(f'blocked: {name}')
sys.meta_path.insert(0, Block())
import numpy as np
inputs = np.load(sys.argv[1])
sys.path.insert(0, sys.argv[3])
import artifact as standalone
from scm_jax.export import load
out = {}
for name, loader in (('package', load), ('standalone', standalone.load)):
  gen = loader(sys.argv[2])
  for b in (5, 3):   # one artifact, two batch sizes (symbolic batch)
    out[f'{name}_{b}'] = gen(inputs['noise'][:, :b], labels=inputs['labels'][:b])
assert not [m for m in sys.modules if m.startswith(BLOCKED)], sorted(sys.modules)
np.savez(sys.argv[4], **out)
'''


def test_cli_export_runs_without_model_code_and_equals_sample(run, tmp_path):
  workdir, exp, state = run
  out = str(tmp_path / 'gen.jaxexport')
  p = helpers.run_module('scm_jax.export', f'--workdir={workdir}', '--steps=2',
                         '--platforms=cpu,cuda,tpu', '--ema=params', f'--out={out}')
  assert 'batch symbolic' in p.stdout and 'platforms cpu,cuda,tpu' in p.stdout
  ref, noise = _reference(exp, state, 5, 2)
  np.savez(tmp_path / 'in.npz', noise=noise, labels=np.arange(5) % 10)
  lone = tmp_path / 'alone'
  lone.mkdir()
  shutil.copy(artifact.__file__, lone / 'artifact.py')
  script = tmp_path / 'run.py'
  script.write_text(_BLOCKED_LOADER)
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'in.npz'), out, str(lone),
                         str(tmp_path / 'out.npz')], cwd=helpers.REPO, env=helpers.env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / 'out.npz')
  t0, t1 = meta_times = (np.arctan(80 / 0.5), 1.1)
  zero_net = np.cos(t1) * (np.cos(t1) * np.cos(t0) * np.sin(t0) * 0.5 * noise[0]
                           + np.sin(t1) * 0.5 * noise[1])
  assert np.abs(ref - zero_net).max() > 0.05   # the network's F is far from 0
  for name in ('package', 'standalone'):
    np.testing.assert_allclose(got[f'{name}_5'], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[f'{name}_3'], ref[:3], rtol=1e-5, atol=1e-5)
  meta = load(out).metadata
  assert meta['steps'] == 2 and meta['method'] == 'consistency' and meta['batch'] is None
  assert meta['noise_shape'] == [2, None, 8, 8, 1] and meta['num_classes'] == 10
  assert meta['platforms'] == ['cpu', 'cuda', 'tpu'] and meta['jax_version'] == jax.__version__
  assert meta['checkpoint_step'] == 3 and meta['ema'] == 'params'
  assert meta['workdir'] == os.path.abspath(workdir) and meta['sigma_d'] == 0.5
  assert meta['times'] == pytest.approx(meta_times)


@pytest.mark.parametrize('method, steps, batch, guidance', [
    ('consistency', 1, 4, 1.0), ('consistency', 2, 0, 2.0), ('ode', 3, 0, 1.0)])
def test_exported_equals_sample(run, method, steps, batch, guidance):
  """1-step at a fixed batch, 2-step with CFG (w = 2: two evaluations, baked in) and
  EDM's Heun PF-ODE: the artifact's program is bit for bit the jitted sampler on the
  same noise, and equals Experiment.sample (which draws that noise inside its program)."""
  _, exp, state = run
  params = state.params
  gen = build.export_generator(exp, params, method=method, steps=steps, batch=batch,
                               guidance=guidance).generator()
  ref, noise = _reference(exp, state, 4, steps, method, guidance=guidance)
  labels = np.arange(4) % 10
  out = gen(noise, labels=labels)
  same_program = jax.jit(exp.sampler_fn(method, steps, guidance))(params, noise, labels)
  np.testing.assert_array_equal(out, same_program)
  # Different fusions round differently; Heun works in x / cos t, which multiplies
  # float32 rounding by up to 1 / cos(t_max) = 160.
  tol = 1e-5 if method == 'consistency' else 1e-3
  np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
  assert gen.metadata['nfe'] == (steps if method == 'consistency' else 2 * steps - 1) * (
      2 if guidance != 1 else 1)
  assert gen.metadata['batch'] == (batch or None)


def test_guidance_input_of_a_guidance_conditioned_student():
  """model.guidance_embed: s is an input of the program (a scalar or one per sample)."""
  from scm_jax.core import teachers
  from scm_jax.train.experiment import Experiment
  from tests.test_scale import _perturbed_dit
  c = _config()
  c.model = tiny_dit(guidance_embed=True)
  c.loss.kind, c.teacher.guidance_max = 'scd', 2.0
  model, params, _, _ = _perturbed_dit(c.model, (2, 8, 8, 1), np.array([1, 2]))
  # The teacher (unused by sampling): the student's architecture and weights.
  exp = Experiment(c, dxdt_fn=teachers.make_dxdt_fn(teachers.from_flax_model(model), params,
                                                    0.5))
  gen = build.export_generator(exp, params, steps=2, guidance=1.5).generator()
  assert gen.metadata['guidance_input'] is True and gen.metadata['nfe'] == 2
  labels = np.arange(3)
  noise = np.asarray(exp.sampling_noise(KEY, 3, 'consistency', 2))
  ref = exp.sample(params, 3, 2, key=KEY, labels=labels, guidance=1.9)
  np.testing.assert_allclose(gen(noise, labels, guidance=1.9), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gen(noise, labels, guidance=np.full(3, 1.9)), ref, rtol=1e-5,
                             atol=1e-5)
  default = gen(noise, labels)   # metadata['guidance'] = 1.5
  np.testing.assert_array_equal(default, gen(noise, labels, guidance=1.5))
  mixed = gen(noise, labels, guidance=[1.5, 1.9, 1.5])
  np.testing.assert_allclose(mixed[1], ref[1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed[0], default[0], rtol=1e-5, atol=1e-5)
  assert np.abs(ref - default).max() > 1e-3   # s reaches the network


def _one_line_error(fn, match):
  with pytest.raises(ArtifactError, match=match) as e:
    fn()
  assert '\n' not in str(e.value)


def test_bad_artifacts_and_inputs_one_line_each(run, tmp_path):
  _, exp, state = run
  gen = build.export_generator(exp, state.params, steps=1, batch=2)
  path = str(tmp_path / 'g.jaxexport')
  gen.save(path)
  data = open(path, 'rb').read()

  def bad(name, content):
    p = str(tmp_path / name)
    with open(p, 'wb') as f:
      f.write(content)
    return lambda: load(p)

  _one_line_error(bad('truncated', data[:-100]), 'is truncated')
  _one_line_error(bad('header_cut', data[:len(artifact.MAGIC) + 20]), 'is truncated')
  _one_line_error(bad('magic', b'PK\x03\x04' + data[4:]), 'not a generator artifact')
  _one_line_error(bad('empty', b''), 'not a generator artifact')
  flipped = bytearray(data)
  flipped[-5] ^= 0xFF
  _one_line_error(bad('flipped', bytes(flipped)), 'damaged .checksum')
  with open(tmp_path / 'noprog', 'wb') as f:
    artifact.write(f, b'not a flatbuffer', [np.ones(3, np.float32)], gen.metadata)
  _one_line_error(lambda: load(str(tmp_path / 'noprog')), 'holds no jax.export program')
  cuda = build.export_generator(exp, state.params, steps=1, platforms=('cuda', 'tpu'))
  cuda.save(str(tmp_path / 'cuda'))
  _one_line_error(lambda: load(str(tmp_path / 'cuda')),
                  'exported for cuda,tpu, not for this machine.s cpu.*--platforms=cuda,tpu,cpu')

  g = load(path)
  noise, labels = g.noise(2), np.array([3, 4])
  assert noise.shape == (1, 2, 8, 8, 1) and noise.dtype == np.float32
  np.testing.assert_allclose(g(noise, labels), gen.generator()(noise, labels))
  _one_line_error(lambda: g(g.noise(3), [1, 2, 3]), r'shape \(1, 3, 8, 8, 1\).*takes \(1, 2, 8, 8, 1\)')
  _one_line_error(lambda: g(noise[0], labels), r'shape \(2, 8, 8, 1\)')
  _one_line_error(lambda: g(noise.astype(np.int32), labels), 'noise has dtype int32')
  _one_line_error(lambda: g(noise), 'class-conditional: pass labels')
  _one_line_error(lambda: g(noise, labels.astype(np.float32)), 'labels have dtype float32')
  _one_line_error(lambda: g(noise, [1, 2, 3]), r'labels have shape \(3,\)')
  _one_line_error(lambda: g(noise, [0, 10]), r'labels must be in \[0, 9\]')
  _one_line_error(lambda: g(noise, labels, guidance=2.0), 'no guidance input')
  with pytest.raises(Exception, match='--platforms=gpu: choose among'):
    build.check_platforms(['gpu'])
