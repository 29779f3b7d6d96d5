"""Tests for kd_jax.losses.logits: kd_loss, dkd_loss, dist_loss, ofa_loss,
standardize_logits.

Every value is compared with an independent float64 NumPy transcription of
the authors' published PyTorch code (written below, not calling kd_jax), and
every gradient with central finite differences in float64.
"""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses

from loss_testing import EPS32, RTOL, assert_close_to_reference, jcall, jgrad, random_logits  # noqa: F401


# ---------------------------------------------------------------------------
# NumPy references: literal transcriptions of the authors' PyTorch code.
# Run in float64 they are the ground truth. Run in float32 they measure the
# rounding error that *any* float32 implementation of the same formula has
# (a float32 KL is a difference of O(1) log-probabilities, so values near 0
# have a large relative error); `assert_close_to_reference` allows
# kd_jax that much absolute error (x3) on top of rtol=1e-5.
# ---------------------------------------------------------------------------


def np_softmax(x, axis=-1):
  x = x - np.max(x, axis=axis, keepdims=True)
  e = np.exp(x)
  return e / np.sum(e, axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
  x = x - np.max(x, axis=axis, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def np_kl_div(log_input, target):
  """torch F.kl_div(log_input, target, reduction='none'): xlogy convention."""
  with np.errstate(divide="ignore", invalid="ignore"):
    out = np.where(target > 0, target * (np.log(target) - log_input), 0.0)
  return out.astype(target.dtype)


def np_standardize(z):
  """(z - mean) / (1e-7 + std), std unbiased (torch default)."""
  mean = z.mean(axis=-1, keepdims=True)
  std = z.std(axis=-1, ddof=1, keepdims=True)
  return (z - mean) / (z.dtype.type(1e-7) + std)


def np_kd(s, t, temperature, standardize=False, dtype=np.float64):
  """mdistiller kd_loss per example (before .mean())."""
  s = np.asarray(s, dtype)
  t = np.asarray(t, dtype)
  temperature = dtype(temperature)
  if standardize:
    s, t = np_standardize(s), np_standardize(t)
  log_q = np_log_softmax(s / temperature)
  p = np_softmax(t / temperature)
  return np_kl_div(log_q, p).sum(-1) * temperature**2


def np_dkd(s, t, labels, alpha, beta, temperature, standardize=False,
           dtype=np.float64):
  """mdistiller dkd_loss per example (before the division by B)."""
  s = np.asarray(s, dtype)
  t = np.asarray(t, dtype)
  temperature = dtype(temperature)
  if standardize:
    s, t = np_standardize(s), np_standardize(t)
  k = s.shape[-1]
  gt = np.eye(k, dtype=dtype)[labels]
  other = dtype(1.0) - gt
  ps = np_softmax(s / temperature)
  pt = np_softmax(t / temperature)
  # cat_mask: [sum(p * gt), sum(p * other)]
  bs = np.stack([(ps * gt).sum(-1), (ps * other).sum(-1)], -1)
  bt = np.stack([(pt * gt).sum(-1), (pt * other).sum(-1)], -1)
  with np.errstate(divide="ignore"):
    log_bs = np.log(bs)
  tckd = np_kl_div(log_bs, bt).sum(-1) * temperature**2
  pt2 = np_softmax(t / temperature - dtype(1000.0) * gt)
  log_ps2 = np_log_softmax(s / temperature - dtype(1000.0) * gt)
  nckd = np_kl_div(log_ps2, pt2).sum(-1) * temperature**2
  return dtype(alpha) * tckd + dtype(beta) * nckd


def np_pearson(a, b, eps=1e-8):
  """DIST pearson_correlation over dim 1."""
  a = a - a.mean(1, keepdims=True)
  b = b - b.mean(1, keepdims=True)
  return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                           + a.dtype.type(eps))


def np_dist(s, t, beta, gamma, tau, dtype=np.float64):
  tau = dtype(tau)
  ys = np_softmax(np.asarray(s, dtype) / tau, axis=1)
  yt = np_softmax(np.asarray(t, dtype) / tau, axis=1)
  inter = tau**2 * (1 - np_pearson(ys, yt).mean())
  intra = tau**2 * (1 - np_pearson(ys.T, yt.T).mean())
  return dtype(beta) * inter + dtype(gamma) * intra


def np_ofa(s, t, labels, eps, temperature, dtype=np.float64):
  """OFAKD ofa_loss per example: log of the softmax output."""
  s = np.asarray(s, dtype)
  t = np.asarray(t, dtype)
  temperature = dtype(temperature)
  ps = np_softmax(s / temperature)
  pt = np_softmax(t / temperature)
  y = np.eye(s.shape[-1], dtype=dtype)[labels]
  w = (pt + y)**dtype(eps) - y
  with np.errstate(divide="ignore"):  # float32 log(softmax) of a far row: -inf
    return (-w * np.log(ps)).sum(-1)


def random_labels(seed, shape, k):
  return np.random.default_rng(seed + 1000).integers(0, k, size=shape)


def assert_rel_close(actual, expected, rtol=RTOL, atol=1e-7):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# Per-example losses under a common calling convention, and their references.
def _kd(s, t, labels, **kw):
  del labels
  return losses.kd_loss(s, t, **kw)


def _dkd(s, t, labels, **kw):
  return losses.dkd_loss(s, t, labels, **kw)


def _ofa(s, t, labels, **kw):
  return losses.ofa_loss(s, t, labels, **kw)


PER_EXAMPLE = {
    "kd": (_kd, {"temperature": 4.0}),
    "kd_std": (_kd, {"temperature": 2.0, "standardize": True}),
    "dkd": (_dkd, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}),
    "dkd_std": (_dkd, {"alpha": 0.5, "beta": 2.0, "temperature": 2.0,
                       "standardize": True}),
    "ofa": (_ofa, {"eps": 1.5, "temperature": 1.0}),
}


