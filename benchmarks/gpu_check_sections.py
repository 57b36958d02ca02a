"""The sections of benchmarks/gpu_check.py. Each runs in its own process and fills a
Recorder (a dict rewritten to disk on every entry) as it measures; see gpu_check.py."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

GIB = 2 ** 30
SMOKE_MODEL = dict(name='dit', patch_size=2, hidden_size=32, depth=1, num_heads=2, head_dim=0,
                   freq_dim=32, logvar_channels=16, num_classes=10)
# Pallas (block_q, block_k) tried in the attention section on a GPU.
BLOCK_SWEEP = ((64, 64), (128, 64), (64, 128), (128, 128), (64, 32))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _left(args) -> float:
  return args.deadline - time.perf_counter()


# ------------------------------------------------------------------ model setup


def _config(args, kind: str, batch: int, depth: int = 0, attn_impl: str = ''):
  c = args.config.copy_and_resolve_references()
  if args.smoke:
    from scm_jax.models import default_model_config
    c.model = default_model_config('dit')
    c.model.update(SMOKE_MODEL)
    c.data.expected_shape = (8, 8, 4)
  c.model.dtype = 'bfloat16'
  if 'attn_impl' in c.model:
    c.model.attn_impl = attn_impl or args.attn_impl
  if depth and 'depth' in c.model:
    c.model.depth = depth
  c.loss.kind = kind
  if kind != 'scd' or not c.model.get('guidance_embed', False):
    c.teacher.guidance_max = 1.0   # the guidance input s is an sCD student's (App. G.2)
  c.train.batch_size = batch
  c.train.progress_bar = False
  c.data.prefetch = 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c


def _experiment(c, abstract_teacher: bool = False):
  """Experiment on synthetic latents; sCD gets a same-architecture teacher with random
  weights (abstract: shapes only, for lowering)."""
  from scm_jax.train import lowering
  return lowering.synthetic_experiment(c, abstract_teacher=abstract_teacher)


def _batch(exp, batch: int) -> dict:
  from scm_jax.infra import sharding
  rng = np.random.RandomState(1)
  b = {'x': 0.5 * rng.randn(batch, *exp.data_shape).astype(np.float32)}
  if exp.num_classes:
    b['label'] = rng.randint(0, exp.num_classes, batch).astype(np.int32)
  return sharding.put_batch(b, exp.mesh)


def _lowered_flops(c, program: str, batch: int) -> float:
  from scm_jax.train import lowering
  exp = _experiment(c, abstract_teacher=True)
  if program == 'step':
    lowered = exp.jit_step.lower(exp.abstract_state, lowering.batch_spec(exp, batch),
                                 *lowering.teacher_spec(exp))
  else:
    lowered = jax.jit(lambda p, x, t: exp.F_fn(p)(x, t)).lower(
        exp.abstract_state.params, jax.ShapeDtypeStruct((batch,) + exp.data_shape, jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32))
  return _flops(lowered)


def model_flops(args, kind: str, batch: int, depth: int = 0, program: str = 'step') -> float:
  """FLOPs of one train step (or one forward) with plain-XLA attention, from the lowered
  HLO (no compile): custom calls (cuDNN, Pallas) are invisible to XLA's cost analysis,
  so this is the model's FLOP count that MFU divides by. A deep model's count is
  extrapolated from 2 and 4 blocks (exact: the blocks are identical; DiT-XXL sCD at
  batch 8: 128.51 TFLOP either way, in 10 s instead of 80 s of lowering on CPU)."""
  full = _config(args, kind, batch).model.get('depth', 0)
  if not depth and full > 4:
    f2, f4 = (_lowered_flops(_config(args, kind, batch, d, 'xla'), program, batch)
              for d in (2, 4))
    return f4 + (full - 4) / 2 * (f4 - f2) if f2 and f4 else None
  return _lowered_flops(_config(args, kind, batch, depth, 'xla'), program, batch)


def _flops(lowered_or_compiled) -> float:
  cost = lowered_or_compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0)) or None


def _memory_limit(args) -> int:
  stats = jax.devices()[0].memory_stats() or {}
  if args.device_memory_gib or 'bytes_limit' not in stats:
    return int((args.device_memory_gib or (2 if args.smoke else 16)) * GIB)
  return int(stats['bytes_limit'])


# ------------------------------------------------------------------ sections


def env(rec, args):
  from scm_jax.models import kernels
  import flax
  info = common.device_info()
  for k, v in info.items():
    rec[k] = v
  rec['flax'] = flax.__version__
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel
    rec['cudnn'] = cuda_versions.cudnn_get_version() if cuda_versions else None
  except Exception as e:  # pylint: disable=broad-except
    rec['cudnn'] = f'unknown ({type(e).__name__})'
  rec['memory_limit_gib'] = round(_memory_limit(args) / GIB, 2)
  rec['peak_bf16_tflops'] = (common.peak_flops('bf16') or 0) / 1e12 or None
  rec['cudnn_attention'] = kernels.cudnn_supported(jnp.zeros((1, 8, 1, 64), jnp.bfloat16))


def attention(rec, args):
  from scm_jax.models import attention as attn
  from scm_jax.models import kernels
  c = _config(args, 'sct', 1)
  if args.attn_shape:
    shape = args.attn_shape
  elif args.smoke:
    shape = (2, 64, 2, 16)
  elif c.model.name == 'dit' and c.model.head_dim:
    tokens = (c.data.expected_shape[0] // c.model.patch_size) ** 2
    shape = (32, tokens, c.model.hidden_size // c.model.head_dim, c.model.head_dim)
  else:     # DiT-XXL/2 on 64x64 latents; other models: pass --attn_shape
    shape = (32, 1024, 24, 64)
  b, length, h, d = shape
  rec['shape'], rec['dtype'] = list(shape), 'bfloat16'
  arrays = [jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)
            for k in jax.random.split(jax.random.key(int(time.time())), 7)]
  q, k, v, dq, dk, dv, w = arrays
  f32 = [a.astype(jnp.float32) for a in arrays]
  xla = lambda q, k, v: attn.attention(q, k, v, impl='xla')
  ours = lambda q, k, v: attn.attention(q, k, v, impl=args.attn_impl)
  out_ref, tan_ref = jax.jvp(xla, tuple(f32[:3]), tuple(f32[3:6]))
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w))
  grad_ref = jax.grad(loss(xla), argnums=(0, 1, 2))(*f32[:3])
  unit = b * h * length ** 2 * d
  backend = {'gpu': 'triton', 'tpu': 'mosaic'}.get(jax.default_backend())

  fwd = {'fwd_xla': xla, 'fwd_blockwise': kernels.primal_fn('blockwise'), 'fwd_ours': ours}
  if kernels.cudnn_supported(q):
    fwd['fwd_cudnn'] = kernels.PRIMALS['cudnn']
  jvp = {'jvp_xla': xla, 'jvp_flash': lambda q, k, v: attn.attention(q, k, v, impl='flash'),
         'jvp_ours': ours}
  blocks = BLOCK_SWEEP if backend else ((16, 16),)
  kernel_jvps = {f'jvp_kernel_{bq}x{bk}': (bq, bk) for bq, bk in blocks}
  kernel_fns = {n: jax.jit(lambda *a, bl=bl: kernels.attention_jvp(
      *a, block_q=bl[0], block_k=bl[1], backend=backend or 'triton', interpret=backend is None))
                for n, bl in kernel_jvps.items()}
  jvp_error = lambda o: _rel(o[1], tan_ref)
  groups = [     # timed group by group, so that a capped section keeps whole groups
      ({n: jax.jit(f) for n, f in fwd.items()}, (q, k, v), 4 * unit, lambda o: _rel(o, out_ref)),
      ({n: jax.jit(lambda *a, f=f: jax.jvp(f, a[:3], a[3:])) for n, f in jvp.items()},
       (q, k, v, dq, dk, dv), 12 * unit, jvp_error),
      ({'grad_xla': jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2))),
        'grad_ours': jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))},
       (q, k, v), 12 * unit, lambda o: max(_rel(a, r) for a, r in zip(o, grad_ref))),
      (kernel_fns, (q, k, v, dq, dk, dv), 12 * unit, jvp_error),
  ]
  for fns, inputs, flops, error in groups:
    ready = {}
    for name, fn in fns.items():     # compile and check each; a failure costs only itself
      try:
        rec[name] = {'rel_err': error(fn(*inputs))}
        ready[name] = fn
      except Exception as e:  # pylint: disable=broad-except
        rec[name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
    timing = common.time_interleaved({n: (lambda f=f: f(*inputs)) for n, f in ready.items()},
                                     args.repeats, warmup=2)
    for name, t in timing.items():
      s = t['median_s']
      rec[name] = {**rec.data[name], 'ms': 1e3 * s, 'tflops': flops / s / 1e12}


def ratio(rec, args):
  """sCT / diffusion first (timed as soon as both compiled), then sCD / diffusion."""
  depth = args.ratio_depth if not args.smoke else 1
  batch = args.ratio_batch if not args.smoke else 2
  rec['depth'], rec['batch'] = depth, batch
  calls = {}
  for kind in ('diffusion', 'sct', 'scd'):
    exp = _experiment(_config(args, kind, batch, depth))
    state, data = exp.init_state(), _batch(exp, batch)
    compiled = exp.jit_step.lower(state, data, *exp.teacher_args).compile()
    calls[kind] = common.stateful(compiled, state, data, *exp.teacher_args)
    rec[f'{kind}_model_gflops'] = (model_flops(args, kind, batch, depth) or 0) / 1e9
    if kind == 'diffusion':
      continue
    timing = common.time_interleaved({k: calls[k] for k in ('diffusion', kind)}, args.repeats,
                                     warmup=2)
    for k, t in timing.items():
      rec[f'{k}_ms'] = 1e3 * t['median_s']
    rec[f'{kind}_over_diffusion_time'] = timing[kind]['median_s'] / timing['diffusion']['median_s']
    rec[f'{kind}_over_diffusion_flops'] = (rec.data[f'{kind}_model_gflops']
                                           / rec.data['diffusion_model_gflops'])


def round_batch(b: float) -> int:
  """A microbatch candidate: multiples of 8 from 16 up."""
  b = int(b)
  return b - b % 8 if b >= 16 else max(b, 1)


def next_batch(points: list, limit: float, grad_bytes: float, max_batch: int) -> int:
  """The next microbatch to compile from compiled (batch, peak bytes, temp bytes) points,
  aiming at 95% of `limit`. With one point, every temporary beyond one float32 gradient
  counts per example (an overestimate of the slope); with more, the line through the
  last two points."""
  if len(points) == 1:
    b0, peak0, temp0 = points[0]
    slope = (temp0 - grad_bytes) / b0
  else:
    (b0, peak0, _), (b1, peak1, _) = points[-2:]
    slope = (peak1 - peak0) / (b1 - b0)
  return min(round_batch(b0 + (0.95 * limit - peak0) / max(slope, 1.)), max_batch)


def largest_fitting(points: list, limit: float):
  fits = [b for b, peak, _ in points if peak <= 0.95 * limit]
  return max(fits) if fits else None


def train(rec, args):
  from scm_jax.train import lowering
  limit = _memory_limit(args)
  rec['limit_gib'] = limit / GIB
  b0 = args.batch or (args.probe_batch if not args.smoke else 2)
  max_batch = args.max_batch if not args.smoke else 2
  c = _config(args, 'scd', b0)
  rec['model'] = f"{c.model.name} {c.model.get('hidden_size', c.model.get('channels', ''))}"
  exp = _experiment(c)
  targs = exp.teacher_args
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(exp.abstract_state.params))
  rec['params_M'] = params / 1e6
  compiled, points = {}, []

  def compile_at(batch):
    t0 = time.perf_counter()
    exe = exp.jit_step.lower(exp.abstract_state, lowering.batch_spec(exp, batch),
                             *targs).compile()
    mem = exe.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    compiled[batch] = exe
    points.append((batch, peak, mem.temp_size_in_bytes))
    rec[f'compiled_b{batch}'] = {'peak_gib': peak / GIB, 'temp_gib': mem.temp_size_in_bytes / GIB,
                                 'compile_s': time.perf_counter() - t0}
    return time.perf_counter() - t0

  compile_s = compile_at(b0)
  while not args.batch and largest_fitting(points, limit) is not None and len(points) < 3:
    b = next_batch(points, limit, 4 * params, max_batch)
    if b in compiled or _left(args) < 2 * compile_s + 30:
      break
    compile_at(b)
  best = largest_fitting(points, limit)
  if best is None:
    raise RuntimeError(f'microbatch {b0} needs {points[0][1] / GIB:.1f} GiB > 95% of the '
                       f'{limit / GIB:.1f} GiB limit')
  rec['batch'] = best
  rec['compiled_gib'] = dict((b, p) for b, p, _ in points)[best] / GIB
  state, data = exp.init_state(), _batch(exp, best)
  timing = common.time_interleaved(
      {'step': common.stateful(compiled[best], state, data, *targs)},
      max(3, args.repeats // 2), warmup=2)['step']
  rec['step_s'] = timing['median_s']
  rec['img_s'] = best / timing['median_s']
  stats = jax.devices()[0].memory_stats() or {}
  rec['peak_gib'] = stats['peak_bytes_in_use'] / GIB if 'peak_bytes_in_use' in stats else None
  del state
  flops = model_flops(args, 'scd', best)
  rec['model_tflop_per_step'] = (flops or 0) / 1e12
  rec['mfu'] = common.mfu(flops, timing['median_s'], common.peak_flops('bf16'))


def _random_params(exp):
  x = jnp.zeros((1,) + exp.data_shape)
  labels = jnp.zeros((1,), jnp.int32) if exp.num_classes else None
  return jax.jit(lambda k: exp.model.init(k, x, jnp.ones((1,)), labels)['params'])(
      jax.random.key(0))


def sampling(rec, args):
  n_big = 4 if args.smoke else 64
  exp = _experiment(_config(args, 'sct', n_big))
  params = _random_params(exp)
  key = jax.random.key(0)
  labels = lambda n: (jnp.arange(n) % exp.num_classes) if exp.num_classes else None
  # Model FLOPs first (seconds): the img/s that the bf16 peak allows bounds the target.
  per_image = 2 * (model_flops(args, 'sct', n_big, program='forward') or 0)
  rec['gflop_per_image_2step'] = per_image / 1e9
  peak = common.peak_flops('bf16')
  rec['img_s_at_bf16_peak'] = peak / per_image if peak and per_image else None
  variants = [('f32_params', params)]    # as Experiment.sample runs it
  if not args.smoke:                       # inference weights cast once
    variants.append(('bf16_params', jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)))
  for name, p in variants:
    for kind, n in (('throughput', n_big), ('latency', 1)):
      if _left(args) < 20:
        return
      run = exp._sampler(n, 'consistency', 2, 1.0, 'heun')  # pylint: disable=protected-access
      t0 = time.perf_counter()
      jax.block_until_ready(run(p, key, labels(n)))
      compile_s = time.perf_counter() - t0
      t = common.time_fn(run, p, key, labels(n), repeats=args.repeats, warmup=2)['median_s']
      rec[f'{kind}_{name}'] = {'batch': n, 'ms': 1e3 * t, 'img_s': n / t,
                               'first_call_s': compile_s}
  t = rec.data.get('throughput_f32_params', {}).get('ms')
  rec['mfu_throughput'] = (common.mfu(rec.data['gflop_per_image_2step'] * 1e9 * n_big,
                                      t / 1e3, common.peak_flops('bf16')) if t else None)


def export(rec, args):
  """benchmarks.export_latency on the recipe's model with random weights: the exported
  1- and 2-step generators (jax.export, platform of this device) vs in-process
  Experiment.sample vs Heun-18 on the same network (the teacher's architecture)."""
  from benchmarks import export_latency
  n_big = 4 if args.smoke else 64
  exp = _experiment(_config(args, 'sct', n_big))
  params = _random_params(exp)
  rows = export_latency.measure((exp, params), (exp, params), n_big,
                                max(2, args.repeats // 2), ode_steps=2 if args.smoke else 18)
  for r in rows:
    rec[r['program']] = {k: v for k, v in r.items() if k not in ('latency', 'throughput')}


SECTIONS = {'env': env, 'attention': attention, 'ratio': ratio, 'train': train,
            'sampling': sampling, 'export': export}
