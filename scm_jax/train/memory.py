"""Per-device memory of a training run, found without allocating it (`python -m scm_jax.plan`).

Two sources of numbers:

- compiled: `jax.jit(train_step).lower(<ShapeDtypeStructs>).compile().memory_analysis()`
  of the real sharded step, when this process has the run's devices. GPU and TPU report
  the program's peak as they will run it; the CPU backend's estimate ignores
  rematerialization (its temporaries do not shrink with `model.remat`).
- analytic, for any backend and device count. The stated model:

    peak = params + optimizer + EMAs + teacher + gradients (x2 with k > 1 microbatches:
           the float32 accumulator) + FSDP gathers + activations(policy, m)
    activations(policy, m) = residuals(policy, m) + working(m)

  residuals: the arrays the backward pass keeps from the forward pass, exactly as JAX
  decides them: the residual outputs of `jax.vjp` of the loss with respect to the
  parameters, traced abstractly (`jax.make_jaxpr` on ShapeDtypeStructs) with the
  model's remat policy, so they follow `jax.checkpoint` and its policies. They are
  linear in the per-device microbatch m: traces at m = 1 and 2 give bytes per example
  and fixed bytes (weight-derived residuals such as bfloat16 copies of weights, counted
  whole: an upper bound under FSDP). working: the largest block's residuals without
  remat, at m: what the backward pass rematerializes and holds for one block at a time
  (0 for policy 'none', which keeps everything already). FSDP gathers: two top-level blocks'
  float32 weights (the one in use and the one prefetched). State parts are divided by
  their sharding (the config's rules on the mesh).
"""

import dataclasses
import math
from typing import Optional

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections

from scm_jax import data as data_lib
from scm_jax import models as models_lib
from scm_jax.core import losses
from scm_jax.core import teachers
from scm_jax.infra import sharding as sharding_lib
from scm_jax.models import layers
from scm_jax.train import state as state_lib
from scm_jax.train import step as step_lib

GIB = 2**30
POLICIES = tuple(layers.REMAT_POLICIES)
# Remat policies from the least to the most recomputation in the backward pass.
RECOMPUTE_ORDER = ('none', 'dots', 'dots_no_batch', 'full')


def data_shape_of(config: ml_collections.ConfigDict) -> tuple:
  """Per-example data shape: data.expected_shape if set, else from the data source."""
  if config.data.get('expected_shape'):
    return tuple(config.data.expected_shape)
  return tuple(data_lib.build_source(config.data, config.data.split).shape)


def plan_mesh(mesh_config, num_devices: int) -> jax.sharding.AbstractMesh:
  """The run's ('data', 'fsdp', 'tensor') mesh on `num_devices`, without devices."""
  return jax.sharding.AbstractMesh(sharding_lib.mesh_shape(mesh_config, num_devices),
                                   sharding_lib.MESH_AXES)


def _nbytes(leaf) -> int:
  return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def sharded_bytes(tree, mesh, sharding_config) -> int:
  """Bytes per device of a (possibly abstract) pytree placed by the config's rules."""
  def one(path, leaf):
    spec = sharding_lib.leaf_spec(sharding_lib.path_str(path), leaf.shape, mesh,
                                  sharding_config)
    shards = math.prod(mesh.shape[a] for axes in spec if axes is not None
                       for a in ((axes,) if isinstance(axes, str) else axes))
    return _nbytes(leaf) // shards
  return sum(jax.tree.leaves(jax.tree_util.tree_map_with_path(one, tree)))


def abstract_train_state(config, model, data_shape):
  """The TrainState's shapes and dtypes (jax.eval_shape: nothing is allocated)."""
  tx = state_lib.make_optimizer(config)
  return jax.eval_shape(
      lambda k: state_lib.create_train_state(config, model, data_shape, k, tx),
      jax.random.PRNGKey(0))


def state_parts(config, abstract_state, mesh) -> dict:
  """Bytes per device of params, optimizer, EMAs, teacher (sCD: the student's
  architecture, float32, placed like the parameters), gradients and FSDP gathers."""
  sc = config.sharding
  params = sharded_bytes(abstract_state.params, mesh, sc)
  grads = params * (2 if config.train.get('microbatches', 1) > 1 else 1)
  gathers = 0
  if mesh.shape['fsdp'] > 1:
    blocks = [sum(_nbytes(l) for l in jax.tree.leaves(v)) for v in abstract_state.params.values()]
    gathers = 2 * max(blocks)
  return {
      'params': params,
      'optimizer': sharded_bytes(abstract_state.opt_state, mesh, sc),
      'EMAs': sharded_bytes(abstract_state.ema, mesh, sc),
      'teacher': params if config.loss.kind == 'scd' else 0,
      'gradients': grads,
      'FSDP gathers': gathers,
  }


