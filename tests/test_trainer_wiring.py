"""The trainer's wiring of DOT (optimizer table entry -> split-gradient
distill step) and of the mesh sharding engine, through
`trainer.train_and_evaluate` (the code path of `python -m experiments.main`),
on the MNIST configs with mock data."""

import json

import jax
import numpy as np
import pytest

from configs import mnist
from kd_jax import trainer
from kd_jax.trainer import config as config_lib


def _mnist(phase="distill", **overrides):
  c = mnist.get_config(phase)
  c.debug = True
  c = trainer.apply_debug(c)  # mock data, batch 8; then the overrides
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _dot_run(tmp_path, name, **overrides):
  c = _mnist(**{"optimizer.name": "dot", "optimizer.momentum": 0.5,
                "optimizer.schedule": "constant", "train.num_steps": 6,
                **overrides})
  return trainer.train_and_evaluate(c, str(tmp_path / name))


def test_dot_with_zero_delta_is_sgd_momentum(tmp_path):
  """DOT with delta = 0 has one momentum for task + KD gradients and
  PyTorch's first-step buffer (= the gradient), which is optax's SGD trace
  from zero: the trainer's DOT run (split gradients) must end where its SGD
  run does; with delta > 0 it must not."""
  sgd = trainer.train_and_evaluate(
      _mnist(**{"optimizer.name": "sgd", "optimizer.momentum": 0.5,
                "optimizer.schedule": "constant", "train.num_steps": 6}),
      str(tmp_path / "sgd"))
  dot0 = _dot_run(tmp_path, "dot0", **{"optimizer.delta": 0.0})
  dot = _dot_run(tmp_path, "dot", **{"optimizer.delta": 0.3})
  a, b, c = (_leaves(r["_final_state"].params) for r in (sgd, dot0, dot))
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert max(float(np.max(np.abs(x - z))) for x, z in zip(a, c)) > 1e-4


def test_dot_weight_decay_goes_inside(tmp_path):
  """weight_decay with delta = 0 equals SGD's coupled L2 (DOT adds it to the
  task gradient itself; chaining it before DOT would decay twice or fail on
  the split gradients)."""
  kw = {"optimizer.momentum": 0.5, "optimizer.schedule": "constant",
        "train.num_steps": 4, "optimizer.weight_decay": 0.05}
  sgd = trainer.train_and_evaluate(_mnist(**{"optimizer.name": "sgd", **kw}),
                                   str(tmp_path / "sgd"))
  dot0 = _dot_run(tmp_path, "dot0", **{"optimizer.delta": 0.0, **kw})
  for x, y in zip(_leaves(sgd["_final_state"].params),
                  _leaves(dot0["_final_state"].params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,pattern", [
    ({"mode": "train", "loss.terms": {}}, r"config\.optimizer\.name: 'dot'.*"
     r"mode 'distill'"),
    ({"optimizer.delta": 0.2, "optimizer.momentum": 0.9},
     r"config\.optimizer\.delta: must satisfy"),
])
def test_dot_validation_errors(overrides, pattern):
  c = _mnist(**{"optimizer.name": "dot", **overrides})
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.parse(c)


def test_dot_pretrain_stage_uses_sgd():
  """A distiller's pretrain stage (one loss) gets SGD with DOT's LR,
  momentum and weight decay."""
  from kd_jax.train import optim
  opt = config_lib.OptimizerConfig(name="dot", momentum=0.9, delta=0.075,
                                   weight_decay=5e-4)
  st = optim.stage_spec(opt)
  assert (st.name, st.momentum, st.weight_decay) == ("sgd", 0.9, 5e-4)
  assert optim.split_gradients(opt) and not optim.split_gradients(st)


# ---------------------------------------------------------------------------
# Mesh sharding.

_MESH = {"data": 2, "fsdp": 4, "tensor": 1}


def _mesh_cfg(**overrides):
  return _mnist(**{"optimizer.name": "sgd", "optimizer.momentum": 0.9,
                   "optimizer.schedule": "constant", "train.num_steps": 24,
                   "train.steps_per_call": 2, "train.parallel": "jit",
                   **overrides})


