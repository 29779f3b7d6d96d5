"""Tests for kd_jax.losses.datafree (DAFL, DeepInversion, ADI) and
kd_jax.losses.privileged (generalized distillation).

References are float64 NumPy transcriptions of the authors' PyTorch / Keras
code (NCHW transcriptions are fed the NHWC inputs transposed); gradients are
checked against central finite differences of those references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses


# ---------------------------------------------------------------------------
# float64 NumPy transcriptions of the authors' code.
# ---------------------------------------------------------------------------


def np_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_dafl_losses(outputs_t, features_t):
  """DAFL-train.py: loss_one_hot, loss_information_entropy, loss_activation."""
  pred = outputs_t.argmax(1)
  loss_one_hot = -np_log_softmax(outputs_t)[np.arange(len(pred)), pred].mean()
  loss_activation = -np.abs(features_t).mean()
  p = np_softmax(outputs_t, 1).mean(0)
  loss_ie = (p * np.log10(p)).sum()
  return loss_one_hot, loss_ie, loss_activation


def np_bn_hook(x_nchw, running_mean, running_var):
  """DeepInversionFeatureHook.hook_fn on an NCHW input."""
  nch = x_nchw.shape[1]
  mean = x_nchw.mean((0, 2, 3))
  var = x_nchw.transpose(1, 0, 2, 3).reshape(nch, -1).var(1)  # unbiased=False
  return (np.linalg.norm(running_var - var, 2)
          + np.linalg.norm(running_mean - mean, 2))


def np_image_priors(x):
  """get_image_prior_losses on an NCHW batch -> (loss_var_l1, loss_var_l2)."""
  d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
  d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
  d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
  d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
  l2 = sum(np.sqrt((d ** 2).sum()) for d in (d1, d2, d3, d4))
  l1 = sum((np.abs(d) / 255.0).mean() for d in (d1, d2, d3, d4)) * 255.0
  return l1, l2


def np_adi(outputs_student, outputs, T=3.0):
  """loss_verifier_cig of deepinversion.py (KLDivLoss 'batchmean')."""
  P = np_softmax(outputs_student / T)
  Q = np_softmax(outputs / T)
  M = 0.5 * (P + Q)
  P, Q, M = (np.clip(v, 0.01, 0.99) for v in (P, Q, M))
  b = outputs.shape[0]
  kl = lambda log_input, target: (target * (np.log(target) - log_input)).sum() / b
  js = 0.5 * kl(np.log(P), M) + 0.5 * kl(np.log(Q), M)
  return 1.0 - np.clip(js, 0.0, 1.0)


def np_generalized_distillation(s, t, T, lam, y):
  """code/mnist.py: (1-l) CE(y, softmax(w3)) + t*t*l CE(softmax(z_t/T), softmax(w3)).

  Keras' categorical_crossentropy clips probabilities to [1e-7, 1 - 1e-7];
  the test inputs keep every probability inside that range.
  """
  p = np.clip(np_softmax(s), 1e-7, 1 - 1e-7)
  soft = np_softmax(t / T)
  hard = -np.log(p[np.arange(len(y)), y])
  imit = -(soft * np.log(p)).sum(-1)
  return (1 - lam) * hard.mean() + T * T * lam * imit.mean()


def fd_grad(f, x, eps=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def rng(seed):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# DAFL.
# ---------------------------------------------------------------------------


def test_dafl_losses_match_authors_code():
  r = rng(0)
  z = (3 * r.standard_normal((8, 10))).astype(np.float32)
  f = r.standard_normal((8, 120)).astype(np.float32)
  oh, ie, act = np_dafl_losses(z.astype(np.float64), f.astype(np.float64))
  got_oh = jnp.mean(losses.dafl_one_hot_loss(z))
  got_act = jnp.mean(losses.dafl_activation_loss(f))
  got_ie = losses.dafl_information_entropy_loss(z)
  np.testing.assert_allclose(got_oh, oh, rtol=1e-5)
  np.testing.assert_allclose(got_act, act, rtol=1e-5)
  np.testing.assert_allclose(got_ie, ie, rtol=1e-5)
  # Natural-log variant = the paper's entropy.
  np.testing.assert_allclose(
      losses.dafl_information_entropy_loss(z, log_base=np.e),
      ie * np.log(10.0), rtol=1e-5)


def test_dafl_weighted_total_gradient_matches_finite_differences(x64):
  """The generator's loss oh + 5 ie + 0.1 a (the authors' MNIST weights) as a
  function of the teacher's logits and features."""
  r = rng(1)
  z = 2 * r.standard_normal((6, 5))
  f = r.standard_normal((6, 7))

  def np_total(z_, f_):
    oh, ie, act = np_dafl_losses(z_, f_)
    return oh + 5 * ie + 0.1 * act

  def jax_total(z_, f_):
    return (jnp.mean(losses.dafl_one_hot_loss(z_))
            + 5 * losses.dafl_information_entropy_loss(z_)
            + 0.1 * jnp.mean(losses.dafl_activation_loss(f_)))

  gz, gf = jax.jit(jax.grad(jax_total, argnums=(0, 1)))(z, f)
  np.testing.assert_allclose(gz, fd_grad(lambda v: np_total(v, f), z),
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(gf, fd_grad(lambda v: np_total(z, v), f),
                             rtol=1e-6, atol=1e-9)


def test_dafl_where_and_masks():
  z = jnp.array([[1.0, 2.0, 0.5], [jnp.nan, 0.0, 0.0]])
  where = jnp.array([True, False])
  out = losses.dafl_one_hot_loss(z, where=where)
  assert float(out[1]) == 0.0 and np.isfinite(float(out[0]))
  g = jax.grad(lambda v: jnp.sum(losses.dafl_one_hot_loss(v, where=where)))(z)
  assert np.all(np.isfinite(np.asarray(g)))


def test_dafl_information_entropy_zero_probability_is_finite():
  # One class never predicted (its mean probability underflows to 0).
  z = jnp.array([[0.0, 0.0, -1e4], [0.0, 1.0, -1e4]])
  v, g = jax.value_and_grad(losses.dafl_information_entropy_loss)(z)
  assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))


