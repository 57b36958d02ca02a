"""Ablation sweeps: lists of config overrides, built from grids and unions.

A sweep file (`configs/sweeps/*.py`) defines `get_sweep()` returning (or yielding) dicts
that map dotted config fields to values, e.g.

    def get_sweep():
      return sweep.chain(
          sweep.grid({'loss.tangent_norm': [True, False], 'loss.adaptive_weight': [True, False]}),
          sweep.grid({'model.time_embed_scale': [1.0, 1000.0]}))

and may set `BASE = 'configs/toy2d_sct.py'` (the default for --base). `launch/sweep.py`
turns each point into one training job with its own workdir; `scm_jax/report.py` gathers
their results. No I/O besides loading the sweep / recipe files.
"""

import importlib.util
import itertools
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import ml_collections

from scm_jax import config as config_lib
from scm_jax.errors import ConfigError

Point = dict  # {'loss.tangent_norm': False, ...}


def grid(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
  """Cartesian product of the axes, the first axis varying slowest."""
  for k, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise ConfigError(f'sweep axis {k!r} must be a non-empty list of values, got {values!r}.')
  keys = list(axes)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def chain(*sweeps: Iterable[Point]) -> list[Point]:
  """Union of sweeps in order; a point listed twice is kept once."""
  out, seen = [], set()
  for s in sweeps:
    for p in s:
      key = tuple(sorted((k, repr(v)) for k, v in p.items()))
      if key not in seen:
        seen.add(key)
        out.append(dict(p))
  return out


def fixed(common: Mapping[str, Any], sweep: Iterable[Point]) -> list[Point]:
  """Adds the same overrides to every point (a point's own value wins)."""
  return [{**common, **p} for p in sweep]


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise ConfigError(f'{what} file {path!r} does not exist.')
  spec = importlib.util.spec_from_file_location(
      f'_scm_{what}_' + re.sub(r'\W', '_', os.path.basename(path)[:-3]), path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'could not load {what} file {path!r}: {type(e).__name__}: {e}') from e
  return module


def load_sweep(path: str) -> tuple[list[Point], Optional[str]]:
  """(points, default base recipe or None) from a sweep file with get_sweep()."""
  module = _load_module(path, 'sweep')
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'sweep file {path!r} defines no get_sweep(); it must return a list '
                      'of {"section.field": value} dicts (see scm_jax/sweep.py).')
  points = list(module.get_sweep())
  if not points:
    raise ConfigError(f'sweep file {path!r} produced no points.')
  for p in points:
    if not isinstance(p, Mapping):
      raise ConfigError(f'sweep file {path!r}: every point must be a dict, got {p!r}.')
  return [dict(p) for p in points], getattr(module, 'BASE', None)


def load_recipe(path: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a recipe file (configs/*.py with get_config())."""
  module = _load_module(path, 'config')
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config().')
  return module.get_config()


def point_config(recipe: ml_collections.ConfigDict, point: Mapping[str, Any]):
  """A copy of the recipe with the point's overrides set (unknown fields raise
  ConfigError); values are validated where the config is used (`validate_config`)."""
  return config_lib.apply_overrides(ml_collections.ConfigDict(recipe.to_dict()), point)


def varying_keys(points: Sequence[Point]) -> list[str]:
  """The fields whose value differs between points (the columns worth showing)."""
  keys = []
  for p in points:
    keys += [k for k in p if k not in keys]
  return [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]


# Short names of common fields in point names (others use their last component).
SHORT_NAMES = {'time_embed_scale': 'tscale', 'time_embed_kind': 'temb', 'fourier_scale': 'fscale',
               'tangent_norm': 'tnorm', 'tangent_warmup_steps': 'warmup',
               'adaptive_weight': 'adaptive', 'num_steps': 'steps'}


def _short(value: Any) -> str:
  if isinstance(value, bool):
    return 'on' if value else 'off'
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return '-'.join(_short(v) for v in value)
  return str(value)


def point_name(index: int, point: Point, keys: Sequence[str]) -> str:
  """A directory-safe, readable name: p03_tnorm-off_tscale-1000."""
  parts = []
  for k in keys:
    if k in point:
      leaf = k.split('.')[-1]
      parts.append(f'{SHORT_NAMES.get(leaf, leaf)}-{_short(point[k])}')
  name = '_'.join([f'p{index:02d}'] + parts)
  return re.sub(r'[^A-Za-z0-9_.=-]', '', name)[:120]


def flag_value(value: Any) -> str:
  """A value as ml_collections' config_flags parses it on the command line."""
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(flag_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  if isinstance(value, str):
    return value
  return repr(value)


def override_flags(point: Point) -> list[str]:
  """['--config.loss.tangent_norm=False', ...] for the training CLI."""
  return [f'--config.{k}={flag_value(v)}' for k, v in point.items()]
