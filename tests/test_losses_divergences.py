"""Tests for kd_jax.losses.divergences: forward_kl, reverse_kl, js_divergence,
total_variation.

Values are compared with independent float64 NumPy transcriptions (TRL's
`generalized_jsd_loss` for the JSD), gradients with float64 central finite
differences.
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
# NumPy references (run in float64 = ground truth; in float32 = the rounding
# floor any float32 implementation of the formula has).
# ---------------------------------------------------------------------------


def np_log_softmax(x):
  x = x - np.max(x, axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def np_kl_div_log_target(log_input, log_target):
  """torch F.kl_div(log_input, log_target, log_target=True, 'none')."""
  return np.exp(log_target) * (log_target - log_input)


def np_forward_kl(s, t, temperature, dtype=np.float64):
  s, t = np.asarray(s, dtype), np.asarray(t, dtype)
  log_q = np_log_softmax(s / dtype(temperature))
  log_p = np_log_softmax(t / dtype(temperature))
  return np_kl_div_log_target(log_q, log_p).sum(-1)


def np_reverse_kl(s, t, temperature, dtype=np.float64):
  s, t = np.asarray(s, dtype), np.asarray(t, dtype)
  log_q = np_log_softmax(s / dtype(temperature))
  log_p = np_log_softmax(t / dtype(temperature))
  return np_kl_div_log_target(log_p, log_q).sum(-1)


def np_generalized_jsd(s, t, beta, temperature, dtype=np.float64):
  """TRL GKDTrainer.generalized_jsd_loss with reduction='none', summed over V."""
  s, t = np.asarray(s, dtype), np.asarray(t, dtype)
  student_log_probs = np_log_softmax(s / dtype(temperature))
  teacher_log_probs = np_log_softmax(t / dtype(temperature))
  if beta == 0:
    jsd = np_kl_div_log_target(student_log_probs, teacher_log_probs)
  elif beta == 1:
    jsd = np_kl_div_log_target(teacher_log_probs, student_log_probs)
  else:
    beta = dtype(beta)
    stacked = np.stack([student_log_probs + np.log(1 - beta),
                        teacher_log_probs + np.log(beta)])
    mixture_log_probs = np.logaddexp(stacked[0], stacked[1])
    kl_teacher = np_kl_div_log_target(mixture_log_probs, teacher_log_probs)
    kl_student = np_kl_div_log_target(mixture_log_probs, student_log_probs)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
  return jsd.sum(-1)


def np_total_variation(s, t, temperature, dtype=np.float64):
  s, t = np.asarray(s, dtype), np.asarray(t, dtype)
  q = np.exp(np_log_softmax(s / dtype(temperature)))
  p = np.exp(np_log_softmax(t / dtype(temperature)))
  return dtype(0.5) * np.abs(p - q).sum(-1)


FUNCS = {
    "forward_kl": (losses.forward_kl, {}, np_forward_kl),
    "reverse_kl": (losses.reverse_kl, {}, np_reverse_kl),
    "jsd": (losses.js_divergence, {"beta": 0.5},
            functools.partial(np_generalized_jsd, beta=0.5)),
    "jsd_0.1": (losses.js_divergence, {"beta": 0.1},
                functools.partial(np_generalized_jsd, beta=0.1)),
    "tv": (losses.total_variation, {}, np_total_variation),
}


# ---------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCS))
@pytest.mark.parametrize("shape,temperature", [((7, 10), 1.0), ((2, 3, 9), 2.0),
                                               ((16, 100), 0.5), ((6,), 1.0)])
def test_matches_reference(name, shape, temperature):
  fn, kw, ref = FUNCS[name]
  s, t = random_logits(0, shape)
  got = jcall(fn, s, t, temperature=temperature, **kw)
  assert got.dtype == jnp.float32 and got.shape == shape[:-1]
  assert_close_to_reference(
      got, lambda dt: ref(s, t, temperature=temperature, dtype=dt))


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.9, 1.0])
def test_jsd_beta_grid_matches_trl(beta):
  s, t = random_logits(1, (5, 12))
  got = jcall(losses.js_divergence, s, t, beta=beta, temperature=2.0)
  assert_close_to_reference(
      got, lambda dt: np_generalized_jsd(s, t, beta, 2.0, dtype=dt))


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
  s, t = random_logits(2, (4, 8))
  fkl = jcall(losses.forward_kl, s, t, temperature=2.0)
  rkl = jcall(losses.reverse_kl, s, t, temperature=2.0)
  np.testing.assert_array_equal(
      jcall(losses.js_divergence, s, t, beta=0.0, temperature=2.0), fkl)
  np.testing.assert_array_equal(
      jcall(losses.js_divergence, s, t, beta=1, temperature=2.0), rkl)
  # Traced beta: same endpoint behaviour.
  f = jax.jit(lambda b: losses.js_divergence(s, t, beta=b, temperature=2.0))
  np.testing.assert_allclose(f(0.0), fkl, rtol=1e-6)
  np.testing.assert_allclose(f(1.0), rkl, rtol=1e-6)
  np.testing.assert_allclose(
      f(0.3), jcall(losses.js_divergence, s, t, beta=0.3, temperature=2.0),
      rtol=1e-6)
  # The mixture formula tends to 0 at the ends: the documented discontinuity.
  near0 = jcall(losses.js_divergence, s, t, beta=1e-4, temperature=2.0)
  assert np.all(near0 < 1e-2 * fkl)


def test_symmetric_jsd_bounds():
  s, t = random_logits(3, (6, 10))
  jsd = jcall(losses.js_divergence, s, t)
  assert np.all(jsd >= 0) and np.all(jsd <= np.log(2) + 1e-6)
  # symmetric at beta = 0.5
  np.testing.assert_allclose(jsd, jcall(losses.js_divergence, t, s), rtol=1e-5)
  # disjoint supports give ln 2
  far = jnp.array([[30.0, -30.0]])
  np.testing.assert_allclose(jcall(losses.js_divergence, far, -far), [np.log(2)],
                             rtol=1e-6)


def test_kd_loss_is_t2_times_forward_kl():
  s, t = random_logits(4, (5, 9))
  np.testing.assert_allclose(
      jcall(losses.kd_loss, s, t, temperature=3.0),
      9.0 * jcall(losses.forward_kl, s, t, temperature=3.0), rtol=1e-6)


def test_tv_bounds_and_closed_form():
  s = jnp.log(jnp.array([[0.2, 0.3, 0.5]]))
  t = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  np.testing.assert_allclose(jcall(losses.total_variation, s, t), [0.3], rtol=1e-6)
  s, t = random_logits(5, (6, 10))
  tv = jcall(losses.total_variation, s, t)
  assert np.all(tv >= 0) and np.all(tv <= 1)


# ---------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------


def _fd_grad(f, x, h=1e-6):
  n = x.size
  eye = np.eye(n).reshape((n,) + x.shape)
  xs = np.concatenate([x[None] + h * eye, x[None] - h * eye])
  vals = np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(xs)))
  return ((vals[:n] - vals[n:]) / (2 * h)).reshape(x.shape)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("name,extra", [
    ("forward_kl", {}), ("reverse_kl", {}), ("jsd", {}), ("jsd_0.1", {}),
    ("tv", {}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0})])
def test_grad_matches_finite_differences(x64, name, extra):
  fn, kw, _ = FUNCS[name]
  kw = {**kw, **extra}
  s, t = random_logits(6, (3, 5), scale=2.0)
  s, t = s.astype(np.float64), t.astype(np.float64)
  w = np.random.default_rng(7).standard_normal(3)

  def f(x):
    out = fn(x, jnp.asarray(t), temperature=1.5, **kw)
    assert out.dtype == jnp.float64
    return jnp.sum(w * out)

  g = jgrad(f)(jnp.asarray(s))
  np.testing.assert_allclose(g, _fd_grad(f, s), rtol=1e-6, atol=1e-8)


def test_grad_traced_beta_matches_finite_differences(x64):
  s, t = random_logits(8, (3, 5), scale=2.0)
  s, t = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
  f = lambda b: jnp.sum(losses.js_divergence(s, t, beta=b))
  h = 1e-6
  np.testing.assert_allclose(jgrad(f)(jnp.float64(0.4)),
                             (f(0.4 + h) - f(0.4 - h)) / (2 * h), rtol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_custom_kl_gradient_matches_plain_autodiff(direction):
  s, t = random_logits(9, (6, 11))
  w = np.random.default_rng(10).standard_normal(6).astype(np.float32)

  def plain(x, y):
    log_q = jax.nn.log_softmax(x / 2.0)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(y) / 2.0)
    if direction == "forward":
      return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1)

  fn = losses.forward_kl if direction == "forward" else losses.reverse_kl
  g = jgrad(lambda x: jnp.sum(w * fn(x, t, temperature=2.0)))(s)
  g_plain = jgrad(lambda x: jnp.sum(w * plain(x, t)))(s)
  np.testing.assert_allclose(g, g_plain, rtol=1e-4, atol=1e-6)
  # forward mode agrees with reverse mode (custom JVP).
  d = np.random.default_rng(11).standard_normal(s.shape).astype(np.float32)
  _, tangent = jax.jvp(lambda x: jnp.sum(w * fn(x, t, temperature=2.0)),
                       (jnp.asarray(s),), (jnp.asarray(d),))
  np.testing.assert_allclose(tangent, jnp.sum(g * d), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_no_gradient_into_teacher(name):
  fn, kw, _ = FUNCS[name]
  s, t = random_logits(12, (3, 5))
  g = jgrad(lambda y: jnp.sum(fn(s, y, **kw)))(t)
  np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_zero_when_equal(name):
  fn, kw, _ = FUNCS[name]
  s, _ = random_logits(13, (5, 8))
  np.testing.assert_allclose(jcall(fn, s, s, temperature=2.0, **kw), 0.0, atol=1e-6)
  if name != "tv":  # TV has a kink, not a stationary point, at q = p.
    g = jgrad(lambda x: jnp.sum(fn(x, s, temperature=2.0, **kw)))(s)
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_shift_invariance(name):
  fn, kw, _ = FUNCS[name]
  s, t = random_logits(14, (4, 9))
  c = np.random.default_rng(0).uniform(-5, 5, (4, 1)).astype(np.float32)
  np.testing.assert_allclose(jcall(fn, s + c, t - c, **kw), jcall(fn, s, t, **kw),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_where_masks_rows_even_with_nan_inf(name):
  fn, kw, _ = FUNCS[name]
  s, t = random_logits(15, (6, 5))
  where = np.array([True, False, True, True, False, True])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[1] = np.nan
  t_bad[1, 2] = np.inf
  s_bad[4, 0] = np.inf
  t_bad[4] = -np.inf
  out = jcall(fn, s_bad, t_bad, where=where, **kw)
  np.testing.assert_array_equal(out[~where], 0.0)
  np.testing.assert_allclose(out[where], jcall(fn, s, t, **kw)[where], rtol=1e-6)
  g = jgrad(lambda x: jnp.sum(fn(x, t_bad, where=where, **kw)))(s_bad)
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(g[~where], 0.0)


@pytest.mark.parametrize("name,dtype", [
    ("forward_kl", jnp.bfloat16), ("reverse_kl", jnp.float16),
    ("jsd", jnp.bfloat16), ("jsd_0.1", jnp.float16), ("tv", jnp.bfloat16)])
def test_low_precision_inputs_computed_in_float32(name, dtype):
  fn, kw, _ = FUNCS[name]
  s, t = random_logits(16, (4, 7))
  s_lp, t_lp = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
  out = jcall(fn, s_lp, t_lp, **kw)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(
      out, jcall(fn, s_lp.astype(jnp.float32), t_lp.astype(jnp.float32), **kw),
      rtol=1e-6)
  g = jgrad(lambda x: jnp.sum(fn(x, t_lp, **kw)))(s_lp)
  assert g.dtype == dtype and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_huge_logits_finite_and_match_reference(name):
  fn, kw, ref = FUNCS[name]
  rng = np.random.default_rng(17)
  s = rng.choice([-1e4, 0.0, 1e4], size=(6, 5)).astype(np.float32)
  t = rng.choice([-1e4, 0.0, 1e4], size=(6, 5)).astype(np.float32)
  s[0] = t[0]
  out = jcall(fn, s, t, temperature=2.0, **kw)
  g = jgrad(lambda x: jnp.sum(fn(x, t, temperature=2.0, **kw)))(s)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(out, ref(s, t, temperature=2.0), rtol=1e-5,
                             atol=1e-3)


def test_kl_with_shared_minus_inf_logits_is_finite():
  # Vocabulary padding in LMs: both models give -inf to the same entries.
  s, t = random_logits(18, (3, 6))
  s[:, 4:] = -np.inf
  t[:, 4:] = -np.inf
  for fn in (losses.forward_kl, losses.reverse_kl, losses.kd_loss):
    out = jcall(fn, s, t)
    g = jgrad(lambda x: jnp.sum(fn(x, t)))(s)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
    np.testing.assert_allclose(out, jcall(fn, s[:, :4], t[:, :4]), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_vmap_over_extra_axis(name):
  fn, kw, _ = FUNCS[name]
  s, t = random_logits(19, (3, 4, 6))
  out = jax.jit(jax.vmap(lambda a, b: fn(a, b, **kw)))(s, t)
  single = jax.jit(functools.partial(fn, **kw))
  expected = np.stack([single(s[i], t[i]) for i in range(3)])
  np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_token_shaped_inputs_with_mask(name):
  fn, kw, ref = FUNCS[name]
  b, seq, v = 2, 6, 50
  s, t = random_logits(20, (b, seq, v))
  mask = np.arange(seq)[None, :] < np.array([[4], [6]])
  out = jcall(fn, s, t, where=mask, **kw)
  assert out.shape == (b, seq)
  expected = np.where(mask, ref(s, t, temperature=1.0), 0.0)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # Token-mean over the valid tokens, as TRL's batchmean with labels.
  np.testing.assert_allclose(jnp.sum(out) / mask.sum(),
                             expected.sum() / mask.sum(), rtol=1e-5)


class VariantsTest(chex.TestCase):
  """Identical results with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*sorted(FUNCS))
  def test_jit_and_eager(self, name):
    fn, kw, ref = FUNCS[name]
    s, t = random_logits(21, (4, 6))
    f = self.variant(functools.partial(fn, temperature=2.0, **kw))
    out = f(s, t)
    chex.assert_shape(out, (4,))
    np.testing.assert_allclose(out, ref(s, t, temperature=2.0), rtol=RTOL,
                               atol=1e-6)


