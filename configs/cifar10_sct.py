"""sCT on CIFAR-10 32x32 (Lu & Song 2024, Sec. 5, Table 1: 2-step FID 2.06).

From the paper / shared/SCM_NOTES.md: TrigFlow with sigma_d = 0.5, time proposal
P_mean = -1.0, P_std = 1.4, tangent warmup over 10k iterations, tangent normalization
c = 0.1, adaptive weighting, positional time embedding of c_noise(t) = t, adaptive double
normalization, 2-step sampling with t_mid = 1.1. The backbone follows EDM's CIFAR-10
DDPM++/NCSN++ size (128 channels, (2, 2, 2), 4 blocks, attention at 16x16, dropout).
Needs `tfds build cifar10 --file_format=array_record` on a machine with internet first.
"""

from scm_jax.config import base_config


def get_config():
  c = base_config('unet')
  c.data.name = 'tfds'
  c.data.tfds_name = 'cifar10'
  c.data.split = 'train'
  c.data.eval_split = 'test'
  c.model.channels = 128
  c.model.channel_mult = (2, 2, 2)
  c.model.num_res_blocks = 4
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 1
  c.model.dropout = 0.2
  c.model.time_embed_scale = 1.0
  c.model.qk_norm = False
  c.loss.kind = 'sct'
  c.loss.p_mean = -1.0
  c.loss.p_std = 1.4
  c.loss.tangent_warmup_steps = 10000
  c.loss.tangent_norm = True
  c.loss.tangent_norm_c = 0.1
  c.loss.adaptive_weight = True
  c.optim.name = 'radam'
  c.optim.lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.grad_clip = 0.0
  c.ema.decays = (0.9999,)
  c.train.num_steps = 400000
  c.train.batch_size = 512
  c.train.log_every = 500
  c.train.sample_every = 10000
  c.train.ckpt_every = 5000
  c.sample.num = 64
  c.sample.t_mid = 1.1
  c.sharding.strategy = 'replicate'
  return c
