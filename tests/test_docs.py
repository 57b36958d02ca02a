"""The user docs: the mkdocs site builds strictly, the README is a front page whose
commands and example work, links resolve, and no issue numbers leak into user docs."""

import glob
import os
import re
import subprocess
import sys

import pytest

from tests import helpers

REPO = helpers.REPO
README = os.path.join(REPO, 'README.md')
USER_DOCS = [README, os.path.join(REPO, 'benchmarks', 'RESULTS.md'),
             *sorted(glob.glob(os.path.join(REPO, 'docs', '**', '*.md'), recursive=True))]


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def _section(text, heading):
  """The text under `## heading` up to the next `## `."""
  m = re.search(rf'^## {re.escape(heading)}\n(.*?)(?=^## |\Z)', text, re.M | re.S)
  assert m, f'README has no "## {heading}" section'
  return m.group(1)


def _code_blocks(text, lang):
  return [b.strip() for b in re.findall(rf'^```{lang}\n(.*?)^```', text, re.M | re.S)]


def test_mkdocs_site_builds_strictly(tmp_path):
  """Broken links, missing pages, bad anchors and docstring errors fail the build."""
  p = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir',
                      str(tmp_path / 'site')], cwd=REPO, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stdout + p.stderr
  for page in ('index.html', 'training/index.html', 'api/core/index.html',
               'benchmarks/index.html'):
    assert os.path.exists(tmp_path / 'site' / page), page
  api = _read(tmp_path / 'site' / 'api' / 'core' / 'index.html')
  assert 'consistency_fn' in api  # the reference is generated from the docstrings
  bench = _read(tmp_path / 'site' / 'benchmarks' / 'index.html')
  assert 'Input pipeline' in bench  # benchmarks/RESULTS.md is included, not copied


def test_readme_is_a_front_page_with_exactly_two_setup_commands():
  text = _read(README)
  assert len(text.splitlines()) <= 220, 'README should stay a front page (docs/ has the rest)'
  blocks = _code_blocks(_section(text, 'Set up'), 'bash')
  assert len(blocks) == 2, blocks
  run, test = blocks
  assert 'pip install -r requirements.txt -e .' in run
  assert 'python -m scm_jax.train --config=configs/digits_sct.py' in run
  assert 'python -m scm_jax.sample' in run
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    ci = f.read()
  assert test in ci, '.ci/run must run the README test command'
  assert 'python -m pytest' in test
  assert re.search(r'\d+ min', _section(text, 'Set up')), 'the set-up time is measured'


def test_no_issue_numbers_in_user_docs():
  pattern = re.compile(r'\bissues?[ #-]*\d+|\(issue\b', re.I)
  found = [(os.path.relpath(p, REPO), m.group(0)) for p in USER_DOCS
           for m in pattern.finditer(_read(p))]
  assert not found, found


def _slug(heading):
  """Python-Markdown's toc slug (mkdocs' anchors): lower case, punctuation dropped."""
  s = re.sub(r'[^\w\s-]', '', heading.strip().lower())
  return re.sub(r'[-\s]+', '-', s)


@pytest.mark.parametrize('path', [README, *USER_DOCS[2:]], ids=os.path.basename)
def test_relative_links_resolve(path):
  """Links to repository files exist; anchors name a heading of the target."""
  base = os.path.dirname(path)
  for target in re.findall(r'\]\(([^)\s]+)\)', _read(path)):
    if re.match(r'[a-z]+://', target):
      continue
    file, _, anchor = target.partition('#')
    full = os.path.normpath(os.path.join(base, file)) if file else path
    assert os.path.exists(full), f'{os.path.relpath(path, REPO)} links to missing {target}'
    if anchor and full.endswith('.md'):
      slugs = {_slug(h) for h in re.findall(r'^#+ (.*)$', _read(full), re.M)}
      assert anchor in slugs, f'{os.path.relpath(path, REPO)}: no heading for #{anchor}'


def test_readme_python_example_runs():
  """The README's Python example, at a few steps, runs and returns what it says."""
  (code,) = _code_blocks(_section(_read(README), 'In Python'), 'python')
  assert len(code.splitlines()) <= 10
  code = code.replace('num_steps=1000', 'num_steps=3').replace('num=2000', 'num=16')
  p = helpers.run_python(code + '\nassert x.shape == (16, 2), x.shape\nprint("ok")')
  assert p.stdout.strip().endswith('ok')
