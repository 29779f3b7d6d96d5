"""The LM trainer on a device mesh (`config.train.mesh`): FSDP x tensor
parallel on 8 simulated CPU devices equals the same run on one device.

Every test trains the same tiny student (float32 compute) for a few steps
once with plain `jax.jit` on one device and once on a 4 x 2 ``{fsdp,
tensor}`` mesh (state and teacher sharded by the rules, batches over
``fsdp``), and compares the final parameters (from the checkpoints), the
train metrics and the held-out perplexities. The reference is the one-device
run of the same trainer: only the placement differs, so differences are
reduction order (<= 1e-5).
"""

import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_lm_trainer import _model  # noqa: E402
from test_lm_trainer import _run_config  # noqa: E402
from test_lm_trainer import corpus  # noqa: E402,F401  (fixture)

from kd_jax.data import text  # noqa: E402
from kd_jax.train import checkpoints as ckpt_lib  # noqa: E402
from kd_jax.train.sharding import path_str  # noqa: E402
from kd_jax.trainer import ConfigError  # noqa: E402
from kd_jax import trainer  # noqa: E402

MESH = {"fsdp": 4, "tensor": 2}
# 4 query / 2 KV heads and an MLP of 128 split over tensor = 2; the
# 300 x 64 embedding and head (76.8 KB >= 64 KiB) FSDP-sharded over 4.
STUDENT = dict(hidden_size=64, intermediate_size=128, num_layers=1,
               num_heads=4, num_kv_heads=2)
TEACHER = dict(STUDENT, intermediate_size=192)
RTOL = 1e-5


# The LM modes of these tests as configs of the one LM task.
_JSD = {"weight": 1.0, "beta": 0.5, "temperature": 0.9}
_MODES = {
    "train": {},
    "token_kd": {},   # 0.5 NLL + 0.5 forward KL (test_lm_trainer._kd)
    "gkd": {"loss": {"ce_weight": 0.0, "terms": {"js_divergence": _JSD}},
            "generation": {"max_new_tokens": 4, "lmbda": 0.5,
                           "temperature": 0.9}},
    # One outer step = 8 rollouts, ppo_epochs 1 -> U = 2 updates of 4.
    "minillm": {"loss": {"ce_weight": 1.0, "terms": {}},
                "generation": {"max_new_tokens": 4, "temperature": 1.0},
                "minillm": {"enabled": True, "num_rollouts": 8,
                            "ppo_epochs": 1, "chunk_size": 4}},
    "seq_kd": {"loss": {"ce_weight": 1.0, "terms": {}},
               "generation": {"max_new_tokens": 4, "seq_kd": True}},
    "topk": {"loss": {"ce_weight": 0.5, "terms": {"topk_kd": {
        "weight": 0.5, "tail": "bucket"}}}},
    # Logit KD + hidden states (projection 64 -> 64: 'always') + MiniLMv2
    # relations, every student block -> the teacher's (uniform map).
    "inter": {"loss": {"ce_weight": 0.5, "terms": {
        "forward_kl": {"weight": 0.5},
        "hidden": {"distiller": "tinybert", "weight": 0.5,
                   "projection": "always", "embeddings": True},
        "attention": {"distiller": "minilm", "weight": 0.5,
                      "relations": ("qq", "kk", "vv"),
                      "num_relation_heads": 4}}}},
}


def _cfg(corpus_dir, mode, teacher_dir="", mesh=None, steps=4, **sections):
  c = _run_config(corpus_dir, "train" if mode == "train" else "distill",
                  teacher_dir, steps=steps)
  c.model = _model(**STUDENT)
  for sec, value in _MODES[mode].items():
    c[sec] = value
  if teacher_dir:
    c.teacher = dict(_model(**TEACHER), checkpoint=teacher_dir,
                     precompute=mode == "topk", topk=8)
  if mesh:
    c.train.mesh = mesh
    c.train.parallel = "jit"
  for key, value in sections.items():
    node, *path = key.split(".")
    target = c[node]
    for p in path[:-1]:
      target = target[p]
    target[path[-1]] = value
  return ml_collections.ConfigDict(c.to_dict())


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):  # noqa: F811
  """A trained teacher (one device, 4 steps)."""
  wd = str(tmp_path_factory.mktemp("lm_mesh_teacher"))
  c = _cfg(corpus, "train")
  c.model = _model(**TEACHER)
  trainer.train_and_evaluate(c, wd)
  return wd


def _final_params(workdir):
  """(step, {path: params array}) of the newest checkpoint, read onto one
  device whatever mesh or processes saved it."""
  ck = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ck) if d.isdigit())
  item = os.path.join(ck, str(step), "state")
  meta = ckpt_lib._tree_metadata(item)  # pylint: disable=protected-access
  target = ckpt_lib.restore_target(jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta))
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(item, target)
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(tree["params"])}


def _train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


