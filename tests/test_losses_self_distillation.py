"""Tests for kd_jax.losses.self_distillation (BYOT, Tf-KD_reg losses).

Values against float64 NumPy transcriptions of the reference code (written
below, not calling kd_jax): luanyunteng/pytorch-be-your-own-teacher
`train.py::kd_loss_function` / `feature_loss_function`;
yuanli2333/Teacher-free-Knowledge-Distillation
`my_loss_function.py::loss_kd_regularization` (the KL part). Gradients
against central finite differences in float64 (x64 mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses

from loss_testing import assert_close_to_reference, random_logits


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_byot_kd(s, t, temperature, dtype=np.float64):
  """`kd_loss_function(s, softmax(t / T), args) * T**2`, per example."""
  s, t = np.asarray(s, dtype), np.asarray(t, dtype)
  target = np_softmax(t / dtype(temperature))
  out = np_log_softmax(s / dtype(temperature))
  return -np.sum(out * target, axis=1) * dtype(temperature) ** 2


def np_byot_feature(f, g, dtype=np.float64):
  """`feature_loss_function(fea, target_fea)` before its batch sum."""
  f, g = np.asarray(f, dtype), np.asarray(g, dtype)
  loss = (f - g) ** 2 * ((f > 0) | (g > 0)).astype(dtype)
  return np.abs(loss).reshape(len(f), -1).sum(1)


def np_tf_kd_reg_kl(z, y, temperature, correct_prob=0.99, dtype=np.float64):
  """KLDivLoss(log_softmax(z), softmax(teacher_soft / T)) before reduction,
  summed over classes (`loss_kd_regularization`'s soft term)."""
  z = np.asarray(z, dtype)
  k = z.shape[1]
  teacher_soft = np.ones_like(z) * (1 - correct_prob) / (k - 1)
  for i in range(z.shape[0]):
    teacher_soft[i, y[i]] = correct_prob
  target = np_softmax(teacher_soft / dtype(temperature))
  return (target * (np.log(target) - np_log_softmax(z))).sum(1)


def fd_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = h
    g[i] = (f(x + d) - f(x - d)) / (2 * h)
  return g


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("temperature", [1.0, 3.0, 7.5])
def test_soft_cross_entropy_matches_reference(temperature):
  s, t = random_logits(0, (6, 11))
  got = jax.jit(lambda a, b: losses.soft_cross_entropy(
      a, b, temperature=temperature))(s, t)
  assert got.shape == (6,) and got.dtype == jnp.float32
  assert_close_to_reference(got, lambda d: np_byot_kd(s, t, temperature, d),
                            scale=temperature ** 2)
  # = KD + T^2 H(p): the same gradient as kd_loss.
  g1 = jax.grad(lambda a: jnp.sum(losses.soft_cross_entropy(
      a, t, temperature=temperature)))(s)
  g2 = jax.grad(lambda a: jnp.sum(losses.kd_loss(
      a, t, temperature=temperature)))(s)
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)


def test_soft_cross_entropy_gradient_matches_finite_differences(x64):
  s, t = random_logits(1, (3, 5))
  s, t = s.astype(np.float64), t.astype(np.float64)
  w = np.random.default_rng(2).standard_normal(3)
  g = jax.grad(lambda a: jnp.sum(w * losses.soft_cross_entropy(
      a, jnp.asarray(t), temperature=3.0)))(jnp.asarray(s))
  assert g.dtype == jnp.float64
  np.testing.assert_allclose(
      g, fd_grad(lambda a: np.sum(w * np_byot_kd(a, t, 3.0)), s),
      rtol=1e-6, atol=1e-9)
  # The teacher is a constant.
  gt = jax.grad(lambda b: jnp.sum(losses.soft_cross_entropy(
      jnp.asarray(s), b)))(jnp.asarray(t))
  assert not np.any(np.asarray(gt))


@pytest.mark.parametrize("shape", [(5, 16), (4, 3, 3, 8)])
def test_byot_feature_loss_matches_reference(shape):
  rs = np.random.RandomState(3)
  f = rs.randn(*shape).astype(np.float32)
  g = rs.randn(*shape).astype(np.float32)
  g[0] = np.maximum(g[0], 0)  # a ReLU row
  got = jax.jit(losses.byot_feature_loss)(f, g)
  assert got.shape == shape[:1]
  assert_close_to_reference(got, lambda d: np_byot_feature(f, g, d),
                            scale=float(np.prod(shape[1:])))


