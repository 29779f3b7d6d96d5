"""Smoke tests of experiments/benchmark_losses.py: `--before`, `--clock`,
`--json`, `--processes` (experiments/benchmark_spread.py)."""

import os

import pytest

from experiments import bench_timing
from experiments import benchmark_losses

from kd_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_before_losses_is_a_separate_module():
  before = benchmark_losses.load_before_losses(ROOT)
  assert before.__name__ == "kd_jax_losses_before"
  assert before.kd_loss is not losses.kd_loss
  assert before.kd_loss.__module__.startswith("kd_jax_losses_before")


def test_table_with_before_and_cpu_clock(capsys):
  benchmark_losses.main([
      "--sizes", "4x16", "--losses", "kd,tv", "--before", ROOT,
      "--clock", "cpu", "--warmup", "1", "--min-runs", "2", "--budget",
      "0", "--max-runs", "2"])
  out = capsys.readouterr().out
  assert "clock=cpu" in out
  header = [l for l in out.splitlines() if l.startswith("| loss |")][0]
  assert "before fwd+bwd µs" in header and "after speed-up" in header
  rows = [l for l in out.splitlines() if l.startswith("| kd |")
          or l.startswith("| tv |")]
  assert len(rows) == 2
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 8 and cells[-1].endswith("x")


def test_child_argv_strips_parent_flags():
  from experiments import benchmark_spread  # pylint: disable=g-import-not-at-top
  argv = ["--torch", "--processes", "3", "--order=fixed", "--sizes", "4x16",
          "--json", "old.json", "--processes=2"]
  out = benchmark_spread.child_argv(argv, "/tmp/p.json", seed=5)
  assert out == ["--torch", "--sizes", "4x16", "--json", "/tmp/p.json",
                 "--shuffle-losses", "5"]
  assert benchmark_spread.child_argv(["--losses", "kd"], "x.json", None) == [
      "--losses", "kd", "--json", "x.json"]


def test_spread_table_counts_slower_processes(capsys):
  from experiments import benchmark_spread  # pylint: disable=g-import-not-at-top
  rec = lambda j, t: {"loss": "tv", "shape": "8x4", "jax_fwd": j,
                      "jax_fwd_bwd": j, "torch_fwd": t, "torch_fwd_bwd": t}
  procs = [{"records": [rec(1e-3, 2e-3)]}, {"records": [rec(4e-3, 2e-3)]},
           {"records": [rec(2e-3, 2e-3)]}]
  benchmark_spread.print_spread(procs)
  out = capsys.readouterr().out
  row = [l for l in out.splitlines() if l.startswith("| tv | 8x4 | 1000")][0]
  cells = [c.strip() for c in row.strip("|").split("|")]
  # jax 1000 / 2000 / 4000 µs, max/min 4, ratio 0.50 / 1.00 / 2.00, one slower.
  assert cells[2] == "1000 / 2000 / 4000" and cells[3] == "4.00"
  assert cells[5] == "0.50x / 1.00x / 2.00x" and cells[6] == "1/3"
  per_process = [l for l in out.splitlines() if l.startswith("| tv | 8x4 | 2.00")]
  assert per_process == ["| tv | 8x4 | 2.00 | 0.50 | 1.00 |"]


def test_spread_table_shows_cpu_per_wall(capsys):
  from experiments import benchmark_spread  # pylint: disable=g-import-not-at-top
  procs = [{"records": [{"loss": "kd", "shape": "8x4", "jax_fwd": 1e-3,
                         "jax_fwd_bwd": t, "jax_cpu_wall": r}]}
           for t, r in ((2e-3, 1.9), (4e-3, 0.98))]
  benchmark_spread.print_spread(procs)
  out = capsys.readouterr().out
  header = [l for l in out.splitlines() if l.startswith("| loss | shape |")][0]
  assert "jax CPU/wall" in header and "torch" not in header
  assert "| kd | 8x4 | 2000 / 3000 / 4000 | 2.00 | 0.98 / 1.44 / 1.90 |" in out
  assert "| kd | 8x4 | 2000 (1.90) | 4000 (0.98) |" in out


