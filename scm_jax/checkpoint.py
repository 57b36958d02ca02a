"""Orbax checkpointing: atomic saves, automatic resume, validation before restore.

A checkpoint step directory holds two items: 'state' (the TrainState pytree, sharded
arrays written collectively) and 'meta' (JSON: the config, data-iterator position and
data shape). Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves the previous checkpoints intact. Nothing here
unpickles: state is tensorstore arrays, meta is JSON.
"""

import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from scm_jax.errors import CheckpointError

CKPT_DIR = 'checkpoints'
FORMAT_VERSION = 1


def atomic_write_text(path: str, text: str) -> None:
  """Writes a file via a temporary name and rename, so readers never see half of it."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def flat_shapes(tree) -> dict[str, tuple]:
  """{'params/Dense_0/kernel': (2, 256), ...} for arrays, abstract arrays or metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(getattr(x, 'shape', ())) for p, x in leaves}


def shape_mismatches(saved: dict, expected: dict, limit: int = 20) -> list[str]:
  """Human-readable differences between two flat_shapes() dicts."""
  out = []
  for k in sorted(set(saved) | set(expected)):
    if k not in saved:
      out.append(f'  {k}: missing from checkpoint (model expects {expected[k]})')
    elif k not in expected:
      out.append(f'  {k}: in checkpoint {saved[k]} but not in the model')
    elif saved[k] != expected[k]:
      out.append(f'  {k}: checkpoint {saved[k]} vs model {expected[k]}')
  if len(out) > limit:
    out = out[:limit] + [f'  ... and {len(out) - limit} more']
  return out


class IncompatibleCheckpointError(CheckpointError):
  """The checkpoint is intact but belongs to a different model/config."""


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` keeping the last `keep` steps."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_names=('state', 'meta'))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    meta = dict(meta, format_version=FORMAT_VERSION, step=int(step))
    return self.manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def read_meta(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), 'meta', 'metadata')
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} has unreadable '
                            f'metadata ({e}); it is corrupted or truncated.') from e

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """Shapes recorded in the step's 'state' item (reads metadata only, no arrays)."""
    with ocp.StandardCheckpointer() as reader:
      md = reader.metadata(os.path.join(self.directory, str(step), 'state')).item_metadata
    shapes = flat_shapes(getattr(md, 'tree', md))
    if not shapes:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} records no arrays.')
    return shapes

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises CheckpointError listing every parameter/state shape that differs."""
    try:
      saved = self.saved_shapes(step)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'cannot read the state metadata of checkpoint step {step} in '
                            f'{self.directory}: {e}') from e
    diffs = shape_mismatches(saved, flat_shapes(abstract_state))
    if diffs:
      raise IncompatibleCheckpointError(
          f'the checkpoint at step {step} in {self.directory} does not match the model '
          'built from this config:\n' + '\n'.join(diffs) +
          '\nUse a new --workdir, or resume with the config the run was started with '
          '(saved as config.json in the workdir). No checkpoint was changed.')

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` into the shardings of `abstract_state`."""
    self.check_compatible(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'])

  def restore_latest(self, abstract_state, validate_meta=None):
    """Newest restorable checkpoint, falling back to older ones if it is corrupted.

    Incompatibility (wrong shapes, a failing `validate_meta(meta)`) is the user's
    problem, not corruption, and is raised at once. Returns (None, None) if there is
    no checkpoint.
    """
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
        if validate_meta is not None:
          validate_meta(meta)
        self.check_compatible(step, abstract_state)
        state, meta = self.restore(step, abstract_state)
        if not _state_finite(state):
          raise CheckpointError(f'checkpoint step {step} contains non-finite values')
        if errors:
          logging.warning('restored checkpoint step %d after skipping unusable newer ones:\n%s',
                          step, '\n'.join(errors))
        return state, meta
      except IncompatibleCheckpointError:
        raise
      except CheckpointError as e:
        errors.append(f'  step {step}: {e}')
      except Exception as e:  # pylint: disable=broad-except  # corrupted tensorstore data
        errors.append(f'  step {step}: {type(e).__name__}: {e}')
    if errors:
      raise CheckpointError(f'no usable checkpoint in {self.directory}:\n' + '\n'.join(errors)
                            + '\nMove the directory away to start fresh.')
    return None, None


def _state_finite(state) -> bool:
  """True if every floating leaf is finite (a jitted reduction: works multi-process)."""
  def finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
  return bool(jax.jit(finite)(state))
