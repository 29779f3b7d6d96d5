"""Self-distillation distillers (BYOT, CS-KD, Tf-KD) against float64 NumPy
transcriptions of the reference code, and their configs.

* BYOT: luanyunteng/pytorch-be-your-own-teacher `models/resnet.py::
  branchBottleNeck` (+ avgpool + `middle_fc`) and `train.py` (`total_loss`,
  `kd_loss_function`, `feature_loss_function`);
* CS-KD: alinlab/cs-kd `train.py` (`KDLoss`, the `--cls` loss);
* Tf-KD: yuanli2333/Teacher-free-Knowledge-Distillation `my_loss_function.py`
  (`loss_kd_regularization`, `loss_kd_self`) with the per-model
  `params.json` values the configs use.

Every total is computed through `kd_jax.train.Objective` (the objective's CE
weight + the distiller term built from the config entry), so the tests also
check how the configs split the reference's loss.
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import distillers as D
from kd_jax import train
from kd_jax import trainer
from kd_jax.distillers import ban
from kd_jax.distillers import byot
from kd_jax.distillers import tfkd
from kd_jax.trainer import classify_config

B, K = 6, 5


# ------------------------------------------------ NumPy transcriptions --

def softmax(x):
  e = np.exp(x - x.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def log_softmax(x):
  m = x.max(1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))


def ce(z, y):
  """`nn.CrossEntropyLoss()(z, y)`."""
  return -log_softmax(z)[np.arange(len(y)), y].mean()


def kl_div(log_input, target, reduction):
  """`nn.KLDivLoss(reduction)(log_input, target)`; 'mean' = over all
  elements (PyTorch's default, the Tf-KD code's)."""
  out = target * (np.log(target) - log_input)
  return out.sum() if reduction == "sum" else out.mean()


def np_conv(x, w, b, k):
  """`nn.Conv2d(kernel_size=k, stride=k)` (no padding) on NHWC, HWIO `w`."""
  n, h, wd, c = x.shape
  blocks = x.reshape(n, h // k, k, wd // k, k, c)
  return np.einsum("bhiwjc,ijco->bhwo", blocks, w) + b


def np_bn_train(x, scale, bias, eps=1e-5):
  """`nn.BatchNorm2d` in train mode (biased batch variance)."""
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_branch(x, p, k):
  """`branchBottleNeck(x)`, `avgpool`, `middle_fc` -> (logits, feature)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  for i, kk in ((1, 1), (2, k), (3, 1)):
    c, n = p[f"conv{i}"], p[f"bn{i}"]
    x = np.maximum(np_bn_train(np_conv(x, c["kernel"], c["bias"], kk),
                               n["scale"], n["bias"]), 0.0)
  fea = x.mean((1, 2))
  return fea @ p["fc"]["kernel"] + p["fc"]["bias"], fea


def np_byot_total(output, middles, final_fea, middle_feas, y, *, t, alpha,
                  beta):
  """`total_loss` of `train.py` (any number of middle exits)."""
  temp4 = softmax(output / t)
  kd = [-np.mean(np.sum(log_softmax(m / t) * temp4, 1)) * t ** 2
        for m in middles]
  fe = [np.abs((f - final_fea) ** 2 * ((f > 0) | (final_fea > 0))).sum()
        for f in middle_feas]
  return ((1 - alpha) * (ce(output, y) + sum(ce(m, y) for m in middles))
          + alpha * sum(kd) + beta * sum(fe))


def np_cskd(outputs, outputs_cls, targets, *, temp, lamda):
  """`--cls` loss: CE(anchors) + lamda * KDLoss(anchors, partners)."""
  kd = kl_div(log_softmax(outputs / temp), softmax(outputs_cls / temp),
              "sum") * temp ** 2 / len(outputs)
  return ce(outputs, targets) + lamda * kd


