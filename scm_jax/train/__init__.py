"""Training: what a run is made of, the pure step, the loop, and the workdir it leaves.

  experiment.py  Experiment: data, model, mesh, optimizer, teacher, jitted step, samplers
                 (each built once); load_experiment(workdir)
  state.py       TrainState, optimizer, EMAs
  step.py        the pure, jitted train step
  loop.py        train_and_evaluate: resume, train, log, sample, checkpoint
  workdir.py     config.json, loading a workdir, the one checkpoint-compatibility rule
  teacher.py     the sCD teacher (and initial weights) from a teacher workdir
  nonfinite.py   what happens on NaN/Inf streaks (stop or roll back)
  preemption.py  SIGTERM/SIGINT -> checkpoint, clean exit

`python -m scm_jax.train --config=configs/X.py --workdir=DIR` runs `__main__.py`.
"""
