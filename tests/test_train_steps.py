"""Tests of kd_jax.train objectives and steps (single device).

Every value is checked against an independent float64 NumPy computation:
the objective's formula, and for linear students the closed-form gradient
of CE / KD / DML / adapter-MSE terms followed by one SGD update.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kd_jax import train

B, D, K, DT = 8, 5, 4, 3
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------
# Independent NumPy references (float64).


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y].mean()


def np_kd(s, t, T):
  p = np_softmax(t / T)
  return T * T * (p * (np_log_softmax(t / T) - np_log_softmax(s / T))).sum(-1).mean()


def np_onehot(y, k):
  return np.eye(k)[y]


def dce_dz(z, y):
  return (np_softmax(z) - np_onehot(y, z.shape[-1])) / len(y)


def dkd_dz(z, t, T):
  return T * (np_softmax(z / T) - np_softmax(t / T)) / len(z)


# ---------------------------------------------------------------------------
# Tiny problem: hand-written linear apply functions.


def data(seed=0, n=B):
  rs = np.random.RandomState(seed)
  return {"image": rs.randn(n, D).astype(np.float32),
          "label": rs.randint(0, K, n).astype(np.int32)}


def lin_params(seed, d_in=D, d_out=K, scale=1.0):
  rs = np.random.RandomState(seed)
  return {"w": (scale * rs.randn(d_in, d_out)).astype(np.float32),
          "b": (0.1 * rs.randn(d_out)).astype(np.float32)}


def lin_student_apply(variables, x, train=True, rngs=None):
  del train, rngs
  p = variables["params"]
  z = x @ p["w"] + p["b"]
  return z, {"pooled": z}


def lin_teacher_apply(variables, x):
  p = variables["params"]
  return x @ p["w"] + p["b"], {"pooled": x @ p["f"]}


def teacher_vars(seed=10):
  p = lin_params(seed, scale=2.0)
  p["f"] = np.random.RandomState(seed + 1).randn(D, DT).astype(np.float32)
  return {"params": p}


def np_teacher(tv, x):
  p = {k: np.asarray(v, np.float64) for k, v in tv["params"].items()}
  return x @ p["w"] + p["b"], x @ p["f"]


def f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------------------
# Objective.


def test_objective_matches_numpy():
  rs = np.random.RandomState(0)
  s = rs.randn(B, K).astype(np.float32)
  t = 3 * rs.randn(B, K).astype(np.float32)
  y = rs.randint(0, K, B).astype(np.int32)
  obj = train.Objective(
      ce_weight=0.7, warmup_epochs=4,
      terms=(train.Term("kd", 0.3, temperature=5.0),
             train.Term("kd", 0.2, label="kd_t1", temperature=1.0,
                        warmup=False)))
  loss, aux = jax.jit(lambda s, y, t: obj(s, y, teacher_logits=t, epoch=2))(
      s, y, t)
  m = aux["metrics"]
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  ce, kd5, kd1 = np_ce(s64, y), np_kd(s64, t64, 5.0), np_kd(s64, t64, 1.0)
  factor = 2 / 4
  expected = 0.7 * ce + factor * 0.3 * kd5 + 0.2 * kd1
  np.testing.assert_allclose(m["ce"], ce, rtol=RTOL)
  np.testing.assert_allclose(m["kd"], kd5, rtol=RTOL)
  np.testing.assert_allclose(m["kd_t1"], kd1, rtol=RTOL)
  np.testing.assert_allclose(m["kd_factor"], factor)
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
  np.testing.assert_allclose(m["loss"], expected, rtol=RTOL)
  np.testing.assert_allclose(m["top1"], np.mean(s.argmax(-1) == y))
  assert all(v.dtype == jnp.float32 for v in m.values())


def test_warmup_factor_is_min_epoch_over_warmup_one_based():
  obj = train.Objective(warmup_epochs=20, terms=(train.Term("kd"),))
  for epoch in (1, 2, 10, 19, 20, 21, 50):
    np.testing.assert_allclose(obj.warmup_factor(epoch), min(epoch / 20, 1.0),
                               rtol=1e-7)
  np.testing.assert_allclose(train.Objective().warmup_factor(None), 1.0)
  with pytest.raises(ValueError, match="`epoch` is required"):
    obj.warmup_factor(None)


def test_warmup_through_step_counts_epochs_from_one():
  spe, warm = 2, 3
  obj = train.Objective(ce_weight=1.0, warmup_epochs=warm,
                        terms=(train.Term("kd", 1.0, temperature=2.0),))
  tx = optax.sgd(0.0)  # frozen params: the total is CE + factor * KD
  st = train.create_train_state({"params": lin_params(0)}, tx,
                                rng=jax.random.key(0))
  step = train.make_distill_step(lin_student_apply, lin_teacher_apply, obj,
                                 tx, steps_per_epoch=spe)
  multi = jax.jit(train.make_multi_step(step))
  batch = data()
  chunk = {k: np.stack([v] * 8) for k, v in batch.items()}
  st, m = multi(st, teacher_vars(), chunk)
  epochs = np.arange(8) // spe + 1
  np.testing.assert_allclose(m["kd_factor"], np.minimum(epochs / warm, 1.0),
                             rtol=1e-7)
  np.testing.assert_allclose(m["loss"], m["ce"] + m["kd_factor"] * m["kd"],
                             rtol=1e-6)
  assert int(st.step) == 8
  with pytest.raises(ValueError, match="pass `steps_per_epoch`"):
    train.make_distill_step(lin_student_apply, lin_teacher_apply, obj, tx)


# ---------------------------------------------------------------------------
# Distillation step vs closed-form gradient.


def test_distill_step_equals_numpy_sgd_update():
  lr, T = 0.5, 4.0
  obj = train.Objective(ce_weight=0.3,
                        terms=(train.Term("kd", 0.7, temperature=T),))
  tx = optax.sgd(lr)
  p0 = lin_params(0)
  st = train.create_train_state({"params": p0}, tx, rng=jax.random.key(0))
  step = jax.jit(train.make_distill_step(lin_student_apply, lin_teacher_apply,
                                         obj, tx))
  tv = teacher_vars()
  batch = data()
  st1, m = step(st, tv, batch)

  x, y = batch["image"].astype(np.float64), batch["label"]
  p = f64(p0)
  z = x @ p["w"] + p["b"]
  t, _ = np_teacher(tv, x)
  g = 0.3 * dce_dz(z, y) + 0.7 * dkd_dz(z, t, T)
  np.testing.assert_allclose(m["loss"], 0.3 * np_ce(z, y) + 0.7 * np_kd(z, t, T),
                             rtol=RTOL)
  np.testing.assert_allclose(st1.params["w"], p["w"] - lr * x.T @ g,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(st1.params["b"], p["b"] - lr * g.sum(0),
                             rtol=RTOL, atol=ATOL)
  assert int(st1.step) == 1
  # The teacher is an argument: nothing of it is in the state.
  assert set(jax.tree_util.tree_leaves(st1.params)[0].shape) <= {D, K}


def test_teacher_is_an_argument_not_a_constant_and_runs_in_inference_mode():
  obj = train.Objective(ce_weight=0.0,
                        terms=(train.Term("kd", 1.0, temperature=1.0),))
  tx = optax.sgd(0.1)
  teacher = TeacherWithDropout()
  x = data()["image"]
  tv1 = teacher.init(jax.random.key(1), x)
  tv2 = teacher.init(jax.random.key(2), x)
  step = jax.jit(train.make_distill_step(lin_student_apply, teacher, obj, tx))
  mk = lambda seed: train.create_train_state(  # noqa: E731
      {"params": lin_params(0)}, tx, rng=jax.random.key(seed))
  _, m1 = step(mk(0), tv1, data())
  _, m1b = step(mk(5), tv1, data())   # another dropout key
  _, m2 = step(mk(0), tv2, data())    # other teacher weights, same program
  assert step._cache_size() == 1
  # New teacher values change the result without recompiling: not baked in.
  assert abs(float(m1["kd"]) - float(m2["kd"])) > 1e-3
  # Teacher dropout is off (train=False): the rng does not matter.
  np.testing.assert_array_equal(m1["kd"], m1b["kd"])
  # And the KD value is the one of the deterministic teacher forward.
  t_logits, _ = teacher.apply(tv1, x, train=False)
  z = lin_student_apply({"params": lin_params(0)}, x)[0]
  np.testing.assert_allclose(
      m1["kd"], np_kd(f64(z), f64(t_logits), 1.0), rtol=RTOL)


class TeacherWithDropout(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(16)(x))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return nn.Dense(K)(h), {"pooled": h}


class BNStudent(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(16, use_bias=False, dtype=self.dtype)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     dtype=self.dtype)(h)
    h = nn.relu(h)
    h = nn.Dropout(0.1, deterministic=not train)(h)
    return nn.Dense(K, dtype=self.dtype)(h), {"pooled": h}


def test_linen_bn_dropout_student_loss_decreases():
  rs = np.random.RandomState(0)
  x = rs.randn(64, D).astype(np.float32)
  tv = teacher_vars()
  y = np.argmax(np_teacher(tv, x)[0], -1).astype(np.int32)
  student = BNStudent()
  tx = optax.adam(3e-2)
  st = train.create_train_state(student.init(jax.random.key(0), x), tx,
                                rng=jax.random.key(1))
  bs0 = st.batch_stats
  obj = train.Objective(ce_weight=0.5,
                        terms=(train.Term("kd", 0.5, temperature=2.0),))
  step = train.make_distill_step(student, lin_teacher_apply, obj, tx)
  multi = jax.jit(train.make_multi_step(step))
  chunk = {"image": x.reshape(4, 16, D), "label": y.reshape(4, 16)}
  chunk = {k: np.concatenate([v] * 5) for k, v in chunk.items()}  # 20 steps
  st, m = multi(st, tv, chunk)
  assert m["loss"].shape == (20,)
  assert float(m["loss"][-4:].mean()) < 0.6 * float(m["loss"][:4].mean())
  assert not np.allclose(st.batch_stats["BatchNorm_0"]["mean"],
                         bs0["BatchNorm_0"]["mean"])
  ev = jax.jit(train.make_eval_step(student))(st, {"image": x, "label": y})
  assert float(ev["top1"]) > 0.6


def test_nnx_model_via_split_merge():
  lr, T = 0.5, 2.0

  class NNXStudent(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(D, K, rngs=rngs)

    def __call__(self, x):
      z = self.linear(x)
      return z, {"pooled": z}

  graphdef, params = nnx.split(NNXStudent(nnx.Rngs(0)))

  def nnx_apply(variables, x, train=True, rngs=None):
    return nnx.merge(graphdef, variables["params"])(x)

  obj = train.Objective(ce_weight=0.4,
                        terms=(train.Term("kd", 0.6, temperature=T),))
  tx = optax.sgd(lr)
  st = train.create_train_state({"params": params}, tx, rng=jax.random.key(0))
  step = jax.jit(train.make_distill_step(nnx_apply, lin_teacher_apply, obj, tx))
  tv, batch = teacher_vars(), data()
  st1, _ = step(st, tv, batch)

  w = np.asarray(params["linear"]["kernel"][...], np.float64)
  b = np.asarray(params["linear"]["bias"][...], np.float64)
  x, y = batch["image"].astype(np.float64), batch["label"]
  z = x @ w + b
  g = 0.4 * dce_dz(z, y) + 0.6 * dkd_dz(z, np_teacher(tv, x)[0], T)
  merged = nnx.merge(graphdef, st1.params)
  np.testing.assert_allclose(merged.linear.kernel[...], w - lr * x.T @ g,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(merged.linear.bias[...], b - lr * g.sum(0),
                             rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Variants.


@pytest.mark.parametrize("mode", ["mean_logits", "mean_losses"])
def test_multi_teacher(mode):
  T, w = 3.0, (1.0, 3.0)
  obj = train.Objective(ce_weight=0.5,
                        terms=(train.Term("kd", 0.5, temperature=T),))
  tx = optax.sgd(0.0)
  st = train.create_train_state({"params": lin_params(0)}, tx,
                                rng=jax.random.key(0))
  step = jax.jit(train.make_distill_step(
      lin_student_apply, [lin_teacher_apply, lin_teacher_apply], obj, tx,
      multi_teacher=mode, teacher_weights=w))
  tvs = [teacher_vars(10), teacher_vars(20)]
  batch = data()
  _, m = step(st, tvs, batch)
  x, y = batch["image"].astype(np.float64), batch["label"]
  z = lin_student_apply({"params": f64(lin_params(0))}, x)[0]
  t1, t2 = np_teacher(tvs[0], x)[0], np_teacher(tvs[1], x)[0]
  if mode == "mean_logits":
    kd = np_kd(z, 0.25 * t1 + 0.75 * t2, T)
  else:
    kd = 0.25 * np_kd(z, t1, T) + 0.75 * np_kd(z, t2, T)
  np.testing.assert_allclose(m["kd"], kd, rtol=RTOL)
  np.testing.assert_allclose(m["loss"], 0.5 * np_ce(z, y) + 0.5 * kd,
                             rtol=RTOL)


def test_precomputed_teacher_logits_give_the_same_training():
  obj = train.Objective(ce_weight=0.5,
                        terms=(train.Term("kd", 0.5, temperature=4.0),))
  tx = optax.adam(1e-2)
  tv = teacher_vars()
  d = data(n=24)
  logits = train.precompute_teacher_logits(lin_teacher_apply, tv, d["image"],
                                           batch_size=16)
  assert logits.shape == (24, K) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, np_teacher(tv, d["image"].astype(np.float64))[0],
                             rtol=1e-5, atol=1e-5)
  chunk = {k: v.reshape(3, 8, *v.shape[1:]) for k, v in d.items()}
  mk = lambda: train.create_train_state(  # noqa: E731
      {"params": lin_params(0)}, tx, rng=jax.random.key(0))
  with_teacher = jax.jit(train.make_multi_step(train.make_distill_step(
      lin_student_apply, lin_teacher_apply, obj, tx)))
  precomputed = jax.jit(train.make_multi_step(train.make_distill_step(
      lin_student_apply, None, obj, tx)))
  s1, m1 = with_teacher(mk(), tv, chunk)
  chunk2 = dict(chunk, teacher_logits=logits.reshape(3, 8, K))
  s2, m2 = precomputed(mk(), None, chunk2)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(s1.params),
                  jax.tree_util.tree_leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(KeyError, match="teacher_logits"):
    precomputed(mk(), None, chunk)


def test_dml_two_students_equals_numpy():
  lr = 0.5
  obj = train.Objective(ce_weight=1.0,
                        terms=(train.Term("kd", 1.0, temperature=1.0),))
  tx = optax.sgd(lr)
  pa, pb = lin_params(0), lin_params(1)
  states = tuple(train.create_train_state({"params": p}, tx,
                                          rng=jax.random.key(i))
                 for i, p in enumerate((pa, pb)))
  step = jax.jit(train.make_dml_step([lin_student_apply] * 2, obj, tx))
  batch = data()
  (sa, sb), m = step(states, batch)
  x, y = batch["image"].astype(np.float64), batch["label"]
  za = x @ f64(pa)["w"] + f64(pa)["b"]
  zb = x @ f64(pb)["w"] + f64(pb)["b"]
  # Student k: CE + KL(p_l || p_k), the peer's distribution is a constant.
  np.testing.assert_allclose(m["student0/kd"], np_kd(za, zb, 1.0), rtol=RTOL)
  np.testing.assert_allclose(m["student1/kd"], np_kd(zb, za, 1.0), rtol=RTOL)
  np.testing.assert_allclose(m["student0/loss"],
                             np_ce(za, y) + np_kd(za, zb, 1.0), rtol=RTOL)
  for new, p, z, peer in ((sa, pa, za, zb), (sb, pb, zb, za)):
    g = dce_dz(z, y) + dkd_dz(z, peer, 1.0)
    np.testing.assert_allclose(new.params["w"], f64(p)["w"] - lr * x.T @ g,
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(new.params["b"], f64(p)["b"] - lr * g.sum(0),
                               rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="at least 2 students"):
    train.make_dml_step([lin_student_apply], obj, tx)


class AdapterMSE:
  """Toy feature distiller: mean((f_s A - f_t)^2), A trainable; counts calls."""

  def init(self, rng, inputs):
    a = 0.1 * jax.random.normal(rng, (inputs.student_features["pooled"].shape[-1],
                                      inputs.teacher_features["pooled"].shape[-1]))
    return {"a": a}, {"calls": jnp.zeros((), jnp.int32)}

  def __call__(self, params, state, inputs):
    fs = inputs.student_features["pooled"]
    ft = inputs.teacher_features["pooled"]
    loss = jnp.mean((fs @ params["a"] - ft) ** 2)
    return loss, {"calls": state["calls"] + 1}


def test_distiller_term_gets_gradients_and_optimizer_updates():
  lr, wd = 0.2, 0.5
  obj = train.Objective(ce_weight=1.0,
                        terms=(train.Term("adapter", wd, distiller=AdapterMSE()),))
  tx = optax.sgd(lr)
  tv, batch, p0 = teacher_vars(), data(), lin_params(0)
  s_out = lin_student_apply({"params": p0}, batch["image"])
  t_out = lin_teacher_apply(tv, batch["image"])
  dparams, dstate = obj.init_distillers(
      jax.random.key(3), train.TermInputs(
          student_logits=s_out[0], labels=batch["label"],
          teacher_logits=t_out[0], student_features=s_out[1],
          teacher_features=t_out[1]))
  st = train.create_train_state({"params": p0}, tx, rng=jax.random.key(0),
                                distiller_params=dparams,
                                distiller_state=dstate)
  step = jax.jit(train.make_distill_step(lin_student_apply, lin_teacher_apply,
                                         obj, tx))
  st1, m = step(st, tv, batch)

  x, y = batch["image"].astype(np.float64), batch["label"]
  p, a = f64(p0), np.asarray(dparams["adapter"]["a"], np.float64)
  z = x @ p["w"] + p["b"]
  ft = np_teacher(tv, x)[1]
  r = z @ a - ft
  mse = np.mean(r ** 2)
  dmse_dr = 2 * r / r.size
  g = dce_dz(z, y) + wd * dmse_dr @ a.T
  np.testing.assert_allclose(m["adapter"], mse, rtol=RTOL)
  np.testing.assert_allclose(m["loss"], np_ce(z, y) + wd * mse, rtol=RTOL)
  np.testing.assert_allclose(st1.distiller_params["adapter"]["a"],
                             a - lr * wd * z.T @ dmse_dr, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(st1.params["w"], p["w"] - lr * x.T @ g,
                             rtol=RTOL, atol=ATOL)
  assert int(st1.distiller_state["adapter"]["calls"]) == 1


def test_train_step_supervised_equals_numpy_sgd():
  lr = 0.3
  tx = optax.sgd(lr)
  p0 = lin_params(0)
  st = train.create_train_state({"params": p0}, tx, rng=jax.random.key(0))
  step = jax.jit(train.make_train_step(lin_student_apply, tx))
  batch = data()
  st1, m = step(st, batch)
  x, y = batch["image"].astype(np.float64), batch["label"]
  z = x @ f64(p0)["w"] + f64(p0)["b"]
  np.testing.assert_allclose(m["ce"], np_ce(z, y), rtol=RTOL)
  np.testing.assert_allclose(m["loss"], np_ce(z, y), rtol=RTOL)
  np.testing.assert_allclose(st1.params["w"],
                             f64(p0)["w"] - lr * x.T @ dce_dz(z, y),
                             rtol=RTOL, atol=ATOL)


def test_eval_step_matches_numpy_with_mask():
  rs = np.random.RandomState(3)
  x = rs.randn(16, D).astype(np.float32)
  y = rs.randint(0, K, 16).astype(np.int32)
  mask = rs.rand(16) > 0.3
  p = lin_params(0)
  ev = jax.jit(train.make_eval_step(lin_student_apply))
  m = ev({"params": p}, {"image": x, "label": y, "mask": mask})
  z = x.astype(np.float64) @ f64(p)["w"] + f64(p)["b"]
  ce = -np_log_softmax(z)[np.arange(16), y]
  rank = (z > z[np.arange(16), y][:, None]).sum(-1)  # classes ranked above y
  np.testing.assert_allclose(m["loss"], ce[mask].mean(), rtol=RTOL)
  np.testing.assert_allclose(m["top1"], (rank == 0)[mask].mean(), rtol=1e-7)
  np.testing.assert_allclose(m["top5"], (rank < 5)[mask].mean(), rtol=1e-7)
  np.testing.assert_allclose(m["count"], mask.sum())
  # A teacher-style (variables, x) function works too.
  tv = teacher_vars()
  mt = jax.jit(train.make_eval_step(lin_teacher_apply))(tv, {"image": x,
                                                            "label": y})
  zt = np_teacher(tv, x.astype(np.float64))[0]
  np.testing.assert_allclose(mt["top1"], np.mean(zt.argmax(-1) == y))


def test_mixed_precision_bf16_model_float32_losses_and_optimizer():
  rs = np.random.RandomState(0)
  x = rs.randn(16, D).astype(np.float32)
  y = rs.randint(0, K, 16).astype(np.int32)
  obj = train.Objective(ce_weight=0.5,
                        terms=(train.Term("kd", 0.5, temperature=2.0),))
  tx = optax.adam(1e-2)
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    student = BNStudent(dtype=dtype)
    v = student.init(jax.random.key(0), x)
    st = train.create_train_state(v, tx, rng=jax.random.key(1))
    step = jax.jit(train.make_distill_step(student, lin_teacher_apply, obj, tx))
    st, m = step(st, teacher_vars(), {"image": x, "label": y})
    results[dtype] = (st, m)
  st, m = results[jnp.bfloat16]
  logits, _ = BNStudent(dtype=jnp.bfloat16).apply(st.variables, x)
  assert logits.dtype == jnp.bfloat16  # the model computes in bf16
  for leaf in jax.tree_util.tree_leaves((st.params, st.opt_state, m)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32, leaf.dtype
  np.testing.assert_allclose(m["loss"], results[jnp.float32][1]["loss"],
                             rtol=3e-2)


# ---------------------------------------------------------------------------
# Validation errors.


def test_clear_errors():
  with pytest.raises(ValueError, match="unknown loss name 'nope'; valid names: .*kd"):
    train.Term("nope")
  with pytest.raises(ValueError, match="unknown hyperparameter 'temp'.*temperature"):
    train.Term("kd", temp=4.0)
  with pytest.raises(ValueError, match="duplicate term label 'kd'"):
    train.Objective(terms=(train.Term("kd"), train.Term("kd")))
  with pytest.raises(ValueError, match="`warmup_epochs` must be >= 0"):
    train.Objective(warmup_epochs=-1)
  tx = optax.sgd(0.1)
  kd = train.Objective(terms=(train.Term("kd"),))
  with pytest.raises(ValueError, match="without KD terms"):
    train.make_train_step(lin_student_apply, tx, objective=kd)
  with pytest.raises(ValueError, match="has no KD terms"):
    train.make_distill_step(lin_student_apply, lin_teacher_apply,
                            train.Objective(), tx)
  with pytest.raises(ValueError, match="`multi_teacher` must be one of"):
    train.make_distill_step(lin_student_apply, lin_teacher_apply, kd, tx,
                            multi_teacher="vote")
  with pytest.raises(TypeError, match="`labels` must hold integer"):
    kd(jnp.zeros((2, 3)), jnp.zeros((2,)), teacher_logits=jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="teacher logits 0 must have the student's shape"):
    kd(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32),
       teacher_logits=jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="must be a mapping with a 'params'"):
    train.create_train_state({"w": 1}, tx, rng=jax.random.key(0))
  step = train.make_distill_step(lin_student_apply, lin_teacher_apply, kd, tx)
  st = train.create_train_state({"params": lin_params(0)}, tx,
                                rng=jax.random.key(0))
  with pytest.raises(KeyError, match="`batch` has no key 'label'"):
    step(st, teacher_vars(), {"image": data()["image"]})


def np_dkd(s, t, y, alpha, beta, T):
  n, k = s.shape
  gt = np_onehot(y, k).astype(bool)
  ps, pt = np_softmax(s / T), np_softmax(t / T)
  bs = np.stack([ps[gt], ps[~gt].reshape(n, k - 1).sum(-1)], -1)
  bt = np.stack([pt[gt], pt[~gt].reshape(n, k - 1).sum(-1)], -1)
  tckd = (bt * (np.log(bt) - np.log(bs))).sum(-1).mean() * T * T
  qs = np_softmax(s[~gt].reshape(n, k - 1) / T)
  qt = np_softmax(t[~gt].reshape(n, k - 1) / T)
  nckd = (qt * (np.log(qt) - np.log(qs))).sum(-1).mean() * T * T
  return alpha * tckd + beta * nckd


def test_label_aware_logit_term_and_feature_terms():
  rs = np.random.RandomState(4)
  s, t = rs.randn(B, K), 2 * rs.randn(B, K)
  y = rs.randint(0, K, B).astype(np.int32)
  fa, fb1, fb2 = rs.randn(3, B, 6)
  obj = train.Objective(
      ce_weight=0.0, teacher_weights=(1.0, 3.0),
      terms=(train.Term("dkd", 0.5, alpha=1.0, beta=8.0, temperature=4.0),
             train.Term("fitnet", 2.0, features="pooled")))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  # One teacher: DKD gets the labels; FitNets reads features['pooled'].
  loss, aux = obj(f32(s), y, teacher_logits=f32(t),
                  student_features={"pooled": f32(fa)},
                  teacher_features={"pooled": f32(fb1)})
  dkd = np_dkd(s, t, y, 1.0, 8.0, 4.0)
  np.testing.assert_allclose(aux["metrics"]["dkd"], dkd, rtol=RTOL)
  np.testing.assert_allclose(aux["metrics"]["fitnet"], np.mean((fa - fb1) ** 2),
                             rtol=RTOL)
  np.testing.assert_allclose(loss, 0.5 * dkd + 2.0 * np.mean((fa - fb1) ** 2),
                             rtol=RTOL)
  # Two teachers ("mean of losses", weights 1:3) for logit and feature terms.
  _, aux = obj(f32(s), y, teacher_logits=[f32(t), f32(-t)],
               student_features={"pooled": f32(fa)},
               teacher_features=[{"pooled": f32(fb1)}, {"pooled": f32(fb2)}])
  np.testing.assert_allclose(
      aux["metrics"]["dkd"],
      0.25 * dkd + 0.75 * np_dkd(s, -t, y, 1.0, 8.0, 4.0), rtol=RTOL)
  np.testing.assert_allclose(
      aux["metrics"]["fitnet"],
      0.25 * np.mean((fa - fb1) ** 2) + 0.75 * np.mean((fa - fb2) ** 2),
      rtol=RTOL)
  with pytest.raises(ValueError, match="teacher features are missing"):
    obj(f32(s), y, teacher_logits=f32(t), student_features={"pooled": f32(fa)})
  with pytest.raises(KeyError, match="student features have no key 'pooled'"):
    obj(f32(s), y, teacher_logits=f32(t), student_features={"stages": []},
        teacher_features={"pooled": f32(fb1)})
  with pytest.raises(ValueError, match="not a function of .student_logits"):
    train.Term("fitnet")
