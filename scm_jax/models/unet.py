"""ADM / NCSN++-style U-Net for images [B, H, W, C] (NHWC)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.errors import ConfigError
from scm_jax.models import attention
from scm_jax.models import layers

RESAMPLE_KINDS = ('avgpool', 'strided')


def _conv(features: int, dtype: Any, name: str, kernel: int = 3,
          zero_init: bool = False) -> nn.Conv:
  init = nn.initializers.zeros if zero_init else nn.linear.default_kernel_init
  return nn.Conv(features, (kernel, kernel), padding='SAME', dtype=dtype,
                 kernel_init=init, name=name)


def _group_norm(channels: int, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(layers.num_groups(channels), dtype=jnp.float32, name=name)


class ResBlock(nn.Module):
  """ADM residual block with the conditioning applied by AdaptiveNorm.

  GroupNorm -> SiLU -> conv3x3 -> AdaptiveNorm(emb) -> SiLU -> dropout ->
  conv3x3 (zero-init, so the block starts as its skip path), plus a 1x1 conv on
  the skip when the channel count changes.
  """
  features: int
  norm_mode: str = 'double'
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    h = _group_norm(x.shape[-1], 'norm0')(x).astype(self.dtype)
    h = _conv(self.features, self.dtype, 'conv0')(nn.silu(h))
    h = layers.AdaptiveNorm(mode=self.norm_mode, norm='group', dtype=self.dtype,
                            name='norm1')(h, emb)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = _conv(self.features, self.dtype, 'conv1', zero_init=True)(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, self.dtype, 'skip', kernel=1)(x)
    return x + h


class AttnBlock(nn.Module):
  """Residual self-attention over the H*W positions: x + Attn(GroupNorm(x))."""
  num_heads: int = 4
  head_dim: int = 0
  qk_norm: bool = False
  dtype: Any = jnp.float32
  impl: str = 'xla'
  block_size: int = 0
  block_q: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _group_norm(x.shape[-1], 'norm')(x).astype(self.dtype)
    return x + attention.SelfAttention(self.num_heads, self.head_dim, self.qk_norm,
                                    self.dtype, self.impl, self.block_size, self.block_q,
                                    name='attn')(h)


class Downsample(nn.Module):
  """Halves H and W: 2x2 average pool then conv3x3 ('avgpool'), or a stride-2
  conv3x3 ('strided')."""
  kind: str = 'avgpool'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == 'strided':
      return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding='SAME',
                     dtype=self.dtype, name='conv')(x)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return _conv(x.shape[-1], self.dtype, 'conv')(x)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour repeat then conv3x3."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], self.dtype, 'conv')(x)


class UNet(layers.SCMNetwork):
  """sCM network for images: F_theta(x/sigma_d, t) and the log-weight w_phi(t).

  Levels i = 0..len(channel_mult)-1 work at resolution H / 2^i with
  `channels * channel_mult[i]` channels and `num_res_blocks` ResBlocks each
  (one more on the way up, to consume the skips); self-attention follows every
  ResBlock whose feature map size is in `attn_resolutions` (middle block
  included). Conditioning uses sCM's adaptive double normalization by default
  (Lu & Song 2024, Sec. 4.1). Output: GroupNorm -> SiLU -> zero-init conv3x3.

  Attributes:
    channels: base channel count.
    channel_mult: channel multiplier per resolution level.
    num_res_blocks: ResBlocks per level on the way down.
    attn_resolutions: feature-map sizes (H) at which self-attention is added.
    num_heads: attention heads, used when head_dim == 0.
    head_dim: channels per head; > 0 overrides num_heads.
    qk_norm: RMS-normalize queries and keys (tames exploding jvp tangents).
    dropout: dropout rate in the ResBlocks (train=True only).
    time_embed_dim: conditioning width; 0 means 4 * channels.
    time_embed_scale: multiplies t before the time embedding (and logvar head).
    time_embed_kind: 'positional' or 'fourier' (ablation).
    fourier_scale: std of the Fourier frequencies when time_embed_kind='fourier'.
    norm_mode: 'double' or 'adagn'.
    num_classes: number of classes; 0 means unconditional. Label `num_classes`
      is the null class for classifier-free guidance.
    logvar_channels: width of the positional embedding of the logvar head.
    resample: 'avgpool' (avg-pool + conv) or 'strided' (stride-2 conv) down;
      upsampling is always nearest + conv.
    dtype: compute dtype of convs/denses, 'float32' or 'bfloat16'.
    attn_impl: attention implementation (see attention.attention): 'xla', 'flash'
      or 'pallas'.
    attn_block_size: keys per block of 'flash' and 'pallas' (0 = per-backend default).
    attn_block_q: queries per tile of the 'pallas' kernel (0 = per-backend default).
    out_channels: output channels; 0 means the input's.
    remat: rematerialization policy of every ResBlock and attention block (see
      layers.REMAT_POLICIES); trades compute for activation memory at scale.
  """
  channels: int = 64
  channel_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (4,)
  num_heads: int = 4
  head_dim: int = 0
  qk_norm: bool = False
  resample: str = 'avgpool'
  attn_impl: str = 'xla'
  attn_block_size: int = 0
  attn_block_q: int = 0
  out_channels: int = 0
  remat: str = 'none'

  def __post_init__(self):
    layers.check_choice('resample', self.resample, RESAMPLE_KINDS)
    layers.check_choice('attn_impl', self.attn_impl,
                        tuple(attention.ATTENTION_IMPLS))
    layers.check_choice('remat', self.remat, tuple(layers.REMAT_POLICIES))
    if not self.channel_mult or min(self.channel_mult) <= 0:
      raise ConfigError(
          f'model.channel_mult must be a non-empty tuple of positive ints, got '
          f'{self.channel_mult!r}.')
    if self.channels <= 0 or self.num_res_blocks <= 0:
      raise ConfigError('model.channels and model.num_res_blocks must be > 0.')
    super().__post_init__()

  def conditioning_dims(self) -> tuple[int, int]:
    return self.time_embed_dim or 4 * self.channels, self.channels

  def check_input(self, x: jax.Array) -> None:
    layers.check_levels(x, self.channel_mult)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               labels: Optional[jax.Array] = None,
               guidance: Optional[jax.Array] = None, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (F [B, H, W, C_out] float32, logvar [B] float32)."""
    dtype, t, emb = self.embed(x, t, labels, guidance)

    res_cls = layers.maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    attn_cls = layers.maybe_remat(AttnBlock, self.remat)

    def res_block(h, mult, name):
      return res_cls(self.channels * mult, self.norm_mode, self.dropout, dtype,
                      name=name)(h, emb, train)

    def maybe_attn(h, name):
      if h.shape[1] not in self.attn_resolutions:
        return h
      return attn_cls(self.num_heads, self.head_dim, self.qk_norm, dtype,
                      self.attn_impl, self.attn_block_size, self.attn_block_q,
                      name=name)(h)

    last = len(self.channel_mult) - 1
    h = _conv(self.channels, dtype, 'conv_in')(x.astype(dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res_block(h, mult, f'down{level}_res{i}')
        h = maybe_attn(h, f'down{level}_attn{i}')
        skips.append(h)
      if level < last:
        h = Downsample(self.resample, dtype, name=f'down{level}_resample')(h)
        skips.append(h)

    h = res_block(h, self.channel_mult[-1], 'mid_res0')
    h = maybe_attn(h, 'mid_attn')
    h = res_block(h, self.channel_mult[-1], 'mid_res1')

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res_block(h, mult, f'up{level}_res{i}')
        h = maybe_attn(h, f'up{level}_attn{i}')
      if level > 0:
        h = Upsample(dtype, name=f'up{level}_resample')(h)

    h = nn.silu(_group_norm(h.shape[-1], 'norm_out')(h)).astype(dtype)
    out = _conv(self.out_channels or x.shape[-1], dtype, 'conv_out',
                zero_init=True)(h)
    return out.astype(jnp.float32), self.logvar(t)
