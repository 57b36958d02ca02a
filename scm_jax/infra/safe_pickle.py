"""Reading NVlabs' released EDM2 network pickles as data, without executing them.

Those files (edm2-img512-*.pkl, edm2-img64-*.pkl) are torch_utils.persistence pickles:
each network is stored with its module's source code, which plain unpickling exec()s,
and every tensor is a torch pickle of its own (torch.storage._load_from_bytes, which is
torch.load without weights_only). Here nothing in a file is executed:

- `find_class` resolves exactly the globals those files use (ALLOWED) to small data
  builders defined below; any other global is refused with one line naming it, before
  anything is built from it;
- a persistent object becomes a `Persistent` record (class name, constructor arguments,
  state); its `module_src` is dropped unread;
- a tensor's storage blob is parsed by `_decode_storage` (the legacy torch.save layout:
  magic, version, sys info, a pickle whose only global is the storage type, the keys,
  then each storage's element count and raw little-endian bytes) into a numpy array;
  strides and offsets are checked against the storage;
- numpy arrays are rebuilt by numpy's own _reconstruct, with object dtypes refused.

torch is not needed. `state_dict` walks the rebuilt modules into NVlabs' state-dict
names (parameters and persistent buffers), which models/edm2_convert.py maps to flax.
"""

import collections
import dataclasses
import io
import pickle
import struct
from typing import Any

import numpy as np

from scm_jax.errors import CheckpointError

_TORCH_MAGIC = 0x1950a86a20f9469cfc6c
_STORAGE_DTYPES = {('torch', 'FloatStorage'): np.dtype('<f4'),
                   ('torch', 'HalfStorage'): np.dtype('<f2')}


class PickleRefused(CheckpointError):
  """A pickle asked for something a data-only reader does not do."""


