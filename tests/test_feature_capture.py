"""Feature capture by module path on a user model that is not from the zoo."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd_jax.capture
from kd_jax import losses


class Block(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (3, 3), padding="SAME")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


class UserNet(nn.Module):
  """A plain classifier that returns only logits."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Block(4, name="layer1")(x, train)
    x = Block(6, name="layer2")(x, train)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = Block(8, name="layer3")(x, train)
    emb = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "embedding", emb)
    return nn.Dense(5, name="head")(emb)


@pytest.fixture(scope="module")
def setup():
  net = UserNet()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 2)),
                  jnp.float32)
  variables = jax.jit(net.init)(jax.random.PRNGKey(0), x)
  return net, variables, x


def test_capture_values_match_manual_forward(setup):
  net, variables, x = setup
  fwd = jax.jit(kd_jax.capture.capture(
      net.apply, ["layer2", "layer3/BatchNorm_0", "embedding"]))
  logits, feats = fwd(variables, x)
  assert set(feats) == {"layer2", "layer3/BatchNorm_0", "embedding"}
  np.testing.assert_allclose(logits, net.apply(variables, x), rtol=1e-5,
                             atol=1e-6)

  # independent forward pass, block by block, from the variables tree
  def block(name, features, h):
    sub = {c: variables[c][name] for c in ("params", "batch_stats")}
    return Block(features).apply(sub, h)
  h1 = block("layer1", 4, x)
  h2 = block("layer2", 6, h1)
  np.testing.assert_allclose(feats["layer2"], h2, rtol=1e-5, atol=1e-6)
  h3 = block("layer3", 8, nn.avg_pool(h2, (2, 2), strides=(2, 2)))
  # the BatchNorm output is layer3 before its ReLU
  assert feats["layer3/BatchNorm_0"].shape == (3, 4, 4, 8)
  np.testing.assert_allclose(jax.nn.relu(feats["layer3/BatchNorm_0"]), h3,
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.min(feats["layer3/BatchNorm_0"])) < 0   # really pre-ReLU
  np.testing.assert_allclose(feats["embedding"], h3.mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)


def test_missing_path_lists_available(setup):
  net, variables, x = setup
  fwd = kd_jax.capture.capture(net.apply, ["layer2", "layer9/Conv_0"])
  with pytest.raises(KeyError, match=r"\['layer9/Conv_0'\] not found") as e:
    jax.jit(fwd)(variables, x)
  msg = str(e.value)
  for p in ("layer1", "layer1/Conv_0", "layer2/BatchNorm_0", "layer3", "head",
            "embedding"):
    assert f"'{p}'" in msg, p


def test_list_paths(setup):
  net, variables, x = setup
  paths = kd_jax.capture.list_paths(net.apply, variables, x)
  assert set(paths) == {
      "layer1", "layer1/Conv_0", "layer1/BatchNorm_0", "layer2",
      "layer2/Conv_0", "layer2/BatchNorm_0", "layer3", "layer3/Conv_0",
      "layer3/BatchNorm_0", "head", "embedding"}


def test_training_mode_with_mutable_batch_stats(setup):
  net, variables, x = setup
  fwd = kd_jax.capture.capture(net.apply, ["layer1"])
  (logits, feats), updates = jax.jit(
      lambda v, x: fwd(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  ref_logits, ref_updates = net.apply(variables, x, train=True,
                                      mutable=["batch_stats"])
  assert set(updates) == {"batch_stats"}
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      dict(updates["batch_stats"]), dict(ref_updates["batch_stats"]))
  # training-mode BN: each channel of layer1's BN output has batch mean ~0
  # before the ReLU, so the ReLU output is nonnegative with zeros present
  assert float(jnp.min(feats["layer1"])) == 0.0


def test_gradients_flow_through_captured_features(setup):
  net, variables, x = setup
  fwd = kd_jax.capture.capture(net.apply, ["layer2"])
  target = jnp.ones((3, 8, 8, 6))

  def loss(params):
    _, feats = fwd({"params": params,
                    "batch_stats": variables["batch_stats"]}, x)
    return losses.fitnet_loss(feats["layer2"], target)
  g = jax.jit(jax.grad(loss))(variables["params"])
  norm = lambda t: float(sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(t)))
  assert norm(g["layer1"]) > 0 and norm(g["layer2"]) > 0
  assert norm(g["layer3"]) == 0.0 and norm(g["head"]) == 0.0


def test_distill_between_two_user_models(setup):
  """Captured features plug into the feature losses (AT between models)."""
  net, variables, x = setup
  student = nn.Sequential([nn.Conv(3, (3, 3)), nn.relu, nn.Conv(2, (3, 3))])
  sv = jax.jit(student.init)(jax.random.PRNGKey(1), x)
  t_fwd = kd_jax.capture.capture(net.apply, ["layer1"])
  s_fwd = kd_jax.capture.capture(student.apply, ["layers_0"])

  def loss(params):
    _, sf = s_fwd({"params": params}, x)
    _, tf = t_fwd(variables, x)
    return losses.at_loss(sf["layers_0"], tf["layer1"])
  val, g = jax.jit(jax.value_and_grad(loss))(sv["params"])
  assert float(val) > 0
  assert float(jnp.abs(g["layers_0"]["kernel"]).max()) > 0


def test_bad_arguments(setup):
  net, variables, x = setup
  with pytest.raises(ValueError, match="`paths` must be a non-empty list"):
    kd_jax.capture.capture(net.apply, [])
  with pytest.raises(TypeError, match="every entry of `paths` must be a string"):
    kd_jax.capture.capture(net.apply, ["layer1", 3])
  with pytest.raises(ValueError, match="duplicate module path 'layer1'"):
    kd_jax.capture.capture(net.apply, ["layer1", "/layer1/"])
  fwd = kd_jax.capture.capture(net.apply, "layer1")   # a single string
  with pytest.raises(ValueError, match="do not pass `capture_intermediates`"):
    fwd(variables, x, capture_intermediates=True)
