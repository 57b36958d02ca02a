"""Multi-process start-up: `jax.distributed.initialize` from the config or the environment.

One JAX process runs per host (TPU pods, one process per GPU node) or per GPU (SLURM
one task per GPU). Every process runs the same program; after initialization
jax.devices() lists the devices of all processes, the mesh spans them, each process
loads only its rows of every global batch (data/pipeline.py), only process 0
writes logs and sample grids, and Orbax checkpoints are written collectively.

config.distributed.mode:
  'none'      single process (the default on a workstation).
  'auto'      'explicit' if SCM_JAX_COORDINATOR is set, else 'slurm' inside a SLURM
              step with more than one task, else 'tpu' on a multi-worker TPU VM,
              else 'none'.
  'explicit'  coordinator / num_processes / process_id from the config, or from
              SCM_JAX_COORDINATOR, SCM_JAX_NUM_PROCESSES, SCM_JAX_PROCESS_ID.
  'slurm'     JAX's SLURM detection (SLURM_PROCID, SLURM_NTASKS, first node of the
              step as coordinator). JAX then gives each task ONE local GPU
              (SLURM_LOCALID); for one task per node list the GPUs in
              distributed.local_device_ids (launch/slurm.sh does).
  'tpu'       JAX's Cloud TPU detection (run the same command on all workers).
Must run before anything touches a JAX backend (the train CLI does it first).

A lost process (killed, crashed, its host gone, hung) never leaves the others waiting:
JAX's coordination service declares it dead after `peer_timeout_s` seconds without a
heartbeat (at once if it was the coordinator, process 0) and the runtime aborts every
survivor; infra/lost_process.py turns that abort's crash dump into one line naming the
lost process. A process that fails on its own (an error only it sees) leaves the job
with `exit_after_failure`, which bounds its wait for the others.
"""

import os
import sys
import threading
import traceback
from typing import Mapping, NoReturn, Optional

import jax
import ml_collections

from scm_jax.errors import ConfigError, ScmJaxError
from scm_jax.infra import lost_process

MODES = ('none', 'auto', 'explicit', 'slurm', 'tpu')
ENV_COORDINATOR = 'SCM_JAX_COORDINATOR'
ENV_NUM_PROCESSES = 'SCM_JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'SCM_JAX_PROCESS_ID'
ENV_LOCAL_DEVICE_IDS = 'SCM_JAX_LOCAL_DEVICE_IDS'
LEAVE_S = 5  # how long a process that failed alone waits for the others at the exit
_FAILED_KEY = 'scm_jax/failed/'  # key-value store: processes that left with an error


