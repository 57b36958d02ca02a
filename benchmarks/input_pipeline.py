"""Input pipeline throughput: the grain training stream on images and in-memory data.

    python -m benchmarks.input_pipeline [--num_images=2000] [--image_size=32]
        [--batch=128] [--batches=16] [--workers=0,2,4] [--repeats=2] [--out=FILE.json]

Datasets, generated locally (no network):
- folder: --num_images random 64x64x3 PNG files (a quarter of each image is flat
  color so PNG compresses as on real photos), read by the 'folder' source, which
  decodes (PIL) and resizes to --image_size;
- tfds: the same kind of images in an array_record tfds dataset built by a tiny
  GeneratorBasedBuilder below (`download_and_prepare(file_format='array_record')`
  into a temp dir), read through the project's 'tfds' source, resized alike;
- digits and toy (ring8): in-memory sources, the per-batch cost of the stream.

Each stream is timed from a fresh `make_stream(..., prefetch=0)` after `worker_count
+ 2` untimed batches (worker start-up is excluded and reported separately); images/s
= --batches x --batch / time. Rounds run every configuration in turn (fresh streams
each round) and the median round is reported. 'read' is the grain ReadOptions:
'none' = ReadOptions(num_threads=0, prefetch_buffer_size=0) (the in-memory default),
'default' = grain's ReadOptions() (16 threads, 500 records ahead). The overlap rows
run the toy stream with prefetch 0 and 2 against a stand-in train step of --step_ms:
a sleep (host idle, as while an accelerator computes) and XLA work on this CPU.
Writes JSON (default benchmarks/results/input_pipeline_<device>.json).
"""

import io
import os
import shutil
import statistics
import tempfile
import time


import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from benchmarks import common
from scm_jax import data as data_lib
from scm_jax.data.base import LOCAL_READ

_NUM_IMAGES = flags.DEFINE_integer('num_images', 2000, 'Images in the folder / tfds sets.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 32, 'Decoded images are resized to this.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size of the image streams.')
_BATCHES = flags.DEFINE_integer('batches', 16, 'Timed batches per stream and round.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2', '4'], 'grain worker counts to compare.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Rounds (median reported).')
_TOY_BATCH = flags.DEFINE_integer('toy_batch', 512, 'Batch size of the toy stream.')
_STEP_MS = flags.DEFINE_float('step_ms', 58.0, 'Stand-in train step for the overlap rows.')
_OUT = flags.DEFINE_string('out', None, 'JSON output path.')

GENERATED_SIZE = 64
READS = {'none': LOCAL_READ, 'default': grain.ReadOptions()}


def _random_image(rng: np.random.Generator) -> np.ndarray:
  img = rng.integers(0, 256, (GENERATED_SIZE, GENERATED_SIZE, 3), dtype=np.uint8)
  img[:GENERATED_SIZE // 2, :GENERATED_SIZE // 2] = rng.integers(0, 256, 3)
  return img


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  return buf.getvalue()


def make_folder(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  for i in range(n):
    sub = os.path.join(root, f'class{i % 10}')
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f'{i:05d}.png'), 'wb') as f:
      f.write(_png(_random_image(rng)))
  return root


