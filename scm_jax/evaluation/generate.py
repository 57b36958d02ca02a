"""The two sets an evaluation compares: model samples drawn in mesh-sharded batches,
and reference examples of a data split.

Sample batch b uses key fold_in(PRNGKey(seed), b), so a sample set is reproducible and
each batch is generated on all devices at once (`Experiment.sample` places its output
split over the mesh).
"""

from typing import Iterator, NamedTuple, Optional

import jax
import numpy as np

from scm_jax.core import sampling
from scm_jax.errors import ConfigError


def reference_data(data_config, split: str, num: int = 0, seed: int = 0) -> np.ndarray:
  """`num` examples of `split` (all of it when num <= 0 or num >= its size): a seeded
  random subset in index order, read in chunks. The same arguments give the same set."""
  from scm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  source = data_lib.build_source(data_config, split)
  n = len(source) if num <= 0 else min(num, len(source))
  idx = np.sort(np.random.default_rng(seed).permutation(len(source))[:n])
  return np.concatenate([source.get(idx[i:i + 1000])['x'] for i in range(0, n, 1000)])


class Sampler(NamedTuple):
  """One way to sample: consistency steps, or the PF-ODE with `solver` and `steps`."""
  method: str   # 'consistency' | 'ode'
  steps: int
  solver: str = ''

  @property
  def nfe(self) -> int:
    return self.steps if self.method == 'consistency' else sampling.pf_ode_nfe(self.steps, self.solver)

  @property
  def name(self) -> str:
    return f'{self.steps}step' if self.method == 'consistency' else f'{self.solver}{self.steps}'


def samplers_for(is_consistency_model: bool, steps, solver: str) -> list[Sampler]:
  """Consistency models: `steps`-step consistency sampling; diffusion models: PF-ODE."""
  if any(int(s) < 1 for s in steps):
    raise ConfigError(f'--steps entries must be >= 1, got {list(steps)}.')
  if is_consistency_model:
    return [Sampler('consistency', int(s)) for s in steps]
  return [Sampler('ode', int(s), solver) for s in steps]


def sample_batches(exp, params, num: int, batch_size: int, sampler: Sampler, seed: int = 0,
                   guidance: float = 1.0) -> Iterator[tuple[np.ndarray, Optional[np.ndarray]]]:
  """An iterator of (samples, labels or None) batches, `num` samples in all.

  Conditional models get labels cycling over the classes (global index % num_classes).
  Bad sizes raise ConfigError here, before anything is sampled.
  """
  n_dev = exp.mesh.size
  if num < 1:
    raise ConfigError(f'--num must be >= 1, got {num}.')
  if batch_size < 1 or batch_size % n_dev:
    raise ConfigError(f'--batch_size={batch_size} must be a positive multiple of the {n_dev} '
                      'devices.')

  def batches():
    key = jax.random.PRNGKey(seed)
    for b, start in enumerate(range(0, num, batch_size)):
      labels = None
      if exp.num_classes:
        labels = (np.arange(start, start + batch_size) % exp.num_classes).astype(np.int32)
      x = exp.sample(params, batch_size, sampler.steps, key=jax.random.fold_in(key, b),
                     labels=labels, method=sampler.method, guidance=guidance,
                     solver=sampler.solver or None)
      n = min(batch_size, num - start)
      yield x[:n], None if labels is None else labels[:n]
  return batches()
