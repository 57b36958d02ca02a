"""Training loop: data -> jitted step -> metrics / samples / checkpoints. No math here.

`Experiment` gathers what a run is made of (config, data source, model, mesh, jitted
step, sampler) so that notebooks can use the library without the CLI:

    exp = Experiment(config)
    state = exp.init_state()
    state, history = exp.train(state, num_steps=500)
    x = exp.sample(state, num=256, steps=2)

`train_and_evaluate(config, workdir)` adds resume, logging and checkpointing.
"""

import json
import logging
import math
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scm_jax import checkpoint as ckpt_lib
from scm_jax import config as config_lib
from scm_jax import data as data_lib
from scm_jax import models as models_lib
from scm_jax import sampling
from scm_jax import sharding as sharding_lib
from scm_jax import teachers
from scm_jax import visualize
from scm_jax import writers
from scm_jax.errors import ConfigError
from scm_jax.train import nonfinite
from scm_jax.train import preemption
from scm_jax.train import state as state_lib
from scm_jax.train import step as step_lib
from scm_jax.train import teacher as teacher_lib

CONSISTENCY_KINDS = ('sct', 'scd')
# Config fields a run must resume with (what the parameters and the data stream mean);
# others (steps, lr, logging, mesh, ...) may change, with a warning.
RESUME_FIXED = ('seed', 'data', 'model', 'trigflow', 'loss.kind')
RESUME_FREE = ('data.prefetch', 'data.data_dir', 'data.download', 'data.eval_split',
               'data.num_test')


