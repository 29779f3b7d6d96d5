"""Tests of kd_jax.data.views (per-model input views) and of the MNIST
models they feed (LeNet-5 pair, BN CNN, any-size MLP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from kd_jax import models
from kd_jax.data import views


def _pil_resize(img2d, size):
  """PIL BILINEAR on a float ('F' mode) image: what scipy.misc.imresize(x,
  25, mode='F') and torchvision's Resize compute (before any rounding)."""
  return np.asarray(Image.fromarray(img2d.astype(np.float32), mode="F").resize(
      (size, size), Image.BILINEAR), np.float64)


@pytest.mark.parametrize("size", [7, 14, 32])
def test_resize_matches_pil_bilinear(size):
  x = np.random.default_rng(0).uniform(0, 255, (3, 28, 28, 1)).astype(
      np.float32)
  out = views.make_view("resize", size=size)({"image": jnp.asarray(x)}, None)
  ref = np.stack([_pil_resize(im[..., 0], size) for im in x])[..., None]
  np.testing.assert_allclose(out["image"], ref, rtol=0, atol=1e-3)


def test_resize_commutes_with_normalization():
  x = np.random.default_rng(1).uniform(0, 255, (2, 28, 28, 1)).astype(
      np.float32)
  norm = lambda a: (a / 255.0 - 0.1307) / 0.3081
  v = views.make_view("downscale", size=7)
  a = v({"image": jnp.asarray(norm(x))}, None)["image"]
  b = norm(v({"image": jnp.asarray(x)}, None)["image"])
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_model_views_give_each_model_its_view_and_keep_other_keys():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 28, 28, 1)),
                  jnp.float32)
  batch = {"image": x, "label": jnp.arange(4), "index": jnp.arange(4)}
  fn = jax.jit(views.model_views(student={"name": "downscale", "size": 7},
                                 teacher="identity"))
  out = fn(batch, jax.random.key(0))
  assert out["image"].shape == (4, 7, 7, 1)
  np.testing.assert_array_equal(out["teacher_image"], x)
  np.testing.assert_array_equal(out["label"], batch["label"])
  # The student's view is a function of its own image only.
  np.testing.assert_allclose(
      out["image"], views.downscale(7)({"image": x}, None)["image"])


def test_gaussian_noise_is_per_example_and_deterministic():
  x = jnp.zeros((3, 4, 4, 1))
  v = views.make_view("gaussian_noise", std=2.0)
  a = v({"image": x, "index": jnp.array([5, 6, 7])}, jax.random.key(0))
  b = v({"image": x[1:], "index": jnp.array([6, 7])}, jax.random.key(0))
  np.testing.assert_array_equal(a["image"][1:], b["image"])
  assert 1.0 < float(jnp.std(a["image"])) < 3.0
  with pytest.raises(ValueError, match="PRNG"):
    v({"image": x}, None)


def test_view_registry_and_errors():
  assert {"identity", "resize", "downscale", "gaussian_noise"} <= set(
      views.available_views())
  with pytest.raises(ValueError, match="unknown view 'blur'"):
    views.make_view("blur")
  with pytest.raises(ValueError, match="bad arguments"):
    views.make_view("downscale", width=3)
  with pytest.raises(ValueError, match="needs a 'name'"):
    views.make_view({"size": 7})
  with pytest.raises(KeyError, match="no 'image'"):
    views.make_view("downscale")({"img": jnp.zeros((1, 8, 8, 1))}, None)
  with pytest.raises(ValueError, match="already registered"):
    views.register_view("resize", lambda: None)
  fn = lambda batch, rng: batch
  assert views.make_view(fn) is fn
  views.register_view("_test_flip", lambda: (
      lambda b, r: {**b, "image": b["image"][:, :, ::-1]}))
  try:
    out = views.make_view("_test_flip")({"image": jnp.arange(4.).reshape(
        1, 1, 4, 1)}, None)
    np.testing.assert_array_equal(out["image"][0, 0, :, 0], [3, 2, 1, 0])
  finally:
    views.VIEWS.pop("_test_flip")


def test_select_view_gives_the_teacher_another_modality():
  batch = {"image": jnp.zeros((2, 7, 7, 1)), "depth": jnp.ones((2, 5, 5, 3))}
  out = views.model_views(teacher={"name": "select", "key": "depth"})(
      batch, None)
  np.testing.assert_array_equal(out["teacher_image"], batch["depth"])
  np.testing.assert_array_equal(out["image"], batch["image"])
  with pytest.raises(KeyError, match="no 'audio'"):
    views.make_view("select", key="audio")(batch, None)


