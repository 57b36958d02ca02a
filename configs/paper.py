"""The paper's settings as data, shared by the CIFAR-10 / ImageNet recipes (not a recipe).

Lu & Song 2024 (arXiv 2410.11081): Algorithm 1, App. G.1-G.2, Tables 4-6 and 8. Every
ImageNet network is EDM2 config G (models/edm2.py) with the sCM changes; sizes S..XXL.
Each recipe file is `configs/<data>_<stage>.py` whose get_config(arg) takes the size.
"""

from scm_jax.config import base_config
from scm_jax.models import dit
from scm_jax.models import edm2

# Per-size columns of Table 4 / 8 (ImageNet 64x64).
IN64 = {
    'teacher_iters': {'s': 1048_000, 'm': 1486_000, 'l': 761_000, 'xl': 540_000},
    'teacher_lr': {'s': 1.0e-2, 'm': 9.0e-3, 'l': 8.0e-3, 'xl': 7.0e-3},
    'teacher_dropout': {'s': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1},
    'teacher_sigma_rel': {'s': 0.075, 'm': 0.06, 'l': 0.04, 'xl': 0.04},
    'sct_dropout': {'s': 0.45, 'm': 0.45, 'l': 0.45, 'xl': 0.45},
    'scd_dropout': {'s': 0.0, 'm': 0.0, 'l': 0.0, 'xl': 0.0},
}
# Per-size columns of Tables 5 / 6 (ImageNet 512x512, latent 64x64x4).
IN512 = {
    'teacher_iters': {'s': 1048_000, 'm': 1048_000, 'l': 696_000, 'xl': 598_000,
                      'xxl': 376_000},
    'teacher_lr': {'s': 1.0e-2, 'm': 9.0e-3, 'l': 8.0e-3, 'xl': 7.0e-3, 'xxl': 6.5e-3},
    'teacher_dropout': {'s': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1, 'xxl': 0.1},
    'teacher_sigma_rel': {'s': 0.025, 'm': 0.03, 'l': 0.015, 'xl': 0.02, 'xxl': 0.015},
    'teacher_guidance': {'s': 1.4, 'm': 1.2, 'l': 1.2, 'xl': 1.2, 'xxl': 1.2},
    'sct_dropout': {'s': 0.25, 'm': 0.35, 'l': 0.35, 'xl': 0.35, 'xxl': 0.35},
    'scd_dropout': {'s': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1, 'xxl': 0.1},
    'scd_guidance': {'s': (1.5, 1.4), 'm': (1.3, 1.2), 'l': (1.3, 1.2), 'xl': (1.3, 1.2),
                     'xxl': (1.3, 1.2)},
}
# The corrected SD-VAE latent statistics (G.2): per channel, (z - mu) * sigma_d / sigma_c
# for images in [-1, 1] (EDM2's own values assume inputs in [0, 1]).
LATENT_MEAN = (1.56, -0.695, 0.483, 0.729)
LATENT_STD = (5.27, 5.91, 4.21, 4.31)

CM_LR_FACTOR = 0.01       # CM learning rate = teacher's x 0.01 (Tables 4, 5)
CM_ITERS = {'imagenet64': {'sct': 400_000, 'scd': 400_000},
            'imagenet512': {'sct': 100_000, 'scd': 200_000}}
EDM2_RAMPUP_IMAGES = 10e6  # EDM2's learning-rate ramp-up (10 Mimg), teachers only
DROPOUT_MAX_RESOLUTION = 16  # consistency models: dropout only at resolution <= 16


def ema_decay(half_life_mimg: float, batch_size: int) -> float:
  """Per-step EMA decay of a half-life given in millions of images: 0.5^(B / H)."""
  return round(0.5 ** (batch_size / (half_life_mimg * 1e6)), 8)


def parse_size(arg: str, sizes, default: str) -> str:
  size = (arg or default).lower()
  if size not in sizes:
    raise ValueError(f'unknown size {arg!r}; choose one of {list(sizes)}')
  return size


