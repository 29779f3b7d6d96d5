"""Tests of kd_jax.distillers.deepinversion: BatchNorm-input capture, the
inversion loss and step against a float64 NumPy transcription of the
authors' `get_images` (CIFAR script + ImageNet prior terms), jitter, and
runs on the zoo's CIFAR ResNet and the BN MNIST CNN."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import capture
from kd_jax import image_grid
from kd_jax import models
from kd_jax.distillers import deepinversion as di


class Tiny(nn.Module):
  """x -> BatchNorm -> ReLU -> spatial mean -> Dense: a teacher whose NumPy
  transcription is short."""
  k: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.BatchNorm(use_running_average=not train, epsilon=1e-5,
                     name="bn")(x)
    pooled = jnp.mean(nn.relu(h), axis=(1, 2))
    return nn.Dense(self.k, name="fc")(pooled), {"pooled": pooled}


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_tiny(v, x):
  bn = v["params"]["bn"]
  st = v["batch_stats"]["bn"]
  h = (x - st["mean"]) / np.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
  pooled = np.maximum(h, 0).mean((1, 2))
  return pooled @ v["params"]["fc"]["kernel"] + v["params"]["fc"]["bias"]


def np_get_images_loss(x_nhwc, targets, tv, sv, w):
  """One iteration's loss of deepinversion.py's get_images (no jitter), with
  the teacher/student `Tiny`; x is NHWC, the reference's terms are NCHW."""
  x = x_nhwc.transpose(0, 3, 1, 2)
  outputs = np_tiny(tv, x_nhwc)
  logp = np.log(np_softmax(outputs))
  loss = -logp[np.arange(len(targets)), targets].mean() * w["ce"]
  # DeepInversionFeatureHook on the BN input (= the images here).
  nch = x.shape[1]
  mean = x.mean((0, 2, 3))
  var = x.transpose(1, 0, 2, 3).reshape(nch, -1).var(1)
  st = tv["batch_stats"]["bn"]
  r_feature = (np.linalg.norm(st["var"] - var, 2)
               + np.linalg.norm(st["mean"] - mean, 2))
  d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
  d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
  d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
  d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
  tv_l2 = sum(np.linalg.norm(d.ravel()) for d in (d1, d2, d3, d4))
  tv_l1 = sum(np.abs(d).mean() for d in (d1, d2, d3, d4))
  l2 = np.linalg.norm(x.reshape(x.shape[0], -1), axis=1).mean()
  loss = (loss + w["tv2"] * tv_l2 + w["tv1"] * tv_l1 + w["bn"] * r_feature
          + w["l2"] * l2)
  # Adaptive DeepInversion (T = 3).
  T = 3.0
  P = np_softmax(np_tiny(sv, x_nhwc) / T)
  Q = np_softmax(outputs / T)
  M = 0.5 * (P + Q)
  P, Q, M = (np.clip(v, 0.01, 0.99) for v in (P, Q, M))
  b = x.shape[0]
  js = 0.5 * (M * (np.log(M) - np.log(P))).sum() / b + 0.5 * (
      M * (np.log(M) - np.log(Q))).sum() / b
  return loss + w["adi"] * (1.0 - np.clip(js, 0.0, 1.0))


def _tiny_variables(seed):
  r = np.random.default_rng(seed)
  m = Tiny()
  v = m.init(jax.random.key(seed), jnp.zeros((1, 4, 4, 2)))
  v = jax.tree_util.tree_map(np.asarray, v)
  v["batch_stats"]["bn"] = {"mean": r.standard_normal(2),
                            "var": r.uniform(0.5, 2.0, 2)}
  v["params"]["bn"] = {"scale": r.uniform(0.5, 1.5, 2),
                       "bias": r.standard_normal(2)}
  v["params"]["fc"] = {"kernel": 2 * r.standard_normal((2, 3)),
                       "bias": r.standard_normal(3)}
  return m, v