class Experiment:
  """Everything needed to train and sample one configuration (no I/O)."""

  def __init__(self, config: ml_collections.ConfigDict, dxdt_fn=None, init_params=None,
               source=None, devices=None):
    config_lib.validate_config(config)
    self.config = config
    self.source = source if source is not None else data_lib.build_source(config.data, config.data.split)
    self.data_shape = tuple(self.source.shape)
    self.model = models_lib.build_model(config.model)
    self.num_classes = int(getattr(self.model, 'num_classes', 0))
    if self.num_classes and self.source.num_classes and self.num_classes != self.source.num_classes:
      raise ConfigError(f'config.model.num_classes={self.num_classes} but the data source '
                        f'{self.source.name!r} has {self.source.num_classes} classes.')
    if self.num_classes and not self.source.num_classes:
      raise ConfigError(f'config.model.num_classes={self.num_classes} but the data source '
                        f'{self.source.name!r} has no labels; set model.num_classes=0.')
    self._check_model_fits_data()
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    sharding_lib.check_batch_divisible(config.train.batch_size, self.mesh)
    self.tx = state_lib.make_optimizer(config)
    self._init_params = init_params
    self.dxdt_fn = dxdt_fn

    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0), init_params)
    self.state_shardings = sharding_lib.tree_shardings(abstract, self.mesh, config.sharding)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)
    self.train_step = step_lib.make_train_step(config, self.model, self.tx, dxdt_fn)
    # A teacher with weights (teachers.make_dxdt_fn) is a jit argument, placed like params.
    self._teacher, teacher_shardings = (), None
    if teachers.has_params(dxdt_fn):
      teacher_shardings = sharding_lib.tree_shardings(dxdt_fn, self.mesh, config.sharding)
      self._teacher = (jax.device_put(dxdt_fn, teacher_shardings),)
    self.jit_step = step_lib.jit_train_step(self.train_step, self.state_shardings, self.mesh,
                                            teacher_shardings)
    self._samplers = {}

  @property
  def is_consistency_model(self) -> bool:
    return self.config.loss.kind in CONSISTENCY_KINDS

  def _check_model_fits_data(self) -> None:
    """Catches shape mismatches (e.g. an MLP on images) before a cryptic XLA error."""
    try:
      x, t, labels = state_lib.dummy_inputs(self.data_shape)
      out = jax.eval_shape(lambda: self.model.init(
          {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(0)}, x, t, labels))
      del out
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f'model {self.config.model.name!r} cannot take data of shape '
                        f'{self.data_shape} from {self.source.name!r}: {e}') from e

  def _init(self, key, params=None):
    return state_lib.create_train_state(self.config, self.model, self.data_shape, key,
                                        self.tx, params)

  def init_state(self, seed: Optional[int] = None) -> state_lib.TrainState:
    seed = self.config.seed if seed is None else seed
    # Given params (e.g. a teacher's, on its own mesh) are placed like the state's and
    # passed as an argument, not baked into the program as constants.
    params = self._init_params
    if params is not None:
      params = jax.device_put(params, self.state_shardings.params)
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.PRNGKey(seed), params)

  def iterator(self, start_step: int = 0, prefetch: Optional[int] = None):
    return data_lib.BatchIterator(
        self.source, self.config.train.batch_size, self.config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step,
        prefetch=self.config.data.prefetch if prefetch is None else prefetch)

  def step(self, state, batch):
    """One training step on a host-local numpy batch."""
    return self.jit_step(state, sharding_lib.put_batch(batch, self.mesh), *self._teacher)

  def train(self, state, num_steps: int, iterator=None, callback: Callable = None):
    """Runs num_steps steps; returns (state, list of per-step host metrics)."""
    own = iterator is None
    iterator = iterator or self.iterator(int(state.step))
    history = []
    try:
      for _ in range(num_steps):
        state, metrics = self.step(state, next(iterator))
        history.append(metrics)
        if callback is not None:
          callback(state, metrics)
    finally:
      if own:
        iterator.close()
    return state, [jax.device_get(m) for m in history]

  # ------------------------------------------------------------------ sampling

  def F_fn(self, params, labels=None, guidance: float = 1.0):
    """F(x_scaled, t) with params and labels bound; guidance > 1 mixes in the null class.

    Classifier-free guidance in F-space: F_null + w (F_cond - F_null), linear like the
    velocity it parameterises.
    """
    F_apply = teachers.from_flax_model(self.model)
    if self.num_classes > 0 and labels is not None:
      F_apply = teachers.guided(F_apply, guidance, self.num_classes)
    return lambda x, t: F_apply(params, x, t, labels)

  def _sampler(self, num: int, method: str, steps: int, guidance: float, solver: str):
    cache_key = (num, method, steps, guidance, solver)
    if cache_key not in self._samplers:
      c, shape = self.config, (num,) + self.data_shape
      sd = c.trigflow.sigma_d

      def run(params, key, labels):
        F_fn = self.F_fn(params, labels, guidance)
        if method == 'consistency':
          times = sampling.consistency_times(steps, c.sample.t_mid)
          return sampling.sample_consistency(F_fn, key, shape, sd, times)
        return sampling.sample_pf_ode(F_fn, key, shape, sd, steps, solver,
                                      c.sample.ode_schedule)
      # Split the samples over the mesh when they divide evenly (evaluation batches).
      out = sharding_lib.batch_sharding(self.mesh) if num % self.mesh.size == 0 else None
      self._samplers[cache_key] = jax.jit(run, out_shardings=out)
    return self._samplers[cache_key]

  def sample(self, state_or_params, num: int, steps: Optional[int] = None, key=None,
             labels=None, ema: Optional[str] = None, method: Optional[str] = None,
             guidance: float = 1.0, solver: Optional[str] = None) -> np.ndarray:
    """Draws `num` samples as numpy. Consistency models default to 2-step sampling;
    diffusion models (or method='ode') integrate the PF-ODE with sample.ode_steps
    steps of `solver` (default sample.ode_solver)."""
    c = self.config
    if isinstance(state_or_params, state_lib.TrainState):
      params = state_lib.pick_params(state_or_params, c.sample.ema if ema is None else ema, c)
    else:
      params = state_or_params
    method = method or ('consistency' if self.is_consistency_model else 'ode')
    steps = steps or (2 if method == 'consistency' else c.sample.ode_steps)
    key = jax.random.PRNGKey(c.sample.seed) if key is None else key
    if self.num_classes and labels is None:
      labels = np.arange(num) % self.num_classes
    labels = None if labels is None else jnp.asarray(labels, jnp.int32)
    solver = solver or c.sample.ode_solver
    out = self._sampler(num, method, int(steps), float(guidance), solver)(params, key, labels)
    return np.asarray(jax.device_get(out))


# ---------------------------------------------------------------------- loop

def _mean_metrics(history: list[dict], num_buckets: int) -> dict:
  """Averages per-step metrics; turns time-bucket sums into loss-by-time scalars."""
  out = {}
  keys = [k for k in history[0] if not k.startswith('t_bucket')]
  for k in keys:
    out[k] = float(np.mean([np.asarray(h[k]) for h in history]))
  if 't_bucket_mse_sum' in history[0]:
    sums = np.sum([h['t_bucket_mse_sum'] for h in history], axis=0)
    counts = np.sum([h['t_bucket_count'] for h in history], axis=0)
    for i in range(num_buckets):
      if counts[i] > 0:
        lo, hi = i * math.pi / 2 / num_buckets, (i + 1) * math.pi / 2 / num_buckets
        out[f'mse_by_t/{lo:.2f}-{hi:.2f}'] = float(sums[i] / counts[i])
  return out