def make_tfds(data_dir: str, n: int) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ScmJaxBenchImages(tfds.core.GeneratorBasedBuilder):
    """Random 64x64x3 PNG images with 10 labels."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(GENERATED_SIZE, GENERATED_SIZE, 3)),
          'label': tfds.features.ClassLabel(num_classes=10),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(n):  # Encoded here: tfds's own encoder needs TensorFlow.
        yield i, {'image': _png(_random_image(rng)), 'label': i % 10}

  ScmJaxBenchImages(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return 'scm_jax_bench_images'


def time_stream(source, batch: int, workers: int, read: str, batches: int) -> dict:
  """Steady-state images/s of a fresh prefetch=0 stream; start-up timed apart."""
  t0 = time.perf_counter()
  stream = data_lib.make_stream(source, batch, 0, worker_count=workers, prefetch=0,
                                read_options=READS[read])
  try:
    next(stream)
    startup = time.perf_counter() - t0
    for _ in range(workers + 1):
      next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(stream)
    elapsed = time.perf_counter() - t0
  finally:
    stream.close()
  return {'img_s': batches * batch / elapsed, 'ms_per_batch': 1e3 * elapsed / batches,
          'us_per_record': 1e6 * elapsed / (batches * batch), 'startup_s': startup}


def _work(reps: int):
  return jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda _, b: jnp.tanh(b @ a), a))


def overlap_rows(source, batch: int, step_ms: float, batches: int) -> list:
  """Toy stream against two stand-in train steps of ~step_ms: a sleep (the host is
  idle, as while an accelerator computes) and jitted XLA work on this CPU (which
  also needs the cores the loader thread runs on)."""
  n = 256
  x = jnp.ones((n, n), jnp.float32) / n
  probe = _work(20)
  jax.block_until_ready(probe(x))
  t0 = time.perf_counter()
  jax.block_until_ready(probe(x))
  work = _work(max(1, round(20 * step_ms / 1e3 / (time.perf_counter() - t0))))
  jax.block_until_ready(work(x))
  steps = {'sleep': lambda b: time.sleep(step_ms / 1e3),
           'XLA on CPU': lambda b: jax.block_until_ready(work(x + b['x'][:n, :1]))}

  def run(step, prefetch=None):
    """Seconds per step; prefetch=None: the step alone on a fixed batch."""
    fixed = {'x': np.zeros((batch,) + source.shape, np.float32)}
    stream = None
    if prefetch is not None:
      stream = data_lib.make_stream(source, batch, 0, prefetch=prefetch)
    get = (lambda: fixed) if stream is None else (lambda: next(stream))
    try:
      for _ in range(3):
        step(get())
      t0 = time.perf_counter()
      for _ in range(batches):
        step(get())
      return (time.perf_counter() - t0) / batches
    finally:
      if stream is not None:
        stream.close()

  rows = []
  for name, step in steps.items():
    alone = run(step, None)
    rows.append({'step': name, 'prefetch': 'no data', 'ms_per_step': 1e3 * alone})
    for prefetch in (0, 2):
      t = run(step, prefetch)
      rows.append({'step': name, 'prefetch': prefetch, 'ms_per_step': 1e3 * t,
                   'overhead_ms': 1e3 * (t - alone)})
  return rows


def main(argv):
  del argv
  workers = [int(w) for w in _WORKERS.value]
  tmp = tempfile.mkdtemp(prefix='scm_jax_input_pipeline_')
  try:
    run_all(tmp, workers)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def run_all(tmp: str, workers: list) -> None:
  t0 = time.perf_counter()
  folder = make_folder(os.path.join(tmp, 'folder'), _NUM_IMAGES.value)
  tfds_name = make_tfds(os.path.join(tmp, 'tfds'), _NUM_IMAGES.value)
  print(f'generated {_NUM_IMAGES.value} images twice in {time.perf_counter() - t0:.1f} s '
        f'under {tmp}')

  def config(**kw):
    c = data_lib.default_data_config()
    c.update({'image_size': _IMAGE_SIZE.value, **kw})
    return c

  sources = {
      'folder': data_lib.build_source(config(name='folder', path=folder), 'train'),
      'tfds': data_lib.build_source(
          config(name='tfds', tfds_name=tfds_name, data_dir=os.path.join(tmp, 'tfds')),
          'train'),
      'digits': data_lib.build_source(config(name='digits', image_size=0), 'train'),
      'toy': data_lib.build_source(config(name='toy2d', image_size=0), 'train'),
  }
  runs = []  # (dataset, batch, workers, read)
  for name in ('folder', 'tfds'):
    runs += [(name, _BATCH.value, w, 'none') for w in workers]
  runs.append(('tfds', _BATCH.value, 0, 'default'))
  runs += [('digits', _BATCH.value, 0, 'none'), ('toy', _TOY_BATCH.value, 0, 'none'),
           ('toy', _TOY_BATCH.value, 0, 'default')]
  results = {run: [] for run in runs}
  for r in range(_REPEATS.value):
    for run in runs:
      name, batch, w, read = run
      batches = _BATCHES.value if name in ('folder', 'tfds') else 2 * _BATCHES.value
      results[run].append(time_stream(sources[name], batch, w, read, batches))
      print(f'round {r}: {name} batch={batch} workers={w} read={read}: '
            f'{results[run][-1]["img_s"]:.0f} img/s')
  rows = []
  for (name, batch, w, read), rounds in results.items():
    med = lambda key: statistics.median(x[key] for x in rounds)  # noqa: E731
    shape = 'x'.join(map(str, sources[name].shape))
    rows.append({'dataset': f'{name} ({shape})', 'batch': batch, 'workers': w,
                 'read': read, 'prefetch': 0, 'img_s': med('img_s'),
                 'ms_per_batch': med('ms_per_batch'), 'us_per_record': med('us_per_record'),
                 'startup_s': med('startup_s'), 'rounds': rounds})
  print()
  table = common.print_table(rows, [
      ('dataset', 'dataset (decoded shape)', ''), ('batch', 'batch', ''),
      ('workers', 'workers', ''), ('read', 'read', ''), ('img_s', 'img/s', '.0f'),
      ('ms_per_batch', 'ms/batch', '.1f'), ('us_per_record', 'us/record', '.0f'),
      ('startup_s', 'first batch s', '.2f')])
  print()
  overlap = overlap_rows(sources['toy'], _TOY_BATCH.value, _STEP_MS.value, _BATCHES.value)
  overlap_table = common.print_table(overlap, [
      ('step', f'toy x {_TOY_BATCH.value} + stand-in step', ''), ('prefetch', 'prefetch', ''),
      ('ms_per_step', 'ms/step', '.1f'), ('overhead_ms', 'ms over the step alone', '.1f')])
  common.write_json(_OUT.value or common.default_out('input_pipeline'), {
      'flags': {'num_images': _NUM_IMAGES.value, 'image_size': _IMAGE_SIZE.value,
                'batch': _BATCH.value, 'batches': _BATCHES.value, 'workers': workers,
                'repeats': _REPEATS.value, 'toy_batch': _TOY_BATCH.value,
                'step_ms': _STEP_MS.value},
      'grain': grain.__version__, 'rows': rows, 'overlap': overlap,
      'table': table, 'overlap_table': overlap_table})


if __name__ == '__main__':
  app.run(main)
