"""The teacher named by `config.teacher`: a TrigFlow diffusion workdir of this project.

    python -m scm_jax.train --config=configs/digits_scd.py --workdir=runs/student \\
        --config.teacher.workdir=runs/teacher

`resolve` reads the teacher's saved config, checks it against the student (before any
checkpoint is read), restores the teacher's chosen weights (`teacher.ema`) read-only,
applies classifier-free guidance (`teacher.guidance`) and returns what training takes
from it: the sCD drift dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t), and the weights the
student starts from when `teacher.init_student` is set (the paper initializes the
student from the teacher). Teachers in other parameterizations (EDM, VP, flow matching)
go through `scm_jax.core.teachers` and the `dxdt_fn` argument of Experiment.
"""

import dataclasses
from typing import Any, Optional

import jax
import ml_collections

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


def teacher_config(workdir: str) -> ml_collections.ConfigDict:
  """The teacher's saved config; refuses workdirs that hold no diffusion model."""
  try:
    tc = workdir_lib.load_config(workdir)
  except CheckpointError as e:
    raise ConfigError(f'config.teacher.workdir: {e}') from None
  if tc.loss.kind != 'diffusion':
    raise ConfigError(
        f'config.teacher.workdir={workdir!r} holds a loss.kind={tc.loss.kind!r} model; '
        "sCD distills a diffusion model: train one with loss.kind='diffusion' "
        '(e.g. --config=configs/digits_scd.py:teacher) and pass its workdir.')
  return tc


def load_teacher(workdir: str, data_shape, ema: str = '', step: int = -1):
  """(teacher model, its saved config, its chosen weights) from a diffusion workdir."""
  tc = teacher_config(workdir)
  model, params = load_weights(workdir, tc, data_shape, ema, step, 'config.teacher.workdir')
  return model, tc, params


def load_weights(workdir: str, tc, data_shape, ema: str, step: int, field: str):
  """(model, chosen weights) of the run in `workdir` whose saved config is `tc`.

  Only the model and the abstract state are built (no data source, no train step): the
  checkpoint is restored read-only for data of `data_shape`, the student's.
  """
  model = models_lib.build_model(tc.model)
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(tc, model, data_shape, k),
                            jax.random.PRNGKey(0))
  try:
    state, _ = workdir_lib.restore(
        workdir, abstract, None if step < 0 else step, data_shape=data_shape,
        fix='Distill on the data the teacher was trained on, with its architecture.')
  except ckpt_lib.IncompatibleCheckpointError as e:
    raise ConfigError(f'{field}: {e}') from None
  return model, state_lib.pick_params(state, ema, tc)


def _check_architecture(params, student_params, what: str, fix: str) -> None:
  diffs = workdir_lib.shape_mismatches(ckpt_lib.flat_shapes(params),
                                       ckpt_lib.flat_shapes(student_params))
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


def resolve(config: ml_collections.ConfigDict, data_shape, student_params) -> Teacher:
  """The Teacher of `config` for a student of `data_shape` whose parameters have the
  shapes of `student_params` (abstract is enough).

  Only loss.kind='scd' / 'scd_vsd' have one. A ConfigError says what is missing or
  mismatched.
  """
  c = config
  if c.loss.kind not in losses.DISTILLATION_KINDS:
    return Teacher()
  if not c.teacher.workdir:
    raise ConfigError(f"loss.kind={c.loss.kind!r} distills a teacher: pass --config.teacher.workdir="
                      '<workdir of a diffusion run> (train one first, e.g. with '
                      '--config=configs/digits_scd.py:teacher).')
  tc = teacher_config(c.teacher.workdir)
  _check_same('trigflow.sigma_d', c.trigflow.sigma_d, tc.trigflow.sigma_d,
              "set --config.trigflow.sigma_d to the teacher's value.")
  teacher_classes = int(tc.model.get('num_classes', 0))
  if c.teacher.guidance != 1.0 and not teacher_classes:
    raise ConfigError(f'config.teacher.guidance={c.teacher.guidance} needs a '
                      'class-conditional teacher; this one is unconditional (use 1.0).')
  _check_same('model.num_classes', int(c.model.get('num_classes', 0)), teacher_classes,
              'a conditional teacher needs a conditional student with the same classes.')

  model, _, params = load_teacher(c.teacher.workdir, data_shape, c.teacher.ema,
                                  c.teacher.step)
  F_apply = teachers.from_flax_model(model, c.teacher.guidance)
  dxdt_fn = teachers.make_dxdt_fn(F_apply, params, c.trigflow.sigma_d)
  fix = ("Give the student the teacher's config.model (the same --config.model.* "
         'overrides)')
  aux_init = None
  if c.loss.kind == 'scd_vsd':  # F_phi starts from the teacher, on the student's model
    _check_architecture(params, student_params, "loss.kind='scd_vsd' starts F_phi from "
                        "the teacher's weights", fix + '.')
    aux_init = params
  if c.teacher.get('student_workdir', ''):
    return Teacher(dxdt_fn, _vsd_student(config, data_shape, student_params), aux_init)
  if not c.teacher.init_student:
    return Teacher(dxdt_fn, None, aux_init)
  _check_architecture(params, student_params, "config.teacher.init_student=True copies "
                      "the teacher's weights into the student",
                      fix + ' or set --config.teacher.init_student=False.')
  return Teacher(dxdt_fn, params, aux_init)
