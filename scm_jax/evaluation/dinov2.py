"""DINOv2 ViT/14 in Flax, for FD_DINOv2: the Fréchet distance in DINOv2 ViT-L/14 features.

FD_DINOv2 (Stein et al. 2023, dgm-eval) is what EDM2 and the sCM paper report next to FID
for ImageNet 512. EDM2's `calculate_metrics.py` (DINOv2Detector, default resize mode
'torch') defines the pipeline reproduced here:

  uint8 images -> F.interpolate(size=224, mode='bicubic', antialias=True) -> / 255
  -> (x - ImageNet mean) / ImageNet std -> torch.hub 'dinov2_vitl14' -> model(x)

and model(x) is head(x_norm_clstoken) with head = Identity: the CLS token after the final
LayerNorm, 1024 features. Step by step:

- 8 bits: samples are rounded to uint8 levels on the host (`features.image_input`), as
  EDM2's generated images are uint8 before any metric sees them.
- Resize (`preprocess`): `jax.image.resize(..., 'bicubic', antialias=True)` is the same
  filter as torch's antialiased bicubic and PIL's BICUBIC: Keys cubic with a = -0.5, its
  support widened by the downscaling factor, weights renormalized over the pixels inside
  the image (tested against PIL's float resize; against torch where installed). EDM2's
  'pil' mode (dgm-eval's) also rounds the 224x224 result to uint8; the 'torch' mode,
  EDM2's default and ours, keeps it in float.
- Network (`VisionTransformer`), as `dinov2/models/vision_transformer.py` built by the
  hub (img_size=518, patch 14, LayerScale, block_chunks=0): patch embedding (14x14
  stride-14 conv), CLS token, learned position embedding of the 37x37 grid of 518-pixel
  inputs, bicubic-interpolated to the input's patch grid (`pos_embed_matrix`: torch's
  non-antialiased bicubic, a = -0.75, at scale factor (grid + 0.1) / 37, the reference's
  `interpolate_offset`), pre-norm blocks x += ls1 * attn(norm1(x)); x += ls2 * ffn(norm2(x))
  (LayerNorm eps 1e-6, exact GELU MLP for ViT-S/B/L, SwiGLU for ViT-g), final LayerNorm.
  Matmuls run in full float32 (no TF32 / bf16 passes), as torch's default for Linear.

Weights cannot be downloaded here: convert the official file once with
`python -m scm_jax.evaluation.convert_dinov2` and load it with `load_dinov2_params`
(parameter names mirror the official state dict, so the converter is a rename).
"""

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import CheckpointError, ConfigError
from scm_jax.evaluation import npz_tree
from scm_jax.models.attention import attention

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
HEAD_DIM = 64            # every official DINOv2 ViT: heads = dim / 64
INTERPOLATE_OFFSET = 0.1  # the reference's position-embedding scale-factor kludge
WEIGHTS_HELP = (
    'Get dinov2_vitl14_pretrain.pth (the file torch.hub.load("facebookresearch/dinov2", '
    '"dinov2_vitl14") downloads, from dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/) on a '
    'machine with internet, then run `python -m scm_jax.evaluation.convert_dinov2 '
    '--src=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz` (needs torch) and pass '
    '--dinov2_weights=dinov2_vitl14.npz.')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """A DINOv2 vision transformer; `grid` is the position embedding's native patch grid."""
  dim: int
  depth: int
  heads: int
  hidden: int          # FFN hidden width
  ffn: str = 'mlp'     # 'mlp' (GELU) | 'swiglu'
  patch: int = 14
  grid: int = 37       # hub models: img_size 518 / patch 14


# The torch.hub backbones dinov2_vit{s,b,l,g}14 (SwiGLU hidden: (int(4 d 2/3) + 7) // 8 * 8).
ARCHS = {
    'vits14': ViTConfig(384, 12, 6, 1536),
    'vitb14': ViTConfig(768, 12, 12, 3072),
    'vitl14': ViTConfig(1024, 24, 16, 4096),
    'vitg14': ViTConfig(1536, 40, 24, 4096, 'swiglu'),
}


def arch_name(config: ViTConfig) -> str:
  return next((k for k, v in ARCHS.items() if v == config), 'custom')


# ------------------------------------------------------------------ resampling

