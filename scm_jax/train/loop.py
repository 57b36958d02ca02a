"""The training loop: data -> jitted step -> metrics / samples / checkpoints. No math here.

`train_and_evaluate(config, workdir)` builds the run's Experiment (train/experiment.py),
resumes from the newest usable checkpoint in `workdir` (train/workdir.py decides which
are compatible), trains, logs, draws sample grids and checkpoints; SIGTERM / SIGINT
(preemption.py) and non-finite streaks (nonfinite.py) end or rewind it cleanly.
"""

import contextlib
import json
import math
import sys
import time
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from scm_jax.errors import WorkdirError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.infra import lock as lock_lib
from scm_jax.infra import visualize
from scm_jax.infra import writers
from scm_jax.train import experiment as experiment_lib
from scm_jax.train import nonfinite
from scm_jax.train import preemption
from scm_jax.train import state as state_lib
from scm_jax.train import workdir as workdir_lib


class Run(NamedTuple):
  """What a training run leaves in memory: its Experiment and its final state."""
  experiment: experiment_lib.Experiment
  state: state_lib.TrainState


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


def _meta(exp: experiment_lib.Experiment) -> dict:
  """What a checkpoint records besides the state and the data position."""
  return {
      'config': json.loads(exp.config.to_json_best_effort()),
      'data_shape': list(exp.data_shape),
      'num_classes': exp.num_classes,
      'process_count': jax.process_count(),  # each process saved its own data position
  }


def _resume_check(exp: experiment_lib.Experiment, workdir: str):
  """The checkpoint compatibility rule for resuming this run (train/workdir.py)."""
  return workdir_lib.compatibility(workdir, exp.abstract_state, data_shape=exp.data_shape,
                                   config=exp.config,
                                   strict_config=exp.config.train.check_resume_config,
                                   process_count=jax.process_count())


def _sample_images(exp: experiment_lib.Experiment, state, step: int) -> dict:
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dxdt_fn=None, init_params=None, source=None) -> Run:
  """Trains config in workdir, resuming from its newest checkpoint if there is one.

  sCD: the teacher is `dxdt_fn`, or else loaded from config.teacher (train/teacher.py).
  SIGTERM/SIGINT save a checkpoint after the current step and raise
  preemption.Preempted; non-finite streaks stop (NonFiniteError, carrying the Run as
  `.run`) or roll back (train/nonfinite.py). Returns the Run (Experiment, final state).
  """
  # Signals are caught from the start: one during start-up stops the run after its
  # first step, with a checkpoint, like one later on.
  with preemption.PreemptionHandler(config.train.handle_signals) as preempt:
    exp = experiment_lib.Experiment(config, dxdt_fn=dxdt_fn, init_params=init_params,
                                    source=source)
    exp.teacher  # pylint: disable=pointless-statement  # a bad teacher fails before any write
    with _owned_workdir(workdir):
      try:
        return _train(exp, workdir, preempt)
      except Exception as e:  # pylint: disable=broad-except
        failure = workdir_lib.io_failure(e, workdir)
        if failure is None:
          raise
        raise failure from None


@contextlib.contextmanager
def _owned_workdir(workdir: str):
  """Prepares the workdir and holds its lock (process 0, once per job) meanwhile; every
  process raises the same WorkdirError if that fails."""
  lock, error = None, ''
  if jax.process_index() == 0:
    try:
      workdir_lib.prepare(workdir)
      lock = lock_lib.WorkdirLock(workdir).acquire()
    except WorkdirError as e:
      error = str(e)
  if jax.process_count() > 1:
    error = _from_process_0(error)
  if error:
    raise WorkdirError(error)
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _from_process_0(text: str, size: int = 4096) -> str:
  """Process 0's `text` on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.zeros(size, np.uint8)
  encoded = text.encode()[:size]
  raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return bytes(out[out != 0]).decode(errors='replace')


def _train(exp: experiment_lib.Experiment, workdir: str,
           preempt: preemption.PreemptionHandler) -> Run:
  """The loop proper, in a prepared and locked workdir."""
  c = exp.config
  is_main = jax.process_index() == 0
  ckpt = ckpt_lib.Checkpointer(workdir, keep=c.train.keep_ckpts,
                               resume_old_format=c.train.get('resume_old_format', False))
  validate = _resume_check(exp, workdir)
  stream = exp.stream  # its position comes back with the checkpoint
  state, meta = ckpt.restore_latest(exp.abstract_state, validate, data=stream)
  if state is None:
    state = exp.init_state()
    _say(f'starting from scratch in {workdir}')
  else:
    _say(f'resumed from step {int(state.step)} in {workdir}')
  if is_main:
    workdir_lib.save_config(workdir, c)

  start = int(state.step)
  guard = nonfinite.NonfiniteGuard(c.train, state, meta)
  # A resumed run logs the steps after its checkpoint again: they replace the old rows.
  writer = writers.MetricWriter(workdir, enabled=is_main, resume_step=start if meta else None)
  pbar = None
  if is_main and c.train.progress_bar:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    pbar = tqdm(total=c.train.num_steps, initial=start, desc='train', dynamic_ncols=True)
  history, t_last, step = [], time.time(), start
  by_t = []  # (step, scalars) snapshots for the loss-by-time plot
  try:
    while step < c.train.num_steps:
      step += 1
      state, metrics = exp.step(state, next(stream))
      stop = preempt.stop_requested(step)
      failed = guard.check(step, metrics, sync=stop or step == c.train.num_steps)
      if failed is not None:
        # The stream is not rewound: the batches since the restored step are skipped.
        state = guard.rollback(failed, stream.step, exp, ckpt, validate)
        step, history, t_last = int(state.step), [], time.time()
        _say(f'{c.train.max_nonfinite_streak} non-finite steps in a row up to step {failed}: '
             f'rolled back to step {step}, going on from data batch {stream.step}')
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
        ckpt.save(step, state, dict(_meta(exp), **guard.meta()), data=stream)
      if stop and step < c.train.num_steps:
        raise preemption.Preempted(step, preempt.signum, workdir)
  except nonfinite.NonFiniteError as e:
    e.run = Run(exp, state)  # a sweep evaluates a stopped run as a result
    raise
  finally:
    stream.close()
    ckpt.close()
    writer.close()
    if pbar is not None:
      pbar.close()
  return Run(exp, state)
