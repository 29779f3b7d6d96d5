"""A real 2-process data-parallel run on 127.0.0.1 (jit-sharded and pmap).

Two worker processes (`multiprocess_worker.py`), 2 CPU devices each, join a
local coordinator with `jax.distributed.initialize` (gloo CPU collectives);
each feeds its half of every global batch through
`jax.make_array_from_process_local_data` (jit mode) or its local devices
(pmap mode). The final student variables and per-step losses must equal a
single-process, single-device run of the same loop (computed here).
The run is bounded by a timeout and the workers exit by themselves.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import multiprocess_worker as worker  # noqa: E402

TIMEOUT_S = 150


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_run_matches_single_process(tmp_path):
  out = str(tmp_path / "process0.npz")
  port = _free_port()
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # workers set 2 CPU devices themselves
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
  procs = [
      subprocess.Popen(
          [sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
           str(pid), "2", str(port), "jit,pmap", out],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True)
      for pid in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"2-process run did not finish within {TIMEOUT_S} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {pid} failed:\n{log[-3000:]}"
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
  import jax
  import orbax.checkpoint as ocp
  ck = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ck) if d.isdigit())
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(ck, str(step), "state"))
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_leaves_with_path(tree["params"])}


def test_cli_two_processes_distill_like_one(tmp_path):
  """`experiments.main --coordinator_address/--num_processes/--process_id`:
  the teacher is placed through DataParallel (not device 0 of process 0),
  only process 0 writes the report, and the distilled student equals a
  1-process run (jit mode) to 1e-5 after 240 steps."""
  from configs import mnist
  from kd_jax import trainer
  t_dir = str(tmp_path / "teacher")
  c = mnist.get_config("teacher")
  c.data.mock, c.data.mock_num_examples = True, 128
  c.train.batch_size, c.train.eval_batch_size = 16, 16
  c.train.num_steps, c.train.progress_bar = 8, False
  c.checkpoint.async_save = False
  trainer.train_and_evaluate(c, t_dir)
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  flags_ = [*_DISTILL_FLAGS, f"--config.teacher.checkpoint={t_dir}"]
  port = _free_port()
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  cmds = [[sys.executable, "-m", "experiments.main", *flags_,
           f"--workdir={one}"]]
  cmds += [[sys.executable, "-m", "experiments.main", *flags_,
            f"--workdir={two}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={pid}"] for pid in range(2)]
  root = os.path.dirname(HERE)
  procs = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for cmd in cmds]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=2 * TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"run {i} failed:\n{log[-3000:]}"
  assert "mode=distill" in logs[1] and "mode=distill" not in logs[2]
  import json
  rep = json.load(open(os.path.join(two, "report.json")))
  assert rep["num_processes"] == 2 and rep["num_devices"] == 2
  s1, p1 = _final_params(one)
  s2, p2 = _final_params(two)
  assert s1 == s2 == 240 and p1.keys() == p2.keys()
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)