def default_distributed_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'mode': 'auto',
      'coordinator_address': '',   # host:port of process 0 (explicit mode)
      'num_processes': 0,          # 0 = from the environment
      'process_id': -1,            # -1 = from the environment
      'local_device_ids': '',      # e.g. '0,1,2,3'; '' = JAX's default
      'cpu_collectives': 'gloo',   # CPU multi-process collectives ('' = JAX default)
      'timeout_s': 300,            # wait for all processes to join
      'peer_timeout_s': 10,        # a process silent this long is lost: the others exit
      'one_line_errors': True,     # the runtime's report of a lost process as one line
  })


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError unless config.distributed is valid (.get: configs saved before a field)."""
  if cfg.mode not in MODES:
    raise ConfigError(f'config.distributed.mode={cfg.mode!r} is unknown; choose one of {MODES}.')
  peer = cfg.get('peer_timeout_s', 10)
  if not isinstance(peer, int) or peer < 2:
    raise ConfigError(f'config.distributed.peer_timeout_s={peer!r} must be an integer >= 2 '
                      '(seconds without a heartbeat before a process counts as lost; keep '
                      "it under the scheduler's kill grace, e.g. SLURM's KillWait of 30 s).")
  if cfg.timeout_s <= 0:
    raise ConfigError(f'config.distributed.timeout_s={cfg.timeout_s} must be > 0.')


def detect_mode(env: Mapping[str, str]) -> str:
  """The mode 'auto' resolves to in environment `env`."""
  if env.get(ENV_COORDINATOR):
    return 'explicit'
  if 'SLURM_JOB_ID' in env and 'SLURM_STEP_NODELIST' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return 'tpu'
  return 'none'


def _int_list(value: str, field: str) -> Optional[list[int]]:
  if not value:
    return None
  try:
    return [int(v) for v in str(value).split(',') if v.strip()]
  except ValueError:
    raise ConfigError(f'{field}={value!r} must be a comma-separated list of device ids, '
                      'e.g. 0,1,2,3.') from None


def initialize_kwargs(cfg: ml_collections.ConfigDict,
                      env: Mapping[str, str]) -> Optional[dict]:
  """Arguments for jax.distributed.initialize, or None for a single process (pure)."""
  check_config(cfg)
  mode = cfg.mode
  if mode == 'auto':
    mode = detect_mode(env)
  if mode == 'none':
    return None
  kwargs = {'initialization_timeout': int(cfg.timeout_s),
            'heartbeat_timeout_seconds': int(cfg.get('peer_timeout_s', 10))}
  local = cfg.local_device_ids or env.get(ENV_LOCAL_DEVICE_IDS, '')
  if local:
    kwargs['local_device_ids'] = _int_list(local, 'config.distributed.local_device_ids')
  if mode in ('slurm', 'tpu'):
    # JAX reads the cluster environment itself; explicit values still win.
    kwargs['cluster_detection_method'] = {'slurm': 'slurm', 'tpu': None}[mode]
    if kwargs['cluster_detection_method'] is None:
      del kwargs['cluster_detection_method']
    return kwargs
  address = cfg.coordinator_address or env.get(ENV_COORDINATOR, '')
  num = int(cfg.num_processes or env.get(ENV_NUM_PROCESSES, 0))
  pid = int(cfg.process_id if cfg.process_id >= 0 else env.get(ENV_PROCESS_ID, -1))
  missing = [name for name, bad in (('coordinator_address', not address),
                                    ('num_processes', num <= 0),
                                    ('process_id', pid < 0)) if bad]
  if missing:
    raise ConfigError(
        f'config.distributed.mode=explicit needs {", ".join(missing)}: set '
        f'--config.distributed.<field> or the environment variables {ENV_COORDINATOR}, '
        f'{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}.')
  if pid >= num:
    raise ConfigError(f'config.distributed.process_id={pid} must be < num_processes={num}.')
  kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
  return kwargs


def initialize(cfg: Optional[ml_collections.ConfigDict],
               env: Optional[Mapping[str, str]] = None) -> bool:
  """Joins the multi-process job described by `cfg`/`env`; True if one was joined."""
  cfg = cfg if cfg is not None else default_distributed_config()
  kwargs = initialize_kwargs(cfg, os.environ if env is None else env)
  if kwargs is None:
    return False
  # Preemption is agreed on by train/preemption.py; JAX's service would also catch
  # SIGTERM from here on and swallow one that arrives before the loop starts.
  try:
    jax.config.update('jax_enable_preemption_service', False)
  except AttributeError:  # a JAX without the option has no such service either
    pass
  if cfg.cpu_collectives:
    # Without it, CPU processes cannot run cross-process collectives (tests, CPU pods).
    jax.config.update('jax_cpu_collectives_implementation', cfg.cpu_collectives)
  jax.distributed.initialize(**kwargs)
  if cfg.get('one_line_errors', True):
    lost_process.start_guard(jax.process_index(), jax.process_count(),
                             kwargs['heartbeat_timeout_seconds'])
  return True


def _leave(timeout_s: float) -> bool:
  """jax.distributed.shutdown(), waiting at most `timeout_s`; whether it completed. Its
  barrier waits for every process: if one is lost, the runtime aborts this one meanwhile
  (see the module docstring); if one is alive but elsewhere, the wait times out."""
  done = threading.Event()

  def shutdown():
    try:
      jax.distributed.shutdown()
    finally:
      done.set()
  threading.Thread(target=shutdown, daemon=True).start()
  return done.wait(timeout_s)


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _announce(message: str) -> None:
  """Leaves why this process stops in the coordination service's key-value store, for
  the processes that its exit will interrupt (best effort)."""
  try:
    _client().key_value_set(f'{_FAILED_KEY}{jax.process_index()}', message[:2000])
  except Exception:  # pylint: disable=broad-except  # the service may be gone too
    pass


def _announced() -> list[tuple[int, str]]:
  """[(process, its error line)] of the other processes that left with an error."""
  try:
    entries = _client().key_value_dir_get(_FAILED_KEY)
  except Exception:  # pylint: disable=broad-except
    return []
  return sorted((int(k.rsplit('/', 1)[-1]), v) for k, v in entries
                if int(k.rsplit('/', 1)[-1]) != jax.process_index())


def exit_after_failure(error: BaseException, cfg: Optional[ml_collections.ConfigDict]) -> NoReturn:
  """Ends a multi-process run that failed in this process with `error`, without waiting
  unboundedly for the others: they may be lost, or blocked in a collective waiting for
  this one, which the exit (or the abort of a survivor) then ends.

  A user's error (ScmJaxError) is reported at once as one `error:` line (exit 2) and
  announced to the other processes; the process leaves after at most LEAVE_S (an error
  that all processes meet, such as a bad config, brings them all to the shutdown barrier
  at about the same time). Any other error is most often the consequence of another
  process leaving: a collective fails when its peer's sockets close. If that process
  announced its error, one line says so; else the runtime is given up to twice the peer
  timeout to name a lost process (and abort this one), and the traceback is printed
  only if it did not (exit 1).
  """
  me, n = jax.process_index(), jax.process_count()
  if isinstance(error, ScmJaxError):
    print(f'error: {error}', file=sys.stderr, flush=True)
    _announce(str(error))
    _leave(LEAVE_S)
    code = 2
  else:
    failed = _announced()
    if not failed:
      _leave(2 * int((cfg or {}).get('peer_timeout_s', 10)) + 5)
    if failed:
      i, why = failed[0]
      print(f'error: process {i} of {n} stopped with an error ({why}); process {me} stops '
            f'too. Fix that and relaunch all {n} processes: training resumes from the '
            'newest complete checkpoint.', file=sys.stderr)
    else:
      traceback.print_exception(error, file=sys.stderr)
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access  # atexit would wait at the barrier again
