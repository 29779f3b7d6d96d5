"""What a run tells: clocks, loop timing, the progress bar, train records.

`TrainLog` writes the mean train metrics at steps that depend only on the
step (epoch ends, multiples of ``log_every_steps``, checkpoints, the end),
so a resumed run writes the same records as an uninterrupted one, and it
fetches a group only once the device has moved past it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from kd_jax import metrics_io


class Clock:
  """Wall-clock marks since the start of a run (`timings` of the report)."""

  def __init__(self):
    self.t_start = time.perf_counter()
    self.timings: Dict[str, float] = {}

  def tick(self, name: str) -> None:
    self.timings[name] = round(time.perf_counter() - self.t_start, 3)

  def elapsed(self) -> float:
    return time.perf_counter() - self.t_start


class LoopTimer:
  """Train-loop timing. Train time = the loop's wall time minus evaluation
  (data gathering, transfers, compilation of the first call and checkpoint
  saves included); "steady" also excludes the first call (compilation) and
  everything after it that is not training (evaluation, saves). Work is
  dispatched asynchronously; the clocks are read after blocking on the
  device."""

  def __init__(self):
    self.t_loop = time.perf_counter()
    self.t_first_end: Optional[float] = None
    self.t_end: Optional[float] = None
    self.first_call_s: Optional[float] = None
    self.first_steps = 0
    self.eval_s = 0.0
    self.ckpt_s = 0.0
    self._overhead = 0.0  # eval + saves after the first call

  def first_call(self, n_steps: int) -> None:
    self.t_first_end = time.perf_counter()
    self.first_call_s = self.t_first_end - self.t_loop
    self.first_steps = n_steps

  @contextlib.contextmanager
  def measure(self, what: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      dt = time.perf_counter() - t
      if what == "eval":
        self.eval_s += dt
      else:
        self.ckpt_s += dt
      if self.t_first_end is not None:
        self._overhead += dt

  def train_elapsed(self) -> float:
    return time.perf_counter() - self.t_loop - self.eval_s

  def summary(self, trained: int, units: Mapping[str, float]
              ) -> Dict[str, Any]:
    """Times and `<unit>_per_sec` / `steady_<unit>_per_sec` for each unit
    (`units`: e.g. `{'examples': batch, 'tokens': batch * length}` per
    step)."""
    end = self.t_end if self.t_end is not None else time.perf_counter()
    train_s = (end - self.t_loop - self.eval_s) if trained else 0.0
    steady_steps = trained - self.first_steps
    steady_s = (end - self.t_first_end - self._overhead
                if self.t_first_end is not None else 0.0)
    out = {"train_s": train_s, "eval_s": self.eval_s,
           "checkpoint_s": self.ckpt_s, "first_call_s": self.first_call_s}
    for unit, per_step in units.items():
      out[f"{unit}_per_sec"] = (trained * per_step / train_s if train_s
                                else None)
      out[f"steady_{unit}_per_sec"] = (
          steady_steps * per_step / steady_s
          if steady_steps > 0 and steady_s > 0 else None)
    return out


class Progress:
  """tqdm bar (or nothing) with a throughput postfix."""

  def __init__(self, enabled, total, initial, desc):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                       dynamic_ncols=True, leave=False)

  def update(self, n, **postfix):
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)

  def close(self):
    if self._bar is not None:
      self._bar.close()


class NullWriter:
  """The metrics writer of processes other than 0."""
  path = None

  def write(self, *a, **k):
    pass

  def close(self):
    pass


class TrainLog:
  """Mean train metrics over groups of chunks, written at boundary steps.

  A boundary is a step that ends an epoch, crosses a multiple of
  `log_every`, ends the run or is checkpointed -- a function of the step
  only, so a resumed run writes the same records as an uninterrupted one.
  A group closed by the most recently dispatched chunk waits for the next
  call (fetching it would idle the device) unless `write(wait=True)`.
  """

  def __init__(self, writer, fetch, schedule, steps_per_epoch: int,
               log_every: int):
    self.writer, self.fetch, self.schedule = writer, fetch, schedule
    self.spe, self.log_every = steps_per_epoch, max(int(log_every), 1)
    self._open: List = []
    self._closed: List = []
    self.nonfinite = NonFiniteTally()

  def add(self, n: int, metrics, step: int) -> None:
    self._open.append((n, metrics, step))
    if step % self.spe == 0 or (step // self.log_every
                                > (step - n) // self.log_every):
      self.close_group(step)

  def close_group(self, step: int) -> None:
    if self._open:
      self._closed.append((step, self._open))
      self._open = []

  def write(self, wait: bool = False) -> None:
    todo = self._closed
    if not wait and todo and not self._open:
      todo = todo[:-1]  # the newest group holds the chunk still running
    self._closed = self._closed[len(todo):]
    for step, chunks in todo:
      agg: Dict[str, float] = {}
      tot = 0
      for n, m, end in chunks:
        m = self.fetch(m)
        self.nonfinite.add(end, n, m.get("nonfinite"))
        for k, v in m.items():
          v = np.asarray(v, np.float64)
          agg[k] = agg.get(k, 0.0) + float(v.sum() if v.ndim else v * n)
        tot += n
      rec = {k: v / tot for k, v in agg.items()}
      rec["lr"] = float(self.schedule(max(step - 1, 0)))
      self.writer.write(step, rec, split="train", epoch=step / self.spe)


class NonFiniteTally:
  """The steps whose loss or gradients were NaN / inf, as fetched: the
  first one, the total, and the current run of consecutive ones."""

  def __init__(self):
    self.first: Optional[int] = None
    self.total = 0
    self.run = 0

  def add(self, end: int, n: int, flags) -> None:
    if flags is None:
      return
    flags = np.reshape(np.asarray(flags, np.float64), (-1,))
    if flags.size == 1 and n > 1:
      flags = np.repeat(flags, n)
    for i, bad in enumerate(flags):
      if bad > 0:
        if self.first is None:
          self.first = end - n + 1 + i
        self.total += 1
        self.run += 1
      else:
        self.run = 0


def plot(workdir: str, title: str) -> None:
  """`curves.png` of the run's `metrics.jsonl` (written to a temp file and
  renamed; a warning if it fails)."""
  records = metrics_io.read_jsonl(os.path.join(workdir,
                                               metrics_io.METRICS_FILE))
  path = os.path.join(workdir, metrics_io.PLOT_FILE)
  tmp = f"{path}.tmp-{os.getpid()}.png"
  try:
    metrics_io.plot_curves(records, tmp, title=title)
    os.replace(tmp, path)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not plot curves: %s", e)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
