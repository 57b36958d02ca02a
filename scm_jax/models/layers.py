"""Layers shared by the sCM networks (MLP, U-Net, and later DiT).

Everything here must be differentiable by `jax.jvp` in both the data `x` and the
TrigFlow time `t`: the sCT/sCD losses need the tangent dF/dt of the network
(Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", Sec. 4). The paper's stability fixes live here too: positional time
embeddings instead of large-scale Fourier ones (Sec. 4.1), adaptive double
normalization (Sec. 4.1) and QK-normalized attention.

Numerics policy: parameters are always float32; convs/denses run in the model's
compute dtype; time embeddings, normalization statistics and softmax run in float32.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import ConfigError

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TIME_EMBED_KINDS = ('positional', 'fourier')
NORM_MODES = ('double', 'adagn')


def resolve_dtype(name: str) -> Any:
  """Maps a config dtype string to a JAX dtype, or raises ConfigError."""
  if name not in COMPUTE_DTYPES:
    raise ConfigError(
        f'Unknown model dtype {name!r}; set model.dtype to one of '
        f'{sorted(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


def check_choice(field: str, value: str, choices) -> None:
  """Raises ConfigError if `value` of config field `field` is not in `choices`."""
  if value not in choices:
    raise ConfigError(
        f'Unknown model.{field}={value!r}; choose one of {list(choices)}.')


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm group count: min(max_groups, channels), lowered until it divides."""
  groups = min(max_groups, channels)
  while channels % groups:
    groups -= 1
  return groups


# ------------------------------------------------------------------ time embedding


