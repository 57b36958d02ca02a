"""The teacher named by `config.teacher`: a TrigFlow diffusion workdir of this project.

    python -m scm_jax.train --config=configs/digits_scd.py --workdir=runs/student \\
        --config.teacher.workdir=runs/teacher

`resolve` reads the teacher's saved config, checks it against the student (before any
checkpoint is read), restores the teacher's chosen weights (`teacher.ema`) read-only and
returns what training takes from it: for sCD the drift dx_t/dt = sigma_d F_teacher(x_t /
sigma_d, t) (classifier-free guided by `teacher.guidance`, or by the student's own
per-example input s ~ U[1, teacher.guidance_max]); for sCT and sCD the weights the
student starts from when `teacher.init_student` is set (Algorithm 1 initializes every
consistency model from the teacher's EMA; sCT uses nothing else of it). Teachers in
other parameterizations (EDM, VP, flow matching) go through `scm_jax.core.teachers` and
the `dxdt_fn` argument of Experiment.
"""

import dataclasses
from typing import Any, Optional

import flax
import jax
import ml_collections

from scm_jax import models as models_lib
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
  """(teacher model, its saved config, its chosen weights) from a diffusion workdir.

  Only the model and the abstract state are built (no data source, no train step): the
  checkpoint is restored read-only for data of `data_shape`, the student's.
  """
  tc = teacher_config(workdir)
  model = models_lib.build_model(tc.model)
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(tc, model, data_shape, k),
                            jax.random.PRNGKey(0))
  try:
    state, _ = workdir_lib.restore(
        workdir, abstract, None if step < 0 else step, data_shape=data_shape,
        fix='Distill on the data the teacher was trained on, with its architecture.')
  except ckpt_lib.IncompatibleCheckpointError as e:
    raise ConfigError(f'config.teacher.workdir: {e}') from None
  return model, tc, state_lib.pick_params(state, ema, tc)


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


def _check_init_shapes(teacher_params, student_params, guidance_student: bool) -> None:
  """The student must have the teacher's shapes (a guidance-conditioned student may also
  have its guidance embedding, which the teacher lacks)."""
  teacher, student = ckpt_lib.flat_shapes(teacher_params), ckpt_lib.flat_shapes(student_params)
  if guidance_student:
    student = {k: v for k, v in student.items()
               if k in teacher or not _is_guidance_embedding(k)}
  diffs = workdir_lib.shape_mismatches(teacher, student)
  if diffs:
    raise ConfigError(
        "config.teacher.init_student=True copies the teacher's weights into the student, "
        'but the architectures differ (teacher vs student):\n' + '\n'.join(diffs) +
        "\nGive the student the teacher's config.model (the same --config.model.* "
        'overrides) or set --config.teacher.init_student=False.')


def resolve(config: ml_collections.ConfigDict, data_shape, student_params) -> Teacher:
  """The Teacher of `config` for a student of `data_shape` whose parameters have the
  shapes of `student_params` (abstract is enough).

  sCD needs one (its drift, and its weights with init_student); sCT uses one only for
  its initial weights (teacher.workdir set and init_student). A ConfigError says what
  is missing or mismatched.
  """
  c = config
  init = bool(c.teacher.init_student)
  if c.loss.kind == 'sct' and c.teacher.workdir and init:
    tc = teacher_config(c.teacher.workdir)
    _check_same('trigflow.sigma_d', c.trigflow.sigma_d, tc.trigflow.sigma_d,
                "set --config.trigflow.sigma_d to the teacher's value.")
    _, _, params = load_teacher(c.teacher.workdir, data_shape, c.teacher.ema, c.teacher.step)
    _check_init_shapes(params, student_params, False)
    return Teacher(None, params)
  if c.loss.kind != 'scd':
    return Teacher()
  if not c.teacher.workdir:
    raise ConfigError("loss.kind='scd' distills a teacher: pass --config.teacher.workdir="
                      '<workdir of a diffusion run> (train one first, e.g. with '
                      '--config=configs/digits_scd.py:teacher).')
  tc = teacher_config(c.teacher.workdir)
  _check_same('trigflow.sigma_d', c.trigflow.sigma_d, tc.trigflow.sigma_d,
              "set --config.trigflow.sigma_d to the teacher's value.")
  teacher_classes = int(tc.model.get('num_classes', 0))
  guidance_max = float(c.teacher.get('guidance_max', 1.0))
  if (c.teacher.guidance != 1.0 or guidance_max > 1) and not teacher_classes:
    raise ConfigError(f'config.teacher.guidance={c.teacher.guidance} / guidance_max='
                      f'{guidance_max} need a class-conditional teacher; this one is '
                      'unconditional (use 1.0).')
  _check_same('model.num_classes', int(c.model.get('num_classes', 0)), teacher_classes,
              'a conditional teacher needs a conditional student with the same classes.')

  model, _, params = load_teacher(c.teacher.workdir, data_shape, c.teacher.ema,
                                  c.teacher.step)
  F_apply = teachers.from_flax_model(model, c.teacher.guidance)
  dxdt_fn = teachers.make_dxdt_fn(F_apply, params, c.trigflow.sigma_d)
  if not init:
    return Teacher(dxdt_fn)
  _check_init_shapes(params, student_params, guidance_max > 1)
  return Teacher(dxdt_fn, params)
