"""NVlabs' EDM2 networks (networks_edm2.Precond state dicts) <-> scm-jax's plain EDM2.

The module names of `EDM2` follow networks_edm2.py, so the mapping is by name:

    unet.emb_fourier.{freqs,phases}  cond/fourier/{freqs,phases}
    unet.emb_noise.weight            cond/noise/weight
    unet.emb_label.weight            cond/label/weight
    unet.enc.16x16_block0.X          enc16_block0/X        (likewise dec.*, *_conv, ...)
    unet.out_gain, unet.out_conv     out_gain, out_conv
    logvar_fourier, logvar_linear    logvar_fourier, logvar_linear (EDM2's uncertainty head)

and by layout: torch convolutions are [out, in, kh, kw] (flax: [kh, kw, in, out]), linear
layers [out, in] (flax: [in, out]), and the attention qkv projection orders its output
channels (head, channel, q|k|v) where `Block` reads (q|k|v, head, channel).
`network_config` turns networks_edm2's constructor arguments into model fields.
"""

import re
from typing import Any, Mapping

import numpy as np

from scm_jax.errors import ConfigError

# EDM2's UNet constructor arguments that scm-jax's EDM2 has as fixed constants, with the
# only values it supports (networks_edm2.UNet defaults).
_FIXED = {'label_balance': 0.5, 'channel_mult_noise': None, 'resample_filter': [1, 1]}
_NAMED = {'concat_balance': 'concat_balance', 'res_balance': 'res_balance',
          'attn_balance': 'attn_balance', 'clip_act': 'clip_act',
          'channels_per_head': 'channels_per_head', 'dropout': 'dropout',
          'num_blocks': 'num_blocks', 'logvar_channels': 'logvar_channels',
          'sigma_data': 'sigma_data'}
_IGNORED = ('img_resolution', 'use_fp16', 'model_type', 'class_name')
_BLOCK = re.compile(r'^(enc|dec)(\d+)_(.+)$')
_TORCH_BLOCK = re.compile(r'^unet\.(enc|dec)\.(\d+)x\2_(.+)$')


def network_config(net_kwargs: Mapping[str, Any]) -> tuple[dict, tuple[int, int, int]]:
  """(model config fields, data shape (H, W, C)) of networks_edm2.Precond(**net_kwargs).

  ConfigError names any argument this port does not implement, so a network is never
  built with a silently different architecture."""
  kw = dict(net_kwargs)
  res, channels = int(kw.pop('img_resolution')), int(kw.pop('img_channels'))
  fields = dict(name='edm2', parameterization='edm', time_embed_kind='fourier',
                norm_mode='adagn', dropout_max_resolution=0,
                channels=int(kw.pop('model_channels', 192)),
                channel_mult=tuple(int(m) for m in kw.pop('channel_mult', (1, 2, 3, 4))),
                num_classes=int(kw.pop('label_dim', 0)),
                attn_resolutions=tuple(int(r) for r in kw.pop('attn_resolutions', (16, 8))))
  emb_mult = kw.pop('channel_mult_emb', None)
  if emb_mult is not None:
    fields['time_embed_dim'] = fields['channels'] * int(emb_mult)
  for src, dst in _NAMED.items():
    if src in kw:
      fields[dst] = kw.pop(src)
  for key in _IGNORED:
    kw.pop(key, None)
  bad = {k: v for k, v in kw.items() if _FIXED.get(k, object()) != v}
  if bad:
    raise ConfigError(f'EDM2 network arguments {bad} are not supported by scm_jax.models.'
                      f'edm2 (it implements {_FIXED} for them); this network cannot be '
                      'imported exactly.')
  return fields, (res, res, channels)


def _flax_path(torch_name: str) -> tuple[str, ...]:
  """Flax parameter path of a Precond state-dict name (ValueError if it has none)."""
  m = _TORCH_BLOCK.match(torch_name)
  if m:
    kind, res, rest = m.groups()
    return (f'{kind}{res}_{rest.split(".")[0]}',) + tuple(rest.split('.')[1:])
  parts = torch_name.split('.')
  if parts[0] == 'unet' and len(parts) >= 2 and parts[1].startswith('emb_'):
    sub = {'emb_fourier': 'fourier', 'emb_noise': 'noise', 'emb_label': 'label'}
    if parts[1] in sub:
      return ('cond', sub[parts[1]]) + tuple(parts[2:])
  if parts[0] == 'unet' and len(parts) >= 2 and parts[1] in ('out_gain', 'out_conv'):
    return tuple(parts[1:])
  if parts[0] in ('logvar_fourier', 'logvar_linear'):
    return tuple(parts)
  raise ValueError(torch_name)


