"""The attention tangent as one JAX primitive, and the fused primal kernels.

`attention_tangent(q, k, v, dq, dk, dv)` is dO, the tangent of attention, linear in
(dq, dk, dv). It is a primitive (not a traced function) so that each way JAX uses it
gets the right kernel:
- evaluated (the JVP rule of `models.attention`, i.e. `jax.jvp`): the one-pass kernel,
  Pallas ('pallas': Triton on GPU, Mosaic on TPU, interpret mode on CPU) or lax.scan
  ('blockwise');
- transposed (`jax.grad` through the JVP rule: linearize + transpose): the attention
  VJP of the primal kernel (cuDNN's fused backward on GPU), or the O(L)-memory
  transpose of the blockwise tangent when the primal is the blockwise forward;
- differentiated (a gradient of the tangent itself, e.g. through a stop-gradient-free
  jvp): the JVP of the pure-JAX reference tangent;
- vmapped: folded into the batch axis.

PRIMALS are the forward kernels that need no forward-mode rule: cuDNN flash attention
(`jax.nn.dot_product_attention(implementation='cudnn')`: NVIDIA GPUs, bf16/fp16, head
dim a multiple of 8 and <= 128), XLA (`implementation=None`, what JAX picks on CPU and
TPU) and the blockwise forward.
"""

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

from scm_jax.models.kernels import blockwise, pallas

try:  # the public re-exports (JAX 0.10); newer JAX may keep them only in jax._src
  from jax.core import ShapedArray
  from jax.interpreters import ad, batching
  _ = (ad.primitive_jvps, ad.primitive_transposes, ad.Zero, batching.primitive_batchers,
       batching.bdim_at_front)
except (ImportError, AttributeError):
  from jax._src.core import ShapedArray  # pylint: disable=ungrouped-imports
  from jax._src.interpreters import ad, batching

KERNELS = ('blockwise', 'pallas')

PRIMALS = {
    'cudnn': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='cudnn'),
    'xla': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=None),
}


def primal_fn(name: str, block_k: int = 0):
  """The forward kernel `name` ('cudnn', 'xla' or 'blockwise') as f(q, k, v)."""
  if name == 'blockwise':
    return lambda q, k, v: blockwise.forward(q, k, v, block_k or blockwise.FLASH_BLOCK)[0]
  return PRIMALS[name]


# Set by `portable_kernels` (a context, per thread): read when a model is traced.
_PORTABLE = contextvars.ContextVar('scm_jax_portable_kernels', default=False)


@contextlib.contextmanager
def portable_kernels():
  """Within this context, traced models pick no cuDNN attention: a program exported
  with jax.export for several platforms (or kept for later JAX versions) must not hold
  cuDNN's custom call, which only CUDA lowers and jax.export does not keep stable.
  Fresh `jax.jit`s only: an existing one may reuse a trace made outside."""
  token = _PORTABLE.set(True)
  try:
    yield
  finally:
    _PORTABLE.reset(token)


def cudnn_supported(q: jax.Array) -> bool:
  """Whether cuDNN flash attention takes q (and same-shaped k, v) on this backend."""
  if jax.default_backend() != 'gpu' or _PORTABLE.get():
    return False
  if 'rocm' in jax.devices()[0].client.platform_version.lower():
    return False
  dh = q.shape[-1]
  return q.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0 and dh <= 128


attention_tangent_p = jex_core.Primitive('attention_tangent')


def attention_tangent(q, k, v, dq, dk, dv, *, primal: str, kernel: str,
                      block_q: int = 0, block_k: int = 0) -> jax.Array:
  """dO [B, Lq, H, Dv] (v.dtype) of attention at (q, k, v) along (dq, dk, dv).

  Args:
    q, k, v, dq, dk, dv: [B, L, H, D] arrays (tangents in the primal dtypes).
    primal: the forward kernel whose VJP is this map's transpose (see PRIMALS).
    kernel: 'pallas' or 'blockwise': how dO is computed when evaluated.
    block_q, block_k: tile sizes (0 = the kernel's default on the backend).
  """
  if kernel not in KERNELS:
    raise ValueError(f'Unknown tangent kernel {kernel!r}; use one of {KERNELS}.')
  return attention_tangent_p.bind(q, k, v, dq, dk, dv, primal=primal, kernel=kernel,
                                  block_q=block_q, block_k=block_k)


def _abstract_eval(q, k, v, dq, dk, dv, **_):
  return ShapedArray(q.shape[:-1] + v.shape[-1:], v.dtype)


def _evaluate(platform, q, k, v, dq, dk, dv, *, primal, kernel, block_q, block_k):
  del primal
  if kernel == 'blockwise':
    return blockwise.jvp(q, k, v, dq, dk, dv, block_k or blockwise.FLASH_BLOCK)[1]
  backend = 'mosaic' if platform == 'tpu' else 'triton'
  return pallas.attention_jvp(q, k, v, dq, dk, dv, block_q=block_q, block_k=block_k,
                              backend=backend, interpret=platform == 'cpu')[1]


@functools.lru_cache(maxsize=None)
def _jitted(params: tuple):
  return jax.jit(functools.partial(attention_tangent_p.bind, **dict(params)))


def _impl(*args, **params):   # eager calls: compiled once per parameter set
  return _jitted(tuple(sorted(params.items())))(*args)


def _jvp(primals, tangents, *, primal, kernel, block_q, block_k):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  out = attention_tangent_p.bind(*primals, primal=primal, kernel=kernel, block_q=block_q,
                                 block_k=block_k)
  ref = functools.partial(blockwise.reference_tangent, block=block_k or blockwise.FLASH_BLOCK)
  return out, jax.jvp(ref, tuple(primals), tuple(tangents))[1]


def _transpose(ct, q, k, v, dq, dk, dv, *, primal, kernel, block_q, block_k):
  del kernel, block_q
  if any(ad.is_undefined_primal(x) for x in (q, k, v)):
    raise NotImplementedError('attention_tangent is linear in (dq, dk, dv) only.')
  undefined = [ad.is_undefined_primal(x) for x in (dq, dk, dv)]
  if type(ct) is ad.Zero:
    cts = [None] * 3
  elif primal == 'blockwise':
    cts = blockwise.tangent_transpose(q, k, v, ct, block_k or blockwise.FLASH_BLOCK)
  else:
    cts = jax.vjp(PRIMALS[primal], q, k, v)[1](ct)
  return [None] * 3 + [c if u else None for c, u in zip(cts, undefined)]


def _batch(args, dims, **params):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
  out = attention_tangent_p.bind(*[a.reshape((-1,) + a.shape[2:]) for a in args], **params)
  return out.reshape((size, -1) + out.shape[1:]), 0


attention_tangent_p.def_impl(_impl)
attention_tangent_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[attention_tangent_p] = _jvp
ad.primitive_transposes[attention_tangent_p] = _transpose
batching.primitive_batchers[attention_tangent_p] = _batch
for _platform in ('cuda', 'rocm', 'tpu', None):
  mlir.register_lowering(
      attention_tangent_p,
      mlir.lower_fun(functools.partial(_evaluate, _platform or 'cpu'), multiple_results=False),
      platform=_platform)
