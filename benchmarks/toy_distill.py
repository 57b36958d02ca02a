"""Toy comparison for sCD: teacher NFE 1/2/50, sCD 1/2-step, sCT 1/2-step.

Same data (ring8, seed 0), same seed, same architecture and the same number of
student steps for sCD and sCT. Quality: energy distance to held-out data (lower is
better; data vs data gives the noise floor). Prints a table and writes JSON.

    PYTHONPATH=. python -m benchmarks.toy_distill --out=benchmarks/results/toy_distill.json
"""

import argparse
import json
import os
import time

import jax
import numpy as np


from configs import toy2d_sct, toy2d_scd
from scm_jax.core import teachers
from scm_jax.data import build_source
from scm_jax.evaluation.sample_metrics import energy_distance
from scm_jax.train.experiment import Experiment


def _small(c, args):
  c.model.width = args.width
  c.train.batch_size = args.batch
  c.train.progress_bar = False
  c.seed = args.seed
  return c


def _train(exp, steps):
  t0 = time.time()
  state = exp.init_state()
  state, _ = exp.train(state, steps)
  jax.block_until_ready(state.params)
  return state, time.time() - t0


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--teacher_steps', type=int, default=6000)
  p.add_argument('--student_steps', type=int, default=6000)
  p.add_argument('--width', type=int, default=256)
  p.add_argument('--batch', type=int, default=512)
  p.add_argument('--num', type=int, default=5000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--ema', default='pema_0.05', help='EMA used for every model')
  p.add_argument('--out', default='benchmarks/results/toy_distill.json')
  args = p.parse_args()

  tc = _small(toy2d_scd.get_config('teacher'), args)
  tc.train.num_steps = args.teacher_steps
  ref = build_source(tc.data, 'test').get(np.arange(args.num))['x']
  floor = energy_distance(build_source(tc.data, 'train').get(np.arange(args.num))['x'], ref)
  rows, key = [], jax.random.PRNGKey(args.seed + 1)

  def add(name, nfe, x, secs, x_raw=None):
    rows.append(dict(model=name, nfe=nfe, energy_distance=energy_distance(x, ref),
                     raw_params_energy_distance=(
                         None if x_raw is None else energy_distance(x_raw, ref)),
                     train_seconds=secs))
    print(f'{name:28s} NFE {nfe:3d}  energy distance {rows[-1]["energy_distance"]:.5f}',
          flush=True)

  teacher = Experiment(tc)
  t_state, t_secs = _train(teacher, args.teacher_steps)
  for solver, steps in (('euler', 1), ('euler', 2), ('heun', 50)):
    x = teacher.sample(t_state, args.num, steps, key=key, method='ode', solver=solver,
                       ema=args.ema)
    add(f'teacher {solver} {steps} steps', 2 * steps - 1 if solver == 'heun' else steps,
        x, t_secs)

  sc = _small(toy2d_scd.get_config(), args)
  sc.train.num_steps = args.student_steps
  t_params = t_state.ema[args.ema] if args.ema != 'params' else t_state.params
  dxdt = teachers.make_dxdt_fn(teachers.from_flax_model(teacher.model), t_params,
                               sc.trigflow.sigma_d)
  scd = Experiment(sc, dxdt_fn=dxdt, init_params=t_params)
  s_state, s_secs = _train(scd, args.student_steps)
  for steps in (1, 2):
    add(f'sCD {steps}-step', steps, scd.sample(s_state, args.num, steps, key=key, ema=args.ema),
        s_secs, scd.sample(s_state, args.num, steps, key=key, ema='params'))

  cc = _small(toy2d_scd._power_ema(toy2d_sct.get_config()), args)  # same EMAs as sCD
  cc.train.num_steps = args.student_steps
  sct = Experiment(cc)
  c_state, c_secs = _train(sct, args.student_steps)
  for steps in (1, 2):
    add(f'sCT {steps}-step', steps, sct.sample(c_state, args.num, steps, key=key, ema=args.ema),
        c_secs, sct.sample(c_state, args.num, steps, key=key, ema='params'))

  print(f'\ndata vs data (noise floor): {floor:.5f}')
  print(f'| model | NFE | energy distance ({args.ema}) | raw params | train s |\n'
        '| --- | --- | --- | --- | --- |')
  for r in rows:
    raw = r['raw_params_energy_distance']
    raw = '' if raw is None else f'{raw:.5f}'
    print(f'| {r["model"]} | {r["nfe"]} | {r["energy_distance"]:.5f} | {raw} | '
          f'{r["train_seconds"]:.0f} |')
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(settings=vars(args), data_floor=floor, rows=rows,
                   device=str(jax.devices()[0])), f, indent=2)


if __name__ == '__main__':
  main()
