"""Distillers: init/apply round trips, training steps, stages, adapters
against independent references (NumPy, PyTorch), CRD wiring, Orbax
round trip, and 1 device vs pmap vs jit (conftest provides 8 CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import distillers as D
from kd_jax import train
from kd_jax.distillers import fitnet
from kd_jax.distillers import ofa
from kd_jax.distillers import reviewkd

B, HW, K = 8, 8, 5  # batch, input size, classes


class TinyCNN(nn.Module):
  """Zoo-style features: stages [stem 8x8, 8x8, 4x4, 2x2], BN before ReLU."""
  widths: tuple = (4, 8, 8, 8)
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    stages, pre, h = [], [], x
    for i, w in enumerate(self.widths):
      s = 1 if i < 2 else 2
      z = nn.Conv(w, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)),
                  use_bias=False)(h)  # BN follows
      z = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                       axis_name=self.axis_name)(z)
      pre.append(z)
      h = nn.relu(z)
      stages.append(h)
    pooled = jnp.mean(h, axis=(1, 2))
    return nn.Dense(K)(pooled), {"stages": stages, "preact_stages": pre,
                                 "pooled": pooled}


T_W, S_W = (8, 16, 16, 16), (4, 8, 8, 8)
TEACHER, STUDENT, SAME = TinyCNN(T_W), TinyCNN(S_W), TinyCNN(T_W)


def data(seed=0, n=B):
  rs = np.random.RandomState(seed)
  return {"image": rs.randn(n, HW, HW, 1).astype(np.float32),
          "image_strong": rs.randn(n, HW, HW, 1).astype(np.float32),
          "image_pair": rs.randn(n, HW, HW, 1).astype(np.float32),
          "label": (np.arange(n) % K).astype(np.int32),
          "index": (np.arange(n) * 3 + seed).astype(np.int32)}


X = data()
TV = TEACHER.init(jax.random.PRNGKey(1), X["image"])
N_DATA = 40
DATASET_LABELS = np.arange(N_DATA) % K

# name -> (student, constructor kwargs); one entry per registered method
# (`test_every_registered_distiller_has_a_case`).
CASES = {
    "fitnet": (STUDENT, {}),
    "at": (STUDENT, {}),
    "nst": (STUDENT, {}),
    "sp": (STUDENT, {}),
    "pkt": (STUDENT, {}),
    "rkd": (STUDENT, {}),
    "cc": (STUDENT, {"feat_dim": 6}),
    "vid": (STUDENT, {}),
    "ab": (STUDENT, {}),
    "ft": (STUDENT, {}),
    "fsp": (SAME, {}),
    "kdsvd": (SAME, {}),
    "ofd": (STUDENT, {}),
    "crd": (STUDENT, {"num_data": N_DATA, "num_negatives": 6, "feat_dim": 6,
                      "dataset_labels": DATASET_LABELS}),
    "reviewkd": (STUDENT, {}),
    "ofa": (STUDENT, {"stages": (1, 2, 3)}),
    "mlkd": (STUDENT, {}),
    "ctkd": (STUDENT, {}),
    # Self-distillation (no teacher; the engine's teacher is ignored).
    "byot": (STUDENT, {"beta": 0.01}),
    "cskd": (STUDENT, {}),
    "tfkd": (STUDENT, {"multiplier": 5.0}),
}
STAGED = ("ab", "fsp")  # main-training loss is 0 (reference); stage tested


def setup(name, student=None, **kw):
  st, kwargs = CASES[name]
  st = student or st
  d = D.create(name, **{**kwargs, **kw})
  sv = st.init(jax.random.PRNGKey(2), X["image"])
  obj = train.Objective(ce_weight=0.0,
                        terms=(train.Term(name, 1.0, distiller=d),))
  dp, ds = D.init_distillers(obj, jax.random.PRNGKey(3), student_apply=st,
                             teacher_apply=TEACHER, student_variables=sv,
                             teacher_variables=TV, batch=X)
  return st, d, sv, obj, dp, ds


def tree_meta(t):
  return jax.tree_util.tree_map(lambda a: (np.shape(a), np.asarray(a).dtype),
                                t)


# Image methods; the language-model methods (they read transformer features,
# `lm_features`) have theirs in tests/test_lm_intermediate.py.
IMAGE_METHODS = sorted(n for n in D.available()
                       if not getattr(D.registry()[n], "lm_features", ()))


def test_every_registered_distiller_has_a_case():
  assert sorted(CASES) == IMAGE_METHODS


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_round_trip_and_training_steps(name):
  st, d, sv, obj, dp, ds = setup(name)
  for leaf in jax.tree_util.tree_leaves(dp):
    assert leaf.dtype == jnp.float32
  # init -> apply inside a few jitted engine steps on one batch: the loss is
  # a finite scalar, the state keeps its structure, the loss goes down.
  tx = optax.adam(1e-2)
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(4),
                                   distiller_params=dp, distiller_state=ds)
  step = jax.jit(train.make_distill_step(st, TEACHER, obj, tx,
                                         steps_per_epoch=2))
  vals = []
  for _ in range(1 if name in STAGED else 4):
    state, m = step(state, TV, X)
    vals.append(float(m[name]))
  assert np.all(np.isfinite(vals))
  assert tree_meta(state.distiller_state) == tree_meta(ds)
  assert tree_meta(state.distiller_params) == tree_meta(dp)
  if name in STAGED:
    assert vals == [0.0]  # RepDistiller: loss_kd = 0 after the stage
    return
  assert vals[-1] < vals[0], vals
  if jax.tree_util.tree_leaves(dp[name]):  # adapters were trained
    delta = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                   state.distiller_params[name], dp[name])
    assert max(jax.tree_util.tree_leaves(delta)) > 0


@pytest.mark.parametrize("name", ["ab", "fsp", "ft", "fitnet"])
def test_pretrain_stage(name):
  st, d, sv, obj, dp, ds = setup(name)
  stage = d.pretrain
  assert isinstance(stage, D.PretrainStage) and stage.epochs == 30
  new_sv, mp, ms, losses = D.run_pretrain_stage(
      stage, name, student_apply=st, teacher_apply=TEACHER,
      student_variables=sv, teacher_variables=TV, distiller_params=dp[name],
      distiller_state=ds[name], tx=optax.sgd(0.05, momentum=0.9),
      batches=[X] * 6, rng=jax.random.PRNGKey(5))
  assert losses[-1] < losses[0], losses
  # The stage hands back the main distiller's layout.
  assert tree_meta(mp) == tree_meta(dp[name])
  assert tree_meta(ms) == tree_meta(ds[name])
  moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                 new_sv["params"], sv["params"])
  if stage.train_student:
    assert any(jax.tree_util.tree_leaves(moved))
  else:  # FT: the student is frozen (no weight-decay drift either)
    assert not any(jax.tree_util.tree_leaves(moved))
  if name == "ft":  # the trained paraphraser now sits (frozen) in the state
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     ms["paraphraser"], ds[name]["paraphraser"])
    assert any(jax.tree_util.tree_leaves(changed))


def test_ft_main_training_keeps_paraphraser_frozen():
  st, d, sv, obj, dp, ds = setup("ft")
  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1))
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(4),
                                   distiller_params=dp, distiller_state=ds)
  step = jax.jit(train.make_distill_step(st, TEACHER, obj, tx))
  for _ in range(2):
    state, _ = step(state, TV, X)
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)),
                                state.distiller_state["ft"]["paraphraser"],
                                ds["ft"]["paraphraser"])
  assert all(jax.tree_util.tree_leaves(same))
  assert "paraphraser" not in state.distiller_params["ft"]


def test_ab_connectors_follow_reference_rule():
  # Identity where channels and height match, ConvReg without ReLU otherwise.
  _, _, _, _, _, ds_same = setup("ab", student=SAME)
  assert all(v == {} for v in ds_same["ab"]["connectors"]["params"].values())
  _, _, _, _, _, ds = setup("ab")
  conn = ds["ab"]["connectors"]["params"]
  assert sorted(conn) == ["connector0", "connector1", "connector2"]
  assert conn["connector0"]["conv"]["kernel"].shape == (1, 1, 8, 16)
  out = fitnet.ConvReg(16, (4, 4), use_relu=False).init_with_output(
      jax.random.PRNGKey(0), jnp.asarray(X["image"]).repeat(2, -1)[:, :4, :4],
      train=True)[0]
  assert float(out.min()) < 0  # no ReLU


# ------------------------------------------------ adapters vs references --

def _torch():
  return pytest.importorskip("torch")


def _torch_bn_train(x, eps=1e-5):
  torch = _torch()
  mean = x.mean(dim=(0, 2, 3), keepdim=True)
  var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
  return (x - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("s_hw,t_hw,kind", [
    ((8, 8), (4, 4), ("conv", (3, 3), 2, 1)),
    ((4, 4), (8, 8), ("conv_transpose", (4, 4), 2, 1)),
    ((6, 6), (4, 4), ("conv", (3, 3), 1, 0)),
])
def test_conv_reg_matches_pytorch(s_hw, t_hw, kind):
  torch = _torch()
  assert fitnet.conv_reg_kind(s_hw, t_hw) == kind
  rs = np.random.RandomState(0)
  x = rs.randn(3, *s_hw, 2).astype(np.float32)
  mod = fitnet.ConvReg(5, t_hw)
  v = mod.init(jax.random.PRNGKey(0), x, train=False)
  out, _ = mod.apply(v, x, train=True, mutable=["batch_stats"])
  assert out.shape == (3, *t_hw, 5)
  w = np.asarray(v["params"]["conv"]["kernel"])
  b = torch.tensor(np.asarray(v["params"]["conv"]["bias"]))
  xt = torch.tensor(x.transpose(0, 3, 1, 2))
  if kind[0] == "conv":
    ref = torch.nn.functional.conv2d(
        xt, torch.tensor(w.transpose(3, 2, 0, 1)), b, stride=kind[2],
        padding=kind[3])
  else:  # flax kernel [k, k, out, in] <-> torch ConvTranspose2d [in, out, k, k]
    ref = torch.nn.functional.conv_transpose2d(
        xt, torch.tensor(w.transpose(3, 2, 0, 1)), b, stride=2, padding=1)
  ref = torch.relu(_torch_bn_train(ref)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_conv_reg_rejects_unsupported_shapes():
  with pytest.raises(ValueError, match="smaller than the teacher map 8x8"):
    fitnet.conv_reg_kind((3, 3), (8, 8))


def test_nearest_resize_and_abf_match_pytorch():
  torch = _torch()
  rs = np.random.RandomState(1)
  y = rs.randn(2, 2, 2, 3).astype(np.float32)
  got = reviewkd.nearest_resize(jnp.asarray(y), 5)
  ref = torch.nn.functional.interpolate(
      torch.tensor(y.transpose(0, 3, 1, 2)), (5, 5), mode="nearest")
  np.testing.assert_array_equal(got, ref.numpy().transpose(0, 2, 3, 1))
  # ABF with fusion (mdistiller ReviewKD.ABF), weights copied to torch ops.
  x = rs.randn(2, 4, 4, 5).astype(np.float32)
  mod = reviewkd.ABF(3, 6, fuse=True)
  v = mod.init(jax.random.PRNGKey(0), x, y, 4, 8, train=False)
  (out, res), _ = mod.apply(v, x, y, 4, 8, train=True, mutable=["batch_stats"])
  p = v["params"]
  tw = lambda k: torch.tensor(np.asarray(k).transpose(3, 2, 0, 1))  # noqa
  F = torch.nn.functional
  xt = torch.tensor(x.transpose(0, 3, 1, 2))
  h = _torch_bn_train(F.conv2d(xt, tw(p["conv1"]["kernel"])))
  yt = F.interpolate(torch.tensor(y.transpose(0, 3, 1, 2)), (4, 4),
                     mode="nearest")
  z = torch.sigmoid(F.conv2d(torch.cat([h, yt], 1), tw(p["att_conv"]["kernel"]),
                             torch.tensor(np.asarray(p["att_conv"]["bias"]))))
  h = h * z[:, 0:1] + yt * z[:, 1:2]
  h = F.interpolate(h, (8, 8), mode="nearest")
  o = _torch_bn_train(F.conv2d(h, tw(p["conv2"]["kernel"]), padding=1))
  np.testing.assert_allclose(out, o.numpy().transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(res, h.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                             atol=1e-5)


def test_patch_merging_order_and_ofa_branch_structure():
  rs = np.random.RandomState(2)
  x = rs.randn(1, 16, 3).astype(np.float32)  # 4x4 grid
  mod = ofa.PatchMerging((4, 4), 2, gelu=False)
  v = mod.init(jax.random.PRNGKey(0), x)
  out = mod.apply(v, x)
  g = x.reshape(1, 4, 4, 3)  # OFAKD PatchMerging: x0, x1, x2, x3 order
  cat = np.concatenate([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2],
                        g[:, 1::2, 1::2]], -1).reshape(1, 4, 12)
  cat = (cat - cat.mean(-1, keepdims=True)) / np.sqrt(
      cat.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, cat @ np.asarray(
      v["params"]["reduction"]["kernel"]), rtol=1e-4, atol=1e-5)
  # CNN branches: stage s of S gets S - s SepConvs (a 1x1 conv for s = S).
  _, _, _, _, dp, _ = setup("ofa")
  br = dp["ofa"]
  assert sorted(br) == ["stage1", "stage2", "stage3"]
  assert sorted(k for k in br["stage1"] if k.startswith("down")) == [
      "down0", "down1"]
  assert "proj" in br["stage3"] and not any(
      k.startswith("down") for k in br["stage3"])
  assert br["stage1"]["head"]["kernel"].shape == (16, K)  # max(8, 16) -> K
  # ViT branch: 4x4 patch grid merged once to 2x2, class token kept.
  vit = ofa.ViTBranch(num_blocks=1, feature_dim=8, num_classes=K,
                           final_grid=2)
  tokens = rs.randn(2, 17, 6).astype(np.float32)
  out, v = vit.init_with_output(jax.random.PRNGKey(0), tokens)
  assert out.shape == (2, K)
  assert sorted(v["params"]) == ["block0", "head", "merge0", "token_proj"]
  assert v["params"]["merge0"]["reduction"]["kernel"].shape == (24, 8)
  assert "bias" not in v["params"]["block0"]["qkv"]  # timm Block default


# ----------------------------------------------------- wiring vs NumPy --

def _inputs(s_feats, t_feats, batch=None, step=0):
  return train.TermInputs(
      student_logits=jnp.zeros((s_feats["pooled"].shape[0], K)),
      labels=jnp.zeros((s_feats["pooled"].shape[0],), jnp.int32),
      student_features=s_feats, teacher_features=t_feats, batch=batch,
      step=jnp.asarray(step))


def test_vid_distiller_matches_numpy():
  rs = np.random.RandomState(3)
  fs = rs.randn(2, 8, 8, 3).astype(np.float32)
  ft = rs.randn(2, 4, 4, 4).astype(np.float32)
  feats_s = {"stages": [fs], "pooled": fs.mean((1, 2))}
  feats_t = {"stages": [ft], "pooled": ft.mean((1, 2))}
  d = D.VIDDistiller(layers=[0])
  inp = _inputs(feats_s, feats_t)
  p, s = d.init(jax.random.PRNGKey(0), inp)
  p = jax.tree_util.tree_map(lambda a: a + 0.1 * rs.randn(*a.shape).astype(
      np.float32), p)
  loss, _ = d(p, s, inp)
  r = {k: np.asarray(v["kernel"], np.float64)[0, 0]
       for k, v in p["layer0"]["regressor"].items()}
  pooled = fs.astype(np.float64).reshape(2, 4, 2, 4, 2, 3).mean((2, 4))
  mu = np.maximum(np.maximum(pooled @ r["conv1"], 0) @ r["conv2"], 0) @ r[
      "conv3"]
  var = np.log1p(np.exp(np.asarray(p["layer0"]["log_scale"], np.float64))) + 1e-5
  ref = np.mean(0.5 * ((mu - ft) ** 2 / var + np.log(var)))
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def _l2n(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_crd_first_step_matches_numpy():
  rs = np.random.RandomState(4)
  n, k, dim = 12, 3, 4
  fs, ft = rs.randn(4, 5), rs.randn(4, 7)
  idx = np.array([0, 5, 7, 11], np.int32)
  cidx = np.concatenate([idx[:, None], rs.randint(0, n, (4, k))], 1)
  d = D.CRDDistiller(num_data=n, num_negatives=k, feat_dim=dim)
  batch = {"index": idx, "contrast_idx": cidx.astype(np.int32)}
  inp = _inputs({"pooled": jnp.asarray(fs, jnp.float32)},
                {"pooled": jnp.asarray(ft, jnp.float32)}, batch)
  p, s = d.init(jax.random.PRNGKey(0), inp)
  assert float(s["z"][0]) < 0  # unset
  stdv = 1 / np.sqrt(dim / 3)
  assert float(jnp.abs(s["memory_s"]).max()) <= stdv
  loss, s2 = d(p, s, inp)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  es = _l2n(fs @ f64(p["embed_s"]["linear"]["kernel"])
            + f64(p["embed_s"]["linear"]["bias"]))
  et = _l2n(ft @ f64(p["embed_t"]["linear"]["kernel"])
            + f64(p["embed_t"]["linear"]["bias"]))
  ms, mt, tau = f64(s["memory_s"]), f64(s["memory_t"]), float(
      np.float32(0.07))
  out_s = np.exp(np.einsum("bkd,bd->bk", mt[cidx], es) / tau)
  out_t = np.exp(np.einsum("bkd,bd->bk", ms[cidx], et) / tau)
  zs, zt = n * out_s.mean(), n * out_t.mean()

  def nce(x):
    mpn = k / n
    return -(np.log(x[:, 0] / (x[:, 0] + mpn + 1e-7)).sum()
             + np.log(mpn / (x[:, 1:] + mpn + 1e-7)).sum()) / x.shape[0]

  np.testing.assert_allclose(float(loss), nce(out_s / zs) + nce(out_t / zt),
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(s2["z"]), [zs, zt], rtol=1e-4)
  ref_ms = ms.copy()
  ref_ms[idx] = _l2n(0.5 * ms[idx] + 0.5 * es)
  np.testing.assert_allclose(np.asarray(s2["memory_s"]), ref_ms, rtol=1e-5,
                             atol=1e-6)
  # Z is kept fixed afterwards.
  _, s3 = d(p, s2, inp)
  np.testing.assert_array_equal(np.asarray(s3["z"]), np.asarray(s2["z"]))


def test_sample_negatives():
  labels = np.arange(20) % 4
  idx = jnp.array([3, 6, 9], jnp.int32)
  key = jax.random.PRNGKey(0)
  c = np.asarray(D.sample_negatives(key, idx, num_data=20, num_negatives=10,
                                    dataset_labels=labels))
  assert c.shape == (3, 11) and (c[:, 0] == np.asarray(idx)).all()
  for row in c:
    assert (labels[row[1:]] != labels[row[0]]).all()     # other classes
    assert len(set(row[1:].tolist())) == 10              # no replacement
  # Per-example draws do not depend on the rest of the batch (sharding).
  c1 = np.asarray(D.sample_negatives(key, idx[1:], num_data=20,
                                     num_negatives=10, dataset_labels=labels))
  np.testing.assert_array_equal(c1, c[1:])
  # With replacement / without labels: valid ranges, positive excluded.
  for kw in ({"replace": True, "dataset_labels": labels}, {"replace": True},
             {}):
    c = np.asarray(D.sample_negatives(key, idx, num_data=20, num_negatives=5,
                                      **kw))
    assert ((c >= 0) & (c < 20)).all() and (c[:, 1:] != c[:, :1]).all()
  # Uniform over the 15 candidates of example 3's class complement.
  keys = jax.random.split(key, 300)
  draws = np.asarray(jax.jit(jax.vmap(lambda kk: D.sample_negatives(
      kk, idx[:1], num_data=20, num_negatives=5, dataset_labels=labels,
      replace=True)[0, 1:]))(keys)).ravel()
  counts = np.bincount(draws, minlength=20)
  cand = labels != labels[3]
  assert counts[~cand].sum() == 0
  expected = draws.size / cand.sum()
  assert np.abs(counts[cand] - expected).max() < 5 * np.sqrt(expected)


def test_ofd_margins_from_data_and_bn():
  rs = np.random.RandomState(5)
  ft = (rs.randn(4, 2, 2, 3) * [1.0, 2.0, 0.5] + [0.3, -1.0, 2.0]).astype(
      np.float32)
  fs = rs.randn(4, 2, 2, 2).astype(np.float32)
  inp = _inputs({"preact_stages": [fs], "pooled": fs.mean((1, 2))},
                {"preact_stages": [ft], "pooled": ft.mean((1, 2))})
  d = D.OFDDistiller(layers=None)
  _, s = d.init(jax.random.PRNGKey(0), inp)
  from scipy.stats import norm
  ref = []
  for c in range(3):
    m, sd = ft[..., c].astype(np.float64).mean(), ft[..., c].astype(
        np.float64).std()
    ref.append(-sd * np.exp(-(m / sd) ** 2 / 2) / np.sqrt(2 * np.pi)
               / norm.cdf(-m / sd) + m if norm.cdf(-m / sd) > 1e-3
               else -3 * sd)
  np.testing.assert_allclose(np.asarray(s["margins"][0]), ref, rtol=1e-4)
  # Margins from the teacher BNs before ReLU (mdistiller get_bn_before_relu).
  from kd_jax import models
  for name, widths, n in (("resnet8", [16, 32, 64], "layer3_0"),
                          ("wrn_16_2", [32, 64, 128], "bn1"),
                          ("vgg8", [128, 256, 512, 512], "block4_1")):
    shapes = jax.eval_shape(models.create(name, num_classes=10).init,
                            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    v = jax.tree_util.tree_map(
        lambda a: rs.randn(*a.shape).astype(np.float32), shapes)
    bns = D.bn_before_relu(v)
    assert [g.shape[0] for g, _ in bns] == widths, name
    last = v["params"][n]
    last = last.get("bn2", last)
    np.testing.assert_array_equal(bns[-1][0], last["scale"])
    np.testing.assert_array_equal(bns[-1][1], last["bias"])


def test_errors():
  with pytest.raises(ValueError, match="unknown distiller 'nope'; valid"):
    D.create("nope")
  with pytest.raises(ValueError, match="valid arguments"):
    D.create("at", bogus=1)
  with pytest.raises(ValueError, match="cannot parse layer selection"):
    D.parse_layers("1:x")
  st, d, sv, obj, dp, ds = setup("at")
  inputs = D.make_term_inputs(st, TEACHER, sv, TV, X)
  with pytest.raises(KeyError, match="no key 'missing'; available keys"):
    D.ATDistiller(feature_key="missing")(dp["at"], ds["at"], inputs)
  with pytest.raises(IndexError, match="out of range"):
    D.ATDistiller(layers=[7])(dp["at"], ds["at"], inputs)
  with pytest.raises(ValueError, match="needs the teacher's features"):
    d({}, {}, train.TermInputs(inputs.student_logits, inputs.labels,
                               student_features=inputs.student_features))
  with pytest.raises(ValueError, match="several teachers"):
    d({}, {}, train.TermInputs(
        inputs.student_logits, inputs.labels,
        student_features=inputs.student_features,
        teacher_features=[inputs.teacher_features] * 2))
  _, c, _, _, cp, cs = setup("crd")
  no_index = dict(X)
  del no_index["index"]
  with pytest.raises(KeyError, match=r"batch\['index'\]"):
    c(cp["crd"], cs["crd"], D.make_term_inputs(st, TEACHER, sv, TV, no_index))
  with pytest.raises(ValueError, match="distinct negatives"):
    D.CRDDistiller(num_data=10, num_negatives=9, dataset_labels=np.arange(10)
                   % 2, replace=False)


# ------------------------------------------------------ Orbax round trip --

def test_state_saved_and_restored_exactly(tmp_path):
  import orbax.checkpoint as ocp
  terms = []
  dists = {"crd": CASES["crd"][1], "fitnet": {}, "ofd": {}}
  for name, kw in dists.items():
    terms.append(train.Term(name, 1.0, distiller=D.create(name, **kw)))
  obj = train.Objective(ce_weight=1.0, terms=tuple(terms))
  sv = STUDENT.init(jax.random.PRNGKey(2), X["image"])
  dp, ds = D.init_distillers(obj, jax.random.PRNGKey(3),
                             student_apply=STUDENT, teacher_apply=TEACHER,
                             student_variables=sv, teacher_variables=TV,
                             batch=X)
  tx = optax.sgd(0.05, momentum=0.9)
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(4),
                                   distiller_params=dp, distiller_state=ds)
  step = jax.jit(train.make_distill_step(STUDENT, TEACHER, obj, tx))
  batches = [data(i) for i in range(4)]
  for b in batches[:2]:
    state, _ = step(state, TV, b)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "s", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "s", jax.tree_util.tree_map(
      ocp.utils.to_shape_dtype_struct, state))
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  runs = []
  for st in (state, restored):
    ms = []
    for b in batches[2:]:
      st, m = step(st, TV, b)
      ms.append(m)
    runs.append((st, ms))
  for a, b in zip(jax.tree_util.tree_leaves(runs[0]),
                  jax.tree_util.tree_leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(runs[0][0].distiller_state["crd"]["z"][0]) > 0


# ------------------------------------------------- data parallel modes --

# sync-BN adapter, bank, relation; BYOT: sync-BN exits + global-batch sum
PAR_NAMES = ("fitnet", "crd", "cc", "byot")


def _parallel_problem():
  terms = tuple(train.Term(n, 1.0, distiller=D.create(n, **CASES[n][1]))
                for n in PAR_NAMES)
  obj = train.Objective(ce_weight=1.0, terms=terms)
  batches = [data(i, n=16) for i in range(2)]
  sv = jax.device_get(TinyCNN(S_W).init(jax.random.PRNGKey(2),
                                        batches[0]["image"]))
  dparams, dstate = D.init_distillers(
      obj, jax.random.PRNGKey(3), student_apply=TinyCNN(S_W),
      teacher_apply=TEACHER, student_variables=sv, teacher_variables=TV,
      batch=batches[0])
  tx = optax.sgd(0.1, momentum=0.9)
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(4),
                                   distiller_params=dparams,
                                   distiller_state=dstate)
  return obj, tx, jax.device_get(state), batches


def _run_parallel(mode, problem):
  obj, tx, state, batches = problem
  dp_ = train.DataParallel(mode)
  student = TinyCNN(S_W, axis_name=dp_.axis_name)
  step = dp_.compile(train.make_distill_step(student, TEACHER, obj, tx,
                                             axis_name=dp_.axis_name))
  state, tv = dp_.replicate(state), dp_.replicate(TV)
  metrics = []
  for b in batches:
    state, m = step(state, tv, dp_.shard_batch(b))
    metrics.append(dp_.fetch(m))
  if mode == "pmap":  # every device holds the same distiller state
    for leaf in jax.tree_util.tree_leaves(state.distiller_state):
      leaf = np.asarray(leaf)
      assert (leaf == leaf[:1]).all()
  return metrics, dp_.fetch(state)


def test_single_pmap_jit_same_result():
  problem = _parallel_problem()
  ref_m, ref = _run_parallel("single", problem)
  assert float(ref_m[1]["crd"]) > 0
  for mode in ("pmap", "jit"):
    m, st = _run_parallel(mode, problem)
    for i in range(2):
      for k in ref_m[i]:
        np.testing.assert_allclose(m[i][k], ref_m[i][k], rtol=2e-5, atol=2e-6,
                                   err_msg=f"{mode} step {i} {k}")
    for what in ("params", "distiller_params", "distiller_state"):
      a, b = getattr(st, what), getattr(ref, what)
      assert (jax.tree_util.tree_structure(a)
              == jax.tree_util.tree_structure(b))
      for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                              jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(
            x, y, rtol=1e-4, atol=1e-5,
            err_msg=f"{mode} {what}{jax.tree_util.keystr(path)}")


# ------------------------------------------------------------- configs --

@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_cifar100_configs_build_their_terms(method):
  import importlib
  mod = importlib.import_module(f"configs.cifar100_{method}")
  if not getattr(D.registry()[method], "needs_teacher", True):
    # Self-distillation: no teacher, the config string names the network.
    c = mod.get_config()
    assert c.mode == "train" and not c.teacher.name
  else:
    c = mod.get_config("resnet32x4-resnet8x4")
    assert c.mode == "distill" and c.model.name == "resnet8x4"
  dist = {k: v for k, v in c.loss.terms.items() if D.is_distiller_term(v)}
  assert len(dist) == 1
  (label, tc), = dist.items()
  t = D.term_from_config(label, tc.to_dict(), placeholders=True)
  assert isinstance(t.distiller, D.Distiller) and t.weight > 0
  published = {"at": 1000.0, "sp": 3000.0, "pkt": 30000.0, "nst": 50.0,
               "fitnet": 100.0, "crd": 0.8, "cc": 0.02, "vid": 1.0,
               "ft": 200.0, "rkd": 1.0}
  if method in published:
    assert t.weight == published[method]
  if method == "crd":
    t = D.term_from_config(label, tc.to_dict(), num_data=50000,
                           dataset_labels=np.arange(50000) % 100)
    assert t.distiller.num_negatives == 16384 and not t.distiller.replace
    with pytest.raises(ValueError, match="training-set size"):
      D.term_from_config(label, tc.to_dict())


def test_kdsvd_gradients_stay_finite_for_rank_deficient_maps():
  # Half of the positions are exactly zero (a blank image border): two
  # singular values are exactly 0, where the SVD's gradient is 0 * inf.
  # (Rows that merely repeat give singular values that are zero only up to
  # rounding: whether their raw gradient overflows depends on the CPU's
  # LAPACK kernels: finite on an AVX-512 Xeon, non-finite on the AVX2 EPYC
  # this test was first written on.)
  rs = np.random.RandomState(6)
  half = rs.randn(2, 1, 2, 4).astype(np.float32)
  blank = np.concatenate([half, np.zeros_like(half)], axis=1)  # rank <= 2 of 4
  fs = [jnp.asarray(rs.randn(2, 4, 4, 4), jnp.float32), jnp.asarray(blank)]
  ft = [jnp.asarray(rs.randn(2, 4, 4, 4), jnp.float32),
        jnp.asarray(rs.randn(2, 2, 2, 4), jnp.float32)]

  def loss(f, **kw):
    inp = _inputs({"stages": f, "pooled": f[0].mean((1, 2))},
                  {"stages": ft, "pooled": ft[0].mean((1, 2))})
    return D.KDSVDDistiller(layers=None, per_example=False, **kw)(
        {}, {}, inp)[0]

  raw = jax.grad(lambda f: loss(f, finite_grads=False))(fs)
  safe = jax.grad(loss)(fs)
  assert not all(bool(jnp.isfinite(g).all()) for g in raw)
  assert all(bool(jnp.isfinite(g).all()) for g in safe)
  np.testing.assert_allclose(float(loss(fs)),
                             float(loss(fs, finite_grads=False)))


def test_ofa_vit_branches_train_a_vit_student():
  from kd_jax.models import vit
  student = vit.VisionTransformer(img_size=8, patch_size=2, embed_dim=8,
                                  depth=2, num_heads=2, num_classes=K)
  x = dict(X, image=np.repeat(X["image"], 3, axis=-1))
  tv = TEACHER.init(jax.random.PRNGKey(1), x["image"])
  sv = student.init(jax.random.PRNGKey(2), x["image"])
  d = D.OFADistiller(stages=(1, 3), layers=(0, 1), branch="vit")
  obj = train.Objective(ce_weight=0.0,
                        terms=(train.Term("ofa", 1.0, distiller=d),))
  dp, ds = D.init_distillers(obj, jax.random.PRNGKey(3), student_apply=student,
                             teacher_apply=TEACHER, student_variables=sv,
                             teacher_variables=tv, batch=x)
  # 4x4 patch grid (< 7x7: no merging); max(4 - s, 1) blocks per stage.
  assert [len([k for k in dp["ofa"][f"stage{s}"] if k.startswith("block")])
          for s in (1, 3)] == [3, 1]
  tx = optax.adam(3e-3)
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(4),
                                   distiller_params=dp, distiller_state=ds)
  step = jax.jit(train.make_distill_step(student, TEACHER, obj, tx))
  vals = []
  for _ in range(3):
    state, m = step(state, tv, x)
    vals.append(float(m["ofa"]))
  assert vals[-1] < vals[0], vals


def test_register_decorator_and_from_config_hook():
  from kd_jax.distillers import base

  @D.register("toy_method_for_test")
  class Toy(D.Distiller):

    def __init__(self, *, scale=1.0, size=None):
      self.scale, self.size = scale, size

    @classmethod
    def from_config(cls, cfg, run_info):
      return cls.build(size=run_info.num_data, **cfg)

    def init(self, rng, inputs):
      return {}, {}

    def __call__(self, params, state, inputs):
      return self.scale * jnp.mean(inputs.student_logits), state

  try:
    assert "toy_method_for_test" in D.available()
    assert Toy.name == "toy_method_for_test"
    t = D.term_from_config("toy", {"distiller": "toy_method_for_test",
                                   "weight": 2.0, "scale": 3.0}, num_data=7)
    assert t.weight == 2.0 and t.distiller.scale == 3.0
    assert t.distiller.size == 7
    with pytest.raises(ValueError, match="valid arguments: scale, size"):
      D.create("toy_method_for_test", bogus=1)
    with pytest.raises(ValueError, match="already registered"):
      D.register("at")(Toy)
  finally:
    base._REGISTRY.pop("toy_method_for_test", None)  # pylint: disable=protected-access