def test_dafl_information_entropy_global_batch_under_pmap():
  n = jax.local_device_count()
  if n < 2:
    pytest.skip("needs several devices")
  z = rng(2).standard_normal((n * 3, 10)).astype(np.float32)
  full = losses.dafl_information_entropy_loss(z)
  per = jax.pmap(lambda v: losses.dafl_information_entropy_loss(
      v, axis_name="d"), axis_name="d")(z.reshape(n, 3, 10))
  np.testing.assert_allclose(per, np.full(n, full), rtol=1e-5)


def test_dafl_bad_inputs():
  with pytest.raises(ValueError, match="log_base"):
    losses.dafl_information_entropy_loss(jnp.zeros((2, 3)), log_base=1.0)
  with pytest.raises(TypeError, match="teacher_logits"):
    losses.dafl_one_hot_loss(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="teacher_features"):
    losses.dafl_activation_loss(jnp.zeros((3,)))


# ---------------------------------------------------------------------------
# DeepInversion.
# ---------------------------------------------------------------------------


def test_bn_statistics_loss_matches_hook():
  r = rng(3)
  x = r.standard_normal((4, 5, 6, 3)).astype(np.float32) * 2 + 1
  rm = r.standard_normal(3).astype(np.float32)
  rv = r.uniform(0.5, 2, 3).astype(np.float32)
  ref = np_bn_hook(x.transpose(0, 3, 1, 2).astype(np.float64), rm, rv)
  np.testing.assert_allclose(losses.bn_statistics_loss(x, rm, rv), ref,
                             rtol=1e-5)
  # [B, C] inputs (BatchNorm1d-style) are accepted as well.
  x2 = x.reshape(-1, 3)
  ref2 = np.linalg.norm(rv - x2.astype(np.float64).var(0)) + np.linalg.norm(
      rm - x2.astype(np.float64).mean(0))
  np.testing.assert_allclose(losses.bn_statistics_loss(x2, rm, rv), ref2,
                             rtol=1e-5)


def test_bn_statistics_loss_gradient(x64):
  r = rng(4)
  x = r.standard_normal((3, 2, 2, 2))
  rm, rv = r.standard_normal(2), r.uniform(0.5, 2, 2)
  g = jax.grad(lambda v: losses.bn_statistics_loss(v, rm, rv))(x)
  ref = fd_grad(lambda v: np_bn_hook(v.transpose(0, 3, 1, 2), rm, rv), x)
  np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-9)


def test_bn_statistics_loss_global_batch_under_pmap():
  n = jax.local_device_count()
  if n < 2:
    pytest.skip("needs several devices")
  r = rng(5)
  x = r.standard_normal((n * 2, 3, 3, 4)).astype(np.float32)
  rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
  full = losses.bn_statistics_loss(x, rm, rv)
  per = jax.pmap(lambda v: losses.bn_statistics_loss(v, rm, rv, axis_name="d"),
                 axis_name="d")(x.reshape((n, 2) + x.shape[1:]))
  np.testing.assert_allclose(per, np.full(n, full), rtol=1e-5, atol=1e-6)


def test_bn_statistics_loss_bad_shapes():
  with pytest.raises(ValueError, match="running_mean"):
    losses.bn_statistics_loss(jnp.zeros((2, 3)), jnp.zeros(4), jnp.ones(3))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_image_total_variation_matches_reference(kind):
  x = rng(6).standard_normal((3, 5, 4, 2)).astype(np.float32)
  l1, l2 = np_image_priors(x.transpose(0, 3, 1, 2).astype(np.float64))
  np.testing.assert_allclose(losses.image_total_variation(x, kind=kind),
                             l1 if kind == "l1" else l2, rtol=1e-5)


def test_image_total_variation_gradient(x64):
  x = rng(7).standard_normal((2, 3, 3, 1))
  for i, kind in enumerate(("l1", "l2")):
    g = jax.grad(lambda v: losses.image_total_variation(v, kind=kind))(x)
    ref = fd_grad(lambda v: np_image_priors(v.transpose(0, 3, 1, 2))[i], x)
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-8)


