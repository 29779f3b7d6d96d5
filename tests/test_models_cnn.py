"""Tests of the CIFAR / ImageNet CNN families (ResNet, WRN, VGG, torchvision ResNet)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models

try:
  import torch  # noqa: F401
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="torch (optional extra) not installed: the "
    "PyTorch reference definitions cannot be built")

# Parameter counts of the reference PyTorch definitions (sum of p.numel()),
# 100-class head for CIFAR models, 1000-class head for ImageNet models.
# Sources: RepDistiller / mdistiller `resnet.py`, `wrn.py`, `vgg.py` (vggN_bn),
# `resnetv2.py`, counted with `tests/torch_reference_models.py` (which
# `test_param_counts_match_torch_reference` re-counts when torch is present);
# the commonly quoted rounded numbers: resnet20 0.28M, resnet56 0.86M, resnet32x4
# 7.43M, wrn_40_2 2.26M, vgg13 9.46M; torchvision's model docs list resnet18
# 11,689,512, resnet34 21,797,672, resnet50 25,557,032 parameters.
REFERENCE_PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "resnet18_cifar": 11_220_132,
    "resnet50_cifar": 23_705_252,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
}
ISSUE_ROUNDED_M = {"resnet20": 0.28, "resnet56": 0.86, "resnet32x4": 7.43,
                   "wrn_40_2": 2.26, "vgg13": 9.46, "resnet18": 11.69}
IMAGENET = ("resnet18", "resnet34", "resnet50")
ALL = tuple(REFERENCE_PARAM_COUNTS)

# Expected NHWC feature shapes (H, W, C) from the reference forward passes.
_R = [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64)]
_RX4 = [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256)]
_VGG = [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]


def _wrn(k):
  return [(32, 32, 16), (32, 32, 16 * k), (16, 16, 32 * k), (8, 8, 64 * k)]


def _v2(e):
  return [(32, 32, 64), (32, 32, 64 * e), (16, 16, 128 * e), (8, 8, 256 * e),
          (4, 4, 512 * e)]


def _tv(e):
  return [(112, 112, 64), (56, 56, 64 * e), (28, 28, 128 * e),
          (14, 14, 256 * e), (7, 7, 512 * e)]


EXPECTED_STAGES = {
    **{n: _R for n in ("resnet8", "resnet14", "resnet20", "resnet32",
                       "resnet44", "resnet56", "resnet110")},
    "resnet8x4": _RX4, "resnet32x4": _RX4,
    "wrn_16_1": _wrn(1), "wrn_40_1": _wrn(1),
    "wrn_16_2": _wrn(2), "wrn_40_2": _wrn(2),
    **{n: _VGG for n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "resnet18_cifar": _v2(1), "resnet50_cifar": _v2(4),
    "resnet18": _tv(1), "resnet34": _tv(1), "resnet50": _tv(4),
}


def _num_classes(name):
  return 1000 if name in IMAGENET else 100


@functools.lru_cache(maxsize=None)
def _shapes(name, num_classes=None, batch=2):
  model = models.create(name, num_classes=num_classes or _num_classes(name))
  x = models.example_input(name, batch)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _count(tree):
  return sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def _init(name, num_classes=10, dtype=jnp.float32):
  model = models.create(name, num_classes=num_classes, dtype=dtype)
  x = jnp.zeros((2, 32, 32, 3))
  init = jax.jit(functools.partial(model.init, train=False))
  return model, init(_key(0), x)


@functools.lru_cache(maxsize=None)
def _apply(name, train, dtype=jnp.float32):
  """Jitted apply (eager op-by-op dispatch is slow on the shared CPU)."""
  model, _ = _init(name, dtype=dtype)
  if train:
    return jax.jit(functools.partial(model.apply, train=True,
                                     mutable=["batch_stats"]))
  return jax.jit(functools.partial(model.apply, train=False))


def _key(seed):
  # The "rbg" PRNG compiles much faster on CPU than threefry (init of a
  # ResNet draws ~20 differently shaped tensors); distributions are the same.
  return jax.random.key(seed, impl="rbg")


def _image(seed=0, batch=2, hw=32):
  return jax.random.normal(jax.random.key(seed), (batch, hw, hw, 3))


# ---------------------------------------------------------------------------
# Registry and parameter counts
# ---------------------------------------------------------------------------


def test_all_models_registered():
  missing = set(ALL) - set(models.available_models())
  assert not missing


@pytest.mark.parametrize("name", ALL)
def test_param_counts_match_reference(name):
  n = _count(_shapes(name)["params"])
  ref = REFERENCE_PARAM_COUNTS[name]
  assert abs(n - ref) <= 0.005 * ref, (name, n, ref)
  if name in ISSUE_ROUNDED_M:
    assert round(n / 1e6, 2) == ISSUE_ROUNDED_M[name]


@needs_torch
def test_param_counts_match_torch_reference():
  import torch_reference_models as ref
  for name in ALL:
    nc = _num_classes(name)
    with torch.device("meta"):  # shapes only, no init work
      torch_count = sum(p.numel() for p in ref.build(name, nc).parameters())
    n = _count(_shapes(name)["params"])
    assert abs(n - torch_count) <= 0.005 * torch_count, (name, n, torch_count)


def test_batch_stats_are_float32_and_match_bn_params():
  shapes = _shapes("resnet8")
  stats = jax.tree_util.tree_leaves(shapes["batch_stats"])
  assert stats and all(s.dtype == jnp.float32 for s in stats)
  # one (mean, var) pair per BN (scale, bias) pair: 2 per BN in each tree.
  n_bn_params = sum(1 for p, _ in jax.tree_util.tree_flatten_with_path(
      shapes["params"])[0] if p[-1].key == "scale")
  assert len(stats) == 2 * n_bn_params


# ---------------------------------------------------------------------------
# Output contract
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_output_and_feature_shapes(name):
  """Abstract evaluation (`jax.eval_shape`) of every model, batch 2."""
  nc = _num_classes(name)
  model = models.create(name, num_classes=nc)
  x = models.example_input(name, 2)
  variables = _shapes(name)
  logits, feats = jax.eval_shape(
      lambda v: model.apply(v, x, train=False), variables)
  assert logits.shape == (2, nc) and logits.dtype == jnp.float32
  expected = EXPECTED_STAGES[name]
  assert [tuple(f.shape) for f in feats["stages"]] == [
      (2,) + s for s in expected]
  assert [tuple(f.shape) for f in feats["preact_stages"]] == [
      (2,) + s for s in expected]
  assert tuple(feats["pooled"].shape) == (2, expected[-1][-1])
  if name not in ("resnet8", "wrn_16_1", "vgg8", "resnet18_cifar", "resnet18"):
    return  # train-mode tracing of one model per family is enough
  # train mode: same shapes, batch_stats returned as mutated collection.
  (logits_t, feats_t), upd = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]),
      variables)
  assert logits_t.shape == (2, nc)
  assert jax.tree_util.tree_structure(upd["batch_stats"]) == \
      jax.tree_util.tree_structure(variables["batch_stats"])


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8"])
def test_forward_relations_between_features(name):
  """Concrete forward: stage/preact relations and pooled = mean of last stage."""
  _, variables = _init(name)
  logits, feats = _apply(name, False)(variables, _image())
  assert np.all(np.isfinite(np.asarray(logits)))
  last = np.asarray(feats["stages"][-1], np.float64)
  pooled_from = last
  if name.startswith("wrn"):  # pooled = mean(relu(bn(f3))) = relu(preact[-1])
    pooled_from = np.maximum(np.asarray(feats["preact_stages"][-1]), 0)
  else:  # ReLU stages: stage = relu(preact) (stage 0 repeated in preact)
    for s, p in zip(feats["stages"][1:], feats["preact_stages"][1:]):
      np.testing.assert_allclose(np.asarray(s), np.maximum(np.asarray(p), 0),
                                 rtol=0, atol=0)
      assert np.any(np.asarray(p) < 0)  # preact really is before the ReLU
  np.testing.assert_allclose(np.asarray(feats["pooled"]),
                             pooled_from.mean(axis=(1, 2)), rtol=1e-5,
                             atol=1e-6)
  # classifier: logits = pooled @ W + b.
  head = {"resnet8": "fc", "wrn_16_1": "fc", "vgg8": "classifier"}[name]
  w = np.asarray(variables["params"][head]["kernel"], np.float64)
  b = np.asarray(variables["params"][head]["bias"], np.float64)
  np.testing.assert_allclose(
      np.asarray(logits), np.asarray(feats["pooled"], np.float64) @ w + b,
      rtol=1e-5, atol=1e-5)


def test_forward_imagenet_small_input():
  """torchvision ResNets accept any H, W >= 32 (adaptive pooling)."""
  model = models.create("resnet18", num_classes=5)
  x = _image(hw=64, batch=1)
  v = jax.jit(functools.partial(model.init, train=False))(_key(0), x)
  logits, feats = jax.jit(functools.partial(model.apply, train=False))(v, x)
  assert logits.shape == (1, 5)
  assert [f.shape[1] for f in feats["stages"]] == [32, 16, 8, 4, 2]
  # stem preact is the BN output before the ReLU (mdistiller convention).
  np.testing.assert_array_equal(np.asarray(feats["stages"][0]),
                                np.maximum(np.asarray(feats["preact_stages"][0]),
                                           0))


# ---------------------------------------------------------------------------
# BatchNorm: train vs eval
# ---------------------------------------------------------------------------


def _np_conv3x3_same(x, k):
  """float64 NumPy 3x3 stride-1 padding-1 conv; x NHWC, k HWIO."""
  x = np.asarray(x, np.float64)
  k = np.asarray(k, np.float64)
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, k.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += xp[:, dy:dy + h, dx:dx + w, :] @ k[dy, dx]
  return out


def test_train_mode_updates_batch_stats_with_torch_momentum():
  _, variables = _init("resnet8")
  x = _image(1)
  (_, _), upd = _apply("resnet8", True)(variables, x)
  conv_out = _np_conv3x3_same(x, variables["params"]["conv1"]["kernel"])
  batch_mean = conv_out.mean(axis=(0, 1, 2))
  batch_var = conv_out.var(axis=(0, 1, 2))  # biased (see _layers docstring)
  stats = upd["batch_stats"]["bn1"]
  # torch momentum 0.1: new = 0.9 * old + 0.1 * batch; init mean 0, var 1.
  np.testing.assert_allclose(stats["mean"], 0.1 * batch_mean, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * batch_var, rtol=1e-4,
                             atol=1e-6)
  assert stats["mean"].dtype == jnp.float32


def test_eval_mode_is_per_example_train_mode_is_not():
  model, variables = _init("resnet8")
  x = _image(2, batch=2)
  full, _ = _apply("resnet8", False)(variables, x)
  first, _ = _apply("resnet8", False)(variables, x[:1])
  np.testing.assert_allclose(np.asarray(first)[0], np.asarray(full)[0],
                             rtol=1e-5, atol=1e-5)
  (full_t, _), _ = _apply("resnet8", True)(variables, x)
  (half_t, _), _ = _apply("resnet8", True)(variables, x[:1])
  assert not np.allclose(np.asarray(full_t)[0], np.asarray(half_t)[0],
                         atol=1e-3)
  # eval mode does not touch the statistics.
  _, upd = jax.jit(functools.partial(
      model.apply, train=False, mutable=["batch_stats"]))(variables, x)
  jax.tree_util.tree_map(np.testing.assert_array_equal, upd["batch_stats"],
                         variables["batch_stats"])


def test_train_without_mutable_batch_stats_raises():
  model, variables = _init("resnet8")
  with pytest.raises(Exception, match="batch_stats"):
    model.apply(variables, _image(), train=True)


# ---------------------------------------------------------------------------
# jit, bf16, initialization
# ---------------------------------------------------------------------------


def test_jit_matches_eager():
  model, variables = _init("resnet8")
  x = _image(3)
  eager, _ = model.apply(variables, x, train=False)
  jitted, feats = jax.jit(
      functools.partial(model.apply, train=False))(variables, x)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager),
                             rtol=1e-4, atol=1e-5)
  assert len(feats["stages"]) == 4


@pytest.mark.parametrize("name", ["resnet8", "vgg8"])
def test_bfloat16_compute_float32_params(name):
  model16, variables = _init(name, dtype=jnp.bfloat16)
  x = _image(4)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert leaf.dtype == jnp.float32
  (logits, feats), upd = jax.jit(functools.partial(
      model16.apply, train=True, mutable=["batch_stats"]))(variables, x)
  assert logits.dtype == jnp.float32
  assert feats["stages"][-1].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(logits)))
  for leaf in jax.tree_util.tree_leaves(upd):
    assert leaf.dtype == jnp.float32
  # close to the float32 model with the same variables.
  ref, _ = _apply(name, False)(variables, x)
  got, _ = _apply(name, False, jnp.bfloat16)(variables, x)
  scale = float(np.abs(np.asarray(ref)).max())
  assert float(np.abs(np.asarray(got) - np.asarray(ref)).max()) < 0.1 * scale


def test_init_matches_torch_conventions():
  """Kaiming-normal fan-out convs, BN 1/0, torch-default / reference linears."""
  model = models.create("resnet32x4", num_classes=100)
  v = jax.jit(functools.partial(model.init, train=False))(
      _key(1), jnp.zeros((1, 32, 32, 3)))
  p = v["params"]
  # layer3 3x3 conv 256 -> 256: std sqrt(2 / (9 * 256)), untruncated normal.
  k = np.asarray(p["layer3_1"]["conv2"]["kernel"], np.float64)
  std = np.sqrt(2.0 / (9 * 256))
  assert abs(k.mean()) < 0.01 * std
  assert abs(k.std() / std - 1) < 0.02
  assert np.abs(k).max() > 3 * std  # not truncated at 2 std
  assert np.all(np.asarray(p["bn1"]["scale"]) == 1)
  assert np.all(np.asarray(p["bn1"]["bias"]) == 0)
  # nn.Linear default: U(-1/sqrt(256), 1/sqrt(256)) for weight and bias.
  bound = 1 / np.sqrt(256)
  w = np.asarray(p["fc"]["kernel"])
  b = np.asarray(p["fc"]["bias"])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  assert abs(w.std() - bound / np.sqrt(3)) < 0.05 * bound
  assert np.abs(b).max() <= bound and np.any(b != 0)
  # WRN: linear bias 0; VGG: classifier weight N(0, 0.01), bias 0, conv bias 0.
  _, vw = _init("wrn_16_1")
  assert np.all(np.asarray(vw["params"]["fc"]["bias"]) == 0)
  _, vv = _init("vgg8")
  cw = np.asarray(vv["params"]["classifier"]["kernel"])
  assert abs(cw.std() - 0.01) < 0.001
  assert np.all(np.asarray(vv["params"]["classifier"]["bias"]) == 0)
  assert np.all(np.asarray(vv["params"]["block0_0"]["bias"]) == 0)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_wrong_input_shape_errors():
  model, variables = _init("resnet8")
  with pytest.raises(ValueError, match=r"expects .*\[B, 32, 32, 3\].*"
                     r"got \(2, 28, 28, 3\)"):
    model.apply(variables, jnp.zeros((2, 28, 28, 3)), train=False)
  with pytest.raises(ValueError, match=r"NHWC.*got \(2, 3, 32, 32\)"):
    model.apply(variables, jnp.zeros((2, 3, 32, 32)), train=False)
  with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\].*got \(32, 32, 3\)"):
    model.apply(variables, jnp.zeros((32, 32, 3)), train=False)
  big = models.create("resnet18", num_classes=10)
  with pytest.raises(ValueError, match=r"resnet18 expects .*H, W >= 32.*"
                     r"got \(1, 224, 224, 1\)"):
    jax.eval_shape(lambda: big.init(jax.random.key(0),
                                    jnp.zeros((1, 224, 224, 1)), train=False))


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match=r"unknown model name 'resnet9'.*"
                     r"resnet110.*wrn_40_2"):
    models.create("resnet9", num_classes=10)
