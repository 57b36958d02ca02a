"""End-of-run metrics for ablations: sample quality, training behaviour, divergence.

Sample quality is the energy distance (`sample_metrics.energy_distance`, flattened
samples) between model samples and held-out data. It is put on a scale by two
references drawn the same way: the prior noise z ~ N(0, sigma_d^2 I) (what a useless
sampler is as good as) and training data (what a perfect one reaches).

A run is classified from its numbers (`classify`), worst first:
  diverged  training stopped on non-finite steps, a final metric or a sample is
            non-finite, or the training mse exploded (max logged mse > mse_limit, 10 by
            default: the consistency target F- + g stays O(1) in a healthy run, and a
            clipped optimizer keeps the parameters finite while the loss blows up);
  failed    finite, but a sampler is no closer to the data than the prior noise
            (energy distance >= ed_noise): nothing useful was learned;
  unstable  usable samples, but some steps were skipped (non-finite loss or gradient);
  ok        otherwise.
"""

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from scm_jax.evaluation.sample_metrics import energy_distance

STATUSES = ('ok', 'unstable', 'failed', 'diverged')


def _finite_fraction(x: np.ndarray) -> float:
  return float(np.mean(np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))


def _ed(x: np.ndarray, reference: np.ndarray) -> float:
  if not np.all(np.isfinite(x)):
    return float('nan')
  return energy_distance(x, reference)


def sample_quality(exp, state, reference: np.ndarray, num: int,
                   steps: Sequence[int] = (1, 2), seed: int = 0,
                   ema: Optional[str] = None) -> dict:
  """Energy distances of 1-/2-step (or teacher ODE) samples to `reference` data.

  Returns ed_<name>, finite_<name> (fraction of finite samples), std_<name> for every
  sampler, plus ed_noise (prior noise vs reference), ed_data (training data vs
  reference) and data_std. `ema` picks the weights (None = config.sample.ema,
  'params' = raw weights: a 0.999 EMA of a few hundred steps is still mostly the init).
  """
  c = exp.config
  key = jax.random.PRNGKey(seed)
  reference = np.asarray(reference, np.float64)
  out = {'data_std': float(reference.std())}
  runs = ([('consistency', s, f'{s}step') for s in steps] if exp.is_consistency_model
          else [('ode', c.sample.ode_steps, f'ode{c.sample.ode_steps}')])
  for i, (method, n, name) in enumerate(runs):
    x = exp.sample(state, num, n, key=jax.random.fold_in(key, i), method=method, ema=ema)
    out[f'ed_{name}'] = _ed(x, reference)
    out[f'finite_{name}'] = _finite_fraction(x)
    out[f'std_{name}'] = float(np.nanstd(np.where(np.isfinite(x), x, np.nan)))
  rng = np.random.default_rng(seed)
  noise = c.trigflow.sigma_d * rng.standard_normal((num,) + reference.shape[1:])
  out['ed_noise'] = energy_distance(noise, reference)
  train = exp.source.get(np.sort(rng.choice(len(exp.source), min(num, len(exp.source)),
                                            replace=False)))['x']
  out['ed_data'] = energy_distance(train, reference)
  return out


def training_summary(rows: Sequence[Mapping]) -> dict:
  """Final and worst values from metrics.jsonl rows (one per log interval)."""
  if not rows:
    return {'final_step': 0}
  last = rows[-1]
  out = {'final_step': int(last['step'])}
  for k in ('loss', 'mse', 'grad_norm', 'tangent_norm', 'weight'):
    if k in last:
      out[f'final_{k}'] = float(last[k])
  for k in ('mse', 'grad_norm'):
    values = [float(r[k]) for r in rows if k in r]
    if values:
      out[f'max_{k}'] = float(np.nanmax(values)) if np.any(np.isfinite(values)) else math.nan
  out['skipped_steps'] = int(last.get('nonfinite_total', 0))
  out['nonfinite_loss_logs'] = int(sum(not math.isfinite(float(r.get('loss', 0.0)))
                                      for r in rows))
  return out


def sampler_names(metrics: Mapping) -> list[str]:
  """['1step', '2step'] or ['ode50']: the samplers that sample_quality measured."""
  return [k[3:] for k in metrics if k.startswith('ed_') and k not in ('ed_noise', 'ed_data')]


STOPPED = 'training stopped on non-finite steps'


def classify(metrics: Mapping, stopped: bool = False,
             mse_limit: float = 10.0) -> tuple[str, str]:
  """(status, reason) of a finished run from its merged summary and sample metrics."""
  if stopped:
    return 'diverged', STOPPED
  if metrics.get('nonfinite_loss_logs', 0) > 0:
    return 'diverged', 'non-finite logged loss'
  if metrics.get('max_mse', 0.0) > mse_limit:
    return 'diverged', f'training mse exploded (max {metrics["max_mse"]:.3g} > {mse_limit:g})'
  for k in ('final_loss', 'final_grad_norm'):
    if k in metrics and not math.isfinite(metrics[k]):
      return 'diverged', f'{k} is not finite'
  names = sampler_names(metrics)
  for name in names:
    if not math.isfinite(metrics[f'ed_{name}']) or metrics.get(f'finite_{name}', 1.0) < 1.0:
      return 'diverged', f'{name} samples are not finite'
  for name in names:
    if 'ed_noise' in metrics and metrics[f'ed_{name}'] >= metrics['ed_noise']:
      return 'failed', f'{name} samples are no closer to the data than noise'
  if metrics.get('skipped_steps', 0) > 0:
    return 'unstable', f'{metrics["skipped_steps"]} steps skipped (non-finite)'
  return 'ok', ''