def np_tf_kd_reg(outputs, labels, *, reg_alpha, reg_temperature, multiplier):
  """`loss_kd_regularization`."""
  k = outputs.shape[1]
  teacher_soft = np.ones_like(outputs) * (1 - 0.99) / (k - 1)
  teacher_soft[np.arange(len(labels)), labels] = 0.99
  soft = kl_div(log_softmax(outputs), softmax(teacher_soft / reg_temperature),
                "mean") * multiplier
  return (1 - reg_alpha) * ce(outputs, labels) + reg_alpha * soft


def np_tf_kd_self(outputs, labels, teacher_outputs, *, alpha, temperature,
                  multiplier):
  """`loss_kd_self`."""
  t = temperature
  d_kl = kl_div(log_softmax(outputs / t), softmax(teacher_outputs / t),
                "mean") * t * t * multiplier
  return (1 - alpha) * ce(outputs, labels) + alpha * d_kl


# -------------------------------------------------------------- helpers --

def f32(a):
  return jnp.asarray(a, jnp.float32)


def config_objective(config, **placeholders):
  """The `Objective` a config describes (CE weight + terms)."""
  terms = []
  for label, tc in config.loss.terms.items():
    tc = tc.to_dict()
    if D.is_distiller_term(tc):
      terms.append(D.term_from_config(label, tc, placeholders=True))
    else:
      kw = {k: v for k, v in tc.items() if k not in ("weight", "name")}
      terms.append(train.Term(tc.get("name", label), tc["weight"],
                              label=label, **kw))
  return train.Objective(ce_weight=config.loss.ce_weight, terms=tuple(terms))


def byot_features(seed, n=B):
  """Zoo-style features: stem, two exit stages (8x8, 4x4), last (2x2)."""
  rs = np.random.RandomState(seed)
  stages = [rs.randn(n, 8, 8, 3), rs.randn(n, 8, 8, 6), rs.randn(n, 4, 4, 6),
            np.maximum(rs.randn(n, 2, 2, 8), 0)]
  pooled = stages[-1].mean((1, 2))
  return [s.astype(np.float32) for s in stages], pooled.astype(np.float32)


def byot_inputs(seed, train_mode=True):
  stages, pooled = byot_features(seed)
  rs = np.random.RandomState(seed + 100)
  z = (2 * rs.randn(B, K)).astype(np.float32)
  y = rs.randint(0, K, B)
  feats = {"stages": [f32(s) for s in stages], "pooled": f32(pooled)}
  return train.TermInputs(f32(z), jnp.asarray(y), student_features=feats,
                          train=train_mode), (stages, pooled, z, y)


# --------------------------------------------------------------- BYOT --

def test_byot_branch_matches_reference_bottleneck():
  stages, _ = byot_features(0)
  for k, x in ((4, stages[1]), (2, stages[2])):
    m = byot.BYOTBranch(channels=8, kernel=k, num_classes=K)
    v = m.init(jax.random.PRNGKey(k), f32(x), train=False)
    assert v["params"]["conv2"]["kernel"].shape == (k, k, 2, 2)  # C/4, k x k
    (logits, fea), upd = m.apply(v, f32(x), train=True,
                                 mutable=["batch_stats"])
    want_logits, want_fea = np_branch(x, v["params"], k)
    np.testing.assert_allclose(fea, want_fea, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    # Running mean: torch's momentum 0.1 (conv2's output batch mean).
    c1 = v["params"]["conv1"]
    h = np.maximum(np_bn_train(np_conv(x.astype(np.float64), c1["kernel"],
                                       c1["bias"], 1),
                               v["params"]["bn1"]["scale"],
                               v["params"]["bn1"]["bias"]), 0)
    c2 = np_conv(h, v["params"]["conv2"]["kernel"],
                 v["params"]["conv2"]["bias"], k)
    np.testing.assert_allclose(upd["batch_stats"]["bn2"]["mean"],
                               0.1 * c2.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_byot_branch_init_follows_the_reference():
  # kaiming_normal_(fan_out, relu) convs, PyTorch-default biases / Linear.
  m = byot.BYOTBranch(channels=256, kernel=2, num_classes=100)
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 128)),
             train=False)["params"]
  w = np.asarray(p["conv3"]["kernel"])  # 1x1, 64 -> 256: std sqrt(2/256)
  assert abs(w.std() / np.sqrt(2 / 256) - 1) < 0.05 and abs(w.mean()) < 0.01
  b = np.asarray(p["conv2"]["bias"])    # U(+-1/sqrt(64 * 2 * 2))
  assert np.abs(b).max() <= 1 / 16 and np.abs(b).max() > 0.7 / 16
  fc = np.asarray(p["fc"]["kernel"])    # U(+-1/sqrt(256))
  assert np.abs(fc).max() <= 1 / 16 and np.abs(fc).max() > 0.9 / 16