# ---------------------------------------------------------------------------
# Values against the float64 references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,temperature,standardize", [
    ((7, 10), 4.0, False), ((7, 10), 1.0, True), ((3, 4, 6), 1.0, False),
    ((3, 4, 6), 2.0, True), ((5,), 4.0, False), ((16, 100), 4.0, False),
    ((16, 100), 2.0, True)])
def test_kd_matches_reference(shape, temperature, standardize):
  s, t = random_logits(0, shape)
  got = jcall(losses.kd_loss, s, t, temperature=temperature, standardize=standardize)
  assert got.dtype == jnp.float32 and got.shape == shape[:-1]
  assert_close_to_reference(
      got, lambda dt: np_kd(s, t, temperature, standardize, dtype=dt),
      scale=temperature**2)


def test_kd_batchmean_equals_reference_reduction():
  s, t = random_logits(1, (8, 10))
  got = jnp.mean(jcall(losses.kd_loss, s, t, temperature=4.0))
  # mdistiller: kl_div(...).sum(1).mean() * T^2 ; RepDistiller: sum / B.
  expected = np_kd(s, t, 4.0).sum() / 8
  assert_rel_close(got, expected)


@pytest.mark.parametrize("shape,alpha,beta,temperature,standardize", [
    ((7, 10), 1.0, 8.0, 4.0, False), ((7, 10), 1.0, 2.0, 1.0, True),
    ((2, 3, 5), 0.3, 0.0, 2.0, False), ((2, 3, 5), 0.0, 1.0, 2.0, True),
    ((4, 2), 1.0, 8.0, 4.0, False), ((4, 2), 1.0, 8.0, 4.0, True),
    ((16, 100), 1.0, 8.0, 4.0, False), ((16, 100), 1.0, 2.0, 1.0, True),
    ((16, 100), 0.3, 0.0, 2.0, False)])
def test_dkd_matches_reference(shape, alpha, beta, temperature, standardize):
  s, t = random_logits(2, shape)
  labels = random_labels(2, shape[:-1], shape[-1])
  got = jcall(losses.dkd_loss, s, t, labels, alpha=alpha, beta=beta,
                        temperature=temperature, standardize=standardize)
  assert got.dtype == jnp.float32 and got.shape == shape[:-1]
  assert_close_to_reference(got, lambda dt: np_dkd(
      s, t, labels, alpha, beta, temperature, standardize, dtype=dt),
      scale=temperature**2 * (alpha + beta))


def test_dkd_tckd_uses_sum_of_nontarget_and_nckd_excludes_target():
  # Hand-built case: K=3, label 0, so TCKD and NCKD have closed forms.
  s = np.array([[1.0, 0.0, -1.0]], np.float32)
  t = np.array([[2.0, -1.0, 0.5]], np.float32)
  ps, pt = np_softmax(s.astype(np.float64)), np_softmax(t.astype(np.float64))
  tckd = (pt[0, 0] * np.log(pt[0, 0] / ps[0, 0])
          + (pt[0, 1] + pt[0, 2]) * np.log((pt[0, 1] + pt[0, 2])
                                           / (ps[0, 1] + ps[0, 2])))
  qn = ps[0, 1:] / ps[0, 1:].sum()
  pn = pt[0, 1:] / pt[0, 1:].sum()
  nckd = np.sum(pn * np.log(pn / qn))
  labels = np.array([0])
  got_t = jcall(losses.dkd_loss, s, t, labels, alpha=1.0, beta=0.0, temperature=1.0)
  got_n = jcall(losses.dkd_loss, s, t, labels, alpha=0.0, beta=1.0, temperature=1.0)
  assert_rel_close(got_t, [tckd])
  assert_rel_close(got_n, [nckd])


