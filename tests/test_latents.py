"""Latent pipeline: SD VAE in Flax, diffusers weight loading, encode CLI, latent training,
decoding at sampling time. A random-init small VAE (same structure, fewer channels)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.data import arrays
from scm_jax.errors import CheckpointError, DataError
from scm_jax.models import vae as vae_lib
from tests import helpers


pytestmark = pytest.mark.usefixtures('fast_compiles')


def tiny_vae_config(path=''):
  c = vae_lib.default_vae_config()
  c.update(dict(path=path, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, batch_size=4, scale=(0.5, 0.6, 0.7, 0.8),
                shift=(0.1, -0.2, 0.0, 0.3)))
  return c


@pytest.fixture(scope='module')
def tiny_vae():
  cfg = tiny_vae_config()
  vae = vae_lib.build_vae(cfg)
  params = jax.jit(lambda k: vae_lib.init_vae_params(vae, k, 16))(jax.random.key(0))
  return cfg, vae, params


def to_diffusers(params) -> dict:
  """Flax params -> a torch-layout state dict with diffusers names (test fixture)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    v = np.asarray(leaf)
    v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else (v.T if v.ndim == 2 else v)
    out[vae_lib._diffusers_key(tuple(k.key for k in path))] = v
  return out


def test_diffusers_names_roundtrip_and_errors(tiny_vae):
  _, _, params = tiny_vae
  sd = to_diffusers(params)
  # The names of diffusers' AutoencoderKL state dict (spot checks of every kind).
  for key in ['encoder.conv_in.weight', 'encoder.down_blocks.0.resnets.0.norm1.weight',
              'encoder.down_blocks.0.downsamplers.0.conv.weight',
              'encoder.down_blocks.1.resnets.0.conv_shortcut.weight',
              'encoder.mid_block.attentions.0.group_norm.bias',
              'encoder.mid_block.attentions.0.to_q.weight',
              'encoder.mid_block.attentions.0.to_out.0.bias', 'encoder.mid_block.resnets.1.conv2.weight',
              'encoder.conv_norm_out.weight', 'encoder.conv_out.weight', 'quant_conv.weight',
              'post_quant_conv.bias', 'decoder.up_blocks.0.resnets.1.conv1.weight',
              'decoder.up_blocks.0.upsamplers.0.conv.weight',
              'decoder.up_blocks.1.resnets.0.conv_shortcut.weight', 'decoder.conv_out.bias']:
    assert key in sd, key
  assert sd['encoder.conv_in.weight'].shape == (8, 3, 3, 3)  # torch OIHW
  template = jax.eval_shape(lambda: params)
  back = vae_lib.params_from_diffusers(sd, template)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # Older diffusers names (query/key/value/proj_attn, 1x1-conv shaped) are accepted.
  legacy = dict(sd)
  for new, old in (('to_q', 'query'), ('to_out.0', 'proj_attn')):
    w = legacy.pop(f'decoder.mid_block.attentions.0.{new}.weight')
    legacy[f'decoder.mid_block.attentions.0.{old}.weight'] = w[:, :, None, None]
    legacy[f'decoder.mid_block.attentions.0.{old}.bias'] = legacy.pop(
        f'decoder.mid_block.attentions.0.{new}.bias')
  back = vae_lib.params_from_diffusers(legacy, template)
  np.testing.assert_array_equal(back['decoder']['mid_block']['attentions_0']['to_q']['kernel'],
                                params['decoder']['mid_block']['attentions_0']['to_q']['kernel'])
  bad = dict(sd)
  del bad['encoder.conv_in.bias']
  bad['encoder.conv_out.weight'] = bad['encoder.conv_out.weight'][:, :4]
  with pytest.raises(CheckpointError, match=r'missing encoder.conv_in.bias(.|\n)*conv_out.weight: shape'):
    vae_lib.params_from_diffusers(bad, template)
  with pytest.raises(CheckpointError, match='unused keys'):
    vae_lib.params_from_diffusers(dict(sd, extra=np.zeros(3)), template)


def test_torch_layout_convolutions_match_torch_semantics():
  """A torch OIHW conv (padding 1) and diffusers' Downsample2D (pad right/bottom, stride 2),
  computed in NCHW by lax, equal the converted Flax convs."""
  import flax.linen as nn
  rng = np.random.RandomState(0)
  w = rng.randn(5, 3, 3, 3).astype(np.float32)
  x = rng.randn(2, 3, 8, 8).astype(np.float32)
  kernel = vae_lib._from_torch_layout(w, (3, 3, 3, 5))
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  ours = nn.Conv(5, (3, 3), padding='SAME', use_bias=False).apply({'params': {'kernel': kernel}}, nhwc)
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, atol=1e-5)
  ref = jax.lax.conv_general_dilated(x, w, (2, 2), ((0, 1), (0, 1)),
                                     dimension_numbers=('NCHW', 'OIHW', 'NCHW'))
  down = nn.Conv(5, (3, 3), (2, 2), padding='VALID', use_bias=False).apply(
      {'params': {'kernel': kernel}}, jnp.pad(nhwc, ((0, 0), (0, 1), (0, 1), (0, 0))))
  np.testing.assert_allclose(down.transpose(0, 3, 1, 2), ref, atol=1e-5)


