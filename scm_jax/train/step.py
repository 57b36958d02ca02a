"""The pure train step: (state, batch) -> (state, metrics), jitted and sharded.

Randomness is per example: the step key fold_in(state.rng, state.step) is folded with
each example's position in the global batch, and that example's time, noise, dropout
masks and label dropout come from its own key. The draws therefore depend neither on
the mesh nor on `train.microbatches`: with k microbatches the per-device batch is split
into k parts inside the step (`lax.scan`), gradients (float32) and metrics accumulate,
and the optimizer and EMAs update once, as for the unsplit batch.
"""

import functools
import math
import zlib
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from scm_jax.core import losses
from scm_jax.core import vsd as vsd_lib
from scm_jax.errors import ConfigError
from scm_jax.infra import sharding as sharding_lib
from scm_jax.models import layers
from scm_jax.train import state as state_lib


# ------------------------------------------------------------- the model function

def per_example_dropout(keys: jax.Array):
  """A Flax method interceptor under which every `nn.Dropout` draws example i's mask
  from keys[i] (folded with the layer's path) instead of one mask for the whole batch,
  so that an example's masks do not depend on the batch or microbatch it is in."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, nn.Dropout) and context.method_name == '__call__'):
      return next_fun(*args, **kwargs)
    x = args[0]
    call_det = args[1] if len(args) > 1 else kwargs.get('deterministic')
    if module.rate == 0 or nn.merge_param('deterministic', module.deterministic, call_det):
      return x
    keep = 1.0 - module.rate
    site = zlib.crc32('/'.join(module.path).encode())
    shape = tuple(1 if d in module.broadcast_dims else n for d, n in enumerate(x.shape))
    draw = lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), keep, shape[1:])
    mask = jnp.broadcast_to(jax.vmap(draw)(keys), x.shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))
  return interceptor


def model_apply_fn(model, train: bool = True):
  """`apply_fn(params, x_scaled, t, labels, dropout_keys [B][, guidance]) -> (F, w)` for the losses.

  Unconditional models ignore labels, so they get None and keep no label path.
  Dropout masks are drawn per example (`per_example_dropout`); keys=None is for models
  that draw none (train=False).
  """
  conditional = getattr(model, 'num_classes', 0) > 0

  def apply_fn(params, x, t, labels, keys, guidance=None):
    run = lambda: model.apply({'params': params}, x, t, labels if conditional else None,
                              guidance, train=train)
    if keys is None:
      return run()
    with nn.intercept_methods(per_example_dropout(keys)):
      return run()
  return apply_fn


def draw_guidance(keys, guidance_max: float):
  """The guidance-conditioned student's input s ~ U[1, s_max], example i's from keys[i]
  (App. G.2), so it does not depend on the example's microbatch."""
  draw = lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (), jnp.float32, 1.0,
                                      guidance_max)
  return jax.vmap(draw)(keys)


def drop_labels(keys, labels, num_classes: int, p: float):
  """Classifier-free guidance training: replace labels by the null class w.p. p
  (example i decided by keys[i])."""
  if p <= 0 or num_classes <= 0:
    return labels
  drop = jax.vmap(lambda k: jax.random.bernoulli(k, p))(keys)
  return jnp.where(drop, num_classes, labels)


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# -------------------------------------------------------------- microbatches

def microbatch_size(global_batch: int, batch_shards: int, microbatches: int) -> int:
  """Examples per device in one microbatch; ConfigError unless the per-device batch
  (global_batch / batch_shards) splits into `microbatches` equal parts."""
  per_device = global_batch // max(batch_shards, 1)
  if microbatches < 1 or per_device % microbatches:
    raise ConfigError(
        f'config.train.microbatches={microbatches} does not divide the per-device batch '
        f'{per_device} (train.batch_size={global_batch} over {batch_shards} devices); '
        'use a divisor of it.')
  return per_device // microbatches


