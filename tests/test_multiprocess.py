"""A real 2-process data-parallel run on 127.0.0.1 (jit-sharded and pmap).

Two worker processes (`multiprocess_worker.py`), 2 CPU devices each, join a
local coordinator with `jax.distributed.initialize` (gloo CPU collectives);
each feeds its half of every global batch through
`jax.make_array_from_process_local_data` (jit mode) or its local devices
(pmap mode). The final student variables and per-step losses must equal a
single-process, single-device run of the same loop (computed here).
The run is bounded by a timeout and the workers exit by themselves.
"""

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import multiprocess_launch as launch  # noqa: E402
import multiprocess_worker as worker  # noqa: E402

TIMEOUT_S = 150


def test_two_process_run_matches_single_process(tmp_path):
  out = str(tmp_path / "process0.npz")
  port = launch.free_port()
  logs = launch.run_commands(
      [[sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
        str(pid), "2", str(port), "jit,pmap", out] for pid in range(2)],
      TIMEOUT_S)
  for pid, log in enumerate(logs):
    assert f"process {pid}: done, devices=4" in log, log[-3000:]

  state, losses = worker.run("single")
  ref = worker.flat(state)
  got = np.load(out)
  for mode in ("jit", "pmap"):
    np.testing.assert_allclose(got[f"{mode}/losses"], losses, rtol=1e-5,
                               atol=1e-6, err_msg=mode)
    assert len(got[f"{mode}/losses"]) == worker.NUM_STEPS
    for name, value in ref.items():
      np.testing.assert_allclose(got[f"{mode}/{name}"], value, rtol=1e-5,
                                 atol=2e-6, err_msg=f"{mode}: {name}")
  # The loop did train: params moved away from their initial values.
  init, _ = worker.initial_variables()
  moved = np.abs(ref["params['Dense_1']['kernel']"]
                 - init["params"]["Dense_1"]["kernel"]).max()
  assert moved > 1e-3


# ---------------------------------------------------------------------------
# The CLI: 2 local processes distilling == 1 process.

_DISTILL_FLAGS = (
    "--config=configs/mnist.py:distill", "--config.data.mock=True",
    "--config.data.mock_num_examples=128", "--config.train.batch_size=16",
    "--config.train.eval_batch_size=16", "--config.train.num_epochs=0",
    "--config.train.num_steps=240", "--config.train.steps_per_call=8",
    "--config.train.eval_every_epochs=1000", "--config.train.parallel=jit",
    "--config.train.progress_bar=False", "--config.checkpoint.every_epochs=0",
    "--config.checkpoint.keep_best=False", "--config.checkpoint.async_save=False")


def _final_params(workdir):
  """(step, {path: params}) of the newest checkpoint, read onto this
  process's first device whatever topology saved it."""
  import jax
  import orbax.checkpoint as ocp
  from kd_jax.train import checkpoints as ckpt_lib
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


@pytest.fixture(scope="module")
def mnist_teacher(tmp_path_factory):
  """A briefly trained MLP teacher's workdir (mock MNIST)."""
  from configs import mnist
  from kd_jax import trainer
  t_dir = str(tmp_path_factory.mktemp("teacher"))
  c = mnist.get_config("teacher")
  c.data.mock, c.data.mock_num_examples = True, 128
  c.train.batch_size, c.train.eval_batch_size = 16, 16
  c.train.num_steps, c.train.progress_bar = 8, False
  c.checkpoint.async_save = False
  trainer.train_and_evaluate(c, t_dir)
  return t_dir