def edm2_imagenet(size: str, data: str, stage: str, num_classes: int = 1000):
  """The shared part of every ImageNet recipe: EDM2 config G (+ sCM changes), Adam with
  beta (0.9, 0.99), eps 1e-11, inverse-sqrt decay (t_ref), batch 2048, FSDP, bf16."""
  c = base_config('edm2')
  c.model.update(edm2.size_config(size))
  c.model.num_classes = num_classes
  c.model.time_embed_scale = 1.0        # c_noise(t) = t
  c.model.dtype = 'bfloat16'            # README: why bf16 rather than the paper's fp16
  c.trigflow.sigma_d = 0.5
  c.optim.name = 'adam'
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.99, 1e-11
  c.optim.schedule = 'inv_sqrt'
  c.optim.decay_steps = 35_000 if data == 'imagenet64' else 70_000   # t_ref
  c.optim.grad_clip = 0.0
  c.train.batch_size = 2048
  c.train.log_every = 500
  c.train.sample_every = 10_000
  c.train.ckpt_every = 5_000
  c.sample.num = 64
  c.sample.t_mid = 1.1
  c.sample.sigma_max = 80.0
  c.mesh.data, c.mesh.fsdp = 1, -1      # FSDP over every device
  c.sharding.strategy = 'fsdp'
  table = IN64 if data == 'imagenet64' else IN512
  lr = table['teacher_lr'][size]
  sigma_rel = table['teacher_sigma_rel'][size]
  if stage == 'teacher':
    c.loss.kind = 'diffusion'
    c.model.dropout = table['teacher_dropout'][size]
    c.optim.lr = lr
    c.optim.warmup_steps = round(EDM2_RAMPUP_IMAGES / c.train.batch_size)
    c.train.num_steps = table['teacher_iters'][size]
    c.ema.decays = ()
    c.ema.sigma_rels = (sigma_rel,)     # the EMA the consistency models start from
    c.sample.ema = f'pema_{sigma_rel:g}'
    c.sample.ode_solver = 'heun'        # EDM's Heun, 32 steps: NFE 63 (G.1)
    c.sample.ode_steps = 32
    return c
  c.loss.kind = stage
  c.loss.tangent_warmup_steps = 10_000
  c.loss.tangent_norm = True
  c.loss.tangent_norm_c = 0.1
  c.loss.adaptive_weight = True
  c.model.dropout = table[f'{stage}_dropout'][size]
  c.model.dropout_max_resolution = DROPOUT_MAX_RESOLUTION
  c.optim.lr = lr * CM_LR_FACTOR
  c.optim.warmup_steps = 0
  c.train.num_steps = CM_ITERS[data][stage]
  c.ema.decays = ()
  c.ema.sigma_rels = (0.05,)
  c.sample.ema = 'pema_0.05'            # consistency models are sampled with sigma_rel 0.05
  c.teacher.ema = f'pema_{sigma_rel:g}'
  c.teacher.init_student = True         # Algorithm 1: sCT and sCD start from the teacher
  return c


def imagenet64_data(c):
  c.data.name = 'tfds'
  c.data.tfds_name = 'imagenet_resized/64x64'
  c.data.split = 'train'
  c.data.eval_split = 'validation'
  return c


def imagenet512_latents(c):
  """SD-VAE latents of ImageNet 512 (64x64x4), normalized with the corrected statistics."""
  c.data.name = 'array'
  c.data.path = 'data/imagenet512_latents_{split}.npy'
  c.data.split = 'train'
  c.data.eval_split = 'val'
  c.data.use_labels = True
  c.data.expected_shape = (64, 64, 4)
  c.data.latents = True
  c.vae.shift = LATENT_MEAN
  c.vae.scale = tuple(c.trigflow.sigma_d / s for s in LATENT_STD)
  return c