def batch_shards(mesh=None) -> int:
  """Devices the batch is split over: those of `mesh`'s batch axes, by default of the
  mesh the step is traced under (1 without one)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or not all(a in mesh.axis_names for a in sharding_lib.BATCH_AXES):
    return 1
  return math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)


def split_microbatches(tree, k: int):
  """Leaves [B, ...] -> [k, B/k, ...]: microbatch j takes the j-th k-th of every
  device's rows, so each microbatch stays split over the devices (no data moves)."""
  n = batch_shards()

  def split(x):
    micro = x.shape[0] // (n * k)
    x = x.reshape((n, k, micro) + x.shape[1:]).swapaxes(0, 1)
    x = x.reshape((k, n * micro) + x.shape[3:])
    if n > 1:
      x = jax.lax.with_sharding_constraint(x, P(None, sharding_lib.BATCH_AXES))
    return x
  return jax.tree.map(split, tree)


def combine_metrics(stacked: dict) -> dict:
  """Metrics of k equal microbatches [k, ...] -> those of their union: `*_sum` and
  `*_count` (time-bucket statistics) add up, everything else (batch means) averages."""
  return {name: (jnp.sum(v, axis=0) if name.endswith(('_sum', '_count'))
                 else jnp.mean(v, axis=0)) for name, v in stacked.items()}


def accumulate_gradients(grad_fn: Callable, params, batch: dict, keys, step, k: int):
  """((loss, metrics), grads) of the whole batch from k microbatches in a `lax.scan`:
  the mean of the microbatch gradients (summed in float32) and combined metrics."""
  def body(acc, micro):
    (loss, metrics), grads = grad_fn(params, micro[0], micro[1], step)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return acc, (loss, metrics)
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  acc, (loss, metrics) = jax.lax.scan(body, zeros, split_microbatches((batch, keys), k))
  grads = jax.tree.map(lambda a, p: (a / k).astype(p.dtype), acc, params)
  return (jnp.mean(loss), combine_metrics(metrics)), grads


# ------------------------------------------------------------------ the step

def make_train_step(c: ml_collections.ConfigDict, model, tx: optax.GradientTransformation,
                    dxdt_fn: Optional[losses.DxdtFn] = None) -> Callable:
  """Returns the pure train_step(state, batch) -> (state, metrics).

  The step key is fold_in(state.rng, state.step), and example i's key fold_in(step key,
  i): randomness depends only on the state and the example's place in the global batch,
  so sharded and unsharded runs, resumed runs and any `train.microbatches` draw the same
  numbers. A step with a non-finite loss or gradient (of the whole batch) leaves params,
  EMA and optimizer state untouched and is counted in the state (the loop stops on a
  long streak).

  The sCD teacher drift may also be passed per call (`teacher`, e.g. a
  `teachers.make_dxdt_fn` Partial): then its weights are arguments of the jitted step
  rather than constants baked into the compiled program.
  """
  apply_fn = model_apply_fn(model)
  num_classes = getattr(model, 'num_classes', 0)
  k = int(c.train.get('microbatches', 1))
  aux_model = state_lib.has_aux_model(c)
  guidance_max = float(c.teacher.get('guidance_max', 1.0)) if 'teacher' in c else 1.0

  def train_step(state: state_lib.TrainState, batch: dict, teacher=None):
    dxdt = dxdt_fn if teacher is None else teacher
    if not aux_model:
      loss_fn = losses.make_loss_fn(c.loss, apply_fn, c.trigflow.sigma_d, dxdt)
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    size = batch['x'].shape[0]
    microbatch_size(size, batch_shards(), k)
    keys = losses.example_keys(jax.random.fold_in(state.rng, state.step), size)
    keys = layers.constrain_batch(keys)
    k_loss, k_label = losses.split_keys(keys)
    batch = dict(batch)
    if 'label' in batch:
      batch['label'] = drop_labels(k_label, batch['label'], num_classes, c.loss.label_dropout)
    if guidance_max > 1:
      batch['guidance'] = draw_guidance(k_label, guidance_max)
    aux = None
    moving = True  # the student learns (scd_vsd: after F_phi's warm-up)
    if aux_model:
      (loss, metrics), grads, aux = vsd_step(c, model, apply_fn, dxdt, state, batch, k_loss,
                                             tx)
      moving = state.step >= int(c.loss.get('vsd_phi_warmup_steps', 0))
    elif k == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, k_loss, state.step)
    else:
      (loss, metrics), grads = accumulate_gradients(grad_fn, state.params, batch, k_loss,
                                                    state.step, k)
    finite = jnp.isfinite(loss) & all_finite(grads)
    if aux is not None:
      new_aux, new_aux_opt, aux_finite, aux_metrics = aux
      finite = finite & aux_finite

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.update_ema(state.ema, params, state.step + 1)
    keep_if = lambda ok, new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    keep = functools.partial(keep_if, finite)
    learn = functools.partial(keep_if, finite & moving)
    new_state = state.replace(
        step=state.step + 1,
        params=learn(params, state.params),
        ema=learn(ema, state.ema),
        opt_state=learn(opt_state, state.opt_state),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    if aux is not None:
      new_state = new_state.replace(aux_params=keep(new_aux, state.aux_params),
                                    aux_opt_state=keep(new_aux_opt, state.aux_opt_state))
      metrics = dict(metrics, **aux_metrics, vsd_student_moves=jnp.float32(moving))
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(state.params),
                   skipped=(~finite).astype(jnp.float32))
    return new_state, metrics

  return train_step


