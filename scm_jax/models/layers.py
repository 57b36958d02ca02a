"""Layers shared by the sCM networks (MLP, U-Net, DiT): conditioning, normalization, remat.

Everything here must be differentiable by `jax.jvp` in both the data `x` and the
TrigFlow time `t`: the sCT/sCD losses need the tangent dF/dt of the network
(Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", Sec. 4). The paper's stability fixes live here too: positional time
embeddings instead of large-scale Fourier ones (Sec. 4.1), adaptive double
normalization (Sec. 4.1); attention (with its JVP rule) is in attention.py.

Numerics policy: parameters are always float32; convs/denses run in the model's
compute dtype; time embeddings, normalization statistics and softmax run in float32.
"""

from typing import Any, Callable, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.infra import sharding
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


def check_levels(x: jax.Array, channel_mult) -> None:
  """ConfigError unless a U-Net with len(channel_mult) levels can halve x's size that often."""
  factor = 2 ** (len(channel_mult) - 1)
  if x.shape[1] % factor or x.shape[2] % factor:
    raise ConfigError(
        f'Image size {x.shape[1]}x{x.shape[2]} is not divisible by {factor} = '
        f'2^(len(channel_mult)-1) for channel_mult={tuple(channel_mult)}; '
        f'use fewer levels in model.channel_mult or resize the images.')


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


def guidance_scales(guidance: Optional[jax.Array], batch: int) -> jax.Array:
  """The guidance input as float32 [B]: a scalar or [B] scale; None means 1 (no guidance)."""
  g = 1.0 if guidance is None else guidance
  return jnp.broadcast_to(jnp.asarray(g, jnp.float32), (batch,))


class Conditioning(nn.Module):
  """Conditioning vector = SiLU(time emb. + guidance emb. + label emb.), float32 [B, dim].

  Labels live in [0, num_classes]; index `num_classes` is the null class used for
  classifier-free guidance, and `labels=None` means all-null. With num_classes == 0
  the model is unconditional and labels are ignored. The SiLU is applied once here
  (as in ADM/EDM), so the per-block projections in AdaptiveNorm are plain Denses.

  With `guidance_embed`, the guidance scale s of a guidance-conditioned sCD student
  (Lu & Song 2024, App. G.2: F_theta(x, t, s)) is embedded like t (positional features
  of scale * s and a linear layer) and added to the time embedding. The linear layer
  starts at zero, so a student initialised from its teacher computes the teacher's F.
  """
  dim: int
  scale: float = 1.0
  kind: str = 'positional'
  fourier_scale: float = 16.0
  freq_dim: int = 0
  num_classes: int = 0
  guidance_embed: bool = False

  @nn.compact
  def __call__(self, t: jax.Array, labels: Optional[jax.Array],
               guidance: Optional[jax.Array] = None) -> jax.Array:
    emb = TimeEmbedding(self.dim, self.scale, self.kind, self.fourier_scale,
                        self.freq_dim, name='time')(t)
    if self.guidance_embed:
      s = guidance_scales(guidance, t.shape[0])
      feats = positional_embedding(self.scale * s, self.freq_dim or self.dim)
      emb = emb + nn.Dense(self.dim, dtype=jnp.float32, kernel_init=nn.initializers.zeros,
                           name='guidance')(feats)
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
  """Fields, checks and the prologue / epilogue shared by every sCM backbone.

  Each backbone maps (x / sigma_d, t, labels) to (F_theta, logvar) with the same
  conditioning: a time embedding of c_noise(t) = time_embed_scale * t (Sec. 4.1), an
  optional label embedding with a null class, the sCM adaptive double normalization,
  and the adaptive-weight head w_phi(t) (Sec. 4.3). A subclass sets `input_kind`,
  says how wide its conditioning is (`conditioning_dims`), may add input checks
  (`check_input`), and calls `embed` first and `logvar` last in its __call__.
  """
  time_embed_dim: int = 0
  time_embed_scale: float = 1.0
  time_embed_kind: str = 'positional'
  fourier_scale: float = 16.0
  norm_mode: str = 'double'
  dropout: float = 0.0
  num_classes: int = 0
  logvar_channels: int = 128
  guidance_embed: bool = False
  dtype: str = 'float32'

  # 'vectors' ([B, D]) or 'images' ([B, H, W, C]): what the backbone takes.
  input_kind: ClassVar[str] = 'images'

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

  def conditioning_dims(self) -> tuple[int, int]:
    """(width of the conditioning vector, width of the sinusoidal time features)."""
    raise NotImplementedError

  def check_input(self, x: jax.Array) -> None:
    """Backbone-specific checks of the input beyond its rank (e.g. divisibility)."""

  def param_projection(self) -> Optional[Callable]:
    """(params, params before the update) -> params, applied after every optimizer update
    (None: no constraint)."""
    return None

  def conditioning(self) -> nn.Module:
    """The module embedding (t [B], labels, guidance) into the conditioning vector."""
    dim, freq_dim = self.conditioning_dims()
    return Conditioning(dim, self.time_embed_scale, self.time_embed_kind, self.fourier_scale,
                        freq_dim, self.num_classes, self.guidance_embed, name='cond')

  def embed(self, x: jax.Array, t: jax.Array, labels: Optional[jax.Array],
            guidance: Optional[jax.Array] = None, **cond_kwargs):
    """The prologue: checks x, broadcasts t to [B] and embeds (t, labels, guidance).

    `guidance` (a scalar or [B]; None = 1) is the input s of a guidance-conditioned
    student (`guidance_embed`); other models refuse it. Returns (compute dtype,
    t [B] float32, conditioning vector [B, dim] float32).
    """
    if guidance is not None and not self.guidance_embed:
      raise ConfigError(f'model {type(self).__name__.lower()!r} has no guidance input; set '
                        'model.guidance_embed=True to train a guidance-conditioned student.')
    rank, other = ((2, 'images [B, H, W, C]') if self.input_kind == 'vectors'
                   else (4, 'vectors [B, D]'))
    if x.ndim != rank:
      wanted = 'vectors [B, D]' if rank == 2 else 'images or latents [B, H, W, C]'
      raise ConfigError(
          f'model {type(self).__name__.lower()!r} takes {wanted} but got inputs of shape '
          f"{x.shape}; use model.name={'unet' if rank == 2 else 'mlp'!r} for {other}.")
    self.check_input(x)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    emb = self.conditioning()(t, labels, guidance, **cond_kwargs)
    return resolve_dtype(self.dtype), t, emb

  def logvar(self, t: jax.Array) -> jax.Array:
    """The epilogue: the adaptive-weight head w_phi(t) [B] (depends on t only)."""
    return LogVarHead(self.logvar_channels, self.time_embed_scale, name='logvar')(t)


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
