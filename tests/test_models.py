"""Tests of scm_jax.models: interface, numerics of jvp, conditioning, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from scm_jax.errors import ConfigError
from scm_jax.models import build_model, default_model_config, layers


@pytest.fixture(scope='module', autouse=True)
def _fast_compiles():
  # XLA's CPU optimizations triple compile time of the U-Net and buy nothing for
  # these tiny shapes; restore the flag for other test modules.
  old = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', old)


def _config(name, **overrides):
  config = default_model_config(name)
  config.update(overrides)
  return config


def _tiny_mlp(**overrides):
  return build_model(_config('mlp', width=32, depth=2, time_embed_dim=16,
                             logvar_channels=16, **overrides))


def _tiny_unet(**overrides):
  kwargs = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), num_heads=2, logvar_channels=16)
  kwargs.update(overrides)
  return build_model(_config('unet', **kwargs))


def _perturb(params, seed=0):
  """Adds lecun-scale noise to every parameter, so zero-init layers are live."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  out = []
  for p in leaves:
    std = 1. / np.sqrt(np.prod(p.shape[:-1])) if p.ndim >= 2 else 0.1
    # numpy arithmetic: no per-shape XLA compiles for the eager adds.
    out.append(jnp.asarray(np.asarray(p) + std * rng.randn(*p.shape),
                           jnp.float32))
  return jax.tree.unflatten(treedef, out)


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _jvp_and_fd_fn(f, h=1e-3):
  """Jitted (params, x, t, tx, tt) -> (jvp tangent, central finite difference)
  of f(params, x, t) along (tx, tt). Params are arguments, not baked constants."""
  @jax.jit
  def both(params, x, t, tx, tt):
    _, tangent = jax.jvp(lambda x, t: f(params, x, t), (x, t), (tx, tt))
    # Both FD points in one vmapped call: one traced forward instead of two.
    plus_minus = jnp.array([1., -1.]) * h
    xs = x[None] + plus_minus.reshape((2,) + (1,) * x.ndim) * tx[None]
    ts = t[None] + plus_minus[:, None] * tt[None]
    fs = jax.vmap(lambda x, t: f(params, x, t))(xs, ts)
    return tangent, (fs[0] - fs[1]) / (2 * h)
  return both


T = jnp.array([0.1, 1.4])


@pytest.fixture(scope='module')
def unet_setup():
  """A tiny conditional U-Net on 8x8x1 with attention at 4x4, and its init."""
  model = _tiny_unet(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x, T, None)
  return model, x, variables, jax.jit(model.apply)


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize('num_classes', [0, 3])
def test_mlp_shapes_and_initial_logvar(num_classes):
  model = _tiny_mlp(num_classes=num_classes)
  x = jax.random.normal(jax.random.key(1), (2, 2))
  labels = jnp.array([0, 3]) if num_classes else None
  variables = model.init(jax.random.key(0), x, T, labels)
  f, logvar = model.apply(variables, x, T, labels, train=True,
                          rngs={'dropout': jax.random.key(2)})
  assert f.shape == (2, 2) and f.dtype == jnp.float32
  assert logvar.shape == (2,) and logvar.dtype == jnp.float32
  np.testing.assert_array_equal(logvar, 0.)
  np.testing.assert_array_equal(f, 0.)  # zero-initialized output layer


def test_unet_shapes_with_and_without_labels(unet_setup):
  model, x, variables, apply = unet_setup
  for labels in (None, jnp.array([0, 3])):
    f, logvar = apply(variables, x, T, labels)
    assert f.shape == x.shape and f.dtype == jnp.float32
    assert logvar.shape == (2,) and logvar.dtype == jnp.float32
    np.testing.assert_array_equal(logvar, 0.)
  assert 'down1_attn0' in variables['params']  # attention really at 4x4


def test_unet_16x16x3_abstract_shapes():
  model = _tiny_unet(attn_resolutions=(8,), head_dim=4, qk_norm=True)
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, None)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  f, logvar = jax.eval_shape(model.apply, variables, x, t, None)
  assert f.shape == (2, 16, 16, 3) and f.dtype == jnp.float32
  assert logvar.shape == (2,) and logvar.dtype == jnp.float32


def test_unet_32x32_four_levels_abstract_shapes():
  model = _tiny_unet(channel_mult=(1, 2, 2, 2), out_channels=6,
                     resample='strided')
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t, None)
  f, _ = jax.eval_shape(model.apply, variables, x, t, None)
  assert f.shape == (1, 32, 32, 6)
  assert 'mid_attn' in variables['params']


def test_logvar_depends_only_on_t():
  model = _tiny_mlp(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (2, 2))
  params = _perturb(model.init(jax.random.key(0), x, T))
  _, lv = model.apply(params, x, T, jnp.array([0, 1]))
  _, lv_other = model.apply(params, 5. * x + 1., T, jnp.array([2, 3]))
  _, lv_t = model.apply(params, x, T + 0.1)
  np.testing.assert_array_equal(lv, lv_other)
  assert np.all(np.abs(lv - lv_t) > 1e-4)


