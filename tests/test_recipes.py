"""Every paper recipe against the numbers of Lu & Song 2024 (arXiv 2410.11081), re-typed.

One table: each row cites the paper's table and row, the recipes it applies to, the
config field and its value per size (or one value for all). The recipes keep their
numbers in configs/paper.py; this file does not import them, so a typo on either side
fails here.
"""

import importlib
import math

import pytest

from configs import paper
from scm_jax.config import validate_config
from scm_jax.core import sampling

IN64 = ('s', 'm', 'l', 'xl')
IN512 = ('s', 'm', 'l', 'xl', 'xxl')
SIZES = {'cifar10': ('',), 'imagenet64': IN64, 'imagenet512': IN512}
CHANNELS = {'s': 192, 'm': 256, 'l': 320, 'xl': 384, 'xxl': 448}
CMS = ('sct', 'scd')
ALL = ('teacher', 'sct', 'scd')

# (source, data, stages, field, value: one for every size or {size: value})
TABLE = [
    # ----------------------------------------------------------------- CIFAR-10
    ('G.1 CIFAR-10 teacher: batch 512', 'cifar10', ALL, 'train.batch_size', 512),
    ('G.1 CIFAR-10 teacher: 400k iterations', 'cifar10', ('teacher',), 'train.num_steps',
     400_000),
    ('G.1 CIFAR-10 teacher: Adam lr 1e-3', 'cifar10', ('teacher',), 'optim.name', 'adam'),
    ('G.1 CIFAR-10 teacher: Adam lr 1e-3', 'cifar10', ('teacher',), 'optim.lr', 1e-3),
    ('G.1 CIFAR-10 teacher: beta 0.9/0.999', 'cifar10', ('teacher',), 'optim.b2', 0.999),
    ('G.1 CIFAR-10 teacher: eps 1e-8', 'cifar10', ALL, 'optim.eps', 1e-8),
    ('G.1 CIFAR-10 teacher: dropout 0.13', 'cifar10', ('teacher',), 'model.dropout', 0.13),
    ('G.1 CIFAR-10 teacher: EDM P_mean', 'cifar10', ('teacher',), 'loss.p_mean', -1.2),
    ('G.1 CIFAR-10 teacher: EDM P_std', 'cifar10', ('teacher',), 'loss.p_std', 1.2),
    ('G.1 CIFAR-10 teacher: Heun NFE 35', 'cifar10', ('teacher',), 'sample.ode_steps', 18),
    ('G.1 CIFAR-10: positional time embedding', 'cifar10', ALL, 'model.time_embed_kind',
     'positional'),
    ('G.1 CIFAR-10: adaptive double normalization', 'cifar10', ALL, 'model.norm_mode',
     'double'),
    ('G.2 CIFAR-10 CMs: RAdam', 'cifar10', CMS, 'optim.name', 'radam'),
    ('G.2 CIFAR-10 CMs: lr 1e-4', 'cifar10', CMS, 'optim.lr', 1e-4),
    ('G.2 CIFAR-10 CMs: beta 0.9/0.99', 'cifar10', CMS, 'optim.b1', 0.9),
    ('G.2 CIFAR-10 CMs: beta 0.9/0.99', 'cifar10', CMS, 'optim.b2', 0.99),
    ('G.2 CIFAR-10 CMs: no schedule', 'cifar10', CMS, 'optim.schedule', 'constant'),
    ('G.2 CIFAR-10 sCT: dropout 0.20', 'cifar10', ('sct',), 'model.dropout', 0.20),
    ('G.2 CIFAR-10 sCD: dropout 0', 'cifar10', ('scd',), 'model.dropout', 0.0),
    ('G.2 CIFAR-10 CMs: P_mean -1.0', 'cifar10', CMS, 'loss.p_mean', -1.0),
    ('G.2 CIFAR-10 CMs: P_std 1.4', 'cifar10', CMS, 'loss.p_std', 1.4),
    # -------------------------------------------------------- ImageNet 64x64
    ('Table 4: channels', 'imagenet64', ALL, 'model.channels', CHANNELS),
    ('Table 4: batch 2048', 'imagenet64', ALL, 'train.batch_size', 2048),
    ('Table 4: lr decay t_ref 35000', 'imagenet64', ALL, 'optim.decay_steps', 35_000),
    ('Table 4: Adam beta 0.9/0.99', 'imagenet64', ALL, 'optim.b1', 0.9),
    ('Table 4: Adam beta 0.9/0.99', 'imagenet64', ALL, 'optim.b2', 0.99),
    ('Table 4 caption: Adam eps 1e-11', 'imagenet64', ALL, 'optim.eps', 1e-11),
    ('Table 4: teacher iterations', 'imagenet64', ('teacher',), 'train.num_steps',
     {'s': 1048_000, 'm': 1486_000, 'l': 761_000, 'xl': 540_000}),
    ('Table 4: teacher lr max', 'imagenet64', ('teacher',), 'optim.lr',
     {'s': 1.0e-2, 'm': 9.0e-3, 'l': 8.0e-3, 'xl': 7.0e-3}),
    ('Table 4: teacher dropout', 'imagenet64', ('teacher',), 'model.dropout',
     {'s': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1}),
    ('Table 4: teacher P_mean', 'imagenet64', ('teacher',), 'loss.p_mean', -0.8),
    ('Table 4: teacher P_std', 'imagenet64', ('teacher',), 'loss.p_std', 1.6),
    ('Table 4: CM lr max', 'imagenet64', CMS, 'optim.lr',
     {'s': 1.0e-4, 'm': 9.0e-5, 'l': 8.0e-5, 'xl': 7.0e-5}),
    ('Table 4: CM P_mean', 'imagenet64', CMS, 'loss.p_mean', -1.0),
    ('Table 4: CM P_std', 'imagenet64', CMS, 'loss.p_std', 1.6),
    ('Table 4: teacher EMA sigma_rel used by the CM', 'imagenet64', CMS, 'teacher.ema',
     {'s': 'pema_0.075', 'm': 'pema_0.06', 'l': 'pema_0.04', 'xl': 'pema_0.04'}),
    ('Table 4: teacher EMA sigma_rel used by the CM', 'imagenet64', ('teacher',),
     'ema.sigma_rels', {'s': (0.075,), 'm': (0.06,), 'l': (0.04,), 'xl': (0.04,)}),
    ('Table 4: sCT iterations 400k', 'imagenet64', ('sct',), 'train.num_steps', 400_000),
    ('Table 4: sCT dropout 45% at res <= 16', 'imagenet64', ('sct',), 'model.dropout', 0.45),
    ('Table 4: sCD iterations 400k', 'imagenet64', ('scd',), 'train.num_steps', 400_000),
    ('Table 4: sCD dropout 0%', 'imagenet64', ('scd',), 'model.dropout', 0.0),
    ('Table 4: CM dropout at res <= 16', 'imagenet64', CMS,
     'model.dropout_max_resolution', 16),
    ('G.1: ImageNet 64 teacher NFE 63 (Heun 32 steps)', 'imagenet64', ('teacher',),
     'sample.ode_steps', 32),
    # --------------------------------------------- ImageNet 512x512 (latents)
    ('Table 5: channels', 'imagenet512', ALL, 'model.channels', CHANNELS),
    ('Table 5: batch 2048', 'imagenet512', ALL, 'train.batch_size', 2048),
    ('Table 5: t_ref 70000', 'imagenet512', ALL, 'optim.decay_steps', 70_000),
    ('Table 5: Adam beta 0.9/0.99', 'imagenet512', ALL, 'optim.b2', 0.99),
    ('Table 5: Adam eps 1e-11', 'imagenet512', ALL, 'optim.eps', 1e-11),
    ('Table 5: teacher iterations', 'imagenet512', ('teacher',), 'train.num_steps',
     {'s': 1048_000, 'm': 1048_000, 'l': 696_000, 'xl': 598_000, 'xxl': 376_000}),
    ('Table 5: teacher lr max', 'imagenet512', ('teacher',), 'optim.lr',
     {'s': 1.0e-2, 'm': 9.0e-3, 'l': 8.0e-3, 'xl': 7.0e-3, 'xxl': 6.5e-3}),
    ('Table 5: teacher dropout', 'imagenet512', ('teacher',), 'model.dropout',
     {'s': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1, 'xxl': 0.1}),
    ('Table 5: teacher P_mean', 'imagenet512', ('teacher',), 'loss.p_mean', -0.4),
    ('Table 5: teacher P_std', 'imagenet512', ('teacher',), 'loss.p_std', 1.0),
    ('Table 5: teacher label dropout (CFG)', 'imagenet512', ('teacher',),
     'loss.label_dropout', 0.1),
    ('Table 5: CM lr max', 'imagenet512', CMS, 'optim.lr',
     {'s': 1.0e-4, 'm': 9.0e-5, 'l': 8.0e-5, 'xl': 7.0e-5, 'xxl': 6.5e-5}),
    ('Table 5: CM P_mean', 'imagenet512', CMS, 'loss.p_mean', -0.8),
    ('Table 5: CM P_std', 'imagenet512', CMS, 'loss.p_std', 1.6),
    ('Table 5: teacher EMA sigma_rel used by the CM', 'imagenet512', CMS, 'teacher.ema',
     {'s': 'pema_0.025', 'm': 'pema_0.03', 'l': 'pema_0.015', 'xl': 'pema_0.02',
      'xxl': 'pema_0.015'}),
    ('Table 5: sCT iterations 100k', 'imagenet512', ('sct',), 'train.num_steps', 100_000),
    ('Table 5: sCT dropout at res <= 16', 'imagenet512', ('sct',), 'model.dropout',
     {'s': 0.25, 'm': 0.35, 'l': 0.35, 'xl': 0.35, 'xxl': 0.35}),
    ('Table 5: sCD iterations 200k', 'imagenet512', ('scd',), 'train.num_steps', 200_000),
    ('Table 5: sCD dropout at res <= 16', 'imagenet512', ('scd',), 'model.dropout',
     {'s': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1, 'xxl': 0.1}),
    ('Table 5: CM dropout at res <= 16', 'imagenet512', CMS,
     'model.dropout_max_resolution', 16),
    ('Table 5: sCD max CFG scale 2.0 (student input s ~ U[1, 2])', 'imagenet512', ('scd',),
     'teacher.guidance_max', 2.0),
    ('G.2: guidance-conditioned student', 'imagenet512', ('scd',), 'model.guidance_embed',
     True),
    ('Table 6: teacher guidance for FID', 'imagenet512', ('teacher',), 'sample.guidance',
     {'s': (1.4,), 'm': (1.2,), 'l': (1.2,), 'xl': (1.2,), 'xxl': (1.2,)}),
    ('Table 6: teacher NFE 126 = Heun 32 steps x 2 (guidance)', 'imagenet512',
     ('teacher',), 'sample.ode_steps', 32),
    ('Table 6: sCD guidance for FID, 1-step / 2-step', 'imagenet512', ('scd',),
     'sample.guidance', {'s': (1.5, 1.4), 'm': (1.3, 1.2), 'l': (1.3, 1.2),
                         'xl': (1.3, 1.2), 'xxl': (1.3, 1.2)}),
    ('Table 6: ... for 1-step and 2-step samples', 'imagenet512', ('scd',), 'sample.steps',
     (1, 2)),
    ('G.2: latents: subtract mu per channel', 'imagenet512', ALL, 'vae.shift',
     (1.56, -0.695, 0.483, 0.729)),
    ('G.2: latents: times sigma_d / sigma_c per channel', 'imagenet512', ALL, 'vae.scale',
     tuple(0.5 / s for s in (5.27, 5.91, 4.21, 4.31))),
    # ------------------------------------------------- every consistency model
    ('G.2: tangent normalization c = 0.1', 'imagenet64', CMS, 'loss.tangent_norm_c', 0.1),
    ('G.2: tangent normalization c = 0.1', 'imagenet512', CMS, 'loss.tangent_norm_c', 0.1),
    ('G.2: tangent normalization c = 0.1', 'cifar10', CMS, 'loss.tangent_norm_c', 0.1),
    ('G.2: tangent warmup 10k iterations', 'imagenet64', CMS,
     'loss.tangent_warmup_steps', 10_000),
    ('G.2: tangent warmup 10k iterations', 'imagenet512', CMS,
     'loss.tangent_warmup_steps', 10_000),
    ('G.2: tangent warmup 10k iterations', 'cifar10', CMS, 'loss.tangent_warmup_steps',
     10_000),
    ('Algorithm 1: CMs start from the teacher EMA', 'imagenet64', CMS,
     'teacher.init_student', True),
    ('Algorithm 1: CMs start from the teacher EMA', 'imagenet512', CMS,
     'teacher.init_student', True),
    ('Algorithm 1: CMs start from the teacher EMA', 'cifar10', CMS, 'teacher.init_student',
     True),
    ('G.2: CMs sampled with power EMA sigma_rel 0.05', 'imagenet64', CMS, 'sample.ema',
     'pema_0.05'),
    ('G.2: CMs sampled with power EMA sigma_rel 0.05', 'imagenet512', CMS, 'sample.ema',
     'pema_0.05'),
    ('G.2: 2-step sampling t_mid = 1.1', 'imagenet64', CMS, 'sample.t_mid', 1.1),
    ('G.2: 2-step sampling t_mid = 1.1', 'imagenet512', CMS, 'sample.t_mid', 1.1),
    ('G.2: 2-step sampling t_mid = 1.1', 'cifar10', CMS, 'sample.t_mid', 1.1),
    ('G.2: t_max = arctan(80 / sigma_d)', 'imagenet64', ALL, 'sample.sigma_max', 80.0),
    ('G.2: t_max = arctan(80 / sigma_d)', 'imagenet512', ALL, 'sample.sigma_max', 80.0),
    ('G.2: t_max = arctan(80 / sigma_d)', 'cifar10', ALL, 'sample.sigma_max', 80.0),
]


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return tuple(config) if isinstance(config, (list, tuple)) else config


