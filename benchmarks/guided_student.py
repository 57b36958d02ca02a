"""Guidance-conditioned sCD student vs unguided student, against the guided teacher.

The paper's sCD student takes the guidance scale s as an input (App. G.2) and so samples
with guidance in one evaluation per step. Here every model samples every class (labels
cycling over the classes) and is compared with the teacher's own guided samples (EDM
Heun, --ode_steps steps, scale s): classifier-free guidance, or with --guide_workdir the
teacher guided by that separate guiding network (EDM2's D_guide + s (D - D_guide); the
guided student was then distilled with the same teacher.guide_workdir). Energy distance
to those teacher samples, overall and per class with each cluster centred on its mean
(its shape: guidance concentrates the classes); on digits also the Fréchet distance in
the digits-classifier feature space, FD to the training data and class accuracy.

    python -m benchmarks.guided_student --teacher=runs/teacher_c --unguided=runs/scd_c \\
        --guided=runs/scd_guided --guidance=1.5 --num=1000
    python -m benchmarks.guided_student --teacher=runs/toy_teacher --unguided=runs/toy_scd \\
        --guided=runs/toy_autoguided --guide_workdir=runs/toy_guide --guide_ema=ema_0.999 \\
        --guidance=1.5 --num=2000 --out=benchmarks/results/autoguided_student_toy.json
"""

import argparse
import json
import os

import jax
import numpy as np

from scm_jax.evaluation import fid
from scm_jax.evaluation.generate import reference_data
from scm_jax.evaluation.sample_metrics import class_centered_energy_distance, energy_distance
from scm_jax.train.experiment import load_experiment


def _digits_metrics(config, ref):
  """f(x, labels) -> {FD to the teacher samples, FD to data, accuracy} (digits only)."""
  from scm_jax.evaluation import digits_classifier
  clf = digits_classifier.load_classifier()

  def stats(x):
    feats, probs = digits_classifier.features_and_probs(clf, x)
    return fid.feature_stats(feats), probs
  (ref_mu, ref_sigma), _ = stats(ref)
  (data_mu, data_sigma), _ = stats(reference_data(config.data, config.data.split))

  def metrics(x, labels):
    (mu, sigma), probs = stats(x)
    return dict(fd_to_teacher=fid.frechet_distance(mu, sigma, ref_mu, ref_sigma),
                fd_to_data=fid.frechet_distance(mu, sigma, data_mu, data_sigma),
                accuracy=digits_classifier.class_statistics(probs, labels)['cls_accuracy'])
  return metrics


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--teacher', required=True)
  p.add_argument('--unguided', required=True, help='sCD student without guidance input')
  p.add_argument('--guided', required=True, help='guidance-conditioned sCD student')
  p.add_argument('--guidance', type=float, default=1.5)
  p.add_argument('--guide_workdir', default='', help="the teacher's guiding network "
                 "(the guided student's teacher.guide_workdir); '' = CFG")
  p.add_argument('--guide_ema', default='')
  p.add_argument('--guide_step', type=int, default=-1)
  p.add_argument('--ode_steps', type=int, default=0, help="teacher's Heun steps "
                 '(0 = its config.sample.ode_steps)')
  p.add_argument('--num', type=int, default=1000)
  p.add_argument('--out', default='benchmarks/results/guided_student.json')
  args = p.parse_args()
  s = args.guidance

  t_exp, t_state = load_experiment(args.teacher)
  labels = np.arange(args.num) % max(t_exp.num_classes, 1)
  labels = labels if t_exp.num_classes else None
  ode_steps = args.ode_steps or t_exp.config.sample.ode_steps
  key, key2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  heun = lambda k: t_exp.sample(t_state, args.num, ode_steps, key=k, labels=labels,
                                method='ode', solver='heun', guidance=s)
  cfg_teacher = heun(key2) if args.guide_workdir and t_exp.num_classes else None
  if args.guide_workdir:
    t_exp.use_guide(args.guide_workdir, args.guide_ema, args.guide_step)
  ref = heun(key)
  flat = lambda x: x.reshape(len(x), -1)
  extra = _digits_metrics(t_exp.config, ref) if t_exp.config.data.name == 'digits' else None
  rows = []

  def add(name, nfe, x):
    row = dict(model=name, nfe=nfe, ed_to_teacher=energy_distance(flat(x), flat(ref)))
    if labels is not None:  # the shape of each class's cluster (guidance concentrates them)
      row['class_centered_ed'] = class_centered_energy_distance(x, ref, labels, labels)
    rows.append(dict(row, **(extra(x, labels) if extra else {})))
    print(rows[-1], flush=True)

  how = 'guide network' if args.guide_workdir else 'CFG'
  add(f'teacher Heun {ode_steps} @ {s:g}, {how} (other seed)', 2 * (2 * ode_steps - 1),
      heun(key2))
  if cfg_teacher is not None:
    add(f'teacher Heun {ode_steps} @ {s:g}, CFG instead of the guide', 2 * (2 * ode_steps - 1),
        cfg_teacher)
  u_exp, u_state = load_experiment(args.unguided)
  g_exp, g_state = load_experiment(args.guided)
  for steps in (1, 2):
    add(f'guided student {steps}-step, input s = {s:g}', steps,
        g_exp.sample(g_state, args.num, steps, key=key2, labels=labels, guidance=s))
    if u_exp.num_classes:
      add(f'unguided student {steps}-step, CFG {s:g} on outputs', 2 * steps,
          u_exp.sample(u_state, args.num, steps, key=key2, labels=labels, guidance=s))
    add(f'unguided student {steps}-step, no guidance', steps,
        u_exp.sample(u_state, args.num, steps, key=key2, labels=labels, guidance=1.0))

  columns = [k for k in ('ed_to_teacher', 'class_centered_ed', 'fd_to_teacher', 'fd_to_data',
                         'accuracy')
             if k in rows[0]]
  print(f'\n| model | NFE | ' + ' | '.join(columns) + ' |')
  print('|---|---|' + '---|' * len(columns))
  for r in rows:
    print(f"| {r['model']} | {r['nfe']} | " + ' | '.join(f'{r[k]:.5g}' for k in columns) + ' |')
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(args=vars(args), rows=rows, device=jax.devices()[0].device_kind), f, indent=2)


if __name__ == '__main__':
  main()