def _one_and_two_processes(tmp_path, flags_, timeout_s):
  """Runs `experiments.main FLAGS` in 1 process (workdir `one`) and in 2
  local processes (workdir `two`) at once; returns (one, two, logs)."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  cmds = [launch.main_command(*flags_, f"--workdir={one}")]
  cmds += [launch.main_command(*flags_, f"--workdir={two}", *dist)
           for dist in launch.distributed_flags(launch.free_port(), 2)]
  return one, two, launch.run_commands(cmds, timeout_s)


def _assert_same_params(one, two, steps, atol=1e-5):
  s1, p1 = _final_params(one)
  s2, p2 = _final_params(two)
  assert s1 == s2 == steps and p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=atol, err_msg=k)
    rel = np.linalg.norm(p2[k] - p1[k]) / max(np.linalg.norm(p1[k]), 1e-12)
    assert rel <= 1e-5, (k, rel)


def test_cli_two_processes_distill_like_one(tmp_path, mnist_teacher):
  """`experiments.main --coordinator_address/--num_processes/--process_id`:
  the teacher is placed through DataParallel (not device 0 of process 0),
  only process 0 writes the report, and the distilled student equals a
  1-process run (jit mode) to 1e-5 after 240 steps."""
  one, two, logs = _one_and_two_processes(
      tmp_path, [*_DISTILL_FLAGS, f"--config.teacher.checkpoint={mnist_teacher}"],
      2 * TIMEOUT_S)
  assert "mode=distill" in logs[1] and "mode=distill" not in logs[2]
  rep = json.load(open(os.path.join(two, "report.json")))
  assert rep["num_processes"] == 2 and rep["num_devices"] == 2
  _assert_same_params(one, two, 240)


_GLOBAL_BATCH_CONFIG = """
import ml_collections
from configs import mnist

def get_config():
  c = mnist.get_config("distill")
  c.loss.ce_weight = 1.0
  c.loss.terms = ml_collections.ConfigDict({
      "rkd": {"distiller": "rkd", "weight": 1.0},
      "crd": {"distiller": "crd", "weight": 0.8, "num_negatives": 64},
      "dist": {"weight": 1.0, "temperature": 4.0}})
  return c