def test_inversion_step_matches_numpy_loss_and_finite_differences():
  w = {"ce": 1.0, "bn": 10.0, "tv2": 0.3, "tv1": 0.2, "l2": 0.05, "adi": 0.7}
  cfg = di.DeepInversionConfig(
      bn_weight=w["bn"], tv_l2_weight=w["tv2"], tv_l1_weight=w["tv1"],
      l2_weight=w["l2"], ce_weight=w["ce"], adi_weight=w["adi"], jitter=0)
  lr = 0.01
  with jax.enable_x64(True):
    m, tv = _tiny_variables(0)
    _, sv = _tiny_variables(1)
    tv64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tv)
    sv64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), sv)
    targets = jnp.array([0, 1, 2, 0])
    state = di.init_inversion(jax.random.key(0), (4, 4, 4, 2), optax.sgd(lr),
                              dtype=jnp.float64)
    step = jax.jit(di.make_inversion_step(m, cfg, optax.sgd(lr),
                                          student_apply=m))
    new, metrics = step(state, targets, tv64, sv64)
    x = np.asarray(state.images)
    f = lambda v: np_get_images_loss(v, np.asarray(targets), tv, sv, w)
    np.testing.assert_allclose(metrics["loss"], f(x), rtol=1e-10)
    assert 0.0 < float(metrics["competition"]) < 1.0  # clamp inactive
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
      e = np.zeros_like(x)
      e[idx] = 1e-6
      g[idx] = (f(x + e) - f(x - e)) / 2e-6
    np.testing.assert_allclose((x - np.asarray(new.images)) / lr, g,
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(new.best_images, x)   # loss of step 0 kept
    assert float(new.best_loss) == pytest.approx(f(x), rel=1e-10)


def test_bn_statistics_reads_bn_inputs_and_running_stats():
  """BN inputs equal the preceding conv outputs (kd_jax.capture, a separate
  mechanism); running statistics are the variables'."""
  m = models.create("cnn_bn", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
  v = jax.jit(m.init)(jax.random.key(1), x)
  v = {"params": v["params"], "batch_stats": jax.tree_util.tree_map(
      lambda a: a + 0.3, v["batch_stats"])}
  paths = []
  logits, recs = jax.jit(lambda v_, x_: di.bn_statistics(
      m, v_, x_, paths_out=paths))(v, x)
  assert paths == ["bn1", "bn2"]                         # 4-D inputs only
  (want_logits, feats) = jax.jit(lambda v_, x_: capture.capture(
      m.apply, ["conv1", "conv2"])(v_, x_))(v, x)
  np.testing.assert_allclose(logits, want_logits[0], rtol=1e-6)
  np.testing.assert_allclose(recs[0][0], feats["conv1"], rtol=1e-6)
  np.testing.assert_allclose(recs[1][0], feats["conv2"], rtol=1e-6)
  np.testing.assert_allclose(recs[1][1], v["batch_stats"]["bn2"]["mean"])
  np.testing.assert_allclose(recs[1][2], v["batch_stats"]["bn2"]["var"])
  paths = []
  jax.eval_shape(lambda v_, x_: di.bn_statistics(
      m, v_, x_, spatial_only=False, paths_out=paths), v, x)
  assert paths == ["bn1", "bn2", "bn3"]


def test_jitter_is_a_bounded_roll_and_flip():
  x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  cfg = di.DeepInversionConfig(jitter=2, flip=True)
  seen = set()
  for i in range(12):
    y = np.asarray(di._jitter(jax.random.key(i), x, cfg))  # pylint: disable=protected-access
    match = [(a, b, f) for a in range(-2, 3) for b in range(-2, 3)
             for f in (False, True)
             if np.array_equal(y, (lambda r: r[:, :, ::-1] if f else r)(
                 np.roll(np.asarray(x), (a, b), axis=(1, 2))))]
    assert match, i
    seen.add(match[0])
  assert len(seen) > 3


def test_resnet_teacher_matches_every_bn_layer():
  t = models.create("resnet8", num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  tv = jax.eval_shape(t.init, jax.random.key(0), x)
  _, recs = jax.eval_shape(lambda v, x_: di.bn_statistics(t, v, x_), tv, x)
  assert len(recs) == 9          # stem + 2 per block x 3 + 2 downsample BNs
  total, metrics = jax.eval_shape(lambda v, x_: di.inversion_loss(
      x_, jnp.zeros(2, jnp.int32), t, v, di.DeepInversionConfig()), tv, x)
  assert total.shape == () and "bn" in metrics


@pytest.mark.slow  # ~60 s on 2 loaded cores (compiles ResNet-8 forward/backward twice)
def test_resnet_teacher_synthesis_runs():
  t = models.create("resnet8", num_classes=10)
  s = models.create("resnet8", num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  tv = jax.jit(t.init)(jax.random.key(0), x)
  sv = jax.jit(s.init)(jax.random.key(1), x)
  cfg = di.DeepInversionConfig(adi_weight=0.2)
  images, metrics = di.synthesize(
      jax.random.key(2), t, tv, shape=(4, 32, 32, 3),
      targets=di.cycling_targets(4, 10), cfg=cfg, iterations=3, lr=0.05,
      student_apply=s, student_variables=sv)
  assert images.shape == (4, 32, 32, 3)
  assert all(np.isfinite(v) for v in metrics.values())
  assert {"ce", "bn", "tv_l2", "competition", "loss"} <= set(metrics)


def test_errors_and_grid(tmp_path):
  with pytest.raises(ValueError, match="jitter"):
    di.DeepInversionConfig(jitter=-1)
  with pytest.raises(ValueError, match="needs `student_apply`"):
    di.make_inversion_step(Tiny(), di.DeepInversionConfig(adi_weight=1.0),
                           optax.adam(0.1))
  mlp = models.create("mlp_student", num_classes=10)
  v = jax.jit(mlp.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="no BatchNorm"):
    di.inversion_loss(jnp.zeros((2, 28, 28, 1)), jnp.zeros(2, jnp.int32),
                      mlp, v, di.DeepInversionConfig())
  path = image_grid.save_image_grid(
      os.path.join(tmp_path, "g.png"),
      np.random.default_rng(0).normal(size=(5, 6, 6, 1)), nrow=3)
  from PIL import Image
  assert Image.open(path).size == (3 * 8 + 2, 2 * 8 + 2)
