"""Import NVlabs' EDM2 networks as teacher workdirs; export plain EDM2 runs to their layout.

    python -m scm_jax.import_edm2 --src=edm2-img512-s-2147483-0.130.pkl --workdir=runs/edm2_s
    python -m scm_jax.train --config=configs/imagenet512_scd.py:edm2_s --workdir=runs/scd_s \\
        --config.teacher.workdir=runs/edm2_s --config.data.path=...
    python -m scm_jax.import_edm2 --export --workdir=runs/my_teacher --out=state.npz

--src is a released network pickle (read by infra/safe_pickle.py: nothing in it is
executed), or a state dict of networks_edm2.Precond: a .npz (keys `param/<name>` or
`<name>`, optionally `config_json` holding {"net_kwargs": ...}) or a .safetensors file
(net_kwargs in its metadata, or --net_kwargs='{"img_resolution": 64, ...}'). The workdir
holds config.json and one checkpoint (step 0) whose raw parameters are the file's
weights (a released pickle holds one EMA; no EMA copies are kept); for latent models
the pickle's latent statistics become config.vae.shift / scale, so a student on the
same latents is checked against them. --export writes a plain EDM2 run (any of its
EMAs) as a .npz state dict with NVlabs' names and layouts (`param/<name>`).
"""

import hashlib
import json
import os
import struct
from typing import Optional

from absl import flags
import jax
import ml_collections
import numpy as np

from scm_jax import cli
from scm_jax.errors import CheckpointError, ConfigError
from scm_jax.infra import checkpoint as ckpt_lib
from scm_jax.infra import safe_pickle
from scm_jax.models import build_model
from scm_jax.models import edm2_convert

_SAFETENSORS_DTYPES = {'F32': np.dtype('<f4'), 'F16': np.dtype('<f2'), 'F64': np.dtype('<f8')}


def _read_safetensors(path: str) -> tuple[dict, dict]:
  """(tensors, metadata) of a .safetensors file, parsed here (header JSON + raw bytes)."""
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise CheckpointError(f'{path} is not a safetensors file (too short).')
  (n,) = struct.unpack('<Q', data[:8])
  try:
    header = json.loads(data[8:8 + n])
  except ValueError as e:
    raise CheckpointError(f'{path} is not a safetensors file ({e}).') from None
  meta = header.pop('__metadata__', {}) or {}
  out, body = {}, data[8 + n:]
  for name, spec in header.items():
    dtype = spec.get('dtype')
    if dtype == 'BF16':
      lo, hi = spec['data_offsets']
      bits = np.frombuffer(body[lo:hi], '<u2').astype(np.uint32) << 16
      out[name] = bits.view(np.float32).reshape(spec['shape'])
      continue
    if dtype not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f'{path}: tensor {name} has dtype {dtype}; only float tensors '
                            'are read.')
    lo, hi = spec['data_offsets']
    arr = np.frombuffer(body[lo:hi], _SAFETENSORS_DTYPES[dtype])
    out[name] = arr.reshape(spec['shape'])
  return out, meta


