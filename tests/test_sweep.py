"""Sweeps (scm_jax/sweep.py, launch/sweep.py), run metrics, the report, loss-by-time plots."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from scm_jax import sweep as sweep_lib
from scm_jax.infra import visualize
from scm_jax.errors import ConfigError
from scm_jax.evaluation import run_metrics
from tests import helpers

# A tiny toy MLP: fast to compile, learns the ring's rough shape in ~100 steps.
TINY_TOY = {'model.width': 32, 'model.depth': 2, 'model.time_embed_dim': 32,
            'model.logvar_channels': 16, 'train.batch_size': 64, 'train.num_steps': 100,
            'train.log_every': 20, 'train.sample_every': 100, 'train.ckpt_every': 50,
            'loss.tangent_warmup_steps': 50, 'optim.warmup_steps': 10,
            'sample.ema': 'params', 'sample.num': 512, 'data.prefetch': 0,
            'data.num_train': 4096, 'data.num_test': 512}


def test_grid_chain_fixed_and_names():
  g = sweep_lib.grid({'loss.tangent_norm': [True, False], 'model.time_embed_scale': [1.0, 10.0, 1000.0]})
  assert len(g) == 6 and g[0] == {'loss.tangent_norm': True, 'model.time_embed_scale': 1.0}
  assert g[3] == {'loss.tangent_norm': False, 'model.time_embed_scale': 1.0}  # first axis slowest
  pts = sweep_lib.chain(g, [{'loss.tangent_norm': True, 'model.time_embed_scale': 10.0}],
                        [{'model.time_embed_kind': 'fourier'}])
  assert len(pts) == 7  # the repeated point is kept once
  pts = sweep_lib.fixed({'train.num_steps': 5, 'loss.tangent_norm': True}, pts)
  assert pts[3]['loss.tangent_norm'] is False and all(p['train.num_steps'] == 5 for p in pts)
  keys = sweep_lib.varying_keys(pts)
  assert keys == ['loss.tangent_norm', 'model.time_embed_scale', 'model.time_embed_kind']
  names = [sweep_lib.point_name(i, p, keys) for i, p in enumerate(pts)]
  assert len(set(names)) == len(names)
  assert names[5] == 'p05_tnorm-off_tscale-1000'
  assert sweep_lib.override_flags({'sample.steps': (1,), 'loss.kind': 'sct', 'optim.lr': 0.5}) == [
      '--config.sample.steps=(1,)', '--config.loss.kind=sct', '--config.optim.lr=0.5']
  with pytest.raises(ConfigError, match='non-empty list'):
    sweep_lib.grid({'optim.lr': 1e-3})


def test_point_config_checks_fields_and_plan_checks_values(tmp_path):
  base = sweep_lib.load_recipe('configs/toy2d_sct.py')
  c = sweep_lib.point_config(base, {'loss.tangent_norm': False, 'model.time_embed_scale': 1000})
  assert c.loss.tangent_norm is False and c.model.time_embed_scale == 1000.0
  assert base.loss.tangent_norm is True  # the recipe is not modified
  with pytest.raises(ConfigError, match='loss.tangent_nrom'):
    sweep_lib.point_config(base, {'loss.tangent_nrom': False})
  with pytest.raises(ConfigError, match='optim.lr'):
    sweep_lib.point_config(base, {'optim.lr': 'fast'})  # type-checked by ml_collections
  from launch import sweep as launch_sweep
  sweep_file = tmp_path / 'bad.py'
  sweep_file.write_text("def get_sweep():\n  return [{'loss.kind': 'sctt'}]\n")
  with pytest.raises(ConfigError, match='loss.kind'):  # validate_config runs when planning
    launch_sweep.plan(str(sweep_file), 'configs/toy2d_sct.py', str(tmp_path / 'root'), {})


def test_only_selects_points_and_modules_import_without_flags():
  from launch import sweep as launch_sweep
  from scm_jax import report  # both define --root, but only when run as programs
  assert report.default_metric(['run', 'ed_1step', 'ed_2step']) == 'ed_2step'
  assert launch_sweep.parse_only('0,3,5-7', 10) == {0, 3, 5, 6, 7}
  assert launch_sweep.parse_only('', 3) == {0, 1, 2}
  with pytest.raises(ConfigError, match='no point 12'):
    launch_sweep.parse_only('12', 10)
  with pytest.raises(ConfigError, match='indices'):
    launch_sweep.parse_only('a', 10)


def test_classify_from_numbers():
  good = {'final_loss': -1.0, 'final_grad_norm': 0.5, 'ed_1step': 0.01, 'ed_2step': 0.005,
          'finite_1step': 1.0, 'finite_2step': 1.0, 'ed_noise': 0.1, 'skipped_steps': 0}
  assert run_metrics.classify(good) == ('ok', '')
  assert run_metrics.classify(good, stopped=True)[0] == 'diverged'
  assert run_metrics.classify(dict(good, skipped_steps=3))[0] == 'unstable'
  assert run_metrics.classify(dict(good, ed_1step=0.2))[0] == 'failed'
  assert run_metrics.classify(dict(good, ed_1step=0.2, finite_2step=0.9))[0] == 'diverged'
  assert run_metrics.classify(dict(good, ed_2step=math.nan))[0] == 'diverged'
  assert run_metrics.classify(dict(good, final_loss=math.inf))[0] == 'diverged'
  assert run_metrics.classify(dict(good, max_mse=490.0))[0] == 'diverged'  # clipped blow-up
  assert run_metrics.classify(dict(good, max_mse=0.5))[0] == 'ok'
  s = run_metrics.training_summary([{'step': 5, 'loss': 1.0, 'grad_norm': 3.0},
                                    {'step': 10, 'loss': math.nan, 'grad_norm': 1.0,
                                     'nonfinite_total': 4}])
  assert s['final_step'] == 10 and s['max_grad_norm'] == 3.0 and s['skipped_steps'] == 4
  assert s['nonfinite_loss_logs'] == 1 and run_metrics.classify(s)[0] == 'diverged'


def test_loss_by_time_plot_reads_bucket_scalars():
  scalars = {'loss': 1.0, 'mse_by_t/0.79-0.98': 0.3, 'mse_by_t/0.00-0.20': 0.1}
  t, mse = visualize.loss_by_time(scalars)
  np.testing.assert_allclose(t, [0.10, 0.885])
  np.testing.assert_allclose(mse, [0.1, 0.3])
  img = visualize.loss_by_time_plot([(10, scalars), (20, scalars)])
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
  assert img.std() > 10  # something was drawn


def _write_sweep(path, points):
  path.write_text(textwrap.dedent(f'''
      from scm_jax import sweep
      BASE = 'configs/toy2d_sct.py'
      def get_sweep():
        return sweep.fixed({TINY_TOY!r}, {points!r})
  '''))
  return str(path)


def test_local_sweep_runs_points_and_report_tables_them(tmp_path):
  """Two points in parallel: a working one and one whose huge LR makes every step non-finite."""
  root = str(tmp_path / 'sweep')
  sweep_file = _write_sweep(tmp_path / 'tiny.py', [
      {'optim.lr': 1e-3},
      {'optim.lr': 1e30, 'optim.grad_clip': 0.0, 'train.max_nonfinite_streak': 3}])
  p = helpers.run_module('launch.sweep', f'--sweep={sweep_file}', f'--root={root}',
                         '--parallel=2', '--eval_num=512')
  assert 'done p01_lr-1e30_grad_clip-0_max_nonfinite_streak-3: diverged training stopped' \
      in p.stdout, p.stdout

  good = json.load(open(os.path.join(root, 'p00_lr-0.001', 'result.json')))
  m = good['metrics']
  assert m['final_step'] == 100 and m['eval_step'] == 100 and m['skipped_steps'] == 0
  # 100 tiny steps learn little: the status says whether it beat the prior noise.
  assert good['status'] == ('ok' if max(m['ed_1step'], m['ed_2step']) < m['ed_noise']
                            else 'failed'), good
  assert m['finite_1step'] == m['finite_2step'] == 1.0
  assert abs(m['ed_data']) < 0.01 < min(m['ed_1step'], m['ed_2step'])  # data vs data ~ 0
  wd = os.path.join(root, 'p00_lr-0.001')
  samples = os.listdir(os.path.join(wd, 'samples'))
  assert {'samples_1step_00000100.png', 'samples_2step_00000100.png',
          'loss_by_t_00000100.png'} <= set(samples), samples
  tb = [f for f in os.listdir(os.path.join(wd, 'tb')) if f.startswith('events')]
  assert b'loss_by_t' in open(os.path.join(wd, 'tb', tb[0]), 'rb').read()

  bad_dir = os.path.join(root, 'p01_lr-1e30_grad_clip-0_max_nonfinite_streak-3')
  bad = json.load(open(os.path.join(bad_dir, 'result.json')))
  assert bad['status'] == 'diverged' and 'non-finite' in bad['error']

  # Rerunning skips finished points; the report gathers both rows.
  p = helpers.run_module('launch.sweep', f'--sweep={sweep_file}', f'--root={root}')
  assert '(0 to run' in p.stdout
  p = helpers.run_module('scm_jax.report', f'--root={root}')
  md = open(os.path.join(root, 'report.md')).read()
  assert md in p.stdout
  lines = md.strip().splitlines()
  assert lines[0].startswith('| run | lr | grad_clip | max_nonfinite_streak | status |')
  assert len(lines) == 4
  rows = list(csv.DictReader(open(os.path.join(root, 'report.csv'))))
  assert [r['status'] for r in rows] == [good['status'], 'diverged']
  assert float(rows[0]['ed_2step']) == pytest.approx(m['ed_2step'])
  assert os.path.getsize(os.path.join(root, 'report.png')) > 10000

  # Another sweep in the same root is refused, and nothing is changed.
  before = helpers.tree_digest(root)
  other = _write_sweep(tmp_path / 'other.py', [{'optim.lr': 2e-3}, {'optim.lr': 1e-3}])
  p = helpers.run_module('launch.sweep', f'--sweep={other}', f'--root={root}', check=False)
  assert p.returncode == 2 and p.stderr.startswith('error: ') and 'new --root' in p.stderr
  assert helpers.tree_digest(root) == before


FAKE_SBATCH = """#!/usr/bin/env bash
# Stands in for SLURM's sbatch: keeps the submitted script, answers with a job id.
cp "${@: -1}" "$FAKE_SBATCH_DIR/submitted.sh"
echo "Submitted batch job 4242"
"""


def test_slurm_backend_submits_a_submitit_job_array(tmp_path):
  """--backend=slurm goes through submitit: one sbatch job array with the --slurm_* options,
  SIGUSR2 before the time limit; without SLURM, one clear error line."""
  root = str(tmp_path / 'slurm_sweep')
  args = ['--sweep=configs/sweeps/toy_stability.py', '--base=configs/toy2d_sct.py',
          f'--root={root}', '--backend=slurm', '--slurm_partition=gpu', '--slurm_gpus=2',
          '--slurm_time=01:30:00', '--slurm_extra=--account=abc',
          '--slurm_setup=source .venv/bin/activate', '--eval_ema=params', '--only=0,10']
  p = helpers.run_module('launch.sweep', *args, '--dry_run')
  manifest = json.load(open(os.path.join(root, 'sweep.json')))
  assert len(manifest['points']) == 13 and p.stdout.count('would submit') == 2
  assert manifest['points'][10]['name'] == 'p10_tscale-1000'
  assert '"slurm_partition": "gpu"' in p.stdout and '"timeout_min": 90' in p.stdout
  point = json.load(open(os.path.join(root, 'p10_tscale-1000', 'point.json')))
  assert point['overrides']['model.time_embed_scale'] == 1000.0
  assert point['overrides']['train.num_steps'] == 2000

  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'sbatch').write_text(FAKE_SBATCH)
  (bin_dir / 'srun').write_text('#!/usr/bin/env bash\nexit 1\n')  # submitit looks for it
  for tool in ('sbatch', 'srun'):
    os.chmod(bin_dir / tool, 0o755)
  env = dict(helpers.env(), PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             FAKE_SBATCH_DIR=str(tmp_path))
  p = subprocess.run([sys.executable, '-m', 'launch.sweep', *args], cwd=helpers.REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  script = open(tmp_path / 'submitted.sh').read()
  for line in ('#SBATCH --partition=gpu', '#SBATCH --gpus-per-node=2', '#SBATCH --account=abc',
               '#SBATCH --array=0-1', '#SBATCH --signal=USR2@120', '#SBATCH --time=90',
               'source .venv/bin/activate', 'submitit.core._submit'):
    assert line in script, (line, script)
  jobs = json.load(open(os.path.join(root, 'submitit', 'jobs.json')))
  assert jobs == {manifest['points'][0]['name']: '4242_0', 'p10_tscale-1000': '4242_1'}
  # Without SLURM (and no --dry_run): one clear error line, exit 2.
  p = helpers.run_module('launch.sweep', *args, check=False)
  assert p.returncode == 2 and 'error: sbatch is not on PATH' in p.stderr


@pytest.mark.slow  # one tiny point trained twice over (~1-2 min on 2 cores)
def test_submitit_job_checkpoints_on_sigterm_and_is_requeued(tmp_path):
  """A point run by submitit's local executor: SIGTERM mid-training makes the loop save a
  checkpoint, the job is requeued through submitit and resumes from it to the end."""
  import signal
  import time
  root = str(tmp_path / 'sweep')
  sweep = _write_sweep(tmp_path / 'one.py', [{'optim.lr': 1e-3}])
  tiny = {**TINY_TOY, 'train.num_steps': 400, 'train.ckpt_every': 1000}
  args = [f'--sweep={sweep}', '--base=configs/toy2d_sct.py', f'--root={root}',
          '--backend=slurm', '--slurm_cluster=local', '--slurm_time=00:30:00',
          '--eval_num=256'] + [f'--set={k}={v}' for k, v in tiny.items()]
  proc = subprocess.Popen([sys.executable, '-m', 'launch.sweep', *args], cwd=helpers.REPO,
                          env=helpers.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  workdir = os.path.join(root, 'p00')
  jobs_path = os.path.join(root, 'submitit', 'jobs.json')
  deadline = time.time() + 600
  while time.time() < deadline:  # until the job has logged a few steps
    if os.path.exists(jobs_path) and len(run_metrics_rows(workdir)) >= 2:
      break
    time.sleep(0.5)
  controller = int(json.load(open(jobs_path))['p00'])
  os.kill(controller, signal.SIGTERM)  # the local executor forwards it to the job
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out
  logs = ''.join(open(os.path.join(d, f)).read() for d, _, fs in os.walk(root) for f in fs
                 if f.endswith(('.out', '.err')))
  stopped = [l for l in logs.splitlines() if 'stopped by SIGTERM after step' in l]
  assert stopped and 'Requeued job' in logs, logs
  step = int(stopped[0].split('after step ')[1].split(';')[0])
  assert 0 < step < 400 and f'resumed from step {step}' in logs, logs
  result = json.load(open(os.path.join(workdir, 'result.json')))
  assert result['metrics']['final_step'] == 400 and result['metrics']['eval_step'] == 400


def run_metrics_rows(workdir):
  from scm_jax.infra import files
  return files.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


def test_bad_sweep_file_is_one_error_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_sweep():\n  return [{"loss.no_such_field": 1}]\n')
  p = helpers.run_module('launch.sweep', f'--sweep={bad}', '--base=configs/toy2d_sct.py',
                         f'--root={tmp_path / "r"}', check=False)
  assert p.returncode == 2 and 'loss.no_such_field' in p.stderr
  assert 'Traceback' not in p.stderr and not os.path.exists(tmp_path / 'r')
