"""Guidance-conditioned sCD student vs unguided student, against the guided teacher (digits).

The paper's sCD student takes the guidance scale s as an input (App. G.2) and so samples
with guidance in one evaluation per step. Here every model samples every class (labels
cycling 0-9) and is compared with the teacher's own guided samples (EDM Heun, 18 steps,
CFG scale s): Fréchet distance in the digits-classifier feature space and energy distance
in pixels to those teacher samples, plus FD to the training data and class accuracy.

    python -m benchmarks.guided_student --teacher=runs/teacher_c --unguided=runs/scd_c \\
        --guided=runs/scd_guided --guidance=1.5 --num=1000
"""

import argparse
import json
import os

import jax
import numpy as np

from scm_jax.evaluation import digits_classifier
from scm_jax.evaluation import fid
from scm_jax.evaluation.generate import reference_data
from scm_jax.evaluation.sample_metrics import energy_distance
from scm_jax.train.experiment import load_experiment


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--teacher', required=True)
  p.add_argument('--unguided', required=True, help='sCD student without guidance input')
  p.add_argument('--guided', required=True, help='guidance-conditioned sCD student')
  p.add_argument('--guidance', type=float, default=1.5)
  p.add_argument('--num', type=int, default=1000)
  p.add_argument('--out', default='benchmarks/results/guided_student.json')
  args = p.parse_args()
  s = args.guidance
  clf = digits_classifier.load_classifier()
  labels = np.arange(args.num) % 10

  def stats(x):
    feats, probs = digits_classifier.features_and_probs(clf, x)
    return fid.feature_stats(feats), probs

  t_exp, t_state = load_experiment(args.teacher)
  key, key2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  ref = t_exp.sample(t_state, args.num, 18, key=key, labels=labels, method='ode',
                     solver='heun', guidance=s)
  (ref_mu, ref_sigma), _ = stats(ref)
  data = reference_data(t_exp.config.data, t_exp.config.data.split)
  (data_mu, data_sigma), _ = stats(data)
  rows = []

  def add(name, nfe, x):
    (mu, sigma), probs = stats(x)
    rows.append(dict(model=name, nfe=nfe,
                     fd_to_teacher=fid.frechet_distance(mu, sigma, ref_mu, ref_sigma),
                     ed_to_teacher=energy_distance(x.reshape(len(x), -1),
                                                   ref.reshape(len(ref), -1)),
                     fd_to_data=fid.frechet_distance(mu, sigma, data_mu, data_sigma),
                     accuracy=digits_classifier.class_statistics(probs, labels)['cls_accuracy']))
    print(rows[-1], flush=True)

  add(f'teacher Heun 18 @ {s:g} (other seed)', 70,
      t_exp.sample(t_state, args.num, 18, key=key2, labels=labels, method='ode',
                   solver='heun', guidance=s))
  u_exp, u_state = load_experiment(args.unguided)
  g_exp, g_state = load_experiment(args.guided)
  for steps in (1, 2):
    add(f'guided student {steps}-step, input s = {s:g}', steps,
        g_exp.sample(g_state, args.num, steps, key=key2, labels=labels, guidance=s))
    add(f'unguided student {steps}-step, CFG {s:g} on outputs', 2 * steps,
        u_exp.sample(u_state, args.num, steps, key=key2, labels=labels, guidance=s))
    add(f'unguided student {steps}-step, no guidance', steps,
        u_exp.sample(u_state, args.num, steps, key=key2, labels=labels, guidance=1.0))

  print(f'\n| model | NFE | FD to teacher @ {s:g} | ED to teacher | FD to data | accuracy |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['nfe']} | {r['fd_to_teacher']:.3f} | {r['ed_to_teacher']:.5f} "
          f"| {r['fd_to_data']:.3f} | {r['accuracy']:.3f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(args=vars(args), rows=rows, device=jax.devices()[0].device_kind), f, indent=2)


if __name__ == '__main__':
  main()
