r"""The timing protocol of the kd_jax benchmarks: cells timed in shuffled rounds.

`time_interleaved` times several zero-argument functions ("cells", e.g. a
jitted JAX loss and its PyTorch eager twin) in rounds that visit every cell
once in a new random order, each visit a block of untimed then timed calls;
medians per cell. `configure` sets the clock and the block shape from the
command line of `benchmark_losses.py`. Why blocks: docs/performance.md,
"Per-process modes (issue 23)".
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable, List

CLOCK = time.perf_counter
"""Per-call clock: wall time, or `time.process_time` with `--clock cpu`."""
CPU_PER_WALL: List[float] = []  # last time_interleaved: median CPU/wall per fn
SETTLE_S = 0.015
"""Untimed calls of a cell, for at least this long, before its timed block.

PyTorch's OpenMP worker threads busy-wait after every parallel region
(libgomp's default spin: ~5 ms of one core on the 2-core VM of
docs/performance.md, longer in wall time when it shares the core), and a
jitted JAX call that starts inside that window runs its two-thread kernels on
one free core (1.5-2x slower). Keeping the machine busy with the next cell's
own untimed calls until the spin is over gives each side the machine as it
would have it in a process of its own. (Idling instead is worse: on this VM
the first ~20 ms of work after an idle gap of >= 20 ms run up to 2x slower.)
"""
BLOCK = 3
"""Timed calls per block (`--block`), after the untimed `SETTLE_S`."""


def protocol() -> str:
  """The timing protocol in words, for the table headers."""
  if SETTLE_S <= 0:
    return "cells interleaved call by call"
  return (f"cells interleaved in blocks (>= {SETTLE_S * 1e3:.0f} ms of "
          f"untimed calls, then {BLOCK} timed calls)")


def time_interleaved(fns: List[Callable[[], None]], *, warmup: int,
                     min_runs: int, max_runs: int, budget_s: float,
                     max_cell_s: float) -> List[float]:
  """Median seconds per call of each `fn` (each must block until done).

  The functions are timed in rounds, each visiting every function once in a
  new random order (no cell always follows the same one), so a change in
  background load affects all of them alike: on a shared machine the
  *ratios* stay meaningful even when absolute times drift. A visit is a
  block: untimed calls for at least `SETTLE_S` (the previous block's runtime
  parks its spinning threads, this one's wake up), then `BLOCK` timed calls
  back to back, as in a process that runs only this function. Runs at least `min_runs` rounds and `budget_s` seconds, except
  that slow cells (large token-level sizes) stop after 3 rounds once
  `max_cell_s` has passed.
  """
  for fn in fns:
    for i in range(warmup):
      t0 = time.perf_counter()
      fn()
      if i >= 1 and time.perf_counter() - t0 > 0.5:
        break  # slow cell: compiled and warm after 2 calls
  times: List[List[float]] = [[] for _ in fns]
  ratios: List[List[float]] = [[] for _ in fns]
  start = time.perf_counter()
  rounds = 0
  order = list(range(len(fns)))
  shuffle = random.Random(0).shuffle
  while rounds < max_runs:
    elapsed = time.perf_counter() - start
    if rounds >= min_runs and elapsed >= budget_s:
      break
    if rounds >= 3 and elapsed >= max_cell_s:
      break
    shuffle(order)
    for i in order:
      if SETTLE_S > 0:
        t0 = time.perf_counter()
        fns[i]()
        while time.perf_counter() - t0 < SETTLE_S:
          fns[i]()
      for _ in range(max(1, BLOCK)):
        w0, c0 = time.perf_counter(), time.process_time()
        fns[i]()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        times[i].append(c if CLOCK is time.process_time else w)
        ratios[i].append(c / max(w, 1e-9))
    rounds += 1
  CPU_PER_WALL[:] = [statistics.median(r) for r in ratios]
  return [statistics.median(ts) for ts in times]


def configure(clock: str = "wall", settle_ms: float = 15.0,
              block: int = 3) -> None:
  """Sets `CLOCK` ('wall' or 'cpu'), `SETTLE_S` and `BLOCK`.

  `settle_ms <= 0` is the call-by-call protocol (one timed call per visit).
  """
  global CLOCK, SETTLE_S, BLOCK  # pylint: disable=global-statement
  CLOCK = time.process_time if clock == "cpu" else time.perf_counter
  SETTLE_S = max(0.0, settle_ms) / 1e3
  BLOCK = max(1, block) if settle_ms > 0 else 1
