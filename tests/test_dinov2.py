"""FD_DINOv2's network: the Flax DINOv2 ViT against a numpy transcription of the official
forward (CI) and a torch one (where torch is installed), its preprocessing against PIL,
the converter from the official state dict, and the metric through the Evaluator.

Random weights throughout (the real ones cannot be downloaded here); tiny ViTs with
the official structure for numerics, ViT-L/14 only under jax.eval_shape.
"""

import math

import jax
import numpy as np
import pytest
from PIL import Image
from scipy import special

from scm_jax.errors import CheckpointError, ConfigError, DataError
from scm_jax.evaluation import convert_dinov2, dinov2, evaluator, features, fid, npz_tree

# heads = dim / 64 as in every official DINOv2; a 5x5 native grid (hub models: 37x37).
TINY = {'mlp': dinov2.ViTConfig(128, 2, 2, 256, 'mlp', patch=4, grid=5),
        'swiglu': dinov2.ViTConfig(128, 2, 2, 88, 'swiglu', patch=4, grid=5)}


def official_state_dict(c: dinov2.ViTConfig, seed: int = 0) -> dict:
  """Random tensors under the official key names and shapes (dinov2_vit*14_pretrain.pth)."""
  rng = np.random.default_rng(seed)
  d = c.dim
  shapes = {'cls_token': (1, 1, d), 'pos_embed': (1, 1 + c.grid**2, d), 'mask_token': (1, d),
            'patch_embed.proj.weight': (d, 3, c.patch, c.patch), 'patch_embed.proj.bias': (d,),
            'norm.weight': (d,), 'norm.bias': (d,)}
  ffn = ({'mlp.fc1.weight': (c.hidden, d), 'mlp.fc1.bias': (c.hidden,),
          'mlp.fc2.weight': (d, c.hidden), 'mlp.fc2.bias': (d,)} if c.ffn == 'mlp' else
         {'mlp.w12.weight': (2 * c.hidden, d), 'mlp.w12.bias': (2 * c.hidden,),
          'mlp.w3.weight': (d, c.hidden), 'mlp.w3.bias': (d,)})
  block = {'norm1.weight': (d,), 'norm1.bias': (d,), 'attn.qkv.weight': (3 * d, d),
           'attn.qkv.bias': (3 * d,), 'attn.proj.weight': (d, d), 'attn.proj.bias': (d,),
           'ls1.gamma': (d,), 'norm2.weight': (d,), 'norm2.bias': (d,), 'ls2.gamma': (d,), **ffn}
  for i in range(c.depth):
    shapes.update({f'blocks.{i}.{k}': v for k, v in block.items()})
  sd = {}
  for name, shape in shapes.items():
    if name.endswith('weight') and len(shape) > 1:
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))
    elif name.endswith(('norm1.weight', 'norm2.weight', 'norm.weight', 'gamma')):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith('bias'):
      value = 0.1 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape)
    sd[name] = value.astype(np.float32)
  return sd


# ------------------------------------------------------- numpy transcription (float64)

def _cubic(x, a=-0.75):
  x = abs(x)
  return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _torch_bicubic_1d(v, out: int, scale_factor: float):
  """torch upsample_bicubic2d along axis 0, written per output pixel as its kernel is."""
  res = []
  for i in range(out):
    real = (i + 0.5) / scale_factor - 0.5
    i0 = math.floor(real)
    t = real - i0
    taps = [v[min(max(i0 - 1 + k, 0), len(v) - 1)] for k in range(4)]
    res.append(sum(w * tap for w, tap in zip((_cubic(t + 1), _cubic(t), _cubic(1 - t),
                                              _cubic(2 - t)), taps)))
  return np.stack(res)


def _ln(x, w, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu)**2).mean(-1, keepdims=True) + 1e-6) * w + b


