"""Convert the standard FID Inception weights (PyTorch) to a Flax-readable .npz.

    python -m scm_jax.evaluation.convert_inception \\
        --src=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

Where to get the source file: it is the one pytorch-fid and clean-fid download, published
in pytorch-fid's GitHub release "fid_weights" (pytorch_fid.inception.FID_WEIGHTS_URL;
the TensorFlow graph inception-2015-12-05 ported to PyTorch). Download it on any machine
with internet. Reading a .pth needs torch (`pip install torch`, CPU is enough); torch is
used only here, never by scm_jax itself. The output is a plain .npz (no pickle) read by
`inception.load_inception_params`; conversion is a rename plus a kernel transpose, and
the converter checks that every weight of the network was filled.
"""

import os

import numpy as np
from absl import flags

from scm_jax import cli
from scm_jax.errors import CheckpointError
from scm_jax.evaluation import npz_tree

# torch BatchNorm2d names -> (collection, flax name)
_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_UNUSED_PREFIXES = ('fc.', 'AuxLogits.')  # classifier heads: FID uses pool3 only


def convert_state_dict(state_dict: dict) -> dict[str, np.ndarray]:
  """torchvision/pytorch-fid Inception state dict (numpy values) -> flat Flax variables.

  `X.conv.weight` [O, I, kh, kw] -> `params/X/conv/kernel` [kh, kw, I, O];
  `X.bn.{weight,bias,running_mean,running_var}` -> params scale/bias, batch_stats mean/var.
  """
  flat = {}
  for name, value in state_dict.items():
    if name.startswith(_UNUSED_PREFIXES) or name.endswith('num_batches_tracked'):
      continue
    value = np.asarray(value, np.float32)
    head, _, kind = name.rpartition('.')
    module, _, layer = head.rpartition('.')
    path = module.replace('.', '/')
    if layer == 'conv' and kind == 'weight':
      flat[f'params/{path}/conv/kernel'] = np.transpose(value, (2, 3, 1, 0))
    elif layer == 'bn' and kind in _BN:
      collection, leaf = _BN[kind]
      flat[f'{collection}/{path}/bn/{leaf}'] = value
    else:
      raise CheckpointError(f'unexpected tensor {name!r} {value.shape}: this is not the '
                            'FID Inception-v3 state dict.')
  return flat


def convert_file(src: str, out: str) -> dict[str, np.ndarray]:
  """Converts src (.pth) into out (.npz) and verifies it loads into the Flax network."""
  from scm_jax.evaluation import inception  # pylint: disable=g-import-not-at-top
  if not os.path.exists(src):
    raise CheckpointError(f'{src} not found. {inception.WEIGHTS_HELP}')
  flat = convert_state_dict(npz_tree.read_torch_state_dict(src))
  bad = npz_tree.mismatches(flat, inception.abstract_variables())
  if bad:
    raise CheckpointError(f'{src} is not the FID Inception-v3 ({len(bad)} problems, e.g. '
                          f'{bad[:3]}).')
  npz_tree.save(out, npz_tree.unflatten(flat))
  return flat


_SRC = flags.DEFINE_string('src', None, 'pt_inception-2015-12-05-6726825d.pth')
_OUT = flags.DEFINE_string('out', 'inception_fid.npz', 'Output .npz for --inception_weights.')


def main(argv):
  del argv
  flat = convert_file(_SRC.value, _OUT.value)
  print(f'wrote {_OUT.value}: {len(flat)} arrays, '
        f'{sum(v.size for v in flat.values()) / 1e6:.1f}M values')


if __name__ == '__main__':
  flags.mark_flags_as_required(['src'])
  cli.run(main)
