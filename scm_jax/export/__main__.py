"""Export: python -m scm_jax.export --workdir=DIR [--steps=2 | --ode=N] --out=FILE.jaxexport.

Writes the sampler of a trained workdir (the weights of --ema, its newest checkpoint
or --ckpt_step) as a jax.export artifact that `scm_jax.export.load(FILE)` runs with
only jax and numpy installed, on the noise (and labels, guidance) its caller gives,
on every platform of --platforms. --batch=0 (default) exports a symbolic batch
dimension; --batch=B a fixed one. Consistency models export --steps-step consistency
sampling; --ode=N (and diffusion models) the PF-ODE with N steps of --solver.
"""

import os

from absl import flags

from scm_jax import cli
from scm_jax.core import sampling

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to export.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Consistency sampling steps.', lower_bound=1)
_ODE = flags.DEFINE_integer('ode', 0, 'If > 0: export PF-ODE sampling with this many steps.',
                            lower_bound=0)
_SOLVER = flags.DEFINE_enum('solver', None, list(sampling.ODE_SOLVERS), 'PF-ODE solver '
                            '(default config.sample.ode_solver).')
_BATCH = flags.DEFINE_integer('batch', 0, 'Fixed batch size; 0 = symbolic (any batch).',
                              lower_bound=0)
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                               'Platforms the artifact runs on (cpu, cuda, rocm, tpu).')
_OUT = flags.DEFINE_string('out', None, 'Artifact path (default '
                           'WORKDIR/export/gen_<steps>step.jaxexport).')
_EMA = flags.DEFINE_string('ema', None, "EMA to export ('params' = raw weights; default "
                           'config.sample.ema).')
_GUIDANCE = flags.DEFINE_float('guidance', None, 'CFG scale baked into the program, or '
                               'the default of a guidance-conditioned student\'s input '
                               '(default config.sample.guidance).', lower_bound=0.0)
_T_MID = flags.DEFINE_float('t_mid', None, '2-step intermediate time (default config).')
_CKPT_STEP = flags.DEFINE_integer('ckpt_step', None, 'Checkpoint step (default newest).',
                                  lower_bound=0)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  from scm_jax.export import build
  from scm_jax.train import experiment
  from scm_jax.train import state as state_lib
  from scm_jax.train import workdir as workdir_lib
  platforms = build.check_platforms(_PLATFORMS.value)
  cli.check_conditioning(int(workdir_lib.load_config(_WORKDIR.value).model.get(
      'num_classes', 0)), _GUIDANCE.value)
  overrides = {} if _T_MID.value is None else {'sample.t_mid': _T_MID.value}
  exp, state = experiment.load_experiment(_WORKDIR.value, overrides, _CKPT_STEP.value)
  which = exp.config.sample.ema if _EMA.value is None else _EMA.value
  ema = state_lib.params_name(state, which, exp.config)
  method = 'ode' if _ODE.value > 0 or not exp.is_consistency_model else 'consistency'
  steps = _ODE.value or (_STEPS.value if method == 'consistency' else exp.config.sample.ode_steps)
  info = {'workdir': os.path.abspath(_WORKDIR.value), 'checkpoint_step': int(state.step),
          'ema': ema}
  gen = build.export_generator(
      exp, state_lib.pick_params(state, which, exp.config), method=method, steps=steps,
      batch=_BATCH.value, platforms=platforms, guidance=_GUIDANCE.value,
      solver=_SOLVER.value, info=info)
  name = f'gen_{steps}step' if method == 'consistency' else f'gen_ode{steps}'
  out = _OUT.value or os.path.join(_WORKDIR.value, 'export', name + '.jaxexport')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  size = gen.save(out)
  m = gen.metadata
  print(f'wrote {out} ({size / 2**20:.2f} MiB): {method} {steps} steps, NFE {m["nfe"]}, '
        f'batch {m["batch"] or "symbolic"}, noise {tuple(m["noise_shape"])}, '
        f'platforms {",".join(m["platforms"])}, weights {ema} at step {m["checkpoint_step"]}')


if __name__ == '__main__':
  cli.run(main)
