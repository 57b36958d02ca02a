"""What the loop does when training keeps producing NaN/Inf (config.train.nonfinite_action).

The train step already skips a step whose loss or gradients are non-finite: params, EMA
and optimizer state stay as they were, the step's `skipped` metric is 1 and the state
counts `nonfinite_total` / `nonfinite_streak`. `NonfiniteGuard` follows the same count on
the host and acts at the exact step where `train.max_nonfinite_streak` steps in a row
have been skipped:

  'stop'      raise NonFiniteError naming the step and the metrics of the last bad step;
              the newest checkpoint is left as it is.
  'rollback'  restore the newest checkpoint from before the streak began, skip the data
              batches consumed since then (the batch stream is not rewound) and
              re-key the random stream, then go on
              (the recipe of PaLM, Chowdhery et al. 2022, sec. 5.1: restart before the
              spike and skip the batches around it). Replaying the same batches with the
              same keys would reproduce the fault bit for bit, hence the skip and re-key.
              After `train.max_rollbacks` rollbacks that do not get past the failing
              step, it stops as 'stop' does.

The guard reads a step's metrics only after the next step has been dispatched, so the
host never waits on the device in the middle of the pipeline; `sync=True` (last step,
preemption) checks the newest step as well.
"""

from typing import Optional

import jax
import numpy as np

from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.errors import DataError

ACTIONS = ('stop', 'rollback')


class NonFiniteError(DataError):
  """Training stopped on a streak of non-finite (skipped) steps."""


def rekey(rng: jax.Array, rollback_index: int) -> jax.Array:
  """The base key after the run's rollback number `rollback_index` (0, 1, ...).

  Derived from the restored checkpoint's key and the count of rollbacks so far (kept
  in the checkpoint meta), so every rollback gets a stream not used before and a
  resumed run re-derives the same one.
  """
  return jax.random.fold_in(rng, rollback_index)


class NonfiniteGuard:
  """Host-side streak counter with the stop / rollback policy of config.train."""

  def __init__(self, train_config, state, meta: Optional[dict] = None):
    self.max_streak = int(train_config.max_nonfinite_streak)
    self.action = train_config.nonfinite_action
    self.max_rollbacks = int(train_config.max_rollbacks)
    self.streak = int(state.nonfinite_streak)
    self.total = int(state.nonfinite_total)
    self.rollbacks = list((meta or {}).get('nonfinite_rollbacks', []))
    self._pending = None       # (step, metrics) dispatched but not yet checked
    self._last_bad = {}        # scalar metrics of the newest skipped step
    self._in_a_row = 0         # rollbacks without getting past the failing step
    self._fail_step = -1

  def check(self, step: int, metrics: dict, sync: bool = False) -> Optional[int]:
    """Call after dispatching `step`; checks the step before it (and `step` if sync).

    Returns the step at which the streak reached the limit when a rollback is due;
    raises NonFiniteError when training must stop; else None.
    """
    todo = [self._pending] if self._pending is not None else []
    self._pending = None if sync else (step, metrics)
    if sync:
      todo.append((step, metrics))
    for s, m in todo:
      if self._observe(s, m):
        self._pending = None  # the steps after it are discarded with the state
        if self.action == 'stop' or self._in_a_row >= self.max_rollbacks:
          raise NonFiniteError(self._message(s))
        return s
    return None

  def _observe(self, step: int, metrics: dict) -> bool:
    if float(jax.device_get(metrics['skipped'])) > 0:
      self.streak += 1
      self.total += 1
      self._last_bad = {k: float(v) for k, v in jax.device_get(metrics).items()
                        if np.ndim(v) == 0}
    else:
      self.streak = 0
      if step > self._fail_step:
        self._in_a_row = 0
    return self.streak >= self.max_streak

  def _message(self, step: int) -> str:
    first = step - self.streak + 1
    bad = ', '.join(f'{k}={v:.4g}' for k, v in sorted(self._last_bad.items()))
    why = ''
    if self.action == 'rollback':
      why = (f' after {self._in_a_row} rollback(s) that did not get past step '
             f'{self._fail_step} (config.train.max_rollbacks={self.max_rollbacks})')
    return (f'training stopped at step {step}{why}: steps {first}..{step} '
            f'({self.streak} in a row, config.train.max_nonfinite_streak={self.max_streak}) '
            f'had a non-finite loss or gradient and were skipped; {self.total} skipped in '
            f'all. Metrics of step {step}: {bad}. The parameters are those of step '
            f'{first - 1}; no checkpoint was changed. Check the data for NaN/Inf, lower '
            'config.optim.lr or config.optim.grad_clip, or set '
            "config.train.nonfinite_action='rollback'.")

  def rollback(self, fail_step: int, stream_step: int, exp, ckpt, validate):
    """Restores the newest checkpoint from before the streak and returns its state.

    Only the train state goes back: the data stream, at batch `stream_step`, goes on,
    so the batches since that checkpoint (the bad window among them) are skipped.
    Checkpoints newer than the restored one are moved to checkpoints_rolled_back/
    (kept, but out of the way of the steps that will be saved again).
    """
    first_bad = fail_step - self.streak + 1
    ckpt.wait()
    state, _ = ckpt.restore_latest(exp.abstract_state, validate, before=first_bad)
    if state is None:
      self._in_a_row = self.max_rollbacks  # nothing to go back to: stop
      raise NonFiniteError(self._message(fail_step) + (
          f' No checkpoint from before step {first_bad} exists to roll back to; lower '
          'config.train.ckpt_every or raise config.train.keep_ckpts.'))
    restored = int(state.step)
    ckpt.move_aside([s for s in ckpt.steps() if s > restored], ckpt_lib.ROLLED_BACK_DIR)
    state = jax.device_put(state.replace(
        rng=rekey(state.rng, len(self.rollbacks)),
        nonfinite_total=np.int32(self.total),
        nonfinite_streak=np.int32(0)), exp.state_shardings)
    self.rollbacks.append({'failed_step': fail_step, 'restored_step': restored,
                           'stream_step': int(stream_step)})
    self.streak = 0
    self._in_a_row += 1
    self._fail_step = max(self._fail_step, fail_step)
    return state

  def meta(self) -> dict:
    """What goes into each checkpoint's meta (the rollback history of the run)."""
    return {'nonfinite_rollbacks': list(self.rollbacks)}
