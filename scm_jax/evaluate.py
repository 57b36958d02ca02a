"""Evaluate: python -m scm_jax.evaluate --workdir=DIR --metrics=fid,pr --num=50000 --steps=1,2.

Draws --num samples per sampler in mesh-sharded batches from a training workdir's
checkpoint, extracts features in batches and computes the metrics against reference
data (the config's data source, split --ref_split) or published statistics
(--ref_stats=.npz with mu, sigma, as pytorch-fid / clean-fid write them; for FD_DINOv2
--ref_stats_dinov2, the same format). FID and FD_DINOv2 as the paper reports them:
--metrics=fid,fd_dinov2 --inception_weights=... --dinov2_weights=... (one table).

--steps are consistency steps for sCT/sCD models and PF-ODE steps (--solver: euler,
ddim, heun = EDM's Heun, dpmpp_2m) for diffusion teachers (--guidance: CFG, or with
--guide_workdir a separate guiding network, EDM2-style). Results go to
DIR/eval/metrics_<ckpt step>.json (entries of earlier runs at that step are kept) and
TensorBoard (DIR/eval/tb, tags <sampler>/<metric>).
Metrics: see scm_jax/evaluation/evaluator.py (`auto`: by data shape; FID needs
--inception_weights, see scm_jax/evaluation/convert_inception.py; FD_DINOv2 needs
--dinov2_weights, see scm_jax/evaluation/convert_dinov2.py).
"""

import json
import os
import sys
import time

import jax
from absl import flags

from scm_jax import cli
from scm_jax.core import sampling

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
_METRICS = flags.DEFINE_list('metrics', ['auto'], 'Metrics (fid, fd_dinov2, pr, fd_digits, '
                             'pr_digits, digits_cls, energy, swd) or auto (by data shape).')
_NUM = flags.DEFINE_integer('num', 10000, 'Samples per sampler.', lower_bound=1)
_STEPS = flags.DEFINE_list('steps', None, 'Consistency steps (sCM) or PF-ODE steps (diffusion); '
                           'default 1,2 or config.sample.ode_steps.')
_SOLVER = flags.DEFINE_enum('solver', None, list(sampling.ODE_SOLVERS),
                            'PF-ODE solver for diffusion models (default config).')
_BATCH = flags.DEFINE_integer('batch_size', 500, 'Sampling batch (a multiple of the devices).',
                              lower_bound=1)
_FEATURE_BATCH = flags.DEFINE_integer('feature_batch_size', 100, 'Feature-extraction batch.',
                                      lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.', lower_bound=0)
_EMA = flags.DEFINE_string('ema', None, "EMA to use ('params' = raw weights).")
_GUIDANCE = flags.DEFINE_float('guidance', None, 'Guidance scale (default config.sample.guidance '
                               'per sampler): a guidance-conditioned student\'s input, else CFG.',
                               lower_bound=0.0)
_CKPT_STEP = flags.DEFINE_integer('ckpt_step', None, 'Checkpoint step (default newest).',
                                  lower_bound=0)
_INCEPTION = flags.DEFINE_string('inception_weights', os.environ.get('SCM_JAX_INCEPTION_WEIGHTS', ''),
                                 'Converted FID Inception .npz (env SCM_JAX_INCEPTION_WEIGHTS).')
_DINOV2 = flags.DEFINE_string('dinov2_weights', os.environ.get('SCM_JAX_DINOV2_WEIGHTS', ''),
                              'Converted DINOv2 ViT-L/14 .npz (env SCM_JAX_DINOV2_WEIGHTS).')
_DIGITS = flags.DEFINE_string('digits_weights', '', 'Digits classifier .npz (default packaged).')
_REF_STATS = flags.DEFINE_string('ref_stats', None, 'Reference FID statistics .npz (mu, sigma).')
_REF_STATS_DINOV2 = flags.DEFINE_string('ref_stats_dinov2', None,
                                       'Reference FD_DINOv2 statistics .npz (mu, sigma).')
_REF_SPLIT = flags.DEFINE_string('ref_split', None, 'Reference data split (default config.data.split).')
_REF_NUM = flags.DEFINE_integer('ref_num', 0, 'Reference samples (0 = the whole split).',
                                lower_bound=0)
_PR_K = flags.DEFINE_integer('pr_k', 3, 'k of k-NN precision / recall.', lower_bound=1)
_QUANTIZE = flags.DEFINE_bool('quantize', True, 'Round samples to 8 bits before Inception '
                              'and DINOv2 (as images saved to PNG).')
_GUIDE = cli.define_guide_flags()
flags.mark_flags_as_required(['workdir'])
cli.int_list_flag('steps', minimum=1)


def _write_json(path: str, step: int, results: dict, settings: dict) -> dict:
  from scm_jax.infra import files
  old = (files.read_json_or_keep_aside(path) or {}).get('results', {})
  merged = {'step': step, 'results': {**old, **results}, 'settings': settings}
  files.atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True))
  return merged


