"""`step_utils.gradient_boundary`: the identity whose cotangent XLA:CPU
materializes before its consumers (the LM step wraps the student's logits in
it; why: docs/performance.md, "LM distillation vs the JAX peers")."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.train import create_train_state, lm_steps, step_utils
from kd_jax.train.objectives import Objective, Term


def _f(x, w, boundary):
  y = boundary(jnp.sin(x)) if boundary else jnp.sin(x)
  return jnp.sum(jnp.exp(0.3 * y) * w)


def test_value_and_gradient_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5)).astype(np.float32)
  w = rng.standard_normal((3, 5)).astype(np.float32)
  got = jax.jit(jax.value_and_grad(_f), static_argnums=2)(
      x, w, step_utils.gradient_boundary)
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  want_v = np.sum(np.exp(0.3 * np.sin(x64)) * w64)
  want_g = np.exp(0.3 * np.sin(x64)) * w64 * 0.3 * np.cos(x64)
  np.testing.assert_allclose(float(got[0]), want_v, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got[1]), want_g, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(step_utils.gradient_boundary(jnp.asarray(x))), x)


def test_cpu_gradient_goes_through_a_conditional_with_the_same_bits():
  x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
  w = jnp.arange(12.0).reshape(3, 4) - 5.0
  with_b = jax.jit(jax.grad(_f), static_argnums=2).lower(
      x, w, step_utils.gradient_boundary).compile()
  without = jax.jit(jax.grad(_f), static_argnums=2).lower(
      x, w, None).compile()
  if jax.default_backend() == "cpu":
    assert " conditional(" in with_b.as_text()
  assert " conditional(" not in without.as_text()
  np.testing.assert_array_equal(np.asarray(with_b(x, w)),
                                np.asarray(without(x, w)))


def _lm_apply(variables, tokens, train=False, rngs=None):
  """Embedding -> tanh -> untied head: logits ``[B, T, V]`` from a dot."""
  del train, rngs
  p = variables["params"]
  return jnp.tanh(p["E"][tokens]) @ p["H"], {}


def test_lm_step_unchanged_by_the_boundary(monkeypatch):
  """Two KD steps (CE + forward KL): the same parameters, bit for bit, with
  the boundary on the student's logits and with a plain identity there."""
  rng = np.random.default_rng(0)
  params = lambda: {"params": {  # noqa: E731
      "E": jnp.asarray(rng.standard_normal((40, 16)), jnp.float32),
      "H": jnp.asarray(rng.standard_normal((16, 40)), jnp.float32)}}
  s_vars, t_vars = params(), params()
  tokens = jnp.asarray(rng.integers(0, 40, (3, 9)))
  obj = Objective(ce_weight=0.5,
                  terms=(Term("forward_kl", 2.0, temperature=2.0),))
  tx = optax.sgd(0.5)
  finals = []
  real = step_utils.gradient_boundary
  for with_boundary in (True, False):
    monkeypatch.setattr(step_utils, "gradient_boundary",
                        real if with_boundary else lambda z: z)
    step = jax.jit(lm_steps.make_lm_step(
        _lm_apply, lambda v, x: _lm_apply(v, x), obj, tx))
    state = create_train_state(s_vars, tx, rng=jax.random.key(3))
    hlo = step.lower(state, t_vars, {"tokens": tokens}).compile().as_text()
    assert (" conditional(" in hlo) == (
        with_boundary and jax.default_backend() == "cpu")
    for _ in range(2):
      state, metrics = step(state, t_vars, {"tokens": tokens})
    assert np.isfinite(float(metrics["loss"]))
    finals.append(jax.tree.leaves(jax.tree.map(np.asarray, state.params)))
  for a, b in zip(*finals):
    np.testing.assert_array_equal(a, b)
  start = jax.tree.leaves(jax.tree.map(np.asarray, s_vars["params"]))
  assert all(not np.array_equal(a, b) for a, b in zip(finals[0], start))
