"""The teacher named by `config.teacher`: a TrigFlow diffusion workdir of this project.

    python -m scm_jax.train --config=configs/digits_scd.py --workdir=runs/student \\
        --config.teacher.workdir=runs/teacher

`resolve` reads the teacher's saved config, checks it against the student (before any
checkpoint is read), restores the teacher's chosen weights (`teacher.ema`) read-only and
returns what training takes from it: for sCD the drift dx_t/dt = sigma_d F_teacher(x_t /
sigma_d, t), guided by `teacher.guidance` (or by the student's own per-example input
s ~ U[1, teacher.guidance_max]): classifier-free on the teacher itself, or EDM2-style
by a separate guiding network `teacher.guide_workdir` (`load_guide`); for sCT and sCD
the weights the student starts from when `teacher.init_student` is set (Algorithm 1
initializes every consistency model from the teacher's EMA; sCT uses nothing else of
it). Teachers in other parameterizations (EDM, VP, flow matching) go through
`scm_jax.core.teachers` and the `dxdt_fn` argument of Experiment.
"""

import dataclasses
from typing import Any, Optional

import flax
import jax
import ml_collections
import numpy as np

from scm_jax import models as models_lib
from scm_jax.core import losses
from scm_jax.core import teachers
from scm_jax.errors import CheckpointError, ConfigError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.train import state as state_lib
from scm_jax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Teacher:
  """What training takes from a teacher; both fields None for runs without one."""
  dxdt_fn: Optional[Any] = None      # sCD drift dxdt(x_t, t, labels) (a Partial over weights)
  init_params: Optional[Any] = None  # the student's initial parameters
  aux_init: Optional[Any] = None     # scd_vsd: F_phi's initial parameters (the teacher's)


_FIX = "Give the student the teacher's config.model (the same --config.model.* overrides)"
_INIT_WHAT = "config.teacher.init_student=True copies the teacher's weights into the student"
_INIT_FIX = ' or set --config.teacher.init_student=False.'


def teacher_config(workdir: str, field: str = 'config.teacher.workdir'
                   ) -> ml_collections.ConfigDict:
  """The saved config of a teacher (or guide) workdir; refuses one holding no diffusion
  model. `field` names the setting in messages."""
  try:
    tc = workdir_lib.load_config(workdir)
  except CheckpointError as e:
    raise ConfigError(f'{field}: {e}') from None
  if tc.loss.kind != 'diffusion':
    raise ConfigError(
        f'{field}={workdir!r} holds a loss.kind={tc.loss.kind!r} model; '
        "teachers and guides are diffusion models: train one with loss.kind='diffusion' "
        '(e.g. --config=configs/digits_scd.py:teacher) and pass its workdir.')
  return tc


