"""Pallas kernel for the flash-attention JVP: O and dO in one pass (Lu & Song 2024, App. F).

One program per (batch, head, query block) loads its q and dq tiles once and loops over
the key blocks, folding each (k, dk, v, dv) tile into online-softmax statistics
(`blockwise.jvp_update`: running max, normalizer, the P-weighted mean of dS, float32
accumulators for O and the centred tangent). Nothing of size Lq x Lk leaves the
program. The same body lowers to Triton on GPUs (`backend='triton'`, tensors in their
[B, L, H, D] layout) and to Mosaic on TPUs (`backend='mosaic'`, [B, H, L, D] so that
each tile's last two axes are (L, D)); `interpret=True` runs it anywhere (CPU tests),
and `interpret=pltpu.InterpretParams()` with backend='mosaic' runs TPU semantics on CPU.

Odd lengths are padded to whole blocks (padded keys masked, padded query rows
dropped); the head dimension is padded to a power of two on Triton.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from scm_jax.models.kernels import blockwise

BACKENDS = ('triton', 'mosaic')
# (block_q, block_k) when the config says 0: Triton tiles of 64 keep the two float32
# accumulators and four input tiles in registers/shared memory at Dh <= 128; Mosaic
# wants 128-lane tiles. Interpret mode (CPU tests) uses the Triton layout and blocks.
DEFAULT_BLOCKS = {'triton': (64, 64), 'mosaic': (128, 128)}


def _ceil_to(n: int, m: int) -> int:
  return -(-n // m) * m


def _tile(length: int, block: int, backend: str) -> int:
  """Block size actually used: `block` capped by the (rounded-up) length; Triton
  needs powers of two >= 16 (its dot), Mosaic multiples of 8."""
  if backend == 'triton':
    return max(16, min(pl.next_power_of_2(block), pl.next_power_of_2(length)))
  return min(_ceil_to(block, 8), _ceil_to(length, 8))


def _kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, o_ref, do_ref, *,
            scale: float, block_k: int, kv_len: int):
  q, dq = q_ref[...], dq_ref[...]
  num_kb = k_ref.shape[0] // block_k
  padded = num_kb * block_k != kv_len
  f32 = blockwise.acc_dtype(q.dtype)

  def body(j, carry):
    start = pl.multiple_of(j * block_k, block_k)
    keys = pl.ds(start, block_k)
    valid = None
    if padded:
      valid = start + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < kv_len
    return blockwise.jvp_update(carry, q, dq, k_ref[keys, :], dk_ref[keys, :],
                                v_ref[keys, :], dv_ref[keys, :], valid, scale)

  init = blockwise.jvp_init((q.shape[0],), v_ref.shape[-1], f32)
  out, dout = blockwise.jvp_finish(lax.fori_loop(0, num_kb, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  do_ref[...] = dout.astype(do_ref.dtype)


def _pad(x, length: int, width: int):
  """Zero-pads [B, L, H, D] to L = length, D = width (zeros change no logit)."""
  pads = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3]))
  return jnp.pad(x, pads) if any(p[1] for p in pads) else x


def _compiler_params(backend: str, head_dim: int):
  if backend == 'triton':
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=('parallel',) * 3)


@functools.partial(jax.jit, static_argnames=('block_q', 'block_k', 'backend', 'interpret'))
def attention_jvp(q, k, v, dq, dk, dv, *, block_q: int = 0, block_k: int = 0,
                  backend: str = 'triton', interpret=False):
  """(O, dO) of softmax(q kᵀ / sqrt(Dh)) v along (dq, dk, dv), by the Pallas kernel.

  Args:
    q, dq: queries and their tangent [B, Lq, H, D]; k, dk, v, dv: [B, Lk, H, D].
    block_q, block_k: queries / keys per tile (0 = DEFAULT_BLOCKS[backend]).
    backend: 'triton' (GPU) or 'mosaic' (TPU): the lowering and tensor layout.
    interpret: run in Pallas interpret mode (True, or a pltpu.InterpretParams).

  Returns:
    (O, dO) [B, Lq, H, Dv] in v.dtype; float32 accumulation inside.
  """
  if backend not in BACKENDS:
    raise ValueError(f'Unknown Pallas backend {backend!r}; use one of {BACKENDS}.')
  batch, lq, heads, dh = q.shape
  lk, dv_width = k.shape[1], v.shape[-1]
  default_q, default_k = DEFAULT_BLOCKS[backend]
  bq = _tile(lq, block_q or default_q, backend)
  bk = _tile(lk, block_k or default_k, backend)
  lq_pad, lk_pad = _ceil_to(lq, bq), _ceil_to(lk, bk)
  width = (lambda d: max(16, pl.next_power_of_2(d))) if backend == 'triton' else (lambda d: d)
  dqk, dvv = width(dh), width(dv_width)
  q, dq = (_pad(x, lq_pad, dqk) for x in (q, dq))
  k, dk = (_pad(x, lk_pad, dqk) for x in (k, dk))
  v, dv = (_pad(x, lk_pad, dvv) for x in (v, dv))

  kernel = functools.partial(_kernel, scale=blockwise.softmax_scale(dh), block_k=bk,
                             kv_len=lk)
  grid = (batch, heads, lq_pad // bq)
  if backend == 'triton':      # [B, L, H, D]: a tile is (L, D) at fixed (b, h)
    q_spec = pl.BlockSpec((None, bq, None, dqk), lambda b, h, i: (b, i, h, 0))
    kv_spec = lambda d: pl.BlockSpec((None, lk_pad, None, d), lambda b, h, i: (b, 0, h, 0))
    o_spec = pl.BlockSpec((None, bq, None, dvv), lambda b, h, i: (b, i, h, 0))
    out_shape = (batch, lq_pad, heads, dvv)
    to_layout = from_layout = lambda x: x
  else:                        # [B, H, L, D]: Mosaic tiles must end in (L, D)
    q_spec = pl.BlockSpec((None, None, bq, dqk), lambda b, h, i: (b, h, i, 0))
    kv_spec = lambda d: pl.BlockSpec((None, None, lk_pad, d), lambda b, h, i: (b, h, 0, 0))
    o_spec = pl.BlockSpec((None, None, bq, dvv), lambda b, h, i: (b, h, i, 0))
    out_shape = (batch, heads, lq_pad, dvv)
    to_layout = from_layout = lambda x: jnp.swapaxes(x, 1, 2)
  out, dout = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[q_spec, kv_spec(dqk), kv_spec(dvv), q_spec, kv_spec(dqk), kv_spec(dvv)],
      out_specs=[o_spec, o_spec],
      out_shape=[jax.ShapeDtypeStruct(out_shape, v.dtype)] * 2,
      compiler_params=_compiler_params(backend, dqk),
      interpret=interpret,
      name='attention_jvp',
  )(*map(to_layout, (q, k, v, dq, dk, dv)))
  out, dout = from_layout(out), from_layout(dout)
  return out[:, :lq, :, :dv_width], dout[:, :lq, :, :dv_width]
