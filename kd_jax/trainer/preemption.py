"""SIGTERM / SIGINT: finish the current compiled call, save, report, stop.

A cluster preempts a job with SIGTERM (Ctrl-C sends SIGINT). `Preemption`
turns either into a request the loop checks after every compiled call
(`requested(step)`): the loop then saves a checkpoint at that step, writes
``report.json`` with ``"preempted": true`` and raises
`errors.Preempted` (exit status 75), so a restart policy that reruns the
same command resumes exactly there.

With several processes they must agree on the step to save at: JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`,
the coordination service's notifier catches SIGTERM on any process and all
processes stop at the same step); SIGINT is forwarded to it as SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Iterator, Optional

import jax


class Preemption:
  """Context manager; `requested(step)` after each compiled call."""

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.signal_time: Optional[float] = None
    self.signal_name: Optional[str] = None
    self._old = {}

  def _on_signal(self, signum, frame):
    del frame
    if self.signal_time is None:
      self.signal_time = time.perf_counter()
      self.signal_name = signal.Signals(signum).name
    if self.multi:  # JAX's notifier owns SIGTERM; forward SIGINT to it
      os.kill(os.getpid(), signal.SIGTERM)

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # (signal handlers can only be set from the main thread)
    signals = (signal.SIGINT,) if self.multi else (signal.SIGTERM,
                                                   signal.SIGINT)
    for s in signals:
      self._old[s] = signal.signal(s, self._on_signal)
    return self

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)
    self._old = {}

  def requested(self, step: int) -> bool:
    """Whether to stop after the call that ended at `step` (several
    processes: the step they all agreed on)."""
    if not self.multi:
      return self.signal_time is not None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # no preemption service (not initialized with it)
      return self.signal_time is not None


_ACTIVE: Optional[Preemption] = None


@contextlib.contextmanager
def watch() -> Iterator[Preemption]:
  """The process's `Preemption` while the block runs (re-entrant: an inner
  `watch()` -- the loop's inside `experiments.main`'s -- shares the outer
  one, so a signal between two runs of a seed experiment is not lost)."""
  global _ACTIVE
  if _ACTIVE is not None:
    yield _ACTIVE
    return
  with Preemption() as p:
    _ACTIVE = p
    try:
      yield p
    finally:
      _ACTIVE = None
