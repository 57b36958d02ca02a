"""The Stable Diffusion VAE (AutoencoderKL) in Flax, for latent-space sCM.

Lu & Song 2024 train their ImageNet 512x512 models (Sec. 5) in the 64x64x4 latent
space of the Stable Diffusion VAE, like EDM2. This module reproduces the diffusers
`AutoencoderKL` architecture (DownEncoderBlock2D / UpDecoderBlock2D, one
single-head attention in each mid block, GroupNorm(32, eps 1e-6), SiLU) with
parameter names that mirror the diffusers state dict, so that
`params_from_diffusers` converts a `diffusion_pytorch_model.safetensors` by name
(transposing conv/linear weights) and fails loudly on any missing or extra key.

Latent normalization: latents = (posterior_mean - shift) * scale, per channel or
scalar. SD's convention is shift 0, scale 0.18215; EDM2 normalizes each channel by
its ImageNet statistics to std 0.5 (= sigma_d). Decoding inverts it.
"""

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scm_jax.errors import CheckpointError, ConfigError
from scm_jax.infra import files

ARCH_FIELDS = ('in_channels', 'out_channels', 'block_out_channels', 'layers_per_block',
               'latent_channels', 'norm_num_groups')


def default_vae_config() -> ml_collections.ConfigDict:
  """config.vae: the SD VAE (sd-vae-ft-mse / ema) architecture and latent scaling."""
  return ml_collections.ConfigDict({
      'path': '',            # converted weights (.npz) or diffusers .safetensors; '' = none
      'in_channels': 3,
      'out_channels': 3,
      'block_out_channels': (128, 256, 512, 512),
      'layers_per_block': 2,
      'latent_channels': 4,
      'norm_num_groups': 32,
      'scale': (0.18215,),   # latents = (mean - shift) * scale; 1 or latent_channels values
      'shift': (0.0,),
      'sample_posterior': False,  # encode to the posterior mean (False) or a sample
      'batch_size': 16,      # images per encode/decode call
  })


def build_vae(vae_config) -> 'AutoencoderKL':
  cfg = {k: vae_config[k] for k in ARCH_FIELDS}
  cfg['block_out_channels'] = tuple(cfg['block_out_channels'])
  for ch in cfg['block_out_channels']:
    if ch % cfg['norm_num_groups']:
      raise ConfigError(f'config.vae.block_out_channels={cfg["block_out_channels"]} must be '
                        f'multiples of norm_num_groups={cfg["norm_num_groups"]}.')
  return AutoencoderKL(**cfg)


def _norm(groups: int, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(groups, epsilon=1e-6, dtype=jnp.float32, name=name)


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1,
          padding: Any = 'SAME') -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""
  features: int
  groups: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, 'conv1')(nn.silu(_norm(self.groups, 'norm1')(x)))
    h = _conv(self.features, 'conv2')(nn.silu(_norm(self.groups, 'norm2')(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 'conv_shortcut', kernel=1)(x)
    return x + h


class MidAttention(nn.Module):
  """diffusers Attention in the VAE mid block: one head over all H*W positions."""
  groups: int

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = _norm(self.groups, 'group_norm')(x).reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, name=n)(tokens) for n in ('to_q', 'to_k', 'to_v'))
    logits = jnp.einsum('bqc,bkc->bqk', q, k) / np.sqrt(c)
    out = jnp.einsum('bqk,bkc->bqc', jax.nn.softmax(logits, axis=-1), v)
    return x + nn.Dense(c, name='to_out_0')(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name='resnets_0')(x)
    x = MidAttention(self.groups, name='attentions_0')(x)
    return ResnetBlock(c, self.groups, name='resnets_1')(x)


class Encoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int

  @nn.compact
  def __call__(self, x):
    x = _conv(self.block_out_channels[0], 'conv_in')(x)
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        x = ResnetBlock(ch, self.groups, name=f'down_blocks_{i}_resnets_{j}')(x)
      if i < last:
        # diffusers Downsample2D(padding=0): pad right/bottom by one, 3x3 stride 2.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = _conv(ch, f'down_blocks_{i}_downsamplers_0_conv', stride=2, padding='VALID')(x)
    x = MidBlock(self.groups, name='mid_block')(x)
    x = nn.silu(_norm(self.groups, 'conv_norm_out')(x))
    return _conv(2 * self.latent_channels, 'conv_out')(x)


class Decoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, z):
    channels = tuple(reversed(self.block_out_channels))
    x = _conv(channels[0], 'conv_in')(z)
    x = MidBlock(self.groups, name='mid_block')(x)
    for i, ch in enumerate(channels):
      for j in range(self.layers_per_block + 1):
        x = ResnetBlock(ch, self.groups, name=f'up_blocks_{i}_resnets_{j}')(x)
      if i < len(channels) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest
        x = _conv(ch, f'up_blocks_{i}_upsamplers_0_conv')(x)
    x = nn.silu(_norm(self.groups, 'conv_norm_out')(x))
    return _conv(self.out_channels, 'conv_out')(x)


class AutoencoderKL(nn.Module):
  """SD VAE. encode: images [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, C];
  decode: raw latents -> images. f = 2^(len(block_out_channels) - 1) (8 for SD)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32

  def setup(self):
    g = self.norm_num_groups
    self.encoder = Encoder(self.block_out_channels, self.layers_per_block,
                           self.latent_channels, g)
    self.quant_conv = _conv(2 * self.latent_channels, 'quant_conv', kernel=1)
    self.post_quant_conv = _conv(self.latent_channels, 'post_quant_conv', kernel=1)
    self.decoder = Decoder(self.block_out_channels, self.layers_per_block,
                           self.out_channels, g)

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30., 20.)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    return self.decode(self.encode(x)[0])

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def init_vae_params(vae: AutoencoderKL, key, image_size: int = 32):
  x = jnp.zeros((1, image_size, image_size, vae.in_channels), jnp.float32)
  return vae.init(key, x)['params']


# ----------------------------------------------------------------- diffusers weights

# Names that moved between diffusers versions (old attention blocks).
_LEGACY_ATTENTION = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def _diffusers_key(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers state-dict key (e.g. ('encoder', 'down_blocks_0_resnets_1',
  'conv1', 'kernel') -> 'encoder.down_blocks.0.resnets.1.conv1.weight')."""
  parts = []
  for p in path[:-1]:
    # Re-join snake_case words, turning every numeric token into its own '.'-part.
    out, cur = [], []
    for tok in p.split('_'):
      if tok.isdigit():
        out.append('_'.join(cur))
        out.append(tok)
        cur = []
      else:
        cur.append(tok)
    if cur:
      out.append('_'.join(cur))
    parts.extend(out)
  leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[path[-1]]
  return '.'.join(parts + [leaf])


def _from_torch_layout(value: np.ndarray, expected_shape: tuple) -> np.ndarray:
  """torch Conv [O, I, kh, kw] -> [kh, kw, I, O]; Linear [O, I] (or a 1x1 conv used as
  a linear layer in older checkpoints) -> [I, O]; vectors unchanged."""
  value = np.asarray(value, np.float32)
  if len(expected_shape) == 4:
    value = value.transpose(2, 3, 1, 0)
  elif len(expected_shape) == 2:
    value = value.reshape(value.shape[0], value.shape[1]).T
  return value