def positional_embedding(t: jax.Array, dim: int,
                         max_period: float = 10000.) -> jax.Array:
  """Sinusoidal ("transformer") embedding of `t` [B] -> [B, dim], in float32.

  Frequencies are geometric from 1 down to 1/max_period (as in ADM). Computed in
  float32 whatever the compute dtype: in bfloat16, sin/cos of t would lose most of
  the small changes in t that the sCM tangent dF/dt is made of.
  """
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float32) / half)
  args = t[:, None] * jnp.asarray(freqs, jnp.float32)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_embedding(t: jax.Array, dim: int, scale: float,
                      seed: int = 0) -> jax.Array:
  """Gaussian random Fourier features of `t` [B] -> [B, dim], in float32.

  The frequencies f ~ N(0, scale^2) are fixed (drawn with numpy from `seed`, so
  they are constants, not parameters) and the features are [cos 2πft, sin 2πft],
  as in NCSN++/EDM. sCM (Sec. 4.1) reports that large scales (e.g. the usual 16)
  make continuous-time training unstable; kept for that ablation.
  """
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = np.random.RandomState(seed).randn(half).astype(np.float32) * scale
  args = 2 * np.pi * t[:, None] * jnp.asarray(freqs)[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimeEmbedding(nn.Module):
  """Embeds TrigFlow time: features of `scale * t`, then Dense -> SiLU -> Dense.

  Attributes:
    dim: output width.
    scale: multiplies t before featurization (c_noise(t) = t in TrigFlow, so this
      sets how fast the features vary over t in [0, π/2]).
    kind: 'positional' (sinusoidal, the sCM choice) or 'fourier' (random Gaussian
      frequencies of std `fourier_scale`; destabilizing at large scale, ablations).
    fourier_scale: std of the Fourier frequencies.
    freq_dim: width of the sinusoidal features; 0 means `dim`.
  """
  dim: int
  scale: float = 1.0
  kind: str = 'positional'
  fourier_scale: float = 16.0
  freq_dim: int = 0

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    check_choice('time_embed_kind', self.kind, TIME_EMBED_KINDS)
    freq_dim = self.freq_dim or self.dim
    st = self.scale * jnp.asarray(t, jnp.float32)
    if self.kind == 'positional':
      feats = positional_embedding(st, freq_dim)
    else:
      feats = fourier_embedding(st, freq_dim, self.fourier_scale)
    h = nn.Dense(self.dim, dtype=jnp.float32, name='dense0')(feats)
    return nn.Dense(self.dim, dtype=jnp.float32, name='dense1')(nn.silu(h))


class Conditioning(nn.Module):
  """Conditioning vector = SiLU(time embedding + label embedding), float32 [B, dim].

  Labels live in [0, num_classes]; index `num_classes` is the null class used for
  classifier-free guidance, and `labels=None` means all-null. With num_classes == 0
  the model is unconditional and labels are ignored. The SiLU is applied once here
  (as in ADM/EDM), so the per-block projections in AdaptiveNorm are plain Denses.
  """
  dim: int
  scale: float = 1.0
  kind: str = 'positional'
  fourier_scale: float = 16.0
  freq_dim: int = 0
  num_classes: int = 0

  @nn.compact
  def __call__(self, t: jax.Array, labels: Optional[jax.Array]) -> jax.Array:
    emb = TimeEmbedding(self.dim, self.scale, self.kind, self.fourier_scale,
                        self.freq_dim, name='time')(t)
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(t.shape, self.num_classes, jnp.int32)
      table = nn.Embed(self.num_classes + 1, self.dim, dtype=jnp.float32,
                       name='label')
      emb = emb + table(jnp.asarray(labels, jnp.int32))
    return nn.silu(emb)


class LogVarHead(nn.Module):
  """The adaptive loss weight w_phi(t) of sCM (Sec. 4.3), as a log-variance [B].

  A Dense(1) on a positional embedding of `scale * t`; zero-initialized so the
  initial weight is e^0 = 1. It depends on t only, never on x or labels.
  """
  channels: int = 128
  scale: float = 1.0

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    feats = positional_embedding(self.scale * jnp.asarray(t, jnp.float32),
                                 self.channels)
    out = nn.Dense(1, dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                   name='dense')(feats)
    return out[:, 0]


# ------------------------------------------------------------------ normalization


def pixel_norm(v: jax.Array, eps: float = 1e-4) -> jax.Array:
  """Normalizes `v` to unit RMS over the last axis: v / sqrt(mean(v²) + eps)."""
  v32 = v.astype(jnp.float32)
  out = v32 * jax.lax.rsqrt(jnp.mean(jnp.square(v32), axis=-1, keepdims=True)
                            + eps)
  return out.astype(v.dtype)


class AdaptiveNorm(nn.Module):
  """Normalization modulated by a conditioning embedding.

  mode='double' is sCM's adaptive double normalization (Sec. 4.1):
      y = norm(x) · pnorm(s(emb)) + pnorm(b(emb)),
  with s, b per-channel Dense projections and pnorm = pixel_norm. Normalizing the
  modulation keeps its scale fixed whatever the embedding does, which the paper
  found removes a source of instability of the time derivative.
  mode='adagn' is the classic ADM form y = norm(x) · (1 + s) + b.

  The inner norm has no learned affine (the modulation plays that role) and runs
  in float32: GroupNorm (groups = min(max_groups, C), adjusted to divide C) for
  images [B, H, W, C], LayerNorm over channels for vectors [B, C].
  The modulation actually applied is sown into 'intermediates' as
  'applied_scale' and 'applied_shift', for inspection.

  Attributes:
    mode: 'double' or 'adagn'.
    norm: 'group' or 'layer'.
    max_groups: upper bound on the number of groups for 'group'.
    epsilon: epsilon of the inner norm.
    dtype: dtype of the output.
  """
  mode: str = 'double'
  norm: str = 'group'
  max_groups: int = 32
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    check_choice('norm_mode', self.mode, NORM_MODES)
    check_choice('norm', self.norm, ('group', 'layer'))
    channels = x.shape[-1]
    if self.norm == 'group':
      inner = nn.GroupNorm(num_groups(channels, self.max_groups),
                           epsilon=self.epsilon, use_bias=False,
                           use_scale=False, dtype=jnp.float32, name='norm')
    else:
      inner = nn.LayerNorm(epsilon=self.epsilon, use_bias=False,
                           use_scale=False, dtype=jnp.float32, name='norm')
    h = inner(x.astype(jnp.float32))
    scale = nn.Dense(channels, dtype=jnp.float32, name='scale')(emb)
    shift = nn.Dense(channels, dtype=jnp.float32, name='shift')(emb)
    if self.mode == 'double':
      scale, shift = pixel_norm(scale), pixel_norm(shift)
    else:
      scale = 1. + scale
    self.sow('intermediates', 'applied_scale', scale)
    self.sow('intermediates', 'applied_shift', shift)
    # Broadcast [B, C] over the spatial axes of x.
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
    h = h * scale.reshape(bshape) + shift.reshape(bshape)
    return h.astype(self.dtype)


# ------------------------------------------------------------------ attention


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain einsum attention with float32 logits and softmax; jvp-friendly."""
  scale = 1. / np.sqrt(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                      preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


# impl name -> function(q, k, v). A fused kernel with a custom JVP registers here.
ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {'xla': _xla_attention}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              impl: str = 'xla') -> jax.Array:
  """Multi-head attention softmax(q kᵀ / sqrt(Dh)) v; q/k/v [B, L, H, Dh] -> same.

  The single attention entry point of every model, so that swapping the kernel
  (`impl`) changes all of them. 'xla' is differentiable by jax.jvp.
  """
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(
        f'Unknown attention implementation {impl!r}; set model.attn_impl to one '
        f'of {sorted(ATTENTION_IMPLS)}.')
  return ATTENTION_IMPLS[impl](q, k, v)


def heads_for(channels: int, num_heads: int, head_dim: int) -> int:
  """Number of heads: channels // head_dim if head_dim > 0, else num_heads."""
  if head_dim > 0:
    if channels % head_dim:
      raise ConfigError(
          f'Attention over {channels} channels cannot use head_dim={head_dim}; '
          f'set model.head_dim to a divisor of {channels} (or 0 to use '
          f'num_heads).')
    return channels // head_dim
  if num_heads <= 0 or channels % num_heads:
    raise ConfigError(
        f'Attention over {channels} channels cannot use num_heads={num_heads}; '
        f'set model.num_heads to a divisor of {channels} or set model.head_dim.')
  return num_heads


class SelfAttention(nn.Module):
  """Multi-head self-attention over the tokens of x [B, ..., C] -> same shape.

  All non-batch, non-channel axes are flattened into tokens. With `qk_norm`, q and
  k are RMS-normalized per head (learned scale, float32) before the dot product;
  this bounds the logits and tames exploding jvp tangents in sCM training. The
  output projection is zero-initialized so that the block starts as identity when
  used residually.

  Attributes:
    num_heads: number of heads, used when head_dim == 0.
    head_dim: channels per head; > 0 overrides num_heads.
    qk_norm: RMS-normalize q and k.
    dtype: compute dtype of the projections.
    impl: attention implementation, see `attention`.
  """
  num_heads: int = 4
  head_dim: int = 0
  qk_norm: bool = False
  dtype: Any = jnp.float32
  impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    heads = heads_for(channels, self.num_heads, self.head_dim)
    tokens = x.reshape(x.shape[0], -1, channels)
    qkv = nn.Dense(3 * channels, dtype=self.dtype, name='qkv')(tokens)
    qkv = qkv.reshape(tokens.shape[:2] + (3, heads, channels // heads))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.qk_norm:
      q = nn.RMSNorm(dtype=jnp.float32, name='q_norm')(q).astype(self.dtype)
      k = nn.RMSNorm(dtype=jnp.float32, name='k_norm')(k).astype(self.dtype)
    out = attention(q, k, v, impl=self.impl)
    out = out.reshape(tokens.shape[:2] + (channels,))
    out = nn.Dense(channels, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='proj')(out)
    return out.reshape(x.shape)
