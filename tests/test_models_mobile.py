"""Tests of the mobile CNNs (mobilenetv2, shufflenetv1/v2, mobilenetv1) and ViTs.

Independent references used here:
* parameter counts: closed-form sums written below from the reference configs,
  the published approximate counts, and (with torch) the PyTorch reference
  definitions in `torch_reference_mobile.py`;
* BatchNorm training statistics: float64 NumPy from the input and the stem
  kernel;
* logits / features of converted PyTorch checkpoints: the PyTorch reference
  forward in float64.

To keep compile time low (2 shared CPU cores), variables are mostly drawn with
NumPy from the `jax.eval_shape` template instead of running `model.init`, and
jitted apply functions are cached per (model, dtype, train).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models

try:  # PyTorch is an optional extra; only the reference comparisons need it.
  import torch
  import torch_reference_mobile as ref
except ImportError:  # pragma: no cover - depends on the environment
  torch = None
  ref = None

requires_torch = pytest.mark.skipif(
    torch is None,
    reason="PyTorch is not installed (optional extra); the comparison with the "
           "PyTorch reference definitions needs it")

CIFAR = ("mobilenetv2", "shufflenetv1", "shufflenetv2", "vit_tiny_patch4_32")
IMAGENET = ("mobilenetv1", "vit_tiny_patch16_224")
CONVNETS = ("mobilenetv2", "shufflenetv1", "shufflenetv2")


def _num_classes(name):
  return 1000 if name in IMAGENET else 100


# ---------------------------------------------------------------------------
# Closed-form parameter counts from the reference configurations.
# ---------------------------------------------------------------------------
def _bn(c):
  return 2 * c


def _count_mobilenetv2(k):
  # RepDistiller mobile_half: T=6, width 0.5; stem 3->16, blocks, 160->1280.
  total = 3 * 16 * 9 + _bn(16)
  inp = 16
  for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3),
                  (6, 160, 3), (6, 320, 1)):
    oup = c // 2
    for _ in range(n):
      hid = inp * t
      total += inp * hid + _bn(hid) + 9 * hid + _bn(hid) + hid * oup + _bn(oup)
      inp = oup
  return total + inp * 1280 + _bn(1280) + 1280 * k + k


def _count_shufflenetv1(k):
  total, inp = 3 * 24 + _bn(24), 24
  for planes, n in ((240, 4), (480, 8), (960, 4)):
    for i in range(n):
      out = planes - inp if i == 0 else planes
      mid, g = out // 4, (1 if inp == 24 else 3)
      total += (inp * mid // g + _bn(mid) + 9 * mid + _bn(mid)
                + mid * out // 3 + _bn(out))
      inp = planes
  return total + 960 * k + k


def _count_shufflenetv2(k):
  total, inp = 3 * 24 + _bn(24), 24
  for ch, n in ((116, 3), (232, 7), (464, 3)):
    mid = ch // 2
    total += (9 * inp + _bn(inp) + inp * mid + _bn(mid)      # left branch
              + inp * mid + _bn(mid) + 9 * mid + _bn(mid)    # right branch
              + mid * mid + _bn(mid))
    c = ch // 2
    total += n * (c * c + _bn(c) + 9 * c + _bn(c) + c * c + _bn(c))
    inp = ch
  return total + 464 * 1024 + _bn(1024) + 1024 * k + k


def _count_mobilenetv1(k):
  total = 3 * 32 * 9 + _bn(32)
  for inp, oup in ((32, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                   (256, 512), (512, 512), (512, 512), (512, 512), (512, 512),
                   (512, 512), (512, 1024), (1024, 1024)):
    total += 9 * inp + _bn(inp) + inp * oup + _bn(oup)
  return total + 1024 * k + k


def _count_vit(k, img, patch, d=192, depth=12, mlp=4):
  n = (img // patch) ** 2
  block = (2 * d + (d * 3 * d + 3 * d) + (d * d + d)            # norm1, attn
           + 2 * d + (d * mlp * d + mlp * d) + (mlp * d * d + d))  # norm2, mlp
  return (3 * patch * patch * d + d + d + (n + 1) * d + depth * block + 2 * d
          + d * k + k)


CLOSED_FORM = {
    "mobilenetv2": _count_mobilenetv2,
    "shufflenetv1": _count_shufflenetv1,
    "shufflenetv2": _count_shufflenetv2,
    "mobilenetv1": _count_mobilenetv1,
    "vit_tiny_patch4_32": functools.partial(_count_vit, img=32, patch=4),
    "vit_tiny_patch16_224": functools.partial(_count_vit, img=224, patch=16),
}

# Published / commonly quoted counts (100 classes for CIFAR, 1000 ImageNet):
# * mobilenetv2 (mobile_half) 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M: the
#   CIFAR-100 student sizes quoted for RepDistiller's definitions in the KD
#   literature (e.g. the DIST / SimKD tables) - 812,836 / 949,258 / 1,355,528
#   counted from RepDistiller's models/{mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py;
# * mobilenetv1 4.2M (Howard et al. 2017, Table 8: 4.2M for 1.0 MobileNet-224),
#   4,231,976 counted from mdistiller's imagenet/mobilenetv1.py;
# * vit_tiny_patch16_224 5.7M (timm model card for vit_tiny_patch16_224 and
#   deit_tiny_patch16_224), 5,717,416 counted from timm's definition;
# * vit_tiny_patch4_32 5,380,132 counted from timm's definition with
#   img_size=32, patch_size=4 (no published count: this variant is ours).
PUBLISHED = {
    "mobilenetv2": 0.81e6, "shufflenetv1": 0.95e6, "shufflenetv2": 1.36e6,
    "mobilenetv1": 4.23e6, "vit_tiny_patch16_224": 5.72e6,
    "vit_tiny_patch4_32": 5.38e6,
}


@functools.lru_cache(maxsize=None)
def _template(name):
  model = models.create(name, num_classes=_num_classes(name))
  x = models.example_input(name, batch_size=2)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _leaves(tree):
  return [("/".join(str(getattr(k, "key", k)) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _n_params(shapes):
  return sum(int(np.prod(l.shape)) for _, l in _leaves(shapes["params"]))


@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_param_counts(name):
  n = _n_params(_template(name))
  assert n == CLOSED_FORM[name](_num_classes(name))
  assert abs(n - PUBLISHED[name]) <= 0.005 * PUBLISHED[name], n


@requires_torch
def test_param_counts_match_pytorch_reference():
  refs = {
      "mobilenetv2": lambda: ref.MobileNetV2Half(100),
      "shufflenetv1": lambda: ref.ShuffleV1(100),
      "shufflenetv2": lambda: ref.ShuffleV2(100),
      "mobilenetv1": lambda: ref.MobileNetV1(1000),
      "vit_tiny_patch4_32": lambda: ref.VisionTransformer(32, 4,
                                                          num_classes=100),
      "vit_tiny_patch16_224": lambda: ref.VisionTransformer(224, 16,
                                                            num_classes=1000),
  }
  for name, make in refs.items():
    n_torch = sum(p.numel() for p in make().parameters())
    assert _n_params(_template(name)) == n_torch, name


# ---------------------------------------------------------------------------
# Variables drawn with NumPy (fast) and cached jitted apply functions.
# ---------------------------------------------------------------------------
def _random_variables(name, seed=0):
  """Variables with the template's structure: scaled-normal kernels and
  non-trivial BN affine parameters and running statistics."""
  rng = np.random.RandomState(seed)
  out = {}
  for path, leaf in _leaves(_template(name)):
    shape, last = leaf.shape, path.split("/")[-1]
    if last == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      v = rng.randn(*shape) * np.sqrt(1.0 / fan_in)
    elif last in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, shape)
    elif last in ("bias", "mean"):
      v = 0.1 * rng.randn(*shape)
    else:  # cls_token, pos_embed
      v = 0.02 * rng.randn(*shape)
    node = out
    keys = path.split("/")
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = jnp.asarray(v, jnp.float32)
  return out


@functools.lru_cache(maxsize=None)
def _apply_fn(name, dtype=jnp.float32, train=False):
  model = models.create(name, num_classes=_num_classes(name), dtype=dtype)
  has_bn = "batch_stats" in _template(name)
  if train and has_bn:
    return jax.jit(lambda v, x: model.apply(v, x, train=True,
                                            mutable=["batch_stats"]))
  return jax.jit(lambda v, x: model.apply(v, x, train=train))


def _input(name, batch=2, seed=1):
  shape = (batch,) + models.input_shape(name)
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


EXPECTED_FEATURES = {
    # name: (stages [H, W, C] (ViT: [N, D]), pooled D)
    "mobilenetv2": ([(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48),
                     (2, 2, 160)], 1280),
    "shufflenetv1": ([(32, 32, 24), (16, 16, 240), (8, 8, 480),
                      (4, 4, 960)], 960),
    "shufflenetv2": ([(32, 32, 24), (16, 16, 116), (8, 8, 232),
                      (4, 4, 464)], 1024),
    "vit_tiny_patch4_32": ([(65, 192)] * 12, 192),
    "mobilenetv1": ([(112, 112, 32), (56, 56, 128), (28, 28, 256),
                     (14, 14, 512), (7, 7, 1024)], 1024),
    "vit_tiny_patch16_224": ([(197, 192)] * 12, 192),
}


def _check_feature_shapes(name, logits, feats, batch):
  stages, pooled_dim = EXPECTED_FEATURES[name]
  assert logits.shape == (batch, _num_classes(name))
  assert logits.dtype == jnp.float32
  assert [tuple(f.shape) for f in feats["stages"]] == [(batch,) + s
                                                       for s in stages]
  assert [tuple(f.shape) for f in feats["preact_stages"]] == [
      (batch,) + s for s in stages]
  assert tuple(feats["pooled"].shape) == (batch, pooled_dim)


@pytest.mark.parametrize("name", CIFAR)
def test_forward_shapes_and_finite(name):
  logits, feats = _apply_fn(name)(_random_variables(name), _input(name))
  _check_feature_shapes(name, logits, feats, 2)
  for a in [logits, feats["pooled"], *feats["stages"], *feats["preact_stages"]]:
    assert np.all(np.isfinite(np.asarray(a)))
  if name.startswith("vit"):
    assert feats["embed"].shape == (2, 65, 192)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_shapes_eval_shape(name):
  model = models.create(name, num_classes=1000)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  logits, feats = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False), _template(name), x)
  _check_feature_shapes(name, logits, feats, 2)


def test_preact_stages_relation():
  """ShuffleNetV1: stages = relu(preact) after the stem; MobileNetV2's stage
  outputs are linear bottlenecks (no final ReLU), so preact == stages."""
  _, feats = _apply_fn("shufflenetv1")(_random_variables("shufflenetv1"),
                                       _input("shufflenetv1"))
  for s, p in zip(feats["stages"][1:], feats["preact_stages"][1:]):
    assert float(jnp.min(p)) < 0  # a real pre-activation
    np.testing.assert_allclose(np.asarray(s), np.maximum(np.asarray(p), 0),
                               atol=1e-6)
  np.testing.assert_array_equal(feats["stages"][0], feats["preact_stages"][0])
  _, feats = _apply_fn("mobilenetv2")(_random_variables("mobilenetv2"),
                                      _input("mobilenetv2"))
  assert float(jnp.min(feats["stages"][0])) >= 0  # stem: after its ReLU
  for s, p in zip(feats["stages"][1:], feats["preact_stages"][1:]):
    assert float(jnp.min(s)) < 0
    np.testing.assert_array_equal(s, p)


# ---------------------------------------------------------------------------
# BatchNorm: train vs eval.
# ---------------------------------------------------------------------------
def test_batchnorm_train_vs_eval():
  name = "shufflenetv2"  # its stem is a 1x1 conv: easy to recompute in NumPy
  variables = _random_variables(name)
  x = _input(name)
  (logits_t, feats_t), updates = _apply_fn(name, train=True)(variables, x)
  logits_e, feats_e = _apply_fn(name)(variables, x)
  assert not np.allclose(logits_t, logits_e, atol=1e-3)

  # Stem: z = x @ W; train mode normalizes with the batch statistics and
  # updates the running ones with momentum 0.1 (torch) == 0.9 (Flax).
  w = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)[0, 0]
  z = np.asarray(x, np.float64).reshape(-1, 3) @ w
  mu, var = z.mean(0), z.var(0)  # biased, as used for normalization
  bn_p = variables["params"]["bn1"]
  bn_s = variables["batch_stats"]["bn1"]
  gamma, beta = np.asarray(bn_p["scale"]), np.asarray(bn_p["bias"])
  want = np.maximum((z - mu) / np.sqrt(var + 1e-5) * gamma + beta, 0)
  np.testing.assert_allclose(np.asarray(feats_t["stages"][0]).reshape(-1, 24),
                             want, rtol=1e-4, atol=1e-5)
  new = updates["batch_stats"]["bn1"]
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(bn_s["mean"])
                             + 0.1 * mu, rtol=1e-5, atol=1e-6)
  # kd_jax's BatchNorm (models._layers.batch_norm = flax BatchNorm) averages
  # the biased batch variance; torch would use var * n/(n-1) (n = 2048 here).
  np.testing.assert_allclose(new["var"], 0.9 * np.asarray(bn_s["var"])
                             + 0.1 * var, rtol=1e-5)

  # Eval mode uses the running statistics: per-example, batch-independent.
  mu_r, var_r = np.asarray(bn_s["mean"]), np.asarray(bn_s["var"])
  want_e = np.maximum((z - mu_r) / np.sqrt(var_r + 1e-5) * gamma + beta, 0)
  np.testing.assert_allclose(np.asarray(feats_e["stages"][0]).reshape(-1, 24),
                             want_e, rtol=1e-4, atol=1e-5)
  # Every batch_stats leaf was updated and stays float32.
  for path, leaf in _leaves(updates["batch_stats"]):
    assert leaf.dtype == jnp.float32, path


def test_vit_train_flag_and_drop_path():
  name = "vit_tiny_patch4_32"
  variables, x = _random_variables(name), _input(name)
  a, _ = _apply_fn(name)(variables, x)
  b, _ = _apply_fn(name, train=True)(variables, x)
  np.testing.assert_array_equal(a, b)  # no BN, no dropout by default
  model = models.vit.vit_tiny_patch4_32(num_classes=100, drop_path_rate=0.5)
  c, _ = jax.jit(lambda v, x, k: model.apply(v, x, train=True,
                                             rngs={"dropout": k}))(
                                                 variables, x,
                                                 jax.random.key(3, impl="rbg"))
  assert not np.allclose(a, c)
  with pytest.raises(Exception, match="dropout"):  # stochastic depth needs it
    jax.eval_shape(lambda v: model.apply(v, x, train=True), variables)


# ---------------------------------------------------------------------------
# jit, bf16, input errors.
# ---------------------------------------------------------------------------
def test_jit_matches_eager():
  name = "vit_tiny_patch4_32"  # the cheapest model to run op by op
  variables, x = _random_variables(name), _input(name)
  model = models.create(name, num_classes=100)
  eager, _ = model.apply(variables, x, train=False)
  jitted, _ = _apply_fn(name)(variables, x)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CIFAR)
def test_bfloat16_forward(name):
  variables, x = _random_variables(name), _input(name)
  logits16, feats16 = _apply_fn(name, jnp.bfloat16)(variables, x)
  logits32, _ = _apply_fn(name)(variables, x)
  assert logits16.dtype == jnp.float32
  assert feats16["stages"][-1].dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(logits16)))
  err = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert err < 0.1, err
  # Parameters and BatchNorm statistics are float32 even for bf16 compute.
  model = models.create(name, num_classes=100, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))
  for path, leaf in _leaves(shapes):
    assert leaf.dtype == jnp.float32, path


@pytest.mark.parametrize("name", CIFAR)
def test_wrong_input_shape_cifar(name):
  model = models.create(name, num_classes=100)
  bad = jnp.zeros((2, 28, 28, 1))
  with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\].*\(2, 28, 28, 1\)"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), bad, train=False))


@pytest.mark.parametrize("name", IMAGENET)
def test_wrong_input_shape_imagenet(name):
  model = models.create(name, num_classes=1000)
  bad = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match=r"\[B, 224, 224, 3\]"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), bad, train=False))


def test_mobilenetv2_initialization():
  """The one family with a custom init (RepDistiller `_initialize_weights`):
  convs N(0, 2/(k*k*out_channels)) (depthwise included), BN 1/0, classifier
  N(0, 0.01^2) with zero bias. The others use PyTorch's default,
  `_layers.torch_linear_kernel_init`. (Submodules are initialized on their own
  to avoid compiling the whole network.)"""
  block = models.mobilenet.InvertedResidual(160, 1, 6)  # as blocks[6][0]
  v = block.init(jax.random.key(0), jnp.zeros((1, 2, 2, 80)))["params"]
  k = np.asarray(v["conv_6"]["kernel"])  # 1x1, 480 -> 160
  assert k.shape == (1, 1, 480, 160)
  assert abs(k.std() / np.sqrt(2.0 / 160) - 1) < 0.05
  assert abs(k.mean()) < 5 * k.std() / np.sqrt(k.size)
  k = np.asarray(v["conv_3"]["kernel"])  # 3x3 depthwise, 480 channels
  assert k.shape == (3, 3, 1, 480)
  assert abs(k.std() / np.sqrt(2.0 / (9 * 480)) - 1) < 0.05
  np.testing.assert_array_equal(v["conv_7"]["scale"], 1)
  np.testing.assert_array_equal(v["conv_7"]["bias"], 0)
  head = models.mobilenet.mobilenetv2_classifier(100, 1280)
  v = head.init(jax.random.key(1), jnp.zeros((1, 1280)))["params"]
  assert abs(np.asarray(v["kernel"]).std() / 0.01 - 1) < 0.02
  np.testing.assert_array_equal(v["bias"], 0)


# ---------------------------------------------------------------------------
# PyTorch checkpoints -> Flax: logits and features match the reference.
# ---------------------------------------------------------------------------
def _randomized_torch_model(name):
  torch.manual_seed(0)
  net = {"mobilenetv2": lambda: ref.MobileNetV2Half(100),
         "shufflenetv1": lambda: ref.ShuffleV1(100),
         "shufflenetv2": lambda: ref.ShuffleV2(100),
         "vit_tiny_patch4_32": lambda: ref.VisionTransformer(
             32, 4, num_classes=100)}[name]()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
      elif isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    if name == "mobilenetv2":  # its N(0, .01) head makes near-zero logits
      net.classifier[0].weight.normal_(0, 0.1, generator=g)
      net.classifier[0].bias.normal_(0, 0.1, generator=g)
  return net.double().eval()


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@requires_torch
@pytest.mark.parametrize("name", CONVNETS + ("vit_tiny_patch4_32",))
def test_converted_checkpoint_matches_pytorch(name):
  net = _randomized_torch_model(name)
  variables = models.from_torch_state_dict(
      name, {"model": net.state_dict()}, num_classes=100)
  x = _input(name)
  with torch.no_grad():
    t_logits, t_feats = net(torch.from_numpy(
        np.asarray(x, np.float64).transpose(0, 3, 1, 2)))
  logits, feats = _apply_fn(name)(variables, x)
  assert _rel_err(logits, t_logits.numpy()) <= 1e-4
  assert np.abs(t_logits.numpy()).max() > 1e-2  # the check is not vacuous
  to_nhwc = (lambda t: t.numpy() if t.ndim == 3
             else t.numpy().transpose(0, 2, 3, 1))
  for key in ("stages", "preact_stages"):
    assert len(feats[key]) == len(t_feats[key])
    for i, (f, tf) in enumerate(zip(feats[key], t_feats[key])):
      assert _rel_err(f, to_nhwc(tf)) <= 1e-4, (key, i)
  assert _rel_err(feats["pooled"], t_feats["pooled"].numpy()) <= 1e-4


def test_conversion_errors_list_bad_keys():
  """NumPy-only (no torch): missing, unexpected and mis-shaped keys."""
  sd = {"conv1.weight": np.zeros((24, 3, 3, 3), np.float32),  # not 1x1
        "linear.weight": np.zeros((100, 1024), np.float32),
        "bogus.weight": np.zeros(3, np.float32),
        "bn1.num_batches_tracked": np.zeros((), np.int64)}
  with pytest.raises(ValueError) as e:
    models.from_torch_state_dict("shufflenetv2", sd, num_classes=100)
  msg = str(e.value)
  assert "missing keys" in msg and "bn1.running_mean" in msg
  assert "unexpected keys (1)" in msg and "bogus.weight" in msg
  assert "mis-shaped keys (1)" in msg and "conv1.weight" in msg
  assert "num_batches_tracked" not in msg


@requires_torch
def test_imagenet_reference_state_dicts_convert():
  """Every key of mdistiller's MobileNetV1 and of a timm ViT-Tiny/16 maps
  (a forward comparison at 224x224 is left out to keep the suite fast)."""
  for name, net in (("mobilenetv1", ref.MobileNetV1(1000)),
                    ("vit_tiny_patch16_224", ref.VisionTransformer())):
    sd = net.state_dict()
    variables = models.from_torch_state_dict(name, sd, num_classes=1000)
    assert _n_params(variables) == sum(p.numel() for p in net.parameters())
    w = sd["model.13.3.weight" if name == "mobilenetv1"
           else "blocks.11.attn.qkv.weight"].numpy()
    got = (variables["params"]["model_13_3"]["kernel"]
           if name == "mobilenetv1"
           else variables["params"]["blocks_11"]["attn"]["qkv"]["kernel"])
    want = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T
    np.testing.assert_array_equal(got, want)
