"""The Flax FID Inception-v3: resize, weights conversion and loading, batch invariance,
an end-to-end FID with a random-init network, and (with torch) parity with pytorch-fid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scm_jax.errors import CheckpointError
from scm_jax.evaluation import convert_inception, evaluator, features, inception, npz_tree


def test_resize_matches_jax_bilinear_when_upsampling():
  # Upsampling: half-pixel bilinear without antialiasing is what jax.image.resize does.
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 6, 3))
  got = inception.resize_bilinear_torch(x, 20)
  want = jax.image.resize(x, (2, 20, 20, 3), 'bilinear', antialias=False)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_resize_downsampling_is_torch_rule_not_antialiased():
  # in=4 -> out=2: source coords 0.5 and 2.5, i.e. means of pixel pairs (no wider filter).
  row = jnp.array([0.0, 1.0, 10.0, 30.0])
  x = jnp.broadcast_to(row[None, :, None, None], (1, 4, 4, 1)).transpose(0, 2, 1, 3)
  got = inception.resize_bilinear_torch(x, 2)[0, 0, :, 0]
  np.testing.assert_allclose(got, [0.5, 20.0], atol=1e-6)


def _torch_style_state_dict(variables):
  """The inverse of the converter's mapping: Flax variables -> torchvision names/layout."""
  inv = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
         ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
  sd = {'fc.weight': np.zeros((1008, 2048)), 'fc.bias': np.zeros(1008)}
  for key, value in npz_tree.flatten(variables).items():
    collection, *module, layer, leaf = key.split('/')
    name = '.'.join(module)
    if layer == 'conv':
      sd[f'{name}.conv.weight'] = np.transpose(value, (3, 2, 0, 1))
    else:
      sd[f'{name}.bn.{inv[collection, leaf]}'] = value
      sd[f'{name}.bn.num_batches_tracked'] = np.array(0)
  return sd


def test_converter_mapping_round_trips_and_loader_checks(tmp_path):
  variables = inception.random_variables(1)
  flat = convert_inception.convert_state_dict(_torch_style_state_dict(variables))
  want = npz_tree.flatten(variables)
  assert sorted(flat) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(flat[k], want[k])
  path = str(tmp_path / 'inception.npz')
  inception.save_inception_params(path, variables)
  loaded = inception.load_inception_params(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  with pytest.raises(CheckpointError, match='unexpected tensor'):
    convert_inception.convert_state_dict({'Mixed_5b.branch1x1.conv.bias': np.zeros(3)})
  np.savez(str(tmp_path / 'partial.npz'), **{k: v for k, v in list(want.items())[:10]})
  with pytest.raises(CheckpointError, match='not the FID Inception'):
    inception.load_inception_params(str(tmp_path / 'partial.npz'))
  with pytest.raises(CheckpointError, match='pt_inception-2015-12-05'):
    inception.load_inception_params(str(tmp_path / 'missing.npz'))


def test_feature_extraction_is_batch_size_invariant():
  # The same network at input size 75 (the smallest Inception-v3 takes): cheap on CPU.
  net = inception.InceptionV3FID(75)
  variables = inception.random_variables(2, 75)
  x = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 3)).astype(np.float32)
  prepare = features.image_input
  f2 = features.Extractor(net.apply, variables, 2, prepare=prepare)(x)
  f4 = features.Extractor(net.apply, variables, 4, prepare=prepare)(x)
  assert f2.shape == (5, inception.FEATURE_DIM) and np.all(np.isfinite(f2))
  assert np.std(f4, axis=0).mean() > 1e-2 * np.abs(f4).mean()  # images are told apart
  np.testing.assert_allclose(f2, f4, rtol=1e-4, atol=1e-4 * np.abs(f4).max())


