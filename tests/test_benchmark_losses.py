"""Smoke tests of experiments/benchmark_losses.py's `--before` and `--clock`."""

import os

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
