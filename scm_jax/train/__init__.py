"""Training: TrainState (state.py), the pure train step (step.py) and the loop (loop.py).
Faults: preemption.py (SIGTERM/SIGINT -> checkpoint, exit), nonfinite.py (NaN streaks).

`python -m scm_jax.train --config=configs/X.py --workdir=DIR` runs `__main__.py`.
"""

from scm_jax.train.loop import Experiment, load_experiment, train_and_evaluate
from scm_jax.train.state import TrainState, create_train_state, pick_params
from scm_jax.train.step import make_train_step
from scm_jax.train.teacher import load_teacher

__all__ = ['Experiment', 'TrainState', 'create_train_state', 'load_experiment',
           'load_teacher', 'make_train_step', 'pick_params', 'train_and_evaluate']