# ---------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_bad_inputs(name):
  fn, kw, _ = FUNCS[name]
  s, t = random_logits(22, (4, 6))
  with pytest.raises(ValueError, match="`student_logits` and `teacher_logits`"
                     " must have the same shape"):
    fn(s, t[:3], **kw)
  with pytest.raises(TypeError, match="`student_logits` must have a floating"):
    fn(s.astype(np.int32), t, **kw)
  with pytest.raises(TypeError, match="`teacher_logits` must have a floating"):
    fn(s, t.astype(np.int32), **kw)
  with pytest.raises(ValueError, match="`temperature` must be > 0; got 0"):
    fn(s, t, temperature=0, **kw)
  with pytest.raises(ValueError, match=r"`where` must have shape \(4,\)"):
    fn(s, t, where=np.ones((3,), bool), **kw)
  with pytest.raises(TypeError, match="`where` must be a boolean mask"):
    fn(s, t, where=np.ones((4,), np.int32), **kw)


def test_jsd_bad_beta():
  s, t = random_logits(23, (4, 6))
  with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]; got 1.5"):
    losses.js_divergence(s, t, beta=1.5)
  with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]; got -0.1"):
    losses.js_divergence(s, t, beta=-0.1)


def test_abs_sign_derivative_is_sign_with_zero_at_ties():
  from kd_jax.losses import divergences  # pylint: disable=g-import-not-at-top
  x = jnp.array([-2.0, 0.0, 3.0, -0.0])
  np.testing.assert_array_equal(divergences.abs_sign_derivative(x),
                                [2.0, 0.0, 3.0, 0.0])
  g = jax.grad(lambda v: jnp.sum(divergences.abs_sign_derivative(v)))(x)
  np.testing.assert_array_equal(g, [-1.0, 0.0, 1.0, 0.0])  # jnp.abs: 1 at 0
  _, tangent = jax.jvp(divergences.abs_sign_derivative, (x,),
                       (jnp.array([5.0, 7.0, 11.0, 13.0]),))
  np.testing.assert_array_equal(tangent, [-5.0, 0.0, 11.0, 0.0])