def read_source(path: str, net_kwargs: Optional[dict] = None) -> dict:
  """{'state_dict', 'net_kwargs', 'encoder' (None or {'scale', 'bias'}), 'loss'} of a
  released pickle or a state dict file. CheckpointError / ConfigError in one line."""
  if not os.path.isfile(path):
    raise CheckpointError(f'--src={path} does not exist; download the network first '
                          '(docs/teachers.md lists NVlabs\' files).')
  ext = os.path.splitext(path)[1].lower()
  encoder, loss, kwargs = None, {}, None
  if ext == '.pkl':
    obj = safe_pickle.load(path)
    if not isinstance(obj, dict) or not isinstance(obj.get('ema'), safe_pickle.Persistent):
      raise CheckpointError(f'{path} holds no EDM2 network (no persistent "ema" entry).')
    net = obj['ema']
    if net.class_name != 'Precond':
      raise ConfigError(f'{path}: the network is a {net.class_name}, not EDM2\'s Precond.')
    state_dict, kwargs = safe_pickle.state_dict(net), net.init_kwargs
    enc = obj.get('encoder')
    if isinstance(enc, safe_pickle.Persistent) and enc.class_name == 'StabilityVAEEncoder':
      encoder = {'scale': np.asarray(enc.state['scale'], np.float64).ravel(),
                 'bias': np.asarray(enc.state['bias'], np.float64).ravel()}
    if isinstance(obj.get('loss_fn'), safe_pickle.Persistent):
      loss = obj['loss_fn'].init_kwargs
  elif ext == '.npz':
    with np.load(path, allow_pickle=False) as z:
      names = z.files
      prefixed = any(k.startswith('param/') for k in names)
      state_dict = {k[len('param/'):] if prefixed else k: np.asarray(z[k])
                    for k in names if (k.startswith('param/') if prefixed else
                                       k != 'config_json')}
      if 'config_json' in names:
        kwargs = json.loads(str(z['config_json'])).get('net_kwargs')
  elif ext == '.safetensors':
    state_dict, meta = _read_safetensors(path)
    if 'net_kwargs' in meta:
      kwargs = json.loads(meta['net_kwargs'])
  else:
    raise ConfigError(f'--src={path}: expected a .pkl, .npz or .safetensors file.')
  kwargs = net_kwargs or kwargs
  if not kwargs:
    raise ConfigError(f'{path} does not say which network it holds: pass --net_kwargs=\'{{'
                      '"img_resolution": 64, "img_channels": 4, "label_dim": 1000, '
                      '"model_channels": 192, ...}\' (networks_edm2.Precond arguments).')
  return dict(state_dict=state_dict, net_kwargs=dict(kwargs), encoder=encoder, loss=loss)


def teacher_config(source: dict) -> ml_collections.ConfigDict:
  """The config of the teacher workdir of an imported network (a plain EDM2 diffusion
  model); model fields and data shape from its net_kwargs."""
  from scm_jax import config as config_lib  # the config system imports every model
  fields, shape = edm2_convert.network_config(source['net_kwargs'])
  c = config_lib.base_config('edm2')
  c.model.update(fields)
  c.trigflow.sigma_d = float(fields.get('sigma_data', 0.5))
  c.model.sigma_data = c.trigflow.sigma_d
  c.loss.kind = 'diffusion'
  c.loss.p_mean = float(source['loss'].get('P_mean', c.loss.p_mean))
  c.loss.p_std = float(source['loss'].get('P_std', c.loss.p_std))
  c.ema.decays, c.ema.sigma_rels = (), ()
  c.data.name = 'array'
  c.data.expected_shape = shape
  if source['encoder'] is not None:  # EDM2: latents = raw * scale + bias
    scale, bias = source['encoder']['scale'], source['encoder']['bias']
    c.data.latents = True
    c.vae.scale = tuple(float(s) for s in scale)
    c.vae.shift = tuple(float(-b / s) for b, s in zip(bias, scale))
  return c


