"""Orbax checkpointing: atomic saves, automatic resume, validation before restore.

A checkpoint step directory holds three items: 'state' (the TrainState pytree, sharded
arrays written collectively), 'data' (the training batch stream's position: grain's
iterator state, one JSON file per process, written by grain's Orbax handler) and 'meta'
(JSON: the config, data shape, rollback history and a fingerprint of every state array).
Items are read through Orbax's CheckpointManager only (`read_meta` restores the meta item
alone, `saved_shapes` asks for the state's array metadata). Orbax writes each step into a temporary
directory and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact; leftover temporary directories are removed on the next start.

A step is accepted only if its three items agree with each other and with the directory
they sit in: the meta carries a digest of itself, the step number, one checksum per state
array (`state_fingerprint`) and one per process of the data position. On restore, a
step whose meta is unreadable, edited or incomplete, whose step number differs from its
directory's, whose arrays fail to load or no longer match their checksums (bit rot, a
truncated or overwritten file), or whose data position is missing or altered, is treated
as corrupted: it is moved to `<workdir>/checkpoints_unusable/` (never deleted) and the
next older step is used. Nothing here unpickles: state is tensorstore arrays, meta and
data position are JSON.

Checkpoints of older formats are read as infra/formats.py says (format 1: loaded, resumed
only through a migration).

Before each save the free space is checked against the size of a checkpoint: a save that
cannot fit fails at once with one line (DiskFullError), the previous checkpoints intact.
"""

import dataclasses
import logging
import os
import shutil
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from scm_jax.errors import CheckpointError, ConfigError, IncompatibleCheckpointError, WorkdirError
from scm_jax.infra import formats
from scm_jax.infra import sharding
from scm_jax.infra.fingerprint import data_digest, meta_digest, state_fingerprint

CKPT_DIR = 'checkpoints'
UNUSABLE_DIR = 'checkpoints_unusable'      # corrupted steps, moved aside on restore
ROLLED_BACK_DIR = 'checkpoints_rolled_back'  # steps newer than a non-finite rollback target
# Orbax renames old steps (beyond `keep`) into checkpoints/TRASH_DIR and this module
# empties it: a deletion killed half-way must not leave a half checkpoint that looks
# like a fallback.
TRASH_DIR = '.deleted'

FORMAT_VERSION = formats.FORMAT_VERSION  # what older ones hold: infra/formats.py


def flat_shapes(tree) -> dict[str, tuple]:
  """{'params/Dense_0/kernel': (2, 256), ...} for arrays, abstract arrays or metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {sharding.path_str(p): tuple(getattr(x, 'shape', ())) for p, x in leaves}


def _stored(state):
  """The state as Orbax stores it: a dataclass state (TrainState) becomes the dict of its
  fields that are not None, so optional fields (e.g. the scd_vsd auxiliary model) are
  absent from other runs' checkpoints and older checkpoints keep loading."""
  if dataclasses.is_dataclass(state):
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if getattr(state, f.name) is not None}
  return state


def _unstored(restored, abstract_state):
  """Inverse of `_stored` for a state shaped like `abstract_state`."""
  if dataclasses.is_dataclass(abstract_state):
    return abstract_state.replace(**restored)
  return restored


class DiskFullError(WorkdirError):
  """Not enough free space for the next checkpoint; nothing was written."""


# Orbax warnings a user cannot act on (a read-only reader's options, the step metadata
# file older checkpoints lack): kept out of the logs.
_QUIET_ORBAX = ('Given directory is read only', 'Metadata file does not exist',
                'CheckpointManagerOptions.read_only=True')


class _QuietOrbax(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(m in str(record.msg) for m in _QUIET_ORBAX)


def _quiet_orbax_warnings() -> None:
  logger = logging.getLogger('absl')
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())


def _first_line(e: Exception) -> str:
  """An exception's first line (tensorstore and Orbax append long specs after it)."""
  return (str(e).splitlines() or [''])[0]


class _Snapshot:
  """A data stream's state taken now, as an item for grain's Orbax handler (which may
  write it after the stream has moved on)."""

  def __init__(self, stream):
    self._state = stream.get_state()

  def get_state(self) -> bytes:
    return self._state


class _Capture:
  """An item for grain's Orbax handler that keeps the restored bytes (checked against
  the meta before they reach the real stream)."""

  state: Optional[bytes] = None

  def set_state(self, state: bytes) -> None:
    self.state = state

  def start_prefetch(self) -> None:
    pass


