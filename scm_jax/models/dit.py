"""Diffusion Transformer (DiT, Peebles & Xie 2023) with sCM's conditioning.

Images (or VAE latents) [B, H, W, C] are cut into p x p patches, embedded as tokens
with a fixed 2-D sin-cos position embedding, and processed by `depth` pre-norm
transformer blocks. Each block is modulated adaLN-style by the conditioning vector
(time + class), but with sCM's adaptive *double* normalization (Lu & Song 2024,
Sec. 4.1): y = LayerNorm(x) · pnorm(s(emb)) + pnorm(b(emb)), where pnorm is pixel
normalization of the modulation. Output projections of attention, MLP and the final
layer are zero-initialized, so every block starts as the identity and F = 0 at init
(the role of DiT's "adaLN-Zero" gates, without an unnormalized gate).

The residual stream stays float32; denses run in `dtype` (bfloat16 for scale).
Blocks can be rematerialized (`remat`, see layers.REMAT_POLICIES) and their outputs
are constrained to batch sharding when a mesh is active (layers.constrain_batch).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import ConfigError
from scm_jax.models import attention
from scm_jax.models import layers

# name -> (hidden_size, depth, num_heads): DiT-S/B/L/XL of Peebles & Xie, and an
# XXL width/depth that reaches ~1.5B parameters with sCM's per-block modulation.
DIT_SIZES = {
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'XL': (1152, 28, 16),
    'XXL': (1536, 40, 24),
}


def sincos_2d_embedding(height: int, width: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [height * width, dim] (as in DiT / MAE).

  Half of the channels encode the row, half the column, each with the 1-D
  transformer embedding of the integer position.
  """
  if dim % 4:
    raise ConfigError(f'DiT hidden_size={dim} must be divisible by 4 for the 2-D '
                      'position embedding.')
  def one_d(pos, d):
    omega = 1. / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.))
    args = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing='ij')
  emb = np.concatenate([one_d(rows, dim // 2), one_d(cols, dim // 2)], axis=1)
  return emb.astype(np.float32)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] tokens, row-major over patches."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
  b, _, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


class DiTBlock(nn.Module):
  """x + Attn(AdaNorm(x, emb)); x + MLP(AdaNorm(x, emb)) on tokens [B, N, C]."""
  num_heads: int
  head_dim: int = 0
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  dropout: float = 0.0
  norm_mode: str = 'double'
  dtype: Any = jnp.float32
  attn_impl: str = 'xla'
  attn_block_size: int = 0
  attn_block_q: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    width = x.shape[-1]
    norm = lambda name: layers.AdaptiveNorm(mode=self.norm_mode, norm='layer',
                                            epsilon=1e-6, dtype=self.dtype, name=name)
    h = norm('norm_attn')(x, emb)
    x = x + attention.SelfAttention(self.num_heads, self.head_dim, self.qk_norm,
                                 self.dtype, self.attn_impl, self.attn_block_size,
                                 self.attn_block_q, name='attn')(h)
    h = norm('norm_mlp')(x, emb)
    h = nn.Dense(int(width * self.mlp_ratio), dtype=self.dtype, name='fc1')(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h))
    h = nn.Dense(width, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                 name='fc2')(h)
    return layers.constrain_batch(x + h)


class DiT(layers.SCMNetwork):
  """sCM network on a DiT backbone: F_theta(x/sigma_d, t) and w_phi(t).

  Attributes:
    patch_size: side p of the square patches (DiT-*/2 uses 2 on 32x32x4 latents).
    hidden_size: token width C.
    depth: number of transformer blocks.
    num_heads: attention heads, used when head_dim == 0.
    head_dim: channels per head; > 0 overrides num_heads.
    mlp_ratio: MLP hidden width / C.
    qk_norm: RMS-normalize queries and keys (bounds logits and their jvp).
    dropout: dropout in the MLPs (train=True only).
    time_embed_dim: conditioning width; 0 means hidden_size.
    time_embed_scale: multiplies t before the time embedding (and logvar head).
    time_embed_kind: 'positional' or 'fourier' (ablation).
    fourier_scale: std of the Fourier frequencies when time_embed_kind='fourier'.
    freq_dim: width of the sinusoidal time features.
    norm_mode: 'double' (sCM) or 'adagn' (DiT-style 1 + scale).
    num_classes: classes; 0 = unconditional; label `num_classes` is the null class.
    logvar_channels: width of the positional embedding of the logvar head.
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters stay float32).
    attn_impl: attention implementation, see attention.attention: 'xla', 'flash'
      or 'pallas' (fused forward, blockwise / Pallas JVP kernel).
    attn_block_size: keys per block of 'flash' and 'pallas' (0 = per-backend default).
    attn_block_q: queries per tile of the 'pallas' kernel (0 = per-backend default).
    remat: rematerialization policy of each block, see layers.REMAT_POLICIES.
    out_channels: output channels; 0 means the input's.
  """
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  head_dim: int = 0
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  freq_dim: int = 256
  attn_impl: str = 'xla'
  attn_block_size: int = 0
  attn_block_q: int = 0
  remat: str = 'none'
  out_channels: int = 0

  def __post_init__(self):
    layers.check_choice('attn_impl', self.attn_impl, tuple(attention.ATTENTION_IMPLS))
    layers.check_choice('remat', self.remat, tuple(layers.REMAT_POLICIES))
    for field in ('patch_size', 'hidden_size', 'depth'):
      if getattr(self, field) <= 0:
        raise ConfigError(f'model.{field} must be > 0, got {getattr(self, field)}.')
    attention.heads_for(self.hidden_size, self.num_heads, self.head_dim)
    super().__post_init__()

  def conditioning_dims(self) -> tuple[int, int]:
    return self.time_embed_dim or self.hidden_size, self.freq_dim

  def check_input(self, x: jax.Array) -> None:
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ConfigError(f'Input size {x.shape[1]}x{x.shape[2]} is not divisible by '
                        f'model.patch_size={p}.')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               labels: Optional[jax.Array] = None,
               guidance: Optional[jax.Array] = None, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (F [B, H, W, C_out] float32, logvar [B] float32)."""
    dtype, t, emb = self.embed(x, t, labels, guidance)
    _, height, width, channels = x.shape
    p, c = self.patch_size, self.hidden_size

    tokens = patchify(layers.constrain_batch(x), p)
    h = nn.Dense(c, dtype=dtype, name='patch_embed')(tokens.astype(dtype))
    pos = sincos_2d_embedding(height // p, width // p, c)
    h = h.astype(jnp.float32) + jnp.asarray(pos)[None]  # float32 residual stream

    block = layers.maybe_remat(DiTBlock, self.remat, static_argnums=(3,))
    for i in range(self.depth):
      h = block(self.num_heads, self.head_dim, self.mlp_ratio, self.qk_norm,
                self.dropout, self.norm_mode, dtype, self.attn_impl,
                self.attn_block_size, self.attn_block_q, name=f'block{i}')(h, emb, train)

    h = layers.AdaptiveNorm(mode=self.norm_mode, norm='layer', epsilon=1e-6,
                            dtype=dtype, name='norm_out')(h, emb)
    out_channels = self.out_channels or channels
    out = nn.Dense(p * p * out_channels, dtype=dtype,
                   kernel_init=nn.initializers.zeros, name='final')(h)
    out = unpatchify(out.astype(jnp.float32), p, height, width)
    return out, self.logvar(t)


def dit_size(name: str) -> dict:
  """Model-config fields (hidden_size, depth, num_heads) of a DiT size 'S'..'XXL'."""
  if name not in DIT_SIZES:
    raise ConfigError(f'Unknown DiT size {name!r}; choose one of {list(DIT_SIZES)}.')
  hidden, depth, heads = DIT_SIZES[name]
  return {'hidden_size': hidden, 'depth': depth, 'num_heads': heads}


def tensor_parallel_rules() -> tuple:
  """config.sharding.rules for Megatron-style tensor parallelism of DiT blocks.

  Column-parallel qkv/fc1 (output features over 'tensor'), row-parallel proj/fc2
  (input features over 'tensor'), the other dimension over 'fsdp'; then each
  block needs one all-reduce per sub-layer. Leaves not matched here follow
  config.sharding.strategy. With mesh.tensor = 1 these are plain FSDP rules.
  """
  col, row = ('fsdp', 'tensor'), ('tensor', 'fsdp')
  return ((r'attn/qkv/kernel$', col), (r'attn/qkv/bias$', ('tensor',)),
          (r'attn/proj/kernel$', row),
          (r'fc1/kernel$', col), (r'fc1/bias$', ('tensor',)),
          (r'fc2/kernel$', row))