def test_image_total_variation_constant_image_has_finite_gradient():
  g = jax.grad(lambda v: losses.image_total_variation(v))(jnp.ones((1, 3, 3, 1)))
  assert np.all(np.asarray(g) == 0.0)


def test_image_priors_bad_input():
  with pytest.raises(ValueError, match="kind"):
    losses.image_total_variation(jnp.zeros((1, 3, 3, 1)), kind="l3")
  with pytest.raises(ValueError, match="H, W >= 2"):
    losses.image_total_variation(jnp.zeros((1, 1, 3, 1)))
  with pytest.raises(ValueError, match="NHWC"):
    losses.image_total_variation(jnp.zeros((3, 3, 1)))


def test_image_l2_norm_matches_both_reference_forms():
  x = rng(8).standard_normal((4, 3, 3, 2)).astype(np.float32)
  x64_ = x.astype(np.float64)
  per = losses.image_l2_norm(x)
  # ImageNet script: torch.norm(x.view(B, -1), dim=1).mean()
  np.testing.assert_allclose(jnp.mean(per),
                             np.linalg.norm(x64_.reshape(4, -1), axis=1).mean(),
                             rtol=1e-5)
  # CIFAR script: torch.norm(x) of the whole batch.
  np.testing.assert_allclose(jnp.sqrt(jnp.sum(per ** 2)),
                             np.sqrt((x64_ ** 2).sum()), rtol=1e-5)


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_adi_competition_matches_authors_code(scale):
  r = rng(9)
  s = (scale * r.standard_normal((5, 10))).astype(np.float32)
  t = (scale * r.standard_normal((5, 10))).astype(np.float32)
  ref = np_adi(s.astype(np.float64), t.astype(np.float64))
  np.testing.assert_allclose(losses.adi_competition_loss(s, t), ref,
                             rtol=1e-5, atol=1e-6)


def test_adi_competition_gradient_reaches_both_networks(x64):
  r = rng(10)
  s, t = 2 * r.standard_normal((4, 6)), 2 * r.standard_normal((4, 6))
  assert 0 < 1 - np_adi(s, t) < 1          # the clamp on the mean is inactive
  gs, gt = jax.grad(losses.adi_competition_loss, argnums=(0, 1))(s, t)
  np.testing.assert_allclose(gs, fd_grad(lambda v: np_adi(v, t), s),
                             rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(gt, fd_grad(lambda v: np_adi(s, v), t),
                             rtol=1e-5, atol=1e-9)
  assert np.abs(np.asarray(gt)).max() > 0   # no stop_gradient on the teacher


def test_adi_bad_input():
  with pytest.raises(ValueError, match="clip"):
    losses.adi_competition_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), clip=0.0)
  with pytest.raises(ValueError, match="rank 2"):
    losses.adi_competition_loss(jnp.zeros((3,)), jnp.zeros((3,)))


# ---------------------------------------------------------------------------
# Generalized distillation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T,lam", [(1.0, 0.0), (2.0, 0.3), (10.0, 0.7),
                                   (50.0, 1.0)])
def test_generalized_distillation_matches_authors_objective(T, lam):
  r = rng(11)
  s = (2 * r.standard_normal((6, 10))).astype(np.float32)
  t = (4 * r.standard_normal((6, 10))).astype(np.float32)
  y = r.integers(0, 10, 6)
  import optax
  got = ((1 - lam) * jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      s, y)) + lam * jnp.mean(losses.generalized_distillation_loss(
          s, t, temperature=T)))
  ref = np_generalized_distillation(s.astype(np.float64), t.astype(np.float64),
                                    T, lam, y)
  np.testing.assert_allclose(got, ref, rtol=2e-5)


def test_generalized_distillation_gradient_and_teacher_constant(x64):
  r = rng(12)
  s, t = r.standard_normal((3, 4)), 3 * r.standard_normal((3, 4))
  y = np.zeros(3, int)
  f = lambda v: jnp.mean(losses.generalized_distillation_loss(
      v, t, temperature=5.0))
  ref = fd_grad(lambda v: np_generalized_distillation(v, t, 5.0, 1.0, y), s)
  np.testing.assert_allclose(jax.grad(f)(s), ref, rtol=1e-6, atol=1e-9)
  gt = jax.grad(lambda v: jnp.mean(losses.generalized_distillation_loss(
      s, v, temperature=5.0)))(t)
  assert np.all(np.asarray(gt) == 0)
  # Without the T^2 factor: the paper's Eq. 2 term.
  np.testing.assert_allclose(
      losses.generalized_distillation_loss(s, t, temperature=5.0,
                                           scale_by_t2=False) * 25,
      losses.generalized_distillation_loss(s, t, temperature=5.0))


def test_generalized_distillation_is_a_registered_logit_loss():
  from kd_jax import train
  assert train.resolve_loss("generalized_distillation") is (
      losses.generalized_distillation_loss)
