"""Sample: python -m scm_jax.sample --workdir=DIR --steps=2 --num=64 --out=FILE.

Writes FILE.npz (key 'x', plus 'label' for conditional models) and FILE.png (an image
grid, or a scatter plot for 2-D data). Consistency models use 1/2/.. -step consistency
sampling; --ode=N integrates the PF-ODE with N steps of --solver instead (teachers:
euler | ddim | heun (EDM's, NFE 2N - 1) | dpmpp_2m), guided by --guidance: CFG, or with
--guide_workdir a separate guiding network (EDM2's D_guide + w (D - D_guide)). Sampling
starts at t_max = arctan(config.sample.sigma_max / sigma_d).
"""

import os

import jax
import numpy as np
from absl import flags

from scm_jax import cli
from scm_jax.core import sampling

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to load.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Consistency sampling steps (1, 2, ...).',
                              lower_bound=1)
_ODE = flags.DEFINE_integer('ode', 0, 'If > 0: PF-ODE sampling with this many steps.',
                            lower_bound=0)
_SOLVER = flags.DEFINE_enum('solver', None, list(sampling.ODE_SOLVERS), 'PF-ODE solver.')
_NUM = flags.DEFINE_integer('num', 64, 'Number of samples.', lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'Output path without extension (default: '
                           'WORKDIR/samples/sample_<steps>).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.', lower_bound=0)
_EMA = flags.DEFINE_string('ema', None, "EMA to use ('params' = raw weights).")
_T_MID = flags.DEFINE_float('t_mid', None, '2-step intermediate time (default config).')
_LABELS = flags.DEFINE_list('labels', None, 'Class labels (cycled over samples).')
_GUIDANCE = flags.DEFINE_float('guidance', None, 'Guidance scale (default config.sample.guidance): '
                               'the input s of a guidance-conditioned student (one network '
                               'evaluation per step), else CFG on the outputs (two).',
                               lower_bound=0.0)
_CKPT_STEP = flags.DEFINE_integer('ckpt_step', None, 'Checkpoint step (default newest).',
                                  lower_bound=0)
_VAE = flags.DEFINE_string('vae', None, 'Latent models: VAE weights to decode the samples '
                           "with (default config.vae.path; '' = keep latents).")
_GUIDE = cli.define_guide_flags()
flags.mark_flags_as_required(['workdir'])
cli.int_list_flag('labels')


def main(argv):
  del argv
  from scm_jax.infra import visualize
  from scm_jax.train import experiment

  from scm_jax.train import workdir as workdir_lib
  # Checked on the saved config before anything is built or written.
  model_config = workdir_lib.load_config(_WORKDIR.value).model
  cli.check_conditioning(int(model_config.get('num_classes', 0)), _GUIDANCE.value,
                         _LABELS.value, bool(_GUIDE[0].value or model_config.get(
                             'guidance_embed', False)))
  overrides = {}
  if _T_MID.value is not None:
    overrides['sample.t_mid'] = _T_MID.value
  if _SOLVER.value is not None:
    overrides['sample.ode_solver'] = _SOLVER.value
  if _VAE.value is not None:
    overrides['vae.path'] = _VAE.value
  exp, state = experiment.load_experiment(_WORKDIR.value, overrides, _CKPT_STEP.value)
  cli.use_guide(exp, _GUIDE)
  if not _OUT.value:  # writes into the workdir
    workdir_lib.check_links(_WORKDIR.value, ('samples',))
  labels = None
  if _LABELS.value:
    labels = np.resize(np.array([int(v) for v in _LABELS.value]), _NUM.value)
  method = 'ode' if _ODE.value > 0 or not exp.is_consistency_model else 'consistency'
  steps = _ODE.value or (_STEPS.value if method == 'consistency' else exp.config.sample.ode_steps)
  x = exp.sample(state, _NUM.value, steps, key=jax.random.PRNGKey(_SEED.value),
                 labels=labels, ema=_EMA.value, method=method, guidance=_GUIDANCE.value)
  name = f'sample_{steps}step' if method == 'consistency' else f'sample_ode{steps}'
  out = _OUT.value or os.path.join(_WORKDIR.value, 'samples', name)
  out = out[:-4] if out.endswith(('.npz', '.png')) else out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  arrays = {}
  vae_config = exp.config.get('vae')
  if vae_config is not None and vae_config.path:
    # Latent model: keep the latents, decode them to pixels for 'x' and the grid.
    from scm_jax.models import vae as vae_lib
    arrays['latents'] = x
    x = vae_lib.decode_latents(vae_config, x)
  arrays['x'] = x
  if labels is not None or exp.num_classes:
    arrays['label'] = np.asarray(labels if labels is not None else np.arange(len(x)) % exp.num_classes)
  np.savez(out + '.npz', **arrays)
  reference = None
  if x.ndim == 2 and x.shape[1] == 2:
    reference = exp.source.get(np.arange(min(len(exp.source), 2000)))['x']
  if x.ndim == 4 or (x.ndim == 2 and x.shape[1] == 2):
    from PIL import Image
    Image.fromarray(visualize.samples_to_image(x, reference, name).squeeze()).save(out + '.png')
  print(f'wrote {out}.npz' + (f' and {out}.png' if os.path.exists(out + '.png') else '') +
        f': {x.shape[0]} samples, shape {x.shape[1:]}, range [{x.min():.3f}, {x.max():.3f}]')


if __name__ == '__main__':
  cli.run(main)
