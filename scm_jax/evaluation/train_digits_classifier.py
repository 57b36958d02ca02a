"""Train the digits feature classifier: python -m scm_jax.evaluation.train_digits_classifier.

Trains `digits_classifier.DigitsCNN` on the digits train split (1497 images), prints the
accuracy on the 300 held-out test images, and writes the weights (.npz). With the
defaults it reproduces the committed `scm_jax/evaluation/assets/digits_classifier.npz`.
"""

from absl import flags

from scm_jax import cli

_OUT = flags.DEFINE_string('out', None, 'Output .npz (default: the packaged weights file).')
_STEPS = flags.DEFINE_integer('steps', 1500, 'Training steps.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')


def main(argv):
  del argv
  from scm_jax.data.digits import load_digits_split
  from scm_jax.evaluation import digits_classifier as dc
  x_train, y_train = load_digits_split('train')
  x_test, y_test = load_digits_split('test')
  variables = dc.train_classifier(x_train, y_train, steps=_STEPS.value, seed=_SEED.value)
  out = _OUT.value or dc.DEFAULT_WEIGHTS
  dc.save_classifier(out, variables)
  print(f'train accuracy {dc.accuracy(variables, x_train, y_train):.4f}, '
        f'test accuracy {dc.accuracy(variables, x_test, y_test):.4f}; wrote {out}')


if __name__ == '__main__':
  cli.run(main)
