"""Run or submit an ablation sweep: one training job per point, each in its own workdir.

    python -m launch.sweep --sweep=configs/sweeps/toy_stability.py --base=configs/toy2d_sct.py \
        --backend=local [--parallel=2] [--root=runs/sweeps/toy_stability]
    python -m launch.sweep --sweep=... --backend=slurm [--dry_run] [--slurm_partition=gpu ...]
    python -m scm_jax.report --root=runs/sweeps/toy_stability    # the results table

The root holds sweep.json (the points) and one workdir per point with point.json (its
recipe and overrides), the usual training outputs, log.txt and result.json (status,
training summary and sample metrics). Rerunning the same command skips finished points
and resumes unfinished ones from their checkpoints. Every job runs `run_point` (train,
then evaluate, see scm_jax/evaluation/run_metrics.py): the local backend as a process
`python -m launch.sweep --point=WORKDIR`, the SLURM backend as a submitit job array
(`PointJob`, requeued after preemption; logs in <root>/submitit/).
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
  flags.DEFINE_integer('parallel', 1, 'local: jobs run at once (1 = sequential).',
                       lower_bound=1)
  flags.DEFINE_bool('dry_run', False, 'Write workdirs / scripts and print the commands, '
                    'but run or submit nothing.')
  flags.DEFINE_string('only', '', 'Run only these point indices, e.g. "0,3,5-8" '
                      '(default all).')
  flags.DEFINE_bool('rerun', False, 'Also run points that already have result.json.')
  flags.DEFINE_integer('eval_num', 2000, 'Samples (and held-out examples, at most) for the '
                       'end-of-run energy distances.', lower_bound=1)
  flags.DEFINE_string('eval_ema', '', "Weights for the end-of-run samples: '' = the "
                      "config's sample.ema, 'params' = raw weights (short runs).")
  flags.DEFINE_string('python', None, 'Interpreter the jobs run (default: this one).')
  flags.DEFINE_enum('slurm_cluster', 'slurm', ['slurm', 'local', 'debug'],
                    'submitit executor of --backend=slurm: slurm (sbatch), or the same jobs '
                    'on this machine: local (processes) / debug (in this process).')
  flags.DEFINE_string('slurm_partition', '', 'sbatch --partition.')
  flags.DEFINE_string('slurm_time', '04:00:00', 'sbatch --time ([D-]HH:MM[:SS]).')
  flags.DEFINE_integer('slurm_gpus', 1, 'GPUs per job (--gpus-per-node; 0 = none).',
                       lower_bound=0)
  flags.DEFINE_integer('slurm_cpus', 8, 'sbatch --cpus-per-task.', lower_bound=1)
  flags.DEFINE_string('slurm_mem', '', "sbatch --mem (e.g. '64G').")
  flags.DEFINE_integer('slurm_array_parallelism', 0, 'Jobs of the array running at once '
                       '(0 = submitit default).', lower_bound=0)
  flags.DEFINE_multi_string('slurm_extra', [], 'Extra sbatch option, e.g. '
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
  from scm_jax.infra.files import atomic_write_text, read_json
  path = os.path.join(root, 'sweep.json')
  if os.path.exists(path):
    old = read_json(path)
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
  from scm_jax.infra import files
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
        res = files.read_json(os.path.join(p['workdir'], 'result.json'))
        print(f'[sweep] done {name}: {res["status"]} {res.get("reason", "")} '
              f'({time.time() - t0:.0f} s)', flush=True)
    if running:
      time.sleep(0.5)
  return failed


def _minutes(hms: str) -> int:
  """'[D-]HH:MM[:SS]' (sbatch --time) -> whole minutes, rounded up."""
  try:
    days, _, clock = hms.rpartition('-')
    parts = [int(v) for v in clock.split(':')]
    h, m, sec = (parts + [0, 0])[:3] if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + (1 if sec else 0)
  except ValueError:
    raise ConfigError(f'--slurm_time={hms!r}: expected [D-]HH:MM[:SS], e.g. 04:00:00.') from None


def executor_parameters(opts) -> dict:
  """submitit parameters from the --slurm_* flags (slurm_* keys apply on SLURM only)."""
  params = {'timeout_min': _minutes(opts['time']), 'cpus_per_task': opts['cpus'],
            'tasks_per_node': 1, 'nodes': 1,
            # SIGUSR2 this long before the time limit: the run checkpoints and is requeued.
            'slurm_signal_delay_s': 120}
  if opts['gpus']:
    params['gpus_per_node'] = opts['gpus']
  if opts['partition']:
    params['slurm_partition'] = opts['partition']
  if opts['mem']:
    params['slurm_mem'] = opts['mem']
  if opts['setup']:
    params['slurm_setup'] = [opts['setup']]
  if opts['array_parallelism']:
    params['slurm_array_parallelism'] = opts['array_parallelism']
  extra = {}
  for item in opts['extra']:
    key, _, value = item.lstrip('-').partition('=')
    if not key:
      raise ConfigError(f'--slurm_extra={item!r}: expected --option=value, e.g. --account=abc.')
    extra[key.replace('-', '_')] = value or True
  if extra:
    params['slurm_additional_parameters'] = extra
  return params


class PointJob:
  """One sweep point as a submitit job: `run_point` (train, resuming; then evaluate).

  Preemption relies on the project's own checkpointing: SLURM's SIGTERM, or the SIGUSR2
  submitit asks for before the time limit, makes the training loop save a checkpoint
  after the step in flight and raise Preempted (train/preemption.py). The job then
  hands SIGUSR2 to submitit's handler (restored by the loop), which calls `checkpoint()`
  and requeues the same point; the requeued job resumes from that checkpoint.
  """

  def __init__(self, workdir: str, eval_num: int, eval_ema: str = ''):
    self.workdir, self.eval_num, self.eval_ema = workdir, eval_num, eval_ema

  def __call__(self):
    import signal  # pylint: disable=g-import-not-at-top
    from scm_jax.train import preemption  # pylint: disable=g-import-not-at-top
    try:
      run_point(self.workdir, self.eval_num, self.eval_ema)
    except preemption.Preempted as e:
      print(f'[sweep] {e}', file=sys.stderr, flush=True)
      os.kill(os.getpid(), signal.SIGUSR2)  # submitit: checkpoint() and requeue
      time.sleep(600)  # its handler exits the process
      raise

  def checkpoint(self):
    """Submitit's requeue hook: the same point again (it resumes from its workdir)."""
    import submitit  # pylint: disable=g-import-not-at-top
    return submitit.helpers.DelayedSubmission(PointJob(self.workdir, self.eval_num,
                                                       self.eval_ema))