def params_from_diffusers(state_dict: Mapping[str, np.ndarray], template) -> dict:
  """Converts a diffusers AutoencoderKL state dict to Flax params shaped like `template`.

  Raises CheckpointError listing missing keys, wrong shapes and unused keys.
  """
  flat = jax.tree_util.tree_flatten_with_path(template)[0]
  used, out, errors = set(), {}, []
  for path, leaf in flat:
    names = tuple(str(getattr(k, 'key', k)) for k in path)
    key = _diffusers_key(names)
    if key not in state_dict:
      for new, old in _LEGACY_ATTENTION.items():
        alt = key.replace(f'.{new}.', f'.{old}.')
        if alt != key and alt in state_dict:
          key = alt
          break
    if key not in state_dict:
      errors.append(f'missing {key} (for {"/".join(names)}, shape {tuple(leaf.shape)})')
      continue
    value = _from_torch_layout(state_dict[key], tuple(leaf.shape))
    if value.shape != tuple(leaf.shape):
      errors.append(f'{key}: shape {tuple(np.shape(state_dict[key]))} does not fit '
                    f'{tuple(leaf.shape)}')
      continue
    used.add(key)
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = value
  unused = sorted(k for k in state_dict if k not in used)
  if unused and not errors:
    errors.append(f'{len(unused)} unused keys, e.g. {unused[:5]}')
  if errors:
    raise CheckpointError('the VAE weights do not match config.vae (a diffusers '
                          'AutoencoderKL state dict is expected):\n  ' +
                          '\n  '.join(errors[:20]) +
                          (f'\n  ... and {len(errors) - 20} more' if len(errors) > 20 else ''))
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} from .npz, .safetensors (needs the `safetensors` package) or a
  torch .bin/.pt/.ckpt (needs torch)."""
  if not os.path.isfile(path):
    raise CheckpointError(f'VAE weights {path} do not exist; set config.vae.path (or --vae).')
  ext = os.path.splitext(path)[1].lower()
  try:
    if ext == '.npz':
      return files.read_npz(path)
    if ext == '.safetensors':
      try:
        from safetensors.numpy import load_file
      except ImportError:
        raise CheckpointError('reading .safetensors needs `pip install safetensors`; or '
                              'convert the file to .npz on a machine that has it.') from None
      return load_file(path)
    if ext in ('.bin', '.pt', '.pth', '.ckpt'):
      try:
        import torch
      except ImportError:
        raise CheckpointError(f'reading {ext} needs torch; or convert to .npz.') from None
      sd = torch.load(path, map_location='cpu', weights_only=True)
      sd = sd.get('state_dict', sd)
      return {k: v.float().numpy() for k, v in sd.items()}
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'cannot read VAE weights {path}: {e}') from e
  raise CheckpointError(f'VAE weights {path}: unknown format {ext!r}; use .npz, '
                        '.safetensors or .bin.')


def load_vae(vae_config) -> tuple[AutoencoderKL, dict]:
  """(module, params) from config.vae; the file must match the configured architecture."""
  if not vae_config.path:
    raise ConfigError('no VAE configured: set config.vae.path to the VAE weights.')
  vae = build_vae(vae_config)
  template = jax.eval_shape(lambda: init_vae_params(vae, jax.random.key(0), 32))
  return vae, params_from_diffusers(read_state_dict(vae_config.path), template)


def _per_channel(value, channels: int, field: str) -> jnp.ndarray:
  v = np.atleast_1d(np.asarray(value, np.float32))
  if v.size not in (1, channels):
    raise ConfigError(f'config.vae.{field} has {v.size} values; give 1 or {channels}.')
  return jnp.asarray(np.broadcast_to(v, (channels,)))


def encode_fn(vae: AutoencoderKL, vae_config):
  """jitted (params, images [-1, 1], key) -> normalized latents (mean - shift) * scale."""
  c = vae.latent_channels
  scale = _per_channel(vae_config.scale, c, 'scale')
  shift = _per_channel(vae_config.shift, c, 'shift')

  @jax.jit
  def encode(params, images, key):
    mean, logvar = vae.apply({'params': params}, images, method=AutoencoderKL.encode)
    if vae_config.sample_posterior:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return (mean - shift) * scale
  return encode


def decode_fn(vae: AutoencoderKL, vae_config):
  """jitted (params, normalized latents) -> images in [-1, 1]."""
  c = vae.latent_channels
  scale = _per_channel(vae_config.scale, c, 'scale')
  shift = _per_channel(vae_config.shift, c, 'shift')

  @jax.jit
  def decode(params, latents):
    images = vae.apply({'params': params}, latents / scale + shift, method=AutoencoderKL.decode)
    return jnp.clip(images, -1., 1.)
  return decode


def decode_latents(vae_config, latents: np.ndarray) -> np.ndarray:
  """Loads the VAE of `vae_config` and decodes normalized latents to images in [-1, 1]
  (numpy, in batches of vae_config.batch_size)."""
  vae, params = load_vae(vae_config)
  if latents.ndim != 4 or latents.shape[-1] != vae.latent_channels:
    raise ConfigError(f'config.vae expects latents [N, h, w, {vae.latent_channels}] but the '
                      f'samples have shape {latents.shape}.')
  decode = decode_fn(vae, vae_config)
  bs = int(vae_config.batch_size)
  return np.concatenate([np.asarray(decode(params, latents[i:i + bs]))
                         for i in range(0, len(latents), bs)])