def _config(data, stage, size):
  return importlib.import_module(f'configs.{data}_{stage}').get_config(size)


@pytest.mark.parametrize('source, data, stages, field, value', TABLE,
                         ids=[f'{r[1]}:{r[3]}:{i}' for i, r in enumerate(TABLE)])
def test_recipe_matches_the_paper(source, data, stages, field, value):
  for stage in stages:
    for size in SIZES[data]:
      want = value[size] if isinstance(value, dict) else value
      got = _get(_config(data, stage, size), field)
      if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9), (source, stage, size, got)
      elif isinstance(want, tuple) and want and isinstance(want[0], float):
        assert got == pytest.approx(want, rel=1e-9), (source, stage, size, got)
      else:
        assert got == want, (source, stage, size, got)


@pytest.mark.parametrize('data', sorted(SIZES))
def test_every_recipe_validates_and_pairs_with_its_teacher(data):
  """Each stage validates; the CMs' networks have the teacher's parameter shapes (only the
  guidance embedding is new), so init_student works; the sCM changes are on."""
  for size in SIZES[data]:
    teacher = _config(data, 'teacher', size)
    for stage in ALL:
      c = _config(data, stage, size)
      validate_config(c)
      assert c.trigflow.sigma_d == 0.5
      fixed = {k: v for k, v in c.model.items()
               if k not in ('dropout', 'dropout_max_resolution', 'guidance_embed')}
      assert fixed == {k: teacher.model[k] for k in fixed}, (data, stage, size)
      if data != 'cifar10':
        assert (c.model.name, c.model.parameterization, c.model.time_embed_kind,
                c.model.norm_mode) == ('edm2', 'trigflow', 'positional', 'double')
        assert c.model.num_classes == 1000 and c.model.time_embed_scale == 1.0
      if stage != 'teacher':
        assert c.teacher.ema.replace('ema_', '').replace('p', '') in (
            [f'{d:g}' for d in teacher.ema.decays] + [f'{s:g}' for s in teacher.ema.sigma_rels])
  with pytest.raises(ValueError, match='unknown size'):
    _config(data if data != 'cifar10' else 'imagenet64', 'sct', 'xxxl')


