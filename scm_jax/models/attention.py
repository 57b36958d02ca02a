"""Attention: one entry point for every model, fused kernels wherever JAX allows them.

The sCT/sCD losses take `jax.jvp` through the whole network (Lu & Song 2024, Sec. 4 and
App. F), attention included, but fused attention kernels (cuDNN, Pallas) are
`custom_vjp` functions that refuse forward mode. `attention(q, k, v, impl=...)` offers:

- 'xla': plain einsum attention, differentiated by JAX (O(L²) memory); the reference.
- 'flash' and 'pallas': `fused_attention`, a `custom_jvp` whose primal is a fused
  forward kernel (cuDNN flash attention on NVIDIA GPUs in bf16/fp16; otherwise the
  blockwise forward for 'flash', O(L) memory, and `jax.nn.dot_product_attention`,
  i.e. XLA on CPU/TPU, for 'pallas') and whose JVP rule adds the tangent of the
  one-pass online-softmax JVP: a `lax.scan` over key blocks ('flash') or the Pallas
  kernel ('pallas': Triton on GPU, Mosaic on TPU, interpret mode on CPU).

So sampling, the teacher and the gradient pass (no forward-mode derivative) run the
fused forward; `jax.jvp` runs the fused forward plus our tangent kernel; `jax.grad`
linearizes the rule and transposes the tangent into the primal kernel's VJP (cuDNN's
fused backward) or the O(L) blockwise backward (see kernels.tangent).
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.errors import ConfigError
from scm_jax.infra import sharding
from scm_jax.models import kernels
from scm_jax.models.kernels import blockwise

ATTENTION_IMPLS = ('xla', 'flash', 'pallas')
FLASH_BLOCK = blockwise.FLASH_BLOCK


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain einsum attention with float32 logits and softmax; jvp-friendly."""
  scale = blockwise.softmax_scale(q.shape[-1])
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                      preferred_element_type=blockwise.acc_dtype(q.dtype)) * scale
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """Which kernels `fused_attention` runs (hashable: a static argument).

  Attributes:
    primal: forward kernel, 'cudnn', 'xla' or 'blockwise' (kernels.primal_fn).
    tangent: JVP kernel, 'pallas' or 'blockwise' (kernels.KERNELS).
    block_q: queries per tile of the Pallas kernel (0 = its default per backend).
    block_k: keys per tile/block (0 = the kernel's default).
  """
  primal: str
  tangent: str
  block_q: int = 0
  block_k: int = 0


def kernels_for(impl: str, q: jax.Array, block_q: int = 0, block_k: int = 0) -> Kernels:
  """The kernels of attention `impl` ('flash' or 'pallas') for q on this backend."""
  if kernels.cudnn_supported(q):
    primal = 'cudnn'
  else:
    primal = 'blockwise' if impl == 'flash' else 'xla'
  return Kernels(primal, 'blockwise' if impl == 'flash' else 'pallas', block_q, block_k)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, kern: Kernels) -> jax.Array:
  """softmax(q kᵀ / sqrt(Dh)) v by the fused forward `kern.primal`, with a JVP rule
  (fused forward + `kern.tangent` tangent kernel). q, k, v [B, L, H, Dh]."""
  return kernels.primal_fn(kern.primal, kern.block_k)(q, k, v)


@fused_attention.defjvp
def _fused_attention_jvp(kern, primals, tangents):
  out = kernels.primal_fn(kern.primal, kern.block_k)(*primals)
  dout = kernels.attention_tangent(*primals, *tangents, primal=kern.primal,
                                   kernel=kern.tangent, block_q=kern.block_q,
                                   block_k=kern.block_k)
  return out, dout


def _batch_sharded(fn, q: jax.Array):
  """fn under shard_map over the batch (and heads over 'tensor') when a mesh is active
  (sharding.activation_mesh): XLA cannot partition a Pallas custom call itself."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = sharding.BATCH_AXES
  if mesh.empty or not all(a in mesh.axis_names for a in axes):
    return fn
  if q.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return fn
  tensor = mesh.shape.get('tensor', 1)
  heads = 'tensor' if tensor > 1 and q.shape[2] % tensor == 0 else None
  spec = jax.sharding.PartitionSpec(axes, None, heads, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = 'xla',
              block_size: int = 0, block_q: int = 0) -> jax.Array:
  """Multi-head attention softmax(q kᵀ / sqrt(Dh)) v; q/k/v [B, L, H, Dh] -> same.

  The single attention entry point of every model, so that swapping the kernel
  (`impl`, see the module docstring) changes all of them. Every impl is
  differentiable by jax.jvp and jax.grad. `block_size` is the keys per block of the
  blockwise kernels and of the Pallas tile, `block_q` the queries per Pallas tile
  (0 = defaults per backend: kernels.FLASH_BLOCK, kernels.DEFAULT_BLOCKS).
  """
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(
        f'Unknown attention implementation {impl!r}; set model.attn_impl to one '
        f'of {sorted(ATTENTION_IMPLS)}.')
  if block_size < 0 or block_q < 0:
    raise ConfigError(f'Attention block sizes must be >= 0 (0 = per-backend default), got '
                      f'model.attn_block_size={block_size}, model.attn_block_q={block_q}.')
  if impl == 'xla':
    return _xla_attention(q, k, v)
  kern = kernels_for(impl, q, block_q, block_size)
  fn = lambda q, k, v: fused_attention(q, k, v, kern)
  if kern.tangent == 'pallas':
    fn = _batch_sharded(fn, q)
  return fn(q, k, v)


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
    block_size: keys per block of the fused implementations (0 = default).
    block_q: queries per tile of the Pallas kernel (0 = default).
  """
  num_heads: int = 4
  head_dim: int = 0
  qk_norm: bool = False
  dtype: Any = jnp.float32
  impl: str = 'xla'
  block_size: int = 0
  block_q: int = 0

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
    out = attention(q, k, v, impl=self.impl, block_size=self.block_size,
                    block_q=self.block_q)
    out = out.reshape(tokens.shape[:2] + (channels,))
    out = nn.Dense(channels, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='proj')(out)
    return out.reshape(x.shape)
