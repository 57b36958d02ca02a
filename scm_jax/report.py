"""Gather a sweep's (or any workdirs') final metrics into one table and one plot.

    python -m scm_jax.report --root=runs/sweeps/toy_stability [--out=PREFIX]

writes PREFIX.md (Markdown table), PREFIX.csv and PREFIX.png (training curves and the
final sample metric per run); PREFIX defaults to <root>/report. Rows come from
<root>/sweep.json in sweep order, else from every directory under root holding a
metrics.jsonl. Per run: the swept overrides, status (ok / unstable / failed / diverged, see
scm_jax/evaluation/run_metrics.py; 'incomplete' while a job has no result.json,
'not run' before it logs anything),
final training metrics and the end-of-run energy distances. Usable from a notebook:
`rows, columns = report.collect(root)`.
"""

import csv
import math
import os
from typing import Optional, Sequence

from absl import flags

from scm_jax import cli

FLAGS = flags.FLAGS


def _define_flags():
  """Defined only when run as a program: importing this module (e.g. from a
  notebook) leaves absl's global flags alone."""
  flags.DEFINE_string('root', None, 'Sweep root or directory of training workdirs.')
  flags.DEFINE_string('out', None, 'Output prefix (default <root>/report).')
  flags.DEFINE_string('metric', None, 'Metric for the bar plot (default: ed_2step, else '
                      'the first ed_* column, else final_loss).')


LEADING = ('status', 'final_step', 'final_loss', 'final_mse', 'max_mse', 'final_grad_norm',
           'max_grad_norm', 'skipped_steps')
TRAILING = ('ed_noise', 'ed_data', 'train_seconds', 'reason')


def _read_json(path: str) -> Optional[dict]:
  from scm_jax.infra import files
  return files.read_json(path) if os.path.exists(path) else None


def read_metrics(workdir: str) -> list[dict]:
  """Rows of <workdir>/metrics.jsonl (infra.files.read_jsonl: a torn last line from a
  live run is skipped, a damaged file is an error naming it)."""
  from scm_jax.errors import DataError
  from scm_jax.infra import files
  try:
    return files.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  except ValueError as e:
    raise DataError(str(e)) from None


def _find_workdirs(root: str) -> list[tuple[str, str, dict]]:
  """[(name, workdir, overrides)] in sweep order, or every dir with metrics.jsonl."""
  from scm_jax.errors import ConfigError
  if not os.path.isdir(root):
    raise ConfigError(f'--root={root} is not a directory.')
  manifest = _read_json(os.path.join(root, 'sweep.json'))
  if manifest:
    return [(p['name'], os.path.join(root, p['name']), p['overrides'])
            for p in manifest['points']]
  found = []
  for d, _, files in sorted(os.walk(root)):
    if 'metrics.jsonl' in files:
      point = _read_json(os.path.join(d, 'point.json')) or {}
      found.append((os.path.relpath(d, root) if d != root else os.path.basename(d),
                    d, point.get('overrides', {})))
  if not found:
    raise ConfigError(f'no sweep.json and no training workdir (metrics.jsonl) under {root}.')
  return found


def _config_value(workdir: str, dotted: str, default):
  """The value the run used: from its saved config.json, else `default`."""
  node = _read_json(os.path.join(workdir, 'config.json'))
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def collect(root: str) -> tuple[list[dict], list[str]]:
  """(rows, columns): one row per run, columns in display order."""
  from scm_jax import sweep as sweep_lib
  from scm_jax.evaluation import run_metrics
  runs = _find_workdirs(root)
  varying = sweep_lib.varying_keys([o for _, _, o in runs])
  rows = []
  for name, workdir, overrides in runs:
    row = {'run': name}
    row.update({k: _config_value(workdir, k, overrides.get(k, '')) for k in varying})
    result = _read_json(os.path.join(workdir, 'result.json'))
    history = read_metrics(workdir)
    row.update(run_metrics.training_summary(history))
    if result is not None:
      # Classified again here, so the table follows the current criteria.
      row.update(result['metrics'])
      stopped = result.get('stopped', result.get('reason') == run_metrics.STOPPED)
      status, reason = run_metrics.classify(row, stopped)
      row.update(status=status, reason=reason,
                 train_seconds=round(result.get('train_seconds', 0.0), 1))
    else:
      row['status'] = 'incomplete' if history else 'not run'
    rows.append(row)
  ed = sorted({k for r in rows for k in r if k.startswith('ed_') and k not in TRAILING})
  std = sorted({k for r in rows for k in r if k.startswith('std_')})
  std += ['data_std'] if std else []
  columns = ['run'] + varying + [c for c in LEADING if any(c in r for r in rows)] + ed + std
  columns += [c for c in TRAILING if any(c in r for r in rows)]
  return rows, columns


