"""Metric and image writers: TensorBoard event files, a JSONL log, PNG files.

TensorBoard events are written with the `tensorboard` package's own writer, so no
TensorFlow is needed. Only process 0 writes; other processes get a no-op writer.
"""

import io
import json
import logging
import os
import time
from typing import Mapping, Optional

import numpy as np
from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from scm_jax.infra import files


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 HxW or HxWxC image -> PNG bytes."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


class MetricWriter:
  """Writes scalars to TensorBoard + `<workdir>/metrics.jsonl`, images to TB + PNG.

  `resume_step`: the run resumed from this step and will log the later steps again, so
  rows of metrics.jsonl after it are dropped (rows stay unique by step) and TensorBoard
  is told to purge its later events (a SessionLog START at that step).
  """

  def __init__(self, workdir: str, enabled: bool = True, subdir: str = 'tb',
               resume_step: Optional[int] = None):
    self.workdir = workdir
    self.enabled = enabled
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if resume_step is not None and os.path.exists(path):
        try:
          rows = files.read_jsonl(path)
        except ValueError as e:  # edited or damaged: rewritten from its good rows, kept
          kept = files.keep_aside(path)
          logging.warning('%s; the file is kept as %s and its readable rows go on in %s.',
                          str(e).split('; the file')[0], kept, path)
          rows = files.read_jsonl(kept, skip_damaged=True)
        files.atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in rows
                                              if r.get('step', 0) <= resume_step))
      self._tb = EventFileWriter(os.path.join(workdir, subdir))
      if resume_step is not None:
        self._tb.add_event(Event(wall_time=time.time(), step=int(resume_step),
                                 session_log=SessionLog(status=SessionLog.START)))
      self._jsonl = open(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
    self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray],
                   png_dir: str = 'samples') -> dict:
    """uint8 images -> TensorBoard image summaries and `<workdir>/<png_dir>/<tag>_<step>.png`."""
    paths = {}
    if not self.enabled:
      return paths
    values = []
    os.makedirs(os.path.join(self.workdir, png_dir), exist_ok=True)
    for tag, img in images.items():
      img = np.asarray(img)
      data = png_bytes(img)
      channels = 1 if img.ndim == 2 else img.shape[-1]
      values.append(Summary.Value(tag=tag, image=Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=channels,
          encoded_image_string=data)))
      path = os.path.join(self.workdir, png_dir, f'{tag.replace("/", "_")}_{int(step):08d}.png')
      with open(path, 'wb') as f:
        f.write(data)
      paths[tag] = path
    self._tb.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
    self._tb.flush()
    return paths

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False
