"""Exporting an Experiment's sampler with jax.export (the writing side of artifact.py).

The program is `Experiment.sampler_fn`, the function `Experiment.sample` jits, taking
its noise as an argument instead of drawing it from a key; the weights are its first
argument (artifact.py says why they are not baked in). The batch dimension is symbolic
(`jax.export.symbolic_shape`) unless a fixed batch is asked for; the classifier-free
guidance scale of CFG is a constant of the program (it decides between one and two
network evaluations per step), the input s of a guidance-conditioned student is an
argument.
"""

import dataclasses
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

import scm_jax
from scm_jax.core import sampling
from scm_jax.errors import ConfigError
from scm_jax.export import artifact
from scm_jax.infra import files
from scm_jax.models import kernels

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


@dataclasses.dataclass
class ExportedGenerator:
  """An exported sampler before it is written: the program, its weights, metadata."""
  exported: export.Exported
  weights: list
  metadata: dict

  def save(self, path: str) -> int:
    """Writes the artifact atomically; returns its size in bytes."""
    with files.atomic_path(path) as tmp:
      with open(tmp, 'wb') as f:
        artifact.write(f, self.exported.serialize(),
                       [np.asarray(jax.device_get(w)) for w in self.weights], self.metadata)
        f.flush()
        os.fsync(f.fileno())
    return os.path.getsize(path)

  def generator(self, device=None) -> artifact.Generator:
    """The artifact's Generator without a file: the program after a serialization
    round trip, the weights as they are (benchmarks of large models)."""
    program = export.deserialize(bytearray(self.exported.serialize()))
    return artifact.Generator(program, self.metadata, self.weights, device)


def check_platforms(platforms: Sequence[str]) -> tuple:
  platforms = tuple(p.strip().lower() for p in platforms if p.strip())
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ConfigError(f'--platforms={",".join(platforms)}: choose among {",".join(PLATFORMS)} '
                      '(comma-separated).')
  return tuple(dict.fromkeys(platforms))


def export_generator(exp, params, *, method: str = 'consistency', steps: int = 2,
                     batch: int = 0, platforms: Sequence[str] = ('cpu',),
                     guidance: Optional[float] = None, solver: Optional[str] = None,
                     info: Optional[dict] = None) -> ExportedGenerator:
  """jax.export of `exp`'s sampler with `params` as its weights.

  Args:
    exp: the Experiment (e.g. from `load_experiment`).
    params: the weights to sample with (a parameter pytree).
    method: 'consistency' or 'ode' (the PF-ODE of a diffusion model, `steps` steps of
      `solver`, default config.sample.ode_solver).
    steps: sampling steps.
    batch: a fixed batch size; 0 = a symbolic batch dimension.
    platforms: jax.export platforms ('cpu', 'cuda', 'rocm', 'tpu').
    guidance: CFG scale (fixed) or the default of a guidance input; default
      `exp.default_guidance`.
    info: extra metadata (workdir, checkpoint step, EMA name).

  Returns:
    The ExportedGenerator; `.save(path)` writes it.
  """
  c = exp.config
  solver = solver or c.sample.ode_solver
  guidance = float(exp.default_guidance(method, steps) if guidance is None else guidance)
  guidance_input = bool(exp.num_classes and getattr(exp.model, 'guidance_embed', False))
  platforms = check_platforms(platforms)
  run = exp.sampler_fn(method, steps, guidance, solver)
  leaves, treedef = jax.tree.flatten(params)

  def generate(weights, noise, *extra):
    labels = extra[0] if exp.num_classes else None
    return run(jax.tree.unflatten(treedef, weights), noise, labels,
               extra[-1] if guidance_input else None)

  b = export.symbolic_shape('b')[0] if batch == 0 else batch
  n = exp.noise_count(method, steps)
  args = [[jax.ShapeDtypeStruct(w.shape, w.dtype) for w in leaves],
          jax.ShapeDtypeStruct((n, b) + exp.data_shape, jnp.float32)]
  if exp.num_classes:
    args.append(jax.ShapeDtypeStruct((b,), jnp.int32))
  if guidance_input:
    args.append(jax.ShapeDtypeStruct((b,), jnp.float32))
  try:
    with kernels.portable_kernels():
      exported = export.export(jax.jit(generate), platforms=platforms)(*args)
  except Exception as e:  # pylint: disable=broad-except
    if batch:
      raise
    first = str(e).strip().split('\n')[0][:300]
    raise ConfigError(f'model {c.model.name!r} cannot be exported with a symbolic batch '
                      f'({type(e).__name__}: {first}); pass --batch=B for a fixed '
                      'batch.') from e
  sd = float(c.trigflow.sigma_d)
  sigma_max = float(c.sample.get('sigma_max', sampling.DEFAULT_SIGMA_MAX))
  t_max = sampling.t_max(sd, sigma_max)
  meta = {
      'method': method, 'steps': int(steps), 'solver': solver if method == 'ode' else None,
      'segments': int(c.loss.get('segments', 1)), 'sigma_d': sd, 'sigma_max': sigma_max,
      't_max': t_max,
      'times': (list(sampling.consistency_times(steps, c.sample.t_mid, t_start=t_max))
                if method == 'consistency' and c.loss.get('segments', 1) == 1 else None),
      'ode_schedule': c.sample.ode_schedule if method == 'ode' else None,
      'nfe': (steps if method == 'consistency' else sampling.pf_ode_nfe(steps, solver))
             * exp.evaluations_per_step(guidance if not guidance_input else 1.0),
      'data_shape': list(exp.data_shape), 'noise_shape': [n, batch or None, *exp.data_shape],
      'batch': batch or None, 'num_classes': exp.num_classes, 'guidance': guidance,
      'guidance_input': guidance_input, 'platforms': list(exported.platforms),
      'model': c.model.name, 'model_dtype': str(c.model.get('dtype', 'float32')),
      'attn_impl': c.model.get('attn_impl'), 'data': c.data.name,
      # Latent models: the samples are latents, to decode with this VAE.
      'vae': (c.get('vae') or {}).get('path') or None,
      'num_params': int(sum(math.prod(w.shape) for w in leaves)),
      'jax_version': jax.__version__, 'scm_jax_version': scm_jax.__version__,
      'created': time.strftime('%Y-%m-%d %H:%M:%S'), **(info or {}),
  }
  return ExportedGenerator(exported, leaves, meta)
