"""Run or submit an ablation sweep: one training job per point, each in its own workdir.

    python -m launch.sweep --sweep=configs/sweeps/toy_stability.py --base=configs/toy2d_sct.py \
        --backend=local [--parallel=2] [--root=runs/sweeps/toy_stability]
    python -m launch.sweep --sweep=... --backend=slurm [--dry_run] [--slurm_partition=gpu ...]
    python -m scm_jax.report --root=runs/sweeps/toy_stability    # the results table

The root holds sweep.json (the points) and one workdir per point with point.json (its
recipe and overrides), the usual training outputs, log.txt and result.json (status,
training summary and sample metrics, written by `--point`). Rerunning the same command
skips finished points and resumes unfinished ones from their checkpoints.
`--point=WORKDIR` is what every job runs: train, then evaluate (see
scm_jax/evaluation/run_metrics.py).
"""

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from absl import flags

from scm_jax import cli
from scm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS


def _define_flags():
  """Defined only when run as a program: importing this module (e.g. from a notebook
  or a test) leaves absl's global flags alone."""
  flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/*.py, get_sweep()).')
  flags.DEFINE_string('base', None, "Recipe every point starts from (default: the sweep "
                      "file's BASE).")
  flags.DEFINE_enum('backend', 'local', ['local', 'slurm'], 'Where jobs run.')
  flags.DEFINE_string('root', None, 'Sweep directory (default runs/sweeps/<sweep name>).')
  flags.DEFINE_multi_string('set', [], 'Override for every point (wins over the sweep), '
                            'e.g. --set=train.num_steps=2000 (repeatable).')
  flags.DEFINE_integer('parallel', 1, 'local: jobs run at once (1 = sequential).')
  flags.DEFINE_bool('dry_run', False, 'Write workdirs / scripts and print the commands, '
                    'but run or submit nothing.')
  flags.DEFINE_string('only', '', 'Run only these point indices, e.g. "0,3,5-8" '
                      '(default all).')
  flags.DEFINE_bool('rerun', False, 'Also run points that already have result.json.')
  flags.DEFINE_integer('eval_num', 2000, 'Samples (and held-out examples, at most) for the '
                       'end-of-run energy distances.')
  flags.DEFINE_string('eval_ema', '', "Weights for the end-of-run samples: '' = the "
                      "config's sample.ema, 'params' = raw weights (short runs).")
  flags.DEFINE_string('python', None, 'Interpreter the jobs run (default: this one for '
                      "local jobs, 'python' on PATH after --slurm_setup for SLURM).")
  flags.DEFINE_string('slurm_partition', '', 'sbatch --partition.')
  flags.DEFINE_string('slurm_time', '04:00:00', 'sbatch --time.')
  flags.DEFINE_integer('slurm_gpus', 1, 'GPUs per job (--gres=gpu:N; 0 = none).')
  flags.DEFINE_integer('slurm_cpus', 8, 'sbatch --cpus-per-task.')
  flags.DEFINE_string('slurm_mem', '', "sbatch --mem (e.g. '64G').")
  flags.DEFINE_multi_string('slurm_extra', [], 'Extra "#SBATCH ..." option, e.g. '
                            '--slurm_extra=--account=abc (repeatable).')
  flags.DEFINE_string('slurm_setup', '', 'Shell line run before the job (e.g. "module '
                      'load cuda; source .venv/bin/activate").')
  flags.DEFINE_string('point', None, 'Internal: run the one point in this workdir.')


# --------------------------------------------------------------------- planning

def parse_set(items):
  """['a.b=1', 'c=x'] -> {'a.b': 1, 'c': 'x'} (Python literals, else strings)."""
  out = {}
  for item in items:
    if '=' not in item:
      raise ConfigError(f'--set={item!r}: expected section.field=value.')
    k, v = item.split('=', 1)
    try:
      out[k.strip()] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      out[k.strip()] = v
  return out


def plan(sweep_path, base, root, extra):
  """Loads and checks every point; returns the manifest dict (nothing written)."""
  from scm_jax import config as config_lib
  from scm_jax import sweep as sweep_lib
  points, default_base = sweep_lib.load_sweep(sweep_path)
  base = base or default_base
  if not base:
    raise ConfigError(f'no --base given and {sweep_path} sets no BASE recipe.')
  base = os.path.relpath(os.path.abspath(base), REPO) if not os.path.isabs(base) else base
  recipe = sweep_lib.load_recipe(os.path.join(REPO, base))
  keys = sweep_lib.varying_keys(points)
  entries = []
  for i, p in enumerate(points):
    overrides = {'train.progress_bar': False, **p, **extra}
    # Validated once, here: a bad point fails before any job starts.
    config_lib.validate_config(sweep_lib.point_config(recipe, overrides))
    name = sweep_lib.point_name(i, p, keys)
    entries.append({'name': name, 'overrides': overrides,
                    'workdir': os.path.join(root, name)})
  return {'sweep': sweep_path, 'base': base, 'varying': keys, 'points': entries}


def write_manifest(manifest, root):
  """sweep.json + one point.json per workdir; refuses to mix two sweeps in one root
  (rerunning the identical sweep resumes it)."""
  from scm_jax.infra.files import atomic_write_text
  path = os.path.join(root, 'sweep.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    def points(m):
      return [(p['name'], p['overrides']) for p in m.get('points', [])]
    new = json.loads(json.dumps(manifest))  # tuples -> lists, as stored
    if points(old) != points(new) or old.get('base') != new['base']:
      changed = [n for n, o in points(new) if (n, o) not in points(old)]
      raise ConfigError(f'{root} already holds a different sweep (base {old.get("base")!r}, '
                        f'{len(points(old))} points; new or changed here: '
                        f'{changed[:3] or "none, but points were removed"}). Use a new '
                        '--root; nothing was changed.')
  os.makedirs(root, exist_ok=True)
  atomic_write_text(path, json.dumps(manifest, indent=2))
  for p in manifest['points']:
    os.makedirs(p['workdir'], exist_ok=True)
    atomic_write_text(os.path.join(p['workdir'], 'point.json'),
                      json.dumps({'base': manifest['base'], 'name': p['name'],
                                  'overrides': p['overrides']}, indent=2))


def parse_only(spec, num_points):
  """'0,3,5-8' -> {0, 3, 5, 6, 7, 8}; '' -> every index."""
  if not spec:
    return set(range(num_points))
  out = set()
  try:
    for part in spec.split(','):
      lo, _, hi = part.partition('-')
      out.update(range(int(lo), int(hi or lo) + 1))
  except ValueError:
    raise ConfigError(f'--only={spec!r}: expected point indices like "0,3,5-8".') from None
  bad = sorted(i for i in out if not 0 <= i < num_points)
  if bad:
    raise ConfigError(f'--only={spec!r}: no point {bad[0]}; the sweep has {num_points}.')
  return out


def point_command(workdir, python, eval_num, eval_ema=''):
  cmd = [python, '-m', 'launch.sweep', f'--point={os.path.abspath(workdir)}',
         f'--eval_num={eval_num}']
  return cmd + ([f'--eval_ema={eval_ema}'] if eval_ema else [])


def is_done(workdir):
  return os.path.exists(os.path.join(workdir, 'result.json'))


# --------------------------------------------------------------------- backends

def run_local(points, python, eval_num, parallel, dry_run, eval_ema=''):
  """Runs the points' jobs as subprocesses, `parallel` at a time; returns #failed."""
  queue = list(points)
  running, failed = {}, 0
  while queue or running:
    while queue and len(running) < max(1, parallel):
      p = queue.pop(0)
      cmd = point_command(p['workdir'], python, eval_num, eval_ema)
      print(f'[sweep] {"would run" if dry_run else "start"} {p["name"]}: {shlex.join(cmd)}',
            flush=True)
      if dry_run:
        continue
      log = open(os.path.join(p['workdir'], 'log.txt'), 'a')
      running[p["name"]] = (subprocess.Popen(cmd, cwd=REPO, stdout=log,
                                             stderr=subprocess.STDOUT), log, p, time.time())
    for name, (proc, log, p, t0) in list(running.items()):
      if proc.poll() is None:
        continue
      log.close()
      del running[name]
      if proc.returncode != 0:
        failed += 1
        print(f'[sweep] FAILED {name} (exit {proc.returncode}); see '
              f'{os.path.join(p["workdir"], "log.txt")}', flush=True)
      else:
        with open(os.path.join(p['workdir'], 'result.json')) as f:
          res = json.load(f)
        print(f'[sweep] done {name}: {res["status"]} {res.get("reason", "")} '
              f'({time.time() - t0:.0f} s)', flush=True)
    if running:
      time.sleep(0.5)
  return failed


def sbatch_script(p, manifest_sweep, python, eval_num, opts, eval_ema=''):
  """The text of one job's sbatch script."""
  lines = ['#!/bin/bash',
           f'#SBATCH --job-name={os.path.splitext(os.path.basename(manifest_sweep))[0]}-{p["name"]}'[:200],
           f'#SBATCH --output={os.path.abspath(p["workdir"])}/slurm-%j.out',
           f'#SBATCH --time={opts["time"]}',
           f'#SBATCH --cpus-per-task={opts["cpus"]}',
           '#SBATCH --ntasks=1']
  if opts['partition']:
    lines.append(f'#SBATCH --partition={opts["partition"]}')
  if opts['gpus']:
    lines.append(f'#SBATCH --gres=gpu:{opts["gpus"]}')
  if opts['mem']:
    lines.append(f'#SBATCH --mem={opts["mem"]}')
  lines += [f'#SBATCH {e}' for e in opts['extra']]
  lines += ['set -eo pipefail', f'cd {shlex.quote(REPO)}']
  if opts['setup']:
    lines.append(opts['setup'])
  lines += [f'export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}',
            'srun ' + shlex.join(point_command(p['workdir'], python, eval_num, eval_ema))]
  return '\n'.join(lines) + '\n'


def run_slurm(points, manifest, root, python, eval_num, opts, dry_run, eval_ema=''):
  """Writes <root>/slurm/<name>.sbatch per point and submits them with sbatch."""
  from scm_jax.infra.files import atomic_write_text
  sbatch = shutil.which('sbatch')
  if not dry_run and sbatch is None:
    raise ConfigError('sbatch is not on PATH: this machine has no SLURM. Run on the '
                      'cluster login node, use --backend=local, or --dry_run to only '
                      'write the scripts.')
  os.makedirs(os.path.join(root, 'slurm'), exist_ok=True)
  jobs_path = os.path.join(root, 'slurm', 'jobs.json')
  jobs = json.load(open(jobs_path)) if os.path.exists(jobs_path) else {}
  for p in points:
    path = os.path.join(root, 'slurm', f'{p["name"]}.sbatch')
    atomic_write_text(path, sbatch_script(p, manifest['sweep'], python, eval_num, opts,
                                          eval_ema))
    if dry_run:
      print(f'[sweep] wrote {path}')
      continue
    out = subprocess.run([sbatch, '--parsable', path], capture_output=True, text=True)
    if out.returncode != 0:
      raise ConfigError(f'sbatch {path} failed: {out.stderr.strip()}')
    jobs[p['name']] = out.stdout.strip().split(';')[0]
    atomic_write_text(jobs_path, json.dumps(jobs, indent=2))
    print(f'[sweep] submitted {p["name"]} as job {jobs[p["name"]]}')
  return 0


# --------------------------------------------------------------------- one point

def run_point(workdir, eval_num, eval_ema=''):
  """Trains one point (resuming), evaluates it, writes result.json. Divergence is a result."""
  from scm_jax import sweep as sweep_lib
  from scm_jax.evaluation import generate
  from scm_jax.evaluation import run_metrics
  from scm_jax.infra import files
  from scm_jax.train import loop
  from scm_jax.train import nonfinite
  from scm_jax.train import workdir as workdir_lib

  with open(os.path.join(workdir, 'point.json')) as f:
    point = json.load(f)
  config = sweep_lib.point_config(sweep_lib.load_recipe(os.path.join(REPO, point['base'])),
                                  point['overrides'])
  t0 = time.time()
  stopped, error = False, ''
  try:
    run = loop.train_and_evaluate(config, workdir)
  except nonfinite.NonFiniteError as e:
    # A streak of non-finite steps is a result of the ablation, not a user error; the
    # parameters are those from before the streak.
    stopped, error, run = True, str(e), e.run
  train_seconds = time.time() - t0

  metrics = run_metrics.training_summary(
      files.read_jsonl(os.path.join(workdir, workdir_lib.METRICS_FILE)))
  exp = run.experiment
  reference = generate.reference_data(config.data, config.data.eval_split, eval_num)
  metrics.update(run_metrics.sample_quality(exp, run.state, reference, eval_num,
                                            tuple(config.sample.steps),
                                            ema=eval_ema or None))
  metrics['eval_ema'] = eval_ema or config.sample.ema or 'first EMA'
  metrics['eval_step'] = int(run.state.step)
  status, reason = run_metrics.classify(metrics, stopped)
  result = {'name': point['name'], 'status': status, 'reason': reason, 'error': error,
            'stopped': stopped,
            'train_seconds': train_seconds, 'metrics': metrics,
            'overrides': point['overrides']}
  files.atomic_write_text(os.path.join(workdir, 'result.json'), json.dumps(result, indent=2))
  print(f'[sweep] {point["name"]}: {status} {reason}', file=sys.stderr)


def main(argv):
  del argv
  if FLAGS.point:
    return run_point(FLAGS.point, FLAGS.eval_num, FLAGS.eval_ema)
  if not FLAGS.sweep:
    raise ConfigError('--sweep=configs/sweeps/<name>.py is required.')
  name = os.path.splitext(os.path.basename(FLAGS.sweep))[0]
  root = FLAGS.root or os.path.join('runs', 'sweeps', name)
  manifest = plan(FLAGS.sweep, FLAGS.base, root, parse_set(FLAGS.set))
  write_manifest(manifest, root)
  only = parse_only(FLAGS.only, len(manifest['points']))
  todo = [p for i, p in enumerate(manifest['points'])
          if i in only and (FLAGS.rerun or not is_done(p['workdir']))]
  print(f'[sweep] {len(manifest["points"])} points in {root} ({len(todo)} to run; '
        f'varying: {", ".join(manifest["varying"]) or "nothing"})', flush=True)
  if FLAGS.backend == 'local':
    failed = run_local(todo, FLAGS.python or sys.executable, FLAGS.eval_num,
                       FLAGS.parallel, FLAGS.dry_run, FLAGS.eval_ema)
  else:
    opts = {'partition': FLAGS.slurm_partition, 'time': FLAGS.slurm_time,
            'gpus': FLAGS.slurm_gpus, 'cpus': FLAGS.slurm_cpus, 'mem': FLAGS.slurm_mem,
            'extra': FLAGS.slurm_extra, 'setup': FLAGS.slurm_setup}
    failed = run_slurm(todo, manifest, root, FLAGS.python or 'python', FLAGS.eval_num,
                       opts, FLAGS.dry_run, FLAGS.eval_ema)
  if not FLAGS.dry_run and FLAGS.backend == 'local':
    print(f'[sweep] finished; table: python -m scm_jax.report --root={root}', flush=True)
  if failed:
    print(f'error: {failed} job(s) failed; see their log.txt.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
