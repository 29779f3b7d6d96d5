r"""The loss benchmark in several fresh processes: the spread *across* them.

`python experiments/benchmark_losses.py --torch --processes 10 ...` runs the
logit-loss table of `benchmark_losses.py` in N fresh Python processes, one
after the other, each with the same arguments (and, with `--order shuffled`,
its own order of the losses, so each loss is compiled after a different
history), and prints:

* one line per process: its load average when it started, the CPU share the
  *other* jobs on the machine took while it ran (machine busy time from
  `/proc/stat` minus the child's own CPU time, as a % of all cores) and the
  order it ran the losses in;
* per loss: min / median / max over the processes of the per-process medians
  (kd_jax fwd+bwd and PyTorch fwd+bwd), the spread `max / min` of kd_jax's
  fwd+bwd, and the per-process ratio `torch / jax` (min / median / max, and how
  many processes had kd_jax slower than PyTorch);
* per process (one column each): kd_jax's fwd+bwd time with its CPU/wall
  ratio (process CPU time over wall time per call: ~2 when a call kept both
  cores busy, <= 1 when its threads ran on one core at a time — the number
  that tells the two modes of issue 23 apart on a quiet machine), and the
  ratio to PyTorch.

Why: within one process the calls of a jitted function are tightly
distributed, but which *mode* a process lands in can depend on the process
(docs/performance.md, "Per-process modes"). A one-process table can then be
off by 2x in either direction; the minimum ratio over N fresh processes is the
number to compare with PyTorch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence


def _busy_jiffies() -> Optional[tuple]:
  """(busy, total) jiffies of all CPUs from /proc/stat, or None."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  return sum(v) - v[3] - v[4], sum(v)


def child_argv(argv: Sequence[str], json_path: str,
               seed: Optional[int]) -> List[str]:
  """`argv` without `--processes`/`--order`, plus `--json` (and the seed)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in ("--processes", "--order", "--json", "--shuffle-losses"):
      skip = True
      continue
    if a == "--separate":
      continue
    if a.split("=", 1)[0] in ("--processes", "--order", "--json",
                               "--shuffle-losses"):
      continue
    out.append(a)
  out += ["--json", json_path]
  if seed is not None:
    out += ["--shuffle-losses", str(seed)]
  return out


def run_child(script: str, argv: List[str]) -> Dict:
  """Runs one fresh process; returns its JSON plus load / other-CPU figures."""
  clk = os.sysconf("SC_CLK_TCK")
  ncpu = os.cpu_count() or 1
  load = os.getloadavg()[0]
  before_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  b0 = _busy_jiffies()
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, script] + argv,
                        capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  b1 = _busy_jiffies()
  after_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise SystemExit(f"child process failed ({proc.returncode}):\n"
                     f"{proc.stderr[-2000:]}")
  own = ((after_cpu.ru_utime + after_cpu.ru_stime)
         - (before_cpu.ru_utime + before_cpu.ru_stime))
  others = None
  if b0 is not None and b1 is not None:
    busy_s = (b1[0] - b0[0]) / clk
    others = max(0.0, busy_s - own) / (wall * ncpu) * 100
  path = argv[argv.index("--json") + 1]
  with open(path) as f:
    data = json.load(f)
  data.update(load=load, others_pct=others, wall=wall, own_cpu=own,
              stdout=proc.stdout)
  return data


def separate_argvs(cargv: List[str]) -> tuple:
  """(kd_jax-only, PyTorch-only) argv of one `--separate` pair."""
  jax_only = [a for a in cargv if a not in ("--torch", "--torch-only")]
  json_at = cargv.index("--json") + 1
  torch_only = list(cargv)
  torch_only[json_at] = cargv[json_at][:-len(".json")] + "_torch.json"
  return jax_only, torch_only + ["--torch-only"]


def run_pair(script: str, cargv: List[str], torch_first: bool) -> Dict:
  """One `--separate` pair: kd_jax and PyTorch each in a fresh process.

  Returns the kd_jax process's data with the PyTorch timings merged into its
  records (and the PyTorch process's load / other-CPU figures beside).
  """
  jax_argv, torch_argv = separate_argvs(cargv)
  if torch_first:
    tdata = run_child(script, torch_argv)
    data = run_child(script, jax_argv)
  else:
    data = run_child(script, jax_argv)
    tdata = run_child(script, torch_argv)
  by_cell = {(r["loss"], r["shape"]): r for r in tdata["records"]}
  for r in data["records"]:
    t = by_cell[(r["loss"], r["shape"])]
    r.update(torch_fwd=t["torch_fwd"], torch_fwd_bwd=t["torch_fwd_bwd"])
  data.update(torch_load=tdata["load"], torch_others_pct=tdata["others_pct"],
              wall=data["wall"] + tdata["wall"])
  return data


def run(argv: Optional[Sequence[str]], n: int, *, shuffle: bool,
        script: Optional[str] = None, separate: bool = False) -> List[Dict]:
  """Runs N fresh processes of the benchmark and prints the spread tables.

  With `separate`, each of the N is a pair of processes (kd_jax only, then
  PyTorch only, the order alternating from pair to pair).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  script = script or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "benchmark_losses.py")
  procs = []
  with tempfile.TemporaryDirectory(prefix="kd_jax_spread_") as tmp:
    for i in range(n):
      cargv = child_argv(argv, os.path.join(tmp, f"p{i}.json"),
                         i if shuffle else None)
      data = (run_pair(script, cargv, torch_first=i % 2 == 1) if separate
              else run_child(script, cargv))
      procs.append(data)
      if i == 0:
        print(data["stdout"].splitlines()[0])   # the child's header line
        if separate:
          print("# --separate: each 'process' below is a pair of fresh "
                "processes, kd_jax only and PyTorch only (PyTorch first in "
                "the even-numbered pairs)")
      others = _pct(data["others_pct"])
      if separate:
        others += f" (PyTorch's process: {_pct(data['torch_others_pct'])})"
      print(f"# process {i + 1}/{n}: load {data['load']:.2f} at start, other "
            f"jobs' CPU {others} of the machine, {data['wall']:.0f} s; order "
            f"{','.join(data['order'])}", flush=True)
  print_spread(procs)
  return procs


