"""An EDM2 teacher in NVlabs' layout, end to end on digits: train, export, import, sCD.

1. trains a small plain EDM2 (NVlabs' parameterization, `configs/digits_scd.py:edm2_teacher`);
2. writes its EMA as an NVlabs state dict (`python -m scm_jax.import_edm2 --export`);
3. imports that file as a teacher workdir (`python -m scm_jax.import_edm2 --src=...`) and
   checks that the imported weights equal the teacher's bit for bit;
4. distills the imported teacher by sCD into a student initialized from it (same plain
   architecture, `configs/digits_scd.py:edm2_student`);
5. scores the teacher's Heun-18 and the student's 1- and 2-step samples with the evaluate
   CLI (digits-classifier Fréchet distance, precision / recall, accuracy).

    python -m benchmarks.edm2_digits --workdir=runs/edm2_digits

Prints a table and writes JSON (benchmarks/results/edm2_digits.json).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = 'fd_digits,pr_digits,digits_cls'


def _cli(module: str, *args: str) -> float:
  t0 = time.time()
  subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, check=True)
  return time.time() - t0


def _evaluate(workdir: str, num: int, *args: str) -> dict:
  _cli('scm_jax.evaluate', f'--workdir={workdir}', f'--metrics={METRICS}', f'--num={num}',
       *args)
  return common.latest_eval_results(workdir)


def imported_equals_original(original: str, imported: str, ema: str) -> bool:
  """Are the imported workdir's weights bit-equal to `ema` of the original run?"""
  from scm_jax.train import teacher as teacher_lib
  from scm_jax.train import workdir as workdir_lib
  shape = (8, 8, 1)
  _, a = teacher_lib.load_weights(original, workdir_lib.load_config(original), shape, ema,
                                  -1, 'original')
  _, b = teacher_lib.load_weights(imported, workdir_lib.load_config(imported), shape, '', -1,
                                  'imported')
  leaves = lambda t: jax.tree_util.tree_leaves_with_path(t)
  return all(jax.tree_util.keystr(pa) == jax.tree_util.keystr(pb) and
             np.array_equal(np.asarray(x), np.asarray(y))
             for (pa, x), (pb, y) in zip(leaves(a), leaves(b)))


def run(workdir: str, teacher_steps: int, student_steps: int, num: int) -> dict:
  teacher, imported, student = (os.path.join(workdir, n) for n in
                                ('teacher', 'imported', 'student'))
  state_dict = os.path.join(workdir, 'teacher_state_dict.npz')
  secs = {}
  secs['teacher'] = _cli('scm_jax.train', '--config=configs/digits_scd.py:edm2_teacher',
                         f'--workdir={teacher}', f'--config.train.num_steps={teacher_steps}')
  _cli('scm_jax.import_edm2', '--export', f'--workdir={teacher}', '--ema=pema_0.05',
       f'--out={state_dict}')
  if not os.path.isdir(os.path.join(imported, 'checkpoints')):
    _cli('scm_jax.import_edm2', f'--src={state_dict}', f'--workdir={imported}')
  same = imported_equals_original(teacher, imported, 'pema_0.05')
  secs['student'] = _cli('scm_jax.train', '--config=configs/digits_scd.py:edm2_student',
                         f'--workdir={student}', f'--config.teacher.workdir={imported}',
                         f'--config.train.num_steps={student_steps}')
  t = _evaluate(teacher, num, '--steps=18', '--solver=heun')['heun18']
  s = _evaluate(student, num, '--steps=1,2')
  rows = [dict(model='teacher Heun-18 (imported weights are bit-equal)', **t)]
  for k in sorted(s):
    rows.append(dict(model=f'student {k}', **s[k], fd_ratio=s[k]['fd_digits'] / t['fd_digits']))
  return dict(imported_bit_equal=same, teacher_steps=teacher_steps,
              student_steps=student_steps, num=num, seconds=secs, rows=rows)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', default='runs/edm2_digits')
  p.add_argument('--teacher_steps', type=int, default=3000)
  p.add_argument('--student_steps', type=int, default=1000)
  p.add_argument('--num', type=int, default=1000)
  p.add_argument('--out', default='benchmarks/results/edm2_digits.json')
  args = p.parse_args()
  result = run(args.workdir, args.teacher_steps, args.student_steps, args.num)
  print(f"imported weights bit-equal to the teacher's EMA: {result['imported_bit_equal']}")
  print('| model | NFE | FD | ratio to teacher | precision | recall | accuracy |')
  print('|---|---|---|---|---|---|---|')
  for r in result['rows']:
    print(f"| {r['model']} | {r['nfe']} | {r['fd_digits']:.3f} | {r.get('fd_ratio', 1.0):.2f} "
          f"| {r['precision_digits']:.3f} | {r['recall_digits']:.3f} | {r['cls_accuracy']:.3f} |")
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