def main(argv):
  del argv
  from tqdm.auto import tqdm
  from scm_jax.infra import writers
  from scm_jax.evaluation import evaluator as evaluator_lib
  from scm_jax.evaluation import fid as fid_lib
  from scm_jax.evaluation import generate
  from scm_jax.train import experiment
  from scm_jax.train import state as state_lib

  from scm_jax.train import workdir as workdir_lib
  # Checked on the saved config before anything is built, sampled or written.
  model_config = workdir_lib.load_config(_WORKDIR.value).model
  cli.check_conditioning(int(model_config.get('num_classes', 0)), _GUIDANCE.value,
                         guided_otherwise=bool(_GUIDE[0].value or model_config.get(
                             'guidance_embed', False)))
  exp, state = experiment.load_experiment(_WORKDIR.value, step=_CKPT_STEP.value)
  cli.use_guide(exp, _GUIDE)
  step = int(state.step)
  c = exp.config
  metrics = _METRICS.value
  if metrics == ['auto']:
    metrics = evaluator_lib.default_metrics(exp.data_shape)
  metrics = evaluator_lib.check_metrics(metrics, exp.data_shape)
  default_steps = ['1', '2'] if exp.is_consistency_model else [str(c.sample.ode_steps)]
  samplers = generate.samplers_for(exp.is_consistency_model, _STEPS.value or default_steps,
                                   _SOLVER.value or c.sample.ode_solver)
  ref_stats = fid_lib.load_stats(_REF_STATS.value, 2048) if _REF_STATS.value else None
  ref_stats_dinov2 = (fid_lib.load_stats(_REF_STATS_DINOV2.value)  # dim checked vs weights
                      if _REF_STATS_DINOV2.value else None)
  ref_split = _REF_SPLIT.value or c.data.split
  needs_data = evaluator_lib.needs_reference(
      metrics, {'fid': ref_stats, 'fd_dinov2': ref_stats_dinov2})
  reference = (generate.reference_data(c.data, ref_split, _REF_NUM.value)
               if needs_data else None)
  eval_dir = os.path.join(_WORKDIR.value, 'eval')
  workdir_lib.check_links(_WORKDIR.value, ('eval',))
  evaluator = evaluator_lib.Evaluator(
      metrics, reference, inception_weights=_INCEPTION.value, ref_stats=ref_stats,
      digits_weights=_DIGITS.value, batch_size=_FEATURE_BATCH.value, mesh=exp.mesh,
      pr_k=_PR_K.value, cache_dir=eval_dir, quantize=_QUANTIZE.value,
      dinov2_weights=_DINOV2.value, ref_stats_dinov2=ref_stats_dinov2,
      cache_tag=f'{c.data.name}_{ref_split}_{0 if reference is None else len(reference)}')
  params = state_lib.pick_params(state, c.sample.ema if _EMA.value is None else _EMA.value)

  results = {}
  writer = writers.MetricWriter(eval_dir, enabled=jax.process_index() == 0, subdir='tb')
  try:
    for sampler in samplers:
      t0 = time.time()
      guidance = (exp.default_guidance(sampler.method, sampler.steps)
                  if _GUIDANCE.value is None else _GUIDANCE.value)
      batches = generate.sample_batches(exp, params, _NUM.value, _BATCH.value, sampler,
                                        _SEED.value, guidance)
      total = -(-_NUM.value // _BATCH.value)  # sizes were checked by sample_batches
      values = evaluator.evaluate(tqdm(batches, total=total, desc=sampler.name,
                                       disable=jax.process_index() != 0, file=sys.stderr))
      # NFE: CFG on the outputs evaluates the network twice per step (Table 6's NFE 126).
      values.update(nfe=sampler.nfe * exp.evaluations_per_step(guidance),
                    seconds=time.time() - t0, guidance=guidance)
      # A non-default --ema or guidance is part of the name: runs with different
      # weights or guidance sit side by side in the same metrics file.
      name = sampler.name + (f'@{_EMA.value}' if _EMA.value else '') + (
          f'@w{guidance:g}' if guidance != 1.0 else '') + (
          f'@guide_{os.path.basename(os.path.normpath(_GUIDE[0].value))}'
          if _GUIDE[0].value and guidance != 1.0 else '')
      results[name] = values
      writer.write_scalars(step, {f'{name}/{k}': v for k, v in values.items()})
  finally:
    writer.close()

  settings = {'metrics': metrics, 'num': _NUM.value, 'seed': _SEED.value,
              'ema': _EMA.value or c.sample.ema or 'default', 'guidance': _GUIDANCE.value,
              'guide_workdir': _GUIDE[0].value, 'guide_ema': _GUIDE[1].value,
              'guide_step': _GUIDE[2].value,
              'ref_stats': _REF_STATS.value, 'ref_stats_dinov2': _REF_STATS_DINOV2.value,
              'ref_split': ref_split,
              'ref_num': None if reference is None else len(reference), 'pr_k': _PR_K.value}
  path = os.path.join(eval_dir, f'metrics_{step}.json')
  _write_json(path, step, results, settings)
  keys = sorted({k for v in results.values() for k in v})
  print(f'checkpoint step {step}, {_NUM.value} samples each; wrote {path}')
  print('sampler    ' + ' '.join(f'{k:>14}' for k in keys))
  for name, v in results.items():
    print(f'{name:<10} ' + ' '.join(f'{v.get(k, float("nan")):>14.5g}' for k in keys))


if __name__ == '__main__':
  cli.run(main)
