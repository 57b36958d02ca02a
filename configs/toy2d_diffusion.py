"""TrigFlow diffusion (teacher) on the 2-D ring of 8 Gaussians; samples by the PF-ODE."""

from configs import toy2d_sct


def get_config():
  c = toy2d_sct.get_config()
  c.loss.kind = 'diffusion'
  c.loss.p_mean = -1.0
  c.loss.p_std = 1.4
  c.sample.ode_steps = 50
  return c
