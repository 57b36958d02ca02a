"""Exceptions with messages meant for users.

Every CLI catches `ScmJaxError` and prints only its message (no traceback), so raise
one of these whenever the user can fix the problem: say what is wrong and how to fix it.
"""


class ScmJaxError(Exception):
  """Base class for errors caused by user input (configs, data, checkpoints)."""


class ConfigError(ScmJaxError, ValueError):
  """The configuration is invalid or inconsistent."""


class DataError(ScmJaxError, ValueError):
  """Input data is missing, malformed or does not match the config."""


class CheckpointError(ScmJaxError, RuntimeError):
  """A checkpoint is missing, corrupted or incompatible with the config."""


class IncompatibleCheckpointError(CheckpointError):
  """The checkpoint is intact but cannot serve this run: another model or config, or an
  older format that needs a migration (infra/formats.py)."""


class WorkdirError(ScmJaxError, RuntimeError):
  """The workdir cannot be used: a path problem, no permission, no space left, or
  another process is training in it."""