def _pct(x: Optional[float]) -> str:
  return "?" if x is None else f"{x:.0f}%"


def _fmt(xs: List[float], scale: float = 1e6, fmt: str = "{:.0f}") -> str:
  return " / ".join(fmt.format(x * scale) for x in
                    (min(xs), statistics.median(xs), max(xs)))


def print_spread(procs: List[Dict]) -> None:
  """Prints the across-process summary (see the module docstring)."""
  cells: Dict[tuple, List[Dict]] = {}
  for p in procs:
    for r in p["records"]:
      cells.setdefault((r["loss"], r["shape"]), []).append(r)
  has_torch = all("torch_fwd_bwd" in r for rs in cells.values() for r in rs)
  print(f"\n## spread across {len(procs)} fresh processes (per-process "
        "medians; min / median / max over processes; µs)\n")
  has_par = all("jax_cpu_wall" in r for rs in cells.values() for r in rs)
  cols = ["loss", "shape", "jax fwd+bwd", "jax max/min"]
  if has_par:
    cols.append("jax CPU/wall")
  if has_torch:
    cols += ["torch fwd+bwd", "ratio torch/jax", "procs jax slower"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join(["---"] * len(cols)) + "|")
  for (loss, shape), rs in cells.items():
    jb = [r["jax_fwd_bwd"] for r in rs]
    row = [loss, shape, _fmt(jb), f"{max(jb) / min(jb):.2f}"]
    if has_par:
      row.append(_fmt([r["jax_cpu_wall"] for r in rs], 1, "{:.2f}"))
    if has_torch:
      tb = [r["torch_fwd_bwd"] for r in rs]
      ratio = [r["torch_fwd_bwd"] / r["jax_fwd_bwd"] for r in rs]
      slower = sum(x < 1 for x in ratio)
      row += [_fmt(tb), _fmt(ratio, 1, "{:.2f}x"), f"{slower}/{len(rs)}"]
    print("| " + " | ".join(row) + " |")
  if has_par:
    _per_process(cells, len(procs), "jax fwd+bwd µs (CPU/wall: ~2 = both "
                 "cores busy, <= 1 = one)", lambda r: (
                     f"{r['jax_fwd_bwd'] * 1e6:.0f} ({r['jax_cpu_wall']:.2f})"))
  if has_torch:
    _per_process(cells, len(procs), "fwd+bwd ratio torch / jax",
                 lambda r: f"{r['torch_fwd_bwd'] / r['jax_fwd_bwd']:.2f}")


def _per_process(cells: Dict[tuple, List[Dict]], n: int, title: str,
                 cell) -> None:
  print(f"\n## {title} in each process\n")
  print("| loss | shape | " + " | ".join(f"p{i + 1}" for i in range(n)) + " |")
  print("|" + "|".join(["---"] * (n + 2)) + "|")
  for (loss, shape), rs in cells.items():
    print(f"| {loss} | {shape} | " + " | ".join(cell(r) for r in rs) + " |")
