"""The math of sCM: pure functions of arrays, no config and no I/O.

  trigflow   the diffusion process (noising, velocity, PF-ODE, consistency function,
             time proposal, EDM / VP / flow-matching conversions)
  losses     the TrigFlow diffusion loss and the sCT / sCD consistency loss
  sampling   consistency sampling and PF-ODE solvers
  teachers   any diffusion model as a TrigFlow F; classifier-free guidance
  analytic   closed forms for Gaussian data (the test oracle)
"""