def test_view_output_shape():
  assert views.view_output_shape("downscale", (28, 28, 1)) == (7, 7, 1)
  assert views.view_output_shape({"name": "resize", "size": 32},
                                 (28, 28, 1)) == (32, 32, 1)
  assert views.view_output_shape(None, (28, 28, 1)) == (28, 28, 1)


# ---------------------------------------------------------------------------
# The MNIST models of the data-free / privileged reproductions.
# ---------------------------------------------------------------------------


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,count", [("lenet5", 61_706),
                                        ("lenet5_half", 15_738)])
def test_lenet5_pair_matches_authors_definition(name, count):
  """Parameter counts of DAFL's `lenet.py` (sum of p.numel(): conv 6-16-120,
  fc 84 / conv 3-8-60, fc 42), shapes and the 120-d (60-d) feature."""
  m = models.create(name, num_classes=10)
  x = models.example_input(name, 2)
  v = jax.eval_shape(m.init, jax.random.key(0), x)
  assert _count(v["params"]) == count
  logits, feats = jax.eval_shape(m.apply, v, x)
  assert logits.shape == (2, 10)
  assert feats["pooled"].shape == (2, 120 if name == "lenet5" else 60)
  with pytest.raises(ValueError, match="32, 32"):
    jax.eval_shape(m.apply, v, jnp.zeros((1, 28, 28, 1)))


def test_lenet5_matches_torch_forward():
  torch = pytest.importorskip("torch")
  tnn = torch.nn

  class TorchLeNet5(tnn.Module):   # DAFL lenet.py LeNet5, transcribed
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(1, 6, 5)
      self.conv2 = tnn.Conv2d(6, 16, 5)
      self.conv3 = tnn.Conv2d(16, 120, 5)
      self.fc1 = tnn.Linear(120, 84)
      self.fc2 = tnn.Linear(84, 10)

    def forward(self, img):
      o = torch.max_pool2d(torch.relu(self.conv1(img)), 2, 2)
      o = torch.max_pool2d(torch.relu(self.conv2(o)), 2, 2)
      feature = torch.relu(self.conv3(o)).view(-1, 120)
      return self.fc2(torch.relu(self.fc1(feature))), feature

  torch.manual_seed(0)
  ref = TorchLeNet5().double()
  params = {}
  for i in (1, 2, 3):
    c = getattr(ref, f"conv{i}")
    params[f"conv{i}"] = {
        "kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0),
        "bias": c.bias.detach().numpy()}
  for n in ("fc1", "fc2"):
    f = getattr(ref, n)
    params[n] = {"kernel": f.weight.detach().numpy().T,
                 "bias": f.bias.detach().numpy()}
  x = np.random.default_rng(3).standard_normal((2, 1, 32, 32))
  with torch.no_grad():
    t_logits, t_feat = ref(torch.from_numpy(x))
  m = models.create("lenet5", num_classes=10)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  logits, feats = jax.jit(m.apply)(
      {"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
  np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(feats["pooled"], t_feat.numpy(), rtol=1e-4,
                             atol=1e-5)


def test_bn_cnn_has_batch_stats_and_updates_them():
  m = models.create("cnn_bn", num_classes=10)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  v = jax.jit(m.init)(jax.random.key(1), x)
  assert set(v["batch_stats"]) == {"bn1", "bn2", "bn3"}
  (_, _), upd = jax.jit(lambda v_, x_: m.apply(
      v_, x_, train=True, mutable=["batch_stats"]))(v, x)
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], 0)
  logits, _ = jax.jit(m.apply)(v, x)
  assert logits.shape == (4, 10)


def test_lopez_paz_mlp_takes_any_size_and_uses_glorot_init():
  m = models.create("lopez_paz_mlp_7x7", num_classes=10)
  x = models.example_input("lopez_paz_mlp_7x7", 3)
  v = m.init(jax.random.key(0), x)
  k = v["params"]["Dense_0"]["kernel"]
  assert k.shape == (49, 20)
  bound = np.sqrt(6.0 / (49 + 20))          # Glorot uniform
  assert float(jnp.max(jnp.abs(k))) <= bound and float(jnp.max(jnp.abs(k))) > 0.8 * bound
  assert float(jnp.max(jnp.abs(v["params"]["Dense_0"]["bias"]))) == 0.0
  logits, _ = m.apply(v, x)
  assert logits.shape == (3, 10)
  assert models.input_shape("lopez_paz_mlp") == (28, 28, 1)
