"""sCD on ImageNet 512x512 in the latent space of the Stable Diffusion VAE (64x64x4).

Lu & Song 2024 (Sec. 5, Table 2) distil EDM2 teachers of sizes S..XXL; their XXL
student (1.5B parameters) reaches 2-step FID 1.88. This recipe offers two backbone
families at those sizes, picked by the config argument:

  --config=configs/imagenet512_scd.py:dit_xxl    DiT, patch 2 (1024 tokens), 1.52B
  --config=configs/imagenet512_scd.py:unet_xxl   ADM-style U-Net, EDM2-XXL widths, 1.48B

Sizes: dit_s, dit_b, dit_l, dit_xl, dit_xxl; unet_s, unet_m, unet_l, unet_xl, unet_xxl.
`STATED_PARAMS` gives each size's parameter count (checked in tests with
jax.eval_shape, no allocation).

From the paper / shared/SCM_NOTES.md: TrigFlow with sigma_d = 0.5 (latents are normalized
to std ~0.5 by config.vae.shift/scale at encoding time), time proposal P_mean = -0.8,
P_std = 1.6, tangent warmup, tangent normalization c = 0.1, adaptive weighting,
positional time embedding of c_noise(t) = t, double normalization, QK-norm in
attention, 2-step sampling with t_mid = 1.1. Scale choices (ours): bfloat16 compute
with float32 master weights, blockwise 'flash' attention (JVP-capable), block remat,
FSDP over all devices. The sCD teacher (loss.kind='scd') is passed to
train_and_evaluate as `dxdt_fn`; use loss.kind='sct' to train from data alone.

Data: precomputed latents, e.g. from
  python -m scm_jax.encode_latents --vae=/path/vae.npz --config=... --out=/data/in512_{split}.npz
"""

from scm_jax.config import base_config
from scm_jax.models import dit

# size -> model fields.
DIT = {f'dit_{k.lower()}': dict(name='dit', patch_size=2, head_dim=64, **dit.dit_size(k))
       for k in dit.DIT_SIZES}
# EDM2 img512 widths (S 192 .. XXL 448), channel_mult (1, 2, 3, 4), 3 blocks per level,
# attention at 16x16 and 8x8 (latent resolution 64).
UNET = {f'unet_{k}': dict(name='unet', channels=ch, channel_mult=(1, 2, 3, 4),
                          num_res_blocks=3, attn_resolutions=(16, 8), head_dim=64)
        for k, ch in (('s', 192), ('m', 256), ('l', 320), ('xl', 384), ('xxl', 448))}
SIZES = {**DIT, **UNET}
# Parameter counts with num_classes=1000 on 64x64x4 inputs (tests/test_scale.py).
STATED_PARAMS = {
    'dit_s': 29.3e6, 'dit_b': 116.1e6, 'dit_l': 407.4e6, 'dit_xl': 600.4e6,
    'dit_xxl': 1.52e9,
    'unet_s': 0.273e9, 'unet_m': 0.485e9, 'unet_l': 0.757e9, 'unet_xl': 1.09e9,
    'unet_xxl': 1.48e9,
}


def get_config(size: str = 'dit_xxl'):
  if size not in SIZES:
    raise ValueError(f'unknown size {size!r}; choose one of {sorted(SIZES)}')
  spec = dict(SIZES[size])
  c = base_config(spec.pop('name'))
  c.model.update(spec)
  c.model.num_classes = 1000
  c.model.qk_norm = True
  c.model.dtype = 'bfloat16'
  c.model.attn_impl = 'flash'
  c.model.remat = 'dots_no_batch' if c.model.name == 'dit' else 'full'

  c.data.name = 'array'
  c.data.path = 'data/imagenet512_latents_{split}.npz'
  c.data.split = 'train'
  c.data.eval_split = 'val'
  c.data.use_labels = True
  c.data.expected_shape = (64, 64, 4)
  c.data.latents = True

  # The SD VAE (sd-vae-ft-mse) with EDM2's per-channel latent normalization to std 0.5
  # (raw mean [5.81, 3.25, 0.12, -2.15], std [4.17, 4.62, 3.71, 3.28]). Set vae.path
  # to its weights to encode the data and decode samples.
  c.vae.shift = (5.81, 3.25, 0.12, -2.15)
  c.vae.scale = tuple(0.5 / s for s in (4.17, 4.62, 3.71, 3.28))

  c.trigflow.sigma_d = 0.5
  c.loss.kind = 'scd'
  c.loss.p_mean = -0.8
  c.loss.p_std = 1.6
  c.loss.tangent_warmup_steps = 10000
  c.loss.tangent_norm = True
  c.loss.tangent_norm_c = 0.1
  c.loss.adaptive_weight = True
  c.loss.label_dropout = 0.1

  c.optim.name = 'adam'
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 1.0
  c.ema.decays = ()
  c.ema.sigma_rels = (0.05,)

  c.train.num_steps = 200000
  c.train.batch_size = 2048
  c.train.log_every = 100
  c.train.sample_every = 5000
  c.train.ckpt_every = 2000
  c.sample.num = 64
  c.sample.t_mid = 1.1

  # FSDP over every device; add tensor parallelism with --config.mesh.tensor=8
  # (the DiT rules below then split attention/MLP weights over 'tensor').
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.sharding.strategy = 'fsdp'
  c.sharding.rules = dit.tensor_parallel_rules() if c.model.name == 'dit' else ()

  return c