# Other backbones at ImageNet-512 scale (`configs/imagenet512_*.py:dit_xxl` etc.): every
# paper setting but the network. Parameter counts on 64x64x4, 1000 classes
# (tests/test_scale.py).
ALTERNATIVES = {
    **{f'dit_{k.lower()}': dict(name='dit', patch_size=2, head_dim=64, qk_norm=True,
                                attn_impl='flash', remat='dots_no_batch', **dit.dit_size(k))
       for k in dit.DIT_SIZES},
    **{f'unet_{k}': dict(name='unet', channels=ch, channel_mult=(1, 2, 3, 4),
                         num_res_blocks=3, attn_resolutions=(16, 8), head_dim=64,
                         qk_norm=True, attn_impl='flash', remat='full')
       for k, ch in edm2.SIZES.items()},
}
ALTERNATIVE_PARAMS = {
    'dit_s': 29.3e6, 'dit_b': 116.1e6, 'dit_l': 407.4e6, 'dit_xl': 600.4e6,
    'dit_xxl': 1.52e9, 'unet_s': 0.273e9, 'unet_m': 0.485e9, 'unet_l': 0.757e9,
    'unet_xl': 1.09e9, 'unet_xxl': 1.48e9,
}


def with_backbone(c, name: str):
  """Replaces the EDM2 network of a recipe by an alternative backbone (dit_* / unet_*)."""
  spec = dict(ALTERNATIVES[name])
  keep = {k: c.model[k] for k in ('num_classes', 'dropout', 'dtype', 'guidance_embed')}
  c.model = base_config(spec.pop('name')).model
  c.model.update(dict(spec, **keep))
  if c.model.name == 'dit':
    c.sharding.rules = dit.tensor_parallel_rules()
  return c


def imagenet512(arg: str, stage: str):
  """get_config of configs/imagenet512_<stage>.py: arg = EDM2 size (s .. xxl, default
  xxl) or an alternative backbone (dit_s .. dit_xxl, unet_s .. unet_xxl)."""
  arg = (arg or 'xxl').lower()
  if arg not in edm2.SIZES and arg not in ALTERNATIVES:
    raise ValueError(f'unknown size {arg!r}; choose one of '
                     f'{list(edm2.SIZES) + sorted(ALTERNATIVES)}')
  size = arg if arg in edm2.SIZES else arg.split('_')[1]
  size = size if size in edm2.SIZES else 'xxl'   # DiT-B has no EDM2 sibling: XXL settings
  c = imagenet512_latents(edm2_imagenet(size, 'imagenet512', stage))
  c.model.remat = 'full'
  c.loss.p_mean, c.loss.p_std = (-0.4, 1.0) if stage == 'teacher' else (-0.8, 1.6)
  if stage == 'teacher':
    c.loss.label_dropout = 0.1          # classifier-free guidance (Table 5)
    c.sample.guidance = (IN512['teacher_guidance'][size],)  # NFE 126 = 63 x 2 (Table 6)
  if stage == 'scd':
    c.teacher.guidance_max = 2.0        # the student's input s ~ U[1, 2] (G.2)
    c.model.guidance_embed = True
    c.sample.steps = (1, 2)
    c.sample.guidance = IN512['scd_guidance'][size]  # per step count (Table 6)
  if arg in ALTERNATIVES:
    c = with_backbone(c, arg)
  return c


def imagenet64(arg: str, stage: str):
  """get_config of configs/imagenet64_<stage>.py: arg = EDM2 size (s .. xl, default s)."""
  size = parse_size(arg, IN64['teacher_lr'], 's')
  c = imagenet64_data(edm2_imagenet(size, 'imagenet64', stage))
  c.loss.p_mean, c.loss.p_std = (-0.8, 1.6) if stage == 'teacher' else (-1.0, 1.6)
  return c