def test_random_init_fid_network_end_to_end(tmp_path):
  """Weights file -> Evaluator -> FID and precision/recall on grey images.

  The network runs at input size 75 (identical structure; 299 only costs more on CPU);
  batch 4 of 16x16 images repeats the batch-invariance test's program (compile cache).
  """
  path = str(tmp_path / 'random_inception.npz')
  inception.save_inception_params(path, inception.random_variables(3))
  rng = np.random.default_rng(1)
  ref = rng.uniform(-1, 1, (6, 16, 16, 1)).astype(np.float32)
  ev = evaluator.Evaluator(['fid', 'pr'], ref, inception_weights=path, batch_size=4,
                           cache_dir=str(tmp_path), cache_tag='t', inception_input_size=75)
  same = ev.evaluate([(ref[:4], None), (ref[4:], None)])
  assert same['num_samples'] == 6 and abs(same['fid']) < 1e-6 * np.trace(
      np.cov(ev.reference_features('inception'), rowvar=False))
  assert same['precision'] == 1.0 and same['recall'] == 1.0
  other = ev.evaluate([(np.clip(ref * 0.2 + 0.6, -1, 1), None)])
  assert np.isfinite(other['fid']) and other['fid'] > 0.1 * np.trace(
      np.cov(ev.reference_features('inception'), rowvar=False))
  cached = np.load(str(tmp_path / 'ref_inception_random_inception_t.npz'))
  assert cached['mu'].shape == (2048,) and cached['features'].shape == (6, 2048)


def _pytorch_fid_inception():
  torch = pytest.importorskip('torch')
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import
  except RuntimeError as e:
    # A CUDA torchvision wheel next to a CPU torch cannot load its C ops; the
    # Inception modules are pure Python, so declare the two ops its import registers.
    if 'torchvision::nms' not in str(e):
      raise
    lib = torch.library.Library('torchvision', 'DEF')  # pylint: disable=unused-variable
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _pytorch_fid_inception.lib = lib
  return torch, pytest.importorskip('pytorch_fid.inception')


@pytest.mark.slow
def test_parity_with_pytorch_fid_on_converted_random_weights(tmp_path):
  """pytorch-fid's InceptionV3 (FID blocks) with random weights saved as a .pth; the
  converter's .npz in Flax must give the same pool3 features (up- and downsampling)."""
  torch, pfid = _pytorch_fid_inception()
  torch.manual_seed(0)
  net = pfid._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
  for name, block in (('Mixed_5b', pfid.FIDInceptionA(192, 32)), ('Mixed_5c', pfid.FIDInceptionA(256, 64)),
                      ('Mixed_5d', pfid.FIDInceptionA(288, 64)), ('Mixed_6b', pfid.FIDInceptionC(768, 128)),
                      ('Mixed_6c', pfid.FIDInceptionC(768, 160)), ('Mixed_6d', pfid.FIDInceptionC(768, 160)),
                      ('Mixed_6e', pfid.FIDInceptionC(768, 192)), ('Mixed_7b', pfid.FIDInceptionE_1(1280)),
                      ('Mixed_7c', pfid.FIDInceptionE_2(2048))):
    setattr(net, name, block)
  gen = torch.Generator().manual_seed(0)
  state = net.state_dict()
  for k, v in state.items():  # He-scaled convs and non-trivial BN so features are O(1)
    if k.endswith('conv.weight'):
      v.copy_(torch.randn(v.shape, generator=gen) * (2.0 / v[0].numel())**0.5)
    elif k.endswith(('bn.weight', 'running_var')):
      v.copy_(0.5 + torch.rand(v.shape, generator=gen))
    elif k.endswith(('bn.bias', 'running_mean')):
      v.copy_(0.1 * torch.randn(v.shape, generator=gen))
  pth = str(tmp_path / 'pt_inception_random.pth')
  torch.save(state, pth)
  # pytorch-fid loads the FID weights through this function: give it our file.
  pfid.load_state_dict_from_url = lambda *a, **k: torch.load(pth, weights_only=True)
  model = pfid.InceptionV3([3]).eval()
  npz = str(tmp_path / 'converted.npz')
  convert_inception.convert_file(pth, npz)
  variables = inception.load_inception_params(npz)
  apply = jax.jit(inception.InceptionV3FID().apply)
  rng = np.random.default_rng(0)
  worst = 0.0
  for size in (32, 320):
    images = rng.uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      want = model(torch.from_numpy(images).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    got = np.asarray(apply(variables, images))
    worst = max(worst, float(np.abs(got - want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4 * np.abs(want).max())
  print(f'max abs difference of pool3 features vs pytorch-fid: {worst:.3g}')
