"""Attention: one entry point for every model, and a blockwise ("flash") kernel with a JVP rule.

The sCT/sCD losses take `jax.jvp` through the whole network (Lu & Song 2024, Sec. 4 and
App. F), attention included. `jax.nn.dot_product_attention`'s fused kernels (cuDNN, Pallas)
are `custom_vjp` functions and refuse forward-mode differentiation, so attention here is
either plain XLA einsums ('xla', O(L^2) memory) or `flash_attention`, a blockwise online
softmax with a custom JVP whose tangent is blockwise too ('flash', O(L) memory).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import ConfigError


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
