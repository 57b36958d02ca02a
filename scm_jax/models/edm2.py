"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, config G) with the sCM changes.

Lu & Song 2024 train their ImageNet 64x64 and 512x512 models on EDM2 config G with three
changes (Sec. 4.1, App. G.2, Tables 4-5): the TrigFlow parameterization, a positional time
embedding of c_noise(t) = t, and adaptive double normalization. `EDM2` has both forms:
the defaults are the sCM network; `PLAIN` (parameterization='edm',
time_embed_kind='fourier', norm_mode='adagn') is EDM2's own config G.

Magnitude preservation (EDM2, Sec. 3): every layer keeps unit-variance activations at
unit-variance input. Convolutions have no biases and use forced weight normalization
(`MPConv`: the stored weight is normalized per output channel and scaled by
1/sqrt(fan_in) at every use, and `project_weights` puts the stored weights back on that
sphere after each optimizer update); additions, concatenations and SiLU are the
magnitude-preserving `mp_sum`, `mp_cat`, `mp_silu`; there is no GroupNorm, only pixel
norms; attention is cosine attention (pixel-normalized q, k, v per head). Everything is
plain jnp, so it shards (FSDP) and differentiates by jax.jvp like any other layer.

The parameterizations agree up to c_noise: with EDM2's preconditioning (c_in, c_skip,
c_out of sigma = sigma_d tan t) the network sees x_t / sigma_d and its denoiser is
D = cos t x_t + sigma_d sin t F_net, i.e. TrigFlow's F = -F_net; 'edm' therefore differs
from 'trigflow' only by c_noise(t) = ln(sigma_d tan t) / 4 and the sign of the output.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import ConfigError
from scm_jax.models import attention
from scm_jax.models import layers
from scm_jax.models.mp import (BUFFERS, MPConv, MPFourier, WEIGHT, mp_cat, mp_positional,  # noqa: F401
                               mp_silu, mp_sum, normalize, pixel_norm, project_weights,
                               resample)

# EDM2 / sCM sizes (Table 4 / 5): base channels per size.
SIZES = {'s': 192, 'm': 256, 'l': 320, 'xl': 384, 'xxl': 448}
# Parameter counts of the tables (EDM2 config G on 64x64x4, 1000 classes), in millions.
PAPER_PARAMS_M = {'s': 280.2, 'm': 497.8, 'l': 777.6, 'xl': 1119.4, 'xxl': 1523.4}
# EDM2's own config G: the sCM changes switched off.
PLAIN = dict(parameterization='edm', time_embed_kind='fourier', norm_mode='adagn')
PARAMETERIZATIONS = ('trigflow', 'edm')


# ----------------------------------------------------------------------- conditioning


def edm_c_noise(t: jax.Array, sigma_data: float, sigma: Optional[jax.Array] = None):
  """EDM2's c_noise = ln(sigma) / 4 (EDM, Table 1) at sigma = sigma_d tan t, or at the
  given `sigma` directly (no float32 round trip through t)."""
  if sigma is not None:
    return jnp.log(jnp.asarray(sigma, jnp.float32)) / 4
  t = jnp.clip(jnp.asarray(t, jnp.float32), 1e-7, np.pi / 2 - 1e-6)
  return jnp.log(sigma_data * jnp.tan(t)) / 4


