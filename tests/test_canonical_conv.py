"""Canonical-layout convolution gradients == nn.Conv / lax defaults."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import _canonical_conv as cc

# (input shape, kernel, stride, padding, groups): the zoo's convolutions
# (ResNet/WRN/VGG 3x3 s1/s2 p1, 1x1 s2 shortcuts, ImageNet 7x7 s2 p3 stem,
# the MNIST CNN's 5x5 SAME, ViT's p x p / stride p patches, depthwise).
CASES = [
    ((2, 8, 8, 3), 3, 1, 1, 1),
    ((2, 9, 8, 3), 3, 2, 1, 1),
    ((2, 8, 8, 4), 1, 2, 0, 1),
    ((2, 13, 12, 3), 7, 2, 3, 1),
    ((2, 12, 12, 1), 5, 1, "SAME", 1),
    ((2, 16, 16, 3), 4, 4, "VALID", 1),
    ((2, 8, 8, 4), 3, 1, 1, 4),   # depthwise: falls back to lax's gradient
    ((2, 8, 8, 4), 3, 2, 1, 2),   # grouped
]


def _conv_pair(features, k, stride, pad, groups, dtype=jnp.float32):
  padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
  kw = dict(features=features, kernel_size=(k, k), strides=(stride, stride),
            padding=padding, feature_group_count=groups, use_bias=True,
            dtype=dtype)
  return nn.Conv(**kw), nn.Conv(conv_general_dilated=cc.conv_general_dilated,
                                **kw)


def _params(rng, k, cin, cout, dtype=jnp.float32):
  # numpy draws: jax.random would compile threefry for every test.
  return {"params": {
      "kernel": jnp.asarray(rng.standard_normal((k, k, cin, cout)), dtype),
      "bias": jnp.asarray(rng.standard_normal((cout,)), dtype)}}


@pytest.mark.parametrize("shape,k,stride,pad,groups", CASES)
def test_values_and_gradients_equal_nn_conv(shape, k, stride, pad, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ref, new = _conv_pair(8, k, stride, pad, groups)
  params = _params(rng, k, shape[-1] // groups, 8)
  y_ref = jax.jit(ref.apply)(params, x)
  g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)

  def loss(m):
    return lambda p, v: jnp.sum(m.apply(p, v) * g)

  y_new = jax.jit(new.apply)(params, x)
  np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
  (dp_ref, dx_ref) = jax.jit(jax.grad(loss(ref), (0, 1)))(params, x)
  (dp_new, dx_new) = jax.jit(jax.grad(loss(new), (0, 1)))(params, x)
  np.testing.assert_allclose(dx_new, dx_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(dp_new), jax.tree.leaves(dp_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def _np_conv_nhwc(x, w, stride, pad):
  """float64 direct convolution (cross-correlation), NHWC / HWIO."""
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
      y[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
  return y


def test_gradients_match_float64_finite_differences_of_numpy_conv():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 2))
  w = rng.standard_normal((3, 3, 2, 3))
  g = rng.standard_normal(_np_conv_nhwc(x, w, 2, 1).shape)
  f64 = lambda xx, ww: np.sum(_np_conv_nhwc(xx, ww, 2, 1) * g)
  f = lambda xx, ww: jnp.sum(cc.conv_general_dilated(
      xx, ww, (2, 2), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC")) * g)
  dx, dw = jax.jit(jax.grad(f, (0, 1)))(jnp.asarray(x, jnp.float32),
                               jnp.asarray(w, jnp.float32))
  # The loss is linear in each argument: a central difference is exact up
  # to rounding, so compare each coordinate's derivative.
  for arr, d, which in ((x, dx, 0), (w, dw, 1)):
    num = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
      e = np.zeros_like(arr)
      e[idx] = 1.0
      args_p = [x, w]
      args_m = [x, w]
      args_p[which] = arr + e
      args_m[which] = arr - e
      num[idx] = (f64(*args_p) - f64(*args_m)) / 2.0
    np.testing.assert_allclose(np.asarray(d), num, rtol=1e-4, atol=1e-4)


def _conv_specs(jaxpr):
  """dimension_numbers of every convolution in a (closed) jaxpr, recursively."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      out.append(eqn.params["dimension_numbers"])
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          out += _conv_specs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          out += _conv_specs(sub)
  return out


