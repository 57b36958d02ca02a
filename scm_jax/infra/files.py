"""Files that readers never see half-written, and the one reader of metrics.jsonl."""

import contextlib
import json
import os
from typing import Iterator


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
  an unparsable line before it means the file is damaged and raises ValueError, unless
  `skip_damaged` (a writer cleaning up its own log) drops it too.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1 and not skip_damaged:
        raise ValueError(f'{path} line {i + 1} is not JSON ({e}); the file is damaged.') from e
  return rows
