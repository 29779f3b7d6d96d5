"""MLKD and CTKD against float64 NumPy transcriptions of the authors' code.

MLKD: Jin-Ying/Multi-Level-Logit-Distillation `mdistiller/distillers/
KD_ours.py::forward_train` (kd_loss / cc_loss / bc_loss, the median masks
multiplied into the scalar terms); CTKD: zhengli97/CTKD
`models/temp_global.py` (Global_T + GradientReversalFunction),
`train_student.py::CosineDecay`, `distiller_zoo/KD.py::DistillKL`.
Gradients against central finite differences of those transcriptions.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import distillers as D
from kd_jax import train
from kd_jax.distillers import ctkd
from kd_jax.distillers import mlkd

B, C = 6, 5


# ------------------------------------------------ NumPy transcriptions --

def softmax(x):
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def log_softmax(x):
  m = x.max(1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def np_kd(s, t, temp):
  pt = softmax(t / temp)
  kl = pt * (np.log(pt) - log_softmax(s / temp))   # F.kl_div(..., 'none')
  return kl.sum(1).mean() * temp ** 2


def np_cc(s, t, temp):
  ps, pt = softmax(s / temp), softmax(t / temp)
  return ((pt.T @ pt - ps.T @ ps) ** 2).sum() / t.shape[1]


def np_bc(s, t, temp):
  ps, pt = softmax(s / temp), softmax(t / temp)
  return ((pt @ pt.T - ps @ ps.T) ** 2).sum() / t.shape[0]


def np_mlkd(sw, tw, ss, ts, y, temperature=4.0, ce_w=0.1, kd_w=0.9):
  """`KD_ours.forward_train` minus the weak-view CE, term by term."""
  pred = softmax(tw)
  conf = pred.max(1)
  mask = conf <= np.percentile(conf.flatten(), 50)
  cconf = pred.sum(0)
  cmask = cconf <= np.percentile(cconf.flatten(), 50)
  temps = (temperature, 3.0, 5.0, 2.0, 6.0)
  ce_strong = -log_softmax(ss)[np.arange(len(y)), y].mean()
  loss_ce_strong = ce_w * ce_strong
  kd_weak = sum(kd_w * (np_kd(sw, tw, t) * mask).mean() for t in temps)
  kd_strong = (kd_w * np_kd(ss, ts, temperature) + kd_w * np_kd(ss, ts, 3.0)
               + kd_w * np_kd(ss, ts, 5.0) + kd_w * np_kd(sw, tw, 2.0)
               + kd_w * np_kd(sw, tw, 6.0))
  cc_weak = sum(kd_w * (np_cc(sw, tw, t) * cmask).mean() for t in temps)
  bc_weak = sum(kd_w * (np_bc(sw, tw, t) * mask).mean() for t in temps)
  return loss_ce_strong + kd_weak + kd_strong + cc_weak + bc_weak


def fd_grad(f, x, eps=1e-5):
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = eps
    g[i] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


def logits(seed):
  rs = np.random.RandomState(seed)
  return [rs.randn(B, C) * 2 for _ in range(4)], rs.randint(0, C, B)


# ------------------------------------------------------------- MLKD --

@pytest.mark.parametrize("seed", [0, 1])
def test_mlkd_loss_value_and_gradients(seed):
  (sw, tw, ss, ts), y = logits(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  got = mlkd.mlkd_loss(f32(sw), f32(tw), f32(ss), f32(ts), jnp.asarray(y))
  want = np_mlkd(sw, tw, ss, ts, y)
  np.testing.assert_allclose(float(got), want, rtol=2e-5)
  gw, gs = jax.grad(lambda a, b: mlkd.mlkd_loss(a, f32(tw), b, f32(ts),
                                                jnp.asarray(y)),
                    argnums=(0, 1))(f32(sw), f32(ss))
  np.testing.assert_allclose(
      np.asarray(gw), fd_grad(lambda a: np_mlkd(a, tw, ss, ts, y), sw),
      rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(gs), fd_grad(lambda b: np_mlkd(sw, tw, b, ts, y), ss),
      rtol=1e-3, atol=1e-5)


def test_mlkd_masks_follow_numpy_percentile_with_ties():
  tw = np.zeros((4, 3))
  tw[:, 0] = [1.0, 1.0, 2.0, 3.0]      # ties at the median
  m, mc = mlkd.confidence_masks(jnp.asarray(tw, jnp.float32))
  p = softmax(tw)
  conf, cconf = p.max(1), p.sum(0)
  np.testing.assert_array_equal(np.asarray(m),
                                conf <= np.percentile(conf, 50))
  np.testing.assert_array_equal(np.asarray(mc),
                                cconf <= np.percentile(cconf, 50))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Dense(8)(x.reshape(x.shape[0], -1))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    return nn.Dense(C)(nn.relu(h)), {"pooled": h}


def test_mlkd_strong_view_through_the_engine():
  rs = np.random.RandomState(3)
  batch = {"image": rs.randn(B, 4, 4, 1).astype(np.float32),
           "image_strong": rs.randn(B, 4, 4, 1).astype(np.float32),
           "label": rs.randint(0, C, B).astype(np.int32)}
  student, teacher = Net(), Net()
  sv = student.init(jax.random.PRNGKey(0), batch["image"])
  tv = teacher.init(jax.random.PRNGKey(1), batch["image"])
  obj = train.Objective(ce_weight=0.1, terms=(train.Term(
      "mlkd", 1.0, warmup=False, distiller=D.create("mlkd")),))
  assert obj.views == ("strong",)
  tx = optax.sgd(0.1)
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(2),
                                   distiller_params={"mlkd": {}},
                                   distiller_state={"mlkd": {}})
  step = jax.jit(train.make_distill_step(student, teacher, obj, tx))
  new, m = step(state, tv, batch)
  # Independent forwards: student (train mode) on the weak view, then on the
  # strong view with the weak forward's BN statistics; teacher in eval mode.
  (sw, _), upd = student.apply(sv, batch["image"], train=True,
                               mutable=["batch_stats"])
  (ss, _), upd2 = student.apply({"params": sv["params"], **upd},
                                batch["image_strong"], train=True,
                                mutable=["batch_stats"])
  tw, _ = teacher.apply(tv, batch["image"])
  ts, _ = teacher.apply(tv, batch["image_strong"])
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  want = np_mlkd(f64(sw), f64(tw), f64(ss), f64(ts), batch["label"])
  np.testing.assert_allclose(float(m["mlkd"]), want, rtol=1e-4)
  ce_w = -log_softmax(f64(sw))[np.arange(B), batch["label"]].mean()
  np.testing.assert_allclose(float(m["loss"]), 0.1 * ce_w + want, rtol=1e-4)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      new.batch_stats, upd2["batch_stats"])
  with pytest.raises(KeyError, match="image_strong"):
    step(state, tv, {k: v for k, v in batch.items() if k != "image_strong"})
  with pytest.raises(ValueError, match="views"):
    train.make_distill_step(student, None, obj, tx)


# ------------------------------------------------------------- CTKD --

def np_cosine_decay(i, max_value=0.0, min_value=-1.0, num_loops=10):
  """`CosineDecay.get_value` of CTKD's train_student.py."""
  if i < 0:
    i = 0
  if i >= num_loops:
    i = num_loops
  value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
  return value * (max_value - min_value) + min_value


