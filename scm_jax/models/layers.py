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

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax import sharding
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


class SCMNetwork(nn.Module):
  """Fields and checks shared by every sCM backbone (MLP, U-Net, DiT).

  Each backbone maps (x / sigma_d, t, labels) to (F_theta, logvar) with the same
  conditioning: a time embedding of c_noise(t) = time_embed_scale * t (Sec. 4.1), an
  optional label embedding with a null class, the sCM adaptive double normalization,
  and the adaptive-weight head w_phi(t) (Sec. 4.3). Subclasses add their own fields
  and may override the defaults below.
  """
  time_embed_dim: int = 0
  time_embed_scale: float = 1.0
  time_embed_kind: str = 'positional'
  fourier_scale: float = 16.0
  norm_mode: str = 'double'
  dropout: float = 0.0
  num_classes: int = 0
  logvar_channels: int = 128
  dtype: str = 'float32'

  def __post_init__(self):
    # Fail at build time, not at the first trace.
    resolve_dtype(self.dtype)
    check_choice('time_embed_kind', self.time_embed_kind, TIME_EMBED_KINDS)
    check_choice('norm_mode', self.norm_mode, NORM_MODES)
    if self.num_classes < 0 or self.time_embed_dim < 0 or self.logvar_channels <= 0:
      raise ConfigError('model.num_classes and model.time_embed_dim must be >= 0 and '
                        f'model.logvar_channels > 0, got {self.num_classes}, '
                        f'{self.time_embed_dim}, {self.logvar_channels}.')
    super().__post_init__()


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


# ---------------------------------------------------- blockwise ("flash") attention
#
# Forward: online softmax over key/value blocks (Dao et al. 2022; Rabe & Staats
# 2021), carrying the running row max m, row sum l and unnormalized output; it also
# returns lse = m + log l. Memory O(Lq * block) instead of O(Lq * Lk).
#
# Tangent (derived from O = P V, P = softmax(S), S = q kᵀ / sqrt(Dh)):
#   dS  = (dq kᵀ + q dkᵀ) / sqrt(Dh)
#   dP  = P ⊙ (dS - mu 1ᵀ),        mu_i = Σ_j P_ij dS_ij
#   dO  = dP V + P dV = Σ_j P_ij (dS_ij V_j + dV_j) - mu_i O_i.
# With lse known from the forward, P_ij = exp(S_ij - lse_i) is exact per block, so
# dO and mu accumulate over the same key/value blocks with no rescaling, in float32.
# The tangent is linear in (dq, dk, dv): jax.grad (linearize + transpose) works
# through the custom_jvp; the block body is rematerialized so the transposed scan
# recomputes P per block instead of storing the full [Lq, Lk] matrix.

FLASH_BLOCK = 512


def _kv_blocks(block: int, *arrays):
  """Pads [B, L, H, D] arrays along L to a multiple of `block` and splits them into
  [num_blocks, B, block, H, D] (scan-major). Also returns the key validity mask."""
  length = arrays[0].shape[1]
  block = max(1, min(block, length))
  num = -(-length // block)
  pad = num * block - length
  out = []
  for a in arrays:
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0)))
    out.append(jnp.moveaxis(a.reshape(a.shape[0], num, block, *a.shape[2:]), 1, 0))
  valid = (jnp.arange(num * block) < length).reshape(num, block)
  return out, valid