@pytest.mark.parametrize("shape,beta,gamma,tau", [
    ((8, 10), 1.0, 1.0, 1.0), ((5, 3), 2.0, 0.5, 4.0),
    ((32, 100), 1.0, 1.0, 4.0), ((32, 100), 2.0, 0.5, 1.0)])
def test_dist_matches_reference(shape, beta, gamma, tau):
  s, t = random_logits(3, shape)
  got = jcall(losses.dist_loss, s, t, beta=beta, gamma=gamma, temperature=tau)
  assert got.shape == () and got.dtype == jnp.float32
  assert_close_to_reference(got, lambda dt: np_dist(s, t, beta, gamma, tau,
                                                    dtype=dt),
                            scale=tau**2 * (beta + gamma))


@pytest.mark.parametrize("shape,eps,temperature", [
    ((7, 10), 1.0, 1.0), ((2, 3, 5), 1.5, 1.0), ((16, 100), 0.5, 4.0),
    ((16, 100), 1.5, 1.0)])
def test_ofa_matches_reference(shape, eps, temperature):
  s, t = random_logits(4, shape)
  labels = random_labels(4, shape[:-1], shape[-1])
  got = jcall(losses.ofa_loss, s, t, labels, eps=eps, temperature=temperature)
  assert got.dtype == jnp.float32 and got.shape == shape[:-1]
  assert_close_to_reference(got, lambda dt: np_ofa(s, t, labels, eps,
                                                   temperature, dtype=dt))


def test_ofa_eps1_is_cross_entropy_not_kl():
  s, t = random_logits(5, (6, 9))
  labels = random_labels(5, (6,), 9)
  p = np_softmax(t.astype(np.float64))
  entropy = -(p * np.log(p)).sum(-1)
  got = jcall(losses.ofa_loss, s, t, labels, eps=1.0)
  assert_rel_close(got, np_kd(s, t, 1.0) + entropy)


@pytest.mark.parametrize("shape", [(4, 7), (3, 2, 5), (2,)])
def test_standardize_matches_reference(shape):
  z, _ = random_logits(6, shape)
  got = jcall(losses.standardize_logits, z)
  assert_close_to_reference(got, lambda dt: np_standardize(z.astype(dt)))
  # axis argument.
  if len(shape) > 1:
    got0 = jcall(losses.standardize_logits, z, axis=0)
    ref0 = np.moveaxis(np_standardize(np.moveaxis(z.astype(np.float64), 0, -1)),
                       -1, 0)
    assert_rel_close(got0, ref0, atol=1e-6)


def test_standardize_constant_row_is_finite():
  z = jnp.array([[2.0, 2.0, 2.0], [1.0, 2.0, 4.0]])
  out, vjp = jax.vjp(losses.standardize_logits, z)
  (g,) = vjp(jnp.ones_like(out))
  np.testing.assert_array_equal(out[0], 0.0)
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------
# Gradients: float64 finite differences, a plain autodiff version, jvp.
# ---------------------------------------------------------------------------


