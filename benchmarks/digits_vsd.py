"""sCD, its continuation, sCD + adaptive VSD variants, multistep and discrete-time sCM on
digits, all scored by the evaluate CLI (digits-classifier FD, precision / recall, accuracy).

Runs (each a `python -m scm_jax.train` workdir under --workdir, skipped when finished):

    teacher       configs/digits_scd.py:teacher (TrigFlow diffusion, 3000 steps)
    scd           configs/digits_scd.py (sCD from the teacher, 1500 steps)
    control       :vsd with loss.kind=scd: sCD continued from `scd` for the VSD stage's steps
    vsd_x0        :vsd, the earlier VSD (x0-unit residual, the student's w head)
    vsd_paper     :vsd, the paper's aVSD (separate w_psi, residual in F units)
    vsd_warmup    vsd_paper after 200 F_phi-only steps on the student's samples
    vsd_k4        vsd_paper with 4 F_phi updates per student update
    multistep2/4  sCD with loss.segments = M (sampled in M steps)
    discrete      discrete-time sCD (loss.time_derivative=discrete)

    python -m benchmarks.digits_vsd --workdir=runs/digits_vsd [--only=teacher,scd,control]
    python -m benchmarks.digits_vsd --only=control,vsd_paper --train_seed=1  # another seed

Every student is evaluated with --num samples at sampling seeds --seeds (mean and each
seed in the JSON); prints a table and writes benchmarks/results/digits_vsd.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = 'fd_digits,pr_digits,digits_cls'
VSD_STEPS = 400  # the student's steps in every post-sCD stage (control and VSD)

# name -> (config, overrides, the runs it starts from, evaluate --steps)
RUNS = {
    'teacher': ('teacher', [], (), '18'),
    'scd': ('student', [], ('teacher',), '1,2'),
    'control': ('vsd', ['loss.kind=scd'], ('teacher', 'scd'), '1,2'),
    'vsd_x0': ('vsd', ['loss.vsd_residual=x0', 'loss.vsd_weight_head=student'],
               ('teacher', 'scd'), '1,2'),
    'vsd_paper': ('vsd', [], ('teacher', 'scd'), '1,2'),
    'vsd_warmup': ('vsd', ['loss.vsd_phi_warmup_steps=200',
                           f'train.num_steps={VSD_STEPS + 200}'], ('teacher', 'scd'), '1,2'),
    'vsd_k4': ('vsd', ['loss.vsd_phi_updates=4'], ('teacher', 'scd'), '1,2'),
    'multistep2': ('student', ['loss.segments=2', 'sample.steps=(2,)'], ('teacher',), '2'),
    'multistep4': ('student', ['loss.segments=4', 'sample.steps=(4,)'], ('teacher',), '4'),
    'discrete': ('student', ['loss.time_derivative=discrete'], ('teacher',), '1,2'),
}


def _run_name(name: str, train_seed: int) -> str:
  return name if train_seed == 0 else f'{name}_s{train_seed}'


def _train(workdir: str, name: str, train_seed: int) -> float:
  stage, overrides, parents, _ = RUNS[name]
  args = [f'--config=configs/digits_scd.py:{stage}',
          f'--workdir={os.path.join(workdir, _run_name(name, train_seed))}',
          f'--config.seed={train_seed}']
  if parents:
    args.append(f'--config.teacher.workdir={os.path.join(workdir, "teacher")}')
  if stage == 'vsd':
    args += [f'--config.teacher.student_workdir={os.path.join(workdir, "scd")}',
             f'--config.train.num_steps={VSD_STEPS}']
  args += [f'--config.{o}' for o in overrides]
  t0 = time.time()
  subprocess.run([sys.executable, '-m', 'scm_jax.train', *args], cwd=REPO, check=True)
  return time.time() - t0


def _evaluate(run_dir: str, steps: str, num: int, seed: int) -> dict:
  """The evaluate CLI's results at sampling seed `seed`, kept per seed in
  eval/digits_vsd_seed<seed>.json (the CLI's metrics file holds the last seed only)."""
  cache = os.path.join(run_dir, 'eval', f'digits_vsd_seed{seed}.json')
  if os.path.exists(cache):
    with open(cache) as f:
      kept = json.load(f)
    if kept['num'] == num:
      return kept['results']
  args = [f'--workdir={run_dir}', f'--metrics={METRICS}', f'--num={num}', f'--seed={seed}',
          f'--steps={steps}']
  if steps == '18':
    args.append('--solver=heun')
  subprocess.run([sys.executable, '-m', 'scm_jax.evaluate', *args], cwd=REPO, check=True)
  results = common.latest_eval_results(run_dir)
  with open(cache, 'w') as f:
    json.dump({'num': num, 'results': results}, f, indent=1)
  return results


def _finished(run_dir: str) -> bool:
  """A checkpoint at the run's last step exists (train CLI layout)."""
  try:
    with open(os.path.join(run_dir, 'config.json')) as f:
      last = json.load(f)['train']['num_steps']
  except (OSError, ValueError, KeyError):
    return False
  return os.path.isdir(os.path.join(run_dir, 'checkpoints', str(last)))


def run(workdir: str, names, num: int, seeds, train_seed: int = 0) -> dict:
  """Trains (unless finished) and evaluates `names`; the teacher and the sCD run they
  start from are always the seed-0 ones, `train_seed` seeds the runs themselves."""
  out = {}
  for name in names:
    run_dir = os.path.join(workdir, _run_name(name, train_seed))
    secs = None if _finished(run_dir) else _train(workdir, name, train_seed)
    per_seed = [_evaluate(run_dir, RUNS[name][3], num, s) for s in seeds]
    samplers = {}
    for sampler in per_seed[0]:
      keys = ('fd_digits', 'precision_digits', 'recall_digits', 'cls_accuracy')
      vals = {k: [r[sampler][k] for r in per_seed] for k in keys}
      samplers[sampler] = dict({k: float(np.mean(v)) for k, v in vals.items()},
                               per_seed=vals, nfe=per_seed[0][sampler]['nfe'])
    out[_run_name(name, train_seed)] = dict(train_seconds=secs, train_seed=train_seed,
                                            overrides=RUNS[name][1], samplers=samplers)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='runs/digits_vsd')
  p.add_argument('--only', default=','.join(RUNS))
  p.add_argument('--num', type=int, default=1000)
  p.add_argument('--seeds', default='0,1', help='sampling seeds of the evaluation')
  p.add_argument('--train_seed', type=int, default=0,
                 help='config.seed of the runs (not 0: workdirs NAME_s<seed>)')
  p.add_argument('--out', default='benchmarks/results/digits_vsd.json')
  args = p.parse_args()
  names = args.only.split(',')
  unknown = set(names) - set(RUNS)
  if unknown:
    raise SystemExit(f'unknown runs {sorted(unknown)}; choose from {list(RUNS)}')
  result = {}
  if os.path.exists(args.out):  # runs measured earlier stay in the file
    with open(args.out) as f:
      result = json.load(f).get('runs', {})
  result.update(run(args.workdir, names, args.num, [int(s) for s in args.seeds.split(',')],
                    args.train_seed))
  print('| run | sampler | NFE | FD | precision | recall | accuracy |')
  print('|---|---|---|---|---|---|---|')
  for name, r in result.items():
    for sampler, v in r['samplers'].items():
      print(f"| {name} | {sampler} | {v['nfe']} | {v['fd_digits']:.3f} | "
            f"{v['precision_digits']:.3f} | {v['recall_digits']:.3f} | "
            f"{v['cls_accuracy']:.3f} |")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(num=args.num, seeds=args.seeds, vsd_steps=VSD_STEPS, runs=result), f,
              indent=2)


if __name__ == '__main__':
  main()
