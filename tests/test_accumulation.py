"""Gradient accumulation (train.microbatches) and per-example randomness.

k microbatches must give the unsplit step's numbers: every example's time, noise,
dropout masks and label dropout come from its own key (the step key folded with its
position in the global batch), whatever batch or microbatch it is computed in.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.config import validate_config
from scm_jax.core import losses
from scm_jax.errors import ConfigError
from scm_jax.models import build_model, default_model_config
from scm_jax.train import step as step_lib
from scm_jax.train.experiment import Experiment
from tests import helpers


def toy_accumulation_config(kind='sct', microbatches=1):
  """A tiny conditional MLP on the ring8 toy with dropout and label dropout, FSDP."""
  c = helpers.toy_config(**{
      'model.width': 32, 'model.depth': 2, 'model.time_embed_dim': 16,
      'model.logvar_channels': 8, 'model.num_classes': 8, 'model.dropout': 0.3,
      'loss.kind': 'sct', 'loss.label_dropout': 0.3, 'loss.tangent_warmup_steps': 4,
      'data.num_train': 256, 'data.prefetch': 0, 'train.batch_size': 32,
      'sharding.strategy': 'fsdp', 'sharding.fsdp_min_size': 64})
  c.loss.kind = kind
  c.train.microbatches = microbatches
  return c


def toy_teacher(config):
  """An sCD teacher drift with guidance (a Partial over weights: a step argument)."""
  from scm_jax.core import teachers
  from scm_jax.train import state as state_lib
  model = build_model(config.model)
  params = state_lib.init_params(model, (2,), jax.random.PRNGKey(7))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(8), p.shape),
                        params)
  return teachers.make_dxdt_fn(teachers.from_flax_model(model, 1.5), params,
                               config.trigflow.sigma_d)


def test_microbatches_equal_the_unsplit_step_on_8_devices_with_fsdp():
  """data=4 x fsdp=2, per-device batch 4 in k = 2 and 4 microbatches vs unsplit (k=1):
  same metrics (time-bucket sums included) and updated state, sCT and sCD; and a k
  that does not divide the per-device batch is refused."""
  helpers.run_python('''
      import jax, numpy as np
      from scm_jax.errors import ConfigError
      from scm_jax.train.experiment import Experiment
      from tests.test_accumulation import toy_accumulation_config, toy_teacher
      assert jax.device_count() == 8
      def run(kind, k):
        c = toy_accumulation_config(kind, k)
        c.mesh.data, c.mesh.fsdp = 4, 2
        exp = Experiment(c, dxdt_fn=toy_teacher(c) if kind == 'scd' else None)
        state = exp.init_state()
        state, m = exp.step(state, next(exp.data_stream(prefetch=0)))
        return jax.device_get(state), jax.device_get(m)
      for kind in ('sct', 'scd'):
        ref_state, ref = run(kind, 1)
        assert ref['t_bucket_count'].sum() == 32 and ref['skipped'] == 0
        for k in (2, 4):
          state, m = run(kind, k)
          assert m.keys() == ref.keys()
          for name in ref:
            np.testing.assert_allclose(m[name], ref[name], rtol=2e-5, atol=1e-6,
                                       err_msg=f'{kind} k={k} {name}')
          for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f'{kind} k={k}')
      try:
        run('sct', 8)  # 32 = 8 x 4 globally, but 4 examples per device
        raise AssertionError('no ConfigError')
      except ConfigError as e:
        assert 'per-device batch 4' in str(e), e
      print('OK')
  ''', devices=8)


def test_microbatches_are_validated():
  c = toy_accumulation_config(microbatches=3)
  with pytest.raises(ConfigError, match='microbatches=3'):
    validate_config(c)                       # 32 examples do not split in 3
  c.train.microbatches = 0
  with pytest.raises(ConfigError, match='microbatches=0'):
    validate_config(c)
  c.train.microbatches = 4
  validate_config(c)


def _dit_with_dropout():
  cfg = default_model_config('dit')
  cfg.update(patch_size=2, hidden_size=16, depth=2, num_heads=2, mlp_ratio=2.0,
             dropout=0.5, remat='full', num_classes=3, freq_dim=16, logvar_channels=8)
  model = build_model(cfg)
  params = model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 4, 4, 2)),
                      jnp.ones(1), jnp.zeros(1, jnp.int32))['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  return model, params


def test_dropout_masks_are_per_example_and_do_not_depend_on_the_batch():
  """An example's output depends on its own key only (dropout inside rematerialized
  DiT blocks included), never on the other rows of the batch it is in."""
  model, params = _dit_with_dropout()
  apply_fn = jax.jit(step_lib.model_apply_fn(model))
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 4, 4, 2))
  t, labels = jnp.full((4,), 0.8), jnp.array([0, 1, 2, 0])
  keys = losses.example_keys(jax.random.PRNGKey(3), 4)
  F = apply_fn(params, x, t, labels, keys)[0]
  F_part = apply_fn(params, x[2:], t[2:], labels[2:], keys[2:])[0]
  np.testing.assert_allclose(F[2:], F_part, rtol=1e-5, atol=1e-6)
  # Same input, other keys: other masks; same keys: the same output.
  x_same = jnp.broadcast_to(x[:1], x.shape)
  F_same = apply_fn(params, x_same, t, jnp.zeros(4, jnp.int32), keys)[0]
  assert float(jnp.abs(F_same[0] - F_same[1]).max()) > 1e-3
  F_rep = apply_fn(params, x_same, t, jnp.zeros(4, jnp.int32), keys[:1].repeat(4, 0))[0]
  np.testing.assert_allclose(F_rep[1], F_rep[0], rtol=1e-6)
  # train=False draws nothing.
  F_eval = step_lib.model_apply_fn(model, train=False)(params, x_same, t, jnp.zeros(4, jnp.int32),
                                                       None)[0]
  np.testing.assert_allclose(F_eval[1], F_eval[0], rtol=1e-6)


def test_loss_draws_per_example_times_and_noise():
  """example_keys(key, B)[i] = fold_in(key, i): a sub-batch given its own keys draws the
  same times and noise as those rows of the full batch."""
  x0 = jax.random.normal(jax.random.PRNGKey(4), (8, 3))
  keys = losses.example_keys(jax.random.PRNGKey(5), 8)
  np.testing.assert_array_equal(keys[5], jax.random.fold_in(jax.random.PRNGKey(5), 5))
  t, z, x_t = losses._noisy_sample(keys, x0, -1.0, 1.4, 0.5)
  t2, z2, x_t2 = losses._noisy_sample(keys[4:], x0[4:], -1.0, 1.4, 0.5)
  np.testing.assert_array_equal(t[4:], t2)
  np.testing.assert_array_equal(z[4:], z2)
  assert len(set(np.asarray(t).tolist())) == 8