def test_byot_feature_loss_gradient(x64):
  rs = np.random.RandomState(4)
  f, g = rs.randn(3, 6), rs.randn(3, 6)
  f[np.abs(f) < 1e-3] = 0.5  # keep finite differences off the mask's kink
  w = rs.randn(3)
  grad = jax.grad(lambda a: jnp.sum(w * losses.byot_feature_loss(
      a, jnp.asarray(g))))(jnp.asarray(f))
  np.testing.assert_allclose(
      grad, fd_grad(lambda a: np.sum(w * np_byot_feature(a, g)), f),
      rtol=1e-6, atol=1e-8)
  gt = jax.grad(lambda b: jnp.sum(losses.byot_feature_loss(
      jnp.asarray(f), b)))(jnp.asarray(g))
  assert not np.any(np.asarray(gt))


@pytest.mark.parametrize("temperature,k", [(20.0, 100), (40.0, 10),
                                           (1.0, 5), (10.0, 2)])
def test_tf_kd_reg_matches_reference(temperature, k):
  rs = np.random.RandomState(k)
  z = (3 * rs.randn(7, k)).astype(np.float32)
  y = rs.randint(0, k, 7)
  got = jax.jit(lambda a, b: losses.tf_kd_reg_loss(
      a, b, temperature=temperature))(z, y)
  assert got.shape == (7,)
  assert_close_to_reference(
      got, lambda d: np_tf_kd_reg_kl(z, y, temperature, dtype=d))


def test_virtual_teacher_matches_reference():
  y = np.array([0, 3, 99])
  q = losses.virtual_teacher(jnp.asarray(y), 100, temperature=20.0)
  teacher_soft = np.full((3, 100), 0.01 / 99)
  teacher_soft[np.arange(3), y] = 0.99
  np.testing.assert_allclose(q, np_softmax(teacher_soft / 20.0), rtol=1e-6)
  # Close to uniform, as the reference computes it (module docstring).
  assert abs(float(q[0, 0]) - 0.0105) < 1e-4
  assert abs(float(q[0, 1]) - 0.00999) < 1e-5


def test_tf_kd_reg_gradient(x64):
  rs = np.random.RandomState(5)
  z, y = rs.randn(3, 4) * 2, np.array([0, 3, 1])
  w = rs.randn(3)
  g = jax.grad(lambda a: jnp.sum(w * losses.tf_kd_reg_loss(
      a, jnp.asarray(y), temperature=2.0)))(jnp.asarray(z))
  assert g.dtype == jnp.float64
  np.testing.assert_allclose(
      g, fd_grad(lambda a: np.sum(w * np_tf_kd_reg_kl(a, y, 2.0)), z),
      rtol=1e-6, atol=1e-9)


def test_where_masks_and_bad_rows_do_not_leak():
  s, t = random_logits(6, (4, 5))
  s[1] = np.nan
  where = np.array([True, False, True, True])
  for fn in (lambda a, w: losses.soft_cross_entropy(a, t, where=w),
             lambda a, w: losses.byot_feature_loss(a, t, where=w),
             lambda a, w: losses.tf_kd_reg_loss(
                 a, jnp.array([0, -1, 2, 4]), where=w)):
    out = fn(jnp.asarray(s), jnp.asarray(where))
    assert float(out[1]) == 0.0 and np.all(np.isfinite(out))
    g = jax.grad(lambda a, fn=fn: jnp.sum(fn(a, jnp.asarray(where))))(
        jnp.asarray(s))
    assert np.all(np.isfinite(g)) and not np.any(np.asarray(g[1]))


def test_low_precision_inputs_compute_in_float32():
  s, t = random_logits(7, (4, 6))
  ref = losses.soft_cross_entropy(jnp.asarray(s, jnp.bfloat16).astype(
      jnp.float32), jnp.asarray(t, jnp.bfloat16).astype(jnp.float32))
  got = losses.soft_cross_entropy(jnp.asarray(s, jnp.bfloat16),
                                  jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_errors():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="same shape"):
    losses.soft_cross_entropy(z, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="temperature"):
    losses.soft_cross_entropy(z, z, temperature=0.0)
  with pytest.raises(TypeError, match="floating"):
    losses.byot_feature_loss(jnp.zeros((2, 3), jnp.int32), z)
  with pytest.raises(TypeError, match="integer"):
    losses.tf_kd_reg_loss(z, jnp.zeros((2,)))
  with pytest.raises(ValueError, match="labels"):
    losses.tf_kd_reg_loss(z, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="correct_prob"):
    losses.tf_kd_reg_loss(z, jnp.zeros((2,), jnp.int32), correct_prob=1.0)
  with pytest.raises(ValueError, match="at least 2 classes"):
    losses.tf_kd_reg_loss(jnp.zeros((2, 1)), jnp.zeros((2,), jnp.int32))
  assert "soft_cross_entropy" in losses.LOGIT_LOSSES
