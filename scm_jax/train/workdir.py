"""A training workdir on disk, and the one rule for using its checkpoints.

  <workdir>/config.json     the config the run was (last) started with
  <workdir>/checkpoints/    Orbax steps (infra/checkpoint.py)
  <workdir>/metrics.jsonl   one row per log step; tb/, samples/ and eval/ beside it

`compatibility` is the single check that decides whether a checkpoint may be used by a
run (resuming, sampling, a distillation teacher): data shape, array shapes and, when
resuming, the config fields that fix what the parameters and the data stream mean. Every
refusal has the same form: what differs, one line each, then how to fix it.
"""

import errno
import json
import logging
import os
import shutil
from typing import Callable, Optional

import ml_collections

from scm_jax.errors import CheckpointError, WorkdirError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.infra import files
from scm_jax.infra import lock as lock_lib

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
# What the programs write, move or delete in a workdir: none of it may be a symbolic link
# out of the workdir (`check_links`).
WRITTEN = (CONFIG_FILE, METRICS_FILE, lock_lib.LOCK_FILE, ckpt_lib.CKPT_DIR,
           ckpt_lib.UNUSABLE_DIR, ckpt_lib.ROLLED_BACK_DIR, 'tb', 'samples', 'eval')

# Config fields a run must resume with: what the parameters and the data stream mean.
# Other fields (length, learning rate, logging, mesh, ...) may change, with a warning.
RESUME_FIXED = ('seed', 'data', 'model', 'trigflow', 'loss.kind', 'loss.segments')
# ... except these, which change where or how the same data is read, or how the same
# function of the same parameters is computed (kernels, block sizes, remat, precision).
RESUME_FREE = ('data.prefetch', 'data.data_dir', 'data.download', 'data.eval_split',
               'data.num_test', 'model.attn_impl', 'model.attn_block_size',
               'model.attn_block_q', 'model.remat', 'model.dtype')
# Changes not worth a warning on resume (a run's length and cadence).
QUIET = ('train',)

RESUME_FIX = ("Resume with the run's original config (saved as config.json in the "
              'workdir) or use a new --workdir.')


def _under(field: str, prefixes) -> bool:
  return any(field == p or field.startswith(p + '.') for p in prefixes)


# OS errors that mean "this disk cannot take the run's files" (the fix is the user's).
_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
              errno.EFBIG)
_IO_MARKERS = ('No space left on device', 'Disk quota exceeded', 'Read-only file system',
               'Permission denied', 'File too large')


def _links_out(workdir: str, names) -> list[tuple[str, str]]:
  """(link, target) for the symbolic links among `names` in `workdir` and everything
  under them that point outside the workdir (the workdir itself may be a link)."""
  root = os.path.realpath(workdir)
  out = []
  for name in names:
    top = os.path.join(workdir, name)
    paths = [top]
    if os.path.isdir(top) and not os.path.islink(top):
      for parent, dirs, names_ in os.walk(top):  # does not follow links
        paths += [os.path.join(parent, n) for n in dirs + names_]
    for path in paths:
      target = os.path.realpath(path)
      if os.path.islink(path) and os.path.commonpath([root, target]) != root:
        out.append((path, target))
  return out


def check_links(workdir: str, names=WRITTEN) -> None:
  """WorkdirError if what a program writes in `workdir` (`names`, and everything under
  them) holds a symbolic link out of it: old checkpoints are deleted and files replaced
  there, which through such a link would destroy data that is not this run's."""
  links = _links_out(workdir, names)
  if links:
    link, target = links[0]
    more = f' (and {len(links) - 1} more)' if len(links) > 1 else ''
    raise WorkdirError(
        f'{link} is a symbolic link to {target}, outside the workdir{more}: runs write, '
        'replace and delete files there. Replace the link by the real '
        f'{"directory" if os.path.isdir(link) else "file"}, or make --workdir the real '
        'directory that should hold everything; nothing was written.')