def test_encode_normalizes_and_decode_inverts_the_normalization(tiny_vae):
  cfg, vae, params = tiny_vae
  images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
  z = vae_lib.encode_fn(vae, cfg)(params, images, jax.random.key(2))
  assert z.shape == (3, 8, 8, 4)
  mean, _ = vae.apply({'params': params}, images, method=vae_lib.AutoencoderKL.encode)
  scale, shift = np.array(cfg.scale), np.array(cfg.shift)
  np.testing.assert_allclose(z, (mean - shift) * scale, rtol=1e-5, atol=1e-6)
  decoded = vae_lib.decode_fn(vae, cfg)(params, z)
  raw = vae.apply({'params': params}, mean, method=vae_lib.AutoencoderKL.decode)
  np.testing.assert_allclose(decoded, jnp.clip(raw, -1, 1), rtol=1e-4, atol=1e-5)
  assert decoded.shape == images.shape


def test_latent_arrays_skip_the_pixel_range_check(tmp_path):
  z = 3.0 * np.random.RandomState(0).randn(6, 4, 4, 4).astype(np.float32)
  np.savez(tmp_path / 'z.npz', latents=z, label=np.arange(6))
  with pytest.raises(DataError, match=r'\[-1, 1\]'):
    arrays.load_array_source(str(tmp_path / 'z.npz'))
  src = arrays.load_array_source(str(tmp_path / 'z.npz'), latents=True)
  np.testing.assert_array_equal(src.get(np.array([4]))['x'], z[4:5])
  # Large sets: memory-mapped .npy with labels beside it.
  np.save(tmp_path / 'z.npy', z)
  np.save(tmp_path / 'z.labels.npy', np.arange(6) % 3)
  src = arrays.load_array_source(str(tmp_path / 'z.npy'), latents=True)
  assert src.num_classes == 3 and src.get(np.array([5]))['label'][0] == 2


CONFIG = '''
from configs import imagenet512_sct
from tests.test_latents import tiny_vae_config

def get_config():
  c = imagenet512_sct.get_config('dit_s')
  c.model.update(dict(hidden_size=16, depth=1, num_heads=2, head_dim=0, freq_dim=16,
                      logvar_channels=16, num_classes=3, dtype='float32',
                      attn_block_size=16))
  c.data.path = {latents!r}
  c.data.expected_shape = (8, 8, 4)
  c.data.prefetch = 0
  c.loss.kind = 'sct'
  c.train.update(dict(batch_size=4, num_steps=2, log_every=1, ckpt_every=2,
                      sample_every=0, progress_bar=False))
  c.mesh.fsdp = 1
  c.mesh.data = -1
  c.vae = tiny_vae_config({vae!r})
  return c
'''


@pytest.mark.slow  # three CLI runs with their compiles
def test_encode_train_and_decode_cli(tmp_path, tiny_vae):
  _, _, params = tiny_vae
  np.savez(tmp_path / 'vae.npz', **to_diffusers(params))
  rng = np.random.RandomState(0)
  np.savez(tmp_path / 'images.npz', x=rng.randint(0, 256, (10, 16, 16, 3), np.uint8),
           label=np.arange(10) % 3)
  latents = str(tmp_path / 'latents.npy')
  cfg = tmp_path / 'latent_config.py'
  cfg.write_text(CONFIG.format(latents=latents, vae=str(tmp_path / 'vae.npz')))
  p = helpers.run_module('scm_jax.encode_latents', f'--config={cfg}',
                         '--config.data.name=array', f'--config.data.path={tmp_path}/images.npz',
                         '--config.data.latents=False', '--config.data.expected_shape=()',
                         f'--out={latents}')
  assert 'wrote' in p.stdout, p.stdout
  z = np.load(latents)
  assert z.shape == (10, 8, 8, 4) and np.all(np.isfinite(z))
  np.testing.assert_array_equal(np.load(latents[:-4] + '.labels.npy'), np.arange(10) % 3)
  workdir = str(tmp_path / 'run')
  helpers.run_module('scm_jax.train', f'--config={cfg}', f'--workdir={workdir}')
  out = str(tmp_path / 'samples')
  helpers.run_module('scm_jax.sample', f'--workdir={workdir}', '--num=4', f'--out={out}')
  s = np.load(out + '.npz')
  assert s['latents'].shape == (4, 8, 8, 4) and s['x'].shape == (4, 16, 16, 3)
  assert np.abs(s['x']).max() <= 1.0 and os.path.exists(out + '.png')