def _one_vs_mesh(corpus_dir, tmp_path, mode, teacher_dir="", mesh=MESH,
                 **sections):
  """(1-device report, mesh report, workdirs) after checking they agree."""
  one, on_mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  plain = {k: v for k, v in sections.items() if k != "teacher.sharding"}
  ref = trainer.train_and_evaluate(
      _cfg(corpus_dir, mode, teacher_dir, **plain), one)
  got = trainer.train_and_evaluate(
      _cfg(corpus_dir, mode, teacher_dir, mesh=mesh, **sections), on_mesh)
  assert ref["mesh"] is None and got["mesh"] == mesh
  for k in ("last_validation_ppl", "last_test_ppl", "best_validation_ppl"):
    assert got[k] == pytest.approx(ref[k], rel=RTOL), k
  s1, p1 = _final_params(one)
  s2, p2 = _final_params(on_mesh)
  assert s1 == s2 == 4 and p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=RTOL, atol=RTOL,
                               err_msg=k)
  r1, r2 = _train_records(one), _train_records(on_mesh)
  assert [r["step"] for r in r1] == [r["step"] for r in r2] == [2, 4]
  for a, b in zip(r1, r2):
    for k in a:
      if k not in ("step", "split", "time"):
        assert b[k] == pytest.approx(a[k], rel=RTOL, abs=1e-6), k
  # Training happened: the parameters moved from their initialization.
  assert got["last_validation_ppl"] < 0.9 * 300
  return ref, got, (one, on_mesh)