# ------------------------------------------------------------------ residuals

def _abstract_inputs(model, data_shape, m: int):
  batch = {'x': jax.ShapeDtypeStruct((m,) + tuple(data_shape), jnp.float32)}
  if getattr(model, 'num_classes', 0):
    batch['label'] = jax.ShapeDtypeStruct((m,), jnp.int32)
  return batch, jax.ShapeDtypeStruct((m, 2), jnp.uint32)


def _block_of(eqn, model_name: str) -> str:
  """The top-level module an equation belongs to, from its name stack
  ('jvp(jvp(DiT))/block3/attn' -> 'block3'); '(loss)' outside the model."""
  parts = str(eqn.source_info.name_stack).split('/')
  if len(parts) > 1 and model_name in parts[0]:
    return parts[1].split('.', 1)[-1] if parts[1].startswith(model_name + '.') else parts[1]
  return '(model)' if model_name in parts[0] else '(loss)'


def residual_bytes(config, model, data_shape, m: int) -> dict:
  """{block: bytes} the backward pass keeps from the forward pass of the loss, for a
  microbatch of m examples (parameters themselves excluded: they are counted apart).

  Traced abstractly with jax.vjp w.r.t. the parameters, so `model.remat` applies.
  """
  sd = config.trigflow.sigma_d
  apply_fn = step_lib.model_apply_fn(model)
  params = jax.eval_shape(lambda k: state_lib.init_params(model, data_shape, k),
                          jax.random.PRNGKey(0))
  batch, keys = _abstract_inputs(model, data_shape, m)

  def forward(params, teacher_params, batch, keys, step):
    dxdt = None
    if config.loss.kind == 'scd':
      F_apply = teachers.from_flax_model(model, config.teacher.get('guidance', 1.0))
      dxdt = teachers.make_dxdt_fn(F_apply, teacher_params, sd)
    loss_fn = losses.make_loss_fn(config.loss, apply_fn, sd, dxdt)
    return jax.vjp(lambda p: loss_fn(p, batch, keys, step)[0], params)

  step = jax.ShapeDtypeStruct((), jnp.int32)
  closed, out = jax.make_jaxpr(forward, return_shape=True)(params, params, batch, keys, step)
  jaxpr = closed.jaxpr
  residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(out[1])):]
  weights = set(jaxpr.invars[:2 * len(jax.tree.leaves(params))])
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}
  name = type(model).__name__
  out_bytes, seen = {}, set()
  for v in residuals:
    if isinstance(v, jax.extend.core.Literal) or v in seen or v in weights:
      continue
    seen.add(v)
    block = _block_of(producer[v], name) if v in producer else '(inputs)'
    out_bytes[block] = out_bytes.get(block, 0) + _nbytes(v.aval)
  return out_bytes


@dataclasses.dataclass
class Activations:
  """Activation memory of one remat policy, linear in the per-device microbatch m."""
  policy: str
  per_example: int             # residual bytes per example
  fixed: int                   # residual bytes independent of m (weight-derived)
  blocks: dict                 # block -> residual bytes per example
  working_per_example: int = 0  # the largest block's residuals without remat
  working_fixed: int = 0

  def bytes(self, m: int) -> int:
    return (self.fixed + self.working_fixed
            + m * (self.per_example + self.working_per_example))


def activation_profile(config, model, data_shape, policy: str) -> Activations:
  """Residual bytes of `policy` per example and fixed, from traces at m = 1 and 2."""
  c = config.copy_and_resolve_references()
  if 'remat' in c.model:
    c.model.remat = policy
  policy_model = models_lib.build_model(c.model)
  one, two = (residual_bytes(c, policy_model, data_shape, m) for m in (1, 2))
  blocks = {b: two.get(b, 0) - one.get(b, 0) for b in two}
  per_example = sum(blocks.values())
  return Activations(policy, per_example, sum(one.values()) - per_example, blocks)


