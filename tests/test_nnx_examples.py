"""kd_jax losses in Flax NNX train steps (`examples/nnx_distillation.py`).

Checked against float64 NumPy: the loss of the NNX step (the models' math
written out by hand from their parameters) and its gradient (central finite
differences of that NumPy loss, read back from one SGD update); the teacher
stays frozen; a zoo model bridged with ``nnx.bridge.ToNNX`` computes what
the Linen module computes and trains like a Linen/optax step. No peer
library (tunix, EasyDeL) is needed: NNX is part of flax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from examples import nnx_distillation as ex

LR = 0.5


def _params(module):
  return jax.tree.map(lambda a: np.asarray(a, np.float64),
                      nnx.state(module, nnx.Param).to_pure_dict())


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(s, t, temp):
  lp_t, lp_s = _log_softmax(t / temp), _log_softmax(s / temp)
  return (np.exp(lp_t) * (lp_t - lp_s)).sum(-1)


def _ce(logits, y):
  return -np.take_along_axis(_log_softmax(logits), y[..., None], -1)[..., 0]


def _flat(tree):
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [leaf.size for leaf in leaves]
  vec = np.concatenate([leaf.ravel() for leaf in leaves])

  def unflat(v):
    out, i = [], 0
    for leaf, n in zip(leaves, sizes):
      out.append(v[i:i + n].reshape(leaf.shape))
      i += n
    return jax.tree.unflatten(treedef, out)

  return vec, unflat


def _fd_grad(loss, params, eps=1e-6):
  vec, unflat = _flat(params)
  grad = np.zeros_like(vec)
  for i in range(vec.size):
    e = np.zeros_like(vec)
    e[i] = eps
    grad[i] = (loss(unflat(vec + e)) - loss(unflat(vec - e))) / (2 * eps)
  return unflat(grad)


def _sgd_grad(before, after):
  return jax.tree.map(lambda b, a: (b - a) / LR, before, after)


def _close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4)


def _mlp_np(p, x):
  h = np.maximum(x @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
  return h @ p["out"]["kernel"] + p["out"]["bias"]


def test_nnx_kd_step_matches_numpy_and_keeps_teacher_frozen():
  rngs = nnx.Rngs(0)
  teacher, student = ex.MLP(6, 9, 4, rngs=rngs), ex.MLP(6, 5, 4, rngs=rngs)
  x = np.asarray(jax.random.normal(jax.random.key(1), (7, 6)), np.float32)
  y = np.array([0, 1, 2, 3, 0, 1, 2])
  t_params, s_params = _params(teacher), _params(student)
  t_logits = _mlp_np(t_params, x.astype(np.float64))

  def loss_np(p):
    s = _mlp_np(p, x.astype(np.float64))
    return np.mean(0.1 * _ce(s, y) + 0.9 * 16.0 * _kl(s, t_logits, 4.0))

  opt = nnx.Optimizer(student, optax.sgd(LR), wrt=nnx.Param)
  loss = float(ex.kd_step(student, teacher, opt, x, y))
  np.testing.assert_allclose(loss, loss_np(s_params), rtol=1e-5)
  _close(_sgd_grad(s_params, _params(student)), _fd_grad(loss_np, s_params),
         atol=2e-5)
  _close(_params(teacher), t_params, atol=0)  # not in the optimizer
  assert float(ex.kd_step(student, teacher, opt, x, y)) < loss


def _tiny_lm_np(p, tokens):
  h = p["embed"]["embedding"][tokens]
  h = h + np.maximum(h @ p["block"]["kernel"] + p["block"]["bias"], 0)
  return h @ p["head"]["kernel"]


def test_nnx_fused_lm_step_matches_materialized_numpy():
  rngs = nnx.Rngs(3)
  teacher, student = ex.TinyLM(11, 6, rngs=rngs), ex.TinyLM(11, 4, rngs=rngs)
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, 7), 0, 11))
  mask = np.ones(tokens.shape, bool)
  mask[1, 4:] = False  # padding: these targets are not trained
  inputs, targets, where = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
  t_logits = _tiny_lm_np(_params(teacher), inputs)
  s_params = _params(student)

  def loss_np(p):
    s = _tiny_lm_np(p, inputs)
    per_tok = 0.6 * _ce(s, targets) + 0.4 * _kl(s, t_logits, 2.0)
    return (per_tok * where).sum() / where.sum()

  opt = nnx.Optimizer(student, optax.sgd(LR), wrt=nnx.Param)
  loss = float(ex.lm_fused_step(student, teacher, opt, tokens, mask,
                                temperature=2.0, kd_weight=0.4, chunk_size=4))
  np.testing.assert_allclose(loss, loss_np(s_params), rtol=1e-5)
  _close(_sgd_grad(s_params, _params(student)), _fd_grad(loss_np, s_params),
         atol=2e-5)


def test_bridged_zoo_model_trains_like_its_linen_module():
  from kd_jax import models
  lr = 0.05  # 784 inputs: a smaller step than the tiny models
  x = jax.random.uniform(jax.random.key(5), (4, 28, 28, 1))
  y = jnp.array([1, 2, 3, 4])
  teacher = ex.bridge_zoo_model("mlp_student", x, seed=0)
  student = ex.bridge_zoo_model("mlp_student", x, seed=1)
  linen_s = models.create("mlp_student", num_classes=10)
  linen_t = models.create("mlp_student", num_classes=10)
  v_s, v_t = ex.linen_variables(student), ex.linen_variables(teacher)
  np.testing.assert_allclose(student(x, train=False)[0],
                             linen_s.apply(v_s, x)[0], rtol=1e-6, atol=1e-6)

  def linen_loss(params):  # the same objective through Linen + optax
    logits = linen_s.apply({"params": params}, x, train=True)[0]
    t_logits = linen_t.apply(v_t, x, train=False)[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    from kd_jax import losses
    return jnp.mean(0.1 * ce + 0.9 * losses.kd_loss(logits, t_logits,
                                                     temperature=4.0))

  grads = jax.grad(linen_loss)(v_s["params"])
  want = jax.tree.map(lambda p, g: p - lr * g, v_s["params"], grads)
  opt = nnx.Optimizer(student, optax.sgd(lr), wrt=nnx.Param)
  loss = float(ex.bridged_kd_step(student, teacher, opt, x, y))
  np.testing.assert_allclose(loss, float(linen_loss(v_s["params"])), rtol=1e-5)
  _close(ex.linen_variables(student)["params"], want, atol=1e-6)
  assert float(ex.bridged_kd_step(student, teacher, opt, x, y)) < loss


@pytest.mark.parametrize("bad", ["labels", "width"])
def test_nnx_step_bad_input_is_one_clear_error(bad):
  rngs = nnx.Rngs(0)
  teacher = ex.MLP(6, 9, 4 if bad == "labels" else 5, rngs=rngs)
  student = ex.MLP(6, 5, 4, rngs=rngs)
  opt = nnx.Optimizer(student, optax.sgd(LR), wrt=nnx.Param)
  x = np.zeros((3, 6), np.float32)
  y = np.zeros((3,), np.int32) if bad == "width" else np.zeros((2,), np.int32)
  with pytest.raises((ValueError, TypeError)):
    ex.kd_step(student, teacher, opt, x, y)