def _fd_grad(f, x, h=1e-6):
  """Central finite differences of scalar f at x (float64), vectorized."""
  n = x.size
  eye = np.eye(n).reshape((n,) + x.shape)
  xs = np.concatenate([x[None] + h * eye, x[None] - h * eye])
  vals = np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(xs)))
  return ((vals[:n] - vals[n:]) / (2 * h)).reshape(x.shape)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _weights(shape, seed=11):
  return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_grad_student_matches_finite_differences(x64, name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(7, (3, 5), scale=2.0)
  s, t = s.astype(np.float64), t.astype(np.float64)
  labels = random_labels(7, (3,), 5)
  w = _weights((3,))  # a non-uniform reduction exercises the cotangent.

  def f(x):
    out = fn(x, jnp.asarray(t), jnp.asarray(labels), **kw)
    assert out.dtype == jnp.float64
    return jnp.sum(w * out)

  g = jgrad(f)(jnp.asarray(s))
  np.testing.assert_allclose(g, _fd_grad(f, s), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_grad_matches_finite_differences(x64, tau):
  s, t = random_logits(8, (4, 5), scale=2.0)
  s, t = s.astype(np.float64), t.astype(np.float64)
  f = lambda x: losses.dist_loss(x, jnp.asarray(t), beta=1.5, gamma=0.7,
                                 temperature=tau)
  g = jgrad(f)(jnp.asarray(s))
  np.testing.assert_allclose(g, _fd_grad(f, s), rtol=1e-6, atol=1e-8)


def test_standardize_grad_matches_finite_differences(x64):
  z, _ = random_logits(9, (3, 5))
  z = z.astype(np.float64)
  w = _weights((3, 5))
  f = lambda x: jnp.sum(w * losses.standardize_logits(x))
  np.testing.assert_allclose(jgrad(f)(jnp.asarray(z)), _fd_grad(f, z),
                             rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["kd", "kd_std", "dkd", "dkd_std"])
def test_grad_wrt_traced_temperature_matches_finite_differences(x64, name):
  # A traced temperature (e.g. CTKD-style learnable T) differentiates through
  # the teacher distribution too: exercises the teacher-side custom JVP.
  fn, kw = PER_EXAMPLE[name]
  kw = dict(kw)
  temp0 = kw.pop("temperature")
  s, t = random_logits(10, (3, 6), scale=2.0)
  labels = random_labels(10, (3,), 6)
  s, t = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
  f = jax.jit(lambda temp: jnp.sum(fn(s, t, labels, temperature=temp, **kw)))
  g = jgrad(f)(jnp.float64(temp0))
  h = 1e-6
  fd = (f(jnp.float64(temp0 + h)) - f(jnp.float64(temp0 - h))) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=1e-6)


def plain_kd(s, t, temperature, standardize=False):
  """Straightforward autodiff version (no custom derivative)."""
  t = jax.lax.stop_gradient(t)
  if standardize:
    z = lambda x: ((x - x.mean(-1, keepdims=True))
                   / (x.std(-1, ddof=1, keepdims=True) + 1e-7))
    s, t = z(s), z(t)
  log_q = jax.nn.log_softmax(s / temperature)
  log_p = jax.nn.log_softmax(t / temperature)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1) * temperature**2


def plain_dkd(s, t, labels, alpha, beta, temperature):
  t = jax.lax.stop_gradient(t)
  gt = jax.nn.one_hot(labels, s.shape[-1])
  ps = jax.nn.softmax(s / temperature)
  pt = jax.nn.softmax(t / temperature)
  bs = jnp.stack([(ps * gt).sum(-1), (ps * (1 - gt)).sum(-1)], -1)
  bt = jnp.stack([(pt * gt).sum(-1), (pt * (1 - gt)).sum(-1)], -1)
  tckd = jnp.sum(bt * (jnp.log(bt) - jnp.log(bs)), -1)
  log_ps2 = jax.nn.log_softmax(s / temperature - 1000.0 * gt)
  log_pt2 = jax.nn.log_softmax(t / temperature - 1000.0 * gt)
  nckd = jnp.sum(jnp.exp(log_pt2) * (log_pt2 - log_ps2), -1)
  return (alpha * tckd + beta * nckd) * temperature**2


