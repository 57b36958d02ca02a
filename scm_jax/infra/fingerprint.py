"""What makes a checkpoint trustworthy: checksums of its arrays, of its meta and of its
data position (the rule that a meta belongs to its directory is infra/formats.py's).

The array checksum is independent of the sharding (it is computed by one jitted pass over
the state, whatever the mesh); the meta and data digests are sha256 of their JSON.
"""

import hashlib
import json
import jax
import jax.numpy as jnp


def meta_digest(meta: dict) -> str:
  """sha256 of the meta's canonical JSON, its own 'digest' field excluded."""
  body = {k: v for k, v in meta.items() if k != 'digest'}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def data_digest(state: bytes) -> str:
  """sha256 of one process's saved data-stream position."""
  return hashlib.sha256(state).hexdigest()


def state_fingerprint(state) -> tuple[list[int], bool]:
  """(one uint32 checksum per leaf, whether every float leaf is finite).

  The checksum is sum_i bits(x_i) * (2 i + 1) mod 2^32 over the raw bits of each leaf:
  any single changed word changes it (the weights are odd, hence invertible mod 2^32),
  and modular addition makes it independent of the sharding and reduction order. It is
  one jitted pass over the state, so it works for arrays spread over many processes.
  """
  sums, finite = _fingerprint_jit(state)
  return [int(v) for v in jax.device_get(sums)], bool(finite)


def _fingerprint(state):
  sums, finite = [], []
  for x in jax.tree.leaves(state):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
      finite.append(jnp.all(jnp.isfinite(x)))
    if x.dtype == jnp.bool_:
      words = x.astype(jnp.uint32)
    else:
      width = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
      words = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, words.size).reshape(words.shape)
    sums.append(jnp.sum(words * (2 * index + 1), dtype=jnp.uint32))
  return (jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32),
          jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True))


_fingerprint_jit = jax.jit(_fingerprint)