def numpy_forward(sd: dict, c: dinov2.ViTConfig, x: np.ndarray) -> np.ndarray:
  """DinoVisionTransformer.forward (x_norm_clstoken) on normalized NCHW images."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  b, ch, h, w = x.shape
  p, d = c.patch, c.dim
  gh, gw = h // p, w // p
  patches = x.reshape(b, ch, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
  t = patches @ sd['patch_embed.proj.weight'].reshape(d, -1).T + sd['patch_embed.proj.bias']
  t = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, d)), t], 1)
  pos = sd['pos_embed']
  if not gh == gw == c.grid:  # the reference interpolates unless at the native grid
    grid = pos[0, 1:].reshape(c.grid, c.grid, d)
    grid = _torch_bicubic_1d(grid, gh, (gh + 0.1) / c.grid)
    grid = _torch_bicubic_1d(grid.transpose(1, 0, 2), gw, (gw + 0.1) / c.grid).transpose(1, 0, 2)
    pos = np.concatenate([pos[:, :1], grid.reshape(1, -1, d)], 1)
  t = t + pos
  for i in range(c.depth):
    g = lambda k, i=i: sd[f'blocks.{i}.{k}']
    y = _ln(t, g('norm1.weight'), g('norm1.bias'))
    qkv = (y @ g('attn.qkv.weight').T + g('attn.qkv.bias')).reshape(b, -1, 3, c.heads, d // c.heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    logits = (q * (d // c.heads)**-0.5) @ k.transpose(0, 1, 3, 2)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    t = t + g('ls1.gamma') * (y @ g('attn.proj.weight').T + g('attn.proj.bias'))
    y = _ln(t, g('norm2.weight'), g('norm2.bias'))
    if c.ffn == 'mlp':
      y = y @ g('mlp.fc1.weight').T + g('mlp.fc1.bias')
      y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))  # exact GELU
      y = y @ g('mlp.fc2.weight').T + g('mlp.fc2.bias')
    else:
      y1, y2 = np.split(y @ g('mlp.w12.weight').T + g('mlp.w12.bias'), 2, -1)
      y = (y1 / (1 + np.exp(-y1)) * y2) @ g('mlp.w3.weight').T + g('mlp.w3.bias')
    t = t + g('ls2.gamma') * y
  return _ln(t, sd['norm.weight'], sd['norm.bias'])[:, 0]


# ------------------------------------------------------------------ tests

def test_vit_l14_shapes_parameter_count_and_archs():
  """ViT-L/14 as the hub builds it: 304.37M parameters (the official count, less the
  1024-d mask_token used only in training), 1024-d CLS features of a 224 input."""
  c = dinov2.ARCHS['vitl14']
  flat = npz_tree.flat_leaves(dinov2.abstract_variables(c))
  d, blocks = 1024, 24
  per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
  want = 3 * 14 * 14 * d + d + d + 1370 * d + blocks * per_block + 2 * d
  assert sum(math.prod(v.shape) for v in flat.values()) == want == 304_367_616
  assert dinov2.config_from_shapes({k: v.shape for k, v in flat.items()}) == c
  out = jax.eval_shape(dinov2.feature_fn(c), dinov2.abstract_variables(c),
                       jax.ShapeDtypeStruct((2, 512, 512, 3), np.float32))
  assert out.shape == (2, 1024)
  for name in ('vits14', 'vitb14', 'vitg14'):  # every hub size reads back from its shapes
    cfg = dinov2.ARCHS[name]
    shapes = {k: v.shape for k, v in npz_tree.flat_leaves(dinov2.abstract_variables(cfg)).items()}
    assert dinov2.arch_name(dinov2.config_from_shapes(shapes)) == name


def test_pos_embed_interpolation_identity_and_torch_rule():
  pos = jax.random.normal(jax.random.PRNGKey(0), (1, 1 + 37 * 37, 8))
  assert dinov2.interpolate_pos_embed(pos, 37, 37) is pos  # native grid: untouched
  out = np.asarray(dinov2.interpolate_pos_embed(pos, 16, 16))
  assert out.shape == (1, 257, 8)
  np.testing.assert_array_equal(out[0, 0], pos[0, 0])  # the CLS position is never resampled
  grid = np.asarray(pos[0, 1:], np.float64).reshape(37, 37, 8)
  want = _torch_bicubic_1d(_torch_bicubic_1d(grid, 16, 16.1 / 37).transpose(1, 0, 2), 16,
                           16.1 / 37).transpose(1, 0, 2)
  np.testing.assert_allclose(out[0, 1:].reshape(16, 16, 8), want, atol=2e-5)
  for native, g in ((37, 16), (5, 3), (5, 9)):  # rows sum to 1: constants are preserved
    np.testing.assert_allclose(dinov2.pos_embed_matrix(native, g).sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize('size', [40, 7])
def test_resize_is_pil_bicubic(size):
  """Antialiased bicubic down (40 -> 12) and up (7 -> 12) equals PIL's BICUBIC in float."""
  rng = np.random.default_rng(size)
  x = rng.uniform(0, 1, (2, size, size + 3, 3)).astype(np.float32)
  got = np.asarray(dinov2.preprocess(x, 12)) * dinov2.IMAGENET_STD + dinov2.IMAGENET_MEAN
  want = np.stack([np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[..., ch])).resize(
      (12, 12), Image.Resampling.BICUBIC)) for ch in range(3)], -1) for img in x])
  np.testing.assert_allclose(got, want, atol=2e-6)
  same = rng.uniform(0, 1, (1, 12, 12, 3)).astype(np.float32)  # 224 input: no resize
  np.testing.assert_allclose(np.asarray(dinov2.preprocess(same, 12)),
                             (same - dinov2.IMAGENET_MEAN) / dinov2.IMAGENET_STD, atol=1e-6)


