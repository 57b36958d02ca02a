"""Class-conditional sCD on ImageNet 64x64 (Lu & Song 2024, Table 2: sCD 2-step FID 1.48).

    python -m scm_jax.train --config=configs/imagenet64_scd.py:teacher --workdir=runs/in64_teacher
    python -m scm_jax.train --config=configs/imagenet64_scd.py --workdir=runs/in64_scd \\
        --config.teacher.workdir=runs/in64_teacher
    python -m scm_jax.sample --workdir=runs/in64_scd --steps=2 --labels=207,360,387 --num=64

From the paper / shared/SCM_NOTES.md: TrigFlow with sigma_d = 0.5, the ImageNet sCD time
proposal P_mean = -0.8, P_std = 1.6, tangent warmup over 10k iterations, tangent
normalization c = 0.1, adaptive weighting, positional time embedding of t, adaptive
double normalization, a student initialized from a TrigFlow diffusion teacher of the
same EDM2-style U-Net, 2-step sampling with t_mid = 1.1. Our choices where the notes are
silent: EDM2-S-like widths (192 channels, (1, 2, 3, 4), 3 blocks, attention at 16 and 8
with 64-dim heads), QK-normalization (tames jvp blow-ups in attention), Adam with
EDM2's inverse-sqrt decay, batch 2048 (add --config.mesh.fsdp=8 on an 8-GPU node to
shard parameters), classic and power-function EMAs kept side by side, label dropout
0.1 in the teacher so classifier-free guidance can be distilled
(`--config.teacher.guidance`; 1.0, unguided, is our default for ImageNet 64). Needs `tfds build imagenet_resized/64x64 --file_format=array_record` first.
"""

from scm_jax.config import base_config


def get_config(stage: str = 'student'):
  if stage not in ('teacher', 'student'):
    raise ValueError(f'unknown stage {stage!r}; use configs/imagenet64_scd.py[:teacher]')
  c = base_config('unet')
  c.data.name = 'tfds'
  c.data.tfds_name = 'imagenet_resized/64x64'
  c.data.split = 'train'
  c.data.eval_split = 'validation'
  c.model.channels = 192
  c.model.channel_mult = (1, 2, 3, 4)
  c.model.num_res_blocks = 3
  c.model.attn_resolutions = (16, 8)
  c.model.head_dim = 64
  c.model.qk_norm = True
  c.model.dropout = 0.1
  c.model.time_embed_scale = 1.0
  c.model.num_classes = 1000
  c.model.dtype = 'bfloat16'
  c.loss.p_mean = -0.8
  c.loss.p_std = 1.6
  c.optim.name = 'adam'
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.schedule = 'inv_sqrt'
  c.optim.decay_steps = 35000   # t_ref of the inverse-sqrt decay
  c.optim.warmup_steps = 1000
  c.optim.grad_clip = 0.0
  c.ema.decays = (0.9999,)
  c.ema.sigma_rels = (0.05, 0.1)
  c.train.num_steps = 400000
  c.train.batch_size = 2048
  c.train.log_every = 500
  c.train.sample_every = 10000
  c.train.ckpt_every = 5000
  c.sample.num = 64
  c.sample.t_mid = 1.1
  c.sharding.strategy = 'fsdp'  # with --config.mesh.fsdp=N: parameters split N ways
  if stage == 'teacher':
    c.loss.kind = 'diffusion'
    c.loss.label_dropout = 0.1
    c.sample.ode_steps = 32
    return c
  c.loss.kind = 'scd'
  c.loss.tangent_warmup_steps = 10000
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.teacher.ema = 'pema_0.05'
  c.teacher.guidance = 1.0
  c.teacher.init_student = True
  return c