def cifar10(stage: str):
  """CIFAR-10 (G.1, G.2): DDPM++-sized U-Net with positional time embedding and adaptive
  double normalization; teacher EDM-style (Adam 1e-3, dropout 0.13), CMs RAdam 1e-4."""
  c = base_config('unet')
  c.data.name = 'tfds'
  c.data.tfds_name = 'cifar10'
  c.data.split = 'train'
  c.data.eval_split = 'test'
  c.model.update(dict(channels=128, channel_mult=(2, 2, 2), num_res_blocks=4,
                      attn_resolutions=(16,), num_heads=1, time_embed_scale=1.0,
                      norm_mode='double', time_embed_kind='positional'))
  c.trigflow.sigma_d = 0.5
  c.train.batch_size = 512
  c.train.log_every = 500
  c.train.sample_every = 10_000
  c.train.ckpt_every = 5_000
  c.optim.grad_clip = 0.0
  c.ema.decays = (ema_decay(0.5, c.train.batch_size),)   # half-life 0.5 Mimg
  c.ema.sigma_rels = ()
  c.sample.num = 64
  c.sample.t_mid = 1.1
  c.sample.sigma_max = 80.0
  if stage == 'teacher':
    c.loss.kind = 'diffusion'
    c.loss.p_mean, c.loss.p_std = -1.2, 1.2     # EDM's
    c.model.dropout = 0.13
    c.optim.name, c.optim.lr = 'adam', 1e-3
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
    c.optim.warmup_steps = round(EDM2_RAMPUP_IMAGES / c.train.batch_size)  # EDM's ramp-up
    c.train.num_steps = 400_000
    c.sample.ode_solver, c.sample.ode_steps = 'heun', 18   # NFE 35
    return c
  c.loss.kind = stage
  c.loss.p_mean, c.loss.p_std = -1.0, 1.4
  c.loss.tangent_warmup_steps = 10_000
  c.loss.tangent_norm, c.loss.tangent_norm_c = True, 0.1
  c.loss.adaptive_weight = True
  c.model.dropout = 0.20 if stage == 'sct' else 0.0
  c.optim.name, c.optim.lr = 'radam', 1e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.99, 1e-8
  c.optim.schedule, c.optim.warmup_steps = 'constant', 0
  c.train.num_steps = 400_000           # not in the tables (ours: the teacher's length)
  c.teacher.ema = f'ema_{c.ema.decays[0]:g}'
  c.teacher.init_student = True
  return c


# NVlabs' released EDM2 networks (edm2-img512-<size>-*.pkl, edm2-img64-<size>-*.pkl; EDM2's
# train_edm2.py presets): channels and dropout per size, for sCD from an imported network
# (python -m scm_jax.import_edm2). The img512 ones saw EDM2's own latents: raw SD-VAE
# latents (images in [-1, 1]) * 0.5 / RAW_STD after subtracting RAW_MEAN, which the
# imported workdir records from the pickle's encoder.
EDM2_RELEASED = {
    'imagenet512': {'xs': (128, 0.0), 's': (192, 0.0), 'm': (256, 0.1), 'l': (320, 0.1),
                    'xl': (384, 0.1), 'xxl': (448, 0.1)},
    'imagenet64': {'s': (192, 0.0), 'm': (256, 0.1), 'l': (320, 0.1), 'xl': (384, 0.1)},
}
EDM2_LATENT_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_LATENT_RAW_STD = (4.17, 4.62, 3.71, 3.28)


def edm2_released(arg: str, data: str):
  """sCD from an imported NVlabs EDM2 network (`configs/<data>_scd.py:edm2_<size>`).

  The student is the released network's own architecture (EDM2 config G, EDM
  parameterization; `edm2.PLAIN`) of that size, initialized from the imported weights
  (the workdir's raw parameters: teacher.ema=''), with the paper's sCD settings of the
  size (xs, which the paper has no column for, takes s's)."""
  size = arg[len('edm2_'):]
  if size not in EDM2_RELEASED[data]:
    raise ValueError(f'unknown released EDM2 size {size!r} for {data}; choose one of '
                     f'{["edm2_" + s for s in EDM2_RELEASED[data]]}')
  channels, _ = EDM2_RELEASED[data][size]
  table_size = 's' if size == 'xs' else size
  c = imagenet512(table_size, 'scd') if data == 'imagenet512' else imagenet64(table_size, 'scd')
  c.model.update(dict(edm2.PLAIN, channels=channels, sigma_data=c.trigflow.sigma_d))
  c.teacher.ema = ''   # an imported workdir holds the file's (EMA) weights as its params
  if data == 'imagenet512':
    c.data.path = 'data/imagenet512_edm2_latents_{split}.npy'
    c.vae.shift = EDM2_LATENT_RAW_MEAN
    c.vae.scale = tuple(c.trigflow.sigma_d / s for s in EDM2_LATENT_RAW_STD)
    c.vae.sample_posterior = True  # EDM2 encodes its data set with a posterior sample
  return c