def _all_processes(value: str) -> list[str]:
  """[value of process 0, value of process 1, ...] (every process gets the list)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(bytes.fromhex(value), np.uint8)
  gathered = multihost_utils.process_allgather(raw)
  return [bytes(row).hex() for row in np.asarray(gathered).reshape(jax.process_count(), -1)]


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` keeping the last `keep` steps.

  Compatibility is not decided here: `restore` and `restore_latest` take a
  `validate(step, meta, saved_shapes)` callback (train/workdir.py owns the rules) that
  raises IncompatibleCheckpointError before any array is read. `read_only` (readers
  such as the sample CLI, which may run beside a training job) opens Orbax's manager
  read-only: nothing is created, cleaned up or moved aside.
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False, resume_old_format: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CKPT_DIR)
    self.read_only = read_only
    self.resume_old_format = resume_old_format  # migrate format-1 data positions
    _quiet_orbax_warnings()
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=async_save,
                                             todelete_subdir=TRASH_DIR)
    # Explicit handlers (not just item names): a fresh process can then read one item
    # (the meta, the state's array metadata) without restoring the others.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})
    self._empty_trash()

  def _empty_trash(self) -> None:
    """Removes the steps Orbax retired (renamed whole into TRASH_DIR, so a kill while
    removing them leaves nothing that looks like a checkpoint)."""
    if not self.read_only and jax.process_index() == 0:
      shutil.rmtree(os.path.join(self.directory, TRASH_DIR), ignore_errors=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, meta: dict, data=None, force: bool = False) -> bool:
    """Starts an (async) save of `state`, `meta` and the position of the data stream
    `data` (taken now); the state may be donated to the next step right after."""
    if self.read_only:
      raise CheckpointError(f'{self.directory} was opened read-only; nothing was saved.')
    self.check_space(state, step)
    fingerprint, _ = state_fingerprint(state)
    meta = dict(meta, format_version=FORMAT_VERSION, step=int(step), fingerprint=fingerprint)
    items = {'state': ocp.args.StandardSave(_stored(state))}
    if data is not None:
      snapshot = _Snapshot(data)
      meta['data_digests'] = _all_processes(data_digest(snapshot.get_state()))
      items['data'] = grain.checkpoint.CheckpointSave(item=snapshot)
    meta['digest'] = meta_digest(meta)
    items['meta'] = ocp.args.JsonSave(meta)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def check_space(self, state, step: int) -> None:
    """DiskFullError unless the disk holding the checkpoints has room for one more.

    A checkpoint's size is the newest one's on disk, or before the first save the
    state's raw bytes (an upper bound: Orbax compresses). The old ones are deleted only
    after the new one is complete, so the room must be free now. The previous (async)
    save is finished first, as Orbax would before starting this one anyway.
    """
    self.wait()
    self._empty_trash()
    need = self._checkpoint_bytes(state)
    free = shutil.disk_usage(self.directory).free
    if free < need:
      latest = self.latest_step()
      raise DiskFullError(
          f'not enough free space to save checkpoint step {step} in {self.directory}: '
          f'it needs about {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free. '
          'Free space there or resume with another --workdir; '
          + (f'checkpoint step {latest} is intact.' if latest is not None else
             'no checkpoint was written.'))

  def _checkpoint_bytes(self, state) -> int:
    latest = self.latest_step()
    if latest is not None:
      total = 0
      for root, _, names in os.walk(os.path.join(self.directory, str(latest))):
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names)
      return int(total * 1.1) + 2**20
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + 2**20

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    self._empty_trash()

  def read_meta(self, step: int) -> dict:
    """The step's 'meta' item (JSON), read alone; CheckpointError if it is unreadable or
    does not belong to this step (see formats.meta_problem)."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except  # missing, truncated, not JSON
      raise CheckpointError(f'checkpoint step {step} in {self.directory} has unreadable '
                            f'metadata ({_first_line(e)}); it is corrupted or '
                            'truncated.') from e
    if not isinstance(meta, dict):
      raise CheckpointError(f'checkpoint step {step} in {self.directory} has metadata '
                            f'that is not a JSON object; it is corrupted.')
    problem = formats.meta_problem(step, meta, os.path.isdir(
        os.path.join(self.directory, str(step), 'data')))
    if problem:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} is unusable: '
                            f'{problem}.')
    return dict(meta)

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """Shapes recorded in the step's 'state' item (array metadata only, no arrays)."""
    try:
      md = self.manager.item_metadata(step)['state']
      shapes = flat_shapes(getattr(md, 'tree', md))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'cannot read the array metadata of checkpoint step {step} in '
                            f'{self.directory}: {_first_line(e)}') from e
    if not shapes:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} records no arrays.')
    return shapes

  def restore(self, step: int, abstract_state, validate, data=None) -> tuple[Any, dict]:
    """Restores (state, meta) at `step` into the shardings of `abstract_state`, and the
    position of the data stream `data` (if given: resuming training).

    `validate(step, meta, saved_shapes)` runs first. Raises CheckpointError if the
    arrays do not match the fingerprint saved with them or are not finite, or if the
    data position is unreadable.
    """
    meta = self.read_meta(step)
    where = f'checkpoint step {step} in {self.directory}'
    formats.check_readable(meta, where)
    validate(step, meta, self.saved_shapes(step))
    state = _unstored(self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_stored(abstract_state))))['state'], abstract_state)
    fingerprint, finite = state_fingerprint(state)
    saved = meta.get('fingerprint')
    if saved is not None and saved != fingerprint:
      paths = list(flat_shapes(state))
      bad = [paths[i] for i, (a, b) in enumerate(zip(saved, fingerprint)) if a != b]
      raise CheckpointError(
          f'checkpoint step {step} is corrupted: {len(bad)} array(s) differ from what was '
          f'saved ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}).')
    if not finite:
      raise CheckpointError(f'checkpoint step {step} contains non-finite values')
    formats.warn_unverified(meta, where)
    if data is not None:
      self._restore_data(step, meta, data)
    return state, meta

  def _restore_data(self, step: int, meta: dict, stream) -> None:
    where = f'checkpoint step {step} in {self.directory}'
    if formats.version(meta) < 2:  # its position is in the meta, in an old data order
      stream.set_state(formats.migrated_position(meta, stream, where,
                                                 self.resume_old_format))
      return
    capture = _Capture()
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(item=capture)))
    except Exception as e:  # pylint: disable=broad-except  # missing or unreadable
      raise CheckpointError(f'{where} has an unreadable data-stream position '
                            f'({_first_line(e)}).') from e
    digests = meta.get('data_digests') or []
    if (len(digests) != jax.process_count()
        or digests[jax.process_index()] != data_digest(capture.state)):
      raise CheckpointError(f'{where} has a data-stream position that differs from the '
                            'one recorded in its metadata (altered or damaged).')
    try:
      stream.set_state(capture.state)
    except ConfigError as e:  # another seed, worker count or source: the user's choice
      raise IncompatibleCheckpointError(f'{where}: {e} No checkpoint was changed.') from None
    except Exception as e:  # pylint: disable=broad-except  # damaged state
      raise CheckpointError(f'{where} has an unusable data-stream position '
                            f'({_first_line(e)}).') from e

  def restore_latest(self, abstract_state, validate, before: Optional[int] = None,
                     log_fallback: bool = True, data=None):
    """Newest restorable checkpoint (older than `before` if given), falling back to older
    ones if it is corrupted; corrupted steps are moved to checkpoints_unusable/. With
    `data` (a batch stream) its position is restored too.

    Incompatibility (IncompatibleCheckpointError from `validate`) is the user's
    problem, not corruption, and is raised at once. Returns (None, None) if there is
    no checkpoint.
    """
    steps = [s for s in self.steps() if before is None or s < before]
    errors, unusable = [], []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state, validate, data)
        if errors and log_fallback:
          logging.warning('restored checkpoint step %d after skipping unusable newer ones:\n%s',
                          step, '\n'.join(errors))
        self.move_aside(unusable, UNUSABLE_DIR)
        return state, meta
      except IncompatibleCheckpointError:
        raise
      except CheckpointError as e:
        errors.append(f'  step {step}: {e}')
      except Exception as e:  # pylint: disable=broad-except  # corrupted tensorstore data
        errors.append(f'  step {step}: {type(e).__name__}: {_first_line(e)[:300]}')
      unusable.append(step)
    if errors:
      raise CheckpointError(f'no usable checkpoint in {self.directory}:\n' + '\n'.join(errors)
                            + '\nMove the directory away to start fresh.')
    return None, None

  def move_aside(self, steps, subdir: str) -> list[str]:
    """Moves step directories to <workdir>/<subdir>/ (nothing is deleted) so that the
    run can save those step numbers again. Process 0 moves; every process waits."""
    if self.read_only or not steps:
      return []
    self.wait()
    moved = []
    if jax.process_index() == 0:
      dest_root = os.path.join(self.workdir, subdir)
      os.makedirs(dest_root, exist_ok=True)
      for step in steps:
        dest = os.path.join(dest_root, str(step))
        n = 1
        while os.path.exists(dest):
          dest, n = os.path.join(dest_root, f'{step}.{n}'), n + 1
        os.replace(os.path.join(self.directory, str(step)), dest)
        moved.append(dest)
      logging.warning('moved checkpoint step(s) %s to %s', list(steps), dest_root)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'scm_jax_move_aside_{subdir}_{list(steps)}')
    self.manager.reload()
    return moved