def prepare(workdir: str) -> None:
  """Creates `workdir` if needed and checks that files can be written there.

  WorkdirError (one line) for a path that is a file, a symbolic link out of the workdir
  among what training writes (`check_links`), a missing permission, a read-only
  filesystem; nothing else is touched.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory; pass a directory '
                       '(it is created if missing).')
  check_links(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'cannot write to --workdir={workdir}: {e.strerror or e}. Use a '
                       'directory this user can write to.') from None


def io_failure(error: BaseException, workdir: str) -> Optional[WorkdirError]:
  """A one-line WorkdirError if `error` (or what caused it, e.g. inside an async Orbax
  save) is the disk refusing a write — no space, no permission, read-only — else None."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    text = str(e)
    if (isinstance(e, OSError) and e.errno in _IO_ERRNOS) or any(m in text for m in _IO_MARKERS):
      reason = next((m for m in _IO_MARKERS if m in text), getattr(e, 'strerror', None) or text)
      try:
        free = f'{shutil.disk_usage(workdir).free / 2**20:.1f} MiB free'
      except OSError:
        free = 'free space unknown'
      return WorkdirError(f'writing to {os.path.abspath(workdir)} failed: {reason} '
                          f'({free}). Free space or fix the permissions, then relaunch: the '
                          'run resumes from its newest complete checkpoint.')
    e = e.__cause__ or e.__context__
  return None


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes <workdir>/config.json atomically; one that was edited into something that is
  not a JSON object is first kept aside as config.json.damaged."""
  path = os.path.join(workdir, CONFIG_FILE)
  files.read_json_or_keep_aside(path)
  files.atomic_write_text(path, config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{workdir} has no {CONFIG_FILE}: is it a training workdir? '
                          'Pass the --workdir used for training.')
  try:
    return ml_collections.ConfigDict(files.read_json(path))
  except ValueError as e:  # DataError: not JSON, or not an object
    raise CheckpointError(str(e)) from None
  except OSError as e:
    raise CheckpointError(f'{path} is unreadable ({e.strerror or e}); fix its permissions '
                          'or restore it from a copy.') from None


def flat_config(tree: dict, prefix: str = '') -> dict:
  """{'model.width': 256, ...} from a JSON-like nested dict (tuples as lists)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_config(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(saved: dict, current: ml_collections.ConfigDict) -> list[tuple]:
  """[(field, checkpoint value, current value)] where a saved and a current config differ.

  Fields present in only one of them are ignored: a field added by a newer version of
  the library takes its default, which is what the old run used.
  """
  a = flat_config(saved)
  b = flat_config(json.loads(current.to_json_best_effort()))
  return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def _resume_fixed(field: str) -> bool:
  return _under(field, RESUME_FIXED) and not _under(field, RESUME_FREE)


def _change_line(field: str, saved, now) -> str:
  return f'  config.{field}: checkpoint {saved!r} vs now {now!r}'


def shape_mismatches(saved: dict, expected: dict, limit: int = 20) -> list[str]:
  """Human-readable differences between two checkpoint.flat_shapes() dicts."""
  out = []
  # Parameters first: the EMA and optimizer copies of a mismatch repeat it.
  for k in sorted(set(saved) | set(expected), key=lambda k: (not k.startswith('params/'), k)):
    if k not in saved:
      out.append(f'  {k}: missing from checkpoint (model expects {expected[k]})')
    elif k not in expected:
      out.append(f'  {k}: in checkpoint {saved[k]} but not in the model')
    elif saved[k] != expected[k]:
      out.append(f'  {k}: checkpoint {saved[k]} vs model {expected[k]}')
  if len(out) > limit:
    out = out[:limit] + [f'  ... and {len(out) - limit} more']
  return out


_AUX = ('aux_params/', 'aux_opt_state/')  # TrainState fields of loss.kind='scd_vsd'


def _without_aux(shapes: dict) -> dict:
  """Shapes without F_phi's fields when only one side has them (reported in one line)."""
  return {k: v for k, v in shapes.items() if not k.startswith(_AUX)}


def _aux_model_mismatch(saved: dict, expected: dict) -> list[str]:
  """One line when exactly one of checkpoint and run keeps the auxiliary model F_phi
  (sCD + VSD); when both do, its shapes are compared like the parameters'."""
  has = lambda d: any(k.startswith(_AUX[0]) for k in d)
  if has(saved) == has(expected):
    return shape_mismatches({k: v for k, v in saved.items() if k.startswith(_AUX)},
                            {k: v for k, v in expected.items() if k.startswith(_AUX)})
  where = ('in the checkpoint, not in this run' if has(saved) else
           'needed by this run, not in the checkpoint')
  return [f"  auxiliary model F_phi of loss.kind='scd_vsd' (aux_params, aux_opt_state): "
          f'{where}']


def compatibility(workdir: str, abstract_state, *, data_shape=None,
                  config: Optional[ml_collections.ConfigDict] = None,
                  strict_config: bool = True, process_count: Optional[int] = None,
                  fix: str = RESUME_FIX) -> Callable:
  """The `validate(step, meta, saved_shapes)` callback for Checkpointer.restore*.

  Refuses (IncompatibleCheckpointError) a checkpoint whose data shape or array shapes
  differ from this run's; given `process_count` (resuming: each process continues its
  own data shard), one written by another number of processes; given `config` and
  `strict_config`, one whose config differs in a resume-fixed field. Other config
  changes are logged. `fix` ends the message.
  """
  directory = os.path.join(os.path.abspath(workdir), ckpt_lib.CKPT_DIR)
  expected = ckpt_lib.flat_shapes(abstract_state)

  def validate(step: int, meta: dict, saved_shapes: dict) -> None:
    problems = []
    saved_data = tuple(meta.get('data_shape', ()))
    if data_shape is not None and saved_data and saved_data != tuple(data_shape):
      problems.append(f'  data shape: checkpoint {saved_data} vs now {tuple(data_shape)}')
    problems += _aux_model_mismatch(saved_shapes, expected)
    problems += shape_mismatches(*(_without_aux(d) for d in (saved_shapes, expected)))
    saved_processes = meta.get('process_count')
    if process_count is not None and saved_processes not in (None, process_count):
      problems.append(f'  processes: checkpoint {saved_processes} vs now {process_count} '
                      '(each process resumes its own data shard)')
    changes = []
    if config is not None and 'config' in meta:
      changes = config_changes(meta['config'], config)
    fixed = [_change_line(*c) for c in changes if _resume_fixed(c[0])]
    config_only = not problems
    if strict_config:
      problems += fixed
    if problems:
      override = (' If the config change is intended, pass '
                  '--config.train.check_resume_config=False.' if config_only else '')
      raise ckpt_lib.IncompatibleCheckpointError(
          f'the checkpoint at step {step} in {directory} does not match this run:\n'
          + '\n'.join(problems) + f'\n{fix}{override} No checkpoint was changed.')
    changed = [_change_line(*c) for c in changes
               if _resume_fixed(c[0]) or not _under(c[0], QUIET)]
    if changed:
      logging.warning('resuming with a changed config:\n%s', '\n'.join(changed))
  return validate


def restore(workdir: str, abstract_state, step: Optional[int] = None, *,
            data_shape=None, fix: str = RESUME_FIX):
  """(state, meta) of a workdir's checkpoint `step` (default: the newest usable one),
  read-only, into the shardings of `abstract_state`."""
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  validate = compatibility(workdir, abstract_state, data_shape=data_shape, fix=fix)
  try:
    if step is None:
      state, meta = ckpt.restore_latest(abstract_state, validate)
      if state is None:
        raise CheckpointError(f'no checkpoint in {ckpt.directory}; train first.')
      return state, meta
    if step not in ckpt.steps():
      raise CheckpointError(f'no checkpoint at step {step} in {ckpt.directory}; '
                            f'available: {ckpt.steps()}.')
    return ckpt.restore(step, abstract_state, validate)
  finally:
    ckpt.close()