class EasyDict(dict):
  """dnnlib.util.EasyDict as a plain dict with attribute access."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


@dataclasses.dataclass
class Persistent:
  """A torch_utils.persistence object, as data: its class name and pickled state."""
  class_name: str
  state: dict

  @property
  def init_kwargs(self) -> dict:
    return dict(self.state.get('_init_kwargs') or {})


class TorchModule:
  """A torch.nn container (ModuleDict) as data: BUILD fills its __dict__."""


def _reconstruct_persistent_obj(meta):
  if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(
      meta.get('class_name'), str) or not isinstance(meta.get('state'), dict):
    raise PickleRefused('a persistent object in the pickle is not a plain class record')
  return Persistent(meta['class_name'], meta['state'])  # module_src is never read


def _ndarray_reconstruct(cls, shape, typecode):
  if cls is not np.ndarray:
    raise PickleRefused(f'numpy _reconstruct of {cls!r} (only numpy.ndarray is read)')
  return np.ndarray.__new__(np.ndarray, shape, np.dtype('u1'))


def _dtype(spec, align=False, copy=False):
  if not isinstance(spec, str):
    raise PickleRefused(f'numpy dtype from {type(spec).__name__} (only names are read)')
  dtype = np.dtype(spec)
  if dtype.hasobject or dtype.fields is not None:
    raise PickleRefused(f'numpy dtype {spec!r} holds Python objects; it is never read')
  return dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise PickleRefused('a tensor without a decoded storage')
  size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride) or offset < 0 or min(stride, default=0) < 0 or min(
      size, default=1) < 0:
    raise PickleRefused(f'a tensor with size {size}, stride {stride}, offset {offset}')
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if last >= storage.size:
    raise PickleRefused(f'a tensor (size {size}, stride {stride}, offset {offset}) reads '
                        f'past its storage of {storage.size} elements')
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                         tuple(s * item for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  return data


def _load_from_bytes(blob):
  if not isinstance(blob, bytes):
    raise PickleRefused('a storage that is not bytes')
  return _decode_storage(blob)


ALLOWED = {
    ('dnnlib.util', 'EasyDict'): EasyDict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
    ('numpy._core.multiarray', '_reconstruct'): _ndarray_reconstruct,
    ('numpy.core.multiarray', '_reconstruct'): _ndarray_reconstruct,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): _dtype,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch.storage', '_load_from_bytes'): _load_from_bytes,
    ('torch.nn.modules.container', 'ModuleDict'): TorchModule,
}


class _Unpickler(pickle.Unpickler):
  """find_class from a fixed table; persistent ids refused (or handled by a subclass)."""
  table: dict = ALLOWED

  def find_class(self, module, name):
    try:
      return self.table[(module, name)]
    except KeyError:
      raise PickleRefused(f'the pickle asks for the global {module}.{name}, which a '
                          'released EDM2 network pickle does not use') from None

  def persistent_load(self, pid):
    raise PickleRefused(f'the pickle holds a persistent id {str(pid)[:60]!r}')


class _StorageUnpickler(_Unpickler):
  """The object pickle of a storage blob: its only global is the storage type."""
  table = {k: v for k, v in _STORAGE_DTYPES.items()}

  def __init__(self, f):
    super().__init__(f)
    self.storages = {}

  def persistent_load(self, pid):
    if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != 'storage'
        or not isinstance(pid[1], np.dtype) or not isinstance(pid[2], str)):
      raise PickleRefused(f'a storage blob with persistent id {str(pid)[:60]!r}')
    self.storages[pid[2]] = (pid[1], int(pid[4]))
    return pid[2]


def _plain(f):
  """A pickle of plain values only (no globals), e.g. the magic number or sys info."""
  u = _Unpickler(f)
  u.table = {}
  return u.load()


def _decode_storage(blob: bytes) -> np.ndarray:
  f = io.BytesIO(blob)
  if _plain(f) != _TORCH_MAGIC or _plain(f) != 1001:
    raise PickleRefused('a tensor storage that is not a legacy torch.save blob')
  info = _plain(f)
  if not isinstance(info, dict) or not info.get('little_endian', False):
    raise PickleRefused('a big-endian or unlabelled tensor storage')
  u = _StorageUnpickler(f)
  key = u.load()
  keys = _plain(f)
  if keys != [key] or key not in u.storages:
    raise PickleRefused('a storage blob whose keys do not match its storage')
  dtype, numel = u.storages[key]
  header = f.read(8)
  if len(header) != 8 or struct.unpack('<q', header)[0] != numel:
    raise PickleRefused('a storage blob whose element count does not match its header')
  raw = f.read(numel * dtype.itemsize)
  if len(raw) != numel * dtype.itemsize or f.read(1):
    raise PickleRefused('a storage blob of the wrong length')
  return np.frombuffer(raw, dtype).astype(dtype.newbyteorder('='))


def load(path: str) -> Any:
  """The pickle at `path` rebuilt as data (dicts, numpy arrays, `Persistent` records).

  PickleRefused (one line naming the global or the defect) for anything a released EDM2
  network pickle does not hold; nothing in the file is executed."""
  try:
    with open(path, 'rb') as f:
      return _Unpickler(f).load()
  except PickleRefused as e:
    raise PickleRefused(f'{path}: refused: {e}; nothing in it was executed. Only NVlabs\' '
                        'released EDM2 network pickles (or a .npz / .safetensors state '
                        'dict) are read.') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
          struct.error) as e:
    raise PickleRefused(f'{path} is not a readable EDM2 network pickle ({type(e).__name__}: '
                        f'{str(e)[:120]}); nothing in it was executed.') from None


def _module_state(obj) -> dict:
  if isinstance(obj, Persistent):
    return obj.state
  if isinstance(obj, TorchModule):
    return vars(obj)
  raise PickleRefused(f'a module of type {type(obj).__name__} where a network was expected')


def state_dict(module, prefix: str = '') -> dict[str, np.ndarray]:
  """NVlabs' state dict of a rebuilt module: parameters and persistent buffers by dotted
  name, as torch's Module.state_dict names them."""
  state = _module_state(module)
  out = {}
  skip = set(state.get('_non_persistent_buffers_set') or ())
  for group in ('_parameters', '_buffers'):
    for name, value in (state.get(group) or {}).items():
      if value is not None and name not in skip:
        if not isinstance(value, np.ndarray):
          raise PickleRefused(f'{prefix}{name} is not a tensor')
        out[prefix + name] = value
  for name, child in (state.get('_modules') or {}).items():
    if child is not None:
      out.update(state_dict(child, f'{prefix}{name}.'))
  return out