@pytest.mark.parametrize('ffn', ['mlp', 'swiglu'])
def test_converted_official_state_dict_matches_numpy_forward(ffn, tmp_path):
  """Official names/shapes -> converter -> .npz -> loader -> Flax features equal a float64
  numpy transcription of the official forward, at the native grid (identity position
  embedding) and at a smaller one (interpolated)."""
  c = TINY[ffn]
  sd = official_state_dict(c, seed=1)
  flat = convert_dinov2.convert_state_dict(sd)
  assert flat['params/blocks_1/attn/qkv/kernel'].shape == (c.dim, 3 * c.dim)
  np.testing.assert_array_equal(flat['params/blocks_1/attn/qkv/kernel'],
                                sd['blocks.1.attn.qkv.weight'].T)
  chunked = {k.replace('blocks.', 'blocks.0.'): v for k, v in sd.items()}  # block_chunks=1
  assert convert_dinov2.convert_state_dict(chunked).keys() == flat.keys()
  path = str(tmp_path / 'dinov2_tiny.npz')
  dinov2.save_dinov2_params(path, npz_tree.unflatten(flat))
  config, variables = dinov2.load_dinov2_params(path)
  assert config == c
  net = jax.jit(dinov2.VisionTransformer(c).apply)
  rng = np.random.default_rng(2)
  for size in (20, 12):  # grid 5 (native) and 3
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    got = np.asarray(net(variables, x))
    want = numpy_forward(sd, c, x.transpose(0, 3, 1, 2))
    assert got.shape == (2, c.dim)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_converter_and_loader_errors(tmp_path):
  sd = official_state_dict(TINY['mlp'])
  with pytest.raises(CheckpointError, match='unexpected tensor'):
    convert_dinov2.convert_state_dict({**sd, 'blocks.0.norm1.running_mean': np.zeros(128)})
  with_head = convert_dinov2.convert_state_dict({**sd, 'head.weight': np.zeros((10, 128))})
  assert dinov2.problems(with_head, TINY['mlp']) == ['unexpected params/head/kernel']
  with pytest.raises(CheckpointError, match='register-token'):
    convert_dinov2.convert_state_dict({**sd, 'register_tokens': np.zeros((1, 4, 128))})
  flat = convert_dinov2.convert_state_dict(sd)
  del flat['params/blocks_1/ls2/gamma']
  np.savez(str(tmp_path / 'partial.npz'), **flat)
  with pytest.raises(CheckpointError, match='not a DINOv2 ViT.*ls2/gamma'):
    dinov2.load_dinov2_params(str(tmp_path / 'partial.npz'))
  with pytest.raises(CheckpointError, match='dinov2_vitl14_pretrain.pth'):
    dinov2.load_dinov2_params(str(tmp_path / 'missing.npz'))
  with pytest.raises(CheckpointError, match='not found'):
    convert_dinov2.convert_file(str(tmp_path / 'missing.pth'), str(tmp_path / 'out.npz'))
  with pytest.raises(ConfigError, match='multiple of the patch'):
    dinov2.feature_fn(TINY['mlp'], 13)


