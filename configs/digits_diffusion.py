"""TrigFlow diffusion on 8x8 digits: the teacher for sCD and the NFE baseline for sCT."""

from configs import digits_sct


def get_config():
  c = digits_sct.get_config()
  c.loss.kind = 'diffusion'
  c.loss.p_mean = -1.0
  c.loss.p_std = 1.4
  c.sample.ode_steps = 18
  return c
