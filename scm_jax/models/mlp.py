"""Residual MLP for low-dimensional data [B, D] (the 2-D toy problems)."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.errors import ConfigError
from scm_jax.models import layers


class ResidualBlock(nn.Module):
  """Pre-norm residual block: x + Dense(drop(Dense(SiLU(AdaptiveNorm(x, emb)))))."""
  width: int
  norm_mode: str = 'double'
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
    h = layers.AdaptiveNorm(mode=self.norm_mode, norm='layer', dtype=self.dtype,
                            name='norm')(x, emb)
    h = nn.Dense(self.width, dtype=self.dtype, name='dense0')(nn.silu(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Dense(self.width, dtype=self.dtype, name='dense1')(h)
    return x + h


class MLP(layers.SCMNetwork):
  """sCM network for vectors: F_theta(x/sigma_d, t) and the log-weight w_phi(t).

  Input Dense -> `depth` residual blocks modulated by the time(+label) embedding
  -> LayerNorm -> SiLU -> zero-initialized output Dense (so F = 0 at init).

  Attributes:
    width: hidden width.
    depth: number of residual blocks.
    time_embed_dim: width of the conditioning embedding.
    time_embed_scale: multiplies t before the time embedding (and the logvar head).
    time_embed_kind: 'positional' or 'fourier' (ablation; see layers.TimeEmbedding).
    fourier_scale: std of the Fourier frequencies when time_embed_kind='fourier'.
    norm_mode: 'double' (sCM adaptive double normalization) or 'adagn'.
    dropout: dropout rate inside the residual blocks (train=True only).
    num_classes: number of classes; 0 means unconditional. Label `num_classes`
      is the null class for classifier-free guidance.
    logvar_channels: width of the positional embedding of the logvar head.
    dtype: compute dtype of the Denses, 'float32' or 'bfloat16'.
  """
  width: int = 256
  depth: int = 4
  time_embed_dim: int = 128
  time_embed_scale: float = 10.0

  input_kind = 'vectors'

  def __post_init__(self):
    for field in ('width', 'time_embed_dim'):
      if getattr(self, field) <= 0:
        raise ConfigError(f'model.{field} must be positive, got '
                          f'{getattr(self, field)}.')
    if self.depth < 0:
      raise ConfigError(f'model.depth must be >= 0, got {self.depth}.')
    super().__post_init__()

  def conditioning_dims(self) -> tuple[int, int]:
    return self.time_embed_dim, self.time_embed_dim

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array,
               labels: Optional[jax.Array] = None,
               guidance: Optional[jax.Array] = None, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (F [B, D] float32, logvar [B] float32)."""
    dtype, t, emb = self.embed(x, t, labels, guidance)

    h = nn.Dense(self.width, dtype=dtype, name='dense_in')(x)
    for i in range(self.depth):
      h = ResidualBlock(self.width, self.norm_mode, self.dropout, dtype,
                        name=f'block{i}')(h, emb, train)
    h = nn.LayerNorm(dtype=jnp.float32, name='norm_out')(h)
    out = nn.Dense(x.shape[-1], dtype=dtype, kernel_init=nn.initializers.zeros,
                   name='dense_out')(nn.silu(h))
    return out.astype(jnp.float32), self.logvar(t)
