"""N-D mesh parallelism (`kd_jax.train.sharding`): the same numbers on any
mesh, FSDP / tensor-parallel partitioning of student and teacher, memory
report, sharded checkpoints and the errors raised before compiling.

conftest.py provides 8 CPU devices. The reference of every mesh run is the
same step jitted on one device (no mesh); the meshes must reproduce its
losses, parameters and BatchNorm statistics to 1e-5 with SGD.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import distillers as D
from kd_jax import train
from kd_jax.models import resnet_cifar
from kd_jax.models import vit
from kd_jax.train import sharding as S

GB, K, STEPS = 16, 10, 3
TOL = dict(rtol=1e-5, atol=1e-5)
# Small widths, and a threshold of 0 bytes so even these small models are
# really partitioned (the default 64 KiB would leave most arrays replicated).
SMALL = (8, 8, 16, 16)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 4, 1)]


def cases(meshes, shardings, fast):
  """(mesh, teacher sharding) params; all but the `fast` ones are `slow`."""
  out = []
  for sh in shardings:
    for m in meshes:
      marks = () if (m, sh) in fast else (pytest.mark.slow,)
      out.append(pytest.param(m, sh, marks=marks,
                              id=f"{sh}-{'x'.join(map(str, m))}"))
  return out


def spec_dict(m):
  return dict(zip(S.MESH_AXES, m))


def cifar_resnet(depth, logical=False):
  del logical
  return resnet_cifar.CifarResNet(depth=depth, num_filters=SMALL,
                                  num_classes=K)


def small_vit(logical=False, depth=2):
  return vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32,
                               depth=depth, num_heads=4, num_classes=K,
                               logical_axes=logical)


def data(steps=STEPS, seed=0):
  rs = np.random.RandomState(seed)
  # Per-example scales spread the embeddings: relational losses of nearly
  # identical embeddings (pairwise distances by Gram-matrix cancellation)
  # amplify float32 rounding of the features ~1000x.
  x = (rs.randn(steps, GB, 32, 32, 3)
       * rs.uniform(0.2, 3.0, (steps, GB, 1, 1, 1))).astype(np.float32)
  y = rs.randint(0, K, (steps, GB)).astype(np.int32)
  return {"image": x, "label": y}


@functools.lru_cache(maxsize=None)
def problem(name):
  """(student, teacher, objective, student vars, teacher vars, data)."""
  d = data()
  x0 = d["image"][0]
  if name == "kd":          # resnet56 -> resnet20, logit KD
    student, teacher = cifar_resnet(20), cifar_resnet(56)
    obj = train.Objective(ce_weight=0.5,
                          terms=(train.Term("kd", 0.5, temperature=4.0),))
  elif name == "rkd":       # relational: distances/angles over the global batch
    student, teacher = cifar_resnet(8), cifar_resnet(14)
    obj = train.Objective(ce_weight=1.0, terms=(train.Term(
        "rkd", 1.0, distiller=D.RKDDistiller()),))
  elif name == "ofa":       # OFA ViT teacher -> CNN student (projector branches)
    student, teacher = cifar_resnet(8), small_vit(logical=True)
    obj = train.Objective(ce_weight=1.0, terms=(train.Term(
        "ofa", 1.0, distiller=D.OFADistiller(stages=(1, 2, 3))),))
  elif name == "vit":       # ViT -> ViT (student tensor parallel)
    student, teacher = small_vit(logical=True, depth=1), small_vit(True)
    obj = train.Objective(ce_weight=0.5,
                          terms=(train.Term("kd", 0.5, temperature=2.0),))
  sv = nn.meta.unbox(student.init(jax.random.key(1), x0))
  tv = nn.meta.unbox(teacher.init(jax.random.key(2), x0))
  if obj.distiller_terms:
    dp, ds = D.init_distillers(
        obj, jax.random.key(3), student_apply=student, teacher_apply=teacher,
        student_variables=sv, teacher_variables=tv,
        batch={k: v[0] for k, v in d.items()})
  else:
    dp, ds = None, None
  return student, teacher, obj, jax.device_get(sv), jax.device_get(tv), (
      jax.device_get(dp), jax.device_get(ds)), d


def flat(tree):
  return {S.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def initial_state(name, tx):
  student, _, _, sv, _, (dp, ds), _ = problem(name)
  return train.create_train_state(sv, tx, rng=jax.random.key(4),
                                  distiller_params=dp, distiller_state=ds)


@functools.lru_cache(maxsize=None)
def reference(name, opt="sgd"):
  """Single device, plain `jax.jit`, no mesh."""
  student, teacher, obj, _, tv, _, d = problem(name)
  tx = make_tx(opt)
  step = jax.jit(train.make_distill_step(student, teacher, obj, tx))
  state = initial_state(name, tx)
  losses = []
  for i in range(STEPS):
    state, m = step(state, tv, {k: v[i] for k, v in d.items()})
    losses.append(float(m["loss"]))
  return np.array(losses), flat(jax.device_get(
      (state.params, state.batch_stats, state.distiller_params)))


def make_tx(opt):
  # A small step: with lr 0.05 these tiny-batch BatchNorm nets are chaotic
  # enough that merely permuting the batch on ONE device moves the params
  # by 5e-4 after 3 steps (float32 summation order); at 0.002 that
  # permutation changes them by < 3e-7, so 1e-5 tests the partitioning.
  return (optax.sgd(0.002, momentum=0.9) if opt == "sgd"
          else optax.adam(1e-3))


def run_mesh(name, mesh, teacher_sharding, opt="sgd", multi=True):
  student, teacher, obj, _, tv, _, d = problem(name)
  tx = make_tx(opt)
  par = S.MeshParallel(
      spec_dict(mesh),
      state_rules=S.ShardingRules(
          fsdp_axes=("fsdp",), min_bytes=0,
          logical_rules=S.DEFAULT_LOGICAL_RULES))
  x0 = d["image"][0]
  snames = S.logical_axis_names(student, x0)
  state = par.shard_state(initial_state(name, tx), logical_names=snames)
  tnames = S.logical_axis_names(teacher, x0)
  tvs = par.shard_teacher(tv, S.teacher_rules(teacher_sharding, min_bytes=0),
                          logical_names=tnames)
  step = train.make_distill_step(student, teacher, obj, tx)
  if multi:  # all steps in one compiled scan
    run = par.compile(train.make_multi_step(step), stacked=True)
    state, m = run(state, tvs, par.shard_batch(d, stacked=True))
    losses = np.asarray(par.fetch(m)["loss"])
  else:
    run = par.compile(step)
    losses = []
    for i in range(STEPS):
      with jax.transfer_guard("disallow"):
        batch = par.shard_batch({k: v[i] for k, v in d.items()})
      state, m = run(state, tvs, batch)
      losses.append(float(par.fetch(m)["loss"]))
    losses = np.array(losses)
  return losses, state, tvs, par


def check_equal(name, mesh, teacher_sharding, multi=True):
  ref_losses, ref = reference(name)
  losses, state, tvs, _ = run_mesh(name, mesh, teacher_sharding, multi=multi)
  np.testing.assert_allclose(losses, ref_losses, **TOL)
  got = flat(jax.device_get((state.params, state.batch_stats,
                             state.distiller_params)))
  assert got.keys() == ref.keys()
  errs = {k: float(np.max(np.abs(got[k] - ref[k]))) for k in ref}
  worst = max(errs, key=errs.get)
  init = flat(jax.device_get(problem(name)[3]["params"]))
  moved = max(float(np.max(np.abs(ref["0/" + k] - v)))
              for k, v in init.items())
  assert moved > 100 * TOL["atol"], moved  # the steps did train
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], err_msg=k, **TOL)
  return errs[worst], state, tvs


def n_sharded(tree):
  return sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Mesh equivalence.


@pytest.mark.parametrize("mesh,teacher_sharding", cases(
    MESHES, ["replicated", "fsdp"], fast=[((2, 4, 1), "fsdp")]))
def test_resnet56_to_resnet20_kd_same_on_every_mesh(mesh, teacher_sharding):
  err, state, tvs = check_equal("kd", mesh, teacher_sharding,
                                multi=mesh != (2, 4, 1))
  # The partitioning really happened (with fsdp=1 the state is replicated).
  assert (n_sharded(state.params) > 0) == (mesh[1] > 1)
  assert (n_sharded(tvs) > 0) == (teacher_sharding == "fsdp")
  print(f"kd mesh={mesh} teacher={teacher_sharding}: max |diff| {err:.2e}")


@pytest.mark.parametrize("mesh,teacher_sharding", cases(
    MESHES, ["replicated", "fsdp"], fast=[((1, 8, 1), "fsdp")]))
def test_rkd_global_batch_relations_same_on_every_mesh(mesh,
                                                       teacher_sharding):
  err, _, _ = check_equal("rkd", mesh, teacher_sharding)
  print(f"rkd mesh={mesh} teacher={teacher_sharding}: max |diff| {err:.2e}")


@pytest.mark.parametrize("mesh,teacher_sharding", cases(
    MESHES + [(2, 2, 2)], ["replicated", "fsdp"], fast=[]) + cases(
        [(2, 2, 2)], ["tensor"], fast=[((2, 2, 2), "tensor")]))
def test_ofa_vit_to_resnet_same_on_every_mesh(mesh, teacher_sharding):
  err, _, tvs = check_equal("ofa", mesh, teacher_sharding)
  if teacher_sharding == "tensor":
    specs = {S.path_str(p): x.sharding.spec
             for p, x in jax.tree_util.tree_flatten_with_path(tvs)[0]}
    # Megatron: MLP column split (fc1 out), row split (fc2 in), proj by heads.
    assert specs["params/blocks_0/mlp/fc1/kernel"] == jax.P(None, "tensor")
    assert specs["params/blocks_0/mlp/fc2/kernel"] == jax.P("tensor")
    assert specs["params/blocks_0/attn/proj/kernel"] == jax.P("tensor")
    assert specs["params/blocks_0/mlp/fc1/bias"] == jax.P("tensor")
  print(f"ofa mesh={mesh} teacher={teacher_sharding}: max |diff| {err:.2e}")


@pytest.mark.slow
def test_vit_student_tensor_parallel_same_as_single_device():
  err, state, _ = check_equal("vit", (2, 2, 2), "tensor")
  spec = state.params["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.spec
  # FSDP on the free (embed) axis, tensor on the MLP hidden axis.
  assert spec == jax.P("fsdp", "tensor"), spec
  mu = state.opt_state[0].trace["student"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == spec  # optimizer moments follow their params
  print(f"vit (2,2,2) student tensor: max |diff| {err:.2e}")


@pytest.mark.slow
def test_adam_drift_is_reported_not_asserted_tightly():
  """Adam divides by sqrt(v) + eps: near-zero gradients make its updates
  sensitive to the reduction order of each mesh (a rounding-level gradient
  can flip the sign of a +-lr step), so the drift from the single-device
  run is printed and only bounded by Adam's largest possible difference,
  ~2 lr per step."""
  student, teacher, obj, _, tv, _, d = problem("kd")
  tx = make_tx("adam")
  step = jax.jit(train.make_distill_step(student, teacher, obj, tx))
  state = initial_state("kd", tx)
  for i in range(STEPS):
    state, _ = step(state, tv, {k: v[i] for k, v in d.items()})
  ref = flat(jax.device_get(state.params))
  _, st, _, _ = run_mesh("kd", (2, 4, 1), "fsdp", opt="adam")
  got = flat(jax.device_get(st.params))
  drift = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
  print(f"adam drift (2,4,1) vs 1 device after {STEPS} steps: {drift:.2e}")
  frac = np.mean(np.concatenate([np.abs(got[k] - ref[k]).ravel() > 1e-5
                                  for k in ref]))
  print(f"  fraction of weights off by > 1e-5: {frac:.2%}")
  assert drift <= 2 * 1e-3 * STEPS * 1.01


# ---------------------------------------------------------------------------
# Rules, memory report.


def expected_fsdp_spec(shape, nbytes, size, min_bytes):
  """Independent transcription of the documented FSDP default."""
  if size == 1 or nbytes < min_bytes:
    return ()
  cands = [i for i, d in enumerate(shape) if d % size == 0]
  if not cands:
    return ()
  best = max(cands, key=lambda i: (shape[i], i))
  return (None,) * best + ("fsdp",)


def test_fsdp_default_rule_and_threshold():
  mesh = S.make_mesh({"fsdp": 8})
  tree = {"a": np.zeros((3, 16, 24), np.float32),   # 24 > 16: last axis
          "b": np.zeros((16, 16), np.float32),      # tie: the later axis
          "c": np.zeros((5, 7), np.float32),        # nothing divisible
          "d": np.zeros((8,), np.float32),          # under the threshold
          "e": np.zeros((), np.int32)}
  rules = S.ShardingRules(fsdp_axes=("fsdp",), min_bytes=64)
  specs = S.partition_specs(tree, mesh, rules)
  for k, x in tree.items():
    exp = expected_fsdp_spec(x.shape, x.nbytes, 8, 64)
    assert tuple(specs[k]) == exp, (k, specs[k], exp)
  # Regex rules win over the default; first match wins.
  rules = S.ShardingRules(rules=(("^b$", ("fsdp", None)), ("b|a", ())),
                          fsdp_axes=("fsdp",), min_bytes=64)
  specs = S.partition_specs(tree, mesh, rules)
  assert specs["b"] == jax.P("fsdp", None) and specs["a"] == jax.P()


def test_memory_report_fsdp_teacher_is_an_eighth():
  from kd_jax import models
  t = models.create("mlp_teacher", num_classes=10)
  x = np.zeros((8, 28, 28, 1), np.float32)
  tv = jax.device_get(t.init(jax.random.key(0), x))
  par = S.MeshParallel({"data": 2, "fsdp": 4})
  tvs = par.shard_teacher(tv, "fsdp")
  rep = S.memory_report({}, tvs)
  leaves = jax.tree.leaves(tv)
  total = sum(l.nbytes for l in leaves)
  per = sum(l.nbytes // 8 if tuple(expected_fsdp_spec(l.shape, l.nbytes, 8,
                                                      64 * 1024)) else l.nbytes
            for l in leaves)
  assert rep["teacher_bytes_total"] == total
  assert rep["teacher_bytes_per_device"] == per
  assert per < total / 7.5  # the MNIST MLP teacher: ~1/8 per device
  rep_r = S.memory_report({}, par.shard_teacher(tv, "replicated"))
  assert rep_r["teacher_bytes_per_device"] == total
  # Student state under FSDP over 4 + compiled-step memory.
  s = models.create("mlp_student", num_classes=10)
  tx = optax.sgd(0.1)
  state = par.shard_state(train.create_train_state(
      jax.device_get(s.init(jax.random.key(1), x)), tx, rng=jax.random.key(2)))
  obj = train.Objective(ce_weight=0.5, terms=(train.Term("kd", 0.5),))
  run = par.compile(train.make_distill_step(s, t, obj, tx))
  batch = par.shard_batch({"image": x, "label": np.zeros(8, np.int32)})
  rep = S.memory_report(state, tvs, run.lower(state, tvs, batch).compile())
  assert rep["step_temp_bytes"] > 0
  assert rep["state_bytes_per_device"] < rep["state_bytes_total"] / 2
  line = S.memory_summary(rep)
  assert line.startswith("memory/device: state") and "\n" not in line


# ---------------------------------------------------------------------------
# Errors before compiling.


def test_errors_before_compiling():
  with pytest.raises(ValueError, match=r"2 x 2 x 1 = 4 devices but there are "
                     r"8 devices"):
    S.MeshParallel({"data": 2, "fsdp": 2})
  with pytest.raises(ValueError, match="unknown axes"):
    S.make_mesh({"model": 8})
  par = S.MeshParallel({"data": 2, "fsdp": 4})
  with pytest.raises(ValueError, match=r"not divisible by data x fsdp = 2 x 4"):
    par.shard_batch({"image": np.zeros((12, 3))})
  run = par.compile(lambda s, b: (s, {}))
  with pytest.raises(ValueError, match=r"batch size 6 .* data x fsdp"):
    run({"w": jnp.zeros(2)}, {"image": np.zeros((6, 3))})
  tv = {"params": {"dense": {"kernel": np.zeros((16, 8), np.float32)}}}
  with pytest.raises(ValueError, match=r"rule\(s\) \['conv'\] match no "
                     "parameter"):
    par.shard_teacher(tv, [("conv", ("fsdp",))])
  with pytest.raises(ValueError, match="must be one of"):
    par.shard_teacher(tv, "zero3")
  tpar = S.MeshParallel({"data": 2, "fsdp": 2, "tensor": 2})
  resnet = cifar_resnet(8)
  names = S.logical_axis_names(resnet, np.zeros((1, 32, 32, 3), np.float32))
  assert names == {}
  with pytest.raises(ValueError, match="no logical axis names"):
    tpar.shard_teacher(tv, "tensor", logical_names=names)
  with pytest.raises(ValueError, match=r"dimension 6 of .*not divisible by "
                     "mesh axes fsdp of size 4"):
    par.shard_teacher({"kernel": np.zeros((6, 8))}, [("kernel", ("fsdp",))])


# ---------------------------------------------------------------------------
# Sharded checkpoints.


def mlp_state_and_teacher():
  from kd_jax import models
  x = np.zeros((8, 28, 28, 1), np.float32)
  s = models.create("mlp_student", num_classes=10)
  t = models.create("mlp_teacher", num_classes=10)
  tx = optax.adam(1e-3)
  sv = jax.device_get(s.init(jax.random.key(1), x))
  rs = np.random.RandomState(5)
  state = train.create_train_state(sv, tx, rng=jax.random.key(2))
  # Non-trivial optimizer moments, so restored values are distinguishable.
  state = state.replace(opt_state=jax.tree.map(
      lambda a: (rs.randn(*a.shape).astype(a.dtype)
                 if np.issubdtype(a.dtype, np.floating) else a),
      jax.device_get(state.opt_state)))
  tv = jax.device_get(t.init(jax.random.key(0), x))
  return state, tv, t, x


def test_sharded_checkpoint_restores_onto_another_mesh(tmp_path):
  from kd_jax.train import checkpoints as C
  state, _, _, _ = mlp_state_and_teacher()
  host = flat(jax.device_get(state.replace(rng=jax.random.key_data(
      state.rng))))
  fsdp8 = S.MeshParallel({"fsdp": 8})
  devs4 = jax.devices()[:4]
  rep4 = S.MeshParallel({"data": 4}, devices=devs4)  # sub-mesh, replicated
  sharded = fsdp8.shard_state(state)
  assert n_sharded(sharded.params) > 0 and n_sharded(sharded.opt_state) > 0
  with C.CheckpointManager(tmp_path / "a", async_save=False) as m:
    m.save(1, sharded, force=True)
    # FSDP over 8 -> replicated over 4 other devices.
    target = S.abstract_with_shardings(state, rep4.state_shardings(state))
    r = m.restore(target)
  got = r.state
  for x in jax.tree.leaves(got):
    assert set(x.sharding.device_set) == set(devs4)
    assert x.sharding.is_fully_replicated
  flat_got = flat(jax.device_get(got.replace(
      rng=jax.random.key_data(got.rng))))
  for k, v in host.items():
    np.testing.assert_array_equal(flat_got[k], v, err_msg=k)
  # ... and back: replicated on 4 -> FSDP over 8.
  with C.CheckpointManager(tmp_path / "b", async_save=False) as m:
    m.save(2, got, force=True)
    r = m.restore(S.abstract_with_shardings(
        state, fsdp8.state_shardings(state)))
  assert (jax.tree.map(lambda x: x.sharding, r.state) ==
          jax.tree.map(lambda x: x.sharding, sharded))
  back = flat(jax.device_get(r.state.replace(
      rng=jax.random.key_data(r.state.rng))))
  for k, v in host.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_teacher_restored_directly_into_fsdp_shards(tmp_path):
  from kd_jax.train import checkpoints as C
  _, tv, t, x = mlp_state_and_teacher()
  C.save_variables(str(tmp_path / "teacher"), tv)
  par = S.MeshParallel({"data": 2, "fsdp": 4})
  expected = jax.eval_shape(lambda: t.init(jax.random.key(0), x))
  shardings = par.teacher_shardings(expected, "fsdp")
  got = C.load_teacher_variables(str(tmp_path / "teacher"), expected,
                                 sharding=shardings)
  k = got["params"]["Dense_0"]["kernel"]
  assert k.sharding.spec == jax.P(("data", "fsdp"))
  assert {s.data.shape for s in k.addressable_shards} == {
      (k.shape[0] // 8, k.shape[1])}
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tv)):
    np.testing.assert_array_equal(np.asarray(a), b)
  rep = S.memory_report({}, got)
  assert rep["teacher_bytes_per_device"] < rep["teacher_bytes_total"] / 7.5


@pytest.mark.slow
def test_sigkill_resume_on_a_sharded_mesh(tmp_path):
  """SIGKILL after step 3 of 6, restart with the same workdir: the final
  state equals an uninterrupted run bit for bit."""
  import os
  import signal
  import subprocess
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  worker = os.path.join(here, "sharding_resume_worker.py")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(here)] + [p for p in [os.environ.get("PYTHONPATH")]
                                 if p]))

  def launch(workdir, out):
    return subprocess.Popen([sys.executable, worker, str(workdir), "6",
                             str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

  p = launch(tmp_path / "killed", tmp_path / "unused.npz")
  lines = []
  try:
    for line in p.stdout:
      lines.append(line)
      if line.startswith("saved 3"):
        p.send_signal(signal.SIGKILL)
        break
  finally:
    p.wait(timeout=300)
  assert p.returncode == -signal.SIGKILL, "".join(lines)[-2000:]
  outs = []
  for name in ("killed", "straight"):
    q = launch(tmp_path / name, tmp_path / f"{name}.npz")
    log = q.communicate(timeout=300)[0]
    assert q.returncode == 0, log[-2000:]
    outs.append(np.load(tmp_path / f"{name}.npz"))
    if name == "killed":  # resumed: only steps 4..6 ran
      assert "saved 3" not in log and "saved 4" in log, log[-2000:]
  for k in outs[1].files:
    np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)


def test_init_state_is_born_sharded():
  state, _, _, _ = mlp_state_and_teacher()
  par = S.MeshParallel({"fsdp": 8})
  sv = {"params": jax.device_get(state.params)}
  built = par.init_state(
      lambda v: train.create_train_state(v, optax.adam(1e-3),
                                         rng=jax.random.key(2)), sv)
  ref = par.shard_state(train.create_train_state(sv, optax.adam(1e-3),
                                                 rng=jax.random.key(2)))
  assert (jax.tree.map(lambda x: x.sharding, built) ==
          jax.tree.map(lambda x: x.sharding, ref))
  assert n_sharded(built.params) > 0 and n_sharded(built.opt_state) > 0
  for a, b in zip(jax.tree.leaves(flat(jax.device_get(built.params))),
                  jax.tree.leaves(flat(sv["params"]))):
    np.testing.assert_array_equal(a, b)
