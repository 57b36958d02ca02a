"""Guidance by a separate guiding network (EDM2), from workdirs: the sCD drift of a
teacher with a guide, the guidance-conditioned student on it, the teacher's guided
PF-ODE samples (library and CLI), and what is refused.

Fast tests use tiny MLPs on the ring8 toy: a conditional teacher and a smaller
unconditional guide (another architecture); autoguidance uses the teacher's own raw
weights as its conditional guide. The quality comparison (slow) is in test_distill.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy2d_scd
from scm_jax.config import validate_config
from scm_jax.core import sampling
from scm_jax.errors import ConfigError
from scm_jax.train import teacher as teacher_lib
from scm_jax.train.experiment import Experiment, load_experiment
from scm_jax.train.loop import train_and_evaluate
from tests import helpers
from tests.test_distill import _copy_config, _student, tiny

pytestmark = pytest.mark.usefixtures('fast_compiles')


def _train(workdir, num_classes, width):
  """4 steps at a large learning rate: weights (and outputs) far from the zero-initialized
  output layer, so the networks differ by O(0.1)."""
  c = tiny(toy2d_scd.get_config('teacher'), num_classes=num_classes)
  c.model.width, c.loss.label_dropout = width, 0.2
  c.optim.lr, c.optim.warmup_steps = 3e-2, 0
  c.train.num_steps = c.train.ckpt_every = 4
  train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A (barely trained) class-conditional diffusion teacher workdir."""
  return _train(str(tmp_path_factory.mktemp('teacher')), 8, 16)


@pytest.fixture(scope='module')
def guide_dir(tmp_path_factory):
  """A smaller unconditional diffusion model (EDM2's CFG guide): width 8, not 16."""
  return _train(str(tmp_path_factory.mktemp('guide')), 0, 8)


def _weights(workdir, ema):
  exp, state = load_experiment(workdir)
  from scm_jax.train import state as state_lib
  return exp.model, state_lib.pick_params(state, ema, exp.config)


def _F(model, params, x, t, labels):
  return model.apply({'params': params}, x, t, labels)[0]


X = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
T = jnp.linspace(0.1, 1.5, 16)
LABELS = jnp.arange(16) % 8


def test_teacher_drift_with_a_guide_network_is_the_formula(teacher_dir, guide_dir):
  """dxdt = sigma_d (F_guide + w (F_teacher - F_guide)) by hand from the two restored
  networks: an unconditional guide of another size (gets no labels) and a conditional
  autoguide (the teacher's slow EMA, gets the labels); fixed w and per-example s of a
  guidance-conditioned student; the guide's weights are leaves of the drift."""
  model, main = _weights(teacher_dir, 'pema_0.05')
  F_m = _F(model, main, X, T, LABELS)
  # Autoguide: the teacher's classic EMA, 4 steps into a 0.999 average (less trained).
  cases = {'uncond': (guide_dir, 'pema_0.1', None),
           'autoguide': (teacher_dir, 'ema_0.999', LABELS)}
  for name, (workdir, ema, guide_labels) in cases.items():
    g_model, g_params = _weights(workdir, ema)
    F_g = _F(g_model, g_params, X, T, guide_labels)
    assert float(jnp.abs(F_g - F_m).max()) > 0.05, name  # the guide differs: checks can fail
    c = _student(teacher_dir, guidance=2.5, guide_workdir=workdir, guide_ema=ema)
    dxdt = Experiment(c).teacher.dxdt_fn
    np.testing.assert_allclose(dxdt(0.5 * X, T, LABELS), 0.5 * (F_g + 2.5 * (F_m - F_g)),
                               atol=1e-5, err_msg=name)
    n_main, n_guide = len(jax.tree.leaves(main)), len(jax.tree.leaves(g_params))
    assert len(jax.tree.leaves(dxdt)) == n_main + n_guide
  # A guidance-conditioned student (unconditional guide): s ~ U[1, 2] per example.
  c = _student(teacher_dir, guidance_max=2.0, guide_workdir=guide_dir)
  c.model.guidance_embed = True
  exp = Experiment(c)
  s = jnp.linspace(1.0, 2.0, 16)
  g_model, g_params = _weights(guide_dir, '')  # '' = its first EMA
  F_g = _F(g_model, g_params, X, T, None)
  np.testing.assert_allclose(exp.teacher.dxdt_fn(0.5 * X, T, LABELS, guidance=s),
                             0.5 * (F_g + s[:, None] * (F_m - F_g)), atol=1e-5)
  state, hist = exp.train(exp.init_state(), 2)
  assert all(np.isfinite(h['loss']) for h in hist)


