"""The one configuration system: an `ml_collections.ConfigDict` holding every knob.

Recipe files in `configs/` start from `base_config()` and change what differs; every
field can be overridden on the command line (`--config.loss.p_mean=-0.8`) or from
Python (`apply_overrides`). `validate_config` turns bad values into a `ConfigError` that
names the field and the fix; each rule it applies is owned by the module that
implements the feature (choice lists, mesh sizes, EMA names, ...), imported from there.
"""

import ml_collections

from scm_jax import data as data_lib
from scm_jax import models as models_lib
from scm_jax.core import losses
from scm_jax.core import sampling
from scm_jax.core import vsd
from scm_jax.errors import ConfigError
from scm_jax.infra import distributed as distributed_lib
from scm_jax.infra import sharding
from scm_jax.models import vae as vae_lib
from scm_jax.train import nonfinite
from scm_jax.train import state as state_lib


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
  c.loss.time_derivative = 'jvp'       # jvp | finite_difference (ablation) | discrete
  c.loss.fd_eps = 1e-3
  c.loss.discrete_dt = 0.01            # discrete-time sCM (Appendix E): step dt back in t
  c.loss.segments = 1                  # multistep sCM: M segments of [0, pi/2]; sample M steps
  # loss.kind='scd_vsd' (sCD + adaptive VSD, App. C / Table 5): VSD term on 1-step samples
  c.loss.vsd_weight = 1.0              # lambda_VSD
  c.loss.vsd_p_mean = 0.4              # time proposal of the VSD term
  c.loss.vsd_p_std = 2.0
  c.loss.vsd_sigma_max = 80.0          # 1-step samples from t_max = arctan(80 / sigma_d)
  c.loss.vsd_phi_p_mean = -0.8         # F_phi's diffusion loss proposal
  c.loss.vsd_phi_p_std = 1.6
  c.loss.vsd_residual = 'F'            # F (the paper's units) | x0 (an earlier variant)
  c.loss.vsd_weight_head = 'separate'  # separate (w_psi, the paper's) | student (shares w)
  c.loss.vsd_phi_updates = 1           # F_phi updates per student update (DMD2, rCM: more)
  c.loss.vsd_phi_warmup_steps = 0      # first steps: only F_phi learns, on student samples
  c.loss.vsd_diagnostic = True         # log rms of d on student samples vs on real data
  c.loss.num_time_buckets = 8          # loss-by-time metrics
  c.loss.label_dropout = 0.0           # classifier-free guidance training
  c.loss.shared_forward = True         # sCT/sCD: F_theta is the primal of the jvp (1 forward)

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
  c.teacher.guidance_max = 1.0         # > 1: guidance-conditioned student (model.guidance_embed),
                                       # trained on the teacher guided by s ~ U[1, guidance_max]
  c.teacher.guide_workdir = ''         # EDM2-style guiding network (a diffusion workdir; any
                                       # size): guided D = D_guide + w (D - D_guide), not CFG
  c.teacher.guide_ema = ''             # its weights: '' = first EMA, 'params' or an EMA name
  c.teacher.guide_step = -1            # its checkpoint step; -1 = newest (autoguidance: early)
  c.teacher.init_student = True        # student starts from the teacher's weights (paper)
  c.teacher.student_workdir = ''       # scd_vsd: the student starts from this sCD run ...
  c.teacher.student_ema = ''           # ... with these weights ('' = its first EMA)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 10000
  c.train.batch_size = 128             # global batch, split over processes and devices
  c.train.microbatches = 1             # gradient accumulation: per-device batch in k parts
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
  c.train.resume_old_format = False    # resume a format-1 checkpoint (infra/formats.py)

  c.sample = ml_collections.ConfigDict()
  c.sample.num = 64
  c.sample.steps = (1, 2)              # consistency steps drawn during training
  c.sample.t_mid = 1.1
  c.sample.sigma_max = 80.0            # sampling starts at t_max = arctan(sigma_max / sigma_d)
  c.sample.guidance = (1.0,)           # CFG scale per sample.steps entry (one value: all;
                                       # teachers: the ODE's); CLIs' --guidance overrides
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


