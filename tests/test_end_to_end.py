"""End to end: sCT on the 2-D toy must reach a sample-quality threshold that broken
variants (wrong tangent sign, a huge time-embedding scale) cannot reach."""

import jax
import numpy as np
import pytest

from configs import toy2d_sct
from scm_jax.core import losses
from scm_jax.data import build_source
from scm_jax.evaluation.sample_metrics import energy_distance
from scm_jax.train.experiment import Experiment

# Energy distance to 2000 held-out points (data vs data is ~0.001). Measured here with
# these settings at 800-1500 steps: correct sCT 0.0056-0.0085 (1- and 2-step, EMA);
# wrong tangent sign > 400; time-embedding scale 1000: 0.13-0.32.
THRESHOLD_1STEP = 0.03
THRESHOLD_2STEP = 0.03
STEPS = 1000


def _toy_config(time_embed_scale=10.0):
  c = toy2d_sct.get_config()
  c.model.width, c.model.depth = 128, 3
  c.model.time_embed_dim, c.model.logvar_channels = 64, 32
  c.model.time_embed_scale = time_embed_scale
  c.train.batch_size = 256
  c.optim.lr, c.optim.warmup_steps = 1e-3, 100
  c.loss.tangent_warmup_steps = 500
  c.ema.decays = (0.995,)
  c.data.num_train, c.data.prefetch = 20000, 0
  return c


def _train_and_score(c):
  exp = Experiment(c)
  state, history = exp.train(exp.init_state(), STEPS)
  test = build_source(c.data, 'test').get(np.arange(2000))['x']
  scores = {}
  for steps in (1, 2):
    x = exp.sample(state, 2000, steps, key=jax.random.PRNGKey(7))
    scores[steps] = energy_distance(x, test) if np.all(np.isfinite(x)) else np.inf
  return scores, history


def test_toy_sct_reaches_quality_threshold():
  scores, history = _train_and_score(_toy_config())
  assert all(h['skipped'] == 0 for h in history)
  assert scores[1] < THRESHOLD_1STEP, scores
  assert scores[2] < THRESHOLD_2STEP, scores


def test_wrong_tangent_sign_fails_the_threshold(monkeypatch):
  right = losses.consistency_tangent
  monkeypatch.setattr(losses, 'consistency_tangent', lambda *a: -right(*a))
  scores, _ = _train_and_score(_toy_config())
  assert scores[1] > 3 * THRESHOLD_1STEP and scores[2] > 3 * THRESHOLD_2STEP, scores


@pytest.mark.slow
def test_huge_time_embedding_scale_fails_the_threshold():
  scores, _ = _train_and_score(_toy_config(time_embed_scale=1000.0))
  assert scores[1] > THRESHOLD_1STEP and scores[2] > THRESHOLD_2STEP, scores
