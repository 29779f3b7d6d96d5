"""2 processes x 4 CPU devices on 127.0.0.1: FSDP over all 8 devices,
sharded Orbax save (each process writes only its shards) and restore.

The final student variables and per-step losses must equal the
single-process, single-device run of `multiprocess_worker.run('single')`.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import multiprocess_launch as launch  # noqa: E402
import multiprocess_worker as mw  # noqa: E402

TIMEOUT_S = 180


def test_two_process_fsdp_run_with_sharded_checkpoint(tmp_path):
  port = launch.free_port()
  logs = launch.run_commands(  # (the workers set 4 CPU devices themselves)
      [[sys.executable, os.path.join(HERE, "sharding_worker.py"), str(pid),
        "2", str(port), str(tmp_path)] for pid in range(2)], TIMEOUT_S)
  for pid, log in enumerate(logs):
    assert f"process {pid}: done, devices=8" in log, log[-3000:]

  # Each process wrote its own OCDBT shard store of the sharded state.
  step_dir = tmp_path / "ckpt" / str(mw.STEPS_PER_CALL) / "state"
  stores = sorted(p.name for p in step_dir.iterdir()
                  if p.name.startswith("ocdbt.process_"))
  assert stores == ["ocdbt.process_0", "ocdbt.process_1"], sorted(
      os.listdir(step_dir))
  for s in stores:
    assert any(f.is_file() and f.stat().st_size > 0
               for f in (step_dir / s).rglob("*")), s

  state, losses = mw.run("single")
  ref = mw.flat(state)
  got = np.load(tmp_path / "result.npz")
  np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, atol=1e-6)
  for name, value in ref.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=2e-6,
                               err_msg=name)