def test_schedules_and_emas_follow_edm2():
  """Inverse-sqrt decay lr = alpha_ref / sqrt(max(t / t_ref, 1)) (EDM2; t in iterations),
  EDM2's 10 Mimg ramp-up for teachers; EMA half-life 0.5 Mimg at batch 512 (G.2)."""
  from scm_jax.train import state as state_lib
  c = _config('imagenet512', 'sct', 'xxl')
  lr = state_lib.learning_rate_schedule(c, c.train.num_steps)
  for t in (0, 35_000, 70_000, 140_000, 280_000):
    assert float(lr(t)) == pytest.approx(6.5e-5 / math.sqrt(max(t / 70_000, 1)), rel=1e-5)
  tc = _config('imagenet512', 'teacher', 'xxl')
  assert tc.optim.warmup_steps == round(10e6 / 2048)
  c10 = _config('cifar10', 'sct', '')
  decay = c10.ema.decays[0]
  assert decay ** (0.5e6 / 512) == pytest.approx(0.5, rel=1e-5)   # half-life 0.5 Mimg
  assert paper.ema_decay(0.5, 512) == decay
  # 1-step sampling starts at t_max = arctan(80 / 0.5), not pi / 2.
  assert sampling.t_max(0.5, c10.sample.sigma_max) == pytest.approx(math.atan(160))


