"""Fault class: files a user (or a tool) edited, replaced or linked. config.json and
metrics.jsonl edited into invalid JSON, symbolic links from the workdir to elsewhere, .npz
files with object (pickled) arrays: each is one line, and nothing already written is
deleted or overwritten (a damaged file a writer replaces is kept beside it)."""

import ast
import glob
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from scm_jax import report
from scm_jax.errors import CheckpointError, DataError, WorkdirError
from scm_jax.evaluation import fid, npz_tree
from scm_jax.infra import files
from scm_jax.models import vae
from scm_jax.train import workdir as workdir_lib
from tests import helpers

RUN = {'train.num_steps': 20, 'train.ckpt_every': 10, 'train.log_every': 5}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('untrusted') / 'run')
  helpers.finish_toy(workdir, **RUN)
  return workdir


def _copy(trained, tmp_path, name='w'):
  workdir = str(tmp_path / name)
  shutil.copytree(trained, workdir)
  return workdir


def _cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=helpers.REPO,
                        env=helpers.env(), capture_output=True, text=True, timeout=600)


def _one_error_line(p):
  lines = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert p.returncode == 2 and 'Traceback' not in p.stderr and len(lines) == 1, p.stderr[-3000:]
  return lines[0]


def test_invalid_json_is_one_line_for_readers_and_kept_aside_by_writers(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  config_path = os.path.join(workdir, 'config.json')
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  rows = open(metrics_path).read().splitlines()
  bad_metrics = '\n'.join(rows[:1] + ['{"step": 10, "loss": 0.5,'] + rows[1:]) + '\n'
  open(metrics_path, 'w').write(bad_metrics)
  before = helpers.tree_digest(workdir)
  # Readers: one line naming the file and the position; nothing written.
  with pytest.raises(DataError, match=f'{metrics_path} line 2 is not a JSON object'):
    report.read_metrics(workdir)  # (scm_jax.report prints it as one line)
  assert helpers.tree_digest(workdir) == before
  bad_config = open(config_path).read().replace('"seed"', 'seed', 1)  # a hand edit gone wrong
  open(config_path, 'w').write(bad_config)
  before = helpers.tree_digest(workdir)
  line = _one_error_line(_cli('scm_jax.sample', f'--workdir={workdir}', '--num=4'))
  assert line.startswith(f'error: {config_path} is not valid JSON (Expecting property name '
                         'enclosed in double quotes at line 2, column'), line
  assert helpers.tree_digest(workdir) == before

  # The trainer replaces both files on resume: the damaged ones are kept, byte for byte.
  p = helpers.finish_toy(workdir, **dict(RUN, **{'train.num_steps': 30}))
  assert 'resumed from step 20' in p.stderr
  assert open(config_path + '.damaged').read() == bad_config
  assert open(metrics_path + '.damaged').read() == bad_metrics
  assert [r['step'] for r in files.read_jsonl(metrics_path)] == [5, 10, 15, 20, 25, 30]
  workdir_lib.load_config(workdir)  # valid again
  for what in (f'{config_path} is not valid JSON', f'{metrics_path} line 2 is not a JSON'):
    assert sum(what in l for l in p.stderr.splitlines()) == 1, p.stderr[-3000:]
  # A third damage keeps the earlier copy too.
  open(config_path, 'w').write('[]')
  assert files.read_json_or_keep_aside(config_path) is None
  assert open(config_path + '.damaged.1').read() == '[]'
  open(config_path, 'w').write('[]')
  with pytest.raises(CheckpointError, match='holds a JSON list, not a dict'):
    workdir_lib.load_config(workdir)


def _outside(tmp_path):
  """A directory outside the workdir with a file in it, and its digest."""
  out = tmp_path / 'outside'
  out.mkdir()
  (out / 'precious.txt').write_text('not the run\'s')
  return str(out), helpers.tree_digest(str(out))


@pytest.mark.parametrize('where', ['checkpoints', 'checkpoints/10/meta/metadata',
                                   'metrics.jsonl', 'eval'])
def test_links_out_of_the_workdir_are_refused_before_anything_is_written(
    trained, tmp_path, where):
  workdir = _copy(trained, tmp_path)
  out, out_digest = _outside(tmp_path)
  link = os.path.join(workdir, where)
  if os.path.isdir(link):
    shutil.copytree(link, out, dirs_exist_ok=True)
    shutil.rmtree(link)
  elif os.path.exists(link):
    shutil.copy(link, os.path.join(out, 'precious.txt'))
    os.remove(link)
  out_digest = helpers.tree_digest(out)
  target = out if where in ('checkpoints', 'eval') else os.path.join(out, 'precious.txt')
  os.symlink(target, link)
  before = helpers.tree_digest(workdir)
  names = ('eval',) if where == 'eval' else workdir_lib.WRITTEN
  with pytest.raises(WorkdirError, match=f'{link} is a symbolic link to {target}, outside'):
    workdir_lib.check_links(workdir, names)
  if where == 'checkpoints':  # and the CLI says so in one line, having written nothing
    line = _one_error_line(helpers.run_module(*helpers.toy_cli_args(workdir, **RUN)[2:],
                                              check=False))
    assert line.startswith(f'error: {link} is a symbolic link to {target}, outside'), line
  assert helpers.tree_digest(workdir) == before and helpers.tree_digest(out) == out_digest
  # Links that stay inside the workdir, and a workdir that is itself a link, are fine.
  os.remove(link)
  os.symlink(os.path.relpath(os.path.join(workdir, 'config.json'), os.path.dirname(link)),
             link)
  workdir_lib.check_links(workdir, names)
  os.symlink(workdir, str(tmp_path / 'alias'))
  workdir_lib.check_links(str(tmp_path / 'alias'), names)


class _Payload:
  """Unpickling this runs code (writes a marker file): what np.load must never do."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_npz_with_object_arrays_are_refused_without_unpickling(tmp_path):
  marker = str(tmp_path / 'unpickled')
  evil = np.empty(2, dtype=object)
  evil[:] = [_Payload(marker), 1]
  path = str(tmp_path / 'evil.npz')
  np.savez(path, mu=evil, sigma=evil, x=evil, features=evil)
  assert b'unpickled' in open(path, 'rb').read()  # the payload is in the file
  checks = [
      (lambda: files.read_npz(path), DataError),
      (lambda: fid.load_stats(path), DataError),
      (lambda: npz_tree.read_weights(path, 'Inception', 'Convert it again.'), CheckpointError),
      (lambda: vae.read_state_dict(path), CheckpointError),
  ]
  for read, error in checks:
    with pytest.raises(error, match=r'object \(pickled\) array') as info:
      read()
    assert '\n' not in str(info.value)
  assert not os.path.exists(marker)
  with pytest.raises(OSError):  # (the payload works: this is what was kept from running)
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / 'no' / 'such' / 'dir'))))


def test_every_np_load_of_the_library_refuses_pickles():
  """allow_pickle=False written at every np.load call (numpy's default could change)."""
  calls = []
  for path in glob.glob(os.path.join(helpers.REPO, '**', '*.py'), recursive=True):
    if '/runs/' in path or '/.venv/' in path:
      continue
    for node in ast.walk(ast.parse(open(path).read())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == 'load' and getattr(node.func.value, 'id', '') in ('np', 'numpy')):
        kw = {k.arg: k.value for k in node.keywords}
        ok = isinstance(kw.get('allow_pickle'), ast.Constant) and kw['allow_pickle'].value is False
        calls.append((os.path.relpath(path, helpers.REPO), node.lineno, ok))
  library = [c for c in calls if not c[0].startswith('tests/')]
  assert library and all(ok for _, _, ok in library), [c for c in library if not c[2]]
