"""The one configuration system: an `ml_collections.ConfigDict` holding every knob.

Recipe files in `configs/` start from `base_config()` and change what differs; every
field can be overridden on the command line (`--config.loss.p_mean=-0.8`).
`validate_config` turns bad values into a `ConfigError` that names the field and the fix.
"""

import math

import ml_collections

from scm_jax import data as data_lib
from scm_jax import distributed as distributed_lib
from scm_jax import models as models_lib
from scm_jax.models import vae as vae_lib
from scm_jax.errors import ConfigError

LOSS_KINDS = ('sct', 'scd', 'diffusion')
OPTIMIZERS = ('adam', 'adamw', 'radam')
SCHEDULES = ('constant', 'cosine', 'inv_sqrt')


def base_config(model: str = 'unet') -> ml_collections.ConfigDict:
  """Every field with its default. Recipes override; CLIs override recipes."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = data_lib.default_data_config()
  c.model = models_lib.default_model_config(model)

  c.trigflow = ml_collections.ConfigDict()
  c.trigflow.sigma_d = 0.5

  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'sct'                  # sct | scd | diffusion
  c.loss.p_mean = -1.0                 # time proposal: tau ~ N(p_mean, p_std^2)
  c.loss.p_std = 1.4
  c.loss.tangent_warmup_steps = 10000  # r: 0 -> 1 linearly; 0 disables warmup
  c.loss.tangent_norm = True           # g / (||g|| + c)
  c.loss.tangent_norm_c = 0.1
  c.loss.adaptive_weight = True        # e^{w_phi(t)}/D ||.||^2 - w_phi(t)
  c.loss.time_derivative = 'jvp'       # jvp | finite_difference (ablation)
  c.loss.fd_eps = 1e-3
  c.loss.num_time_buckets = 8          # loss-by-time metrics
  c.loss.label_dropout = 0.0           # classifier-free guidance training

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'adam'
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = 'constant'        # after warmup: constant | cosine | inv_sqrt
  c.optim.decay_steps = 0              # cosine: length (0 = train.num_steps); inv_sqrt: t_ref
  c.optim.grad_clip = 1.0              # global-norm clip; 0 disables

  c.ema = ml_collections.ConfigDict()
  c.ema.decays = (0.999,)              # classic EMA, named ema_<decay>
  c.ema.sigma_rels = ()                # EDM2 power-function EMA, named pema_<sigma_rel>

  c.teacher = ml_collections.ConfigDict()  # sCD (loss.kind='scd'), see train/teacher.py
  c.teacher.workdir = ''               # a TrigFlow diffusion workdir of this project
  c.teacher.ema = ''                   # its weights: '' = first EMA, 'params' or an EMA name
  c.teacher.step = -1                  # its checkpoint step; -1 = newest
  c.teacher.guidance = 1.0             # classifier-free guidance scale of the teacher
  c.teacher.init_student = True        # student starts from the teacher's weights (paper)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 10000
  c.train.batch_size = 128             # global batch, split over processes and devices
  c.train.log_every = 100
  c.train.sample_every = 2000          # 0 disables
  c.train.ckpt_every = 1000
  c.train.keep_ckpts = 3
  c.train.progress_bar = True
  c.train.max_nonfinite_streak = 20    # stop after this many skipped steps in a row
  c.train.nonfinite_action = 'stop'    # then: stop | rollback (to the checkpoint before it)
  c.train.max_rollbacks = 3            # rollbacks not getting past the failing step, then stop
  c.train.handle_signals = True        # SIGTERM/SIGINT: checkpoint after the step, then exit
  c.train.check_resume_config = True   # refuse to resume with other model/data/seed fields

  c.sample = ml_collections.ConfigDict()
  c.sample.num = 64
  c.sample.steps = (1, 2)              # consistency steps drawn during training
  c.sample.t_mid = 1.1
  c.sample.ode_steps = 18              # PF-ODE steps for diffusion models
  c.sample.ode_solver = 'heun'
  c.sample.ode_schedule = 'edm'
  c.sample.ema = ''                    # '' = first EMA; 'params' = raw weights
  c.sample.seed = 1234

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                     # -1: all devices not used by other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1                    # tensor-parallel group size (see sharding.rules)

  c.distributed = distributed_lib.default_distributed_config()  # multi-host start-up
  c.vae = vae_lib.default_vae_config()  # latent models: encoder/decoder of the data

  c.sharding = ml_collections.ConfigDict()
  c.sharding.strategy = 'replicate'    # replicate | fsdp
  c.sharding.fsdp_min_size = 2**14     # smaller parameters stay replicated
  c.sharding.rules = ()                # ((regex, (axis_or_None, ...)), ...) override
  return c


def _check(cond, msg):
  if not cond:
    raise ConfigError(msg)


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and how to fix it."""
  _check(c.loss.kind in LOSS_KINDS,
         f'config.loss.kind={c.loss.kind!r} is unknown; choose one of {LOSS_KINDS}.')
  _check(c.trigflow.sigma_d > 0, f'config.trigflow.sigma_d must be > 0, got {c.trigflow.sigma_d}.')
  _check(c.loss.p_std > 0, f'config.loss.p_std must be > 0, got {c.loss.p_std}.')
  _check(c.loss.tangent_warmup_steps >= 0, 'config.loss.tangent_warmup_steps must be >= 0.')
  _check(c.loss.tangent_norm_c > 0, 'config.loss.tangent_norm_c must be > 0 (paper: 0.1).')
  _check(c.loss.time_derivative in ('jvp', 'finite_difference'),
         f'config.loss.time_derivative={c.loss.time_derivative!r}; use jvp|finite_difference.')
  _check(0 <= c.loss.label_dropout < 1, 'config.loss.label_dropout must be in [0, 1).')
  _check(c.optim.name in OPTIMIZERS,
         f'config.optim.name={c.optim.name!r} is unknown; choose one of {OPTIMIZERS}.')
  _check(c.optim.schedule in SCHEDULES,
         f'config.optim.schedule={c.optim.schedule!r} is unknown; choose one of {SCHEDULES}.')
  _check(c.optim.lr > 0, f'config.optim.lr must be > 0, got {c.optim.lr}.')
  _check(c.optim.grad_clip >= 0, 'config.optim.grad_clip must be >= 0 (0 disables).')
  for d in c.ema.decays:
    _check(0 < d < 1, f'config.ema.decays entries must be in (0, 1), got {d}.')
  for s in c.ema.sigma_rels:
    _check(0 < s < 0.3, f'config.ema.sigma_rels entries must be in (0, 0.3), got {s}.')
  if 'teacher' in c:  # absent from configs saved before sCD existed
    _check(c.teacher.guidance >= 0, 'config.teacher.guidance must be >= 0 (1 = no guidance).')
  _check(c.train.num_steps > 0, 'config.train.num_steps must be > 0.')
  _check(c.train.batch_size > 0, 'config.train.batch_size must be > 0.')
  for k in ('log_every', 'ckpt_every'):
    _check(c.train[k] > 0, f'config.train.{k} must be > 0.')
  _check(c.train.sample_every >= 0, 'config.train.sample_every must be >= 0 (0 disables).')
  _check(c.train.keep_ckpts >= 1, 'config.train.keep_ckpts must be >= 1.')
  _check(c.train.max_nonfinite_streak >= 1, 'config.train.max_nonfinite_streak must be >= 1.')
  action = c.train.get('nonfinite_action', 'stop')  # .get: config.json of older runs
  _check(action in ('stop', 'rollback'),
         f'config.train.nonfinite_action={action!r}; use stop|rollback.')
  _check(c.train.get('max_rollbacks', 0) >= 0, 'config.train.max_rollbacks must be >= 0.')
  _check(0 < c.sample.t_mid < math.pi / 2,
         f'config.sample.t_mid must be in (0, pi/2), got {c.sample.t_mid}.')
  _check(all(s >= 1 for s in c.sample.steps), 'config.sample.steps entries must be >= 1.')
  _check(c.sample.ode_solver in ('euler', 'heun', 'ddim'),
         f'config.sample.ode_solver={c.sample.ode_solver!r}; use euler|heun|ddim.')
  _check(c.sharding.strategy in ('replicate', 'fsdp'),
         f'config.sharding.strategy={c.sharding.strategy!r}; use replicate|fsdp.')
  for axis in ('data', 'fsdp', 'tensor'):
    _check(c.mesh.get(axis, 1) == -1 or c.mesh.get(axis, 1) >= 1,
           f'config.mesh.{axis} must be -1 (all remaining devices) or >= 1.')
  models_lib.build_model(c.model)  # raises ConfigError for unknown names/fields


def ema_names(c: ml_collections.ConfigDict) -> list[str]:
  """Names of the EMA parameter copies kept in the TrainState."""
  return ([f'ema_{d:g}' for d in c.ema.decays] +
          [f'pema_{s:g}' for s in c.ema.sigma_rels])