def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at distance |x| (torch: a = -0.75; PIL: a = -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def pos_embed_matrix(native: int, grid: int, offset: float = INTERPOLATE_OFFSET) -> np.ndarray:
  """[grid, native] weights of torch F.interpolate(mode='bicubic', align_corners=False,
  antialias=False, scale_factor=(grid + offset) / native) along one axis.

  Given a scale factor, torch maps output i to source (i + 0.5) / scale_factor - 0.5
  (not native / grid), takes taps floor - 1 .. floor + 2 with the a = -0.75 kernel and
  replicates the border pixels. Coordinates in float32, as torch computes them.
  """
  inv = np.float32(1.0 / ((grid + offset) / native))
  src = inv * (np.arange(grid, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  i0 = np.minimum(np.floor(src), native - 1).astype(np.int64)
  t = np.clip(src - i0, 0.0, 1.0)
  m = np.zeros((grid, native), np.float64)
  for k in range(4):
    np.add.at(m, (np.arange(grid), np.clip(i0 - 1 + k, 0, native - 1)),
              _keys_cubic(t - (k - 1), -0.75))
  return m.astype(np.float32)


def interpolate_pos_embed(pos_embed: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """[1, 1 + M*M, D] -> [1, 1 + grid_h*grid_w, D], the reference's interpolate_pos_encoding.

  The native grid (grid_h == grid_w == M) returns pos_embed itself, as the reference does.
  """
  native = math.isqrt(pos_embed.shape[1] - 1)
  if grid_h == grid_w == native:
    return pos_embed
  patch = pos_embed[0, 1:].reshape(native, native, -1)
  patch = jnp.einsum('ai,bj,ijd->abd', pos_embed_matrix(native, grid_h),
                     pos_embed_matrix(native, grid_w), patch,
                     precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos_embed[:, :1], patch.reshape(1, grid_h * grid_w, -1)], axis=1)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """Images [B, H, W, 3] in [0, 1] -> [B, size, size, 3] ImageNet-normalized network input.

  Antialiased bicubic resize (torch `antialias=True` / PIL BICUBIC, see the module doc).
  """
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'bicubic', antialias=True)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# ------------------------------------------------------------------ network

class LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param('gamma', nn.initializers.ones, (x.shape[-1],))


class Attention(nn.Module):
  """qkv Linear -> [B, N, 3, heads, Dh] -> softmax(q k^T / sqrt(Dh)) v -> proj Linear."""
  heads: int

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, name='qkv')(x).reshape(b, n, 3, self.heads, d // self.heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl='xla')
    return nn.Dense(d, name='proj')(out.reshape(b, n, d))


class Mlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, name='fc1')(x), approximate=False)  # torch nn.GELU()
    return nn.Dense(x.shape[-1], name='fc2')(h)


class SwiGLU(nn.Module):
  """ViT-g's SwiGLUFFNFused: w3(silu(x1) * x2) with [x1, x2] = w12(x)."""
  hidden: int

  @nn.compact
  def __call__(self, x):
    x1, x2 = jnp.split(nn.Dense(2 * self.hidden, name='w12')(x), 2, axis=-1)
    return nn.Dense(x.shape[-1], name='w3')(nn.silu(x1) * x2)


class Block(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    # Two-pass variance: late DINOv2 layers carry large-mean activations.
    norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False)
    x = x + LayerScale(name='ls1')(Attention(c.heads, name='attn')(norm(name='norm1')(x)))
    ffn = SwiGLU if c.ffn == 'swiglu' else Mlp
    return x + LayerScale(name='ls2')(ffn(c.hidden, name='mlp')(norm(name='norm2')(x)))


class PatchEmbed(nn.Module):
  dim: int
  patch: int

  @nn.compact
  def __call__(self, x):
    p = self.patch
    return nn.Conv(self.dim, (p, p), strides=(p, p), padding='VALID', name='proj')(x)


class VisionTransformer(nn.Module):
  """Normalized images [B, H, W, 3] (H, W multiples of the patch) -> CLS features [B, dim]:
  `x_norm_clstoken` of the reference, what its forward() returns."""
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    if x.shape[1] % c.patch or x.shape[2] % c.patch:
      raise ConfigError(f'DINOv2 input {x.shape[1:3]} is not a multiple of the patch size '
                        f'{c.patch}; resize to {INPUT_SIZE} (dinov2.preprocess).')
    x = PatchEmbed(c.dim, c.patch, name='patch_embed')(x)
    b, gh, gw, _ = x.shape
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, c.dim))
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, 1 + c.grid**2, c.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.dim)), x.reshape(b, gh * gw, c.dim)], 1)
    x = x + interpolate_pos_embed(pos, gh, gw)
    for i in range(c.depth):
      x = Block(c, name=f'blocks_{i}')(x)
    x = nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name='norm')(x)
    return x[:, 0]


