"""Memory planner (`scm_jax.train.memory`, `python -m scm_jax.plan`).

The analytic model is checked against XLA's `memory_analysis` of the real compiled train
step on CPU. The CPU backend does not reflect rematerialization, so the comparisons use
`model.remat='none'` (or a model without remat); the remat policies are checked by their
order. Stated tolerance: the analytic peak and its per-example slope within 15% of the
compiled ones (measured: MLP 3-7%, digits U-Net 3-9%); the state's per-device bytes
under FSDP equal the compiled step's arguments exactly.
"""

import jax
import numpy as np
import pytest

from scm_jax import models as models_lib
from scm_jax.train import memory
from tests import helpers

TOLERANCE = 0.15


def assert_analytic_matches_compiled(config, data_shape, batches=(512, 2048)):
  """Analytic peak (state + activations) vs compiled peak at two per-device batches,
  and the analytic bytes per example vs the compiled temporaries' growth per example."""
  model = models_lib.build_model(config.model)
  act = memory.activation_profile(config, model, data_shape, 'none')
  abstract = memory.abstract_train_state(config, model, data_shape)
  state = memory.state_parts(config, abstract, memory.plan_mesh(config.mesh, 1))
  compiled = {}
  for m in batches:
    config.train.batch_size = m
    compiled[m] = memory.compiled_step_memory(config, model, data_shape, jax.devices()[:1])
    analytic = sum(state.values()) + act.bytes(m)
    np.testing.assert_allclose(analytic, compiled[m]['peak'], rtol=TOLERANCE,
                               err_msg=f'peak at microbatch {m}')
  lo, hi = batches
  slope = (compiled[hi]['temp'] - compiled[lo]['temp']) / (hi - lo)
  np.testing.assert_allclose(act.per_example, slope, rtol=TOLERANCE,
                             err_msg='bytes per example')


def test_analytic_peak_matches_compiled_step_on_cpu_mlp():
  """sCT on an MLP with dropout: the planner's peak and bytes per example vs XLA's."""
  c = helpers.toy_config(**{'model.width': 256, 'model.depth': 3, 'model.dropout': 0.1})
  assert_analytic_matches_compiled(c, (2,))


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['sct', 'scd'])
def test_analytic_peak_matches_compiled_step_on_cpu_unet(kind):
  """The digits U-Net (channels 16, attention, remat 'none'): sCT and sCD (teacher)."""
  from configs import digits_sct
  c = digits_sct.get_config()
  c.model.channels = 16
  c.model.remat = 'none'
  c.loss.kind = kind
  assert_analytic_matches_compiled(c, (8, 8, 1), batches=(32, 128))


def test_state_bytes_equal_compiled_arguments_on_8_devices_with_fsdp():
  """FSDP over 8 devices: the planner's per-device state bytes (placed by the config's
  sharding rules) plus the per-device batch are the compiled step's argument bytes;
  and the sharded params are smaller than the whole (the rules did shard them)."""
  helpers.run_python('''
      import math, jax, numpy as np
      from scm_jax import models as models_lib
      from scm_jax.train import memory
      from tests import helpers
      c = helpers.toy_config(**{'model.width': 256, 'model.depth': 3,
                                'sharding.strategy': 'fsdp', 'sharding.fsdp_min_size': 64,
                                'train.batch_size': 64})
      c.mesh.data, c.mesh.fsdp = 1, -1
      model = models_lib.build_model(c.model)
      abstract = memory.abstract_train_state(c, model, (2,))
      mesh = memory.plan_mesh(c.mesh, 8)
      state = memory.sharded_bytes(abstract, mesh, c.sharding)
      batch = 64 // 8 * 2 * 4
      compiled = memory.compiled_step_memory(c, model, (2,), jax.devices())
      assert compiled['argument'] == state + batch, (compiled, state, batch)
      parts = memory.state_parts(c, abstract, mesh)
      whole = sum(math.prod(l.shape) * 4 for l in jax.tree.leaves(abstract.params))
      assert parts['params'] < whole / 4, (parts, whole)
      assert parts['FSDP gathers'] > 0
  ''', devices=8)


def test_plan_orders_remat_policies_and_finds_the_smallest_microbatch_count():
  """Tiny U-Net: more recomputation keeps fewer bytes per example; the chosen
  train.microbatches k is the smallest divisor of the per-device batch whose analytic
  peak fits the budget (and the next smaller one does not)."""
  from configs import digits_sct
  c = digits_sct.get_config()
  c.model.update(channels=8, channel_mult=(1, 2), remat='none')
  c.train.batch_size = 256
  shape = (8, 8, 1)
  plan = memory.make_plan(c, 1, 1.0, data_shape=shape)
  per_example = {p: q.activations.per_example for p, q in plan.policies.items()}
  assert per_example['full'] < per_example['dots_no_batch'] <= per_example['dots'] \
      < per_example['none'], per_example
  act = plan.policies['none'].activations
  # A budget that holds about 40 examples of activations: k must be 8 (microbatch 32).
  state = sum(plan.state.values()) + plan.state['params']
  gib = (state + act.bytes(40)) / 0.9 / memory.GIB
  tight = memory.make_plan(c, 1, gib, data_shape=shape, policies=('none',)).policies['none']
  assert tight.microbatches == 8, tight
  assert tight.peak <= gib * 0.9 * memory.GIB
  assert 32 <= tight.max_microbatch < 64, tight
  text = memory.format_plan(plan, c) + memory.suggestion(plan, c)
  assert '| none |' in text and '--config.train.microbatches=1' in text, text


def test_plan_cli_says_when_nothing_fits():
  """The CLI on the toy MLP: the tables, and 'Does not fit' for a tiny device."""
  out = helpers.run_module('scm_jax.plan', '--config=configs/toy2d_sct.py', '--devices=8',
                           '--device_memory=1e-6', '--config.model.width=32').stdout
  assert '| params |' in out and '| none |' in out, out
  assert 'Does not fit' in out, out