def _fmt(v) -> str:
  if isinstance(v, bool):
    return 'on' if v else 'off'
  if isinstance(v, float):
    if math.isnan(v) or math.isinf(v):
      return str(v)
    return f'{v:.4g}'
  return str(v)


def to_markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
  header = [c.split('.')[-1] for c in columns]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r.get(c, '')) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
      w.writerow([r.get(c, '') for c in columns])


def default_metric(columns: Sequence[str]) -> str:
  if 'ed_2step' in columns:
    return 'ed_2step'
  eds = [c for c in columns if c.startswith('ed_') and c not in TRAILING]
  return eds[0] if eds else 'final_loss'


def plot(path: str, root: str, rows: Sequence[dict], metric: str) -> None:
  """Three panels: per-run mse and grad-norm curves, and `metric` per run (log x)."""
  from matplotlib import colormaps
  from scm_jax.infra import visualize

  runs = {name: workdir for name, workdir, _ in _find_workdirs(root)}
  colors = {'ok': 'C2', 'unstable': 'C1', 'failed': 'C4', 'diverged': 'C3', 'incomplete': '0.6'}
  fig = visualize.new_figure((20, 0.3 * len(rows) + 4))
  axes = fig.subplots(1, 3, gridspec_kw={'width_ratios': [1, 1, 1.3]})
  for i, r in enumerate(rows):
    hist = read_metrics(runs[r['run']])
    steps = [h['step'] for h in hist]
    for ax, key in zip(axes[:2], ('mse', 'grad_norm')):
      vals = [h.get(key, math.nan) for h in hist]
      ax.plot(steps, vals, color=colormaps['tab20'](i % 20), label=r['run'], lw=1)
  for ax, key in zip(axes[:2], ('training mse', 'gradient norm')):
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(key)
  axes[0].legend(fontsize=6, loc='upper left', bbox_to_anchor=(0, -0.12), ncol=2)
  vals = [r.get(metric, math.nan) for r in rows]
  finite = [v if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else math.nan
            for v in vals]
  ypos = list(range(len(rows)))[::-1]
  axes[2].barh(ypos, finite, color=[colors.get(r['status'], '0.6') for r in rows])
  axes[2].set_yticks(ypos, [r['run'] for r in rows], fontsize=7)
  if any(math.isfinite(v) for v in finite):
    axes[2].set_xscale('log')
  for key, style in (('ed_data', ':'), ('ed_noise', '--')):
    ref = [r[key] for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
    if metric.startswith('ed_') and ref:
      axes[2].axvline(sum(ref) / len(ref), color='k', ls=style, lw=1,
                      label=key.replace('ed_', '') + ' reference')
  axes[2].set_title(f'{metric}: green ok, orange unstable, purple failed, red diverged',
                    fontsize=9)
  if metric.startswith('ed_'):
    axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)


def write_report(root: str, out: Optional[str] = None, metric: Optional[str] = None) -> dict:
  """Writes out.md / out.csv / out.png; returns their paths."""
  rows, columns = collect(root)
  out = out or os.path.join(root, 'report')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  paths = {'md': out + '.md', 'csv': out + '.csv', 'png': out + '.png'}
  metric = metric or default_metric(columns)
  with open(paths['md'], 'w') as f:
    f.write(to_markdown(rows, columns))
  write_csv(paths['csv'], rows, columns)
  plot(paths['png'], root, rows, metric)
  return paths


def main(argv):
  del argv
  from scm_jax.errors import ConfigError
  if not FLAGS.root:
    raise ConfigError('--root=DIR is required (a sweep root or a training workdir).')
  paths = write_report(FLAGS.root, FLAGS.out, FLAGS.metric)
  with open(paths['md']) as f:
    print(f.read(), end='')
  print(f'wrote {paths["md"]}, {paths["csv"]}, {paths["png"]}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