def run_submitit(points, root, cluster, python, eval_num, opts, dry_run, eval_ema=''):
  """Submits one submitit job per point, as one job array (SLURM); returns #failed.

  cluster='slurm' submits with sbatch; 'local' runs the jobs as processes on this
  machine and 'debug' in this process (tests, trying a sweep without a cluster).
  """
  import submitit  # pylint: disable=g-import-not-at-top
  from scm_jax.infra import files
  if cluster == 'slurm' and not dry_run and shutil.which('sbatch') is None:
    raise ConfigError('sbatch is not on PATH: this machine has no SLURM. Run on the '
                      'cluster login node, use --backend=local, or --dry_run to only '
                      'print the jobs.')
  params = executor_parameters(opts)
  if dry_run:
    for p in points:
      print(f'[sweep] would submit {p["name"]} ({cluster}): '
            f'{PointJob.__module__}.PointJob({p["workdir"]!r})')
    print(f'[sweep] executor parameters: {json.dumps(params, sort_keys=True)}')
    return 0
  folder = os.path.join(root, 'submitit')
  kwargs = {f'{cluster}_python': python} if python and cluster != 'debug' else {}
  executor = submitit.AutoExecutor(folder=os.path.join(folder, '%j'), cluster=cluster,
                                   **kwargs)
  executor.update_parameters(name=os.path.basename(os.path.normpath(root)), **params)
  with executor.batch():
    submitted = [(p, executor.submit(PointJob(os.path.abspath(p['workdir']), eval_num,
                                              eval_ema))) for p in points]
  jobs_path = os.path.join(folder, 'jobs.json')
  jobs = files.read_json(jobs_path) if os.path.exists(jobs_path) else {}
  jobs.update({p['name']: job.job_id for p, job in submitted})
  files.atomic_write_text(jobs_path, json.dumps(jobs, indent=2))
  for p, job in submitted:
    print(f'[sweep] submitted {p["name"]} as job {job.job_id}', flush=True)
  if cluster == 'slurm':
    return 0
  failed = 0
  for p, job in submitted:  # local / debug: wait, as the local backend does
    try:
      job.result()
    except Exception as e:  # pylint: disable=broad-except
      failed += 1
      print(f'[sweep] FAILED {p["name"]}: {(str(e).splitlines() or [""])[-1]}', flush=True)
  return failed


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

  point = files.read_json(os.path.join(workdir, 'point.json'))
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
    from scm_jax.train import preemption
    try:
      return run_point(FLAGS.point, FLAGS.eval_num, FLAGS.eval_ema)
    except preemption.Preempted as e:  # checkpoint saved: exit 128 + signal, no traceback
      print(f'[sweep] {e}', file=sys.stderr, flush=True)
      sys.exit(e.exit_code)
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
            'extra': FLAGS.slurm_extra, 'setup': FLAGS.slurm_setup,
            'array_parallelism': FLAGS.slurm_array_parallelism}
    failed = run_submitit(todo, root, FLAGS.slurm_cluster, FLAGS.python, FLAGS.eval_num,
                          opts, FLAGS.dry_run, FLAGS.eval_ema)
  if not FLAGS.dry_run and (FLAGS.backend == 'local' or FLAGS.slurm_cluster != 'slurm'):
    print(f'[sweep] finished; table: python -m scm_jax.report --root={root}', flush=True)
  if failed:
    print(f'error: {failed} job(s) failed; see their log.txt.', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
