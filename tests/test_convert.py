"""Tests of `kd_jax.models.from_torch_state_dict` and the convert CLI.

The PyTorch side is `tests/torch_reference_models.py` (re-written reference
definitions with the released checkpoints' key names); those tests are
skipped when torch (the optional extra) is not installed.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import convert

try:
  import torch
  import torch_reference_models as ref
  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="torch (optional extra) not installed: no PyTorch "
    "reference model to compare the converted Flax model against")

# One or more representatives per family; together they cover identity and
# projection shortcuts (stride 1 and 2), WRN blocks with equal and different
# in/out widths, VGG multi-conv blocks, basic and bottleneck blocks and both
# ResNet stems. ImageNet models run at 64x64 (they are size-agnostic).
COMPARE = ["resnet8x4", "resnet20", "wrn_16_2", "wrn_16_1", "vgg13",
           "resnet18_cifar", "resnet18", "resnet50"]


def _rel_err(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_model(name, num_classes, seed=0):
  torch.manual_seed(seed)
  model = ref.build(name, num_classes)
  ref.randomize_bn_(model, torch.Generator().manual_seed(seed + 1))
  return model


def _numpy_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _jit_apply(name, num_classes, train):
  model = models.create(name, num_classes=num_classes)
  if train:
    return jax.jit(functools.partial(model.apply, train=True,
                                     mutable=["batch_stats"]))
  return jax.jit(functools.partial(model.apply, train=False))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@needs_torch
@pytest.mark.parametrize("name", COMPARE)
def test_converted_logits_and_features_match_torch(name):
  nc = 10
  tmodel = _torch_model(name, nc).eval()
  hw = 64 if name in ("resnet18", "resnet50") else 32
  x = np.random.RandomState(0).randn(2, 3, hw, hw).astype(np.float32)
  with torch.no_grad():
    t_logits, t_feats = tmodel(torch.from_numpy(x))
  variables = models.from_torch_state_dict(name, _numpy_sd(tmodel),
                                           num_classes=nc)
  logits, feats = _jit_apply(name, nc, False)(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert _rel_err(logits, t_logits.numpy()) <= 1e-4
  assert len(feats["stages"]) == len(t_feats["feats"])
  for got, want in zip(feats["stages"], t_feats["feats"]):
    assert _rel_err(got, _nhwc(want)) <= 1e-4
  for got, want in zip(feats["preact_stages"], t_feats["preact_feats"]):
    assert _rel_err(got, _nhwc(want)) <= 1e-4
  assert _rel_err(feats["pooled"], t_feats["pooled"].numpy()) <= 1e-4
  # the randomized BN statistics are really in use: not the default 0 / 1.
  assert not np.allclose(np.asarray(variables["batch_stats"]["bn1"]["var"]
                                    if "bn1" in variables["batch_stats"] else
                                    variables["batch_stats"]["block0_1"]["var"]),
                         1.0)


@needs_torch
def test_train_mode_matches_torch_including_running_stats():
  """Train-mode forward and BN statistics updates vs torch (momentum 0.1).

  torch updates `running_var` with the unbiased batch variance, Flax with the
  biased one: the increments differ by exactly n / (n - 1), n = B * H * W.
  """
  name, nc = "resnet8", 10
  tmodel = _torch_model(name, nc).train()
  sd0 = _numpy_sd(tmodel)
  x = np.random.RandomState(1).randn(4, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    t_logits, _ = tmodel(torch.from_numpy(x))
  sd1 = _numpy_sd(tmodel)
  variables = models.from_torch_state_dict(name, sd0, num_classes=nc)
  (logits, _), upd = _jit_apply(name, nc, True)(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert _rel_err(logits, t_logits.numpy()) <= 1e-4
  new = models.from_torch_state_dict(name, sd1, num_classes=nc)["batch_stats"]
  for path, flax_mean in [(("bn1",), upd["batch_stats"]["bn1"]),
                          (("layer3_0", "bn2"),
                           upd["batch_stats"]["layer3_0"]["bn2"])]:
    n = 4 * (32 * 32 if path == ("bn1",) else 8 * 8)
    torch_stats, old = new, variables["batch_stats"]
    for k in path:
      torch_stats, old = torch_stats[k], old[k]
    np.testing.assert_allclose(flax_mean["mean"], torch_stats["mean"],
                               rtol=1e-4, atol=1e-5)
    inc_flax = np.asarray(flax_mean["var"]) - 0.9 * np.asarray(old["var"])
    inc_torch = np.asarray(torch_stats["var"]) - 0.9 * np.asarray(old["var"])
    np.testing.assert_allclose(inc_flax, inc_torch * (n - 1) / n, rtol=1e-4,
                               atol=1e-6)


@needs_torch
def test_accepts_torch_tensors_wrapper_and_module_prefix():
  tmodel = _torch_model("resnet8", 10)
  want = models.from_torch_state_dict("resnet8", _numpy_sd(tmodel),
                                      num_classes=10)
  wrapped = {"model": {"module." + k: v for k, v in
                       tmodel.state_dict().items()},
             "epoch": 240, "best_acc": 0.0}
  got = models.from_torch_state_dict("resnet8", wrapped, num_classes=10)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  for leaf in jax.tree_util.tree_leaves(got):
    assert leaf.dtype == jnp.float32


def _inverse_key_map(variables):
  """Flax variables -> torch-keyed NumPy dict, written independently."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = [p.key for p in path]
    coll, mods, name = keys[0], keys[1:-1], keys[-1]
    prefix = ".".join(m.replace("_", ".") for m in mods)
    leaf = np.asarray(leaf)
    if name == "kernel" and leaf.ndim == 4:
      out[prefix + ".weight"] = leaf.transpose(3, 2, 0, 1)
    elif name == "kernel":
      out[prefix + ".weight"] = leaf.T
    elif name == "scale":
      out[prefix + ".weight"] = leaf
    elif coll == "batch_stats":
      out[prefix + {"mean": ".running_mean", "var": ".running_var"}[name]] = leaf
    else:
      out[prefix + "." + name] = leaf
  return out


