"""The LM trainer across 2 local processes (jax.distributed on 127.0.0.1,
gloo CPU collectives) equals one process on one device.

Each process of `experiments.main --num_processes=2` has 2 CPU devices; the
run's mesh ``{fsdp: 2, tensor: 2}`` puts FSDP across the processes and
tensor parallelism inside each. The default test runs the offline top-k
phase: all processes compute the cache with the sharded teacher, process 0
writes it, the others read it back after a barrier. The slow test runs the
whole LM seed experiment of `tests/test_lm_trainer.py` (every mode) across 2
processes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from test_lm_mesh import _cfg  # noqa: E402
from test_lm_mesh import _final_params  # noqa: E402
from test_lm_mesh import teacher  # noqa: E402,F401  (fixture)
from test_lm_trainer import CONFIG_FILE  # noqa: E402
from test_lm_trainer import corpus  # noqa: E402,F401  (fixture)
import multiprocess_launch as launch  # noqa: E402

from kd_jax import trainer  # noqa: E402

TIMEOUT_S = 300
JSON_CONFIG = '''
import json
import ml_collections

def get_config():
  return ml_collections.ConfigDict(json.loads({text!r}))
'''


def _launch(config_path, workdir, *flags, devices=2):
  """2 processes of `experiments.main` (`devices` CPU devices each); returns
  their logs after checking both exited 0."""
  env = ["env", f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}",
         "KD_JAX_FAST_CPU_FLAGS=0"]
  cmds = [env + launch.main_command(f"--config={config_path}",
                                    f"--workdir={workdir}", *dist, *flags)
          for dist in launch.distributed_flags(launch.free_port(), 2)]
  return launch.run_commands(cmds, TIMEOUT_S)


def test_topk_phase_two_processes_equals_one(corpus, teacher, tmp_path):  # noqa: F811
  """Top-k offline KD, 4 steps: 2 processes x 2 devices on a {fsdp 2,
  tensor 2} mesh == one process on one device (parameters, perplexities,
  cache); only process 0 prints and writes the report and the metrics."""
  two = str(tmp_path / "two")
  cfg = _cfg(corpus, "topk", teacher, mesh={"fsdp": 2, "tensor": 2},
             **{"teacher.cache_dir": str(tmp_path / "cache_two"),
                "teacher.sharding": "tensor"})
  path = tmp_path / "lm_topk.py"
  path.write_text(JSON_CONFIG.format(text=cfg.to_json()))
  logs = _launch(str(path), two)
  assert "last_test_ppl=" in logs[0] and "last_test_ppl=" not in logs[1]
  rep = json.load(open(os.path.join(two, "report.json")))
  assert rep["num_processes"] == 2 and rep["num_devices"] == 4
  assert not rep["cache_reused"]
  one = str(tmp_path / "one")
  ref = trainer.train_and_evaluate(
      _cfg(corpus, "topk", teacher,
           **{"teacher.cache_dir": str(tmp_path / "cache_one")}), one)
  for k in ("last_validation_ppl", "last_test_ppl"):
    assert rep[k] == pytest.approx(ref[k], rel=1e-5), k
  s1, p1 = _final_params(one)
  s2, p2 = _final_params(two)
  assert s1 == s2 == 4
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)
  from kd_jax.data import text
  a = text.TopkCacheSource(str(tmp_path / "cache_one"), "train", 8)
  b = text.TopkCacheSource(str(tmp_path / "cache_two"), "train", 8)
  assert len(a) == len(b)
  for i in (0, len(a) - 1):
    np.testing.assert_array_equal(b[i]["teacher_topk_indices"],
                                  a[i]["teacher_topk_indices"])


@pytest.mark.slow
def test_seed_experiment_two_processes_equals_one(corpus, tmp_path):  # noqa: F811
  """The LM seed experiment (teacher, student, 3 token-KD phases incl.
  fused, Seq-KD, top-k, GKD) across 2 processes x 1 device (data parallel
  by default) == the same experiment in one process; a rerun reuses every
  phase."""
  cfg = tmp_path / "lm_toy.py"
  cfg.write_text(CONFIG_FILE.format(tests=HERE, data=corpus))
  env = dict(os.environ, PYTHONPATH=ROOT, KD_JAX_FAST_CPU_FLAGS="0")
  env.pop("XLA_FLAGS", None)
  one = str(tmp_path / "one")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config={cfg}",
       f"--workdir={one}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  two = str(tmp_path / "two")
  logs = _launch(str(cfg), two, devices=1)
  assert "gain test ppl last" in logs[0]
  assert "gain test ppl last" not in logs[1]
  r1 = json.load(open(os.path.join(one, "results.json")))
  r2 = json.load(open(os.path.join(two, "results.json")))
  assert r1["phases"].keys() == r2["phases"].keys()
  for p, v in r1["phases"].items():
    for k in ("last_validation_ppl", "last_test_ppl"):
      np.testing.assert_allclose(r2["phases"][p][k], v[k], rtol=1e-4,
                                 err_msg=f"{p} {k}")
  logs = _launch(str(cfg), two, devices=1)
  assert logs[0].count("done before with the same config") == 9