def import_network(src: str, workdir: str, net_kwargs: Optional[dict] = None) -> str:
  """Writes the teacher workdir of `src`; returns a one-line summary. Nothing is written
  when the file is refused or does not fit its network."""
  from scm_jax.train import state as state_lib
  from scm_jax.train import workdir as workdir_lib
  source = read_source(src, net_kwargs)
  c = teacher_config(source)
  model = build_model(c.model)
  shape = tuple(c.data.expected_shape)
  like = jax.eval_shape(lambda k: state_lib.init_params(model, shape, k),
                        jax.random.PRNGKey(0))
  params = edm2_convert.state_dict_to_params(source['state_dict'], like)
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and ckpt_lib.Checkpointer(
      workdir, read_only=True).steps():
    raise CheckpointError(f'--workdir={workdir} already holds checkpoints; import into a '
                          'new directory.')
  state = state_lib.create_train_state(c, model, shape, jax.random.PRNGKey(0),
                                       params=jax.tree.map(np.asarray, params))
  with open(src, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  workdir_lib.prepare(workdir)
  workdir_lib.save_config(workdir, c)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  try:
    ckpt.save(0, state, {'config': json.loads(c.to_json_best_effort()),
                         'data_shape': list(shape), 'num_classes': int(c.model.num_classes),
                         'process_count': 1, 'imported_from': os.path.basename(src),
                         'imported_sha256': digest})
    ckpt.wait()
  finally:
    ckpt.close()
  n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return (f'imported {os.path.basename(src)}: EDM2 {c.model.channels} channels x '
          f'{tuple(c.model.channel_mult)}, {n / 1e6:.1f}M parameters, data {shape}, '
          f'{c.model.num_classes} classes -> {workdir}')


def export_network(workdir: str, out: str, ema: str = '') -> str:
  """Writes the weights of a plain EDM2 run as an NVlabs-layout .npz state dict."""
  from scm_jax.train import teacher as teacher_lib
  from scm_jax.train import workdir as workdir_lib
  from scm_jax.infra import files
  c = workdir_lib.load_config(workdir)
  if c.model.name != 'edm2' or c.model.get('parameterization') != 'edm':
    raise ConfigError(f'{workdir} holds a {c.model.name} model with parameterization '
                      f'{c.model.get("parameterization")!r}; only plain EDM2 runs '
                      "(parameterization='edm') have NVlabs' layout.")
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointError(f'{workdir} has no checkpoint to export.')
    shape = tuple(ckpt.read_meta(step)['data_shape'])
  finally:
    ckpt.close()
  _, params = teacher_lib.load_weights(workdir, c, shape, ema, -1, '--workdir')
  state_dict = edm2_convert.params_to_state_dict(jax.device_get(params))
  fields = c.model
  net_kwargs = dict(img_resolution=shape[0], img_channels=shape[2],
                    label_dim=int(fields.num_classes), model_channels=int(fields.channels),
                    channel_mult=list(fields.channel_mult), num_blocks=int(fields.num_blocks),
                    attn_resolutions=list(fields.attn_resolutions),
                    channels_per_head=int(fields.channels_per_head),
                    dropout=float(fields.dropout), logvar_channels=int(fields.logvar_channels),
                    sigma_data=float(c.trigflow.sigma_d))
  arrays = {f'param/{k}': v for k, v in state_dict.items()}
  arrays['config_json'] = np.asarray(json.dumps({'net_kwargs': net_kwargs}))
  files.atomic_savez(out, **arrays)
  return f'wrote {out}: {len(state_dict)} tensors of {workdir} at step {step}'


def main(argv):
  del argv
  f = flags.FLAGS
  if f.export:
    if not (f.workdir and f.out):
      raise ConfigError('--export needs --workdir=RUN and --out=FILE.npz.')
    print(export_network(f.workdir, f.out, f.ema))
    return
  if not (f.src and f.workdir):
    raise ConfigError('pass --src=FILE (.pkl, .npz or .safetensors) and --workdir=OUT.')
  kwargs = json.loads(f.net_kwargs) if f.net_kwargs else None
  print(import_network(f.src, f.workdir, kwargs))


def _define_flags():
  # Defined at run time, not import: other entry points own the same flag names, and the
  # library (import_network, export_network) is imported alongside them.
  flags.DEFINE_string('src', None, 'Released EDM2 pickle, .npz or .safetensors.')
  flags.DEFINE_string('workdir', None, 'Teacher workdir to write (import) or the run to read '
                      '(--export).')
  flags.DEFINE_string('net_kwargs', '', 'JSON constructor arguments of '
                      'networks_edm2.Precond, for a bare state dict.')
  flags.DEFINE_bool('export', False, 'Export --workdir to --out instead.')
  flags.DEFINE_string('out', None, '--export: the .npz to write.')
  flags.DEFINE_string('ema', '', "--export: weights ('' = first EMA, 'params', a name).")


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
