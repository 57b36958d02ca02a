"""The pure train step: (state, batch) -> (state, metrics), jitted and sharded."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from scm_jax.core import losses
from scm_jax.infra import sharding as sharding_lib
from scm_jax.train import state as state_lib


def model_apply_fn(model, train: bool = True):
  """apply_fn(params, x_scaled, t, labels, dropout_key[, guidance]) -> (F, w) for the losses.

  Unconditional models ignore labels, so they get None and keep no label path.
  """
  conditional = getattr(model, 'num_classes', 0) > 0

  def apply_fn(params, x, t, labels, key, guidance=None):
    return model.apply({'params': params}, x, t, labels if conditional else None, guidance,
                       train=train, rngs={'dropout': key})
  return apply_fn


def draw_guidance(key, batch: int, guidance_max: float):
  """The guidance-conditioned student's input s ~ U[1, s_max], one per example (App. G.2)."""
  return jax.random.uniform(key, (batch,), jnp.float32, 1.0, guidance_max)


def drop_labels(key, labels, num_classes: int, p: float):
  """Classifier-free guidance training: replace labels by the null class w.p. p."""
  if p <= 0 or num_classes <= 0:
    return labels
  drop = jax.random.bernoulli(key, p, labels.shape)
  return jnp.where(drop, num_classes, labels)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(c: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    dxdt_fn: Optional[losses.DxdtFn] = None) -> Callable:
  """Returns the pure train_step(state, batch) -> (state, metrics).

  The step key is fold_in(state.rng, state.step): randomness depends only on the state,
  so sharded and unsharded runs and resumed runs draw the same numbers. A step with a
  non-finite loss or gradient leaves params, EMA and optimizer state untouched and is
  counted in the state (the loop stops on a long streak).

  The sCD teacher drift may also be passed per call (`teacher`, e.g. a
  `teachers.make_dxdt_fn` Partial): then its weights are arguments of the jitted step
  rather than constants baked into the compiled program.
  """
  apply_fn = model_apply_fn(model)
  num_classes = getattr(model, 'num_classes', 0)
  guidance_max = float(c.teacher.get('guidance_max', 1.0)) if 'teacher' in c else 1.0

  def train_step(state: state_lib.TrainState, batch: dict, teacher=None):
    loss_fn = losses.make_loss_fn(c.loss, apply_fn, c.trigflow.sigma_d,
                                  dxdt_fn if teacher is None else teacher)
    key = jax.random.fold_in(state.rng, state.step)
    k_loss, k_label = jax.random.split(key)
    batch = dict(batch)
    if 'label' in batch:
      batch['label'] = drop_labels(k_label, batch['label'], num_classes, c.loss.label_dropout)
    if guidance_max > 1:
      batch['guidance'] = draw_guidance(jax.random.fold_in(k_label, 1), batch['x'].shape[0],
                                        guidance_max)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, k_loss, state.step)
    finite = jnp.isfinite(loss) & all_finite(grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.update_ema(state.ema, params, state.step + 1)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        ema=keep(ema, state.ema),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(state.params),
                   skipped=(~finite).astype(jnp.float32))
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, state_shardings, mesh,
                   teacher_shardings=None) -> Callable:
  """jit with explicit shardings; the old state is donated (updated in place).

  Traced under the mesh so that models can constrain activations along the batch.
  With teacher_shardings the step takes the teacher drift as a third argument.
  """
  def step_under_mesh(*args):
    with sharding_lib.activation_mesh(mesh):
      return train_step(*args)
  in_shardings = (state_shardings, sharding_lib.batch_sharding(mesh))
  if teacher_shardings is not None:
    in_shardings += (teacher_shardings,)
  return jax.jit(step_under_mesh, in_shardings=in_shardings,
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=0)