def test_unconditional_teacher_with_a_guide(guide_dir):
  """Autoguidance needs no labels: an unconditional teacher guided by a guide (here its
  own slow EMA) is allowed with guidance != 1, also for a guidance-conditioned student;
  without a guide it is refused."""
  model, main = _weights(guide_dir, 'pema_0.05')
  _, raw = _weights(guide_dir, 'ema_0.999')
  c = tiny(toy2d_scd.get_config(), num_classes=0)
  c.model.width = 8
  c.teacher.update(workdir=guide_dir, ema='pema_0.05', guidance=2.0, guide_workdir=guide_dir,
                   guide_ema='ema_0.999')
  F_m, F_g = _F(model, main, X, T, None), _F(model, raw, X, T, None)
  assert float(jnp.abs(F_g - F_m).max()) > 0.05
  np.testing.assert_allclose(Experiment(c).teacher.dxdt_fn(0.5 * X, T, None),
                             0.5 * (F_g + 2.0 * (F_m - F_g)), atol=1e-5)
  # An unconditional guidance-conditioned student: its input s reaches the model when
  # sampling without labels (a non-zero guidance embedding makes s matter).
  c2 = c.copy_and_resolve_references()
  c2.teacher.update(guidance=1.0, guidance_max=3.0)
  c2.model.guidance_embed = True
  exp = Experiment(c2)
  s = jnp.linspace(1.0, 3.0, 16)
  np.testing.assert_allclose(exp.teacher.dxdt_fn(0.5 * X, T, None, guidance=s),
                             0.5 * (F_g + s[:, None] * (F_m - F_g)), atol=1e-5)
  params = exp.init_state().params
  params['cond']['guidance']['kernel'] = params['cond']['guidance']['kernel'] + 0.5
  assert exp.evaluations_per_step(2.0) == 1
  x2, x1 = (exp.sample(params, 8, 1, guidance=w) for w in (2.0, 1.0))
  assert float(np.abs(x2 - x1).max()) > 1e-3
  c.teacher.guide_workdir = ''
  with pytest.raises(ConfigError, match='unconditional'):
    Experiment(c).teacher


@pytest.mark.parametrize('changes, message', [
    ({'trigflow.sigma_d': 1.0}, 'guide has trigflow.sigma_d=1.0 but the teacher has 0.5'),
    ({'model.num_classes': 3}, 'guide has model.num_classes=3 but the teacher has 8'),
    ({'loss.kind': 'sct'}, "guide_workdir=.* holds a loss.kind='sct' model"),
])
def test_mismatched_guides_are_refused_before_any_weights_are_read(
    teacher_dir, guide_dir, tmp_path, changes, message):
  bad = _copy_config(guide_dir, str(tmp_path / 'bad'), **changes)  # config.json only
  with pytest.raises(ConfigError, match=message):
    Experiment(_student(teacher_dir, guidance=2.0, guide_workdir=bad)).teacher


def test_guide_settings_are_validated(teacher_dir, guide_dir):
  c = _student(teacher_dir, guidance=2.0, guide_workdir=guide_dir)
  student_params = Experiment(c, dxdt_fn=lambda x, t, l: x).abstract_state.params
  with pytest.raises(ConfigError, match=r'guide_workdir: the guide was trained on data of '
                     r'shape \(2,\) but the teacher on \(3,\)'):
    teacher_lib.resolve(c, (3,), student_params)  # a student on 3-D data
  with pytest.raises(ConfigError, match="guide_ema='nope' of .*no EMA named"):
    Experiment(_student(teacher_dir, guidance=2.0, guide_workdir=guide_dir,
                        guide_ema='nope')).teacher
  validate_config(toy2d_scd.get_config('guide'))  # the recipe's autoguidance guide
  for changes, message in (({'teacher.guidance': 1.0}, 'use the teacher alone'),
                           ({'loss.kind': 'sct'}, 'guide_workdir guides the teacher of sCD'),
                           ({'teacher.guide_step': -2}, 'guide_step')):
    bad = _student(teacher_dir, guidance=2.0, guide_workdir=guide_dir)
    for k, v in changes.items():
      section, field = k.split('.')
      bad[section][field] = v
    with pytest.raises(ConfigError, match=message):
      validate_config(bad)


