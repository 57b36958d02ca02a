"""Exported generators vs in-process sampling: batch-1 latency and batch-B throughput.

    python -m benchmarks.export_latency --workdir=runs/digits_scd \\
        [--teacher_workdir=(config.teacher.workdir)] [--batch=64] [--repeats=20] [--out=FILE]

In one process, on one device: the 1- and 2-step generators of --workdir exported
with scm_jax.export (written to a file and read back with `scm_jax.export.load`,
called on numpy noise and labels, numpy out), the same samplers in process
(`Experiment.sample`: key in, numpy out) and the teacher's Heun PF-ODE (18 steps,
NFE 35) both ways. Calls are interleaved (A B A B ...), the median of --repeats
reported; ratios come from the same run. The exported call's time includes checking
its inputs and copying the noise to the device; the in-process sampler draws its
noise on the device. `measure` is also the `export` section of benchmarks.gpu_check
(random weights, no file). Writes JSON (default benchmarks/results/export_latency_<device>.json).
"""

import os
import tempfile

import jax
import numpy as np
from absl import app, flags

from benchmarks import common

FLAGS = flags.FLAGS


def _define_flags():
  """The command line's flags (defined only when run: gpu_check imports `measure`)."""
  flags.DEFINE_string('workdir', None, 'Consistency-model workdir (sCT or sCD).')
  flags.DEFINE_string('teacher_workdir', None, 'Diffusion teacher workdir (default: the '
                      "sCD config's teacher.workdir).")
  flags.DEFINE_integer('batch', 64, 'Throughput batch.')
  flags.DEFINE_integer('ode_steps', 18, 'Teacher Heun steps.')
  flags.DEFINE_integer('repeats', 20, 'Timed calls per program (median).')
  flags.DEFINE_string('out', None, 'JSON output path.')
  flags.mark_flag_as_required('workdir')


def _labels(exp, n):
  return (np.arange(n) % exp.num_classes).astype(np.int32) if exp.num_classes else None


def _programs(name, exp, params, method, steps, batch, tmpdir):
  """{f'{name} {kind}': (nfe, {batch size: zero-argument call})} for the exported
  generator (through a file when tmpdir is given) and in-process Experiment.sample."""
  from scm_jax.export import artifact, build, load
  gen = build.export_generator(exp, params, method=method, steps=steps,
                               platforms=(artifact.current_platform(),))
  if tmpdir:
    path = os.path.join(tmpdir, f'{method}{steps}.jaxexport')
    gen.save(path)
    gen = load(path)
  else:
    gen = gen.generator()
  key = jax.random.PRNGKey(0)
  calls_exp, calls_in = {}, {}
  for n in (1, batch):
    noise, labels = gen.noise(n, seed=n), _labels(exp, n)
    calls_exp[n] = lambda noise=noise, labels=labels: gen(noise, labels)
    calls_in[n] = lambda n=n, labels=labels: exp.sample(params, n, steps, key=key,
                                                        labels=labels, method=method)
  nfe = gen.metadata['nfe']
  return {f'{name} exported': (nfe, calls_exp), f'{name} in-process': (nfe, calls_in)}


def measure(student, teacher, batch: int, repeats: int, ode_steps: int = 18,
            tmpdir=None) -> list:
  """Rows of latency (batch 1) and throughput (`batch`) for the student's 1- and 2-step
  samplers and the teacher's Heun-`ode_steps`, exported and in process.

  student, teacher: (Experiment, params); the teacher may be None.
  """
  s_exp, s_params = student
  programs = {}
  for steps in (1, 2):
    programs.update(_programs(f'sCM {steps}-step', s_exp, s_params, 'consistency', steps,
                              batch, tmpdir))
  if teacher is not None:
    t_exp, t_params = teacher
    programs.update(_programs(f'teacher Heun-{ode_steps}', t_exp, t_params, 'ode',
                              ode_steps, batch, tmpdir))
  timing = {n: common.time_interleaved({k: calls[n] for k, (_, calls) in programs.items()},
                                       repeats, warmup=2) for n in (1, batch)}
  rows = []
  for name, (nfe, _) in programs.items():
    t1, tb = timing[1][name]['median_s'], timing[batch][name]['median_s']
    rows.append({'program': name, 'nfe': nfe, 'latency_ms': 1e3 * t1, 'batch': batch,
                 'batch_ms': 1e3 * tb, 'img_s': batch / tb,
                 'latency': timing[1][name], 'throughput': timing[batch][name]})
  by = {r['program']: r for r in rows}
  heun = by.get(f'teacher Heun-{ode_steps} in-process')
  for r in rows:
    twin = by[r['program'].replace('exported', 'in-process')]
    r['latency_vs_in_process'] = r['latency_ms'] / twin['latency_ms']
    r['throughput_vs_in_process'] = r['img_s'] / twin['img_s']
    if heun:
      r['latency_speedup_vs_heun'] = heun['latency_ms'] / r['latency_ms']
      r['throughput_speedup_vs_heun'] = r['img_s'] / heun['img_s']
  return rows


COLUMNS = [('program', 'program', 's'), ('nfe', 'NFE', 'd'), ('latency_ms', 'batch-1 ms', '.2f'),
           ('img_s', 'img/s', '.1f'), ('latency_vs_in_process', 'latency / in-process', '.2f'),
           ('throughput_vs_in_process', 'img/s / in-process', '.2f'),
           ('latency_speedup_vs_heun', 'latency x vs Heun', '.1f'),
           ('throughput_speedup_vs_heun', 'img/s x vs Heun', '.1f')]


def main(argv):
  del argv
  from absl import logging as absl_logging
  from scm_jax.train import experiment
  from scm_jax.train import state as state_lib
  absl_logging.set_verbosity(absl_logging.WARNING)   # orbax's INFO lines

  def load(workdir):
    exp, state = experiment.load_experiment(workdir)
    return exp, state_lib.pick_params(state, exp.config.sample.ema, exp.config)

  student = load(FLAGS.workdir)
  teacher_dir = FLAGS.teacher_workdir or student[0].config.teacher.get('workdir', '')
  teacher = load(teacher_dir) if teacher_dir else None
  with tempfile.TemporaryDirectory() as tmpdir:
    rows = measure(student, teacher, FLAGS.batch, FLAGS.repeats, FLAGS.ode_steps, tmpdir)
  info = common.device_info()
  print(f'\n{info["device_kind"]} ({info["platform"]}), {student[0].config.model.name} '
        f'{student[0].data_shape}, throughput batch {FLAGS.batch}, latency batch 1, median '
        f'of {FLAGS.repeats}')
  common.print_table(rows, COLUMNS)
  common.write_json(FLAGS.out or common.default_out('export_latency'), {
      'workdir': FLAGS.workdir, 'teacher_workdir': teacher_dir, 'batch': FLAGS.batch,
      'repeats': FLAGS.repeats, 'ode_steps': FLAGS.ode_steps, 'rows': rows})


if __name__ == '__main__':
  _define_flags()
  app.run(main)
