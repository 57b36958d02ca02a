"""Device mesh, parameter sharding rules and batch placement.

The mesh has axes ('data', 'fsdp', 'tensor'); the batch is split over 'data' and 'fsdp'
(FSDP is data parallel with sharded parameters); 'tensor' (size 1 unless
config.mesh.tensor > 1) splits weights Megatron-style where config.sharding.rules say so
and every device of a tensor group sees the same batch rows. Parameter placement is data, not code: `config.sharding.rules`
maps regexes on the pytree path to a PartitionSpec; unmatched leaves follow the strategy
('replicate', or 'fsdp': shard the largest dimension divisible by the fsdp axis size).
The same model code then runs on one device or a pod.
"""

import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scm_jax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
STRATEGIES = ('replicate', 'fsdp')  # config.sharding.strategy for leaves no rule matches


def check_mesh_config(mesh_config) -> dict[str, int]:
  """{axis: size} of config.mesh; ConfigError unless every size is >= 1 or -1 (= all
  remaining devices) and at most one is -1."""
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
    raise ConfigError(f'config.mesh {sizes}: sizes must be >= 1, and at most one may be -1 '
                      '(= all remaining devices).')
  return sizes


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one of them may be -1 = all remaining devices."""
  sizes = check_mesh_config(mesh_config)
  free = [a for a, v in sizes.items() if v == -1]
  if free:
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if num_devices % fixed:
      raise ConfigError(f'config.mesh {sizes}: the fixed axes ({fixed} devices) do not divide '
                        f'the {num_devices} devices; choose divisors of the device count.')
    sizes[free[0]] = num_devices // fixed
  total = int(np.prod(list(sizes.values())))
  if total != num_devices:
    raise ConfigError(f'config.mesh {sizes} uses {total} devices, but {num_devices} are '
                      'available; set config.mesh.data=-1 to use them all.')
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh (see `mesh_shape`).

  Devices keep jax.devices() order (grouped by process), so each process's devices
  hold a contiguous run of batch rows, matching the data stream's per-process batches;
  'tensor' is the fastest-varying axis (neighbouring devices, e.g. one NVLink node).
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def activation_mesh(mesh: Mesh):
  """Context under which models constrain activations along the batch
  (models.layers.constrain_batch); used while tracing the train step."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis; other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path) -> str:
  """'params/Dense_0/kernel' for a jax.tree_util key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest divisible dimension: spreads the most memory with the fewest gathers.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def leaf_spec(path: str, shape, mesh: Mesh, sharding_config) -> P:
  """PartitionSpec for one leaf: the first matching rule, else the strategy."""
  for pattern, spec in sharding_config.rules:
    if re.search(pattern, path):
      spec = tuple(spec)
      if len(spec) != len(shape):
        raise ConfigError(f'sharding rule {pattern!r} gives {spec} for {path} of shape '
                          f'{tuple(shape)}: one entry per dimension is needed.')
      for dim, axis in zip(shape, spec):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        if dim % size:
          raise ConfigError(f'sharding rule {pattern!r}: {path} dim {dim} is not divisible '
                            f'by mesh axis {axis} of size {size}.')
      return P(*spec)
  if sharding_config.strategy == 'fsdp':
    return _fsdp_spec(shape, mesh.shape['fsdp'], sharding_config.fsdp_min_size)
  if sharding_config.strategy == 'replicate':
    return P()
  raise ConfigError(f'config.sharding.strategy={sharding_config.strategy!r} is unknown; '
                    f'choose one of {STRATEGIES}.')


def tree_shardings(tree, mesh: Mesh, sharding_config) -> Any:
  """NamedSharding for every leaf of a (possibly abstract) pytree such as a TrainState.

  Optimizer moments have the same paths as the parameters plus a prefix, so a rule
  written for a parameter (`re.search`) also places its Adam moments.
  """
  def one(path, leaf):
    shape = getattr(leaf, 'shape', ())
    return NamedSharding(mesh, leaf_spec(path_str(path), shape, mesh, sharding_config))
  return jax.tree_util.tree_map_with_path(one, tree)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays split along the batch axis.

  Each process passes only its own rows (data/pipeline.py loads them);
  the global batch is their concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  """ConfigError unless the batch splits evenly over the mesh's batch axes (the split
  over processes is the data pipeline's rule: data.per_process_batch)."""
  n = mesh.shape['data'] * mesh.shape['fsdp']
  if global_batch % n:
    raise ConfigError(f'config.train.batch_size={global_batch} is not divisible by the '
                      f'{n} devices of the mesh; use a multiple of {n}.')