def _check_choice(field: str, value, choices) -> None:
  _check(value in choices, f'config.{field}={value!r} is unknown; choose one of {choices}.')


def _check_consistency_variants(c: ml_collections.ConfigDict) -> None:
  """Multistep (loss.segments) and discrete-time (loss.discrete_dt) fields; .get: runs
  saved before them."""
  dt, segments = c.loss.get('discrete_dt', 0.01), c.loss.get('segments', 1)
  _check(0 < dt < 1.5, f'config.loss.discrete_dt={dt} must be in (0, 1.5) (a step in t; '
         'e.g. 0.01).')
  _check(isinstance(segments, int) and segments >= 1,
         f'config.loss.segments={segments!r} must be an integer >= 1 (1 = one-step sCM).')
  if segments > 1:
    _check(c.loss.kind in losses.CONSISTENCY_KINDS,
           f'config.loss.segments={segments} needs a consistency loss (loss.kind in '
           f'{losses.CONSISTENCY_KINDS}), got {c.loss.kind!r}; set loss.segments=1.')
    _check(all(s == segments for s in c.sample.steps),
           f'config.sample.steps={tuple(c.sample.steps)}: a model with loss.segments='
           f'{segments} samples in exactly {segments} steps; set sample.steps=({segments},).')
  if c.loss.kind == 'scd_vsd':
    _check(segments == 1, "config.loss.kind='scd_vsd' trains 1-step samples: set "
           'loss.segments=1.')
    _check(c.train.get('microbatches', 1) == 1, "config.loss.kind='scd_vsd' does not "
           'accumulate gradients (F_phi learns from each step\'s samples): set '
           'train.microbatches=1.')
    _check(c.loss.vsd_p_std > 0 and c.loss.vsd_phi_p_std > 0 and c.loss.vsd_sigma_max > 0,
           'config.loss.vsd_p_std, vsd_phi_p_std and vsd_sigma_max must be > 0.')
    for field, options in (('vsd_residual', vsd.RESIDUALS),
                           ('vsd_weight_head', vsd.WEIGHT_HEADS)):
      value = c.loss.get(field, options[0])
      _check(value in options, f'config.loss.{field}={value!r} is unknown; choose one of '
             f'{options}.')
    updates, warmup = c.loss.get('vsd_phi_updates', 1), c.loss.get('vsd_phi_warmup_steps', 0)
    _check(isinstance(updates, int) and updates >= 1,
           f'config.loss.vsd_phi_updates={updates!r} must be an integer >= 1 (F_phi updates '
           'per student update).')
    _check(isinstance(warmup, int) and 0 <= warmup < c.train.num_steps,
           f'config.loss.vsd_phi_warmup_steps={warmup!r} must be an integer in [0, '
           f'train.num_steps={c.train.num_steps}) (steps in which only F_phi learns).')