def test_scanned_gradient_uses_only_canonical_convolutions():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 2, 9, 9, 3)), jnp.float32)
  _, new = _conv_pair(4, 3, 2, 1, 1)
  params = _params(rng, 3, 3, 4)

  def step(p, xb):
    g = jax.grad(lambda q: jnp.sum(new.apply(q, xb) ** 2))(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None

  scanned = lambda p: lax.scan(step, p, x)[0]
  specs = _conv_specs(jax.make_jaxpr(scanned)(params).jaxpr)
  canonical = lax.conv_dimension_numbers(
      (1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
  assert len(specs) == 3 and all(s == canonical for s in specs)
  # And the scanned result equals the unrolled loop.
  p = params
  for i in range(3):
    p = jax.jit(step)(p, x[i])[0]
  for a, b in zip(jax.tree.leaves(jax.jit(scanned)(params)),
                  jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_default():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.bfloat16)
  ref, new = _conv_pair(4, 3, 2, 1, 1, dtype=jnp.bfloat16)
  params = _params(rng, 3, 3, 4)
  f = lambda m: jax.jit(jax.grad(lambda p, v: jnp.sum(
      m.apply(p, v).astype(jnp.float32)), (0, 1)))(params, x)
  for a, b in zip(jax.tree.leaves(f(new)), jax.tree.leaves(f(ref))):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("nan_first", [False, True])
def test_layout_copy_equals_the_plain_transpose(nan_first):
  # Both branches of the conditional are the same function: the result is
  # fn(v) bit for bit whichever branch the predicate picks (NaN -> False).
  v = np.random.default_rng(3).standard_normal((4, 5, 6, 3)).astype(np.float32)
  if nan_first:
    v[0, 0, 0, 0] = np.nan
  fn = lambda a: a[:, :4, :5, :].transpose(3, 1, 2, 0)
  got = jax.jit(lambda a: cc._layout_copy(fn, a))(jnp.asarray(v))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(got), fn(v))


def _chain_conv_grad(x, w, a, b):
  """d/dw of a conv applied after an elementwise (BN-affine + ReLU) chain."""
  def loss(ww):
    h = jax.nn.relu(x * a + b)
    y = cc.conv_general_dilated(h, ww, (1, 1), ((1, 1), (1, 1)),
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y * a[..., :1] + b[..., :1]) ** 2)
  return jax.grad(loss)(w)


def test_weight_gradient_layout_copies_are_fusion_boundaries_on_cpu(
    monkeypatch):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 3)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((3,)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((3,)), jnp.float32)
  on = jax.jit(_chain_conv_grad)
  text_on = on.lower(x, w, a, b).compile().as_text()
  monkeypatch.setattr(cc, "LAYOUT_COPY_VIA_COND", False)
  off = jax.jit(lambda *args: _chain_conv_grad(*args))  # a fresh trace
  text_off = off.lower(x, w, a, b).compile().as_text()
  assert " conditional(" in text_on and " conditional(" not in text_off
  np.testing.assert_array_equal(np.asarray(on(x, w, a, b)),
                                np.asarray(off(x, w, a, b)))
  # and both equal the gradient through JAX's own convolution rules
  def ref(ww):
    h = jax.nn.relu(x * a + b)
    y = lax.conv_general_dilated(h, ww, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.relu(y * a[..., :1] + b[..., :1]) ** 2)
  np.testing.assert_allclose(np.asarray(on(x, w, a, b)),
                             np.asarray(jax.jit(jax.grad(ref))(w)),
                             rtol=1e-5, atol=1e-4)