def _random_variables(name, num_classes, seed=0):
  """Random arrays with the model's variable shapes (no init compile)."""
  model = models.create(name, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), models.example_input(name), train=False))
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


def test_numpy_state_dict_roundtrip_without_torch(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
  for name in ("resnet8", "wrn_16_1", "vgg8", "resnet18"):
    variables = _random_variables(name, 10)
    sd = _inverse_key_map(variables)
    sd["bn1.num_batches_tracked" if name != "vgg8" else
       "block0.1.num_batches_tracked"] = np.array(5)
    got = models.from_torch_state_dict(name, sd, num_classes=10)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, variables)


def test_reading_pth_without_torch_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r"\.pth checkpoint needs PyTorch"):
    convert.load_torch_checkpoint(str(tmp_path / "ckpt.pth"))


# ---------------------------------------------------------------------------
# Error reporting
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet8_sd():
  return _inverse_key_map(_random_variables("resnet8", 10))


def test_missing_keys_are_listed(resnet8_sd):
  sd = dict(resnet8_sd)
  del sd["layer2.0.downsample.1.running_var"]
  del sd["fc.bias"]
  with pytest.raises(ValueError, match=r"(?s)missing keys \(2\):.*"
                     r"layer2\.0\.downsample\.1\.running_var.*fc\.bias"):
    models.from_torch_state_dict("resnet8", sd, num_classes=10)


def test_unexpected_keys_are_listed(resnet8_sd):
  sd = dict(resnet8_sd, **{"layer4.0.conv1.weight": np.zeros((3, 3, 3, 3)),
                           "head.weight": np.zeros((2, 2))})
  with pytest.raises(ValueError, match=r"(?s)unexpected keys \(2\):.*"
                     r"head\.weight.*layer4\.0\.conv1\.weight"):
    models.from_torch_state_dict("resnet8", sd, num_classes=10)


