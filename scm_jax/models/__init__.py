"""Model registry: config -> flax.linen.Module.

Every model maps (x / sigma_d [B, ...], TrigFlow time t [B], labels [B] or None)
to (F [B, ...] float32, logvar [B] float32); see `MLP`, `UNet` and `DiT`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import ml_collections

from scm_jax.errors import ConfigError
from scm_jax.models.dit import DiT
from scm_jax.models.edm2 import EDM2
from scm_jax.models.mlp import MLP
from scm_jax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {'mlp': MLP, 'unet': UNet, 'dit': DiT, 'edm2': EDM2}


def _model_class(name: str) -> type[nn.Module]:
  if name not in MODELS:
    raise ConfigError(
        f'Unknown model.name={name!r}; available models: {sorted(MODELS)}.')
  return MODELS[name]


def model_fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
  """The config-settable fields of a model class (Flax's parent/name excluded)."""
  return {f.name: f for f in dataclasses.fields(cls)
          if f.init and f.name not in ('parent', 'name')}


def _as_hashable(value: Any) -> Any:
  # Config values may arrive as lists (YAML, command line); Flax fields are tuples.
  if isinstance(value, list):
    return tuple(_as_hashable(v) for v in value)
  return value


def check_model_config(model_config: Mapping[str, Any]) -> tuple[type[nn.Module], dict]:
  """(model class, its field values) of a model config; ConfigError for an unknown name
  or field. Field values are checked when the model is built (its __post_init__)."""
  config = (model_config.to_dict()
            if isinstance(model_config, ml_collections.ConfigDict)
            else dict(model_config))
  if 'name' not in config:
    raise ConfigError(
        f'model config has no `name`; set model.name to one of {sorted(MODELS)}.')
  name = config.pop('name')
  cls = _model_class(name)
  fields = model_fields(cls)
  for key in config:
    if key not in fields:
      raise ConfigError(
          f'Unknown key model.{key} for model {name!r}; valid keys are: '
          f'{", ".join(fields)}.')
  return cls, {k: _as_hashable(v) for k, v in config.items()}


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
  """Builds the model named `model_config.name`; other keys are its fields."""
  cls, fields = check_model_config(model_config)
  return cls(**fields)


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """Every field of model `name` with its default, plus `name` itself."""
  fields = model_fields(_model_class(name))
  config = ml_collections.ConfigDict({'name': name})
  for key, field in fields.items():
    config[key] = field.default
  return config


__all__ = ['MODELS', 'DiT', 'EDM2', 'MLP', 'UNet', 'build_model', 'check_model_config',
           'default_model_config', 'model_fields']
