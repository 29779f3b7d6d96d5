"""DOT (`kd_jax.distillers.dot`) against a float64 NumPy transcription of
mdistiller `mdistiller/engine/dot.py` (`DistillationOrientedTrainer.step_kd`
+ `step`, one parameter group), and the engine's split-gradient step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import train
from kd_jax.distillers import dot

LR, MOM, DELTA, WD = 0.05, 0.9, 0.075, 5e-4


class TorchDOT:
  """The PyTorch optimizer, parameter by parameter (None = no gradient)."""

  def __init__(self, lr, momentum, momentum_kd, weight_decay):
    self.lr, self.m, self.mk, self.wd = lr, momentum, momentum_kd, weight_decay
    self.state = {}

  def step(self, params, g_task, g_kd):
    task = [n for n in params if g_task.get(n) is not None]
    kd = [n for n in params if g_kd.get(n) is not None]
    for n in task:                                   # `dot`, first loop
      d_p = g_task[n] + self.wd * params[n]
      buf = self.state.setdefault(n, {}).get("momentum_buffer")
      if buf is None:
        buf = d_p.copy()
      elif n in kd:
        buf = self.m * buf + d_p
      else:
        buf = (self.mk + self.m) / 2.0 * buf + d_p
      self.state[n]["momentum_buffer"] = buf
      params[n] = params[n] - self.lr * buf
    for n in kd:                                     # second loop
      d_p = g_kd[n]
      buf = self.state.setdefault(n, {}).get("momentum_kd_buffer")
      if buf is None:
        buf = d_p.copy()
      elif n in task:
        buf = self.mk * buf + d_p
      else:
        d_p = d_p + self.wd * params[n]
        buf = (self.mk + self.m) / 2.0 * buf + d_p
      self.state[n]["momentum_kd_buffer"] = buf
      params[n] = params[n] - self.lr * buf
    return params


def test_dot_matches_the_pytorch_optimizer():
  rs = np.random.RandomState(0)
  shapes = {"w": (3, 2), "b": (2,), "theta": (1,)}
  p64 = {n: rs.randn(*s) for n, s in shapes.items()}
  ref = TorchDOT(LR, MOM - DELTA, MOM + DELTA, WD)
  tree = lambda d: {"student": {"w": d["w"], "b": d["b"]},  # noqa: E731
                    "distiller": {"theta": d["theta"]}}
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32),
                                  tree(p64))
  tx = dot.dot(LR, momentum=MOM, delta=DELTA, weight_decay=WD,
               distill_only=dot.engine_distill_only)
  state = tx.init(params)
  ref_params = dict(p64)
  for _ in range(4):
    gt = {n: rs.randn(*s) for n, s in shapes.items()}
    gk = {n: rs.randn(*s) for n, s in shapes.items()}
    gt["theta"] = None                     # the distiller sees no task loss
    ref_params = ref.step(ref_params, gt, gk)
    gt0 = dict(gt, theta=np.zeros(1))      # JAX: a zero task gradient
    grads = {"task": jax.tree_util.tree_map(jnp.asarray, tree(gt0)),
             "distill": jax.tree_util.tree_map(jnp.asarray, tree(gk))}
    upd, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, upd)
  want = tree(ref_params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                              atol=1e-6), params, want)


def test_dot_errors():
  tx = dot.dot(0.1)
  p = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="split_gradients"):
    tx.update({"w": jnp.ones(2)}, tx.init(p), p)
  with pytest.raises(ValueError, match="momenta"):
    dot.dot(0.1, momentum=0.95, delta=0.1)


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(6)(x.reshape(x.shape[0], -1)))
    return nn.Dense(4)(h), {"pooled": h}


def _setup():
  rs = np.random.RandomState(1)
  batch = {"image": rs.randn(8, 3, 3, 1).astype(np.float32),
           "label": rs.randint(0, 4, 8).astype(np.int32)}
  sv = Net().init(jax.random.PRNGKey(0), batch["image"])
  tv = Net().init(jax.random.PRNGKey(1), batch["image"])
  obj = train.Objective(ce_weight=0.1, terms=(
      train.Term("kd", 0.9, temperature=4.0),))
  return batch, sv, tv, obj


def test_split_gradients_are_the_task_and_kd_parts():
  batch, sv, tv, obj = _setup()
  seen = []

  def record(grads, state, params=None):
    seen.append(grads)
    return jax.tree_util.tree_map(jnp.zeros_like, params), state

  tx = optax.GradientTransformation(lambda p: (), record)
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(2))
  train.make_distill_step(Net(), Net(), obj, tx, split_gradients=True)(
      state, tv, batch)
  train.make_distill_step(Net(), Net(), obj, tx)(state, tv, batch)
  split, full = seen
  assert set(split) == {"task", "distill"}

  def ce(params):  # the task loss, written out with optax
    logits, _ = Net().apply({"params": params}, batch["image"])
    return 0.1 * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["label"]))

  g_ce = jax.grad(ce)(sv["params"])
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  jax.tree_util.tree_map(close, split["task"]["student"], g_ce)
  jax.tree_util.tree_map(
      close, jax.tree_util.tree_map(jnp.add, split["task"], split["distill"]),
      full)


def test_dot_without_delta_is_sgd_momentum():
  batch, sv, tv, obj = _setup()
  sgd = optax.sgd(0.1, momentum=0.9)
  dtx = dot.dot(0.1, momentum=0.9, delta=0.0)
  states = [train.create_train_state(sv, t, rng=jax.random.PRNGKey(2))
            for t in (sgd, dtx)]
  steps = [jax.jit(train.make_distill_step(Net(), Net(), obj, sgd)),
           jax.jit(train.make_distill_step(Net(), Net(), obj, dtx,
                                           split_gradients=True))]
  for _ in range(3):
    states = [s(st, tv, batch)[0] for s, st in zip(steps, states)]
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      states[0].params, states[1].params)


def test_cifar100_dot_config():
  from configs import cifar100_dot
  c = cifar100_dot.get_config("vgg13-vgg8")
  assert c.optimizer.name == "dot" and c.optimizer.delta == 0.075
  assert c.optimizer.momentum == 0.9 and c.optimizer.weight_decay == 5e-4
  assert c.loss.ce_weight == 0.1 and c.loss.terms.kd.weight == 0.9
  assert c.report.paper.value == 73.77