"""


def test_cli_two_processes_global_batch_losses_like_one(tmp_path,
                                                        mnist_teacher):
  """RKD (pairwise distances and angles over the batch's pooled features),
  DIST (per-class correlations across the batch) and CRD (negatives from a
  memory bank that every step updates with the batch's embeddings): losses
  and state of the whole global batch, which 2 processes must compute over
  both halves. The distilled student equals a 1-process run (jit) to 1e-5
  after 48 steps."""
  cfg = tmp_path / "global_batch_config.py"
  cfg.write_text(_GLOBAL_BATCH_CONFIG)
  flags_ = [f"--config={cfg}" if f.startswith("--config=") else
            "--config.train.num_steps=48" if "num_steps" in f else f
            for f in _DISTILL_FLAGS]
  one, two, logs = _one_and_two_processes(
      tmp_path, [*flags_, f"--config.teacher.checkpoint={mnist_teacher}"],
      TIMEOUT_S)
  assert "mode=distill" in logs[1] and "mode=distill" not in logs[2]
  r1, r2 = (json.load(open(os.path.join(d, "report.json"))) for d in (one, two))
  assert r2["num_processes"] == 2 and r2["num_devices"] == 2
  np.testing.assert_allclose(r2["last_loss"], r1["last_loss"], rtol=1e-5)
  recs = [[r for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))
           if r.get("split") == "train"] for d in (one, two)]
  assert [r["step"] for r in recs[0]] == [r["step"] for r in recs[1]]
  for a, b in zip(*recs):  # the terms are logged and non-zero
    for key in ("rkd", "dist", "crd", "loss"):
      assert abs(a[key]) > 1e-6, (key, a)
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"step {a['step']}: {key}")
  _assert_same_params(one, two, 48)


_SEED_PHASES = ("student", "teacher_mlp", "distill_mlp", "teacher_cnn",
                "distill_cnn")
_SEED_STEPS = 16


def _seed_flags():
  """`configs/mnist_seed.py` (its own train.parallel 'none'), one seed, mock
  data, 16 steps of batch 8 per phase."""
  flags_ = ["--config=configs/mnist_seed.py",
            "--config.seed_experiment.seeds=(0,)", "--config.data.mock=True",
            "--config.data.mock_num_examples=32",
            "--config.train.progress_bar=False",
            "--config.checkpoint.every_epochs=0",
            "--config.checkpoint.async_save=False"]
  # (The top-level sections are every phase's base.)
  flags_ += [f"--config.train.num_steps={_SEED_STEPS}",
             "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
             "--config.train.eval_every_epochs=2"]
  return flags_


@pytest.mark.slow  # ~80 s on 2 loaded cores (3 processes x 5 phases, rerun)
def test_seed_experiment_two_processes_like_one(tmp_path):
  """The seed experiment over 2 processes (its phases' one-device
  train.parallel becomes 'jit', said once) finishes on both, process 0
  alone prints and writes the table, and every phase equals a 1-process
  run with train.parallel=jit: eval accuracy and loss, final parameters
  (1e-5), and the results table; a rerun reuses what did not change."""
  flags_ = _seed_flags()
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  cmds = [launch.main_command(*flags_, "--config.train.parallel=jit",
                              f"--workdir={one}")]
  cmds += [launch.main_command(*flags_, f"--workdir={two}", *dist)
           for dist in launch.distributed_flags(launch.free_port(), 2)]
  logs = launch.run_commands(cmds, 2 * TIMEOUT_S)
  assert logs[1].count("with 2 processes every phase runs with "
                       "train.parallel='jit'") == 1, logs[1][-3000:]
  head = "| phase | mode | model |"
  assert logs[1].count(head) == 1 and head in logs[0]
  assert head not in logs[2] and "[seed 0]" not in logs[2]
  for p in _SEED_PHASES:
    r1, r2 = (json.load(open(os.path.join(d, "seed0", p, "report.json")))
              for d in (one, two))
    assert r2["num_processes"] == 2 and r2["num_devices"] == 2, p
    assert r2["parallel"] == "jit" and r1["num_devices"] == 1, p
    for k in ("last_top1", "best_top1", "last_loss"):
      np.testing.assert_allclose(r2[k], r1[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{p}: {k}")
    # (Adam divides by sqrt(v): a coordinate with a near-zero gradient
    # amplifies the different summation order of 2 devices, here to ~2e-5 in
    # 1 of the CNN's 1.6M dense weights; the whole tensor agrees to 1e-5.)
    _assert_same_params(os.path.join(one, "seed0", p),
                        os.path.join(two, "seed0", p), _SEED_STEPS, atol=1e-4)
  res1, res2 = (json.load(open(os.path.join(d, "results.json")))
                for d in (one, two))
  for p in _SEED_PHASES:
    for k in ("last_top1", "best_top1"):
      np.testing.assert_allclose(res2["phases"][p][k], res1["phases"][p][k],
                                 rtol=1e-5, err_msg=f"{p}: {k}")
  for p in res1["gains"]:
    np.testing.assert_allclose(res2["gains"][p]["last_top1"]["per_seed"],
                               res1["gains"][p]["last_top1"]["per_seed"],
                               atol=1e-6)

  # A rerun with one phase's config changed: the other phases are reused on
  # both processes (process 0's decision), that one runs again after its
  # old workdir is moved aside once.
  changed = "--config.seed_experiment.phases.distill_cnn.loss.ce_weight=0.5"
  out0 = launch.run_commands(
      [launch.main_command(*flags_, changed, f"--workdir={two}", *dist)
       for dist in launch.distributed_flags(launch.free_port(), 2)],
      TIMEOUT_S)[0]
  assert out0.count("reusing") == 4, out0
  assert ("distill_cnn: running again: its config changed (loss.ce_weight: "
          "0.7 -> 0.5)") in out0, out0
  assert len([d for d in os.listdir(os.path.join(two, "seed0"))
              if d.startswith("distill_cnn.old-")]) == 1


def test_seed_experiment_debug_two_processes(tmp_path):
  """The README's seed experiment (`--config.debug=True`) over 2 local
  processes: both exit cleanly, process 0 alone prints the table and
  writes the results, nothing is logged as a warning."""
  wd = str(tmp_path / "wd")
  (out0, err0), (out1, err1) = launch.run_commands(
      [launch.main_command("--config=configs/mnist_seed.py",
                           "--config.debug=True", f"--workdir={wd}", *dist)
       for dist in launch.distributed_flags(launch.free_port(), 2)],
      TIMEOUT_S, separate_stderr=True)
  for err in (err0, err1):
    assert not [l for l in err.splitlines()
                if "WARNING" in l or l.startswith("W1")], err[-3000:]
  head = "| phase | mode | model |"
  assert out0.count(head) == 1 and head not in out1
  assert "[seed 0]" not in out1
  res = json.load(open(os.path.join(wd, "results.json")))
  assert sorted(res["phases"]) == sorted(_SEED_PHASES)