def test_state_and_teacher_are_fsdp_and_tensor_sharded(corpus, teacher):  # noqa: F811
  """The placement of a mesh run: q/k/v heads and the MLP over 'tensor'
  (logical names), the embedding and the head over 'fsdp' (FSDP default),
  Adam's moments like their parameters, the teacher by its names."""
  rc = trainer.parse(_cfg(corpus, "token_kd", teacher, mesh=MESH,
                          **{"teacher.sharding": "tensor"}))
  task = trainer.make_task(rc, teacher)
  state = task.placement.place_state(task.init_state())
  p = state.params
  layer = p["layers_0"]
  P = jax.sharding.PartitionSpec
  assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P(
      None, "tensor")
  assert layer["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "tensor")
  assert p["embed_tokens"]["embedding"].sharding.spec == P("fsdp")
  assert p["lm_head"]["kernel"].sharding.spec == P(None, "fsdp")
  moments = {path_str(k): v for k, v in
             jax.tree_util.tree_leaves_with_path(state.opt_state)}
  mu = [v for k, v in moments.items() if k.endswith("mu/student/lm_head/"
                                                    "kernel")]
  assert len(mu) == 1 and mu[0].sharding.spec == P(None, "fsdp")
  tv = task.teacher_variables()
  tq = tv["params"]["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert tq.sharding.spec == P("tensor")


def test_token_kd_on_mesh_equals_one_device_and_resumes(corpus, teacher,  # noqa: F811
                                                        tmp_path):
  """Supervised token KD (forward KL + NLL), teacher tensor-sharded; then
  the mesh run interrupted after step 2 resumes from its sharded
  checkpoint to the uninterrupted result (bit-identical)."""
  kw = {"teacher.sharding": "tensor"}
  _, got, (_, on_mesh) = _one_vs_mesh(corpus, tmp_path, "token_kd", teacher,
                                      **kw)
  mem = got["memory"]
  assert mem["state_bytes_per_device"] < mem["state_bytes_total"] / 2
  assert mem["teacher_bytes_per_device"] < mem["teacher_bytes_total"]
  part = str(tmp_path / "part")
  shutil.copytree(on_mesh, part)
  shutil.rmtree(os.path.join(part, "checkpoints", "4"))
  os.remove(os.path.join(part, "report.json"))
  rep = trainer.train_and_evaluate(
      _cfg(corpus, "token_kd", teacher, mesh=MESH, **kw), part)
  assert rep["resumed_from_step"] == 2
  _, full = _final_params(on_mesh)
  _, resumed = _final_params(part)
  for k in full:
    np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
  assert rep["last_test_ppl"] == got["last_test_ppl"]


def test_gkd_on_policy_generation_on_mesh_equals_one_device(
    corpus, teacher, tmp_path):  # noqa: F811
  """On-policy GKD with lmbda = 1: the student samples its continuations
  (temperature 0.9) inside every compiled step on the mesh; the samples,
  hence the losses and the parameters, equal the one-device run."""
  _one_vs_mesh(corpus, tmp_path, "gkd", teacher,
               **{"generation.lmbda": 1.0, "teacher.sharding": "fsdp"})
  recs = _train_records(str(tmp_path / "mesh"))
  assert all(r["on_policy"] == 1.0 for r in recs)


@pytest.mark.slow
def test_minillm_on_mesh_equals_one_device(corpus, teacher, tmp_path):  # noqa: F811
  """MiniLLM's outer steps (teacher-mixed sampling in chunks, the PPO
  minibatch gathers, advantages whitened over the global minibatch) on the
  mesh, rollouts FSDP-sharded: equal to the one-device run."""
  _, got, _ = _one_vs_mesh(corpus, tmp_path, "minillm", teacher,
                           **{"teacher.sharding": "fsdp"})
  assert got["steps_per_call"] == 2
  recs = _train_records(str(tmp_path / "mesh"))
  assert all(abs(r["pg_loss"]) < 10 and r["reward"] != 0 for r in recs)


def test_intermediate_layers_on_mesh_equal_one_device(corpus, teacher,  # noqa: F811
                                                      tmp_path):
  """Hidden-state + attention-relation distillation with the teacher
  tensor-parallel (its q/k/v heads split over 'tensor'): the same student
  as one device; the learned projections live in the checkpoint."""
  _one_vs_mesh(corpus, tmp_path, "inter", teacher,
               **{"teacher.sharding": "tensor"})
  item = os.path.join(str(tmp_path / "mesh"), "checkpoints", "4", "state")
  meta = ckpt_lib._tree_metadata(item)  # pylint: disable=protected-access
  proj = meta["distiller_params"]["hidden"]
  assert sorted(proj) == ["proj_0", "proj_1"]  # embeddings + the block
  assert proj["proj_1"]["kernel"].shape == (64, 64)


def test_topk_cache_written_on_mesh_equals_one_device(corpus, teacher,  # noqa: F811
                                                      tmp_path):
  """Offline top-k: the mesh run writes its own cache with the sharded
  teacher (the same indices and bf16 log-probs as the one-device cache)
  and trains on it to the same student."""
  caches = {w: str(tmp_path / f"cache_{w}") for w in ("one", "mesh")}
  one, on_mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  trainer.train_and_evaluate(
      _cfg(corpus, "topk", teacher, **{"teacher.cache_dir": caches["one"]}),
      one)
  rep = trainer.train_and_evaluate(
      _cfg(corpus, "topk", teacher, mesh=MESH,
           **{"teacher.cache_dir": caches["mesh"],
              "teacher.sharding": "tensor"}), on_mesh)
  assert not rep["cache_reused"]
  a, b = (text.TopkCacheSource(caches[w], "train", 8) for w in ("one", "mesh"))
  assert len(a) == len(b) == 64
  for i in range(len(a)):
    np.testing.assert_array_equal(b[i]["teacher_topk_indices"],
                                  a[i]["teacher_topk_indices"])
    np.testing.assert_allclose(
        np.asarray(b[i]["teacher_topk_logprobs"], np.float32),
        np.asarray(a[i]["teacher_topk_logprobs"], np.float32), rtol=1e-2)
  _, p1 = _final_params(one)
  _, p2 = _final_params(on_mesh)
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=RTOL, atol=RTOL, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("mode,mesh,sections", [
    ("token_kd", {"fsdp": 4, "tensor": 2},
     {"loss.fused_head": True, "loss.terms": {"reverse_kl": {
         "weight": 0.5}}, "teacher.sharding": "fsdp"}),
    ("token_kd", {"data": 2, "fsdp": 2, "tensor": 2},
     {"loss.terms": {"js_divergence": {"weight": 0.5}},
      "teacher.sharding": "tensor"}),
    ("seq_kd", {"fsdp": 4, "tensor": 2}, {"teacher.sharding": "tensor"}),
    ("gkd", {"data": 2, "fsdp": 2, "tensor": 2},
     {"generation.lmbda": 0.5, "generation.seq_kd": True,
      "teacher.sharding": "fsdp"}),
    ("train", {"data": 4, "tensor": 2}, {}),
])
def test_mode_matrix_on_meshes(corpus, teacher, tmp_path, mode, mesh,  # noqa: F811
                               sections):
  _one_vs_mesh(corpus, tmp_path, mode, teacher if mode != "train" else "",
               mesh=mesh, **sections)


def test_mesh_config_errors_are_one_line(corpus, teacher, tmp_path):  # noqa: F811
  def err(cfg):
    with pytest.raises(ConfigError) as e:
      trainer.train_and_evaluate(cfg, str(tmp_path / "wd"))
    return str(e.value)

  msg = err(_cfg(corpus, "train", mesh={"fsdp": 3}))
  assert msg.startswith("config.train.mesh:") and "device count" in msg
  msg = err(_cfg(corpus, "train", mesh={"fsdp": 8},
                 **{"train.batch_size": 12}))
  assert msg.startswith("config.train.batch_size:") and "multiple of 8" in msg
  msg = err(_cfg(corpus, "token_kd", teacher,
                 **{"teacher.sharding": "fsdp"}))
  assert msg.startswith("config.teacher.sharding:") and "train.mesh" in msg
  msg = err(_cfg(corpus, "train", mesh=MESH,
                 **{"train.sharding_rules": [("no_such_param", ("fsdp",))]}))
  assert msg.startswith("config.train.sharding_rules:") and (
      "no_such_param" in msg)
