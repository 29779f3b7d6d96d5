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