def _torch_name(path: tuple[str, ...]) -> str:
  m = _BLOCK.match(path[0])
  if m:
    kind, res, rest = m.groups()
    return '.'.join([f'unet.{kind}.{res}x{res}_{rest}'] + list(path[1:]))
  if path[0] == 'cond':
    sub = {'fourier': 'emb_fourier', 'noise': 'emb_noise', 'label': 'emb_label'}
    return '.'.join(['unet', sub[path[1]]] + list(path[2:]))
  if path[0] in ('out_gain', 'out_conv'):
    return '.'.join(('unet',) + path)
  return '.'.join(path)


def _to_flax(name: str, w: np.ndarray) -> np.ndarray:
  if w.ndim == 4:
    w = w.transpose(2, 3, 1, 0)
    if name.endswith('attn_qkv.weight'):  # (head, channel, qkv) -> (qkv, head, channel)
      kh, kw, cin, c3 = w.shape
      w = w.reshape(kh, kw, cin, c3 // 3, 3).transpose(0, 1, 2, 4, 3).reshape(w.shape)
  elif w.ndim == 2:
    w = w.T
  return np.array(w, order='C')


def _to_torch(name: str, w: np.ndarray) -> np.ndarray:
  if w.ndim == 4:
    if name.endswith('attn_qkv.weight'):
      kh, kw, cin, c3 = w.shape
      w = w.reshape(kh, kw, cin, 3, c3 // 3).transpose(0, 1, 2, 4, 3).reshape(w.shape)
    w = w.transpose(3, 2, 0, 1)
  elif w.ndim == 2:
    w = w.T
  return np.array(w, order='C')


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], like) -> dict:
  """Flax params of the shape of `like` (e.g. jax.eval_shape of model.init) from a Precond
  state dict. ConfigError lists missing, unexpected and mis-shaped tensors."""
  wanted = {path: leaf for path, leaf in _flatten(like)}
  out, unexpected, shapes, misshaped = {}, [], [], set()
  for name, w in state_dict.items():
    try:
      path = _flax_path(name)
    except ValueError:
      unexpected.append(name)
      continue
    if path not in wanted:
      unexpected.append(name)
      continue
    w = _to_flax(name, np.asarray(w, np.float32))
    if tuple(w.shape) != tuple(wanted[path].shape):
      shapes.append(f'{name} {tuple(w.shape)} vs {tuple(wanted[path].shape)}')
      misshaped.add(path)
      continue
    out[path] = w
  missing = [_torch_name(p) for p in wanted if p not in out and p not in misshaped]
  if missing or unexpected or shapes:
    raise ConfigError('the EDM2 state dict does not fit the network its config describes: '
                      f'missing {missing[:6]}, unexpected {unexpected[:6]}, shapes '
                      f'{shapes[:6]}' + (' (and more)' if max(len(missing), len(unexpected),
                                                              len(shapes)) > 6 else '') + '.')
  tree: dict = {}
  for path, w in out.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = w
  return tree


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """The Precond state dict (NVlabs' names and layouts, float32) of plain EDM2 params."""
  return {_torch_name(path): _to_torch(_torch_name(path), np.asarray(w, np.float32))
          for path, w in _flatten(params)}


def precond(model, params, x, sigma, labels=None):
  """networks_edm2.Precond's forward on NHWC data: (D_x, F_x, logvar) at EDM noise level
  `sigma` [B] (EDM, Table 1: c_in, c_skip, c_out of sigma_d = model.sigma_data; c_noise
  = ln(sigma) / 4 from sigma itself). The network input c_in x is TrigFlow's x_t / sigma_d
  at t = arctan(sigma / sigma_d), and F_x = -F (models/edm2.py)."""
  import jax.numpy as jnp  # the converter itself needs numpy only
  sd = model.sigma_data
  sigma = jnp.asarray(sigma, jnp.float32)
  b = (slice(None),) + (None,) * (x.ndim - 1)
  c_in = 1 / jnp.sqrt(sd**2 + sigma**2)
  c_skip = sd**2 / (sigma**2 + sd**2)
  c_out = sigma * sd / jnp.sqrt(sigma**2 + sd**2)
  F, logvar = model.apply({'params': params}, x * c_in[b], jnp.arctan(sigma / sd), labels,
                          sigma=sigma)
  F_x = -F
  return c_skip[b] * x + c_out[b] * F_x, F_x, logvar
