"""Network weights as plain .npz files (no pickle): nested dicts <-> 'a/b/c' keys; and the
PyTorch state-dict reader the weight converters share."""


import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.errors import CheckpointError
from scm_jax.infra import files


def flat_leaves(tree) -> dict:
  """{'params/layer/kernel': leaf, ...} for a nested dict (leaves may be abstract)."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def flatten(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in flat_leaves(tree).items()}


def unflatten(flat: dict) -> dict:
  out = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value)
  return out


def save(path: str, tree) -> None:
  """Writes the tree atomically (a crash never leaves a half-written weights file)."""
  files.atomic_savez(path, **flatten(tree))


def read(path: str) -> dict[str, np.ndarray]:
  """The flat arrays of an .npz (pickled objects refused: infra/files.read_npz)."""
  return files.read_npz(path)


def read_weights(path: str, what: str, help_text: str) -> dict[str, np.ndarray]:
  """`read`, raising CheckpointError that names `what` and how to get the file."""
  try:
    return read(path)
  except FileNotFoundError:
    raise CheckpointError(f'{what} weights file {path!r} not found. {help_text}') from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f'cannot read {what} weights {path!r} ({e}). {help_text}') from None


def mismatches(flat: dict, expected_tree) -> list[str]:
  """Names missing from `flat` or with the wrong shape, versus an (abstract) tree."""
  expected = flat_leaves(expected_tree)
  out = [f'missing {k}' for k in expected if k not in flat]
  out += [f'{k}: {tuple(flat[k].shape)} != {tuple(expected[k].shape)}' for k in expected
          if k in flat and tuple(flat[k].shape) != tuple(expected[k].shape)]
  return out


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict (.pth) as numpy arrays; needs torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError('reading a .pth file needs torch: `pip install torch` (CPU build '
                          'is enough), then rerun the converter.') from None
  state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, dict):
    raise CheckpointError(f'{path} holds a {type(state).__name__}, not a state dict.')
  return {k: v.detach().cpu().numpy() for k, v in state.items()}