def activation_table(config, model, data_shape, policies=POLICIES) -> dict:
  """{policy: Activations} with the working set (largest block without remat) filled in."""
  if 'remat' not in config.model:
    policies = ('none',)
  table = {p: activation_profile(config, model, data_shape, p) for p in policies}
  none = table.get('none') or activation_profile(config, model, data_shape, 'none')
  model_blocks = {b: v for b, v in none.blocks.items() if not b.startswith('(')}
  largest = max(model_blocks.values(), default=0)
  for act in table.values():
    act.working_per_example = largest if act.policy != 'none' else 0
  return table


# ------------------------------------------------------------------ compiled

def compiled_bytes(compiled) -> Optional[dict]:
  """{'peak', 'argument', 'output', 'temp', 'alias'} bytes per device of a compiled
  program (peak = arguments + outputs + temporaries - donated), or None."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  out = {'argument': int(mem.argument_size_in_bytes), 'output': int(mem.output_size_in_bytes),
         'temp': int(mem.temp_size_in_bytes), 'alias': int(mem.alias_size_in_bytes)}
  out['peak'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def compiled_step_memory(config, model, data_shape, devices) -> Optional[dict]:
  """memory_analysis of the real jitted, sharded train step on `devices` (abstract
  arguments: nothing is allocated), at config.train.batch_size / microbatches."""
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  tx = state_lib.make_optimizer(config)
  abstract = abstract_train_state(config, model, data_shape)
  shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  batch, _ = _abstract_inputs(model, data_shape, config.train.batch_size)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in batch.items()}
  args, teacher_shardings = (state, batch), None
  if config.loss.kind == 'scd':
    F_apply = teachers.from_flax_model(model, config.teacher.get('guidance', 1.0))
    teacher = teachers.make_dxdt_fn(F_apply, abstract.params, config.trigflow.sigma_d)
    teacher_shardings = sharding_lib.tree_shardings(teacher, mesh, config.sharding)
    args += (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          teacher, teacher_shardings),)
  train_step = step_lib.make_train_step(config, model, tx)
  jitted = step_lib.jit_train_step(train_step, shardings, mesh, teacher_shardings)
  return compiled_bytes(jitted.lower(*args).compile())


# ------------------------------------------------------------------ the plan

@dataclasses.dataclass
class PolicyPlan:
  activations: Activations
  max_microbatch: int          # largest per-device microbatch that fits (0: none)
  microbatches: int            # smallest k that fits the per-device batch (0: none)
  peak: int                    # analytic peak bytes at that k (or at k = per-device batch)


@dataclasses.dataclass
class Plan:
  num_devices: int
  device_bytes: int            # usable bytes per device
  per_device_batch: int
  state: dict                  # part -> bytes per device (gradients at k = 1)
  policies: dict               # policy -> PolicyPlan
  num_params: int = 0          # trainable parameters of the model (the network, not EMAs)
  compiled: Optional[dict] = None


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_plan(config, num_devices: int, device_gib: float, usable: float = 0.9,
              data_shape=None, policies=POLICIES, table: Optional[dict] = None) -> Plan:
  """Per-device memory and the fitting microbatches of `config` on `num_devices`
  devices of `device_gib` GiB, of which the fraction `usable` is for XLA's buffers.
  `table`: an `activation_table` of this config to reuse (it does not depend on devices)."""
  data_shape = tuple(data_shape or data_shape_of(config))
  model = models_lib.build_model(config.model)
  mesh = plan_mesh(config.mesh, num_devices)
  per_device = config.train.batch_size // step_lib.batch_shards(mesh)
  c1 = config.copy_and_resolve_references()
  c1.train.microbatches = 1
  abstract = abstract_train_state(config, model, data_shape)
  state = state_parts(c1, abstract, mesh)
  num_params = sum(math.prod(l.shape) for l in jax.tree.leaves(abstract.params))
  budget = int(device_gib * GIB * usable)
  fixed = lambda k: sum(state.values()) + (state['params'] if k > 1 else 0)  # + accumulator
  plans = {}
  table = table or activation_table(config, model, data_shape, policies)
  for policy, act in table.items():
    fits = [k for k in _divisors(per_device)
            if fixed(k) + act.bytes(per_device // k) <= budget]
    k = fits[0] if fits else 0
    slope = act.per_example + act.working_per_example
    max_m = max((budget - fixed(2) - act.bytes(0)) // slope, 0) if slope else per_device
    peak = fixed(k or per_device) + act.bytes(per_device // (k or per_device))
    plans[policy] = PolicyPlan(act, int(max_m), k, peak)
  return Plan(num_devices, budget, per_device, state, plans, num_params)


def _gib(b) -> str:
  return f'{b / GIB:.2f}'


def format_plan(plan: Plan, config) -> str:
  """The plan as Markdown tables (GiB per device) and the overrides that fit."""
  c = config
  lines = [f'model.name={c.model.name!r}: {plan.num_params / 1e6:.1f}M parameters', '',
           f'{plan.num_devices} devices, {_gib(plan.device_bytes)} GiB usable each; '
           f'global batch {c.train.batch_size} = {plan.per_device_batch} per device; '
           f'sharding.strategy={c.sharding.strategy!r}, mesh {dict(c.mesh)}', '',
           '| state (per device) | GiB |', '|---|---|']
  lines += [f'| {k} | {_gib(v)} |' for k, v in plan.state.items()]
  lines += [f'| total | {_gib(sum(plan.state.values()))} |', '',
            '| remat | residuals MiB/example | largest block MiB/example | fixed GiB '
            '| max microbatch | train.microbatches | peak GiB |', '|---|---|---|---|---|---|---|']
  for policy, p in plan.policies.items():
    a = p.activations
    block = max((v for b, v in a.blocks.items() if not b.startswith('(')), default=0)
    k = str(p.microbatches) if p.microbatches else 'does not fit'
    lines.append(f'| {policy} | {a.per_example / 2**20:.1f} | {block / 2**20:.1f} | '
                 f'{_gib(a.fixed + a.working_fixed)} | {p.max_microbatch} | {k} | {_gib(p.peak)} |')
  lines += ['', 'Per block, residual MiB per example (equal consecutive blocks merged):', '',
            '| block | ' + ' | '.join(plan.policies) + ' |', '|---|' + '---|' * len(plan.policies)]
  names = list(next(iter(plan.policies.values())).activations.blocks)
  rows = [(b, tuple(p.activations.blocks.get(b, 0) for p in plan.policies.values()))
          for b in names]
  i = 0
  while i < len(rows):
    j = i
    while j + 1 < len(rows) and rows[j + 1][1] == rows[i][1]:
      j += 1
    label = rows[i][0] if i == j else f'{rows[i][0]} .. {rows[j][0]} (x{j - i + 1})'
    lines.append(f'| {label} | ' + ' | '.join(f'{v / 2**20:.2f}' for v in rows[i][1]) + ' |')
    i = j + 1
  if plan.compiled:
    cm = plan.compiled
    lines += ['', f'compiled ({jax.default_backend()}, model.remat={c.model.get("remat")!r}, '
              f'train.microbatches={c.train.get("microbatches", 1)}): peak {_gib(cm["peak"])} GiB '
              f'(arguments {_gib(cm["argument"])}, temporaries {_gib(cm["temp"])})']
  return '\n'.join(lines)


def suggestion(plan: Plan, config, min_microbatch: int = 32) -> str:
  """The overrides that fit: the least recomputation whose per-device microbatch is at
  least `min_microbatch` (or the whole per-device batch), else the largest microbatch."""
  fitting = {p: q for p, q in plan.policies.items() if q.microbatches}
  if not fitting:
    return ('Does not fit with any remat policy even at microbatch 1: use more devices, '
            'FSDP over all of them (sharding.strategy=fsdp, mesh.fsdp=-1) or a smaller model.')
  micro = lambda p: plan.per_device_batch // fitting[p].microbatches
  wanted = min(min_microbatch, plan.per_device_batch)
  good = [p for p in RECOMPUTE_ORDER if p in fitting and micro(p) >= wanted]
  best = good[0] if good else max(fitting, key=micro)
  q = fitting[best]
  flags_ = [f'--config.train.microbatches={q.microbatches}']
  if 'remat' in config.model:
    flags_.append(f'--config.model.remat={best}')
  return (f'Fits: {" ".join(flags_)}  (per-device microbatch {micro(best)}, '
          f'peak {_gib(q.peak)} of {_gib(plan.device_bytes)} GiB)')