def test_mesh_distill_equals_plain_jit(tmp_path):
  """MNIST MLP -> MLP KD, 24 SGD steps: mesh {data 2, fsdp 4} with the
  teacher FSDP-sharded over all 8 devices ends where the 8-device data
  parallel run does; report.json has the memory entry with the teacher at
  ~1/8 per device."""
  plain = trainer.train_and_evaluate(_mesh_cfg(), str(tmp_path / "plain"))
  mesh = trainer.train_and_evaluate(
      _mesh_cfg(**{"train.mesh": _MESH, "teacher.sharding": "fsdp"}),
      str(tmp_path / "mesh"))
  for x, y in zip(_leaves(plain["_final_state"].params),
                  _leaves(mesh["_final_state"].params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  for k in ("last_loss", "last_top1"):
    np.testing.assert_allclose(mesh[k], plain[k], rtol=1e-5, atol=1e-6)
  rep = json.loads((tmp_path / "mesh" / "report.json").read_text())
  mem = rep["memory"]
  assert rep["mesh"] == _MESH and plain["mesh"] is None
  # Every run reports its memory; the plain data-parallel run replicates.
  pm = plain["memory"]
  assert pm["teacher_bytes_per_device"] == pm["teacher_bytes_total"] > 0
  assert mem["teacher_bytes_total"] > 0 and mem["step_temp_bytes"] >= 0
  # The MLP teacher's kernels are FSDP-sharded (biases are small and stay
  # replicated): per device ~ total / 8.
  per, total = mem["teacher_bytes_per_device"], mem["teacher_bytes_total"]
  assert per <= total / 8 * 1.05
  assert mem["state_bytes_per_device"] < mem["state_bytes_total"]


def test_mesh_resume_onto_mesh(tmp_path):
  """A mesh run resumed from its (sharded) checkpoint ends where an
  uninterrupted one does, on the same mesh and on another one."""
  kw = {"train.mesh": _MESH, "teacher.sharding": "fsdp",
        "train.num_steps": 8, "checkpoint.every_steps": 4}
  full = trainer.train_and_evaluate(_mesh_cfg(**kw), str(tmp_path / "full"))
  trainer.train_and_evaluate(_mesh_cfg(**{**kw, "train.num_steps": 4}),
                             str(tmp_path / "part"))
  resumed = trainer.train_and_evaluate(_mesh_cfg(**kw), str(tmp_path / "part"))
  assert resumed["resumed_from_step"] == 4
  for x, y in zip(_leaves(full["_final_state"].params),
                  _leaves(resumed["_final_state"].params)):
    np.testing.assert_array_equal(x, y)
  # The FSDP-sharded checkpoint restores onto another mesh (state replicated
  # over 'data' 8): same run up to reduction order.
  trainer.train_and_evaluate(_mesh_cfg(**{**kw, "train.num_steps": 4}),
                             str(tmp_path / "other"))
  other = trainer.train_and_evaluate(
      _mesh_cfg(**{**kw, "train.mesh": {"data": 8, "fsdp": 1}}),
      str(tmp_path / "other"))
  assert other["resumed_from_step"] == 4
  for x, y in zip(_leaves(full["_final_state"].params),
                  _leaves(other["_final_state"].params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_mesh_batch_needs_only_data_times_fsdp():
  """With tensor = 2 the batch must be a multiple of data x fsdp = 4 only."""
  rc = config_lib.parse(_mesh_cfg(**{
      "train.mesh": {"data": 2, "fsdp": 2, "tensor": 2},
      "train.batch_size": 4, "train.eval_batch_size": 4}))
  assert config_lib.num_devices(rc) == 8


@pytest.mark.parametrize("overrides,pattern", [
    ({"train.mesh": {"data": 2, "fsdp": 2}}, r"config\.train\.mesh: .*"),
    ({"train.mesh": _MESH, "train.parallel": "pmap"},
     r"config\.train\.mesh: a device mesh needs train\.parallel='jit'"),
    ({"train.mesh": {"data": 1, "fsdp": 8}, "train.batch_size": 12},
     r"config\.train\.batch_size: 12 is not divisible by data x fsdp"),
    ({"train.mesh": _MESH, "teacher.sharding": "zigzag"},
     r"config\.teacher\.sharding: .*zigzag"),
    # (train.parallel='jit' alone is the mesh {'data': n}: a teacher may be
    # sharded over it; one device may not.)
    ({"teacher.sharding": "fsdp", "train.parallel": "none"},
     r"config\.teacher\.sharding: .*needs a device mesh"),
])
def test_mesh_config_errors(overrides, pattern):
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.parse(_mesh_cfg(**overrides))


@pytest.mark.parametrize("overrides,pattern", [
    ({"teacher.sharding": [("nothing_like_this", ("fsdp",))]},
     r"config\.teacher\.sharding: .*nothing_like_this.*match no parameter"),
    ({"teacher.sharding": "tensor",
      "train.mesh": {"data": 2, "fsdp": 2, "tensor": 2}},
     r"config\.teacher\.sharding: .*no logical axis names"),
    ({"train.sharding_rules": [("no_such_param", ("fsdp",))]},
     r"config\.train\.sharding_rules: .*no_such_param.*match no parameter"),
])
def test_mesh_model_errors_before_compiling(overrides, pattern, tmp_path):
  """Errors that need the models (a rule naming no parameter, 'tensor' on
  the MLP without logical axis names) are ConfigErrors of the run."""
  c = _mesh_cfg(**{"train.mesh": _MESH, **overrides})
  with pytest.raises(config_lib.ConfigError, match=pattern):
    trainer.train_and_evaluate(c, str(tmp_path))


def test_mesh_teacher_checkpoint_restored_into_shards(tmp_path):
  """A trained teacher's checkpoint restored straight into its FSDP shards
  (1/8 per device) gives the same distill run as the plain jit run."""
  t_dir = str(tmp_path / "t")
  trainer.train_and_evaluate(_mnist("teacher"), t_dir)
  kw = {"teacher.checkpoint": t_dir, "train.num_steps": 8}
  plain = trainer.train_and_evaluate(_mesh_cfg(**kw), str(tmp_path / "p"))
  mesh = trainer.train_and_evaluate(
      _mesh_cfg(**kw, **{"train.mesh": _MESH, "teacher.sharding": "fsdp"}),
      str(tmp_path / "m"))
  for x, y in zip(_leaves(plain["_final_state"].params),
                  _leaves(mesh["_final_state"].params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  mem = mesh["memory"]
  per, total = mem["teacher_bytes_per_device"], mem["teacher_bytes_total"]
  assert per <= total / 8 * 1.05


# ---------------------------------------------------------------------------
# Several teachers.


def _teacher_dir(tmp_path, seed):
  t = _mnist("teacher", **{"train.num_steps": 3, "seed": seed})
  wd = str(tmp_path / f"t{seed}")
  trainer.train_and_evaluate(t, wd)
  return wd


def _two_teachers(t1, t2, w=(1.0, 1.0), **overrides):
  c = _mnist(**{"train.num_steps": 4, **overrides})
  base = c.teacher.to_dict()
  del c["teacher"]
  c.teachers = {"a": dict(base, checkpoint=t1, weight=w[0]),
                "b": dict(base, checkpoint=t2, weight=w[1])}
  return c


def test_several_teachers_from_the_config(tmp_path):
  """`teachers.<label>`: two copies of one teacher distil exactly like that
  teacher alone (their weighted mean logits / mean losses are its own);
  two different teachers do not; the report names both."""
  t1, t2 = _teacher_dir(tmp_path, 0), _teacher_dir(tmp_path, 1)
  one = trainer.train_and_evaluate(
      _mnist(**{"train.num_steps": 4, "teacher.checkpoint": t1}),
      str(tmp_path / "one"))
  same = trainer.train_and_evaluate(_two_teachers(t1, t1, (1.0, 3.0)),
                                    str(tmp_path / "same"))
  same_losses = trainer.train_and_evaluate(
      _two_teachers(t1, t1, **{"loss.multi_teacher": "mean_losses"}),
      str(tmp_path / "same_losses"))
  other = trainer.train_and_evaluate(_two_teachers(t1, t2),
                                     str(tmp_path / "other"))
  ref = _leaves(one["_final_state"].params)
  for rep in (same, same_losses):
    for x, y in zip(ref, _leaves(rep["_final_state"].params)):
      np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
  assert max(float(np.max(np.abs(x - y))) for x, y in zip(
      ref, _leaves(other["_final_state"].params))) > 1e-6
  assert other["teacher"] == ["mlp_teacher", "mlp_teacher"]
  c = _two_teachers(t1, t2)
  c.teacher = c.teachers.a.to_dict()
  with pytest.raises(config_lib.ConfigError, match=r"config\.teachers: give "
                     r"`teacher` \(one\) or `teachers.<label>`"):
    config_lib.parse(c)
