"""EDM2 config G (models/edm2.py): sizes, magnitude preservation, jvp, FSDP, forced WN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scm_jax.core import trigflow
from scm_jax.models import build_model, edm2
from tests import helpers
from tests.test_models import _jvp_and_fd_fn, _perturb, _rel_err

TINY = dict(name='edm2', channels=32, channel_mult=(1, 2, 2), num_blocks=2,
            attn_resolutions=(8, 4), channels_per_head=16, num_classes=10,
            logvar_channels=16)


def _abstract_params(model, shape=(1, 64, 64, 4)):
  """The parameter tree's shapes (jax.eval_shape: nothing is allocated)."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
  labels = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, labels)['params']


def _flat_sizes(tree):
  return {jax.tree_util.keystr(p): int(np.prod(a.shape))
          for p, a in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('size', ['s', 'xxl', *[pytest.param(s, marks=pytest.mark.slow)
                                                for s in ('m', 'l', 'xl')]])
def test_plain_config_g_parameter_counts_match_the_tables(size):
  """EDM2 config G (sCM changes off) on 64x64x4 latents with 1000 classes: the counts of
  Lu & Song 2024 Tables 4-5 (EDM2's own sizes), within 0.5%. The sCM network differs
  exactly by one shift projection (emb_dim x block width) per block in place of EDM2's
  scalar modulation gain (printed: the counts the README reports)."""
  plain = _flat_sizes(_abstract_params(build_model(
      dict(edm2.size_config(size), num_classes=1000, **edm2.PLAIN))))
  n_plain = sum(plain.values())
  assert abs(n_plain / (edm2.PAPER_PARAMS_M[size] * 1e6) - 1) < 0.005, n_plain
  scm = _flat_sizes(_abstract_params(build_model(dict(edm2.size_config(size),
                                                      num_classes=1000))))
  # The heads differ by design: plain EDM2 has EDM2's uncertainty head (MPFourier ->
  # MPConv) and Fourier buffers, sCM a positional logvar head; compare the rest.
  head = lambda k: 'logvar' in k or "['fourier']" in k
  plain = {k: v for k, v in plain.items() if not head(k)}
  scm = {k: v for k, v in scm.items() if not head(k)}
  n_plain = sum(plain.values())
  rename = lambda k: k.replace("'emb_scale'", "'emb_linear'")
  scm_only = {k for k in scm if rename(k) not in plain}
  plain_only = {k for k in plain if k.replace("'emb_linear'", "'emb_scale'") not in scm}
  assert scm_only and all("'emb_shift'" in k for k in scm_only)
  assert plain_only and all("'emb_gain'" in k for k in plain_only)
  assert len(scm_only) == len(plain_only)  # one per block
  extra = sum(scm[k] for k in scm_only) - len(plain_only)
  assert sum(scm.values()) == n_plain + extra
  print(f'{size}: plain {n_plain / 1e6:.1f}M, sCM {sum(scm.values()) / 1e6:.1f}M')


@pytest.mark.parametrize('extra', [{}, edm2.PLAIN], ids=['scm', 'plain'])
def test_initialised_network_preserves_unit_magnitude(extra):
  """Unit-variance input -> every block's output has RMS within 25% of 1 (EDM2's design
  goal), at small, medium and large t; with the zero-init output gain set to 1 the
  output has unit RMS too."""
  model = build_model(dict(TINY, **extra))
  x = jax.random.normal(jax.random.key(1), (16, 16, 16, 4))
  labels = jnp.arange(16) % 10
  params = model.init(jax.random.key(0), x, jnp.full((16,), 1.0), labels)['params']
  params['out_gain'] = jnp.ones(())
  apply = jax.jit(lambda p, t: model.apply({'params': p}, x, t, labels,
                                           mutable=['intermediates']))
  for t in (0.3, 1.0, 1.5):
    (F, _), inter = apply(params, jnp.full((16,), t))
    rms = [float(jnp.sqrt(jnp.mean(jnp.square(a)))) for a in jax.tree.leaves(inter)]
    assert len(rms) == 8 + 13  # every block (encoder 8, decoder 13) sowed its output
    assert 0.75 < min(rms) and max(rms) < 1.25, rms
    assert 0.75 < float(jnp.sqrt(jnp.mean(jnp.square(F)))) < 1.25


def test_jvp_matches_central_differences_through_attention():
  """jax.jvp of F (MPConv weight normalization, cosine attention, double norm) along t
  and along x agrees with central finite differences."""
  model = build_model(dict(TINY, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t = jnp.array([0.2, 1.3])
  params = _perturb(model.init(jax.random.key(0), x, t, jnp.array([1, 10])))
  jvp_and_fd = _jvp_and_fd_fn(lambda p, x, t: model.apply(p, x, t, jnp.array([1, 10]))[0])
  for tx, tt in ((jnp.zeros_like(x), jnp.ones_like(t)),
                 (jax.random.normal(jax.random.key(3), x.shape), jnp.zeros_like(t))):
    tangent, fd = jvp_and_fd(params, x, t, tx, tt)
    assert float(jnp.linalg.norm(fd)) > 1e-2
    assert _rel_err(tangent, fd) < 1e-2


def test_forced_weight_normalization():
  """The forward pass is invariant to the stored weights' norms (normalized at use), and
  the optimizer's projection puts every MPConv weight back on its sphere."""
  from scm_jax.train import state as state_lib
  model = build_model(dict(TINY, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t = jnp.array([0.5, 1.0])
  params = _perturb(model.init(jax.random.key(0), x, t)['params'])
  scaled = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 3.0 if jax.tree_util.keystr(p).endswith("['weight']") else a, params)
  F, _ = model.apply({'params': params}, x, t)
  # Up to EDM2's eps = 1e-4 in normalize (w / (eps + ||w|| / sqrt(n))), compounded over
  # the layers: a relative change of ~1e-4 per layer.
  np.testing.assert_allclose(model.apply({'params': scaled}, x, t)[0], F, rtol=1e-3,
                             atol=3e-4)
  # One Adam step through the projection: the stored weights are unit-RMS per channel.
  tx = state_lib.make_optimizer(_optimizer_config(lr=0.1))
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, t)[0] ** 2))(scaled)
  updates, _ = tx.update(grads, tx.init(scaled), scaled)
  new = optax.apply_updates(scaled, updates)
  for path, w in jax.tree_util.tree_leaves_with_path(new):
    if jax.tree_util.keystr(path).endswith("['weight']"):
      rms = np.sqrt(np.mean(np.square(np.asarray(w)).reshape(-1, w.shape[-1]), axis=0))
      np.testing.assert_allclose(rms, 1.0, rtol=1e-3)
  assert not np.allclose(new['out_gain'], scaled['out_gain'])  # other leaves train freely


def _optimizer_config(lr):
  from scm_jax.config import base_config
  c = base_config('edm2')
  c.optim.lr, c.optim.grad_clip = lr, 0.0
  return c


def test_edm_parameterization_is_edm2_preconditioning():
  """parameterization='edm': D = c_skip x_sigma + c_out F_net with EDM2's c_in, c_skip,
  c_out and c_noise = ln(sigma) / 4 equals TrigFlow's x0 = cos t x_t - sigma_d sin t F."""
  model = build_model(dict(TINY, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                           **edm2.PLAIN))
  sd = 0.5
  x_t = sd * jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
  t = jnp.array([0.1, 0.8, 1.5])
  params = _perturb(model.init(jax.random.key(0), x_t / sd, t))
  F = model.apply(params, x_t / sd, t)[0]
  x0_trig = trigflow.consistency_fn(x_t, F, t, sd)
  x_sigma, sigma = trigflow.edm_inputs(x_t, t, sd)
  s = sigma[:, None, None, None]
  c_in, c_skip = 1 / jnp.sqrt(sd**2 + s**2), sd**2 / (sd**2 + s**2)
  c_out = s * sd / jnp.sqrt(sd**2 + s**2)
  F_net = -model.apply(params, c_in * x_sigma, t)[0]  # the raw network output
  np.testing.assert_allclose(c_skip * x_sigma + c_out * F_net, x0_trig, rtol=1e-4, atol=1e-5)


def test_fsdp_step_equals_single_device():
  """A tiny EDM2 on digits, data=4 x fsdp=2 on 8 CPU devices vs one device: same losses and
  state after 2 sCT steps (forced weight normalization included); weights are sharded."""
  helpers.run_python('''
      import jax
      jax.config.update('jax_disable_most_optimizations', True)
      from tests import helpers
      from tests.test_train import tiny_digits_config
      from scm_jax.config import base_config
      from scm_jax.train.experiment import Experiment
      def config():
        c = tiny_digits_config()
        c.model = base_config('edm2').model
        c.model.update(dict(channels=16, channel_mult=(1, 2), num_blocks=1,
                            attn_resolutions=(4,), channels_per_head=8, logvar_channels=16,
                            dropout=0.1))
        return c
      c8, c1 = config(), config()
      c8.mesh.data, c8.mesh.fsdp = 4, 2
      c8.sharding.strategy, c8.sharding.fsdp_min_size = 'fsdp', 256
      c1.mesh.data = 1
      e8, e1 = Experiment(c8), Experiment(c1, devices=jax.devices()[:1])
      specs = {str(s.spec) for s in jax.tree.leaves(e8.state_shardings.params)}
      assert any('fsdp' in s for s in specs), specs
      helpers.assert_same_steps(e8, e1, 2)
  ''', devices=8)


@pytest.mark.parametrize('name', ['edm2', 'unet'])
def test_guidance_input_is_embedded_like_t_and_starts_at_zero(name):
  """model.guidance_embed: s is an input (None = 1) whose embedding starts at zero (the
  student starts as its teacher) and, once trained, changes F; without the field a
  guidance input is refused."""
  from scm_jax.errors import ConfigError
  from tests.test_models import _tiny_unet
  if name == 'edm2':
    make = lambda **kw: build_model(dict(TINY, channel_mult=(1, 2), num_blocks=1,
                                         attn_resolutions=(4,), **kw))
  else:
    make = lambda **kw: _tiny_unet(num_classes=10, **kw)
  model = make(guidance_embed=True)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, labels = jnp.array([0.5, 1.2]), jnp.array([3, 10])
  params = model.init(jax.random.key(0), x, t, labels, jnp.ones(2))['params']
  F = lambda p, s: model.apply({'params': p}, x, t, labels, s)[0]
  np.testing.assert_array_equal(F(params, jnp.array([1.0, 2.0])), F(params, None))
  live = _perturb(params)
  assert float(jnp.abs(F(live, jnp.array([1.0, 2.0])) - F(live, None)).max()) > 1e-3
  np.testing.assert_allclose(F(live, 1.0), F(live, None), atol=1e-6)
  plain = make()
  with pytest.raises(ConfigError, match='guidance_embed'):
    plain.init(jax.random.key(0), x, t, labels, jnp.ones(2))
