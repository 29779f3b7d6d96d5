"""`kd_jax.train.bias_shift` against a NumPy loop and a Flax output layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.train import bias_shift as B


def _np_errors(logits, labels, classes, delta, count_class=None):
  z = np.array(logits, np.float64)
  z[:, list(classes)] += delta
  wrong = z.argmax(-1) != labels
  if count_class is not None:
    wrong &= labels == count_class
  return int(wrong.sum())


def _data(seed=0, n=300, k=10):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(0, 1, (n, k)) + 2.0 * np.eye(k)[labels]
  logits[:, 3] -= 2.5  # a class whose bias is too low (as when omitted)
  return logits.astype(np.float32), labels


def test_errors_under_shifts_match_numpy_loop():
  logits, labels = _data()
  deltas = np.round(np.arange(-4, 6.01, 0.5), 1)
  for classes in ([3], [7, 8]):
    got = B.errors_under_shifts(logits, labels, classes, deltas)
    want = [_np_errors(logits, labels, classes, d) for d in deltas]
    assert got.tolist() == want
    got3 = B.errors_under_shifts(logits, labels, classes, deltas, count_class=3)
    assert got3.tolist() == [_np_errors(logits, labels, classes, d, 3)
                             for d in deltas]


def test_choose_bias_shift_minimizes_and_repairs_low_bias():
  logits, labels = _data(1)
  deltas = np.round(np.arange(-5, 5.01, 0.1), 1)
  d, e = B.choose_bias_shift(logits, labels, [3], deltas)
  errs = [_np_errors(logits, labels, [3], x) for x in deltas]
  assert e == min(errs) == _np_errors(logits, labels, [3], d)
  ties = [x for x, v in zip(deltas, errs) if v == e]
  assert abs(d) == min(abs(x) for x in ties)
  assert d > 0 and e < _np_errors(logits, labels, [3], 0.0)


def test_shift_logits_equals_shifting_the_output_bias():
  x = jax.random.normal(jax.random.key(0), (5, 7))
  dense = nn.Dense(10)
  v = dense.init(jax.random.key(1), x)
  shifted = jax.tree_util.tree_map(lambda a: a, v)
  shifted["params"]["bias"] = v["params"]["bias"].at[jnp.array([7, 8])].add(-7.6)
  np.testing.assert_allclose(
      np.asarray(B.shift_logits(dense.apply(v, x), [7, 8], -7.6)),
      np.asarray(dense.apply(shifted, x)), rtol=1e-6, atol=1e-5)


def test_bad_arguments():
  logits, labels = _data()
  with pytest.raises(ValueError, match="classes"):
    B.errors_under_shifts(logits, labels, [10], [0.0])
  with pytest.raises(ValueError, match="classes"):
    B.shift_logits(logits, [], 1.0)
  with pytest.raises(ValueError, match="labels"):
    B.errors_under_shifts(logits, labels[:-1], [3], [0.0])
  with pytest.raises(ValueError, match="logits"):
    B.errors_under_shifts(logits[0], labels, [3], [0.0])
  with pytest.raises(ValueError, match="deltas"):
    B.choose_bias_shift(logits, labels, [3], [])
