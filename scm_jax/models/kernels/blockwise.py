"""Blockwise attention math: online softmax for the output and for its tangent.

Shared by the pure-JAX kernels (a `lax.scan` over key blocks) and the Pallas kernel
(a `fori_loop` over key blocks inside one program), so both compute the same numbers.
Arrays are [..., L, D] (heads/batch leading); the Pallas kernel calls the block
updates on 2-D tiles. Accumulation is float32 (float64 for float64 inputs).

Attention O = P V with P = softmax(S), S = q kᵀ · scale (Lu & Song 2024, App. F).
Tangent for (dq, dk, dv):
  dS = (dq kᵀ + q dkᵀ) · scale,   mu_i = Σ_j P_ij dS_ij,
  dO_i = Σ_j P_ij ((dS_ij - mu_i) V_j + dV_j).
The centred form matters in bfloat16: when dS has a large offset common to a row,
Σ P dS V and mu O nearly cancel, so forming them separately after a bfloat16 cast
loses the difference. The one-pass kernel (`jvp_update`) centres dS on a running
estimate c of mu (the P-weighted mean of dS over the key blocks seen so far) and
moves the accumulator to each new c with the float32 running output Σ P V:
  A = Σ_j e^{S_ij - m_i} ((dS_ij - c_i) V_j + dV_j),   A ← A + (c_old - c_new) Σ e^{S - m} V,
which is exact in exact arithmetic and leaves only the (small) refinements of c to
meet the rounding of Σ P V. At the end c = mu and dO = A / l.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

FLASH_BLOCK = 512   # keys per block of the lax.scan kernels
# Logit of padded keys: finite (inf - inf would be NaN), exp(MASK - m) == 0.
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


def acc_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def softmax_scale(head_dim: int) -> float:
  """1/sqrt(Dh) as a Python float: weakly typed, so it never promotes float32
  arrays to float64 under jax_enable_x64 (np.sqrt's float64 scalar did)."""
  return 1.0 / math.sqrt(head_dim)


def _dot(a, b, contract_b: int):
  """a [..., m, n] · b over a's last axis and b's axis `contract_b` (-1: b is
  [..., k, n], giving [..., m, k]; -2: b is [..., n, k], giving [..., m, k]);
  leading axes are batch axes; accumulates in acc_dtype."""
  batch = tuple(range(a.ndim - 2))
  dims = (((a.ndim - 1,), (b.ndim + contract_b,)), (batch, batch))
  return lax.dot_general(a, b, dims, preferred_element_type=acc_dtype(a.dtype))


def _masked(s, valid):
  return s if valid is None else jnp.where(valid, s, MASK)


# ------------------------------------------------------- one-pass output + tangent


class JvpCarry(NamedTuple):
  """Online-softmax statistics of the one-pass JVP; rows are queries.

  m: running row max of S; l: Σ e^{S - m}; mu: Σ e^{S - m} dS; c: centre (mu / l
  after the last block); acc_o: Σ e^{S - m} V; acc_t: Σ e^{S - m} ((dS - c) V + dV).
  Shapes [..., Lq, 1] for the row statistics, [..., Lq, Dv] for the accumulators.
  """
  m: jax.Array
  l: jax.Array
  mu: jax.Array
  c: jax.Array
  acc_o: jax.Array
  acc_t: jax.Array


def jvp_init(rows: tuple, dv: int, dtype) -> JvpCarry:
  """Empty statistics for `rows` (leading shape [..., Lq]) and value width dv."""
  zero = jnp.zeros(rows + (1,), dtype)
  acc = jnp.zeros(rows + (dv,), dtype)
  return JvpCarry(jnp.full(rows + (1,), -jnp.inf, dtype), zero, zero, zero, acc, acc)


def jvp_update(carry: JvpCarry, q, dq, k, dk, v, dv, valid, scale: float) -> JvpCarry:
  """Folds one key block (k, dk, v, dv [..., Lk_blk, D]) into the statistics of the
  queries q, dq [..., Lq, D]. `valid` ([1, Lk_blk] bool or None) masks padded keys."""
  s = _masked(_dot(q, k, -1) * scale, valid)
  ds = (_dot(dq, k, -1) + _dot(q, dk, -1)) * scale
  m = jnp.maximum(carry.m, jnp.max(s, axis=-1, keepdims=True))
  alpha = jnp.exp(carry.m - m)            # 0 on the first block (m = -inf)
  p = jnp.exp(s - m)                      # 0 on padded keys
  l = alpha * carry.l + jnp.sum(p, axis=-1, keepdims=True)
  mu = alpha * carry.mu + jnp.sum(p * ds, axis=-1, keepdims=True)
  c = mu / l
  centred = (p * (ds - c)).astype(v.dtype)
  p_lo = p.astype(v.dtype)
  acc_t = (alpha * (carry.acc_t + (carry.c - c) * carry.acc_o)
           + _dot(centred, v, -2) + _dot(p.astype(dv.dtype), dv, -2))
  acc_o = alpha * carry.acc_o + _dot(p_lo, v, -2)
  return JvpCarry(m, l, mu, c, acc_o, acc_t)


def jvp_finish(carry: JvpCarry) -> tuple[jax.Array, jax.Array]:
  """(O, dO) in the accumulation dtype."""
  return carry.acc_o / carry.l, carry.acc_t / carry.l


# ------------------------------------------------------- lax.scan kernels (pure JAX)


def _bhld(x):
  return jnp.swapaxes(x, 1, 2)      # [B, L, H, D] <-> [B, H, L, D]


def key_blocks(block: int, *arrays):
  """Pads [B, H, L, D] arrays along L to a multiple of `block` and splits them into
  [num_blocks, B, H, block, D] (scan-major). Also returns the per-block key validity
  [num_blocks, 1, block] (None when nothing is padded) and the block size used."""
  length = arrays[0].shape[2]
  block = max(1, min(block, length))
  num = -(-length // block)
  pad = num * block - length
  out = []
  for a in arrays:
    a = jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
    out.append(jnp.moveaxis(a.reshape(a.shape[:2] + (num, block, a.shape[-1])), 2, 0))
  valid = (jnp.arange(num * block) < length).reshape(num, 1, block) if pad else None
  return out, valid


def _scan_blocks(body, init, blocks, valid):
  if valid is None:
    return lax.scan(lambda c, xs: (body(c, xs, None), None), init, blocks)[0]
  return lax.scan(lambda c, xs: (body(c, xs[:-1], xs[-1]), None), init, (*blocks, valid))[0]


def forward(q, k, v, block: int = FLASH_BLOCK):
  """Attention output and its statistics, by an online softmax over key blocks.

  q, k, v [B, L, H, D]. Returns (O [B, Lq, H, Dv] in v.dtype, O in the accumulation
  dtype, lse [B, H, Lq, 1]). Memory O(Lq · block) instead of O(Lq · Lk).
  """
  scale = softmax_scale(q.shape[-1])
  qt = _bhld(q)
  (k_b, v_b), valid = key_blocks(block, _bhld(k), _bhld(v))
  f32 = acc_dtype(q.dtype)

  def body(carry, xs, valid_j):
    m, l, acc = carry
    k_j, v_j = xs
    s = _masked(_dot(qt, k_j, -1) * scale, valid_j)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + _dot(p.astype(v.dtype), v_j, -2)
    return m_new, l, acc

  rows = qt.shape[:3]
  init = (jnp.full(rows + (1,), -jnp.inf, f32), jnp.zeros(rows + (1,), f32),
          jnp.zeros(rows + v.shape[-1:], f32))
  m, l, acc = _scan_blocks(body, init, (k_b, v_b), valid)
  out = _bhld(acc / l)
  return out.astype(v.dtype), out, m + jnp.log(l)


def jvp(q, k, v, dq, dk, dv, block: int = FLASH_BLOCK):
  """(O, dO) [B, Lq, H, Dv] in v.dtype by the one-pass online JVP (`jvp_update`)
  over key blocks with lax.scan; the pure-JAX twin of the Pallas kernel."""
  scale = softmax_scale(q.shape[-1])
  qt, dqt = _bhld(q), _bhld(dq)
  blocks, valid = key_blocks(block, _bhld(k), _bhld(dk), _bhld(v), _bhld(dv))
  init = jvp_init(qt.shape[:3], v.shape[-1], acc_dtype(q.dtype))
  body = lambda carry, xs, valid_j: jvp_update(carry, qt, dqt, *xs, valid_j, scale)
  out, dout = jvp_finish(_scan_blocks(body, init, blocks, valid))
  return _bhld(out).astype(v.dtype), _bhld(dout).astype(v.dtype)


def tangent_given_lse(q, k, v, out_acc, lse, dq, dk, dv, block: int = FLASH_BLOCK):
  """dO for tangents (dq, dk, dv) given the forward's O (accumulation dtype) and lse.

  With lse known, P_ij = exp(S_ij - lse_i) is exact per block, so Σ P (dS V + dV)
  and mu accumulate over key blocks with no rescaling; both terms of dO = Σ P (dS V +
  dV) - mu O are float32 before the subtraction. Linear in (dq, dk, dv) with an
  O(L)-memory transpose (the block body is rematerialized), which is what `jax.grad`
  uses when no fused backward kernel applies.
  """
  scale = softmax_scale(q.shape[-1])
  qt, dqt = _bhld(q), _bhld(dq)
  blocks, valid = key_blocks(block, _bhld(k), _bhld(dk), _bhld(v), _bhld(dv))
  f32 = acc_dtype(q.dtype)

  def body(carry, xs, valid_j):
    acc_t, acc_mu = carry
    k_j, dk_j, v_j, dv_j = xs
    p = jnp.exp(_masked(_dot(qt, k_j, -1) * scale, valid_j) - lse)
    ds = (_dot(dqt, k_j, -1) + _dot(qt, dk_j, -1)) * scale
    pds = p * ds
    acc_mu = acc_mu + jnp.sum(pds, axis=-1, keepdims=True)
    acc_t = (acc_t + _dot(pds.astype(v.dtype), v_j, -2)
             + _dot(p.astype(dv.dtype), dv_j, -2))
    return acc_t, acc_mu

  body = jax.checkpoint(body, prevent_cse=False)
  init = (jnp.zeros(lse.shape[:3] + v.shape[-1:], f32), jnp.zeros(lse.shape, f32))
  acc_t, acc_mu = _scan_blocks(body, init, blocks, valid)
  return (_bhld(acc_t - acc_mu * _bhld(out_acc))).astype(v.dtype)


def reference_tangent(q, k, v, dq, dk, dv, block: int = FLASH_BLOCK):
  """dO by `forward` + `tangent_given_lse`: pure JAX, differentiable in every argument
  (the second-order rule of the fused tangent)."""
  _, out_acc, lse = forward(q, k, v, block)
  return tangent_given_lse(q, k, v, out_acc, lse, dq, dk, dv, block)


def tangent_transpose(q, k, v, ct, block: int = FLASH_BLOCK):
  """(ct_dq, ct_dk, ct_dv): the transpose of dO(dq, dk, dv) at (q, k, v) applied to
  the cotangent ct, i.e. the attention VJP, in O(L) memory."""
  _, out_acc, lse = forward(q, k, v, block)
  lin = lambda dq, dk, dv: tangent_given_lse(q, k, v, out_acc, lse, dq, dk, dv, block)
  return jax.linear_transpose(lin, q, k, v)(ct)