def _acc_dtype(x):
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _block_logits(q, k_blk, valid):
  """Scaled logits [B, H, Lq, block] in float32, -inf on padded keys."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k_blk,
                 preferred_element_type=_acc_dtype(q)) / np.sqrt(q.shape[-1])
  return jnp.where(valid[None, None, None], s, -jnp.inf)


def _flash_forward(q, k, v, block):
  """(O [B, Lq, H, D] in v.dtype, lse [B, H, Lq] float32) by an online softmax."""
  (k_b, v_b), valid = _kv_blocks(block, k, v)
  batch, lq, heads, _ = q.shape
  f32 = _acc_dtype(q)

  def body(carry, xs):
    m, l, acc = carry
    k_j, v_j, valid_j = xs
    s = _block_logits(q, k_j, valid_j)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)            # 0 on the first block (m = -inf)
    p = jnp.exp(s - m_new[..., None])
    l = l * alpha + jnp.sum(p, axis=-1)
    pv = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v_j,
                    preferred_element_type=f32)
    acc = acc * jnp.swapaxes(alpha, 1, 2)[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((batch, heads, lq), -jnp.inf, f32),
          jnp.zeros((batch, heads, lq), f32),
          jnp.zeros(q.shape[:3] + v.shape[-1:], f32))
  (m, l, acc), _ = jax.lax.scan(body, init, (k_b, v_b, valid))
  out = acc / jnp.swapaxes(l, 1, 2)[..., None]
  return out.astype(v.dtype), m + jnp.log(l)


def _flash_tangent(q, k, v, out, lse, dq, dk, dv, block):
  """dO for tangents (dq, dk, dv), blockwise; see the derivation above."""
  (k_b, v_b, dk_b, dv_b), valid = _kv_blocks(block, k, v, dk, dv)
  f32 = _acc_dtype(q)

  def body(carry, xs):
    acc_t, acc_mu = carry
    k_j, v_j, dk_j, dv_j, valid_j = xs
    p = jnp.exp(_block_logits(q, k_j, valid_j) - lse[..., None])
    ds = (jnp.einsum('bqhd,bkhd->bhqk', dq, k_j, preferred_element_type=f32)
          + jnp.einsum('bqhd,bkhd->bhqk', q, dk_j, preferred_element_type=f32)
          ) / np.sqrt(q.shape[-1])
    pds = p * ds
    acc_mu = acc_mu + jnp.sum(pds, axis=-1)
    acc_t = (acc_t
             + jnp.einsum('bhqk,bkhd->bqhd', pds.astype(v.dtype), v_j,
                          preferred_element_type=f32)
             + jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), dv_j,
                          preferred_element_type=f32))
    return (acc_t, acc_mu), None

  # Rematerialized body: under jax.grad the transposed scan recomputes p per block.
  body = jax.checkpoint(body, prevent_cse=False)
  init = (jnp.zeros(out.shape, f32), jnp.zeros(lse.shape, f32))
  (acc_t, acc_mu), _ = jax.lax.scan(body, init, (k_b, v_b, dk_b, dv_b, valid))
  dout = acc_t - jnp.swapaxes(acc_mu, 1, 2)[..., None] * out.astype(f32)
  return dout.astype(out.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    block: int = FLASH_BLOCK) -> jax.Array:
  """Blockwise attention softmax(q kᵀ / sqrt(Dh)) v with a blockwise JVP rule.

  Same result as 'xla' attention, but neither the output nor its tangent (nor the
  gradient) materializes the [Lq, Lk] attention matrix. Pure JAX (lax.scan over
  key/value blocks of size `block`), so it runs on CPU, GPU and TPU.
  """
  return _flash_forward(q, k, v, block)[0]


@flash_attention.defjvp
def _flash_attention_jvp(block, primals, tangents):
  q, k, v = primals
  dq, dk, dv = tangents
  out, lse = _flash_forward(q, k, v, block)
  return out, _flash_tangent(q, k, v, out, lse, dq, dk, dv, block)


def _flash_impl(q, k, v, block_size=0):
  return flash_attention(q, k, v, block_size or FLASH_BLOCK)


# impl name -> function(q, k, v, block_size). Fused kernels register here.
ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {
    'xla': lambda q, k, v, block_size=0: _xla_attention(q, k, v),
    'flash': _flash_impl,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              impl: str = 'xla', block_size: int = 0) -> jax.Array:
  """Multi-head attention softmax(q kᵀ / sqrt(Dh)) v; q/k/v [B, L, H, Dh] -> same.

  The single attention entry point of every model, so that swapping the kernel
  (`impl`) changes all of them. Both are differentiable by jax.jvp and jax.grad:
  'xla' is plain einsum attention (O(L²) memory); 'flash' is blockwise with a
  custom JVP (O(L) memory), `block_size` keys per block (0 = FLASH_BLOCK).
  """
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(
        f'Unknown attention implementation {impl!r}; set model.attn_impl to one '
        f'of {sorted(ATTENTION_IMPLS)}.')
  return ATTENTION_IMPLS[impl](q, k, v, block_size=block_size)


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
    block_size: keys per block of blockwise implementations (0 = default).
  """
  num_heads: int = 4
  head_dim: int = 0
  qk_norm: bool = False
  dtype: Any = jnp.float32
  impl: str = 'xla'
  block_size: int = 0

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
    out = attention(q, k, v, impl=self.impl, block_size=self.block_size)
    out = out.reshape(tokens.shape[:2] + (channels,))
    out = nn.Dense(channels, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='proj')(out)
    return out.reshape(x.shape)


# ------------------------------------------------------------------ memory / sharding

# model.remat -> jax.checkpoint policy of each block ('none' = no remat). 'full'
# saves nothing (recomputes the block in the backward pass, least memory); 'dots'
# keeps matmul outputs; 'dots_no_batch' keeps only weight matmuls (no attention
# logits), the usual choice for transformers.
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def maybe_remat(block: type[nn.Module], policy: str,
                static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """`block` wrapped in nn.remat with the named policy (argnums count `self`)."""
  check_choice('remat', policy, tuple(REMAT_POLICIES))
  if policy == 'none':
    return block
  return nn.remat(block, policy=REMAT_POLICIES[policy],
                  static_argnums=static_argnums)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Constrains activations [B, ...] to be split along the batch over the mesh's
  ('data', 'fsdp') axes, when a mesh is active (sharding.activation_mesh); a no-op
  otherwise. Keeps XLA from resharding activations along a weight's FSDP axis."""
  axes = sharding.BATCH_AXES
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(a in mesh.axis_names for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))
