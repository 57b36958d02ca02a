"""The sCD teacher named by `config.teacher`: a TrigFlow diffusion workdir of this project.

    python -m scm_jax.train --config=configs/digits_scd.py --workdir=runs/student \\
        --config.teacher.workdir=runs/teacher

loads the teacher's config and checkpoint, picks its weights (`teacher.ema`), applies
classifier-free guidance (`teacher.guidance`), and returns the drift
dx_t/dt = sigma_d F_teacher(x_t / sigma_d, t) for the consistency loss, plus the
teacher's weights as the student's initialization when `teacher.init_student` is set
(the paper initializes the student from the teacher). Teachers in other
parameterizations (EDM, VP, flow matching) go through `scm_jax.teachers` and the
`dxdt_fn` argument of `train_and_evaluate`.
"""

import jax
import ml_collections

from scm_jax import checkpoint as ckpt_lib
from scm_jax import data as data_lib
from scm_jax import models as models_lib
from scm_jax import teachers
from scm_jax.errors import ConfigError
from scm_jax.train import state as state_lib


def teacher_config(workdir: str) -> ml_collections.ConfigDict:
  """The teacher's saved config; refuses workdirs that hold no diffusion model."""
  from scm_jax.train import loop  # loop imports this module
  try:
    tc = loop.load_config(workdir)
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f'config.teacher.workdir: {e}') from None
  if tc.loss.kind != 'diffusion':
    raise ConfigError(
        f'config.teacher.workdir={workdir!r} holds a loss.kind={tc.loss.kind!r} model; '
        "sCD distills a diffusion model: train one with loss.kind='diffusion' "
        '(e.g. --config=configs/digits_scd.py:teacher) and pass its workdir.')
  return tc


def load_teacher(workdir: str, ema: str = '', step: int = -1):
  """(teacher Experiment, its chosen weights) from a diffusion training workdir."""
  from scm_jax.train import loop
  teacher_config(workdir)
  exp, state = loop.load_experiment(workdir, step=None if step < 0 else step)
  return exp, state_lib.pick_params(state, ema, exp.config)


def _check_same(name: str, student, teacher, fix: str) -> None:
  if student != teacher:
    raise ConfigError(f'the student has {name}={student} but the teacher has {teacher}; '
                      f'{fix}')


def resolve_teacher(config: ml_collections.ConfigDict, dxdt_fn=None, init_params=None):
  """(dxdt_fn, init_params) for training `config`.

  Anything given explicitly wins. For loss.kind='scd' without a dxdt_fn, the teacher
  comes from config.teacher.workdir; a ConfigError says what is missing or mismatched
  (checked on the saved config first, before any checkpoint is read).
  """
  c = config
  if c.loss.kind != 'scd' or dxdt_fn is not None:
    return dxdt_fn, init_params
  if not c.teacher.workdir:
    raise ConfigError("loss.kind='scd' distills a teacher: pass --config.teacher.workdir="
                      '<workdir of a diffusion run> (train one first, e.g. with '
                      '--config=configs/digits_scd.py:teacher).')
  tc = teacher_config(c.teacher.workdir)
  _check_same('trigflow.sigma_d', c.trigflow.sigma_d, tc.trigflow.sigma_d,
              "set --config.trigflow.sigma_d to the teacher's value.")
  student = models_lib.build_model(c.model)
  teacher_classes = int(tc.model.get('num_classes', 0))
  if c.teacher.guidance != 1.0 and not teacher_classes:
    raise ConfigError(f'config.teacher.guidance={c.teacher.guidance} needs a '
                      'class-conditional teacher; this one is unconditional (use 1.0).')
  _check_same('model.num_classes', int(getattr(student, 'num_classes', 0)), teacher_classes,
              'a conditional teacher needs a conditional student with the same classes.')

  t_exp, t_params = load_teacher(c.teacher.workdir, c.teacher.ema, c.teacher.step)
  data_shape = tuple(data_lib.build_source(c.data, c.data.split).shape)
  _check_same('data shape', data_shape, t_exp.data_shape,
              'distill on the data the teacher was trained on.')
  F_apply = teachers.from_flax_model(t_exp.model)
  if teacher_classes:
    F_apply = teachers.guided(F_apply, c.teacher.guidance, teacher_classes)
  dxdt_fn = teachers.make_dxdt_fn(F_apply, t_params, c.trigflow.sigma_d)

  if c.teacher.init_student and init_params is None:
    expected = jax.eval_shape(lambda k: state_lib.init_params(student, data_shape, k),
                              jax.random.PRNGKey(0))
    diffs = ckpt_lib.shape_mismatches(ckpt_lib.flat_shapes(t_params),
                                      ckpt_lib.flat_shapes(expected))
    if diffs:
      raise ConfigError(
          "config.teacher.init_student=True copies the teacher's weights into the student, "
          'but the architectures differ (teacher vs student):\n' + '\n'.join(diffs) +
          "\nGive the student the teacher's config.model (the same --config.model.* "
          'overrides) or set --config.teacher.init_student=False.')
    init_params = t_params
  return dxdt_fn, init_params