def _say(msg: str) -> None:
  """A status line from process 0 (stderr, so it does not mix with tqdm or data)."""
  if jax.process_index() == 0:
    print(f'[scm_jax] {msg}', file=sys.stderr, flush=True)


def _meta(exp: Experiment, step: int) -> dict:
  return {
      'config': json.loads(exp.config.to_json_best_effort()),
      'data': {'step': int(step), 'seed': int(exp.config.seed),
               'global_batch_size': int(exp.config.train.batch_size)},
      'data_shape': list(exp.data_shape),
      'num_classes': exp.num_classes,
  }


def _validate_meta(exp: Experiment, ckpt=None):
  def check(meta):
    saved = tuple(meta.get('data_shape', ()))
    if saved and saved != exp.data_shape:
      raise ckpt_lib.IncompatibleCheckpointError(
          f'the checkpoint was trained on data of shape {saved}, but '
          f'{exp.source.name!r} gives {exp.data_shape}. Use a new --workdir or the '
          'original data config. No checkpoint was changed.')
    _check_resume_config(exp, meta, ckpt)
    old_bs = meta.get('data', {}).get('global_batch_size')
    if old_bs and old_bs != exp.config.train.batch_size:
      logging.warning('batch size changed from %d to %d on resume: the data stream '
                      'continues at batch %d of the new size.', old_bs,
                      exp.config.train.batch_size, meta['data']['step'])
  return check


def _check_resume_config(exp: Experiment, meta: dict, ckpt=None) -> None:
  """IncompatibleCheckpointError listing every RESUME_FIXED field the run changed, and
  (given the Checkpointer) every array shape that differs."""
  config = exp.config
  if 'config' not in meta:
    return
  strict, loose = ckpt_lib.config_mismatches(meta['config'], json.loads(config.to_json_best_effort()),
                                             RESUME_FIXED)
  strict = [d for d in strict if not any(f'config.{k}:' in d for k in RESUME_FREE)]
  if strict and config.train.check_resume_config:
    step = int(meta.get('step', -1))
    shapes = []
    if ckpt is not None:
      shapes = ckpt_lib.shape_mismatches(ckpt.saved_shapes(step),
                                         ckpt_lib.flat_shapes(exp.abstract_state))
    where = f'the checkpoint at step {step} in {ckpt.directory if ckpt else "the workdir"}'
    raise ckpt_lib.IncompatibleCheckpointError(
        (f'{where} does not match the model built from this config:\n' + '\n'.join(shapes)
         + '\nand was written with other values of:\n' if shapes else
         f'{where} was written with other values of:\n') + '\n'.join(strict) +
        '\nResume with the original values (the run\'s config.json), use a new --workdir, '
        'or pass --config.train.check_resume_config=False if the change is intended. '
        'No checkpoint was changed.')
  loose = [d for d in loose if not d.startswith('  config.train.')]  # cadence, length
  if strict or loose:
    logging.warning('resuming with a changed config:\n%s', '\n'.join(strict + loose))


def _sample_images(exp: Experiment, state, step: int) -> dict:
  """Pictures of samples for TensorBoard/PNG: consistency steps or the teacher ODE."""
  c = exp.config
  images = {}
  reference = None
  if len(exp.data_shape) == 1 and exp.data_shape[0] == 2:
    reference = exp.source.get(np.arange(min(len(exp.source), 2000)))['x']
  runs = ([('consistency', s) for s in c.sample.steps] if exp.is_consistency_model
          else [('ode', c.sample.ode_steps)])
  for method, steps in runs:
    x = exp.sample(state, c.sample.num, steps, method=method)
    name = f'{steps}step' if method == 'consistency' else f'ode{steps}'
    if len(exp.data_shape) == 3 or exp.data_shape[-1] == 2:
      images[f'samples/{name}'] = visualize.samples_to_image(x, reference, f'{name} @ {step}')
  return images


def _remember_loss_by_time(by_t: list, step: int, host: dict, keep: int = 5) -> list:
  """Keeps the last `keep` loss-by-time snapshots (mse_by_t/* scalars)."""
  snap = {k: v for k, v in host.items() if k.startswith('mse_by_t/')}
  return (by_t + [(step, snap)])[-keep:] if snap else by_t


