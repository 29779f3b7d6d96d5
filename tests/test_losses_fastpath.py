"""Tests of the losses' fast path (`kd_jax.losses._softmax`).

The fast path shifts each softmax row by its first entry and falls back (via
`lax.cond`) to the maximum-shift formulation when its results are not finite.
Small inputs skip it (`MIN_FAST_SIZE`), so most tests set that threshold to
0 to exercise the fast path at tiny shapes. Values are compared with the
float64 NumPy transcriptions of the other loss tests, gradients with float64
central finite differences of those transcriptions (independent of kd_jax).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.losses import _softmax
from kd_jax.losses import logits as logits_module

from loss_testing import assert_close_to_reference, jcall, jgrad
from test_losses_divergences import (np_forward_kl, np_generalized_jsd,
                                     np_reverse_kl, np_total_variation)
from test_losses_logits import np_dkd, np_kd, np_ofa

T = 1.5
CASES = {
    "forward_kl": (functools.partial(losses.forward_kl, temperature=T),
                   functools.partial(np_forward_kl, temperature=T)),
    "reverse_kl": (functools.partial(losses.reverse_kl, temperature=T),
                   functools.partial(np_reverse_kl, temperature=T)),
    "kd": (functools.partial(losses.kd_loss, temperature=T),
           functools.partial(np_kd, temperature=T)),
    "tv": (functools.partial(losses.total_variation, temperature=T),
           functools.partial(np_total_variation, temperature=T)),
    "jsd": (functools.partial(losses.js_divergence, beta=0.5, temperature=T),
            functools.partial(np_generalized_jsd, beta=0.5, temperature=T)),
    "jsd_0.1": (functools.partial(losses.js_divergence, beta=0.1,
                                  temperature=T),
                functools.partial(np_generalized_jsd, beta=0.1,
                                  temperature=T)),
}


@pytest.fixture
def fast_everywhere(monkeypatch):
  monkeypatch.setattr(_softmax, "MIN_FAST_SIZE", 0)


def _inputs(kind, seed=0, shape=(5, 13)):
  rng = np.random.default_rng(seed)
  s = (3.0 * rng.standard_normal(shape)).astype(np.float32)
  t = (3.0 * rng.standard_normal(shape)).astype(np.float32)
  if kind == "far_first_entry":
    # The shift (first entry) is ~80 / T below the row maximum: the fast
    # path still applies, with large exp(x - c).
    s[:, 0] = s.max(-1) - 80.0 * T
    t[:, 0] = t.max(-1) - 75.0 * T
  elif kind == "overflow_row":
    # One row whose spread overflows exp(x - c): the whole batch falls back.
    s[2, 0] = -300.0
    t[3, 0] = -250.0
  return s, t


def _fd_grad_np(ref, s, t, h=1e-5):
  """Central differences of the float64 NumPy loss sum w.r.t. `s`."""
  s64 = s.astype(np.float64)
  g = np.zeros_like(s64)
  for idx in np.ndindex(s.shape):
    e = np.zeros_like(s64)
    e[idx] = h
    g[idx] = (ref(s64 + e, t).sum() - ref(s64 - e, t).sum()) / (2 * h)
  return g


@pytest.mark.parametrize("kind", ["random", "far_first_entry",
                                  "overflow_row"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_grads_match_float64(fast_everywhere, name, kind):
  fn, ref = CASES[name]
  s, t = _inputs(kind)
  got = jcall(fn, s, t)
  assert_close_to_reference(got, lambda dt: ref(s, t, dtype=dt))
  g = jgrad(lambda x: jnp.sum(fn(x, t)))(s)
  np.testing.assert_allclose(g, _fd_grad_np(ref, s, t), rtol=2e-4,
                             atol=2e-6)


def test_fast_or_exact_picks_the_branch():
  x = jnp.ones((3, 4))
  fast_ok = lambda a: (jnp.sum(a, -1), a[..., :1])
  fast_bad = lambda a: (jnp.sum(a, -1) * jnp.inf, a[..., :1])
  exact = lambda a: (jnp.full((3,), -1.0), jnp.zeros((3, 1)))
  old = _softmax.MIN_FAST_SIZE
  try:
    _softmax.MIN_FAST_SIZE = 0
    ok = jax.jit(lambda a: _softmax.fast_or_exact(fast_ok, exact, a))(x)
    bad = jax.jit(lambda a: _softmax.fast_or_exact(fast_bad, exact, a))(x)
    _softmax.MIN_FAST_SIZE = 100
    small = jax.jit(lambda a: _softmax.fast_or_exact(fast_ok, exact, a))(x)
  finally:
    _softmax.MIN_FAST_SIZE = old
  np.testing.assert_array_equal(ok[0], [4.0, 4.0, 4.0])
  np.testing.assert_array_equal(bad[0], [-1.0, -1.0, -1.0])
  np.testing.assert_array_equal(small[0], [-1.0, -1.0, -1.0])


@pytest.mark.parametrize("name", ["kd", "tv", "jsd"])
def test_default_threshold_large_input_uses_fast_path(name):
  # 4 x 16384 = MIN_FAST_SIZE entries: the default configuration's fast path.
  fn, ref = CASES[name]
  s, t = _inputs("random", seed=3, shape=(4, 16384))
  assert s.size >= _softmax.MIN_FAST_SIZE
  got = jcall(fn, s, t)
  assert_close_to_reference(got, lambda dt: ref(s, t, dtype=dt))


@pytest.mark.parametrize("name", sorted(CASES))
def test_where_and_vmap_on_fast_path(fast_everywhere, name):
  fn, ref = CASES[name]
  s, t = _inputs("random", seed=4, shape=(2, 4, 9))
  where = np.array([[True, False, True, True], [False, True, True, False]])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where] = np.nan
  t_bad[~where] = np.inf
  out = jcall(functools.partial(fn, where=where), s_bad, t_bad)
  assert_close_to_reference(
      out, lambda dt: np.where(where, ref(s, t, dtype=dt), 0.0).astype(dt))
  g = jgrad(lambda x: jnp.sum(fn(x, t_bad, where=where)))(s_bad)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~where] == 0)
  # vmap turns the cond into a select (both paths run): same values.
  out_v = jax.jit(jax.vmap(fn))(s, t)
  np.testing.assert_allclose(out_v, ref(s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kd", "tv", "jsd"])
def test_bfloat16_on_fast_path(fast_everywhere, name):
  fn, ref = CASES[name]
  s, t = _inputs("random", seed=5)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = jcall(fn, s16, t16)
  assert got.dtype == jnp.float32
  # bf16 inputs are computed in float32: compare with the rounded inputs.
  s_r = np.asarray(s16, np.float32)
  t_r = np.asarray(t16, np.float32)
  assert_close_to_reference(got, lambda dt: ref(s_r, t_r, dtype=dt))
  g = jgrad(lambda x: jnp.sum(fn(x, t16)))(s16)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_huge_logits_fall_back(fast_everywhere, name):
  fn, ref = CASES[name]
  rng = np.random.default_rng(6)
  s = rng.choice([-1e4, 0.0, 1e4], size=(6, 5)).astype(np.float32)
  t = rng.choice([-1e4, 0.0, 1e4], size=(6, 5)).astype(np.float32)
  out = jcall(fn, s, t)
  g = jgrad(lambda x: jnp.sum(fn(x, t)))(s)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))
  np.testing.assert_allclose(out, ref(s, t), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("eps", [1.0, 1.5])
@pytest.mark.parametrize("kind", ["random", "far_first_entry",
                                  "overflow_row"])
def test_ofa_values_and_grads_match_float64(fast_everywhere, kind, eps):
  s, t = _inputs(kind, seed=7)
  labels = np.array([0, 3, 12, 5, 0], np.int32)
  fn = functools.partial(losses.ofa_loss, labels=labels, eps=eps,
                         temperature=T)
  ref = lambda a, b, dtype=np.float64: np_ofa(a, b, labels, eps, T,
                                               dtype=dtype)
  got = jcall(fn, s, t)
  assert_close_to_reference(got, lambda dt: ref(s, t, dtype=dt))
  g = jgrad(lambda x: jnp.sum(fn(x, t)))(s)
  np.testing.assert_allclose(g, _fd_grad_np(ref, s, t), rtol=2e-4,
                             atol=2e-6)


@pytest.mark.parametrize("kind", ["random", "far_first_entry",
                                  "overflow_row"])
def test_dkd_values_and_grads_match_float64(fast_everywhere, kind):
  s, t = _inputs(kind, seed=8)
  labels = np.array([0, 3, 12, 5, 0], np.int32)
  kw = dict(alpha=1.0, beta=8.0, temperature=T)
  fn = functools.partial(losses.dkd_loss, labels=labels, **kw)
  ref = lambda a, b, dtype=np.float64: np_dkd(a, b, labels, dtype=dtype, **kw)
  got = jcall(fn, s, t)
  assert_close_to_reference(got, lambda dt: ref(s, t, dtype=dt),
                            scale=T * T * 9.0)
  g = jgrad(lambda x: jnp.sum(fn(x, t)))(s)
  np.testing.assert_allclose(g, _fd_grad_np(ref, s, t), rtol=2e-4,
                             atol=2e-5)


def test_dkd_not_target_mask_is_exact():
  x = jnp.zeros((3, 7))
  labels = jnp.array([0, 6, 3])
  mask = jax.jit(lambda x, y: logits_module._not_target(x, y, x[:, :1]))(
      x, labels)
  np.testing.assert_array_equal(mask, 1.0 - np.eye(7)[np.asarray(labels)])