def test_features_batch_invariant_deterministic_and_discriminative():
  c = TINY['mlp']
  variables = dinov2.random_variables(c, seed=3)
  fn = dinov2.feature_fn(c, input_size=12)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (5, 16, 16, 1)).astype(np.float32)
  prepare = features.image_input
  f2 = features.Extractor(fn, variables, 2, prepare=prepare)(x)
  f3 = features.Extractor(fn, variables, 3, prepare=prepare)(x)
  assert f2.shape == (5, c.dim) and np.all(np.isfinite(f2))
  np.testing.assert_allclose(f2, f3, rtol=1e-5, atol=1e-5 * np.abs(f2).max())
  np.testing.assert_array_equal(f3, features.Extractor(fn, variables, 3, prepare=prepare)(x))
  assert np.std(f2, axis=0).mean() > 1e-2 * np.abs(f2).mean()  # images are told apart


def test_fd_dinov2_through_the_evaluator(tmp_path):
  """Weights file -> Evaluator: fd_dinov2 next to fd_digits in one pass, zero for the
  reference itself, positive for other images, cached reference features, published-
  statistics path equal to the reference-data path, and its checks."""
  c = TINY['mlp']
  path = str(tmp_path / 'dinov2_tiny.npz')
  dinov2.save_dinov2_params(path, dinov2.random_variables(c, seed=4))
  rng = np.random.default_rng(1)
  ref = rng.uniform(-1, 1, (6, 8, 8, 1)).astype(np.float32)
  ev = evaluator.Evaluator(['fd_dinov2', 'fd_digits'], ref, dinov2_weights=path, batch_size=4,
                           cache_dir=str(tmp_path), cache_tag='t', dinov2_input_size=12)
  same = ev.evaluate([(ref[:4], None), (ref[4:], None)])
  scale = np.trace(np.cov(ev.reference_features('dinov2'), rowvar=False))
  assert same['num_samples'] == 6 and abs(same['fd_dinov2']) < 1e-6 * scale
  assert abs(same['fd_digits']) < 1e-6 * np.trace(np.cov(ev.reference_features('digits'),
                                                         rowvar=False))
  other = np.clip(ref * 0.2 + 0.6, -1, 1)
  far = ev.evaluate([(other, None)])
  assert far['fd_dinov2'] > 0.1 * scale and far['fd_digits'] > 0
  cached = np.load(str(tmp_path / 'ref_dinov2_dinov2_tiny_t.npz'))
  assert cached['mu'].shape == (c.dim,) and cached['features'].shape == (6, c.dim)
  fid.save_stats(str(tmp_path / 'stats.npz'), cached['mu'], cached['sigma'])
  published = evaluator.Evaluator(['fd_dinov2'], None, dinov2_weights=path, batch_size=4,
                                  ref_stats_dinov2=fid.load_stats(str(tmp_path / 'stats.npz')),
                                  dinov2_input_size=12)
  np.testing.assert_allclose(published.evaluate([(other, None)])['fd_dinov2'], far['fd_dinov2'],
                             rtol=1e-6)
  with pytest.raises(DataError, match='1024-d'):
    evaluator.Evaluator(['fd_dinov2'], None, dinov2_weights=path,
                        ref_stats_dinov2=(np.zeros(1024), np.eye(1024)))
  with pytest.raises(ConfigError, match='DINOv2 weights'):
    evaluator.Evaluator(['fd_dinov2'], ref)
  with pytest.raises(ConfigError, match='needs images'):
    evaluator.check_metrics(['fd_dinov2'], (2,))


