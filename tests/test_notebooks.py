"""The notebooks run headless, top to bottom, with small settings, and report sane numbers.

Small settings replace the notebook's `parameters` cell (as papermill does): a cell with
the overrides is inserted right after it. Each notebook prints `RESULTS {json}` last.
"""

import json
import os

import pytest

from tests import helpers

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOKS = os.path.join(helpers.REPO, 'notebooks')


def execute_notebook(name: str, params: dict, timeout: int = 600) -> dict:
  """Runs notebooks/<name> in a fresh kernel with `params`; returns its RESULTS dict."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  idx = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(idx) == 1, f'{name} needs exactly one cell tagged "parameters"'
  override = nbformat.v4.new_code_cell('\n'.join(f'{k} = {v!r}' for k, v in params.items()))
  nb.cells.insert(idx[0] + 1, override)
  env = helpers.env()
  old = dict(os.environ)
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                            resources={'metadata': {'path': NOTEBOOKS}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  for out in nb.cells[-1].outputs:
    for line in out.get('text', '').splitlines():
      if line.startswith('RESULTS '):
        return json.loads(line[len('RESULTS '):])
  raise AssertionError(f'{name} printed no RESULTS line')


@pytest.mark.slow  # trains two toy models (~1-2 min on 2 cores); inspect runs in CI
def test_quickstart_notebook_trains_and_samples():
  r = execute_notebook('quickstart.ipynb', {
      'NUM_STEPS': 300, 'TEACHER_STEPS': 300, 'WIDTH': 64, 'BATCH': 256,
      'NUM_SAMPLES': 1000, 'ODE_STEPS': 8, 'EMA': 'params'})
  ed = r['ed']
  assert r['finite']
  assert abs(ed['training data']) < 0.005 < ed['noise (prior)']
  # Whatever 300 steps learn, the teacher's ODE must already beat the prior noise.
  teacher = [v for k, v in ed.items() if k.startswith('teacher')][0]
  assert teacher < ed['noise (prior)']
  # The 1-step jump and the teacher's ODE end from the same noise are related points.
  assert r['jump_vs_teacher_same_noise'] < r['jump_vs_teacher_other_noise']


def test_inspect_checkpoint_notebook_reads_a_workdir(tmp_path):
  from configs import toy2d_sct
  from scm_jax.train.loop import train_and_evaluate
  c = toy2d_sct.get_config()
  c.model.width, c.model.depth, c.model.time_embed_dim, c.model.logvar_channels = 32, 2, 32, 16
  c.train.batch_size, c.train.num_steps, c.train.log_every = 64, 40, 10
  c.train.sample_every = c.train.ckpt_every = 40
  c.train.progress_bar, c.data.prefetch = False, 0
  c.data.num_train, c.data.num_test, c.sample.num = 2048, 256, 256
  workdir = str(tmp_path / 'toy')
  train_and_evaluate(c, workdir)
  r = execute_notebook('inspect_checkpoint.ipynb', {
      'WORKDIR': workdir, 'NUM_EVAL': 256, 'NUM': 16, 'EMA': 'params'})
  assert r['step'] == 40 and r['logged_rows'] == 4 and r['finite']
  assert r['grid_shapes'] == {'1-step': [256, 2], '2-step': [256, 2]}
  q = r['quality']
  assert q['finite_1step'] == q['finite_2step'] == 1.0 and q['ed_noise'] > 0