def _loss_by_time_image(by_t: list) -> dict:
  """The loss-by-time plot for TensorBoard/PNG (empty before the first log)."""
  return {'loss_by_t': visualize.loss_by_time_plot(by_t)} if by_t else {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dxdt_fn=None, init_params=None, source=None) -> state_lib.TrainState:
  """Trains config in workdir, resuming from its newest checkpoint if there is one.

  sCD: the teacher is `dxdt_fn`, or else loaded from config.teacher (train/teacher.py).
  SIGTERM/SIGINT save a checkpoint after the current step and raise
  preemption.Preempted; non-finite streaks stop or roll back (train/nonfinite.py).
  """
  dxdt_fn, init_params = teacher_lib.resolve_teacher(config, dxdt_fn, init_params)
  exp = Experiment(config, dxdt_fn=dxdt_fn, init_params=init_params, source=source)
  c = exp.config
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=c.train.keep_ckpts)
  state, meta = ckpt.restore_latest(exp.abstract_state, _validate_meta(exp, ckpt))
  if state is None:
    state = exp.init_state()
    _say(f'starting from scratch in {workdir}')
  else:
    _say(f'resumed from step {int(state.step)} in {workdir}')
  if is_main:
    ckpt_lib.atomic_write_text(os.path.join(workdir, 'config.json'), c.to_json_best_effort(indent=2))

  start = int(state.step)
  # The data position is the step plus the batches skipped by non-finite rollbacks.
  data_offset = int(meta['data']['step']) - start if meta else 0
  guard = nonfinite.NonfiniteGuard(c.train, state, meta)
  writer = writers.MetricWriter(workdir, enabled=is_main)
  iterator = exp.iterator(start + data_offset)
  pbar = None
  if is_main and c.train.progress_bar:
    from tqdm.auto import tqdm
    pbar = tqdm(total=c.train.num_steps, initial=start, desc='train', dynamic_ncols=True)
  history, t_last, step = [], time.time(), start
  by_t = []  # (step, scalars) snapshots for the loss-by-time plot
  preempt = preemption.PreemptionHandler(c.train.handle_signals).install()
  try:
    while step < c.train.num_steps:
      step += 1
      state, metrics = exp.step(state, next(iterator))
      stop = preempt.stop_requested(step, ckpt)
      failed = guard.check(step, metrics, sync=stop or step == c.train.num_steps)
      if failed is not None:
        iterator.close()
        state, data_offset = guard.rollback(failed, failed + data_offset, exp, ckpt,
                                            _validate_meta(exp, ckpt))
        step, history, t_last = int(state.step), [], time.time()
        iterator = exp.iterator(step + data_offset)
        _say(f'{c.train.max_nonfinite_streak} non-finite steps in a row up to step {failed}: '
             f'rolled back to step {step}, skipping to data batch {step + data_offset}')
        if pbar is not None:
          pbar.n = step
          pbar.refresh()
        continue
      history.append(metrics)
      if pbar is not None:
        pbar.update(1)
      if step % c.train.log_every == 0 or step == c.train.num_steps:
        host = _mean_metrics(jax.device_get(history), c.loss.num_time_buckets)
        now = time.time()
        host['steps_per_sec'] = len(history) / max(now - t_last, 1e-9)
        host['nonfinite_total'] = int(state.nonfinite_total)
        writer.write_scalars(step, host)
        by_t = _remember_loss_by_time(by_t, step, host)
        if pbar is not None:
          pbar.set_postfix(loss=f'{host["loss"]:.4g}')
        history, t_last = [], now
      if c.train.sample_every and step % c.train.sample_every == 0:
        writer.write_images(step, {**_sample_images(exp, state, step),
                                   **_loss_by_time_image(by_t)})
      if step % c.train.ckpt_every == 0 or step == c.train.num_steps or stop:
        ckpt.save(step, state, dict(_meta(exp, step + data_offset), **guard.meta()))
      if stop and step < c.train.num_steps:
        raise preemption.Preempted(step, preempt.signum, workdir)
  finally:
    preempt.uninstall()
    iterator.close()
    ckpt.close()
    writer.close()
    if pbar is not None:
      pbar.close()
  return state


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ckpt_lib.CheckpointError(f'{workdir} has no config.json: is it a training workdir? '
                                   'Pass the --workdir used for training.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_experiment(workdir: str, overrides: Optional[dict] = None, step: Optional[int] = None):
  """(Experiment, TrainState) from a trained workdir, using the config saved in it."""
  config = load_config(workdir)
  for k, v in (overrides or {}).items():
    _set_path(config, k, v)
  exp = Experiment(config)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_ckpts, read_only=True)
  try:
    if step is None:
      state, _ = ckpt.restore_latest(exp.abstract_state)
      if state is None:
        raise ckpt_lib.CheckpointError(f'no checkpoint in {ckpt.directory}; train first.')
    else:
      if step not in ckpt.steps():
        raise ckpt_lib.CheckpointError(f'no checkpoint at step {step} in {ckpt.directory}; '
                                       f'available: {ckpt.steps()}.')
      state, _ = ckpt.restore(step, exp.abstract_state)
  finally:
    ckpt.close()
  return exp, state


def _set_path(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