# ------------------------------------------------------- torch (skipped without it)

def _torch_reference(c: dinov2.ViTConfig):
  """The official DinoVisionTransformer's inference path, transcribed in torch."""
  torch = pytest.importorskip('torch')
  nn, F = torch.nn, torch.nn.functional

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv, self.proj = nn.Linear(c.dim, 3 * c.dim), nn.Linear(c.dim, c.dim)

    def forward(self, x):
      b, n, d = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, c.heads, d // c.heads).permute(2, 0, 3, 1, 4)
      attn = ((q * (d // c.heads)**-0.5) @ k.transpose(-2, -1)).softmax(-1)
      return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))

  class Ffn(nn.Module):
    def __init__(self):
      super().__init__()
      if c.ffn == 'mlp':
        self.fc1, self.fc2 = nn.Linear(c.dim, c.hidden), nn.Linear(c.hidden, c.dim)
      else:
        self.w12, self.w3 = nn.Linear(c.dim, 2 * c.hidden), nn.Linear(c.hidden, c.dim)

    def forward(self, x):
      if c.ffn == 'mlp':
        return self.fc2(F.gelu(self.fc1(x)))
      x1, x2 = self.w12(x).chunk(2, dim=-1)
      return self.w3(F.silu(x1) * x2)

  class LayerScale(nn.Module):
    def __init__(self):
      super().__init__()
      self.gamma = nn.Parameter(torch.ones(c.dim))

    def forward(self, x):
      return x * self.gamma

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(c.dim, eps=1e-6), nn.LayerNorm(c.dim, eps=1e-6)
      self.attn, self.mlp, self.ls1, self.ls2 = Attention(), Ffn(), LayerScale(), LayerScale()

    def forward(self, x):
      x = x + self.ls1(self.attn(self.norm1(x)))
      return x + self.ls2(self.mlp(self.norm2(x)))

  class PatchEmbed(nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(3, c.dim, c.patch, c.patch)

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed()
      self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
      self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.grid**2, c.dim))
      self.mask_token = nn.Parameter(torch.zeros(1, c.dim))
      self.blocks = nn.ModuleList([Block() for _ in range(c.depth)])
      self.norm = nn.LayerNorm(c.dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
      n = self.pos_embed.shape[1] - 1
      if x.shape[1] - 1 == n and w == h:
        return self.pos_embed
      m = int(math.sqrt(n))
      w0, h0 = w // c.patch, h // c.patch
      patch = F.interpolate(self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
                            scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m), mode='bicubic',
                            antialias=False)
      assert patch.shape[-2:] == (w0, h0)
      return torch.cat([self.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, c.dim)], 1)

    def forward(self, x):
      _, _, w, h = x.shape
      t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
      t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1)
      t = t + self.interpolate_pos_encoding(t, w, h)
      for blk in self.blocks:
        t = blk(t)
      return self.norm(t)[:, 0]

  return torch, ViT().eval()