@pytest.mark.parametrize("beta", [1e-6, 0.05])
def test_byot_objective_matches_reference_total_loss(beta):
  inputs, (stages, pooled, z, y) = byot_inputs(1)
  d = D.create("byot", beta=beta)
  params, state = d.init(jax.random.PRNGKey(0), inputs)
  assert sorted(params) == ["exit1", "exit2"]
  obj = train.Objective(ce_weight=1 - d.alpha,
                        terms=(train.Term("byot", 1.0, distiller=d),))
  loss, aux = jax.jit(lambda p, s, z_, f_: obj(
      z_, inputs.labels, student_features=f_, distiller_params={"byot": p},
      distiller_state={"byot": s}))(params, state, inputs.student_logits,
                                    inputs.student_features)
  outs = [np_branch(stages[i], params[f"exit{i}"], k)
          for i, k in ((1, 4), (2, 2))]
  want = np_byot_total(z.astype(np.float64), [o[0] for o in outs],
                       pooled.astype(np.float64), [o[1] for o in outs], y,
                       t=3.0, alpha=0.1, beta=beta)
  np.testing.assert_allclose(float(loss), want, rtol=2e-5)
  # The BN statistics of the exits moved (train mode).
  new = aux["distiller_state"]["byot"]["exit1"]["bn1"]["mean"]
  assert float(jnp.abs(new - state["exit1"]["bn1"]["mean"]).max()) > 0


def test_byot_gradients_match_finite_differences():
  inputs, (stages, pooled, z, y) = byot_inputs(2)
  d = D.create("byot", beta=0.05)
  params, state = d.init(jax.random.PRNGKey(1), inputs)

  def loss_of(s2, zz):
    feats = {"stages": [f32(stages[0]), f32(stages[1]), s2, f32(stages[3])],
             "pooled": f32(pooled)}
    inp = train.TermInputs(zz, jnp.asarray(y), student_features=feats)
    return d(params, state, inp)[0]

  g_s2, g_z = jax.grad(loss_of, argnums=(0, 1))(f32(stages[2]), f32(z))
  # No gradient into the deepest classifier (it is the teacher here).
  assert not np.any(np.asarray(g_z))

  def np_loss(s2):
    outs = [np_branch(stages[1], params["exit1"], 4),
            np_branch(s2, params["exit2"], 2)]
    # The distiller's term = the total minus the deepest CE.
    return np_byot_total(z.astype(np.float64), [o[0] for o in outs],
                         pooled.astype(np.float64), [o[1] for o in outs], y,
                         t=3.0, alpha=0.1, beta=0.05) - 0.9 * ce(
                             z.astype(np.float64), y)

  x = stages[2].astype(np.float64)
  rs = np.random.RandomState(0)
  for idx in [tuple(rs.randint(0, s) for s in x.shape) for _ in range(12)]:
    e = np.zeros_like(x)
    e[idx] = 1e-5
    fd = (np_loss(x + e) - np_loss(x - e)) / 2e-5
    np.testing.assert_allclose(float(g_s2[idx]), fd, rtol=2e-3, atol=2e-5)