def np_ctkd(s, t, theta, t_start=1.0, t_end=20.0):
  temp = t_start + t_end / (1.0 + np.exp(-theta))
  return np_kd(s, t, temp)          # DistillKL: batchmean * T^2


@pytest.mark.parametrize("epoch", [1, 4, 10, 15])
def test_ctkd_value_and_reversed_temperature_gradient(epoch):
  (s, t, _, _), _ = logits(epoch)
  theta = np.array([0.3])
  d = D.create("ctkd")
  inputs = train.TermInputs(jnp.asarray(s, jnp.float32),
                            jnp.zeros(B, jnp.int32),
                            teacher_logits=jnp.asarray(t, jnp.float32),
                            epoch=jnp.asarray(epoch))
  params = {"theta": jnp.asarray(theta, jnp.float32)}
  loss, _ = d(params, {}, inputs)
  np.testing.assert_allclose(float(loss), np_ctkd(s, t, theta[0]), rtol=1e-5)
  lam = np_cosine_decay(epoch)
  np.testing.assert_allclose(float(d.reversal_strength(epoch)), lam,
                             atol=1e-7)
  g = jax.grad(lambda p: d(p, {}, inputs)[0])(params)["theta"]
  fd = fd_grad(lambda th: np_ctkd(s, t, th[0]), theta)
  np.testing.assert_allclose(np.asarray(g), lam * fd, rtol=1e-3, atol=1e-7)
  # the student's gradient is not reversed
  gs = jax.grad(lambda x: d(params, {}, inputs.__class__(
      x, inputs.labels, teacher_logits=inputs.teacher_logits,
      epoch=inputs.epoch))[0])(inputs.student_logits)
  np.testing.assert_allclose(
      np.asarray(gs), fd_grad(lambda x: np_ctkd(x, t, theta[0]), s),
      rtol=1e-3, atol=1e-6)


def test_ctkd_init_and_errors():
  d = D.create("ctkd")
  p, s = d.init(jax.random.PRNGKey(0), None)
  np.testing.assert_array_equal(np.asarray(p["theta"]), [1.0])   # ones(1)
  np.testing.assert_allclose(float(d.temperature(p, 1)),
                             1 + 20 / (1 + math.exp(-1)), rtol=1e-6)
  inp = train.TermInputs(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32),
                         teacher_logits=jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="steps_per_epoch"):
    d(p, s, inp)
  with pytest.raises(ValueError, match="decay_loops"):
    D.create("ctkd", decay_loops=0)


def test_gradient_reversal_layer():
  g = jax.grad(lambda x: jnp.sum(ctkd.gradient_reversal(x, -0.5) * 3.0))(
      jnp.ones(2))
  np.testing.assert_allclose(np.asarray(g), [-1.5, -1.5])