def validate_config(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and how to fix it.

  Builds nothing: model fields are checked by name here and by value when the model
  is built; data sources check their own fields when built.
  """
  _check(c.seed >= 0, f'config.seed must be >= 0, got {c.seed}.')
  _check_choice('loss.kind', c.loss.kind, losses.LOSS_KINDS)
  _check(c.trigflow.sigma_d > 0, f'config.trigflow.sigma_d must be > 0, got {c.trigflow.sigma_d}.')
  _check(c.loss.p_std > 0, f'config.loss.p_std must be > 0, got {c.loss.p_std}.')
  if c.model.get('parameterization') == 'edm' and 'sigma_data' in c.model:
    # EDM2's c_noise = ln(sigma_d tan t) / 4 needs the data's sigma_d: trigflow.sigma_d owns it.
    _check(c.model.sigma_data == c.trigflow.sigma_d,
           f'config.model.sigma_data={c.model.sigma_data} differs from config.trigflow.sigma_d='
           f'{c.trigflow.sigma_d}; an EDM-parameterized network must use the data\'s sigma_d: '
           f'set --config.model.sigma_data={c.trigflow.sigma_d}.')
  _check(c.loss.tangent_warmup_steps >= 0, 'config.loss.tangent_warmup_steps must be >= 0.')
  _check(c.loss.tangent_norm_c > 0, 'config.loss.tangent_norm_c must be > 0 (paper: 0.1).')
  _check_choice('loss.time_derivative', c.loss.time_derivative, losses.TIME_DERIVATIVES)
  _check(0 <= c.loss.label_dropout < 1, 'config.loss.label_dropout must be in [0, 1).')
  _check(c.loss.fd_eps > 0, f'config.loss.fd_eps must be > 0, got {c.loss.fd_eps}.')
  _check(c.loss.num_time_buckets >= 1, 'config.loss.num_time_buckets must be >= 1.')
  _check_choice('optim.name', c.optim.name, state_lib.OPTIMIZERS)
  _check_choice('optim.schedule', c.optim.schedule, state_lib.SCHEDULES)
  _check(c.optim.lr > 0, f'config.optim.lr must be > 0, got {c.optim.lr}.')
  _check(c.optim.grad_clip >= 0, 'config.optim.grad_clip must be >= 0 (0 disables).')
  _check(0 <= c.optim.b1 < 1 and 0 <= c.optim.b2 < 1,
         f'config.optim.b1 and b2 must be in [0, 1), got {c.optim.b1}, {c.optim.b2}.')
  _check(c.optim.eps > 0, f'config.optim.eps must be > 0, got {c.optim.eps}.')
  for k in ('warmup_steps', 'decay_steps', 'weight_decay'):
    _check(c.optim[k] >= 0, f'config.optim.{k} must be >= 0, got {c.optim[k]}.')
  state_lib.check_ema_config(c.ema)
  if 'teacher' in c:  # absent from configs saved before sCD existed
    _check(c.teacher.guidance >= 0, 'config.teacher.guidance must be >= 0 (1 = no guidance).')
    _check_guidance_student(c)
  _check(c.train.num_steps > 0, 'config.train.num_steps must be > 0.')
  _check(c.train.batch_size > 0, 'config.train.batch_size must be > 0.')
  microbatches = c.train.get('microbatches', 1)  # .get: runs saved before the field
  _check(isinstance(microbatches, int) and microbatches >= 1
         and c.train.batch_size % microbatches == 0,
         f'config.train.microbatches={microbatches} must be an integer >= 1 that divides '
         f'the per-device batch (train.batch_size={c.train.batch_size} / devices).')
  _check(isinstance(c.loss.get('shared_forward', True), bool),
         'config.loss.shared_forward must be True or False.')
  _check_consistency_variants(c)
  for k in ('log_every', 'ckpt_every'):
    _check(c.train[k] > 0, f'config.train.{k} must be > 0.')
  _check(c.train.sample_every >= 0, 'config.train.sample_every must be >= 0 (0 disables).')
  _check(c.train.keep_ckpts >= 1, 'config.train.keep_ckpts must be >= 1.')
  _check(c.train.max_nonfinite_streak >= 1, 'config.train.max_nonfinite_streak must be >= 1.')
  # .get: config.json of runs older than these fields.
  _check_choice('train.nonfinite_action', c.train.get('nonfinite_action', 'stop'),
                nonfinite.ACTIONS)
  _check(c.train.get('max_rollbacks', 0) >= 0, 'config.train.max_rollbacks must be >= 0.')
  sigma_max = c.sample.get('sigma_max', sampling.DEFAULT_SIGMA_MAX)
  _check(sigma_max > 0, f'config.sample.sigma_max must be > 0, got {sigma_max}.')
  t_start = sampling.t_max(c.trigflow.sigma_d, sigma_max)
  try:
    sampling.consistency_times(2, c.sample.t_mid, t_start=t_start)
  except ValueError:
    raise ConfigError(f'config.sample.t_mid must be in (0, {t_start:.4f}) (t_max = arctan('
                      f'sample.sigma_max / sigma_d)), got {c.sample.t_mid}.') from None
  guidance = tuple(c.sample.get('guidance', (1.0,)))
  _check(len(guidance) in (1, len(c.sample.steps)) and min(guidance) >= 0,
         f'config.sample.guidance={guidance} needs one scale >= 0, or one per entry of '
         f'config.sample.steps={tuple(c.sample.steps)}.')
  _check(all(s >= 1 for s in c.sample.steps), 'config.sample.steps entries must be >= 1.')
  _check(c.sample.num >= 1, f'config.sample.num must be >= 1, got {c.sample.num}.')
  _check(c.sample.ode_steps >= 1, f'config.sample.ode_steps must be >= 1, got '
         f'{c.sample.ode_steps}.')
  _check_choice('sample.ode_solver', c.sample.ode_solver, sampling.ODE_SOLVERS)
  _check_choice('sample.ode_schedule', c.sample.ode_schedule, sampling.ODE_SCHEDULES)
  _check_choice('sharding.strategy', c.sharding.strategy, sharding.STRATEGIES)
  sharding.check_mesh_config(c.mesh)
  if 'distributed' in c:  # absent from configs saved before multi-host support
    distributed_lib.check_config(c.distributed)
  models_lib.check_model_config(c.model)


def _check_guidance_student(c: ml_collections.ConfigDict) -> None:
  """teacher.guidance_max > 1 <=> a guidance-conditioned sCD student, class-conditional
  unless a guiding network guides the teacher; the guide's own fields."""
  s_max, embed = c.teacher.get('guidance_max', 1.0), c.model.get('guidance_embed', False)
  guide = c.teacher.get('guide_workdir', '')
  _check(s_max >= 1, f'config.teacher.guidance_max must be >= 1, got {s_max}.')
  if guide:
    _check(c.loss.kind in losses.DISTILLATION_KINDS,
           f'config.teacher.guide_workdir guides the teacher of sCD: it needs loss.kind in '
           f'{losses.DISTILLATION_KINDS}, got {c.loss.kind!r} (a teacher\'s own samples: '
           'python -m scm_jax.sample --ode=N --guidance=W --guide_workdir=DIR).')
    _check(c.teacher.guidance != 1.0 or s_max > 1,
           'config.teacher.guide_workdir is set but teacher.guidance=1 and guidance_max=1 '
           'use the teacher alone: set teacher.guidance (e.g. 2) or guidance_max > 1, or '
           'drop guide_workdir.')
    step = c.teacher.get('guide_step', -1)
    _check(isinstance(step, int) and step >= -1,
           f'config.teacher.guide_step must be a checkpoint step or -1 (newest), got {step}.')
  if s_max > 1:
    _check(c.loss.kind == 'scd' and embed and (c.model.get('num_classes', 0) > 0 or guide),
           f'config.teacher.guidance_max={s_max} trains a guidance-conditioned student: it '
           "needs loss.kind='scd', model.guidance_embed=True and a class-conditional model "
           '(or a guiding network, teacher.guide_workdir).')
  elif embed:
    _check(False, 'config.model.guidance_embed=True needs config.teacher.guidance_max > 1 '
           '(the paper: 2) so that the student learns its guidance input.')


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets {'section.field': value, ...} in `config` (in place) and returns it.

  ml_collections' own update_from_flattened_dict does the work; the config is locked
  meanwhile so that a misspelt field raises instead of being added. Values are
  type-checked (and lists turned into tuples) by ml_collections.
  """
  was_locked = config.is_locked
  config.lock()
  try:
    for field, value in dict(overrides).items():
      try:
        config.update_from_flattened_dict({field: value})
      except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f'config override {field}={value!r} does not fit the config '
                          f'({type(e).__name__}: {e}); field names are those of '
                          'scm_jax/config.py.') from None
  finally:
    if not was_locked:
      config.unlock()
  return config