def _torch_parity(c, image_sizes, input_size, tmp_path, seed=0):
  """Official state dict as .pth -> torch reference vs converter + Flax, with EDM2's
  preprocessing (uint8 -> antialiased bicubic to input_size -> ImageNet normalization)."""
  torch, model = _torch_reference(c)
  sd = official_state_dict(c, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  pth = str(tmp_path / 'dinov2_random.pth')
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  config, flat = convert_dinov2.convert_file(pth, str(tmp_path / 'converted.npz'))
  assert config == c and len(flat) == len(sd) - 1  # all but mask_token
  _, variables = dinov2.load_dinov2_params(str(tmp_path / 'converted.npz'))
  apply = jax.jit(dinov2.feature_fn(c, input_size))
  rng = np.random.default_rng(seed)
  worst = 0.0
  for size in image_sizes:
    samples = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    u8 = torch.from_numpy(np.round((samples + 1) * 127.5).astype(np.uint8)).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(u8.float(), size=(input_size, input_size),
                                        mode='bicubic', antialias=True) / 255
    x = (x - torch.tensor(dinov2.IMAGENET_MEAN).reshape(1, -1, 1, 1)) / torch.tensor(
        dinov2.IMAGENET_STD).reshape(1, -1, 1, 1)
    with torch.no_grad():
      want = model(x).numpy()
    got = np.asarray(apply(variables, features.image_input(samples)))
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  return worst


@pytest.mark.parametrize('ffn', ['mlp', 'swiglu'])
def test_parity_with_torch_reference_tiny(ffn, tmp_path):
  """Down- and upsampled inputs, interpolated (input 12: grid 3) and native (20: grid 5)."""
  for input_size in (12, 20):
    _torch_parity(TINY[ffn], (32, 8), input_size, tmp_path)


@pytest.mark.slow
def test_parity_with_torch_reference_vit_l14(tmp_path):
  """ViT-L/14 with random weights at the metric's setting: 512 and 64 images -> 224."""
  worst = _torch_parity(dinov2.ARCHS['vitl14'], (512, 64), 224, tmp_path)
  print(f'ViT-L/14 CLS features vs torch: max |diff| / max |feature| = {worst:.3g}')


@pytest.mark.slow
def test_evaluate_cli_reports_fid_and_fd_dinov2_together(tmp_path):
  """`scm_jax.evaluate --metrics=fid,fd_dinov2` on a digits workdir (random Inception and
  a tiny random DINOv2 with the official patch 14): both in one table and one JSON; a
  rerun with the cached reference statistics passed as published ones gives the same values."""
  import json, os  # pylint: disable=g-import-not-at-top,multiple-imports
  from scm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tests.test_train import _train_cli  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'digits')
  _train_cli(workdir, 2)  # a tiny digits U-Net, checkpointed at its last step
  inc, dino = str(tmp_path / 'inception.npz'), str(tmp_path / 'dinov2_p14.npz')
  inception.save_inception_params(inc, inception.random_variables(0))
  dinov2.save_dinov2_params(dino, dinov2.random_variables(dinov2.ViTConfig(128, 2, 2, 256)))
  common = [f'--workdir={workdir}', '--metrics=fid,fd_dinov2', '--num=20', '--batch_size=20',
            '--steps=1', f'--inception_weights={inc}', f'--dinov2_weights={dino}']
  p = helpers.run_module('scm_jax.evaluate', *common, '--ref_num=40')
  assert 'fd_dinov2' in p.stdout and 'fid' in p.stdout
  first = json.load(open(os.path.join(workdir, 'eval', 'metrics_2.json')))['results']['1step']
  assert first['fid'] > 0 and first['fd_dinov2'] > 0
  stats = {}
  for space, flag in (('inception', 'ref_stats'), ('dinov2', 'ref_stats_dinov2')):
    name = [f for f in os.listdir(os.path.join(workdir, 'eval')) if f.startswith(f'ref_{space}')]
    assert len(name) == 1, name
    stats[flag] = os.path.join(workdir, 'eval', name[0])
  helpers.run_module('scm_jax.evaluate', *common, *[f'--{k}={v}' for k, v in stats.items()])
  second = json.load(open(os.path.join(workdir, 'eval', 'metrics_2.json')))['results']['1step']
  for k in ('fid', 'fd_dinov2'):
    np.testing.assert_allclose(second[k], first[k], rtol=1e-6)
