"""Attention kernels: blockwise (lax.scan) and Pallas one-pass JVPs, the fused primal
kernels, and the `attention_tangent` primitive that ties them to JAX's transforms.

See `models.attention` for the entry point the models call.
"""

from scm_jax.models.kernels.blockwise import FLASH_BLOCK
from scm_jax.models.kernels.pallas import DEFAULT_BLOCKS, attention_jvp
from scm_jax.models.kernels.tangent import (KERNELS, PRIMALS, attention_tangent,
                                            cudnn_supported, portable_kernels, primal_fn)

__all__ = ['DEFAULT_BLOCKS', 'FLASH_BLOCK', 'KERNELS', 'PRIMALS', 'attention_jvp',
           'attention_tangent', 'cudnn_supported', 'portable_kernels', 'primal_fn']
