"""`experiments/plan_scale.py` (compile-only pod planning) and its HLO reader.

* `hlo_stats` against independent counts: the FLOPs of matmuls written by
  hand (2 m k n each, loop trip counts multiplied out) and the bytes of a
  known all-gather on the 8 simulated devices of conftest.py;
* the script's ``--tiny`` configuration end to end (child processes on 8
  simulated devices): it compiles a distillation step and a generation
  program, and its cross-check finds the compile-only bytes per device equal
  to those of the same step built from real, trainer-placed arrays.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import plan_scale
from experiments import plan_scale_report as report
from experiments.hlo_stats import KINDS
from experiments.hlo_stats import first_group
from experiments.hlo_stats import group_key
from experiments.hlo_stats import hlo_stats
from experiments.hlo_stats import parse_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dot_flops_multiply_out_scans_and_unknown_loops():
  x = jnp.zeros((8, 16))
  ws = jnp.zeros((5, 16, 16))

  def scanned(x, ws):
    return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

  text = jax.jit(scanned).lower(x, ws).compile().as_text()
  want = 5 * 2 * 8 * 16 * 16
  assert hlo_stats(text, 1)["dot_flops"] == want

  def until(x, w):  # trip count unknown to XLA
    return jax.lax.while_loop(lambda h: jnp.sum(h) < 1e9,
                              lambda h: h @ w + 1.0, x)

  text = jax.jit(until).lower(x, ws[0]).compile().as_text()
  got = hlo_stats(text, 1, unknown_trip_count=7)
  assert got["unknown_loops"] == 1
  assert got["dot_flops"] == 7 * 2 * 8 * 16 * 16


def test_all_gather_bytes_and_ring_wire_bytes():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((8,), ("fsdp",))
  x = jax.device_put(np.zeros((64, 32), np.float32),
                     NamedSharding(mesh, P("fsdp")))
  w = jnp.zeros((32, 16))
  f = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P()))
  stats = hlo_stats(f.lower(x, w).compile().as_text(), 8)
  coll = stats["collectives"]
  moved = sum(c["count"] for c in coll.values())
  assert moved >= 1
  # whichever collective XLA picks, it moves the [64, 16] result (or the
  # [64, 32] input): the ring bytes follow from its group size 8
  for kind, c in coll.items():
    if c["count"]:
      assert c["by_group"] and set(c["by_group"]) == {"8/node"}, kind
      n = 8
      factor = {"all-gather": (n - 1) / n, "all-reduce": 2 * (n - 1) / n,
                "reduce-scatter": n - 1, "all-to-all": (n - 1) / n,
                "collective-permute": 1.0}[kind]
      assert c["wire_bytes"] == pytest.approx(c["src_bytes"] * factor)
  assert stats["dot_flops"] == 2 * 64 * 32 * 16 / 8


def test_replica_groups_of_mesh_axes():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
  x = jax.device_put(np.ones((8, 8), np.float32),
                     NamedSharding(mesh, P("fsdp", "tensor")))
  # a sum over the tensor axis reduces within pairs {0, 1}, ...; over fsdp
  # within {0, 2, 4, 6}, ... (mesh order: tensor fastest); replicating the
  # fsdp sum also gathers over tensor
  for axis, spec, want in ((1, P("fsdp"), [[0, 1]]),
                           (0, P(None), [[0, 1], [0, 2, 4, 6]]),
                           (0, P("tensor"), [[0, 2, 4, 6]])):
    f = jax.jit(lambda x, a=axis: jnp.sum(x, axis=a),
                out_shardings=NamedSharding(mesh, spec))
    comps, _ = parse_module(f.lower(x).compile().as_text())
    got = sorted(first_group(i.attrs, 8) for c in comps.values()
                 for i in c.values() if i.opcode in KINDS)
    assert got == want, (axis, spec, got)
  assert group_key([0, 1]) == "2/node" and group_key([0, 8]) == "2"
  assert group_key(list(range(8, 16))) == "8/node"


def test_bounds_pick_the_largest_term():
  r = {"hlo": {"dot_flops": 459e12, "collectives": {
      "all-gather": {"by_group": {"64": 1200e9}}}},
       "hbm_bytes": 2765e9 / 2, "model_flops_per_device": 459e12 / 2}
  b = report.bounds(r, report.HARDWARE["v5p"])
  assert b["compute_s"] == pytest.approx(1.0)
  assert b["hbm_s"] == pytest.approx(0.5)
  assert b["comm_s"] == pytest.approx(2.0)      # 1200 GB at 600 GB/s
  assert b["step_s"] == pytest.approx(2.0) and b["bound_by"] == "comm"
  assert b["mfu"] == pytest.approx(0.25)
  h = report.bounds(r, report.HARDWARE["h100"])  # 64 GPUs: across nodes
  assert h["comm_s"] == pytest.approx(1200e9 / 50e9)
  r["hlo"]["collectives"]["all-gather"]["by_group"] = {"8/node": 900e9}
  h = report.bounds(r, report.HARDWARE["h100"])  # inside a node: NVLink
  assert h["comm_s"] == pytest.approx(2.0) and h["bound_by"] == "comm"


def test_rows_of_the_default_matrix():
  a = plan_scale.parse([])
  rows = plan_scale.all_rows(a)
  keys = {plan_scale.row_key(r) for r in rows}
  assert len(keys) == len(rows)
  distill = [r for r in rows if r["program"] == "distill"]
  assert {r["pair"] for r in distill} == {"8b-1b", "70b-8b"}
  assert {r["devices"] for r in rows} == {64, 256}
  # tensor placements only where the mesh has a tensor axis
  assert all(r["mesh"] == "fsdp_tensor" for r in distill
             if r["placement"] in ("tensor", "fsdp_tensor"))
  assert all(r["batch"] % (r["devices"] // (8 if r["mesh"] == "fsdp_tensor"
                                            else 1)) == 0 for r in distill)
  with pytest.raises(SystemExit):
    plan_scale.parse(["--pairs", "13b-1b"])


def test_tiny_configuration_end_to_end(tmp_path):
  out = tmp_path / "plan.jsonl"
  p = subprocess.run(
      [sys.executable, "-m", "experiments.plan_scale", "--tiny",
       "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
      timeout=900, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  results = [json.loads(line) for line in out.read_text().splitlines()]
  assert {r["row"]["program"] for r in results} == {"distill", "generate"}
  assert not [r for r in results if "error" in r]
  dist = next(r for r in results if r["row"]["program"] == "distill")
  # XLA's matmul FLOPs vs the model FLOPs (6N + 2N + attention; remat off):
  # the fused loss adds one [D, V] matmul per token for the CE gradient
  ratio = dist["hlo"]["dot_flops"] / dist["model_flops_per_device"]
  assert 1.0 <= ratio <= 1.25, ratio
  assert dist["memory"]["temp"] > 0 and dist["state_bytes"] > 0
  assert dist["memory"]["alias"] > 0  # the state is donated
  check = [json.loads(line) for line in
           (tmp_path / "plan.jsonl.check").read_text().splitlines()]
  assert check
  for c in check:
    for k in ("state", "teacher", "argument", "output", "alias", "temp"):
      assert c["abstract"][k] == c["real"][k], (k, c)
  assert "| pair | devices |" in p.stdout and "RSS growth" in p.stdout
