"""What a run is made of, each part built once: data source, model, mesh, optimizer,
abstract state, teacher, jitted train step and samplers. No I/O besides reading data
(and a teacher's checkpoint), so notebooks can use it without the CLI:

    exp = Experiment(config)
    state = exp.init_state()
    state, history = exp.train(state, num_steps=500)
    x = exp.sample(state, num=256, steps=2)

`load_experiment(workdir)` rebuilds the Experiment of a trained workdir and its state.
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scm_jax import config as config_lib
from scm_jax import data as data_lib
from scm_jax import models as models_lib
from scm_jax.core import losses
from scm_jax.core import sampling
from scm_jax.core import teachers
from scm_jax.errors import ConfigError
from scm_jax.infra import sharding as sharding_lib
from scm_jax.train import state as state_lib
from scm_jax.train import step as step_lib
from scm_jax.train import teacher as teacher_lib
from scm_jax.train import workdir as workdir_lib


class Experiment:
  """Everything needed to train and sample one configuration.

  `dxdt_fn` (an sCD teacher drift, e.g. from `core.teachers`) and `init_params` (the
  student's initial weights) override what `config.teacher` would load; without them
  the teacher is resolved once, on first use (sampling never needs it).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, source=None, devices=None,
               dxdt_fn=None, init_params=None):
    config_lib.validate_config(config)
    self.config = config
    self.source = source if source is not None else data_lib.build_source(
        config.data, config.data.split)
    self.data_shape = tuple(self.source.shape)
    self.model = models_lib.build_model(config.model)
    self.num_classes = int(getattr(self.model, 'num_classes', 0))
    self._check_classes()
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    sharding_lib.check_batch_divisible(config.train.batch_size, self.mesh)
    step_lib.microbatch_size(config.train.batch_size, step_lib.batch_shards(self.mesh),
                             config.train.get('microbatches', 1))
    self.tx = state_lib.make_optimizer(config)
    abstract = self._abstract_state()
    self.state_shardings = sharding_lib.tree_shardings(abstract, self.mesh, config.sharding)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)
    if dxdt_fn is not None or init_params is not None:
      self.teacher = teacher_lib.Teacher(dxdt_fn, init_params)  # fills the cached property
    self.guide = None  # a guiding network of the PF-ODE samples (use_guide)
    self._samplers = {}

  @property
  def is_consistency_model(self) -> bool:
    return self.config.loss.kind in losses.CONSISTENCY_KINDS

  def _check_classes(self) -> None:
    name = self.source.name
    if self.num_classes and not self.source.num_classes:
      raise ConfigError(f'config.model.num_classes={self.num_classes} but the data source '
                        f'{name!r} has no labels; set model.num_classes=0.')
    if self.num_classes and self.num_classes != self.source.num_classes:
      raise ConfigError(f'config.model.num_classes={self.num_classes} but the data source '
                        f'{name!r} has {self.source.num_classes} classes.')

  def _init(self, key, params=None, aux_params=None):
    if params is not None and getattr(self.model, 'guidance_embed', False):
      # A guidance-conditioned student from its teacher: only the guidance embedding is
      # new (zero-initialized, so the student starts as the teacher).
      params = teacher_lib.merge_params(
          state_lib.init_params(self.model, self.data_shape, key), params)
    return state_lib.create_train_state(self.config, self.model, self.data_shape, key,
                                        self.tx, params, aux_params)

  def _abstract_state(self):
    """The TrainState's shapes; also catches a model that cannot take the data (e.g.
    an MLP on images) before a cryptic XLA error."""
    try:
      return jax.eval_shape(self._init, jax.random.PRNGKey(0))
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'model {self.config.model.name!r} cannot take data of shape '
                        f'{self.data_shape} from {self.source.name!r}: {e}') from e

  @functools.cached_property
  def teacher(self) -> teacher_lib.Teacher:
    """The sCD drift and initial weights of config.teacher (resolved once)."""
    return teacher_lib.resolve(self.config, self.data_shape, self.abstract_state.params)

  @functools.cached_property
  def _teacher_shardings(self):
    """Placement of a teacher with weights: a jit argument sharded like parameters."""
    if not teachers.has_params(self.teacher.dxdt_fn):
      return None
    return sharding_lib.tree_shardings(self.teacher.dxdt_fn, self.mesh, self.config.sharding)

  @functools.cached_property
  def teacher_args(self) -> tuple:
    """Extra arguments of `jit_step`: the teacher drift with its weights, if any (not a
    constant baked into the program)."""
    if self._teacher_shardings is None:
      return ()
    return (jax.device_put(self.teacher.dxdt_fn, self._teacher_shardings),)

  @functools.cached_property
  def jit_step(self) -> Callable:
    """The jitted, sharded train step: jit_step(state, global batch, *teacher_args)."""
    train_step = step_lib.make_train_step(self.config, self.model, self.tx,
                                          self.teacher.dxdt_fn)
    return step_lib.jit_train_step(train_step, self.state_shardings, self.mesh,
                                   self._teacher_shardings)

  def init_state(self, seed: Optional[int] = None) -> state_lib.TrainState:
    """A fresh TrainState (from the teacher's weights when config.teacher says so)."""
    seed = self.config.seed if seed is None else seed
    # Given params (e.g. a teacher's, on its own mesh) are placed like the state's and
    # passed as an argument, not baked into the program as constants.
    params, aux = self.teacher.init_params, self.teacher.aux_init
    if params is not None:
      params = jax.device_put(params, teacher_lib.restrict(self.state_shardings.params, params))
    if aux is not None:  # scd_vsd: F_phi from the teacher
      phi_shardings, _ = state_lib.vsd_parts(self.config, self.state_shardings.aux_params)
      aux = jax.device_put(aux, phi_shardings)
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.PRNGKey(seed), params, aux)

  def data_stream(self, prefetch: Optional[int] = None) -> data_lib.BatchStream:
    """A new training batch stream of this process, from the start (data/pipeline.py).

    Its position is its grain state (`get_state`), saved with every checkpoint.
    """
    c = self.config
    return data_lib.make_stream(
        self.source, c.train.batch_size, c.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), worker_count=c.data.worker_count,
        prefetch=c.data.prefetch if prefetch is None else prefetch)

  @functools.cached_property
  def stream(self) -> data_lib.BatchStream:
    """The run's own batch stream (built once): `train` and the loop continue it."""
    return self.data_stream()

  def step(self, state, batch):
    """One training step on a host-local numpy batch."""
    return self.jit_step(state, sharding_lib.put_batch(batch, self.mesh), *self.teacher_args)

  def train(self, state, num_steps: int, stream=None, callback: Callable = None):
    """Runs num_steps steps on `stream` (default: the run's own, continued from where
    the last call left it); returns (state, list of per-step host metrics)."""
    stream = stream if stream is not None else self.stream
    history = []
    for _ in range(num_steps):
      state, metrics = self.step(state, next(stream))
      history.append(metrics)
      if callback is not None:
        callback(state, metrics)
    return state, [jax.device_get(m) for m in history]

  # ------------------------------------------------------------------ sampling

  def use_guide(self, workdir: str, ema: str = '', step: int = -1,
                field: str = 'guide_workdir') -> 'Experiment':
    """Guides this diffusion model's PF-ODE samples by the guiding network in `workdir`
    (its `ema` weights at checkpoint `step`, -1 = newest) instead of by CFG: EDM2's
    D_guide + w (D - D_guide), w = the sampler's guidance (see
    core.teachers.guided_by_network). Returns self."""
    if self.config.loss.kind != 'diffusion':
      raise ConfigError(f'{field}: a guiding network guides a diffusion model, this run has '
                        f'loss.kind={self.config.loss.kind!r} (to distill a guided teacher: '
                        '--config.teacher.guide_workdir).')
    guide = teacher_lib.load_guide(workdir, ema, step, self.config, self.data_shape, field)
    shardings = sharding_lib.tree_shardings(guide.params, self.mesh, self.config.sharding)
    self.guide = teacher_lib.Guide(guide.model, jax.device_put(guide.params, shardings),
                                   guide.conditional)
    self._samplers = {}
    return self

  def F_fn(self, params, labels=None, guidance: float = 1.0, scales=None):
    """F(x_scaled, t) with params and labels bound. guidance != 1: the input s of a
    guidance-conditioned student (one evaluation), else classifier-free guidance on the
    outputs (the null class mixed in, two evaluations; see core.teachers.guided), or with
    a guiding network (`use_guide`; params = {'main': ..., 'guide': ...}) its guidance.
    `scales` (an array, e.g. [B]) replaces the fixed `guidance` at every call."""
    if self.guide is not None:
      F_apply, _ = teacher_lib.guided_teacher(self.model, None, guidance, self.guide)
    else:
      embed = getattr(self.model, 'guidance_embed', False)
      F_apply = teachers.from_flax_model(
          self.model, guidance if labels is not None or embed else 1.0)
    if scales is not None:
      return lambda x, t: F_apply(params, x, t, labels, guidance=scales)
    return lambda x, t: F_apply(params, x, t, labels)

  def evaluations_per_step(self, guidance: float) -> int:
    """Network evaluations per sampler evaluation: 2 with CFG on the outputs or with a
    guiding network (then the second is the guide's)."""
    if guidance == 1.0:
      return 1
    if self.guide is not None:
      return 2
    return 2 if self.num_classes and not getattr(self.model, 'guidance_embed', False) else 1

  def default_guidance(self, method: str, steps: int) -> float:
    """config.sample.guidance for this sampler: one value for all, or one per entry of
    sample.steps (Table 6 guides 1- and 2-step sCD differently; other counts: the last)."""
    c = self.config.sample
    scales = tuple(c.get('guidance', (1.0,)))
    if len(scales) == 1 or method != 'consistency':
      return float(scales[0])
    counts = tuple(c.steps)
    return float(scales[counts.index(steps)] if steps in counts else scales[-1])

  def _fresh_noise_per_step(self, method: str) -> bool:
    return method == 'consistency' and self.config.loss.get('segments', 1) == 1

  def noise_count(self, method: str, steps: int) -> int:
    """Standard-normal draws of shape [B, *data_shape] a sampler takes: one per step of
    consistency sampling, one for the PF-ODE and for multistep (segments) models."""
    return steps if self._fresh_noise_per_step(method) else 1

  def sampling_noise(self, key, num: int, method: str, steps: int) -> jax.Array:
    """The noise `sample` draws from `key`: [noise_count, num, *data_shape]."""
    shape = (num,) + self.data_shape
    if self._fresh_noise_per_step(method):
      return sampling.consistency_noise(key, shape, steps)
    return jax.random.normal(key, shape, jnp.float32)[None]

  def sampler_fn(self, method: str, steps: int, guidance: float = 1.0,
                 solver: str = 'heun') -> Callable:
    """The sampler as a pure function of its noise, run(params, noise, labels=None,
    scales=None) -> samples [B, *data_shape]: noise [noise_count, B, *data_shape]
    standard normal; `scales` [B] the per-example input s of a guidance-conditioned
    student (else `guidance` is fixed). What `sample` jits, and what scm_jax.export
    serializes."""
    c = self.config
    sd = c.trigflow.sigma_d
    segments = c.loss.get('segments', 1)
    if method == 'consistency' and segments > 1 and steps != segments:
      raise ConfigError(f'this model has loss.segments={segments}: it samples in exactly '
                        f'{segments} consistency steps (--steps={segments}), got {steps}.')
    sigma_max = c.sample.get('sigma_max', sampling.DEFAULT_SIGMA_MAX)

    def run(params, noise, labels=None, scales=None):
      F_fn = self.F_fn(params, labels, guidance, scales)
      if method == 'consistency' and segments > 1:
        return sampling.segments_from_noise(F_fn, noise[0], sd, segments)
      if method == 'consistency':
        times = sampling.consistency_times(steps, c.sample.t_mid,
                                           t_start=sampling.t_max(sd, sigma_max))
        return sampling.consistency_from_noise(F_fn, noise, sd, times)
      return sampling.pf_ode_from_noise(F_fn, noise[0], sd, steps, solver,
                                        c.sample.ode_schedule, sigma_max)
    return run

  def _sampler(self, num: int, method: str, steps: int, guidance: float, solver: str):
    cache_key = (num, method, steps, guidance, solver)
    if cache_key not in self._samplers:
      fn = self.sampler_fn(method, steps, guidance, solver)
      run = lambda params, key, labels: fn(
          params, self.sampling_noise(key, num, method, steps), labels)
      # Split the samples over the mesh when they divide evenly (evaluation batches).
      out = sharding_lib.batch_sharding(self.mesh) if num % self.mesh.size == 0 else None
      self._samplers[cache_key] = jax.jit(run, out_shardings=out)
    return self._samplers[cache_key]

  def sample(self, state_or_params, num: int, steps: Optional[int] = None, key=None,
             labels=None, ema: Optional[str] = None, method: Optional[str] = None,
             guidance: Optional[float] = None, solver: Optional[str] = None) -> np.ndarray:
    """Draws `num` samples as numpy. Consistency models default to 2-step sampling
    (multistep ones, loss.segments = M, to their M steps along the segments);
    diffusion models (or method='ode') integrate the PF-ODE with sample.ode_steps
    steps of `solver` (default sample.ode_solver). `guidance` defaults to
    config.sample.guidance (see default_guidance)."""
    c = self.config
    if isinstance(state_or_params, state_lib.TrainState):
      params = state_lib.pick_params(state_or_params, c.sample.ema if ema is None else ema, c)
    else:
      params = state_or_params
    method = method or ('consistency' if self.is_consistency_model else 'ode')
    default = c.loss.get('segments', 1) if c.loss.get('segments', 1) > 1 else 2
    steps = int(steps or (default if method == 'consistency' else c.sample.ode_steps))
    key = jax.random.PRNGKey(c.sample.seed) if key is None else key
    if self.num_classes and labels is None:
      labels = np.arange(num) % self.num_classes
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    solver = solver or c.sample.ode_solver
    guidance = self.default_guidance(method, steps) if guidance is None else guidance
    if self.guide is not None:
      params = {'main': params, 'guide': self.guide.params}
    out = self._sampler(num, method, steps, float(guidance), solver)(params, key, labels)
    return np.asarray(jax.device_get(out))


def load_experiment(workdir: str, overrides: Optional[dict] = None,
                    step: Optional[int] = None):
  """(Experiment, TrainState) of a trained workdir, with the config saved in it
  (`overrides`: {'sample.t_mid': 1.0, ...}) and its checkpoint `step` (default newest)."""
  config = workdir_lib.load_config(workdir)
  if overrides:
    config_lib.apply_overrides(config, overrides)
  exp = Experiment(config)
  state, _ = workdir_lib.restore(workdir, exp.abstract_state, step, data_shape=exp.data_shape)
  return exp, state