# ------------------------------------------------------------------ jvp


def test_mlp_jvp_matches_finite_differences():
  model = _tiny_mlp()
  x = jax.random.normal(jax.random.key(1), (4, 2))
  t = jnp.array([0.05, 0.5, 1.0, 1.5])
  params = _perturb(model.init(jax.random.key(0), x, t))
  jvp_and_fd = _jvp_and_fd_fn(lambda p, x, t: model.apply(p, x, t)[0])
  directions = {
      't': (jnp.zeros_like(x), jnp.ones_like(t)),
      'x': (jax.random.normal(jax.random.key(3), x.shape), jnp.zeros_like(t)),
  }
  for wrt, (tx, tt) in directions.items():
    tangent, fd = jvp_and_fd(params, x, t, tx, tt)
    assert float(jnp.linalg.norm(fd)) > 1e-2, wrt  # a non-trivial derivative
    assert _rel_err(tangent, fd) < 1e-2, wrt


def test_unet_jvp_matches_finite_differences(unet_setup):
  """Through the whole U-Net, attention included, along t and along x."""
  model, x, variables, _ = unet_setup
  params = _perturb(variables)
  labels = jnp.array([1, 3])
  jvp_and_fd = _jvp_and_fd_fn(lambda p, x, t: model.apply(p, x, t, labels)[0])
  directions = {
      't': (jnp.zeros_like(x), jnp.ones_like(T)),
      'x': (jax.random.normal(jax.random.key(3), x.shape), jnp.zeros_like(T)),
  }
  for wrt, (tx, tt) in directions.items():
    tangent, fd = jvp_and_fd(params, x, T, tx, tt)
    assert float(jnp.linalg.norm(fd)) > 1e-2, wrt
    assert _rel_err(tangent, fd) < 1e-2, wrt


# Attention: tests/test_attention.py.


# ------------------------------------------------------------------ dropout


def test_dropout_is_keyed_and_train_only():
  model = _tiny_mlp(dropout=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 2))
  t = jnp.full((4,), 0.7)
  rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
  variables = _perturb(model.init(rngs, x, t, None))

  def run(key, train=True):
    return model.apply(variables, x, t, train=train, rngs={'dropout': key})[0]

  key_a, key_b = jax.random.key(5), jax.random.key(6)
  np.testing.assert_array_equal(run(key_a), run(key_a))
  assert float(jnp.max(jnp.abs(run(key_a) - run(key_b)))) > 1e-3
  eval_a, eval_b = run(key_a, train=False), run(key_b, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_array_equal(eval_a, model.apply(variables, x, t)[0])
  assert float(jnp.max(jnp.abs(eval_a - run(key_a)))) > 1e-3


# ------------------------------------------------------------------ conditioning


@pytest.mark.parametrize('emb_scale', [0.3, 1., 1000.])
def test_adaptive_double_norm_modulation_has_unit_rms(emb_scale):
  module = layers.AdaptiveNorm(mode='double', norm='group')
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 16))
  emb = emb_scale * jax.random.normal(jax.random.key(1), (3, 32))
  variables = module.init(jax.random.key(2), x, emb)
  y, state = module.apply(variables, x, emb, mutable=['intermediates'])
  for name in ('applied_scale', 'applied_shift'):
    (v,) = state['intermediates'][name]
    assert v.shape == (3, 16)
    rms = np.sqrt(np.mean(np.square(v), axis=-1))
    np.testing.assert_allclose(rms, 1., atol=2e-3)
  # y really is norm(x) * scale + shift, with a per-group normalized x.
  (scale,), (shift,) = (state['intermediates'][f'applied_{n}']
                         for n in ('scale', 'shift'))
  xg = np.asarray(x).reshape(3, 4, 4, 16, 1)  # 16 channels -> 16 groups
  normed = (xg - xg.mean((1, 2, 4), keepdims=True)) / np.sqrt(
      xg.var((1, 2, 4), keepdims=True) + 1e-5)
  expected = normed.reshape(x.shape) * scale[:, None, None] + shift[:, None, None]
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_adagn_modulation_is_not_normalized():
  module = layers.AdaptiveNorm(mode='adagn', norm='layer')
  x = jax.random.normal(jax.random.key(0), (3, 16))
  emb = 1000. * jax.random.normal(jax.random.key(1), (3, 32))
  variables = module.init(jax.random.key(2), x, emb)
  _, state = module.apply(variables, x, emb, mutable=['intermediates'])
  (shift,) = state['intermediates']['applied_shift']
  assert float(jnp.sqrt(jnp.mean(shift ** 2))) > 10.


def test_pixel_norm():
  v = jnp.array([[3., 4.], [0., 0.]])
  np.testing.assert_allclose(
      layers.pixel_norm(v), [[3 / np.sqrt(12.5 + 1e-4), 4 / np.sqrt(12.5 + 1e-4)],
                             [0., 0.]], rtol=1e-6)