@pytest.mark.parametrize("standardize", [False, True])
def test_custom_gradients_match_plain_autodiff(standardize):
  s, t = random_logits(12, (6, 11))
  labels = random_labels(12, (6,), 11)
  w = _weights((6,)).astype(np.float32)
  g_kd = jgrad(lambda x: jnp.sum(w * losses.kd_loss(
      x, t, temperature=3.0, standardize=standardize)))(s)
  g_kd_plain = jgrad(lambda x: jnp.sum(w * plain_kd(
      x, t, 3.0, standardize)))(s)
  np.testing.assert_allclose(g_kd, g_kd_plain, rtol=1e-4, atol=1e-6)
  if not standardize:
    g_dkd = jgrad(lambda x: jnp.sum(w * losses.dkd_loss(
        x, t, labels, alpha=1.0, beta=8.0, temperature=4.0)))(s)
    g_dkd_plain = jgrad(lambda x: jnp.sum(w * plain_dkd(
        x, t, labels, 1.0, 8.0, 4.0)))(s)
    np.testing.assert_allclose(g_dkd, g_dkd_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_forward_mode_matches_reverse_mode(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(13, (4, 7))
  labels = random_labels(13, (4,), 7)
  d = _weights((4, 7)).astype(np.float32)
  f = lambda x: jnp.sum(fn(x, t, labels, **kw))
  _, jvp_out = jax.jvp(f, (jnp.asarray(s),), (jnp.asarray(d),))
  vjp_out = jnp.sum(jgrad(f)(s) * d)
  np.testing.assert_allclose(jvp_out, vjp_out, rtol=1e-5)


def test_second_order_through_custom_derivatives(x64):
  # Hessians compose through the custom JVPs (KD vs plain autodiff; DKD vs
  # finite differences of its gradient).
  s, t = random_logits(34, (2, 4), scale=2.0)
  s, t = s.astype(np.float64), t.astype(np.float64)
  labels = np.array([1, 3])
  h = jax.jit(jax.hessian(lambda x: jnp.sum(losses.kd_loss(
      x, t, temperature=2.0))))(s)
  h_plain = jax.jit(jax.hessian(lambda x: jnp.sum(plain_kd(x, t, 2.0))))(s)
  np.testing.assert_allclose(h, h_plain, rtol=1e-8, atol=1e-12)
  grad_dkd = jgrad(lambda x: jnp.sum(losses.dkd_loss(
      x, jnp.asarray(t), labels, temperature=2.0)))
  h_dkd = jax.jit(jax.hessian(lambda x: jnp.sum(losses.dkd_loss(
      x, jnp.asarray(t), labels, temperature=2.0))))(s)
  eps = 1e-6
  for i in np.ndindex(s.shape):
    d = np.zeros_like(s)
    d[i] = eps
    fd = (grad_dkd(s + d) - grad_dkd(s - d)) / (2 * eps)
    np.testing.assert_allclose(h_dkd[(Ellipsis,) + i], fd, rtol=1e-5,
                               atol=1e-8)


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_no_gradient_into_teacher(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(14, (3, 5))
  labels = random_labels(14, (3,), 5)
  g = jgrad(lambda y: jnp.sum(fn(s, y, labels, **kw)))(t)
  np.testing.assert_array_equal(g, 0.0)


def test_dist_no_gradient_into_teacher():
  s, t = random_logits(14, (4, 5))
  g = jgrad(lambda y: losses.dist_loss(s, y))(t)
  np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------------------
# DIST under data parallelism: pmap over the 8 simulated devices.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_pmap_all_gather_equals_global_batch(tau):
  n = jax.local_device_count()
  assert n == 8, "conftest.py should provide 8 simulated CPU devices"
  per, k = 2, 6
  s, t = random_logits(15, (n * per, k))
  kw = dict(beta=1.0, gamma=2.0, temperature=tau)
  expected = np_dist(s, t, 1.0, 2.0, tau)

  sharded = lambda x: x.reshape(n, per, k)
  f = lambda a, b: losses.dist_loss(a, b, axis_name="batch", **kw)
  values = jax.pmap(f, axis_name="batch")(sharded(s), sharded(t))
  assert_rel_close(values, np.full((n,), expected))
  # Without axis_name each device would only see its own 2 examples.
  local = jax.pmap(lambda a, b: losses.dist_loss(a, b, **kw))(sharded(s),
                                                              sharded(t))
  assert not np.allclose(local, expected, rtol=1e-3)

  # Gradient w.r.t. the local logits: N x the global-gradient slice (the
  # N replicas' identical cotangents are summed by all_gather's transpose).
  global_grad = jgrad(lambda a: losses.dist_loss(a, t, **kw))(s)
  local_grads = jax.pmap(jgrad(f), axis_name="batch")(sharded(s),
                                                         sharded(t))
  np.testing.assert_allclose(local_grads.reshape(n * per, k), n * global_grad,
                             rtol=1e-4, atol=1e-7)


def test_dist_pmap_pmean_of_param_grads_equals_single_device_grads():
  n = jax.local_device_count()
  per, d, k = 2, 3, 5
  rng = np.random.default_rng(16)
  x = rng.standard_normal((n * per, d)).astype(np.float32)
  w = rng.standard_normal((d, k)).astype(np.float32)
  t = rng.standard_normal((n * per, k)).astype(np.float32)

  def global_loss(w):
    return losses.dist_loss(x @ w, t, temperature=2.0)

  def step(w, xb, tb):
    loss, g = jax.value_and_grad(lambda w: losses.dist_loss(
        xb @ w, tb, temperature=2.0, axis_name="dp"))(w)
    return loss, jax.lax.pmean(g, "dp")

  loss, g = jax.pmap(step, axis_name="dp", in_axes=(None, 0, 0))(
      w, x.reshape(n, per, d), t.reshape(n, per, k))
  g_ref = jgrad(global_loss)(w)
  np.testing.assert_allclose(loss, np.full((n,), global_loss(w)), rtol=1e-5)
  for i in range(n):
    np.testing.assert_allclose(g[i], g_ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kd", "kd_std", "dkd", "dkd_std"])
def test_zero_when_student_equals_teacher(name):
  fn, kw = PER_EXAMPLE[name]
  s, _ = random_logits(17, (5, 8))
  labels = random_labels(17, (5,), 8)
  out = jcall(fn, s, s, labels, **kw)
  np.testing.assert_allclose(out, 0.0, atol=1e-6)
  g = jgrad(lambda x: jnp.sum(fn(x, s, labels, **kw)))(s)
  np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_dist_zero_when_student_equals_teacher():
  # Not exactly 0: rho = |a|^2 / (|a|^2 + 1e-8) and |a|^2 of centred
  # probabilities is small at tau=4; the reference has the same offset.
  s, _ = random_logits(18, (6, 5))
  got = jcall(losses.dist_loss, s, s, temperature=4.0)
  assert 0.0 <= float(got) < 1e-4
  assert_close_to_reference(got, lambda dt: np_dist(s, s, 1.0, 1.0, 4.0,
                                                    dtype=dt), rtol=1e-3)


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_shift_invariance(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(19, (4, 9))
  labels = random_labels(19, (4,), 9)
  cs = np.random.default_rng(0).uniform(-5, 5, (4, 1)).astype(np.float32)
  ct = np.random.default_rng(1).uniform(-5, 5, (4, 1)).astype(np.float32)
  np.testing.assert_allclose(jcall(fn, s + cs, t + ct, labels, **kw),
                             jcall(fn, s, t, labels, **kw), rtol=1e-4, atol=1e-5)


def test_dist_shift_invariance():
  s, t = random_logits(19, (4, 9))
  c = np.random.default_rng(0).uniform(-5, 5, (4, 1)).astype(np.float32)
  np.testing.assert_allclose(jcall(losses.dist_loss, s + c, t - c),
                             jcall(losses.dist_loss, s, t), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_where_masks_rows_even_with_nan_inf(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(20, (6, 5))
  labels = random_labels(20, (6,), 5)
  where = np.array([True, False, True, True, False, True])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[1] = np.nan
  t_bad[1, 2] = np.inf
  s_bad[4, 0] = np.inf
  t_bad[4] = -np.inf
  out = jcall(fn, s_bad, t_bad, labels, where=where, **kw)
  full = jcall(fn, s, t, labels, **kw)
  np.testing.assert_array_equal(out[~where], 0.0)
  np.testing.assert_allclose(out[where], full[where], rtol=1e-6)
  g = jgrad(lambda x: jnp.sum(fn(x, t_bad, labels, where=where, **kw)))(
      s_bad)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(g[~where], 0.0)
  g_full = jgrad(lambda x: jnp.sum(fn(x, t, labels, **kw)))(s)
  np.testing.assert_allclose(g[where], g_full[where], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,dtype", [
    ("kd", jnp.bfloat16), ("kd_std", jnp.float16), ("dkd", jnp.float16),
    ("dkd_std", jnp.bfloat16), ("ofa", jnp.bfloat16), ("ofa", jnp.float16)])
def test_low_precision_inputs_computed_in_float32(name, dtype):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(21, (4, 7))
  labels = random_labels(21, (4,), 7)
  s_lp, t_lp = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
  out = jcall(fn, s_lp, t_lp, labels, **kw)
  assert out.dtype == jnp.float32
  # The computation sees the exactly representable upcast inputs.
  s_up = np.asarray(s_lp.astype(jnp.float32))
  t_up = np.asarray(t_lp.astype(jnp.float32))
  np.testing.assert_allclose(out, jcall(fn, s_up, t_up, labels, **kw), rtol=1e-6)
  g = jgrad(lambda x: jnp.sum(fn(x, t_lp, labels, **kw)))(s_lp)
  assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_dist_low_precision_inputs():
  s, t = random_logits(21, (4, 7))
  s_lp, t_lp = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out = jcall(losses.dist_loss, s_lp, t_lp)
  assert out.dtype == jnp.float32
  assert_rel_close(out, np_dist(np.asarray(s_lp, np.float32),
                                np.asarray(t_lp, np.float32), 1.0, 1.0, 1.0))


def _huge_logits(seed, shape):
  rng = np.random.default_rng(seed)
  s = rng.choice([-1e4, 0.0, 1e4], size=shape).astype(np.float32)
  t = rng.choice([-1e4, 0.0, 1e4], size=shape).astype(np.float32)
  s[0] = t[0]  # includes a row where the loss is exactly 0
  return s, t


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_huge_logits_finite_value_and_grad(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = _huge_logits(22, (6, 5))
  labels = random_labels(22, (6,), 5)
  out = jcall(fn, s, t, labels, **kw)
  g = jgrad(lambda x: jnp.sum(fn(x, t, labels, **kw)))(s)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(g)), (out, g)


def test_huge_logits_match_log_space_reference():
  # Where the float64 log-space reference is finite, the values agree too.
  s, t = _huge_logits(23, (6, 5))
  labels = random_labels(23, (6,), 5)
  assert_rel_close(jcall(losses.kd_loss, s, t, temperature=4.0), np_kd(s, t, 4.0),
                   atol=1e-3)
  log_q = np_log_softmax(s.astype(np.float64))
  p = np_softmax(t.astype(np.float64))
  y = np.eye(5)[labels]
  ofa_ref = (-((p + y)**1.5 - y) * log_q).sum(-1)
  assert_rel_close(jcall(losses.ofa_loss, s, t, labels, eps=1.5), ofa_ref, atol=1e-3)


def test_dist_huge_logits_finite():
  s, t = _huge_logits(24, (6, 5))
  val, g = jax.jit(jax.value_and_grad(losses.dist_loss))(s, t)
  assert np.isfinite(val) and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_vmap_over_extra_axis(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(25, (3, 4, 6))
  labels = random_labels(25, (3, 4), 6)
  out = jax.jit(jax.vmap(lambda a, b, c: fn(a, b, c, **kw)))(s, t, labels)
  single = jax.jit(functools.partial(fn, **kw))
  expected = np.stack([single(s[i], t[i], labels[i]) for i in range(3)])
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_dist_vmap_over_extra_axis():
  s, t = random_logits(25, (3, 4, 6))
  out = jax.jit(jax.vmap(losses.dist_loss))(s, t)
  expected = [np_dist(s[i], t[i], 1.0, 1.0, 1.0) for i in range(3)]
  assert_rel_close(out, expected)


@pytest.mark.parametrize("name", ["kd", "dkd", "ofa"])
def test_token_shaped_inputs_with_mask(name):
  fn, kw = PER_EXAMPLE[name]
  b, seq, v = 2, 5, 11
  s, t = random_logits(26, (b, seq, v))
  labels = random_labels(26, (b, seq), v)
  mask = np.arange(seq)[None, :] < np.array([[3], [5]])
  out = jcall(fn, s, t, labels, where=mask, **kw)
  assert out.shape == (b, seq)
  # Padding tokens may carry an ignore index (HF's -100) in their labels.
  ignore = np.where(mask, labels, -100)
  np.testing.assert_allclose(jcall(fn, s, t, ignore, where=mask, **kw), out,
                             rtol=1e-6)
  g = jgrad(lambda x: jnp.sum(fn(x, t, ignore, where=mask, **kw)))(s)
  assert np.all(np.isfinite(g)) and np.all(g[~mask] == 0)
  flat = jcall(fn, s.reshape(-1, v), t.reshape(-1, v), labels.reshape(-1), **kw)
  expected = np.where(mask, np.asarray(flat).reshape(b, seq), 0.0)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  # Token-mean as users reduce it.
  if name == "kd":
    ref = np_kd(s, t, 4.0)
    assert_rel_close(jnp.sum(out) / mask.sum(), (ref * mask).sum() / mask.sum())


class VariantsTest(chex.TestCase):
  """Identical results with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sorted(PER_EXAMPLE))
  def test_per_example(self, name):
    fn, kw = PER_EXAMPLE[name]
    s, t = random_logits(27, (4, 6))
    labels = random_labels(27, (4,), 6)
    f = self.variant(functools.partial(fn, **kw))
    out = f(s, t, labels)
    chex.assert_shape(out, (4,))
    chex.assert_trees_all_close(out, np.asarray(jcall(fn, s, t, labels, **kw)),
                                rtol=1e-5, atol=1e-6)
    ref = {"kd": lambda: np_kd(s, t, **kw),
           "kd_std": lambda: np_kd(s, t, **kw),
           "dkd": lambda: np_dkd(s, t, labels, **kw),
           "dkd_std": lambda: np_dkd(s, t, labels, **kw),
           "ofa": lambda: np_ofa(s, t, labels, **kw)}[name]()
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dist(self):
    s, t = random_logits(28, (5, 6))
    f = self.variant(functools.partial(losses.dist_loss, temperature=4.0))
    np.testing.assert_allclose(f(s, t), np_dist(s, t, 1.0, 1.0, 4.0),
                               rtol=RTOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_standardize(self):
    z, _ = random_logits(29, (3, 6))
    f = self.variant(losses.standardize_logits)
    np.testing.assert_allclose(f(z), np_standardize(z.astype(np.float64)),
                               rtol=RTOL, atol=1e-6)


# ---------------------------------------------------------------------------
# Bad inputs: errors name the argument.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_bad_inputs_common(name):
  fn, kw = PER_EXAMPLE[name]
  s, t = random_logits(30, (4, 6))
  labels = random_labels(30, (4,), 6)
  with pytest.raises(ValueError, match="`student_logits` and `teacher_logits`"
                     " must have the same shape"):
    fn(s, t[:, :5], labels, **kw)
  with pytest.raises(TypeError, match="`student_logits` must have a floating"):
    fn(s.astype(np.int32), t, labels, **kw)
  with pytest.raises(TypeError, match="`teacher_logits` must have a floating"):
    fn(s, t.astype(np.int32), labels, **kw)
  with pytest.raises(ValueError, match="`temperature` must be > 0; got 0"):
    fn(s, t, labels, **{**kw, "temperature": 0.0})
  with pytest.raises(ValueError, match="`temperature` must be > 0; got -1"):
    fn(s, t, labels, **{**kw, "temperature": -1.0})
  with pytest.raises(ValueError, match=r"`where` must have shape \(4,\)"):
    fn(s, t, labels, where=np.ones((4, 6), bool), **kw)
  with pytest.raises(TypeError, match="`where` must be a boolean mask"):
    fn(s, t, labels, where=np.ones((4,), np.float32), **kw)
  with pytest.raises(ValueError, match="`student_logits` must have at least 1"):
    fn(np.float32(1.0), np.float32(1.0), labels, **kw)


@pytest.mark.parametrize("fn", [losses.dkd_loss, losses.ofa_loss])
def test_bad_labels(fn):
  s, t = random_logits(31, (4, 6))
  with pytest.raises(TypeError, match="`labels` must hold integer"):
    fn(s, t, np.zeros((4,), np.float32))
  with pytest.raises(ValueError, match=r"`labels` must have shape \(4,\)"):
    fn(s, t, np.zeros((4, 1), np.int32))
  with pytest.raises(ValueError, match=r"`labels` must be class indices in "
                     r"\[0, 6\)"):
    fn(s, t, np.array([0, 1, 6, 2]))
  with pytest.raises(ValueError, match=r"`labels` must be class indices"):
    fn(s, t, np.array([0, -1, 3, 2]))
  with pytest.raises(ValueError, match=r"`labels` must be class indices"):
    fn(s, t, np.array([0, -100, 3, 2]), where=np.array([1, 1, 0, 1], bool))


def test_ignore_index_allowed_in_masked_rows():
  s, t = random_logits(35, (4, 6))
  where = np.array([True, False, True, True])
  labels = np.array([0, -100, 3, 2])
  out = losses.ofa_loss(s, t, labels, where=where)  # eager: concrete check
  assert np.all(np.isfinite(out)) and out[1] == 0


def test_bad_hyperparameters():
  s, t = random_logits(32, (4, 6))
  labels = random_labels(32, (4,), 6)
  with pytest.raises(ValueError, match="`student_logits` must have at least 2"
                     " classes"):
    losses.dkd_loss(s[:, :1], t[:, :1], labels * 0)
  with pytest.raises(ValueError, match="`alpha` must be >= 0"):
    losses.dkd_loss(s, t, labels, alpha=-1.0)
  with pytest.raises(ValueError, match="`beta` must be >= 0"):
    losses.dkd_loss(s, t, labels, beta=-0.5)
  with pytest.raises(ValueError, match="`eps` must be > 0"):
    losses.ofa_loss(s, t, labels, eps=0.0)
  with pytest.raises(ValueError, match=r"`student_logits` must have rank 2 "
                     r"\(\[batch, num_classes\]\)"):
    losses.dist_loss(s[None], t[None])
  with pytest.raises(ValueError, match="`temperature` must be > 0"):
    losses.dist_loss(s, t, temperature=0)
  with pytest.raises(ValueError, match="`gamma` must be >= 0"):
    losses.dist_loss(s, t, gamma=-1.0)
  with pytest.raises(ValueError, match="`logits` needs at least 2 entries"):
    losses.standardize_logits(s[:, :1])
  with pytest.raises(TypeError, match="`logits` must have a floating"):
    losses.standardize_logits(labels)
  with pytest.raises(ValueError, match="`axis` must be in"):
    losses.standardize_logits(s, axis=2)


def test_validation_happens_at_trace_time():
  s, t = random_logits(33, (4, 6))
  with pytest.raises(ValueError, match="`temperature` must be > 0"):
    jax.jit(lambda a, b: losses.kd_loss(a, b, temperature=-2.0))(s, t)
  with pytest.raises(ValueError, match="`labels` must have shape"):
    jax.jit(losses.dkd_loss)(s, t, jnp.zeros((3,), jnp.int32))