def vsd_step(c, model, apply_fn, dxdt_fn, state, batch, keys, tx):
  """sCD + VSD (core/vsd.py): ((loss, metrics), student grads, (new aux params, new aux
  optimizer state, whether they are finite, metrics)).

  F_phi first takes loss.vsd_phi_updates - 1 updates on fresh 1-step samples of the
  current student; the student's gradient then uses that F_phi (stop-gradient), and
  F_phi's last update is on the student's samples of that gradient, so with one update
  both come from the same draws. w_psi (loss.vsd_weight_head='separate') is trained by
  the VSD term alone, with its own optimizer state.
  """
  student_fn, aux_fn = vsd_lib.make_scd_vsd_loss_fns(
      c.loss, apply_fn, model_apply_fn(model, train=False), c.trigflow.sigma_d, dxdt_fn)
  phi, psi = state_lib.vsd_parts(c, state.aux_params)
  phi_opt, psi_opt = state_lib.vsd_parts(c, state.aux_opt_state)
  labels = batch.get('label')
  k_student, k_aux = losses.split_keys(keys)
  aux_grad_fn = jax.value_and_grad(aux_fn, has_aux=True)

  def phi_update(phi, phi_opt, x_hat, k):
    (loss, m), g = aux_grad_fn(phi, x_hat, labels, k)
    updates, phi_opt = tx.update(g, phi_opt, phi)
    return optax.apply_updates(phi, updates), phi_opt, loss, m, g

  # Unrolled: as a lax loop, k = 4 ran at 4 s/step on digits on CPU (k = 1: 0.4 s).
  for j in range(int(c.loss.get('vsd_phi_updates', 1)) - 1):
    k_j = jax.vmap(lambda k, j=j: jax.random.fold_in(k, j + 1))(k_aux)
    k_sample, k_loss = losses.split_keys(k_j)
    x_hat = jax.lax.stop_gradient(vsd_lib.student_samples(
        apply_fn, state.params, batch['x'].shape, labels, *losses.split_keys(k_sample),
        c.trigflow.sigma_d, c.loss.vsd_sigma_max))
    phi, phi_opt = phi_update(phi, phi_opt, x_hat, k_loss)[:2]
  (loss, (metrics, x_hat)), (grads, psi_grads) = jax.value_and_grad(student_fn, has_aux=True)(
      (state.params, psi), phi, batch, k_student, state.step)
  phi, phi_opt, aux_loss, aux_m, phi_grads = phi_update(phi, phi_opt, x_hat, k_aux)
  if psi is not None:
    updates, psi_opt = state_lib.make_optimizer(c, project=False).update(
        psi_grads, psi_opt, psi)
    psi = optax.apply_updates(psi, updates)
  new_aux, new_opt = state_lib.vsd_join(c, phi, psi), state_lib.vsd_join(c, phi_opt, psi_opt)
  finite = all_finite(new_aux) & all_finite(phi_grads) & jnp.isfinite(aux_loss)
  aux_metrics = {'aux_loss': aux_loss, 'aux_mse': aux_m['mse'],
                 'aux_grad_norm': optax.global_norm(phi_grads)}
  return (loss, metrics), grads, (new_aux, new_opt, finite, aux_metrics)


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
