"""The library modules and every module the tests import load together in one process,
as they do under pytest: an absl flag defined at import by two of them (two entry points
both owning --src, say) fails this one test instead of the collection of the whole suite.
Entry points that nothing imports may keep module-level flags."""

import ast
import glob
import importlib.util
import os
import pkgutil
import subprocess
import sys

import scm_jax

HERE = os.path.dirname(os.path.abspath(__file__))


def _imported_by_tests() -> set[str]:
  names = set()
  for path in glob.glob(os.path.join(HERE, '*.py')):
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('scm_jax'):
        names.add(node.module)
        names.update(f'{node.module}.{a.name}' for a in node.names)
      elif isinstance(node, ast.Import):
        names.update(a.name for a in node.names if a.name.startswith('scm_jax'))
  return {n for n in names if _is_module(n)}


def _is_module(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:  # `from scm_jax.m import function`
    return False


def _defines_flags_at_import(name: str) -> bool:
  tree = ast.parse(open(importlib.util.find_spec(name).origin).read())
  return any('DEFINE' in ast.unparse(node) for node in tree.body
             if isinstance(node, (ast.Assign, ast.Expr)))


def test_modules_the_tests_use_import_together():
  library = {m.name for m in pkgutil.walk_packages(scm_jax.__path__, 'scm_jax.')
             if not m.name.endswith('__main__')}
  names = sorted({n for n in library if not _defines_flags_at_import(n)}
                 | (_imported_by_tests() & library))
  assert 'scm_jax.import_edm2' in names and 'scm_jax.evaluation.convert_inception' in names
  code = 'import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)\n'
  r = subprocess.run([sys.executable, '-c', code, *names], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
