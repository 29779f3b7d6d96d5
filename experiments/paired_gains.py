r"""Paired gains between two phases of a finished seed experiment.

    python -m experiments.paired_gains --workdir=workdirs/mnist_takd \
        --a=student_takd --b=student_direct

Reads `<workdir>/results.json` (written by `experiments.seed_experiment`)
and prints, for the last- and best-epoch test accuracy, the per-seed
differences `a - b` (percentage points), their mean and the 95%
t-interval (`seed_experiment.paired_interval`). The seed experiment's own
table compares every distilled phase with the student alone; this compares
any two per-seed phases, e.g. TAKD against direct distillation
(`configs/mnist_takd.py`) or two Born-Again generations.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict

from absl import app
from absl import flags
import numpy as np

from experiments import seed_experiment

_WORKDIR = flags.DEFINE_string("workdir", None, "seed experiment workdir")
_A = flags.DEFINE_string("a", None, "phase a")
_B = flags.DEFINE_string("b", None, "phase b (a - b is reported)")


def paired_gains(results: Dict[str, Any], a: str, b: str) -> Dict[str, Any]:
  """`{'last': {...}, 'best': {...}}`: per-seed `a - b` (points), mean, 95%
  interval. Both phases must have one run per seed (not shared)."""
  phases = results["phases"]
  out = {}
  for p in (a, b):
    if p not in phases:
      raise ValueError(f"unknown phase {p!r}; phases: {sorted(phases)}.")
    if phases[p]["shared_across_seeds"]:
      raise ValueError(f"phase {p!r} is shared across seeds (one run): it "
                       "has no per-seed accuracies to pair.")
  for which in ("last", "best"):
    d = 100.0 * (np.asarray(phases[a][f"{which}_top1"])
                 - np.asarray(phases[b][f"{which}_top1"]))
    out[which] = {"diffs": d.tolist(), **seed_experiment.paired_interval(d)}
  return out


def format_gains(g: Dict[str, Any], a: str, b: str) -> str:
  lines = [f"{a} - {b} (test top-1, percentage points, paired by seed):"]
  for which, v in g.items():
    ci = ("n/a (one seed)" if v["ci95"] is None
          else f"[{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]")
    lines.append(f"  {which}: {v['mean']:+.2f}, 95% CI {ci}, per seed "
                 + ", ".join(f"{x:+.2f}" for x in v["diffs"]))
  return "\n".join(lines)


def main(argv):
  del argv
  path = os.path.join(_WORKDIR.value, "results.json")
  if not os.path.exists(path):
    sys.exit(f"error: {path} not found (run the seed experiment first).")
  with open(path) as f:
    results = json.load(f)
  try:
    g = paired_gains(results, _A.value, _B.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(format_gains(g, _A.value, _B.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "a", "b"])
  app.run(main)
