"""`kd_jax.train.transforms`: max-norm constraint and Hinton et al. 2012 SGD,
against float64 NumPy transcriptions of the 2012 update rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.train import transforms as T


def _np_project(w, r):
  """Float64 transcription: rescale every column (all axes but the last)
  whose L2 norm exceeds r to norm r."""
  w = np.array(w, np.float64)
  flat = w.reshape(-1, w.shape[-1])
  n = np.sqrt((flat ** 2).sum(0))
  for j in range(flat.shape[1]):
    if n[j] > r:
      flat[:, j] *= r / n[j]
  return flat.reshape(w.shape)


def _params(rng):
  return {"Dense_0": {"kernel": rng.normal(0, 1.0, (6, 4)),
                      "bias": rng.normal(0, 5.0, (4,))},
          "Conv_0": {"kernel": rng.normal(0, 1.0, (3, 3, 2, 5))}}


def _run_jax(tx, params, grads_seq):
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  state = tx.init(params)
  for g in grads_seq:
    g = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), g)
    upd, state = tx.update(g, state, params)
    params = optax.apply_updates(params, upd)
  return params


def _grads_seq(rng, params, n, scale):
  return [jax.tree_util.tree_map(lambda p: rng.normal(0, scale, p.shape), params)
          for _ in range(n)]


def test_project_max_norm_matches_numpy():
  rng = np.random.default_rng(0)
  for shape in [(7, 3), (2, 3, 4, 6)]:
    w = rng.normal(0, 1, shape)
    got = np.asarray(T.project_max_norm(jnp.asarray(w, jnp.float32), 2.0))
    np.testing.assert_allclose(got, _np_project(w, 2.0), rtol=2e-6, atol=1e-6)


def test_hinton_sgd_with_max_norm_matches_2012_update():
  """v = p v - (1-p) lr g; w += v; renormalize columns; v is NOT projected."""
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads = _grads_seq(rng, params, 12, 1.0)
  spe, radius = 3, 2.5
  lr_fn, mom_fn = T.hinton2012_schedules(spe, lr0=0.8, decay=0.9,
                                         p_initial=0.5, p_final=0.95,
                                         ramp_epochs=2)
  tx = optax.chain(T.hinton_sgd(lr_fn, mom_fn), T.max_norm(radius))
  got = _run_jax(tx, params, grads)

  w = jax.tree_util.tree_map(lambda a: np.array(a, np.float64), params)
  v = jax.tree_util.tree_map(np.zeros_like, w)
  projected_any = False
  for t, g in enumerate(grads):
    e = t // spe
    lr, p = 0.8 * 0.9 ** e, 0.5 + 0.45 * min(e / 2, 1.0)
    v = jax.tree_util.tree_map(lambda vv, gg: p * vv - (1 - p) * lr * gg, v, g)
    w = jax.tree_util.tree_map(lambda ww, vv: ww + vv, w, v)
    for name in ("Dense_0", "Conv_0"):
      new = _np_project(w[name]["kernel"], radius)
      projected_any |= not np.allclose(new, w[name]["kernel"])
      w[name]["kernel"] = new
  assert projected_any  # the constraint was active: the test can fail
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                              atol=1e-5), got, w)
  # every constrained column ends within the ball, biases are unconstrained
  k = np.asarray(got["Dense_0"]["kernel"])
  assert np.all(np.linalg.norm(k, axis=0) <= radius * (1 + 1e-6))
  assert np.abs(np.asarray(got["Dense_0"]["bias"])).max() > radius


def test_optax_sgd_momentum_then_max_norm_matches_numpy():
  rng = np.random.default_rng(2)
  params = _params(rng)
  grads = _grads_seq(rng, params, 8, 2.0)
  tx = optax.chain(optax.sgd(0.3, momentum=0.9), T.max_norm(1.5))
  got = _run_jax(tx, params, grads)
  w = jax.tree_util.tree_map(lambda a: np.array(a, np.float64), params)
  tr = jax.tree_util.tree_map(np.zeros_like, w)
  for g in grads:
    tr = jax.tree_util.tree_map(lambda a, b: b + 0.9 * a, tr, g)
    w = jax.tree_util.tree_map(lambda a, b: a - 0.3 * b, w, tr)
    for name in ("Dense_0", "Conv_0"):
      w[name]["kernel"] = _np_project(w[name]["kernel"], 1.5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                              atol=1e-5), got, w)


def test_max_norm_mask_pytree_and_callable():
  big = {"a": jnp.full((3, 2), 10.0), "b": jnp.full((3, 2), 10.0)}
  zero = jax.tree_util.tree_map(jnp.zeros_like, big)
  for mask in ({"a": True, "b": False}, lambda p: {"a": True, "b": False}):
    upd, _ = T.max_norm(1.0, mask=mask).update(zero, optax.EmptyState(), big)
    new = optax.apply_updates(big, upd)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(new["a"]), axis=0),
                               1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new["b"]), 10.0)


def test_hinton_sgd_constant_matches_numpy():
  rng = np.random.default_rng(3)
  gs = rng.normal(size=(5, 3))
  tx = T.hinton_sgd(2.0, 0.7)
  st = tx.init(jnp.zeros(3))
  v = np.zeros(3)
  for g in gs:
    u, st = tx.update(jnp.asarray(g, jnp.float32), st)
    v = 0.7 * v - 0.3 * 2.0 * g
    np.testing.assert_allclose(np.asarray(u), v, rtol=1e-5, atol=1e-6)
  assert int(st.count) == 5


def test_hinton2012_schedules_values():
  lr, mom = T.hinton2012_schedules(600)
  for count, e in [(0, 0), (599, 0), (600, 1), (600 * 250, 250),
                   (600 * 2999, 2999)]:
    np.testing.assert_allclose(float(lr(count)), 10.0 * 0.998 ** e, rtol=1e-5)
    np.testing.assert_allclose(float(mom(count)),
                               0.5 + 0.49 * min(e / 500, 1.0), rtol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="radius"):
    T.max_norm(0.0)
  with pytest.raises(ValueError, match="radius"):
    T.max_norm(float("inf"))
  tx = T.max_norm(1.0)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": jnp.ones((2, 2))}, tx.init(None))
  with pytest.raises(ValueError, match="ndim"):
    T.project_max_norm(jnp.ones(3), 1.0)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    T.hinton2012_schedules(0)
  with pytest.raises(ValueError, match="momenta"):
    T.hinton2012_schedules(10, p_final=1.0)
