"""Lowering a run's programs for GPUs and TPUs on a machine that has neither.

jax.export lowers a jitted function for any platform from any host: the platform's
lowering rules run (Pallas kernels become Triton kernels for CUDA and Mosaic kernels
for TPU, a primitive without a rule for the platform fails), nothing is compiled or
run. `check` lowers the real sharded train step (`Experiment.jit_step` with its state,
batch and teacher shardings, over the run's mesh of host devices), the sharded
2-step sampler of `Experiment.sample` and the portable generator of scm_jax.export,
for each platform. Not covered: XLA's own compilation for the device (its errors and
memory) and cuDNN attention, which the CUDA build of jaxlib alone lowers (on a CPU host
the attention forward is XLA's, as it would be for fp32 on a GPU).

Data are synthetic (shapes only); an sCD teacher is the student's architecture with
abstract weights. `python -m scm_jax.check_lowering` is the command line.
"""

import dataclasses
import re
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export

from scm_jax import data as data_lib
from scm_jax import models as models_lib
from scm_jax.core import teachers
from scm_jax.infra import sharding as sharding_lib
from scm_jax.train import experiment as experiment_lib
from scm_jax.train import memory

PROGRAMS = ('train_step', 'sampler', 'generator')
# Custom calls of the Pallas kernels on each platform (jax.export refuses the Triton
# one unless told: its kernels are not guaranteed stable across jaxlib versions).
KERNEL_CALLS = {'cuda': '__gpu$xla.gpu.triton', 'tpu': 'tpu_custom_call'}
_DISABLED = (export.DisabledSafetyCheck.custom_call(KERNEL_CALLS['cuda']),)


def synthetic_experiment(config: ml_collections.ConfigDict, *, abstract_teacher: bool = True,
                         devices=None) -> experiment_lib.Experiment:
  """The Experiment of `config` on synthetic data (data.expected_shape, else the data
  source's shape); an sCD teacher is a same-architecture model with random weights, or
  only their shapes (`abstract_teacher`: enough to lower, nothing allocated)."""
  shape = memory.data_shape_of(config)
  classes = int(config.model.get('num_classes', 0))
  rng = np.random.RandomState(0)
  n = max(2 * config.train.batch_size, 16)
  source = data_lib.ArraySource(0.5 * rng.randn(n, *shape).astype(np.float32),
                                rng.randint(0, max(classes, 1), n), num_classes=classes,
                                name='synthetic')
  kwargs = {}
  if config.loss.kind in ('scd', 'scd_vsd'):
    model = models_lib.build_model(config.model)
    x, t = jnp.zeros((1,) + shape), jnp.ones((1,))
    labels = jnp.zeros((1,), jnp.int32) if classes else None
    init = lambda k: model.init(k, x, t, labels)['params']
    params = (jax.eval_shape(init, jax.random.key(1)) if abstract_teacher
              else jax.jit(init)(jax.random.key(1)))
    F = teachers.from_flax_model(model, config.teacher.get('guidance', 1.0))
    kwargs['dxdt_fn'] = teachers.make_dxdt_fn(F, params, config.trigflow.sigma_d)
  return experiment_lib.Experiment(config, source=source, devices=devices, **kwargs)


def batch_spec(exp: experiment_lib.Experiment, batch: int) -> dict:
  """The global training batch as ShapeDtypeStructs, split like the real one."""
  sh = sharding_lib.batch_sharding(exp.mesh)
  spec = {'x': jax.ShapeDtypeStruct((batch,) + exp.data_shape, jnp.float32, sharding=sh)}
  if exp.num_classes:
    spec['label'] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sh)
  return spec


def teacher_spec(exp: experiment_lib.Experiment) -> tuple:
  """The step's teacher argument as the teacher itself (abstract weights stay shapes)."""
  drift = exp.teacher.dxdt_fn
  return (drift,) if teachers.has_params(drift) else ()


def custom_calls(exported: export.Exported) -> set:
  return set(re.findall(r'custom_call @([\w$.]+)', exported.mlir_module()))


@dataclasses.dataclass
class Result:
  program: str
  platform: str
  ok: bool
  seconds: float
  devices: int = 0
  custom_calls: tuple = ()
  error: str = ''

  @property
  def kernels(self) -> bool:
    """Whether the platform's Pallas kernels are in the program."""
    return KERNEL_CALLS.get(self.platform, '-') in self.custom_calls


def _programs(exp, num: int) -> dict:
  """{name: (jitted function, abstract arguments)} of `check`."""
  from scm_jax.export import build   # pylint: disable=import-outside-toplevel
  c = exp.config
  labels = jax.ShapeDtypeStruct((num,), jnp.int32) if exp.num_classes else None
  method = 'consistency' if exp.is_consistency_model else 'ode'
  steps = max(c.loss.get('segments', 1), 2) if method == 'consistency' else 2
  guidance = exp.default_guidance(method, steps)
  sampler = exp._sampler(num, method, steps, guidance, c.sample.ode_solver)  # pylint: disable=protected-access
  params = exp.abstract_state.params
  return {
      'train_step': lambda p: export.export(exp.jit_step, platforms=(p,),
                                            disabled_checks=_DISABLED)(
          exp.abstract_state, batch_spec(exp, c.train.batch_size), *teacher_spec(exp)),
      'sampler': lambda p: export.export(sampler, platforms=(p,))(
          params, jax.ShapeDtypeStruct((2,), jnp.uint32), labels),
      'generator': lambda p: build.export_generator(
          exp, params, method=method, steps=steps, platforms=(p,)).exported,
  }


def check(exp: experiment_lib.Experiment, platforms: Sequence[str] = ('cuda', 'tpu'),
          programs: Sequence[str] = PROGRAMS, num_samples: Optional[int] = None) -> list:
  """Lowers `programs` of `exp` for each platform; a Result per (program, platform).

  train_step: `exp.jit_step` at config.train.batch_size; sampler: the jitted sampler
  of `exp.sample` (2 steps; the PF-ODE for diffusion models) for `num_samples` (default
  the mesh size: split over it); generator: scm_jax.export's program (one device,
  symbolic batch). Failures are recorded, not raised.
  """
  lower = _programs(exp, num_samples or exp.mesh.size)
  results = []
  for name in programs:
    for platform in platforms:
      t0 = time.perf_counter()
      try:
        exported = lower[name](platform)
        results.append(Result(name, platform, True, time.perf_counter() - t0,
                              exported.nr_devices, tuple(sorted(custom_calls(exported)))))
      except Exception as e:  # pylint: disable=broad-except
        first = ' '.join(str(e).split())[:400]
        results.append(Result(name, platform, False, time.perf_counter() - t0,
                              error=f'{type(e).__name__}: {first}'))
  return results


def format_results(results: list) -> str:
  lines = ['| program | platform | lowered | devices | Pallas kernels | seconds |',
           '|---|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r.program} | {r.platform} | {"yes" if r.ok else "NO"} | '
                 f'{r.devices or ""} | {"yes" if r.kernels else "no"} | {r.seconds:.1f} |')
  for r in results:
    if not r.ok:
      lines.append(f'{r.program} for {r.platform}: {r.error}')
  return '\n'.join(lines)