def test_num_groups_divides_channels():
  assert [layers.num_groups(c) for c in (8, 32, 48, 96, 100)] == [8, 32, 24, 32,
                                                                  25]


@pytest.mark.parametrize('kind', ['positional', 'fourier'])
def test_time_embedding_applies_scale(kind):
  t = jnp.array([0.0, 0.3, 1.2])
  scaled = layers.TimeEmbedding(dim=16, scale=7., kind=kind)
  unscaled = layers.TimeEmbedding(dim=16, scale=1., kind=kind)
  params = scaled.init(jax.random.key(0), t)
  np.testing.assert_allclose(scaled.apply(params, t),
                             unscaled.apply(params, 7. * t), rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(scaled.apply(params, t)
                               - unscaled.apply(params, t)))) > 1e-2


def test_positional_embedding_is_float32_sinusoid():
  emb = layers.positional_embedding(jnp.array([0., 2.], jnp.bfloat16), 6)
  assert emb.dtype == jnp.float32 and emb.shape == (2, 6)
  freqs = np.exp(-np.log(1e4) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(2 * freqs),
                                                     np.sin(2 * freqs)]),
                             rtol=1e-6)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0])


def test_labels_condition_the_mlp_and_null_is_num_classes():
  model = _tiny_mlp(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (2, 2))
  variables = _perturb(model.init(jax.random.key(0), x, T))
  f = lambda labels: model.apply(variables, x, T, labels)[0]
  assert variables['params']['cond']['label']['embedding'].shape == (4, 16)
  assert float(jnp.max(jnp.abs(f(jnp.array([0, 0])) - f(jnp.array([1, 1]))))) > 1e-3
  np.testing.assert_array_equal(f(None), f(jnp.array([3, 3])))
  assert float(jnp.max(jnp.abs(f(None) - f(jnp.array([2, 2]))))) > 1e-3


def test_labels_condition_the_unet(unet_setup):
  model, x, variables, apply = unet_setup
  params = _perturb(variables)
  f_null = apply(params, x, T, jnp.array([3, 3]))[0]
  f_cls = apply(params, x, T, jnp.array([0, 1]))[0]
  assert _rel_err(f_cls, f_null) > 1e-3


# ------------------------------------------------------------------ dtypes


def test_bf16_unet_matches_float32(unet_setup):
  model, x, variables, apply = unet_setup
  params = _perturb(variables)
  bf16 = _tiny_unet(num_classes=3, dtype='bfloat16')
  f32, _ = apply(params, x, T, None)
  f16, logvar = jax.jit(bf16.apply)(params, x, T, None)
  assert f16.dtype == jnp.float32 and logvar.dtype == jnp.float32
  assert _rel_err(f16, f32) < 5e-2


def test_bf16_mlp_returns_float32():
  model = _tiny_mlp(dtype='bfloat16')
  x = jax.random.normal(jax.random.key(1), (2, 2))
  variables = _perturb(model.init(jax.random.key(0), x, T))
  f, logvar = model.apply(variables, x, T)
  assert f.dtype == jnp.float32 and logvar.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))


# ------------------------------------------------------------------ config


def test_default_config_covers_every_field_and_round_trips():
  for name in ('mlp', 'unet'):
    config = default_model_config(name)
    model = build_model(config)
    assert type(model).__name__ == {'mlp': 'MLP', 'unet': 'UNet'}[name]
  assert default_model_config('unet').channel_mult == (1, 2)
  # Lists from a command line / YAML become hashable tuples.
  config = _config('unet', channel_mult=[1, 2, 2], attn_resolutions=[8])
  assert build_model(config).channel_mult == (1, 2, 2)


def test_build_model_unknown_name():
  with pytest.raises(ConfigError, match="'resnet'.*mlp.*unet"):
    build_model(ml_collections.ConfigDict({'name': 'resnet'}))
  with pytest.raises(ConfigError, match='unet'):
    default_model_config('resnet')


def test_build_model_unknown_key():
  config = _config('mlp')
  config.widht = 64
  with pytest.raises(ConfigError, match=r'model\.widht.*width'):
    build_model(config)


@pytest.mark.parametrize('field, value', [
    ('dtype', 'float16'), ('norm_mode', 'layer'), ('time_embed_kind', 'gauss'),
    ('resample', 'bilinear'), ('attn_impl', 'splash')])
def test_build_model_bad_choices(field, value):
  with pytest.raises(ConfigError, match=f'{field}.*{value}'):
    build_model(_config('unet', **{field: value}))


def test_unet_bad_image_size():
  model = _tiny_unet(channel_mult=(1, 2, 2))
  x = jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  with pytest.raises(ConfigError, match='6x6 is not divisible by 4'):
    jax.eval_shape(model.init, jax.random.key(0), x, t, None)


def test_wrong_rank_inputs():
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  with pytest.raises(ConfigError, match="'unet'"):
    jax.eval_shape(_tiny_mlp().init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32), t, None)
  with pytest.raises(ConfigError, match="'mlp'"):
    jax.eval_shape(_tiny_unet().init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 2), jnp.float32), t, None)