class MPConditioning(nn.Module):
  """EDM2's embedding: mp_silu(mp_sum(noise embedding [+ guidance], label embedding)).

  c_noise(t) is `scale` * t ('trigflow') or ln(sigma_d tan t) / 4 ('edm'); its features
  are positional ('positional', sCM) or EDM2's random Fourier features ('fourier'), then
  an MPConv to `dim`. Labels in [0, num_classes) become scaled one-hot vectors through an
  MPConv; the null class `num_classes` (classifier-free guidance) is the zero vector. The
  guidance input s (`guidance_embed`) is embedded like t and added to the noise
  embedding through a learned gain that starts at 0 (the student starts as its teacher).
  """
  dim: int
  freq_dim: int
  num_classes: int = 0
  parameterization: str = 'trigflow'
  kind: str = 'positional'
  scale: float = 1.0
  bandwidth: float = 1.0
  sigma_data: float = 0.5
  guidance_embed: bool = False

  def c_noise(self, t: jax.Array, sigma: Optional[jax.Array] = None) -> jax.Array:
    """c_noise of the time: `scale` t, or EDM2's ln(sigma) / 4 with sigma = sigma_d tan t;
    a given `sigma` (an EDM caller's own noise level) is used as is, without the float32
    round trip through t."""
    if self.parameterization == 'edm':
      return edm_c_noise(t, self.sigma_data, sigma)
    return self.scale * t

  def features(self, c: jax.Array) -> jax.Array:
    if self.kind == 'fourier':
      return MPFourier(self.freq_dim, self.bandwidth, name='fourier')(c)
    return mp_positional(c, self.freq_dim)

  @nn.compact
  def __call__(self, t: jax.Array, labels: Optional[jax.Array],
               guidance: Optional[jax.Array] = None,
               sigma: Optional[jax.Array] = None) -> jax.Array:
    emb = MPConv(self.dim, name='noise')(self.features(self.c_noise(t, sigma)))
    if self.guidance_embed:
      s = layers.guidance_scales(guidance, t.shape[0])
      gain = self.param('guidance_gain', nn.initializers.zeros, ())
      emb = emb + MPConv(self.dim, name='guidance')(mp_positional(self.scale * s,
                                                                  self.freq_dim), gain)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(t.shape, self.num_classes, jnp.int32)
      onehot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)  # null -> 0
      emb = mp_sum(emb, MPConv(self.dim, name='label')(onehot * np.sqrt(self.num_classes)))
    return mp_silu(emb)


# ----------------------------------------------------------------------------- blocks


class Block(nn.Module):
  """EDM2 U-Net block: resample, residual conv pair modulated by the embedding, mp_sum
  with the skip path (res_balance), optional cosine self-attention (attn_balance).

  'enc' blocks project the skip path first and pixel-normalize it; 'dec' blocks project
  it at the end. Modulation: 'adagn' is EDM2's y * (1 + g W emb) with a zero-init gain g;
  'double' is sCM's adaptive double normalization, here
  mp_sum(pnorm(y) * pnorm(W_s emb), pnorm(W_b emb)) (a unit-magnitude reading of
  norm(y) pnorm(s) + pnorm(b)).
  """
  features: int
  flavor: str = 'enc'
  resample_mode: str = 'keep'
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  norm_mode: str = 'double'
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: float = 256.0
  attn_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    conv = lambda n, k, name: MPConv(n, k, self.dtype, name=name)
    x = resample(x, self.resample_mode)
    needs_skip = x.shape[-1] != self.features
    if self.flavor == 'enc':
      if needs_skip:
        x = conv(self.features, 1, 'conv_skip')(x)
      x = pixel_norm(x)

    y = conv(self.features, 3, 'conv_res0')(mp_silu(x))
    if self.norm_mode == 'double':
      scale = pixel_norm(MPConv(self.features, name='emb_scale')(emb))
      shift = pixel_norm(MPConv(self.features, name='emb_shift')(emb))
      y = mp_sum(pixel_norm(y) * scale[:, None, None].astype(y.dtype),
                 shift[:, None, None].astype(y.dtype))
    else:
      gain = self.param('emb_gain', nn.initializers.zeros, ())
      c = MPConv(self.features, name='emb_linear')(emb, gain) + 1
      y = y * c[:, None, None].astype(y.dtype)
    y = nn.Dropout(self.dropout, deterministic=not train)(mp_silu(y))
    y = conv(self.features, 3, 'conv_res1')(y)

    if self.flavor == 'dec' and needs_skip:
      x = conv(self.features, 1, 'conv_skip')(x)
    x = mp_sum(x, y, self.res_balance)

    if self.attention:
      heads = self.features // self.channels_per_head
      b, h, w, c = x.shape
      qkv = conv(3 * c, 1, 'attn_qkv')(x).reshape(b, h * w, 3, heads, c // heads)
      qkv = normalize(qkv, -1)  # cosine attention: q, k, v pixel-normalized per head
      y = attention.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.attn_impl)
      y = conv(c, 1, 'attn_proj')(y.reshape(b, h, w, c))
      x = mp_sum(x, y, self.attn_balance)
    x = jnp.clip(x, -self.clip_act, self.clip_act)
    self.sow('intermediates', 'out', x)  # for inspection (magnitude tests)
    return x