def load_weights(workdir: str, tc, data_shape, ema: str, step: int, field: str,
                 fix: str = 'Distill on the data the teacher was trained on, with its '
                 'architecture.'):
  """(model, chosen weights) of the run in `workdir` whose saved config is `tc`.

  Only the model and the abstract state are built (no data source, no train step): the
  checkpoint is restored read-only for data of `data_shape`, the student's.
  """
  model = models_lib.build_model(tc.model)
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(tc, model, data_shape, k),
                            jax.random.PRNGKey(0))
  try:
    state, _ = workdir_lib.restore(workdir, abstract, None if step < 0 else step,
                                   data_shape=data_shape, fix=fix)
  except ckpt_lib.IncompatibleCheckpointError as e:
    raise ConfigError(f'{field}: {e}') from None
  try:
    return model, state_lib.pick_params(state, ema, tc)
  except ConfigError as e:  # e.g. config.teacher.ema, named with its workdir
    raise ConfigError(f"{field.replace('workdir', 'ema')}={ema!r} of {workdir}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Guide:
  """A guiding network (EDM2): its model, chosen weights, and whether it takes labels
  (autoguidance) or not (EDM2's unconditional CFG guide)."""
  model: Any
  params: Any
  conditional: bool


def load_guide(workdir: str, ema: str, step: int, main_config, data_shape,
               field: str = 'config.teacher.guide_workdir') -> Guide:
  """The guiding network in `workdir` (its `ema` weights at checkpoint `step`, -1 = newest)
  for the diffusion model whose config is `main_config`, on data of `data_shape`.

  Any architecture or size; refused with one line unless it is a diffusion model with
  the main model's sigma_d and data shape, and unconditional or with its classes.
  """
  gc = teacher_config(workdir, field)
  sd, guide_sd = main_config.trigflow.sigma_d, gc.trigflow.sigma_d
  if guide_sd != sd:
    raise ConfigError(f'{field}: the guide has trigflow.sigma_d={guide_sd} but the teacher '
                      f'has {sd}; a guiding network must be trained on the same data.')
  classes = int(main_config.model.get('num_classes', 0))
  guide_classes = int(gc.model.get('num_classes', 0))
  if guide_classes not in (0, classes):
    raise ConfigError(f'{field}: the guide has model.num_classes={guide_classes} but the '
                      f'teacher has {classes}; a guide is unconditional (num_classes=0, '
                      "EDM2's CFG guide) or has the teacher's classes (autoguidance).")
  saved = _saved_data_shape(workdir, step)
  if saved and saved != tuple(data_shape):
    raise ConfigError(f'{field}: the guide was trained on data of shape {saved} but the '
                      f'teacher on {tuple(data_shape)}; a guiding network must be trained '
                      "on the teacher's data.")
  model, params = load_weights(workdir, gc, data_shape, ema, step, field,
                               fix="A guiding network is trained on the teacher's data.")
  return Guide(model, params, guide_classes > 0)


def _saved_data_shape(workdir: str, step: int) -> tuple:
  """The data shape recorded with checkpoint `step` (-1: the newest) of `workdir`; ()
  when there is none to read (restoring it then says why)."""
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step < 0 else step
    if step is None or step not in ckpt.steps():
      return ()
    return tuple(ckpt.read_meta(step).get('data_shape', ()))
  finally:
    ckpt.close()


def guided_teacher(model, params, guidance: float, guide: Optional[Guide] = None):
  """(F_apply, its params) of a diffusion model guided with scale `guidance` (or a
  per-call one): classifier-free on the model itself, or by `guide`'s network
  (`teachers.guided_by_network`; params {'main': params, 'guide': guide.params})."""
  if guide is None:
    return teachers.from_flax_model(model, guidance), params
  F_apply = teachers.guided_by_network(teachers.flax_model_F(model),
                                       teachers.flax_model_F(guide.model), guidance,
                                       guide.conditional)
  return F_apply, {'main': params, 'guide': guide.params}


def _check_architecture(params, student_params, what: str, fix: str,
                        guidance_student: bool = False) -> None:
  """The student must have the teacher's shapes (a guidance-conditioned student may also
  have its guidance embedding, which the teacher lacks)."""
  teacher, student = ckpt_lib.flat_shapes(params), ckpt_lib.flat_shapes(student_params)
  if guidance_student:
    student = {k: v for k, v in student.items()
               if k in teacher or not _is_guidance_embedding(k)}
  diffs = workdir_lib.shape_mismatches(teacher, student)
  if diffs:
    raise ConfigError(f'{what}, but the architectures differ (teacher vs student):\n'
                      + '\n'.join(diffs) + f'\n{fix}')


def _vsd_student(config, data_shape, student_params):
  """The VSD stage's student weights: those of the consistency run teacher.student_workdir
  (its teacher.student_ema), checked against the student's shapes."""
  c = config.teacher
  try:
    sc = workdir_lib.load_config(c.student_workdir)
  except CheckpointError as e:
    raise ConfigError(f'config.teacher.student_workdir: {e}') from None
  if sc.loss.kind not in losses.CONSISTENCY_KINDS:
    raise ConfigError(f'config.teacher.student_workdir={c.student_workdir!r} holds a '
                      f'loss.kind={sc.loss.kind!r} model; the VSD stage continues an sCD run.')
  _, params = load_weights(c.student_workdir, sc, data_shape, c.student_ema, -1,
                           'config.teacher.student_workdir')
  _check_architecture(params, student_params, 'teacher.student_workdir starts the student',
                      "Use the sCD run's config.model for the VSD stage.")
  return params


def _check_same(name: str, student, teacher, fix: str) -> None:
  if student != teacher:
    raise ConfigError(f'the student has {name}={student} but the teacher has {teacher}; '
                      f'{fix}')


def merge_params(fresh, given):
  """`given` parameters where they exist, `fresh` ones elsewhere (same nesting)."""
  flat_given = flax.traverse_util.flatten_dict(given)
  flat = {k: flat_given.get(k, v) for k, v in flax.traverse_util.flatten_dict(fresh).items()}
  return flax.traverse_util.unflatten_dict(flat)


def restrict(tree, like):
  """The entries of `tree` at the paths `like` has (e.g. shardings for a teacher's params)."""
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict(
      {k: flat[k] for k in flax.traverse_util.flatten_dict(like)})


def _is_guidance_embedding(path: str) -> bool:
  return any(part.startswith('guidance') for part in path.split('/'))


def resolve(config: ml_collections.ConfigDict, data_shape, student_params) -> Teacher:
  """The Teacher of `config` for a student of `data_shape` whose parameters have the
  shapes of `student_params` (abstract is enough).

  sCD (and scd_vsd) need one (its drift, and its weights with init_student); sCT uses
  one only for its initial weights (teacher.workdir set and init_student). A ConfigError
  says what is missing or mismatched.
  """
  c = config
  init = bool(c.teacher.init_student)
  drift = c.loss.kind in losses.DISTILLATION_KINDS
  if not drift and not (c.loss.kind == 'sct' and c.teacher.workdir and init):
    return Teacher()
  if not c.teacher.workdir:
    raise ConfigError(f"loss.kind={c.loss.kind!r} distills a teacher: pass --config.teacher.workdir="
                      '<workdir of a diffusion run> (train one first, e.g. with '
                      '--config=configs/digits_scd.py:teacher).')
  tc = teacher_config(c.teacher.workdir)
  _check_same('trigflow.sigma_d', c.trigflow.sigma_d, tc.trigflow.sigma_d,
              "set --config.trigflow.sigma_d to the teacher's value.")
  if c.data.get('latents', False) or tc.data.get('latents', False):
    for field in ('shift', 'scale'):  # the student must see the teacher's latents
      mine, theirs = np.ravel(c.vae[field]), np.ravel(tc.vae[field])
      if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=1e-3, atol=1e-4):
        _check_same(f'vae.{field}', tuple(mine.tolist()), tuple(theirs.tolist()),
                    "encode the data with the teacher's latent statistics (its config.json "
                    'vae.shift / vae.scale; an imported EDM2 network records its own).')
  load = lambda: load_weights(c.teacher.workdir, tc, data_shape, c.teacher.ema,
                              c.teacher.step, 'config.teacher.workdir')
  if not drift:  # sCT from the teacher: its weights only
    _, params = load()
    _check_architecture(params, student_params, _INIT_WHAT, _FIX + _INIT_FIX)
    return Teacher(None, params)
  teacher_classes = int(tc.model.get('num_classes', 0))
  guidance_max = float(c.teacher.get('guidance_max', 1.0))
  guide_workdir = c.teacher.get('guide_workdir', '')
  if (c.teacher.guidance != 1.0 or guidance_max > 1) and not (teacher_classes or guide_workdir):
    raise ConfigError(f'config.teacher.guidance={c.teacher.guidance} / guidance_max='
                      f'{guidance_max} need a class-conditional teacher (classifier-free '
                      'guidance) or a guiding network (teacher.guide_workdir); this teacher '
                      'is unconditional (use 1.0).')
  _check_same('model.num_classes', int(c.model.get('num_classes', 0)), teacher_classes,
              'a conditional teacher needs a conditional student with the same classes.')

  guide = None
  if guide_workdir:  # checked before the teacher's weights are read
    guide = load_guide(guide_workdir, c.teacher.get('guide_ema', ''),
                       c.teacher.get('guide_step', -1), tc, data_shape)
  model, params = load()
  F_apply, drift_params = guided_teacher(model, params, c.teacher.guidance, guide)
  dxdt_fn = teachers.make_dxdt_fn(F_apply, drift_params, c.trigflow.sigma_d)
  aux_init = None
  if c.loss.kind == 'scd_vsd':  # F_phi starts from the teacher, on the student's model
    _check_architecture(params, student_params, "loss.kind='scd_vsd' starts F_phi from "
                        "the teacher's weights", _FIX + '.')
    aux_init = params
  if c.teacher.get('student_workdir', ''):
    return Teacher(dxdt_fn, _vsd_student(config, data_shape, student_params), aux_init)
  if not init:
    return Teacher(dxdt_fn, None, aux_init)
  _check_architecture(params, student_params, _INIT_WHAT, _FIX + _INIT_FIX,
                      guidance_student=guidance_max > 1)
  return Teacher(dxdt_fn, params, aux_init)