def test_alternative_backbones_keep_every_paper_setting():
  c, alt = _config('imagenet512', 'scd', 'xxl'), _config('imagenet512', 'scd', 'dit_xxl')
  assert alt.model.name == 'dit' and alt.model.guidance_embed and alt.model.num_classes == 1000
  for section in ('optim', 'loss', 'teacher', 'sample', 'train', 'vae', 'data'):
    assert alt[section].to_dict() == c[section].to_dict(), section


# NVlabs' released EDM2 networks (train_edm2.py presets), re-typed: channels, dropout.
RELEASED = {'imagenet512': {'xs': (128, 0.0), 's': (192, 0.0), 'm': (256, 0.1),
                            'l': (320, 0.1), 'xl': (384, 0.1), 'xxl': (448, 0.1)},
            'imagenet64': {'s': (192, 0.0), 'm': (256, 0.1), 'l': (320, 0.1),
                           'xl': (384, 0.1)}}


@pytest.mark.parametrize('data,size', [
    (d, s) if (d, s) in (('imagenet64', 's'), ('imagenet512', 'xs'))
    else pytest.param(d, s, marks=pytest.mark.slow)
    for d in RELEASED for s in RELEASED[d]])
def test_released_edm2_recipes_start_from_the_imported_network(data, size):
  """configs/<data>_scd.py:edm2_<size>: the student is the released network's plain
  architecture (same parameter shapes as the network the importer builds from NVlabs'
  constructor arguments, plus the guidance input on ImageNet 512), with EDM2's latents."""
  import jax
  import jax.numpy as jnp
  from scm_jax.models import build_model
  from scm_jax.models import edm2_convert
  c = importlib.import_module(f'configs.{data}_scd').get_config(f'edm2_{size}')
  validate_config(c)
  channels, dropout = RELEASED[data][size]
  fields, shape = edm2_convert.network_config(dict(
      img_resolution=64, img_channels=4 if data == 'imagenet512' else 3, label_dim=1000,
      model_channels=channels, dropout=dropout))
  assert shape == ((64, 64, 4) if data == 'imagenet512' else (64, 64, 3))

  def shapes(model):
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape),
                                             jnp.zeros(1), jnp.zeros(1, jnp.int32))['params'])
    return {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  student, teacher = shapes(build_model(c.model)), shapes(build_model(fields))
  extra = {k for k in student if k not in teacher}
  assert all('guidance' in k for k in extra) and bool(extra) == (data == 'imagenet512')
  assert {k: student[k] for k in teacher} == teacher
  assert c.model.channels == channels and c.teacher.ema == '' and c.loss.kind == 'scd'
  if data == 'imagenet512':  # EDM2's encoder: latents = (raw - mean) * 0.5 / std
    assert c.vae.shift == pytest.approx((5.81, 3.25, 0.12, -2.15))
    assert c.vae.scale == pytest.approx(tuple(0.5 / s for s in (4.17, 4.62, 3.71, 3.28)))
