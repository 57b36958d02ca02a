"""Files that readers never see half-written; the readers of JSON, JSON-lines and .npz
files that a user may have edited, replaced or damaged.

Nothing here trusts a file's contents: JSON that does not parse is one error line naming
the file and the position, an .npz is read without unpickling anything, and a damaged
file a writer is about to replace is first renamed aside (`keep_aside`), never lost.
"""

import contextlib
import json
import logging
import os
from typing import Any, Iterator, Optional

from scm_jax.errors import DataError


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = '') -> Iterator[str]:
  """Yields a temporary path beside `path`, renamed to `path` when the block succeeds.

  A crash or an exception leaves `path` as it was (and removes the temporary file), so
  readers see the old file or the new one, never half of it. `suffix` keeps an extension
  that a writer insists on (np.savez appends '.npz' otherwise).
  """
  tmp = f'{path}.tmp.{os.getpid()}{suffix}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (flushed to disk before the rename)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def atomic_savez(path: str, **arrays) -> None:
  """np.savez(path, **arrays), atomically; `path` should end in .npz."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path, '.npz') as tmp:
    np.savez(tmp, **arrays)


def read_jsonl(path: str, skip_damaged: bool = False) -> list[dict]:
  """Rows of a JSON-lines file such as <workdir>/metrics.jsonl ([] if it is missing).

  A live run may be writing the last line, so an unparsable *last* line is skipped;
  a line before it that is not a JSON object means the file is damaged and raises
  DataError (a ValueError), unless `skip_damaged` drops it too.
  """
  if not os.path.exists(path):
    return []
  with open(path, errors='replace') as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
      if not isinstance(row, dict):
        raise json.JSONDecodeError('not a JSON object', line, 0)
      rows.append(row)
    except json.JSONDecodeError as e:
      if i < len(lines) - 1 and not skip_damaged:
        raise DataError(f'{path} line {i + 1} is not a JSON object ({e.msg}); the file is '
                        'damaged: repair or remove that line.') from None
  return rows


def read_json(path: str, kind: Optional[type] = dict) -> Any:
  """The JSON document at `path`; DataError naming the file (and the position) if it is
  not JSON, or not of type `kind` (None: any)."""
  with open(path, errors='replace') as f:
    text = f.read()
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}, column '
                    f'{e.colno}); repair it or restore it from a copy.') from None
  if kind is not None and not isinstance(value, kind):
    raise DataError(f'{path} holds a JSON {type(value).__name__}, not a {kind.__name__}; '
                    'repair it or restore it from a copy.')
  return value


def keep_aside(path: str, tag: str = 'damaged') -> str:
  """Renames `path` to `<path>.<tag>` (or `.<tag>.1`, ... if taken) and returns that."""
  dest, n = f'{path}.{tag}', 1
  while os.path.exists(dest):
    dest, n = f'{path}.{tag}.{n}', n + 1
  os.replace(path, dest)
  return dest


def read_json_or_keep_aside(path: str, kind: type = dict) -> Optional[Any]:
  """For a writer about to replace `path`: its JSON (None if missing), or, if it is not
  JSON of type `kind`, None after renaming it aside with a warning (nothing is lost)."""
  if not os.path.exists(path):
    return None
  try:
    return read_json(path, kind)
  except DataError as e:
    kept = keep_aside(path)
    logging.warning('%s: kept as %s and written anew.', str(e).split('; repair')[0], kept)
    return None


def read_npz(path: str, keys=None) -> dict:
  """{name: array} of an .npz file (only `keys`, those it has, if given), never
  unpickling (allow_pickle=False): DataError for an object (pickled) array or a file
  that is not an .npz; FileNotFoundError passes."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files if keys is None or k in keys}
  except FileNotFoundError:
    raise
  except ValueError as e:
    if 'pickle' in str(e) or 'Python objects' in str(e):
      raise DataError(f'{path} holds an object (pickled) array, which is never loaded (it '
                      'could run code); save plain numeric arrays instead.') from None
    raise DataError(f'cannot read {path}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  # not a zip, truncated
    raise DataError(f'cannot read {path} (corrupt or not an .npz file): {e}') from None