def feature_fn(config: ViTConfig = ARCHS['vitl14'], input_size: int = INPUT_SIZE) -> Callable:
  """(variables, images [B, H, W, 3] in [0, 1]) -> FD_DINOv2 features [B, config.dim].

  `input_size` is 224 for the metric; tests use the same network at a smaller size.
  """
  if input_size % config.patch:
    raise ConfigError(f'DINOv2 input size {input_size} must be a multiple of the patch '
                      f'size {config.patch} (FD_DINOv2 uses {INPUT_SIZE}).')
  net = VisionTransformer(config)

  def apply(variables, images):
    with jax.default_matmul_precision('float32'):  # traced dots and convs: full float32
      return net.apply(variables, preprocess(images, input_size))
  return apply


# ------------------------------------------------------------------ weights I/O

def abstract_variables(config: ViTConfig = ARCHS['vitl14']) -> dict:
  """Shapes of {'params': ...} (no computation)."""
  size = config.patch * 2
  return jax.eval_shape(lambda: VisionTransformer(config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))


def random_variables(config: ViTConfig, seed: int = 0) -> dict:
  """Random variables with O(1) activations (fan-in scaled kernels, non-trivial norms,
  LayerScale and embeddings): for tests and benchmarks without the real weights."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, leaf in npz_tree.flat_leaves(abstract_variables(config)).items():
    shape, kind = leaf.shape, name.rsplit('/', 1)[-1]
    if kind == 'kernel':
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif kind in ('scale', 'gamma'):
      value = rng.uniform(0.5, 1.5, shape)
    elif kind in ('cls_token', 'pos_embed'):
      value = rng.normal(size=shape)
    else:  # biases
      value = 0.1 * rng.normal(size=shape)
    flat[name] = value.astype(np.float32)
  return npz_tree.unflatten(flat)


def config_from_shapes(shapes: dict) -> ViTConfig:
  """The ViTConfig of flat {'params/...': shape} variables (heads = dim / 64, as DINOv2's)."""
  try:
    dim = shapes['params/cls_token'][-1]
    patch = shapes['params/patch_embed/proj/kernel'][0]
    grid = math.isqrt(shapes['params/pos_embed'][1] - 1)
    depth = sum(f'params/blocks_{i}/norm1/scale' in shapes for i in range(len(shapes)))
    swiglu = 'params/blocks_0/mlp/w3/kernel' in shapes
    hidden = (shapes['params/blocks_0/mlp/w3/kernel'][0] if swiglu
              else shapes['params/blocks_0/mlp/fc1/kernel'][1])
  except (KeyError, IndexError) as e:
    raise CheckpointError(f'these are not DINOv2 weights (no {e}).') from None
  return ViTConfig(dim, depth, max(dim // HEAD_DIM, 1), hidden, 'swiglu' if swiglu else 'mlp',
                   patch, grid)


def problems(flat: dict, config: ViTConfig) -> list[str]:
  """Names missing, of the wrong shape or unexpected in `flat`, versus `config`'s network."""
  expected = abstract_variables(config)
  extra = sorted(set(flat) - set(npz_tree.flat_leaves(expected)))
  return npz_tree.mismatches(flat, expected) + [f'unexpected {k}' for k in extra]


def save_dinov2_params(path: str, variables) -> None:
  """Writes variables as a plain .npz (no pickle), the format `load_dinov2_params` reads."""
  npz_tree.save(path, variables)


def load_dinov2_params(path: str) -> tuple[ViTConfig, dict]:
  """(config, variables) of converted DINOv2 weights; every name and shape is checked.

  Raises CheckpointError (with how to get the file) when it is missing or is not a DINOv2.
  """
  flat = npz_tree.read_weights(path, 'DINOv2', WEIGHTS_HELP)
  try:
    config = config_from_shapes({k: v.shape for k, v in flat.items()})
  except CheckpointError as e:
    raise CheckpointError(f'{path!r}: {e} {WEIGHTS_HELP}') from None
  bad = problems(flat, config)
  if bad:
    raise CheckpointError(f'{path!r} is not a DINOv2 ViT ({len(bad)} problems, e.g. '
                          f'{bad[:3]}). {WEIGHTS_HELP}')
  return config, npz_tree.unflatten({k: flat[k].astype(np.float32) for k in flat})