def test_teacher_pf_ode_with_a_guide_in_the_library_and_the_sample_cli(
    teacher_dir, guide_dir, tmp_path):
  """Experiment.use_guide: the sampler integrates the PF-ODE of the guided F (2 network
  evaluations per step); `scm_jax.sample --guide_workdir` draws the same samples;
  a consistency model refuses a guide."""
  exp, state = load_experiment(teacher_dir)
  exp.use_guide(guide_dir, 'pema_0.1')
  assert exp.evaluations_per_step(2.0) == 2 and exp.evaluations_per_step(1.0) == 1
  key, labels = jax.random.PRNGKey(0), np.arange(16) % 8
  x = exp.sample(state, 16, 3, key=key, labels=labels, method='ode', solver='euler',
                 guidance=2.0)
  model, main = _weights(teacher_dir, exp.config.sample.ema)
  g_model, g_params = _weights(guide_dir, 'pema_0.1')

  def F_by_hand(x, t):
    F_g = _F(g_model, g_params, x, t, None)
    return F_g + 2.0 * (_F(model, main, x, t, jnp.asarray(labels)) - F_g)
  ref = sampling.sample_pf_ode(F_by_hand, key, (16, 2), 0.5, 3, 'euler',
                               exp.config.sample.ode_schedule, exp.config.sample.sigma_max)
  np.testing.assert_allclose(x, ref, atol=1e-5)
  unguided = exp.sample(state, 16, 3, key=key, labels=labels, method='ode', solver='euler',
                        guidance=1.0)
  assert float(np.abs(unguided - x).max()) > 0.05

  out = str(tmp_path / 'guided')
  helpers.run_module('scm_jax.sample', f'--workdir={teacher_dir}', '--ode=3', '--solver=euler',
                     '--guidance=2', f'--guide_workdir={guide_dir}', '--guide_ema=pema_0.1',
                     '--num=16', '--seed=0', f'--out={out}')
  np.testing.assert_allclose(np.load(out + '.npz')['x'], x, atol=1e-5)

  student = Experiment(_student(teacher_dir))
  with pytest.raises(ConfigError, match="guides a diffusion model, this run has loss.kind='scd'"):
    student.use_guide(guide_dir)


@pytest.mark.slow
def test_sharded_microbatched_guided_student_step_equals_single_device(teacher_dir, guide_dir):
  """A guidance-conditioned student on a teacher with a guide, on 8 CPU devices (data 4 x
  fsdp 2, 2 microbatches per device): the guide's weights are step arguments sharded by
  the same rules as the teacher's, and the steps equal one device without microbatches."""
  helpers.run_python(f'''
      import jax
      from tests import helpers
      from tests.test_distill import _student
      from scm_jax.train.experiment import Experiment
      def config(devices, microbatches):
        c = _student({teacher_dir!r}, guidance_max=2.0, guide_workdir={guide_dir!r})
        c.model.guidance_embed = True
        c.sharding.strategy, c.sharding.fsdp_min_size = 'fsdp', 16
        c.mesh.data, c.mesh.fsdp = (4, 2) if devices == 8 else (1, 1)
        c.train.microbatches = microbatches
        return c
      c8 = config(8, 2)
      teacher = Experiment(c8).teacher
      e8 = Experiment(c8, dxdt_fn=teacher.dxdt_fn, init_params=teacher.init_params)
      e1 = Experiment(config(1, 1), dxdt_fn=teacher.dxdt_fn, init_params=teacher.init_params,
                      devices=jax.devices()[:1])
      (drift,) = e8.teacher_args
      specs = [x.sharding.spec for x in jax.tree.leaves(drift.args[0]['guide'])]
      assert any('fsdp' in tuple(sp) for sp in specs), specs
      helpers.assert_same_steps(e8, e1, 2)
  ''', devices=8)