# ---------------------------------------------------------------------------- network


class EDM2(layers.SCMNetwork):
  """EDM2's U-Net (config G) as an sCM network: F_theta(x / sigma_d, t) and w_phi(t).

  Levels i = 0..len(channel_mult)-1 at resolution H / 2^i with channels *
  channel_mult[i] channels: an input conv (level 0) or a down block, then `num_blocks`
  encoder blocks; the decoder mirrors it with num_blocks + 1 blocks per level fed by
  mp_cat skips, two blocks at the lowest resolution (the first with attention) and up
  blocks between levels. Attention follows the blocks whose resolution is in
  `attn_resolutions`. Output: an MPConv scaled by a learned gain that starts at 0.

  Attributes (besides SCMNetwork's):
    channels: base channels (S 192, M 256, L 320, XL 384, XXL 448).
    channel_mult: channel multiplier per level.
    num_blocks: encoder blocks per level.
    attn_resolutions: feature-map sizes with self-attention.
    channels_per_head: attention head width.
    dropout_max_resolution: dropout only in blocks at this resolution or lower (the sCM
      recipes: 16); 0 = every block (EDM2's teachers).
    parameterization: 'trigflow' (sCM) or 'edm' (EDM2: c_noise = ln(sigma)/4, F = -F_net).
    fourier_scale: bandwidth of EDM2's Fourier features (time_embed_kind='fourier').
    sigma_data: sigma_d for the 'edm' c_noise.
    concat_balance, res_balance, attn_balance, clip_act: EDM2's constants.
    attn_impl: attention implementation (see attention.attention).
    remat: rematerialization policy of every block (layers.REMAT_POLICIES).
    out_channels: output channels; 0 means the input's.
    forced_weight_norm: project the stored MPConv weights back to unit norm after
      every optimizer update (`project_weights`, EDM2's forced weight normalization).
  """
  channels: int = 192
  channel_mult: tuple[int, ...] = (1, 2, 3, 4)
  num_blocks: int = 3
  attn_resolutions: tuple[int, ...] = (16, 8)
  channels_per_head: int = 64
  dropout_max_resolution: int = 0
  parameterization: str = 'trigflow'
  fourier_scale: float = 1.0
  sigma_data: float = 0.5
  concat_balance: float = 0.5
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: float = 256.0
  attn_impl: str = 'xla'
  remat: str = 'none'
  out_channels: int = 0
  forced_weight_norm: bool = True

  def __post_init__(self):
    layers.check_choice('parameterization', self.parameterization, PARAMETERIZATIONS)
    layers.check_choice('attn_impl', self.attn_impl, tuple(attention.ATTENTION_IMPLS))
    layers.check_choice('remat', self.remat, tuple(layers.REMAT_POLICIES))
    if not self.channel_mult or min(self.channel_mult) <= 0 or self.channels <= 0:
      raise ConfigError(f'model.channels and model.channel_mult must be positive, got '
                        f'{self.channels} and {self.channel_mult!r}.')
    widths = [self.channels * m for m in self.channel_mult]
    if self.num_blocks <= 0 or any(w % self.channels_per_head for w in widths):
      raise ConfigError(f'model.num_blocks must be > 0 and every level width {widths} a '
                        f'multiple of model.channels_per_head={self.channels_per_head}.')
    super().__post_init__()

  def conditioning_dims(self) -> tuple[int, int]:
    widths = [self.channels * m for m in self.channel_mult]
    return self.time_embed_dim or max(widths), widths[0]

  def conditioning(self) -> nn.Module:
    dim, freq_dim = self.conditioning_dims()
    return MPConditioning(dim, freq_dim, self.num_classes, self.parameterization,
                          self.time_embed_kind, self.time_embed_scale, self.fourier_scale,
                          self.sigma_data, self.guidance_embed, name='cond')

  def param_projection(self):
    return project_weights if self.forced_weight_norm else None

  def check_input(self, x: jax.Array) -> None:
    layers.check_levels(x, self.channel_mult)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               labels: Optional[jax.Array] = None,
               guidance: Optional[jax.Array] = None, *,
               train: bool = False,
               sigma: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Returns (F [B, H, W, C_out] float32, logvar [B] float32). `sigma` [B] (only for
    parameterization='edm'): the EDM noise level of the input, used for c_noise as is."""
    if sigma is not None and self.parameterization != 'edm':
      raise ConfigError("EDM2(sigma=...) needs model.parameterization='edm'.")
    cond = {} if sigma is None else {'sigma': sigma}
    dtype, t, emb = self.embed(x, t, labels, guidance, **cond)
    block_cls = layers.maybe_remat(Block, self.remat, static_argnums=(3,))
    res0 = x.shape[1]

    def block(h, features, name, flavor, mode='keep', attn=None):
      res = h.shape[1] // 2 if mode == 'down' else h.shape[1] * 2 if mode == 'up' else h.shape[1]
      use_dropout = not self.dropout_max_resolution or res <= self.dropout_max_resolution
      return block_cls(features, flavor, mode,
                       res in self.attn_resolutions if attn is None else attn,
                       self.channels_per_head, self.dropout if use_dropout else 0.0,
                       self.norm_mode, self.res_balance, self.attn_balance, self.clip_act,
                       self.attn_impl, dtype, name=name)(h, emb, train)

    # Encoder; a channel of ones gives the first conv an offset (EDM2).
    h = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    skips = []
    for level, mult in enumerate(self.channel_mult):
      res = res0 >> level
      if level == 0:
        h = MPConv(self.channels * mult, 3, dtype, name=f'enc{res}_conv')(h)
      else:
        h = block(h, h.shape[-1], f'enc{res}_down', 'enc', 'down', attn=False)
      skips.append(h)
      for i in range(self.num_blocks):
        h = block(h, self.channels * mult, f'enc{res}_block{i}', 'enc')
        skips.append(h)

    # Decoder.
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = res0 >> level
      if level == last:
        h = block(h, h.shape[-1], f'dec{res}_in0', 'dec', attn=True)
        h = block(h, h.shape[-1], f'dec{res}_in1', 'dec', attn=False)
      else:
        h = block(h, h.shape[-1], f'dec{res}_up', 'dec', 'up', attn=False)
      for i in range(self.num_blocks + 1):
        h = mp_cat(h, skips.pop(), self.concat_balance)
        h = block(h, self.channels * mult, f'dec{res}_block{i}', 'dec')

    gain = self.param('out_gain', nn.initializers.zeros, ())
    out = MPConv(self.out_channels or x.shape[-1], 3, dtype, name='out_conv')(h, gain)
    out = out.astype(jnp.float32)
    if self.parameterization == 'edm':
      out = -out  # EDM2's D = c_skip x + c_out F_net is TrigFlow's F = -F_net (module doc)
      # EDM2's own uncertainty head: MPFourier of c_noise -> MPConv to 1 (no bias).
      c = edm_c_noise(t, self.sigma_data, sigma)
      feats = MPFourier(self.logvar_channels, seed=1, name='logvar_fourier')(c)
      return out, MPConv(1, name='logvar_linear')(feats)[:, 0]
    return out, self.logvar(t)


def size_config(size: str) -> dict:
  """Model fields of EDM2 size 's' .. 'xxl' (Tables 4-5: img64 and img512 share them)."""
  if size not in SIZES:
    raise ConfigError(f'Unknown EDM2 size {size!r}; choose one of {list(SIZES)}.')
  return dict(name='edm2', channels=SIZES[size], channel_mult=(1, 2, 3, 4), num_blocks=3,
              attn_resolutions=(16, 8), channels_per_head=64)
