"""TrainState: every piece of training state as one explicit pytree.

Resuming needs nothing outside it except the data position, which is the step: the
per-step key is fold_in(rng, step) and batch b of the data stream is a pure function of
(seed, b), so a checkpoint of this pytree gives bit-exact continuation.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from scm_jax import models as models_lib
from scm_jax.core import vsd as vsd_lib
from scm_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32 scalar: optimizer steps taken (= batches consumed)
  params: Any
  ema: dict                    # name -> parameter copy (see ema_names)
  opt_state: Any
  rng: jax.Array               # base key (raw uint32[2]); step keys are fold_in(rng, step)
  nonfinite_total: jax.Array   # steps skipped for non-finite loss/grads
  nonfinite_streak: jax.Array  # ... in a row, ending at the current step
  # loss.kind='scd_vsd' only (None otherwise, so other runs' checkpoints keep their
  # layout): the auxiliary diffusion model F_phi of the student's samples (no EMA) and
  # its optimizer state; checkpointed and sharded like params / opt_state.
  aux_params: Any = None
  aux_opt_state: Any = None


# ----------------------------------------------------------------- optimizer

OPTIMIZERS = ('adam', 'adamw', 'radam')
SCHEDULES = ('constant', 'cosine', 'inv_sqrt')


def learning_rate_schedule(c: ml_collections.ConfigDict, num_steps: int):
  """Linear warmup to optim.lr, then constant, cosine or inverse-sqrt decay."""
  o = c.optim
  warm = max(int(o.warmup_steps), 0)
  if o.schedule == 'constant':
    after = optax.constant_schedule(o.lr)
  elif o.schedule == 'cosine':
    after = optax.cosine_decay_schedule(o.lr, max(int(o.decay_steps or num_steps) - warm, 1))
  elif o.schedule == 'inv_sqrt':  # EDM2-style: lr / sqrt(max(step / t_ref, 1))
    t_ref = max(int(o.decay_steps or 1), 1)
    after = lambda s: o.lr / jnp.sqrt(jnp.maximum((s + warm) / t_ref, 1.0))
  else:
    raise ConfigError(f'config.optim.schedule={o.schedule!r} is unknown; choose one of '
                      f'{SCHEDULES}.')
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), after], [warm])


def make_optimizer(c: ml_collections.ConfigDict,
                   project: bool = True) -> optax.GradientTransformation:
  """config.optim's optimizer; with `project`, followed by the model's parameter
  projection (off for parameters that are not the model's, e.g. the VSD weight head)."""
  o = c.optim
  lr = learning_rate_schedule(c, c.train.num_steps)
  if o.name == 'adam':
    opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  elif o.name == 'adamw':
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  elif o.name == 'radam':
    opt = optax.radam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  else:
    raise ConfigError(f'config.optim.name={o.name!r} is unknown; choose one of {OPTIMIZERS}.')
  if o.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
  projection = models_lib.build_model(c.model).param_projection() if project else None
  if projection is not None:  # e.g. EDM2's forced weight normalization
    opt = optax.chain(opt, projected(projection))
  return opt


def projected(projection) -> optax.GradientTransformation:
  """Makes the update land on projection(params + update): parameters are kept on a
  constraint set (EDM2's forced weight normalization) after every step."""
  def update(updates, state, params):
    new = projection(optax.apply_updates(params, updates), params)
    return jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new, params), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------- EMA

def ema_names(c: ml_collections.ConfigDict) -> list[str]:
  """Names of the EMA parameter copies kept in the TrainState: classic `ema_<decay>`
  (config.ema.decays), then EDM2 power-function `pema_<sigma_rel>` (config.ema.sigma_rels)."""
  return ([f'ema_{d:g}' for d in c.ema.decays] +
          [f'pema_{s:g}' for s in c.ema.sigma_rels])


def check_ema_config(ema_config) -> None:
  """ConfigError unless every decay is in (0, 1) and every sigma_rel in (0, 0.3)."""
  for d in ema_config.decays:
    if not 0 < d < 1:
      raise ConfigError(f'config.ema.decays entries must be in (0, 1), got {d}.')
  for s in ema_config.sigma_rels:
    if not 0 < s < 0.3:
      raise ConfigError(f'config.ema.sigma_rels entries must be in (0, 0.3), got {s}.')


def power_ema_gamma(sigma_rel: float) -> float:
  """EDM2 (Karras et al. 2024, eq. 3): gamma whose power-function EMA has width sigma_rel.

  sigma_rel^2 = (g + 1) / ((g + 2)^2 (g + 3)), i.e. the largest real root of
  g^3 + 7 g^2 + (16 - 1/sigma_rel^2) g + (12 - 1/sigma_rel^2).
  """
  s = sigma_rel**-2
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  return float(roots[np.isreal(roots)].real.max())


def ema_decay_fn(name: str):
  """Returns beta(step) for the EMA named `ema_<decay>` or `pema_<sigma_rel>`.

  `step` is the number of updates applied so far including this one (>= 1).
  The power EMA uses beta_t = (1 - 1/t)^(gamma + 1), which averages all iterates with
  weights proportional to t^gamma (so its first update copies the parameters).
  """
  kind, value = name.split('_', 1)
  value = float(value)
  if kind == 'ema':
    return lambda step: jnp.float32(value)
  gamma = power_ema_gamma(value)
  return lambda step: (1.0 - 1.0 / jnp.asarray(step, jnp.float32))**(gamma + 1.0)