def test_json_output_of_one_process(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  path = tmp_path / "cells.json"
  benchmark_losses.main([
      "--sizes", "4x16", "--losses", "kd,tv", "--clock", "cpu", "--warmup",
      "1", "--min-runs", "2", "--budget", "0", "--max-runs", "2",
      "--shuffle-losses", "1", "--json", str(path)])
  data = json.loads(path.read_text())
  assert sorted(data["order"]) == ["kd", "tv"]
  assert [r["loss"] for r in data["records"]] == data["order"]
  for r in data["records"]:
    assert r["shape"] == "4x16" and r["jax_fwd_bwd"] > 0 and r["jax_fwd"] > 0
    assert 0 < r["jax_cpu_wall"] < 8


@pytest.mark.slow
def test_two_fresh_processes_end_to_end(capsys):
  benchmark_losses.main([
      "--sizes", "4x16", "--losses", "kd,tv", "--clock", "cpu", "--warmup",
      "1", "--min-runs", "2", "--budget", "0", "--max-runs", "2",
      "--processes", "2"])
  out = capsys.readouterr().out
  assert "# process 1/2" in out and "# process 2/2" in out
  assert "order kd,tv" in out or "order tv,kd" in out
  rows = [l for l in out.splitlines() if l.startswith(("| kd | 4x16", "| tv | 4x16"))]
  # Summary rows (min / median / max) and the per-process rows (µs, CPU/wall).
  assert len(rows) == 4 and all(r.rstrip().endswith("|") for r in rows)
  assert sum(" / " in r for r in rows) == 2


def test_blocks_settle_with_untimed_calls_then_time_block_calls(monkeypatch):
  """Each visit: untimed calls for >= SETTLE_S, then BLOCK timed calls."""
  log = []
  fns = [lambda: log.append("a"), lambda: log.append("b")]
  monkeypatch.setattr(bench_timing, "SETTLE_S", 0.002)
  monkeypatch.setattr(bench_timing, "BLOCK", 3)
  med = bench_timing.time_interleaved(
      fns, warmup=1, min_runs=4, max_runs=4, budget_s=0, max_cell_s=60)
  assert len(med) == 2 and all(m >= 0 for m in med)
  body = "".join(log[2:])           # after one warm-up call each
  runs = [body[0]]                  # collapse into blocks of one function
  for ch in body[1:]:
    if ch == runs[-1][-1]:
      runs[-1] += ch
    else:
      runs.append(ch)
  # 4 rounds x 2 functions = 8 visits (two visits of the same function can
  # meet at a round boundary and merge into one run).
  assert body.count("a") >= 4 * 4 and body.count("b") >= 4 * 4
  assert all(len(r) >= 4 for r in runs)  # >= 1 untimed + 3 timed


def test_settle_zero_is_the_old_call_by_call_protocol(monkeypatch):
  log = []
  fns = [lambda: log.append("a"), lambda: log.append("b")]
  monkeypatch.setattr(bench_timing, "SETTLE_S", 0.0)
  monkeypatch.setattr(bench_timing, "BLOCK", 1)
  bench_timing.time_interleaved(
      fns, warmup=1, min_runs=5, max_runs=5, budget_s=0, max_cell_s=60)
  assert log[2:].count("a") == 5 and log[2:].count("b") == 5
  assert "cells interleaved call by call" == bench_timing.protocol()


def test_torch_only_needs_the_logit_table(capsys):
  with pytest.raises(SystemExit):
    benchmark_losses.main(["--torch-only", "--tokens"])
  assert "--torch-only applies to the logit table" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    benchmark_losses.main(["--separate", "--processes", "2"])
  assert "--separate needs --processes N and --torch" in (
      capsys.readouterr().err)


def test_separate_pair_times_each_side_in_its_own_process(monkeypatch):
  from experiments import benchmark_spread  # pylint: disable=g-import-not-at-top
  cargv = ["--torch", "--sizes", "8x4", "--json", "/tmp/p0.json"]
  jax_argv, torch_argv = benchmark_spread.separate_argvs(cargv)
  assert jax_argv == ["--sizes", "8x4", "--json", "/tmp/p0.json"]
  assert torch_argv == ["--torch", "--sizes", "8x4", "--json",
                        "/tmp/p0_torch.json", "--torch-only"]
  calls = []

  def fake_child(script, argv):
    calls.append(argv)
    rec = {"loss": "tv", "shape": "8x4"}
    if "--torch-only" in argv:
      rec.update(torch_fwd=1.0, torch_fwd_bwd=2.0)
      return {"records": [rec], "load": 0.5, "others_pct": 3.0, "wall": 2.0}
    rec.update(jax_fwd=0.5, jax_fwd_bwd=1.0, jax_cpu_wall=1.9)
    return {"records": [rec], "load": 0.1, "others_pct": 0.0, "wall": 1.0,
            "order": ["tv"]}

  monkeypatch.setattr(benchmark_spread, "run_child", fake_child)
  data = benchmark_spread.run_pair("x.py", cargv, torch_first=True)
  assert "--torch-only" in calls[0] and "--torch-only" not in calls[1]
  assert data["records"] == [{"loss": "tv", "shape": "8x4", "jax_fwd": 0.5,
                              "jax_fwd_bwd": 1.0, "jax_cpu_wall": 1.9,
                              "torch_fwd": 1.0, "torch_fwd_bwd": 2.0}]
  assert data["wall"] == 3.0 and data["torch_others_pct"] == 3.0


def test_sync_dispatch_flag_runs_jax_calls_on_the_calling_thread(capsys):
  import jax  # pylint: disable=g-import-not-at-top
  try:
    benchmark_losses.main([
        "--sizes", "4x16", "--losses", "tv", "--sync-dispatch", "--warmup",
        "1", "--min-runs", "2", "--budget", "0", "--max-runs", "2",
        "--settle-ms", "0"])
    assert jax.config.values["jax_cpu_enable_async_dispatch"] is False
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", True)
  out = capsys.readouterr().out
  assert "dispatch=sync" in out and "cells interleaved call by call" in out
  assert any(l.startswith("| tv | 4x16 |") for l in out.splitlines())


def test_diagnose_spin_prints_the_thread_table(capsys):
  pytest.importorskip("torch")
  from experiments import diagnose_spin  # pylint: disable=g-import-not-at-top
  diagnose_spin.main(["--calls", "2"])
  out = capsys.readouterr().out
  spins = [l for l in out.splitlines() if l.startswith("# PyTorch's worker")]
  assert len(spins) == 3 and all(float(l.split(": ")[1].split()[0]) >= 0
                                 for l in spins)
  rows = [l for l in out.splitlines() if l.startswith(("| call by call |",
                                                       "| blocks |"))]
  assert len(rows) == 2
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0 and "xla:" in cells[2]


def test_feature_table_and_unknown_feature(capsys):
  benchmark_losses.main(["--features", "fitnet", "--warmup", "1",
                         "--min-runs", "2", "--budget", "0", "--max-runs", "2",
                         "--settle-ms", "0"])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith("| fitnet |")]
  assert len(rows) == 1 and len(rows[0].strip("|").split("|")) == 4
  with pytest.raises(SystemExit):
    benchmark_losses.main(["--features", "fitnett"])
  assert "unknown --features ['fitnett']" in capsys.readouterr().err
