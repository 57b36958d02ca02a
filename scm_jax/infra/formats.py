"""Checkpoint formats: what each FORMAT_VERSION holds, and how older ones are read.

  2 (current)  items 'state' (the TrainState arrays), 'meta' (JSON) and 'data' (the
               batch stream's grain position, one JSON file per process). The meta
               carries a digest of itself, one checksum per array ('fingerprint') and
               one digest per process of the data position.
  1            scm_jax before the grain input pipeline: items 'state' and 'meta' only.
               The data position was meta['data'] = {'step', 'seed',
               'global_batch_size'}: a batch count in that version's data order
               (one numpy permutation per epoch), which no longer exists. The earliest
               format-1 checkpoints have no 'fingerprint' either.

The state item has not changed: format-1 arrays load into today's TrainState, checked
against their fingerprint where there is one (the earliest ones load unverified, with a
warning). So sampling, evaluating, distilling from or initialising from a format-1
checkpoint just works. Resuming training from one would continue the old data order,
which cannot be done: it is refused with one line, unless `train.resume_old_format` is
set, in which case the data position is migrated to this version's stream after as many
batches (`BatchStream.state_at`): training goes on from the saved weights, optimizer and
EMA, not bit-identically to a run never upgraded (its later batches differ), and every
checkpoint it writes is format 2. A meta that claims format 1 but holds format-2 fields
is treated as damaged, never read as format 1. A newer format is refused (upgrade).
"""

import logging
from typing import Optional

from scm_jax.errors import IncompatibleCheckpointError
from scm_jax.infra.fingerprint import meta_digest

FORMAT_VERSION = 2
_V2_ONLY = ('digest', 'data_digests')  # meta fields format 1 never wrote


def version(meta: dict) -> int:
  return int(meta.get('format_version', 1))


def meta_problem(step: int, meta: dict, has_data_item: bool) -> Optional[str]:
  """Why `meta` cannot be the meta of checkpoint `step` (None if it can);
  `has_data_item`: whether the step directory holds a 'data' item."""
  if 'format_version' not in meta or 'step' not in meta:
    missing = [k for k in ('format_version', 'step', 'fingerprint') if k not in meta]
    return f'its metadata lacks {", ".join(missing)} (replaced or truncated)'
  if int(meta['step']) != int(step):
    return f'its metadata is that of step {meta["step"]}, not of its directory {step}'
  if version(meta) < 2:
    if has_data_item or any(k in meta for k in _V2_ONLY):
      return 'its metadata claims format 1 but the checkpoint has format-2 parts (altered)'
    return None
  if 'fingerprint' not in meta:
    return 'its metadata lacks fingerprint (replaced or truncated)'
  if meta.get('digest') != meta_digest(meta):
    return 'its metadata was altered after it was written (digest mismatch)'
  return None


def check_readable(meta: dict, where: str) -> None:
  """IncompatibleCheckpointError for a format newer than this library's."""
  if version(meta) > FORMAT_VERSION:
    raise IncompatibleCheckpointError(
        f'{where} was written by a newer scm_jax (format {version(meta)} > '
        f'{FORMAT_VERSION}); upgrade scm_jax. No checkpoint was changed.')


def warn_unverified(meta: dict, where: str) -> None:
  if meta.get('fingerprint') is None:
    logging.warning('%s is a format-1 checkpoint from before array checksums: its arrays '
                    'are loaded unverified.', where)


def migrated_position(meta: dict, stream, where: str, allowed: bool) -> bytes:
  """The position for `stream` of a format-1 checkpoint being resumed: refused with the
  fix unless `allowed` (config.train.resume_old_format), else after the same number of
  batches of this version's stream."""
  old = meta.get('data') or {}
  batches = old.get('step')
  if not isinstance(batches, int) or batches < 0:
    raise IncompatibleCheckpointError(f'{where} (format 1) records no data position '
                                      f'(meta data={old!r}); start a new --workdir.')
  if not allowed:
    raise IncompatibleCheckpointError(
        f'{where} was written by an older scm_jax (format 1): its weights, optimizer and '
        f'EMA load, but its data position ({batches} batches) is in a data order this '
        'version no longer has. To train on from it, pass '
        '--config.train.resume_old_format=True (the stream then continues after '
        f'{batches} batches of the current order; not bit-identical to never upgrading), '
        'or start a new --workdir. No checkpoint was changed.')
  logging.warning('%s: format-1 checkpoint migrated: the data stream continues after %d '
                  'batches of the current data order; new checkpoints are format %d.',
                  where, batches, FORMAT_VERSION)
  return stream.state_at(batches)