def test_byot_exit_eval_step_reports_every_classifier():
  student = _TinyCNN()
  x = np.random.RandomState(3).randn(10, 8, 8, 1).astype(np.float32)
  y = np.arange(10) % K
  sv = student.init(jax.random.PRNGKey(0), x)
  d = D.create("byot")
  obj = train.Objective(ce_weight=0.9,
                        terms=(train.Term("byot", 1.0, distiller=d),))
  # No teacher: the distillers are initialized from the student alone.
  dp, ds = D.init_distillers(obj, jax.random.PRNGKey(1), student_apply=student,
                             teacher_apply=None, student_variables=sv,
                             teacher_variables=None,
                             batch={"image": x, "label": y})
  mask = np.array([True] * 8 + [False] * 2)
  batch = {"image": x, "label": y, "mask": mask}
  got = jax.jit(byot.make_exit_eval_step(student, d))(sv, dp["byot"],
                                                       ds["byot"], batch)
  assert set(got) == set(byot.exit_names(2)) | {"count"}
  logits, feats = student.apply(sv, x, train=False)
  zs = [np.asarray(z) for z in d.exit_logits(dp["byot"], ds["byot"], logits,
                                             feats)]
  assert len(zs) == 3
  np.testing.assert_array_equal(zs[-1], np.asarray(logits))
  for i, zz in enumerate(zs):
    want = np.mean(np.argmax(zz, 1)[mask] == y[mask])
    assert float(got[f"top1_exit{i + 1}"]) == pytest.approx(want)
  ens = sum(softmax(zz.astype(np.float64)) for zz in zs)
  assert float(got["top1_ensemble"]) == pytest.approx(
      np.mean(np.argmax(ens, 1)[mask] == y[mask]))
  assert float(got["count"]) == 8
  plain = train.make_eval_step(student)(sv, batch)
  assert float(plain["top1"]) == pytest.approx(float(got["top1_exit3"]))


def test_byot_errors():
  inputs, _ = byot_inputs(4)
  with pytest.raises(ValueError, match="alpha"):
    D.create("byot", alpha=1.5)
  with pytest.raises(ValueError, match="square integer multiple"):
    bad = dict(inputs.student_features)
    bad["stages"] = list(bad["stages"])
    bad["stages"][2] = jnp.zeros((B, 3, 3, 6))
    D.create("byot").init(jax.random.PRNGKey(0), train.TermInputs(
        inputs.student_logits, inputs.labels, student_features=bad))
  with pytest.raises(ValueError, match="picks no feature map"):
    D.create("byot", layers="3:3").init(jax.random.PRNGKey(0), inputs)


