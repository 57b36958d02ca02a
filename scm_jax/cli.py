"""Shared command-line plumbing: clean error reporting and quiet logs."""

import logging
import os
import sys

import jax

from absl import app
from absl import flags
from absl import logging as absl_logging

from scm_jax.errors import ConfigError, ScmJaxError


def enable_compilation_cache() -> None:
  """Persistent XLA cache: a resumed or repeated run skips recompiling its step.

  Location: $SCM_JAX_COMPILATION_CACHE (empty string disables), else JAX's own
  JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/scm_jax/xla.
  """
  path = os.environ.get('SCM_JAX_COMPILATION_CACHE',
                        os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                       os.path.expanduser('~/.cache/scm_jax/xla')))
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(main):
  """absl.app.run(main), printing ScmJaxError as one `error:` line (exit code 2)."""
  def wrapped(argv):
    logging.getLogger('jax').setLevel(logging.WARNING)  # backend-probing chatter
    absl_logging.set_verbosity(absl_logging.WARNING)    # orbax's per-save INFO lines
    enable_compilation_cache()
    try:
      return main(argv)
    except ScmJaxError as e:
      _fail(str(e))
  app.run(wrapped, flags_parser=_parse_flags)


def config_value(holder):
  """The loaded ConfigDict of a DEFINE_config_file flag, or a ConfigError saying why not."""
  import ml_collections
  try:
    value = holder.value
    if not isinstance(value, ml_collections.ConfigDict):
      value.keys()  # a deferred load failure raises here
  except OSError as e:
    raise ConfigError(f'could not load the config file: {e}') from None
  return value


def int_list_flag(name: str, minimum: int = 0) -> None:
  """Validates a DEFINE_list flag at parse time: comma-separated integers >= minimum."""
  def valid(values):
    try:
      return values is None or all(int(v) >= minimum for v in values)
    except ValueError:
      return False
  flags.register_validator(name, valid, message=f'--{name} takes comma-separated integers '
                           f'>= {minimum}, e.g. --{name}={minimum},{minimum + 1}')


def check_conditioning(num_classes: int, guidance=None, labels=None,
                       guided_otherwise: bool = False) -> None:
  """ConfigError unless --guidance / --labels fit the model: both need a class-
  conditional model (--guidance not when `guided_otherwise`: a guidance input or a
  guiding network), and labels must be among its classes."""
  if not num_classes and guidance not in (None, 1.0) and not guided_otherwise:
    raise ConfigError(f'--guidance={guidance:g} needs a class-conditional model (or a '
                      '--guide_workdir); this one is unconditional (num_classes=0): drop '
                      '--guidance.')
  if labels:
    if not num_classes:
      raise ConfigError('--labels given, but this model is unconditional (num_classes=0).')
    bad = [int(v) for v in labels if not 0 <= int(v) < num_classes]
    if bad:
      raise ConfigError(f'--labels must be in [0, {num_classes - 1}] for this model; got '
                        f'{bad[:5]}.')


def define_guide_flags():
  """--guide_workdir / --guide_ema / --guide_step of the sampling CLIs (a diffusion
  model's PF-ODE guided by a separate guiding network, EDM2-style; Experiment.use_guide)."""
  return (flags.DEFINE_string('guide_workdir', '', 'Diffusion models: a guiding network\'s '
                              'workdir; --guidance=W then gives D_guide + W (D - D_guide) '
                              'instead of CFG.'),
          flags.DEFINE_string('guide_ema', '', "The guide's weights ('' = its first EMA, "
                              "'params' = raw)."),
          flags.DEFINE_integer('guide_step', -1, "The guide's checkpoint step (-1 = newest).",
                               lower_bound=-1))


def use_guide(exp, guide_flags) -> None:
  """Experiment.use_guide with the values of define_guide_flags' flags, if one is given."""
  workdir, ema, step = (f.value for f in guide_flags)
  if workdir:
    exp.use_guide(workdir, ema, step, field='--guide_workdir')


def _parse_flags(argv):
  """Flag parsing that reports a bad --config.x override in one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{e} (--helpfull lists the flags).')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = e.args[0] if e.args else str(e)
    msg = str(msg).replace('\\n', ' ').replace('\n', ' ').replace('\\', '').strip("'\"")
    bad = [a for a in argv[1:] if a.startswith('--config.')]
    _fail(f'invalid config override ({msg}). Overrides given: {" ".join(bad) or "none"}. '
          'Field names are those of the recipe file (see scm_jax/config.py).')


def _fail(msg: str):
  print(f'error: {msg}', file=sys.stderr)
  sys.exit(2)
