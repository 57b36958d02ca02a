"""Scale: DiT, bf16, remat, big configs, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.models import build_model, default_model_config, dit


pytestmark = pytest.mark.usefixtures('fast_compiles')


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# Blockwise / Pallas attention: tests/test_attention.py.


# ------------------------------------------------------------------ DiT


def tiny_dit_config(**overrides):
  c = default_model_config('dit')
  c.update(dict(patch_size=2, hidden_size=16, depth=2, num_heads=2, freq_dim=16,
                logvar_channels=16))
  c.update(overrides)
  return c


def _perturbed_dit(config, shape=(2, 8, 8, 4), labels=None):
  model = build_model(config)
  x = jax.random.normal(jax.random.key(1), shape)
  t = jnp.array([0.3, 1.2])[:shape[0]]
  params = jax.jit(model.init)(jax.random.key(0), x, t, labels)['params']
  # Zero-initialized output layers make F = 0; perturb everything so F is live.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(kk, p.shape)
                                     for p, kk in zip(leaves, keys)])
  return model, params, x, t


def test_patchify_roundtrip_and_token_order():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  tokens = dit.patchify(x, 2)
  assert tokens.shape == (2, 6, 12)
  np.testing.assert_array_equal(tokens[0, 1], x[0, 0:2, 2:4].reshape(-1))
  np.testing.assert_array_equal(dit.unpatchify(tokens, 2, 4, 6), x)


def test_dit_starts_at_zero_and_conditions_on_t_and_labels():
  model = build_model(tiny_dit_config(num_classes=3))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  apply = jax.jit(model.apply)
  variables = jax.jit(model.init)(jax.random.key(0), x, jnp.array([0.3, 1.2]), None)
  f, logvar = apply(variables, x, jnp.array([0.3, 1.2]), jnp.array([0, 3]))
  assert f.shape == x.shape and f.dtype == jnp.float32 and logvar.shape == (2,)
  np.testing.assert_array_equal(f, 0.)  # zero-init final layer
  params = {'params': _perturbed_dit(tiny_dit_config(num_classes=3))[1]}
  fa = apply(params, x, jnp.array([0.3, 1.2]), jnp.array([0, 1]))[0]
  fb = apply(params, x, jnp.array([0.3, 1.2]), jnp.array([2, 1]))[0]
  ft = apply(params, x, jnp.array([0.4, 1.2]), jnp.array([0, 1]))[0]
  assert float(jnp.abs(fa - fb)[0].max()) > 1e-3 and float(jnp.abs(fa - fb)[1].max()) == 0.
  assert float(jnp.abs(fa - ft)[0].max()) > 1e-3


@pytest.mark.parametrize('impl, remat', [pytest.param('flash', 'none', marks=pytest.mark.slow),
                                         ('flash', 'dots_no_batch'), ('pallas', 'full')])
def test_dit_fused_attention_equals_xla_in_value_jvp_and_grad(impl, remat):
  """The whole network with attn_impl='flash' / 'pallas' (and remat) vs 'xla': same F,
  same sCM-style jvp along (x, t), same parameter gradient."""
  cfg = tiny_dit_config(attn_impl=impl, attn_block_size=16 if impl == 'pallas' else 4,
                        attn_block_q=16, remat=remat)
  model, params, x, t = _perturbed_dit(cfg)
  ref = build_model(tiny_dit_config())
  tx, tt = jax.random.normal(jax.random.key(3), x.shape), jnp.ones_like(t)

  def run(m):
    f = lambda p, x, t: m.apply({'params': p}, x, t)[0]
    out, tan = jax.jvp(lambda x, t: f(params, x, t), (x, t), (tx, tt))
    grad = jax.grad(lambda p: jnp.sum(f(p, x, t) * tan))(params)
    return out, tan, grad
  out, tan, grad = jax.jit(lambda: run(model))()
  out_r, tan_r, grad_r = jax.jit(lambda: run(ref))()
  assert float(jnp.abs(tan_r).max()) > 1e-2
  np.testing.assert_allclose(out, out_r, atol=1e-5)
  np.testing.assert_allclose(tan, tan_r, atol=1e-4, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_r)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)


def test_dit_bfloat16_keeps_float32_params_and_tracks_float32():
  model32, params, x, t = _perturbed_dit(tiny_dit_config(attn_impl='flash'))
  model16 = build_model(tiny_dit_config(attn_impl='flash', dtype='bfloat16'))
  variables = jax.eval_shape(model16.init, jax.random.key(0), x, t, None)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))  # master weights
  tx, tt = jnp.zeros_like(x), jnp.ones_like(t)
  outs = [jax.jit(lambda x, t, m=m: jax.jvp(lambda x, t: m.apply({'params': params}, x, t)[0],
                                            (x, t), (tx, tt)))(x, t)
          for m in (model32, model16)]
  (f32, j32), (f16, j16) = outs
  assert f16.dtype == j16.dtype == jnp.float32
  assert 0 < _rel(f16, f32) < 5e-2
  assert 0 < _rel(j16, j32) < 1e-1


def test_unet_remat_gives_the_same_loss_gradient():
  cfg = default_model_config('unet')
  cfg.update(dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                  num_heads=2, logvar_channels=16))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  t = jnp.array([0.3, 1.2])
  grads = []
  for remat in ('none', 'full'):
    cfg.remat = remat
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), x, t)['params']
    loss = lambda p: jnp.sum(jnp.sin(model.apply({'params': p}, x, t)[0] + x))
    grads.append(jax.jit(jax.grad(loss))(params))
  assert float(jnp.abs(grads[0]['conv_out']['kernel']).max()) > 0
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ configs


def _num_params(config):
  model = build_model(config.model)
  x = jax.ShapeDtypeStruct((1,) + tuple(config.data.expected_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)  # no allocation
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))


@pytest.mark.parametrize('size', [
    'dit_xxl', 'unet_xxl', 'dit_s',
    *[pytest.param(s, marks=pytest.mark.slow)
      for s in ('dit_b', 'dit_l', 'dit_xl', 'unet_s', 'unet_m', 'unet_l', 'unet_xl')]])
def test_imagenet512_param_counts_match_stated_size(size):
  """The alternative backbones of configs/imagenet512_*.py (EDM2's sizes: test_edm2.py)."""
  from configs import imagenet512_sct, paper
  config = imagenet512_sct.get_config(size)
  n = _num_params(config)
  assert abs(n / paper.ALTERNATIVE_PARAMS[size] - 1) < 0.01, n
  if size.endswith('xxl'):
    assert 1.45e9 < n < 1.55e9  # the paper's 1.5B scale


# ------------------------------------------------------------------ sharding


def test_mesh_shape_from_config():
  import ml_collections
  from scm_jax.infra import sharding
  from scm_jax.errors import ConfigError
  mesh = lambda **kw: ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, tensor=1), **kw))
  assert sharding.mesh_shape(mesh(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(mesh(fsdp=-1), 8) == (1, 8, 1)
  assert sharding.mesh_shape(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), 4) == (4, 1, 1)
  for bad, match in ((mesh(data=-1, fsdp=-1), 'at most one'), (mesh(data=-1, fsdp=3), 'divide'),
                     (mesh(data=2, fsdp=2), '4 devices, but 8')):
    with pytest.raises(ConfigError, match=match):
      sharding.mesh_shape(bad, 8)


def test_dit_fsdp_and_tensor_parallel_step_equals_single_device():
  """data=2 x fsdp=2 x tensor=2 on 8 CPU devices (DiT tensor-parallel rules, the rest
  FSDP) vs one device: same losses and same state after 2 steps."""
  from tests import helpers
  helpers.run_python('''
      import jax, numpy as np
      jax.config.update('jax_disable_most_optimizations', True)
      from tests.test_train import tiny_digits_config
      from tests.test_scale import tiny_dit_config
      from scm_jax.infra import sharding
      from scm_jax.models import dit
      from scm_jax.train.experiment import Experiment
      def config():
        c = tiny_digits_config()
        c.model = tiny_dit_config(depth=1)
        return c
      c8 = config()
      c8.mesh.data, c8.mesh.fsdp, c8.mesh.tensor = 2, 2, 2
      c8.sharding.strategy, c8.sharding.fsdp_min_size = 'fsdp', 16
      c8.sharding.rules = dit.tensor_parallel_rules()
      c1 = config()
      c1.mesh.data = 1
      e8, e1 = Experiment(c8), Experiment(c1, devices=jax.devices()[:1])
      specs = {str(s.spec) for s in jax.tree.leaves(e8.state_shardings)}
      assert {"P('fsdp', 'tensor')", "P('tensor', 'fsdp')", "P('tensor',)"} <= specs, specs
      s8, s1 = e8.init_state(), e1.init_state()
      it = e1.data_stream(prefetch=0)
      b = next(it)
      hlo = e8.jit_step.lower(s8, sharding.put_batch(b, e8.mesh)).as_text()
      assert 'sharding_constraint' in hlo  # activations pinned to the batch axes
      for _ in range(2):
        s8, m8 = e8.step(s8, b)
        s1, m1 = e1.step(s1, b)
        np.testing.assert_allclose(m8['loss'], m1['loss'], rtol=1e-5)
        b = next(it)
      for a, b in zip(jax.tree.leaves(jax.device_get(s8)), jax.tree.leaves(jax.device_get(s1))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  ''', devices=8)
