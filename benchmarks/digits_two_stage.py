"""The README's digits two-stage recipe, timed: teacher -> sCD -> class-conditional samples.

Runs the two training commands exactly as documented (wall time of each), then samples
every class from the teacher (PF-ODE, Heun) and the student (1 and 2 steps) and scores
them with the project's digits classifier (scm_jax/evaluation/digits_classifier.py:
accuracy of the predicted class against the requested label) and the energy distance to
the test split in pixel space. Prints a table and writes JSON.

    PYTHONPATH=. python -m benchmarks.digits_two_stage --workdir=runs/digits_two_stage
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

from scm_jax.data import build_source
from scm_jax.evaluation import digits_classifier
from scm_jax.evaluation.sample_metrics import energy_distance
from scm_jax.train.experiment import load_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
  """(wall seconds, CPU seconds) of one training command. On a shared machine the CPU
  time is the load-independent cost; wall time is what a user waits."""
  t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
  subprocess.run([sys.executable, '-m', 'scm_jax.train', *args], cwd=REPO, check=True)
  r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.time() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='runs/digits_two_stage')
  p.add_argument('--num', type=int, default=1000)
  p.add_argument('--extra', default='', help='extra --config flags for both stages')
  p.add_argument('--out', default='benchmarks/results/digits_two_stage.json')
  args = p.parse_args()
  teacher_dir = os.path.join(args.workdir, 'teacher')
  student_dir = os.path.join(args.workdir, 'student')
  extra = args.extra.split()
  secs_teacher, cpu_teacher = _run(['--config=configs/digits_scd.py:teacher',
                                    f'--workdir={teacher_dir}', *extra])
  secs_student, cpu_student = _run(['--config=configs/digits_scd.py', f'--workdir={student_dir}',
                                    f'--config.teacher.workdir={teacher_dir}', *extra])

  t_exp, t_state = load_experiment(teacher_dir)
  test = build_source(t_exp.config.data, 'test').get(np.arange(300))
  clf = digits_classifier.load_classifier()
  clip = lambda x: np.clip(x, -1, 1)
  flat = lambda x: clip(x).reshape(len(x), -1)
  rows = [dict(model='test data', nfe=0, accuracy=digits_classifier.accuracy(
      clf, test['x'], test['label']), energy_distance=None)]
  labels = np.arange(args.num) % 10
  key = jax.random.PRNGKey(0)

  def add(name, nfe, x):
    rows.append(dict(model=name, nfe=nfe, accuracy=digits_classifier.accuracy(clf, clip(x), labels),
                     energy_distance=energy_distance(flat(x), flat(test['x']))))

  steps = t_exp.config.sample.ode_steps
  add(f'teacher Heun {steps} steps', 2 * steps - 1,
      t_exp.sample(t_state, args.num, steps, key=key, labels=labels, method='ode'))
  add('teacher Euler 2 steps', 2,
      t_exp.sample(t_state, args.num, 2, key=key, labels=labels, method='ode', solver='euler'))
  s_exp, s_state = load_experiment(student_dir)
  for n in (1, 2):
    add(f'sCD {n}-step', n, s_exp.sample(s_state, args.num, n, key=key, labels=labels))

  print(f'\nteacher ({t_exp.config.train.num_steps} steps): wall {secs_teacher:.0f} s, '
        f'CPU {cpu_teacher:.0f} s; student ({s_exp.config.train.num_steps} steps): wall '
        f'{secs_student:.0f} s, CPU {cpu_student:.0f} s; load average {os.getloadavg()[0]:.1f}')
  print('| model | NFE | classifier accuracy | energy distance to test |\n| --- | --- | --- | --- |')
  for r in rows:
    ed = '' if r['energy_distance'] is None else f'{r["energy_distance"]:.4f}'
    print(f'| {r["model"]} | {r["nfe"]} | {r["accuracy"]:.3f} | {ed} |')
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(settings=vars(args), wall_seconds=dict(
        teacher=secs_teacher, student=secs_student), cpu_seconds=dict(
        teacher=cpu_teacher, student=cpu_student), load_average=os.getloadavg(), rows=rows,
        device=str(jax.devices()[0]), cpu_count=os.cpu_count()), f, indent=2)


if __name__ == '__main__':
  main()
