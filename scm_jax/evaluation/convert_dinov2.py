"""Convert official DINOv2 weights (PyTorch) to a Flax-readable .npz, for FD_DINOv2.

    python -m scm_jax.evaluation.convert_dinov2 \\
        --src=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz

Where to get the source file: it is the state dict `torch.hub.load('facebookresearch/dinov2',
'dinov2_vitl14')` downloads (dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/
dinov2_vitl14_pretrain.pth; EDM2's FD_DINOv2 uses exactly this model). Download it on any
machine with internet. Reading a .pth needs torch (`pip install torch`, CPU is enough);
torch is used only here, never by scm_jax itself. ViT-S/B/g (dinov2_vit{s,b,g}14) convert
the same way; the architecture is read from the shapes. Register variants (`*_reg`)
interpolate their position embedding differently and are refused.

The output is a plain .npz (no pickle) read by `dinov2.load_dinov2_params`. Conversion is
a rename (`blocks.N.` -> `blocks_N/`) plus layout changes (Linear weight -> kernel^T,
conv weight OIHW -> HWIO, LayerNorm weight -> scale); the converter checks that every
weight of the network was filled.
"""

import os
import re

import numpy as np
from absl import flags

from scm_jax import cli
from scm_jax.errors import CheckpointError
from scm_jax.evaluation import npz_tree

_SKIPPED = ('mask_token',)  # masked-image-modelling token: used in training only
# 'blocks.N.' or, with block_chunks > 0, 'blocks.CHUNK.N.' (N is global in both).
_BLOCK = re.compile(r'^blocks\.(?:\d+\.)?(\d+)\.')


def convert_state_dict(state_dict: dict) -> dict[str, np.ndarray]:
  """Official DINOv2 state dict (numpy values) -> flat Flax variables ('params/...')."""
  flat = {}
  for name, value in state_dict.items():
    if name in _SKIPPED:
      continue
    if name == 'register_tokens':
      raise CheckpointError('register-token DINOv2 models (dinov2_*_reg) are not supported; '
                            'FD_DINOv2 uses dinov2_vitl14_pretrain.pth.')
    value = np.asarray(value, np.float32)
    block = _BLOCK.match(name)
    path = f'blocks_{block.group(1)}.{name[block.end():]}' if block else name
    *module, leaf = path.split('.')
    prefix = '/'.join(['params'] + module)
    if not module and leaf in ('cls_token', 'pos_embed'):
      flat[prefix + '/' + leaf] = value
    elif leaf == 'weight' and value.ndim == 4:  # patch-embedding conv OIHW -> HWIO
      flat[prefix + '/kernel'] = np.transpose(value, (2, 3, 1, 0))
    elif leaf == 'weight' and value.ndim == 2:  # Linear [out, in] -> Dense [in, out]
      flat[prefix + '/kernel'] = value.T
    elif leaf == 'weight' and value.ndim == 1:  # LayerNorm
      flat[prefix + '/scale'] = value
    elif leaf in ('bias', 'gamma') and module:
      flat[prefix + '/' + leaf] = value
    else:
      raise CheckpointError(f'unexpected tensor {name!r} {value.shape}: this is not an '
                            'official DINOv2 backbone state dict.')
  return flat


def convert_file(src: str, out: str):
  """Converts src (.pth) into out (.npz), verified against the network it describes.

  Returns (ViTConfig, flat arrays).
  """
  from scm_jax.evaluation import dinov2  # pylint: disable=g-import-not-at-top
  if not os.path.exists(src):
    raise CheckpointError(f'{src} not found. {dinov2.WEIGHTS_HELP}')
  flat = convert_state_dict(npz_tree.read_torch_state_dict(src))
  config = dinov2.config_from_shapes({k: v.shape for k, v in flat.items()})
  bad = dinov2.problems(flat, config)
  if bad:
    raise CheckpointError(f'{src} is not an official DINOv2 ViT ({len(bad)} problems, e.g. '
                          f'{bad[:3]}).')
  npz_tree.save(out, npz_tree.unflatten(flat))
  return config, flat


def main(argv):
  del argv
  from scm_jax.evaluation import dinov2  # pylint: disable=g-import-not-at-top
  out = flags.FLAGS.out
  config, flat = convert_file(flags.FLAGS.src, out)
  print(f'wrote {out}: DINOv2 {dinov2.arch_name(config)} ({config.dim}-d features), '
        f'{len(flat)} arrays, {sum(v.size for v in flat.values()) / 1e6:.1f}M values')


if __name__ == '__main__':
  # Defined here, not at import: convert_inception owns the same flag names.
  flags.DEFINE_string('src', None, 'dinov2_vitl14_pretrain.pth (official state dict).')
  flags.DEFINE_string('out', 'dinov2_vitl14.npz', 'Output .npz for --dinov2_weights.')
  flags.mark_flags_as_required(['src'])
  cli.run(main)
