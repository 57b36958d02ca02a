"""TrigFlow diffusion on 8x8 digits: the teacher for sCT / sCD and the NFE baseline
(the same as configs/digits_sct.py:teacher)."""

from configs import digits_sct


def get_config():
  return digits_sct.get_config('teacher')
