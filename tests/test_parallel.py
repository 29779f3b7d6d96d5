"""Data parallelism: 1 device, 8 devices with pmap and 8 with jit-sharding
give the same losses and parameters (conftest provides 8 CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import train

GB, D, K = 16, 6, 5  # global batch, input dim, classes
TOL = dict(rtol=1e-5, atol=2e-6)


def make_models(axis_name):

  class Student(nn.Module):

    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.Dense(12, use_bias=False)(x)  # BatchNorm follows
      # Sync BN under pmap; under jit the batch is global anyway.
      h = nn.BatchNorm(use_running_average=not train, momentum=0.8,
                       axis_name=axis_name)(h)
      h = nn.relu(h)
      return nn.Dense(K)(h), {"pooled": h}

  class Teacher(nn.Module):

    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.relu(nn.Dense(16)(x))
      return nn.Dense(K)(h), {"pooled": h}

  return Student(), Teacher()


def problem(num_steps=4):
  rs = np.random.RandomState(0)
  x = rs.randn(num_steps, GB, D).astype(np.float32)
  y = rs.randint(0, K, (num_steps, GB)).astype(np.int32)
  student, teacher = make_models(None)
  sv = student.init(jax.random.key(1), x[0])
  tv = teacher.init(jax.random.key(2), x[0])
  return {"image": x, "label": y}, jax.device_get(sv), jax.device_get(tv)


def run_distill(mode):
  data, sv, tv = problem()
  dp = train.DataParallel(mode)
  student, teacher = make_models(dp.axis_name)
  tx = optax.adam(1e-2)
  # A per-example term (KD) and batch-level terms (DIST's intra-class
  # correlation, SP on features) that need the global batch under pmap.
  obj = train.Objective(
      ce_weight=0.4,
      terms=(train.Term("kd", 0.6, temperature=3.0),
             train.Term("dist", 0.5, temperature=2.0),
             train.Term("sp", 5.0, features="pooled")))
  step = train.make_distill_step(student, teacher, obj, tx,
                                 axis_name=dp.axis_name)
  one = dp.compile(step)
  many = dp.compile(train.make_multi_step(step), stacked=True)
  evaluate = dp.compile(train.make_eval_step(student, axis_name=dp.axis_name),
                        donate_state=False)
  state = dp.replicate(train.create_train_state(sv, tx, rng=jax.random.key(3)))
  tv = dp.replicate(tv)
  losses = []
  for i in range(2):  # two single steps ...
    batch = dp.shard_batch({k: v[i] for k, v in data.items()})
    # Everything is already on the devices: the step moves no data (the
    # teacher variables in particular are never copied per step).
    with jax.transfer_guard("disallow"):
      state, m = one(state, tv, batch)
    m = dp.fetch(m)
    assert all(float(m[k]) > 0 for k in ("kd", "dist", "sp"))
    losses.append(m["loss"])
  # ... then the remaining steps in one compiled scan.
  chunk = dp.shard_batch({k: v[2:] for k, v in data.items()}, stacked=True)
  with jax.transfer_guard("disallow"):
    state, m = many(state, tv, chunk)
  losses.extend(dp.fetch(m)["loss"])
  ev = dp.fetch(evaluate(state, dp.shard_batch({k: v[0] for k, v in data.items()})))
  state = dp.fetch(state)
  return np.asarray(losses), state, ev


def test_single_pmap_jit_same_loss_and_params():
  ref_losses, ref, ref_ev = run_distill("single")
  assert ref_losses.shape == (4,)
  init = problem()[1]
  assert np.abs(ref.params["Dense_1"]["kernel"]
                - init["params"]["Dense_1"]["kernel"]).max() > 1e-3
  for mode in ("pmap", "jit"):
    losses, st, ev = run_distill(mode)
    np.testing.assert_allclose(losses, ref_losses, err_msg=mode, **TOL)
    for name, tree in (("params", "params"), ("batch_stats", "batch_stats")):
      a, b = getattr(st, tree), getattr(ref, tree)
      assert (jax.tree_util.tree_structure(a)
              == jax.tree_util.tree_structure(b))
      for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                              jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(
            x, y, err_msg=f"{mode} {name}{jax.tree_util.keystr(path)}", **TOL)
    assert int(st.step) == 4
    for k in ("loss", "top1", "top5", "count"):
      np.testing.assert_allclose(ev[k], ref_ev[k], err_msg=f"{mode} eval {k}",
                                 **TOL)
    assert float(ev["count"]) == GB


def lin_apply(variables, x, train=True, rngs=None):
  z = x @ variables["params"]["w"]
  return z, {"pooled": z}


class Adapter:
  """Toy distiller: mean((f_s A - f_t)^2) with trainable A, counts calls."""

  def init(self, rng, inputs):
    return ({"a": 0.1 * jax.random.normal(rng, (K, K))},
            {"calls": jnp.zeros((), jnp.int32)})

  def __call__(self, params, state, inputs):
    fs = inputs.student_features["pooled"]
    ft = inputs.teacher_features["pooled"]
    return (jnp.mean((fs @ params["a"] - ft) ** 2),
            {"calls": state["calls"] + 1})


def test_pmap_supervised_dml_and_distiller_match_single_device():
  data, _, _ = problem(num_steps=2)
  rs = np.random.RandomState(5)
  ps = [{"params": {"w": rs.randn(D, K).astype(np.float32)}} for _ in range(3)]
  tx = optax.sgd(0.3)
  obj = train.Objective(ce_weight=1.0,
                        terms=(train.Term("kd", 1.0, temperature=1.0),))
  dobj = train.Objective(ce_weight=1.0,
                         terms=(train.Term("adapter", 0.5, distiller=Adapter()),))
  dparams, dstate = dobj.init_distillers(jax.random.key(9), None)
  teacher = lambda v, x: lin_apply(v, x)  # noqa: E731
  out = {}
  for mode in ("single", "pmap"):
    dp = train.DataParallel(mode)
    sup = dp.compile(train.make_multi_step(train.make_train_step(
        lin_apply, tx, axis_name=dp.axis_name)), stacked=True)
    dml = dp.compile(train.make_multi_step(train.make_dml_step(
        [lin_apply, lin_apply], obj, tx, axis_name=dp.axis_name)),
                     stacked=True)
    dis = dp.compile(train.make_multi_step(train.make_distill_step(
        lin_apply, teacher, dobj, tx, axis_name=dp.axis_name)), stacked=True)
    mk = lambda v, **kw: dp.replicate(  # noqa: E731
        train.create_train_state(v, tx, rng=jax.random.key(0), **kw))
    batches = dp.shard_batch(data, stacked=True)
    s1, m1 = sup(mk(ps[0]), batches)
    s2, m2 = dml((mk(ps[0]), mk(ps[1])), batches)
    s3, m3 = dis(mk(ps[0], distiller_params=dparams, distiller_state=dstate),
                 dp.replicate(ps[2]), batches)
    s3 = dp.fetch(s3)
    assert int(s3.distiller_state["adapter"]["calls"]) == 2
    assert s3.distiller_state["adapter"]["calls"].dtype == np.int32
    out[mode] = dp.fetch((s1.params, m1["loss"], [s.params for s in s2],
                          m2["student1/loss"], m3["adapter"]))
    out[mode] += (s3.params, s3.distiller_params)
  moved = np.abs(out["single"][6]["adapter"]["a"] - dparams["adapter"]["a"])
  assert moved.max() > 1e-4  # the adapter was trained
  leaves_p = jax.tree_util.tree_leaves(out["pmap"])
  leaves_s = jax.tree_util.tree_leaves(out["single"])
  assert len(leaves_p) == len(leaves_s) == 8
  for a, b in zip(leaves_p, leaves_s):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("mode", ["pmap", "jit"])
def test_non_divisible_batch_raises_before_compiling(mode):
  dp = train.DataParallel(mode)
  assert dp.num_devices == 8
  batch = {"image": np.zeros((12, D), np.float32),
           "label": np.zeros((12,), np.int32)}
  with pytest.raises(ValueError, match=r"batch size 12 of `batch\['image'\]`.*"
                     r"not divisible by the number of (local )?devices 8"):
    dp.shard_batch(batch)
  with pytest.raises(ValueError, match=r"batch size 12 .*not divisible"):
    dp.shard_batch({k: v[None] for k, v in batch.items()}, stacked=True)
  traced = []

  def step(state, batch):
    traced.append(1)
    return state, {}

  fn = dp.compile(step, donate_state=False)
  if mode == "jit":
    # A global array that was not built by shard_batch.
    with pytest.raises(ValueError, match="global batch size 12 .*devices 8"):
      fn(jnp.zeros(()), jax.device_put(batch))
  else:
    with pytest.raises(ValueError, match="expected the 8 local devices"):
      fn(jnp.zeros(()), batch)
  assert not traced  # nothing was traced or compiled


def test_mode_validation_and_replication():
  with pytest.raises(ValueError, match="parallel `mode` must be one of"):
    train.DataParallel("ddp")
  dp = train.DataParallel("jit")
  assert dp.axis_name is None and train.DataParallel("pmap").axis_name == "data"
  tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3),
          "key": jax.random.key(7)}
  rep = dp.replicate(tree)
  assert rep["w"].sharding.is_fully_replicated
  assert len(rep["w"].sharding.device_set) == 8
  np.testing.assert_array_equal(dp.fetch(rep)["w"], tree["w"])
  np.testing.assert_array_equal(dp.fetch(rep)["key"],
                                jax.random.key_data(tree["key"]))
  sharded = dp.shard_batch({"x": np.zeros((16, 2), np.float32)})
  assert sharded["x"].sharding.spec == jax.sharding.PartitionSpec("data")
  pm = train.DataParallel("pmap").replicate(tree)
  assert pm["w"].shape == (8, 2, 3)