def test_misshaped_keys_are_listed_with_num_classes_hint(resnet8_sd):
  sd = dict(resnet8_sd)
  sd["layer1.0.conv2.weight"] = np.zeros((16, 16, 5, 5), np.float32)
  sd["layer1.0.bn1.weight"] = np.zeros((1, 16), np.float32)
  with pytest.raises(ValueError) as e:
    models.from_torch_state_dict("resnet8", sd, num_classes=100)
  msg = str(e.value)
  assert "mis-shaped keys (4):" in msg
  assert ("layer1.0.conv2.weight (16, 16, 5, 5) -> Flax (5, 5, 16, 16), but "
          "params/layer1_0/conv2/kernel expects (3, 3, 16, 16)") in msg
  assert ("layer1.0.bn1.weight (1, 16) -> Flax (1, 16), but "
          "params/layer1_0/bn1/scale expects (16,)") in msg
  assert "fc.weight (10, 64) -> Flax (64, 10), but params/fc/kernel " \
         "expects (64, 100)" in msg
  assert "fc.bias (10,)" in msg
  assert "num_classes=100" in msg
  assert "missing" not in msg and "unexpected" not in msg


def test_all_problems_reported_together(resnet8_sd):
  sd = dict(resnet8_sd)
  del sd["conv1.weight"]
  sd["extra"] = np.zeros(1)
  sd["fc.weight"] = np.zeros((10, 63))
  with pytest.raises(ValueError) as e:
    models.from_torch_state_dict("resnet8", sd, num_classes=10)
  msg = str(e.value)
  assert "missing keys (1)" in msg and "conv1.weight" in msg
  assert "unexpected keys (1)" in msg and "extra" in msg
  assert "mis-shaped keys (1)" in msg and "fc.weight (10, 63)" in msg


def test_rank_mismatch_and_bad_inputs():
  sd = _inverse_key_map(_random_variables("vgg8", 10))
  sd["block0.0.weight"] = np.zeros((64, 3, 9))
  with pytest.raises(ValueError, match=r"block0\.0\.weight \(64, 3, 9\): "
                     r"cannot map to params/block0_0/kernel.*rank 3"):
    models.from_torch_state_dict("vgg8", sd, num_classes=10)
  with pytest.raises(TypeError, match="must be a mapping"):
    models.from_torch_state_dict("vgg8", [1, 2], num_classes=10)
  with pytest.raises(ValueError, match=r"no PyTorch key map.*convertible "
                     r"models:.*resnet56"):
    models.from_torch_state_dict("mlp_teacher", {}, num_classes=10)
  with pytest.raises(ValueError, match="unknown model name 'resnet9'"):
    models.from_torch_state_dict("resnet9", {}, num_classes=10)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _restore(path):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def test_cli_npz_infers_num_classes(tmp_path, capsys):
  variables = _random_variables("wrn_16_1", 7)
  sd = _inverse_key_map(variables)
  np.savez(tmp_path / "wrn.npz", **sd)
  out = tmp_path / "orbax_wrn"
  assert convert.main(["--arch", "wrn_16_1", "--input",
                       str(tmp_path / "wrn.npz"), "--output", str(out)]) == 0
  assert "num_classes=7" in capsys.readouterr().out
  restored = _restore(str(out))
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored,
                         jax.tree_util.tree_map(np.asarray, variables))


@needs_torch
def test_cli_pth_with_model_wrapper(tmp_path):
  tmodel = _torch_model("resnet8", 100)
  path = tmp_path / "ckpt_epoch_240.pth"
  torch.save({"model": tmodel.state_dict(), "epoch": 240,
              "best_acc": torch.tensor(70.0)}, path)
  out = tmp_path / "orbax"
  convert.main(["--arch", "resnet8", "--input", str(path), "--output",
                str(out), "--num-classes", "100"])
  want = models.from_torch_state_dict("resnet8", _numpy_sd(tmodel),
                                      num_classes=100)
  jax.tree_util.tree_map(np.testing.assert_array_equal, _restore(str(out)),
                         jax.tree_util.tree_map(np.asarray, want))


@needs_torch
def test_pth_with_arbitrary_objects_needs_allow_pickle(tmp_path):
  path = tmp_path / "ckpt.pth"
  torch.save({"model": {}, "opt": _Unpicklable()}, path)
  with pytest.raises(ValueError, match="allow_pickle=True"):
    convert.load_torch_checkpoint(str(path))


class _Unpicklable:
  """A class weights_only=True refuses to load."""