def update_ema(ema: dict, params, step) -> dict:
  """One EMA update of every copy: ema <- beta ema + (1 - beta) params."""
  out = {}
  for name, avg in ema.items():
    beta = ema_decay_fn(name)(step)
    # a + (1 - beta)(p - a): a parameter that does not move (MPFourier's buffers) keeps
    # its average exactly.
    out[name] = jax.tree.map(lambda a, p: a + (1.0 - beta) * (p - a), avg, params)
  return out


# ---------------------------------------------------------------------- init

def dummy_inputs(data_shape, batch: int = 1):
  x = jnp.zeros((batch,) + tuple(data_shape), jnp.float32)
  t = jnp.full((batch,), 0.5, jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32)
  return x, t, labels


def init_params(model, data_shape, key):
  """Model parameters (float32) for one example of `data_shape`."""
  x, t, labels = dummy_inputs(data_shape)
  k_param, k_drop = jax.random.split(key)
  variables = model.init({'params': k_param, 'dropout': k_drop}, x, t, labels)
  return variables['params']


def has_aux_model(c: ml_collections.ConfigDict) -> bool:
  """Whether the run keeps the auxiliary model F_phi (sCD + VSD, core/vsd.py)."""
  return c.loss.kind == 'scd_vsd'


def vsd_separate_head(c: ml_collections.ConfigDict) -> bool:
  """Whether the VSD term has its own weight head w_psi: then aux_params = {'phi': F_phi,
  'psi': w_psi} (and aux_opt_state one optimizer state each); otherwise aux_params is
  F_phi (the layout of earlier VSD runs)."""
  return has_aux_model(c) and c.loss.get('vsd_weight_head', 'separate') == 'separate'


def vsd_parts(c: ml_collections.ConfigDict, aux):
  """(F_phi part, w_psi part or None) of aux_params, aux_opt_state or their shardings."""
  return (aux['phi'], aux['psi']) if vsd_separate_head(c) else (aux, None)


def vsd_join(c: ml_collections.ConfigDict, phi, psi):
  """The inverse of `vsd_parts`."""
  return {'phi': phi, 'psi': psi} if vsd_separate_head(c) else phi


def create_train_state(c: ml_collections.ConfigDict, model, data_shape, key,
                       tx=None, params=None, aux_params=None) -> TrainState:
  """Fresh TrainState. `params` may be given (e.g. a student initialised from a teacher);
  so may `aux_params` (F_phi, scd_vsd only: the teacher's weights; default a copy of
  params). F_phi has its own optimizer state, of the same optimizer (Table 5: its lr is
  the student's)."""
  k_init, k_rng = jax.random.split(key)
  if params is None:
    params = init_params(model, data_shape, k_init)
  tx = tx or make_optimizer(c)
  ema = {name: jax.tree.map(jnp.copy, params) for name in ema_names(c)}
  aux_opt_state = None
  if has_aux_model(c):
    phi = jax.tree.map(jnp.copy, params if aux_params is None else aux_params)
    psi = psi_opt = None
    if vsd_separate_head(c):  # its own key: the other draws stay those of earlier runs
      psi = vsd_lib.init_weight_head(jax.random.fold_in(key, 0x5e1))
      psi_opt = make_optimizer(c, project=False).init(psi)
    aux_params, aux_opt_state = vsd_join(c, phi, psi), vsd_join(c, tx.init(phi), psi_opt)
  else:
    aux_params = None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema=ema,
                    opt_state=tx.init(params), rng=k_rng,
                    nonfinite_total=jnp.zeros((), jnp.int32),
                    nonfinite_streak=jnp.zeros((), jnp.int32),
                    aux_params=aux_params, aux_opt_state=aux_opt_state)


def params_name(state: TrainState, which: str = '', config=None) -> str:
  """The weights `pick_params(state, which, config)` returns: 'params' or an EMA name."""
  if which == 'params' or (not which and not state.ema):
    return 'params'
  if not which:
    names = [n for n in ema_names(config) if n in state.ema] if config else []
    return (names or state_ema_order(state))[0]
  if which not in state.ema:
    raise ConfigError(f'no EMA named {which!r}; this run keeps {state_ema_order(state)} '
                      "(or use 'params' for the raw weights).")
  return which


def pick_params(state: TrainState, which: str = '', config=None):
  """Parameters for sampling: 'params' = raw weights, '' = the first EMA (raw weights if
  the run keeps none), anything else an EMA name. "First" is in config order
  (config.ema.decays, then sigma_rels) when `config` is given, else state_ema_order."""
  name = params_name(state, which, config)
  return state.params if name == 'params' else state.ema[name]


def state_ema_order(state: TrainState) -> list[str]:
  """EMA names, classic (ema_*) before power-function (pema_*), each group sorted."""
  return sorted(state.ema, key=lambda n: (not n.startswith('ema_'), n))
