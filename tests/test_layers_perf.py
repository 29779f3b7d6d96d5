"""Fast layer formulations vs float64 NumPy and the Flax/XLA originals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import layers as L


def _np_max_pool(x, k):
  """float64 NumPy k x k / stride k VALID max pool and its argmax one-hots."""
  *lead, h, w, c = x.shape
  ho, wo = h // k, w // k
  win = x[..., :ho * k, :wo * k, :].reshape(tuple(lead) + (ho, k, wo, k, c))
  win = np.moveaxis(win, -4, -3).reshape(tuple(lead) + (ho, wo, k * k, c))
  y = win.max(axis=-2)
  onehot = (win == y[..., None, :]).astype(np.float64)
  return y, onehot


def _np_max_pool_grad(x, k, g):
  """d sum(g * pool(x)) / dx for windows with a unique max (float64)."""
  *lead, h, w, c = x.shape
  ho, wo = h // k, w // k
  _, onehot = _np_max_pool(x, k)
  dwin = onehot * g[..., None, :]                     # [..., ho, wo, k*k, c]
  dwin = dwin.reshape(tuple(lead) + (ho, wo, k, k, c))
  dwin = np.moveaxis(dwin, -3, -4).reshape(tuple(lead) + (ho * k, wo * k, c))
  dx = np.zeros_like(x)
  dx[..., :ho * k, :wo * k, :] = dwin
  return dx


@pytest.mark.parametrize("shape,k", [
    ((2, 28, 28, 3), 2), ((3, 7, 9, 4), 2), ((2, 9, 12, 5), 3),
    ((4, 6, 5, 2), 1), ((2, 3, 8, 8, 3), 2)])
def test_max_pool_nonoverlapping_matches_numpy_and_flax(shape, k):
  rng = np.random.default_rng(sum(shape) + k)
  # A random permutation: every window's maximum is unique.
  x64 = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)
  x64 = x64 / x64.size - 0.5
  g64 = rng.standard_normal(_np_max_pool(x64, k)[0].shape)
  x, g = jnp.asarray(x64, jnp.float32), jnp.asarray(g64, jnp.float32)

  y = L.max_pool_nonoverlapping(x, k)
  y_flax = nn.max_pool(x, (k, k), strides=(k, k), padding="VALID")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_flax))
  np.testing.assert_allclose(np.asarray(y), _np_max_pool(x64, k)[0],
                             rtol=1e-6)

  grad = lambda f: jax.grad(lambda v: jnp.sum(f(v) * g))(x)
  dx = grad(lambda v: L.max_pool_nonoverlapping(v, k))
  dx_flax = grad(lambda v: nn.max_pool(v, (k, k), strides=(k, k)))
  np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_flax))
  np.testing.assert_allclose(np.asarray(dx), _np_max_pool_grad(x64, k, g64),
                             rtol=1e-6, atol=1e-7)


def test_max_pool_nonoverlapping_bfloat16_and_jit():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), jnp.bfloat16)
  y = jax.jit(L.max_pool_nonoverlapping, static_argnums=1)(x, 2)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 4, 4, 4)
  np.testing.assert_array_equal(
      np.asarray(y, np.float32),
      np.asarray(nn.max_pool(x, (2, 2), strides=(2, 2)), np.float32))


@pytest.mark.parametrize("shape,k", [((2, 1, 8, 3), 2), ((8, 3), 2),
                                     ((2, 8, 8, 3), 0)])
def test_max_pool_nonoverlapping_rejects_bad_input(shape, k):
  with pytest.raises(ValueError, match="max_pool_nonoverlapping"):
    L.max_pool_nonoverlapping(jnp.zeros(shape), k)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fusion_boundary_is_the_identity_with_identity_gradient(dtype):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  x[0, 0, 0, 0] = np.nan            # the predicate is False: same values
  x[0, 0, 0, 1] = np.inf
  xj = jnp.asarray(x, dtype)
  y = jax.jit(L.fusion_boundary)(xj)
  assert y.dtype == xj.dtype and y.shape == xj.shape
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(xj, np.float32))
  g = jnp.asarray(rng.standard_normal(x.shape), dtype)
  _, vjp = jax.vjp(L.fusion_boundary, xj)
  np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32),
                                np.asarray(g, np.float32))


def test_fusion_boundary_under_vmap_scan_and_in_the_compiled_program():
  x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 2, 5)),
                  jnp.float32)
  f = lambda v: jnp.sum(jnp.sin(L.fusion_boundary(jnp.cos(v))) ** 2)
  ref = lambda v: jnp.sum(jnp.sin(jnp.cos(v)) ** 2)
  np.testing.assert_allclose(jax.vmap(jax.grad(f))(x),
                             jax.vmap(jax.grad(ref))(x), rtol=1e-6)
  scanned = lambda v: jax.lax.scan(lambda c, r: (c + f(r), None), 0.0, v)[0]
  np.testing.assert_allclose(jax.jit(scanned)(x), ref(x), rtol=1e-6)
  text = jax.jit(jax.grad(f)).lower(x).compile().as_text()
  assert (" conditional(" in text) == (jax.default_backend() == "cpu")