class _TinyCNN(nn.Module):
  """Stages [8x8 stem, 8x8, 4x4, 2x2] with BN, like the zoo's."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    stages, h = [], x
    for i, w in enumerate((4, 8, 8, 8)):
      s = 1 if i < 2 else 2
      h = nn.Conv(w, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)))(h)
      h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
      stages.append(h)
    pooled = jnp.mean(h, axis=(1, 2))
    return nn.Dense(K)(pooled), {"stages": stages, "pooled": pooled}


# -------------------------------------------------------------- CS-KD --

def test_cskd_objective_matches_reference():
  rs = np.random.RandomState(5)
  z, zp = (2 * rs.randn(B, K)).astype(np.float32), (
      2 * rs.randn(B, K)).astype(np.float32)
  y = rs.randint(0, K, B)
  c = _config("cskd")
  obj = config_objective(c)
  for view in ((f32(zp), None), f32(zp)):
    loss, aux = obj(f32(z), jnp.asarray(y), views={"pair": view})
    want = np_cskd(z.astype(np.float64), zp.astype(np.float64), y, temp=4.0,
                   lamda=1.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # The partners' logits are a constant (the reference's torch.no_grad()).
  g = jax.grad(lambda a: obj(f32(z), jnp.asarray(y),
                             views={"pair": (a, None)})[0])(f32(zp))
  assert not np.any(np.asarray(g))


def test_cskd_errors():
  d = D.create("cskd")
  inp = train.TermInputs(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match=r"views\['pair'\]"):
    d({}, {}, inp)
  with pytest.raises(ValueError, match="one partner per anchor"):
    d({}, {}, train.TermInputs(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32),
                               views={"pair": jnp.zeros((4, 3))}))
  assert D.CSKDDistiller.views == ("pair",)


# ------------------------------------------------------------- Tf-KD --

@pytest.mark.parametrize("model,params", [
    # experiments/base_experiments/base_<model>/params.json
    ("resnet18_cifar", dict(reg_alpha=0.1, reg_temperature=20,
                            multiplier=100.0)),
    ("mobilenetv2", dict(reg_alpha=0.95, reg_temperature=40, multiplier=1.0)),
    ("shufflenetv2", dict(reg_alpha=0.95, reg_temperature=10,
                          multiplier=1.0))])
def test_tfkd_reg_config_objective_matches_reference(model, params):
  c = _config("tfkd", f"reg-{model}")
  assert c.mode == "train" and c.model.num_classes == 100
  obj = config_objective(c)
  rs = np.random.RandomState(6)
  z = (3 * rs.randn(B, 100)).astype(np.float32)
  y = rs.randint(0, 100, B)
  loss, _ = obj(f32(z), jnp.asarray(y))
  np.testing.assert_allclose(
      float(loss), np_tf_kd_reg(z.astype(np.float64), y, **params),
      rtol=1e-5)


@pytest.mark.parametrize("model,params", [
    # experiments/kd_experiments/<model>_distill/<model>_self_teacher
    ("resnet18_cifar", dict(alpha=0.95, temperature=6, multiplier=50.0)),
    ("mobilenetv2", dict(alpha=0.95, temperature=20, multiplier=1.0)),
    ("shufflenetv2", dict(alpha=0.95, temperature=20, multiplier=1.0))])
def test_tfkd_self_config_is_ordinary_kd_from_a_copy(model, params):
  c = _config("tfkd", f"self-{model}")
  assert c.mode == "distill" and c.teacher.name == c.model.name == model
  obj = config_objective(c)
  rs = np.random.RandomState(7)
  z, t = (3 * rs.randn(2, B, 100)).astype(np.float32)
  y = rs.randint(0, 100, B)
  loss, _ = obj(f32(z), jnp.asarray(y), teacher_logits=f32(t))
  np.testing.assert_allclose(
      float(loss), np_tf_kd_self(z.astype(np.float64), y,
                                 t.astype(np.float64), **params), rtol=1e-5)
  assert c.loss.terms.kd.weight == tfkd.self_kd_weight(
      params["alpha"], params["multiplier"], 100)


# ---------------------------------------------------------------- BAN --

def test_ban_ensemble_eval_step_matches_numpy():
  student = _TinyCNN()
  x = np.random.RandomState(8).randn(12, 8, 8, 1).astype(np.float32)
  y = np.arange(12) % K
  mask = np.array([True] * 10 + [False] * 2)
  batch = {"image": x, "label": y, "mask": mask}
  gens = [student.init(jax.random.PRNGKey(i), x) for i in range(3)]
  step = jax.jit(ban.make_ensemble_eval_step(student))
  # One model: the ordinary evaluation.
  one, plain = step(gens[:1], batch), train.make_eval_step(student)(gens[0],
                                                                    batch)
  for k in ("top1", "top5", "count"):
    assert float(one[k]) == pytest.approx(float(plain[k]))
  assert float(one["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-5)
  # Three generations: mean of the softmax probabilities.
  got = step(gens, batch)
  p = sum(softmax(np.asarray(student.apply(v, x, train=False)[0],
                             np.float64)) for v in gens) / 3
  pm, ym = p[mask], y[mask]
  assert float(got["top1"]) == pytest.approx(np.mean(pm.argmax(1) == ym))
  top5 = np.argsort(-pm, 1)[:, :5]
  assert float(got["top5"]) == pytest.approx(
      np.mean((top5 == ym[:, None]).any(1)))
  assert float(got["loss"]) == pytest.approx(
      -np.mean(np.log(pm[np.arange(10), ym])), rel=1e-5)
  assert float(got["count"]) == 10
  with pytest.raises(ValueError, match="at least one"):
    ban.ensemble_probabilities([])


def test_chain_configs_are_valid_seed_experiments():
  from experiments import seed_experiment
  for name, arg, chain in (
      ("takd", None, {"ta": "teacher", "student_takd": "ta",
                      "student_direct": "teacher"}),
      ("ban", "wrn_40_2-ban_l", {"gen1": "gen0", "gen2": "gen1",
                                 "gen3": "gen2"})):
    c = _config(name, arg)
    assert dict(c.seed_experiment.distill_from) == chain
    c.debug = True
    seed_experiment.validate(c)
  c = _config("ban", "wrn_40_2")
  g1 = c.seed_experiment.phases.gen1
  assert g1.model.name == g1.teacher.name == "wrn_40_2"
  assert g1.loss.ce_weight == 0.0 and g1.loss.terms.kd.temperature == 1.0
  assert tuple(c.seed_experiment.ensembles.bane_3) == ("gen1", "gen2", "gen3")
  t = _config("takd").seed_experiment.phases
  assert (t.ta.teacher.name, t.ta.model.name, t.student_takd.teacher.name,
          t.student_takd.model.name) == ("resnet110", "resnet20", "resnet20",
                                         "resnet8")


# ------------------------------------------------------------ configs --

def _config(name, arg=None):
  m = importlib.import_module(f"configs.cifar100_{name}")
  return m.get_config(arg) if arg is not None else m.get_config()


def test_byot_config_splits_the_loss_like_the_reference():
  c = _config("byot")
  assert c.mode == "train" and c.model.name == "resnet18_cifar"
  t = D.term_from_config("byot", c.loss.terms.byot.to_dict())
  assert t.weight == 1.0 and not t.warmup
  # The objective's CE is the deepest classifier's (1 - alpha) share.
  assert c.loss.ce_weight == pytest.approx(1 - t.distiller.alpha)
  assert (t.distiller.alpha, t.distiller.temperature, t.distiller.beta) == (
      0.1, 3.0, 1e-6)
  o = c.optimizer
  assert (o.learning_rate, o.weight_decay, tuple(o.decay_epochs)) == (
      0.1, 5e-4, (75, 130, 180))
  assert c.train.batch_size == 128 and c.train.num_epochs == 200
  assert c.report.paper.value == 78.64


def test_cskd_config_recipe():
  c = _config("cskd")
  assert c.mode == "train"
  # The 'pair' view makes the trainer pair same-class examples.
  c.debug = True  # (batch sizes for the tests' 8 devices)
  assert classify_config.same_class_pairs(trainer.parse(
      trainer.apply_debug(c)))
  assert c.loss.ce_weight == 1.0 and c.loss.terms.cskd.weight == 1.0
  # adjust_learning_rate runs after each epoch: epoch 100 (0-based) still
  # trains at 0.1, the decay applies from epoch 101 (and 151).
  assert tuple(c.optimizer.decay_epochs) == (101, 151)
  assert c.optimizer.weight_decay == 1e-4 and c.train.batch_size == 128


@pytest.mark.parametrize("name", ["byot", "cskd", "tfkd"])
def test_teacher_free_distillers_declare_it(name):
  assert D.registry()[name].needs_teacher is False


# ------------------------------------------------- TAKD on MNIST (CLI) --

@pytest.mark.slow
def test_mnist_takd_debug_run(tmp_path):
  from experiments import seed_experiment
  c = importlib.import_module("configs.mnist_takd").get_config()
  c.debug = True
  res = seed_experiment.run(c, str(tmp_path))
  ph = res["phases"]
  assert ph["ta"]["model"] == "mlp_teacher"
  assert ph["ta"]["teacher"] == ph["student_direct"]["teacher"] == (
      "cnn_teacher")
  assert ph["student_takd"]["teacher"] == "mlp_teacher"
  assert set(res["gains"]) == {"student_takd", "student_direct"}
  g = res["comparisons"]["student_takd vs student_direct"]
  np.testing.assert_allclose(
      g["last_top1"]["per_seed"],
      np.asarray(ph["student_takd"]["last_top1"])
      - np.asarray(ph["student_direct"]["last_top1"]))
