"""The one training loop, and the protocol of the tasks it drives.

`run(task, workdir, clock)` does, for any `Task`: the initial state, the
run's constants (the placed teacher, a device-resident dataset), resume
from the newest restorable checkpoint ("resumed from step N of M"), the
task's pre-training stages, the compiled calls (``steps_per_call`` steps
each, never across an epoch end or an evaluation), train records
(`reporting.TrainLog`), evaluations, checkpoints (Orbax, keep-last and
keep-best by the task's metric), the progress bar, the timers, the report
(``report.json``), ``curves.png`` and the barriers of several processes
(process 0 alone writes). A resumed run ends bit-identical to an
uninterrupted one, with the same ``metrics.jsonl`` records.

A task is what differs between kinds of training (image classification,
language modelling, a generator trained beside the student...): a subclass
of `Task` registered with `@register('<name>')` (the config's ``task``)
that sets the attributes below and implements the methods. Nothing else in
the loop changes for a new task (docs/architecture.md shows a sketch).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax

from kd_jax import logs
from kd_jax import metrics_io
from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer import checkpointing
from kd_jax.trainer import errors
from kd_jax.trainer import preemption
from kd_jax.trainer import reporting
from kd_jax.trainer import workdir as workdir_lib
from kd_jax.trainer.config import RunConfig

TASKS: Dict[str, type] = {}


def register(name: str):
  """Class decorator: the `Task` of ``config.task == name``."""
  def wrap(cls):
    TASKS[name] = cls
    return cls
  return wrap


@dataclasses.dataclass(frozen=True)
class Metric:
  """A result of a task: ``last_<key>`` / ``best_<key>`` in the report.
  `higher`: larger is better; `scale`: how tables print it (x100: %)."""
  key: str
  label: str
  higher: bool = True
  scale: float = 1.0
  table: bool = True   # a column of the seed experiment's table
  gain: bool = False   # the paired gain of distillation is computed on it
  digits: int = 2      # decimals in the tables (after `scale`)


class Task(abc.ABC):
  """What the loop needs from a kind of training.

  Attributes (set by `__init__(rc, workdir, dry_run=False)`):
    rc: the parsed `RunConfig`; workdir: the run's directory.
    placement: `kd_jax.train.placement` (mesh or pmap).
    total_steps / steps_per_epoch: the run's length in optimizer steps.
    schedule: the LR schedule (logged with the train records).
    units: throughput units per step, e.g. `{'examples': 64}`.

  Methods: `init_state()` (host state), `constants(clock)` -> (placed
  constants every call receives, report fields), `before_training(state,
  writer)` (stages run once at step 0), `call(step, n)` -> (compiled fn,
  device batch of steps [step, step+n)), `evaluate(state, consts)` ->
  metrics, `summary(evals)` -> report fields, `close()`; class method
  `metrics(rc)` -> the `Metric`s a seed experiment tabulates (the first one
  selects the best evaluation and the kept-best checkpoint).
  """
  rc: RunConfig
  workdir: str
  placement: Any
  total_steps: int
  steps_per_epoch: int
  schedule: Callable
  units: Mapping[str, float]

  @classmethod
  @abc.abstractmethod
  def metrics(cls, rc: RunConfig) -> Tuple[Metric, ...]:
    """The results a seed experiment tabulates (the first picks the best)."""

  def title(self) -> str:
    t = f" <- {', '.join(self.teacher_names())}" if self.rc.distill else ""
    return f"{self.rc.mode}: {self.model_name()}{t}"

  def model_name(self) -> str:
    return str(getattr(self.rc.model, "name", "") or
               getattr(self.rc.model, "preset", ""))

  def dataset_name(self) -> str:
    return str(getattr(self.rc.data, "name", ""))

  def teacher_names(self) -> List[str]:
    return [str(getattr(t, "name", "") or getattr(t, "preset", "")
                or getattr(t, "hf_dir", "")) for t in self.rc.teachers]

  @abc.abstractmethod
  def init_state(self):
    """The host state (a `TrainState`, or a pytree with `step` and `rng`)."""

  def constants(self, clock) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    del clock
    return {}, {}

  def before_training(self, state, writer):
    del writer
    return state, {}

  @abc.abstractmethod
  def call(self, step: int, n: int):
    """(compiled function, device batch of steps ``[step, step + n)``)."""

  @abc.abstractmethod
  def evaluate(self, state, consts) -> Dict[str, float]:
    """Eval metrics (floats) of `state`."""

  def summary(self, evals: List[Dict[str, Any]]) -> Dict[str, Any]:
    """`last_<key>` / `best_<key>` of every metric (the best evaluation by
    the first metric) and `best_step`."""
    ms = self.metrics(self.rc)
    if not evals:
      return {f"{w}_{m.key}": None for m in ms for w in ("last", "best")}
    first = ms[0]
    pick = max if first.higher else min
    best = pick(evals, key=lambda r: r[first.key])
    out = {"best_step": best.get("step"),
           "best_epoch": best.get("epoch")}
    for m in ms:
      out[f"last_{m.key}"] = evals[-1].get(m.key)
      out[f"best_{m.key}"] = best.get(m.key)
    return out

  def checkpoint_metrics(self, ev: Mapping[str, float]) -> Dict[str, float]:
    """What an evaluated checkpoint is ranked by (keep-best): the first
    metric, under `best_checkpoint()[0]`."""
    return {self.best_checkpoint()[0]: ev[self.metrics(self.rc)[0].key]}

  def best_checkpoint(self) -> Tuple[str, bool]:
    """(name, higher is better) of the metric that ranks checkpoints."""
    m = self.metrics(self.rc)[0]
    return m.key, m.higher

  def close(self) -> None:
    pass

  # -- checkpoints (the placement's tree of a `TrainState`) ----------------

  def checkpoint_tree(self, state):
    return self.placement.checkpoint_tree(state)

  def restore_template(self, host_state):
    return self.placement.restore_template(host_state)

  def restored_state(self, tree, host_state):
    return self.placement.restored_state(tree,
                                         jax.random.key_impl(host_state.rng))


def is_main() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """A barrier of all processes (a no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------
# The run.


def run(task: Task, workdir: str, clock: reporting.Clock) -> Dict[str, Any]:
  """Init, resume, stages, the loop and the report of one run."""
  rc = task.rc
  state = task.init_state()
  clock.tick("state_initialized")
  consts, info = task.constants(clock)
  best, higher = task.best_checkpoint()
  mgr = checkpointing.open_manager(rc.checkpoint, workdir, best=best,
                                   higher=higher)
  try:
    state, start = _resume(task, mgr, state)
  except BaseException:
    if mgr is not None:
      mgr.close()
    raise
  main = is_main()
  writer = (metrics_io.MetricsWriter(workdir, tensorboard=True,
                                     resume_step=start if start else None)
            if main else reporting.NullWriter())
  if start == 0:
    state, stages = task.before_training(state, writer)
    if stages:
      info["pretrain"] = stages
      clock.tick("pretrain_done")
  evals = ([r for r in metrics_io.read_jsonl(writer.path)
            if r.get("split") == "eval"] if main else [])
  state = task.placement.place_state(state)
  memory = None
  if start < task.total_steps:
    fn, batch = task.call(start, _call_steps(task, start))
    memory = _memory(task, fn, state, consts, batch)
  clock.tick("train_start")
  timer = reporting.LoopTimer()
  loop = _Loop(task, consts, writer, mgr, evals, timer, start)
  try:
    with preemption.watch() as pre:
      state = loop.run(state, pre)
  except (errors.Preempted, errors.NonFiniteError) as e:
    # A stopped run's report (finished: false) says why and where.
    stop = ({"preempted": loop.preempted} if isinstance(e, errors.Preempted)
            else {"nonfinite_step": loop.log.nonfinite.first,
                  "stopped": str(e)})
    _report(task, clock, timer, start, evals, dict(info, **stop), memory,
            loop, finished=False)
    raise
  clock.tick("train_end")
  report = _report(task, clock, timer, start, evals, info, memory, loop)
  report["_final_state"] = task.placement.fetch(state)
  barrier(f"run done {workdir}")  # its files are there
  return report


def _resume(task: Task, mgr, state):
  """(state, start_step): the newest restorable checkpoint, if any."""
  if mgr is None:
    return state, 0
  restored = checkpointing.restore_newest(mgr, task.restore_template(state))
  if restored is None:
    return state, 0
  start = int(restored.step)
  state = task.restored_state(restored.state, state)
  found = int(task.placement.fetch(state.step))
  if found != start:
    raise checkpointing.CheckpointRestoreError(
        f"checkpoint step {start} in {mgr.directory} holds a state at step "
        f"{found}.")
  if is_main():
    print(f"resumed from step {start} of {task.total_steps} "
          f"({mgr.directory})", flush=True)
  return state, start


def _memory(task: Task, fn, state, consts, batch) -> Dict[str, Any]:
  """`report.json["memory"]`: bytes per device of the state and the
  teacher, and the compiled step's (its executable is cached for the first
  call); printed for runs over several devices."""
  compiled = fn.lower(state, consts, batch).compile()
  rep = task.placement.memory(state, consts.get("teacher"), compiled)
  if is_main() and task.placement.num_devices > 1:
    print(sharding_lib.memory_summary(rep), flush=True)
  return rep


def _call_steps(task: Task, step: int) -> int:
  """Steps of the call starting at `step`: `steps_per_call`, cut at the
  epoch end, the next evaluation and the run's end."""
  tr = task.rc.train
  spe = task.steps_per_epoch
  n = min(tr.steps_per_call, spe - step % spe, task.total_steps - step)
  if tr.eval_every_steps:
    n = min(n, tr.eval_every_steps - step % tr.eval_every_steps)
  return n


class _Loop:
  """The train loop proper: calls, records, evaluations, checkpoints --
  and what stops it early: a preemption signal (save, then
  `errors.Preempted`), NaN / inf values (`errors.NonFiniteError`, nothing
  non-finite saved), a full disk (`errors.StorageError`)."""

  def __init__(self, task, consts, writer, mgr, evals, timer, start):
    self.task, self.consts, self.writer, self.mgr = task, consts, writer, mgr
    self.evals, self.timer, self.last = evals, timer, start
    self.start, self.good = start, (start if start else None)
    self.rc = task.rc
    self.log = reporting.TrainLog(writer, task.placement.fetch, task.schedule,
                                  task.steps_per_epoch,
                                  self.rc.train.log_every_steps)
    self.preempted: Optional[Dict[str, Any]] = None

  def run(self, state, pre):
    task, rc, start = self.task, self.rc, self.start
    unit, per_step = next(iter(task.units.items()))
    progress = reporting.Progress(bool(rc.train.progress_bar) and is_main(),
                                  task.total_steps, start, task.title())
    step = start
    try:
      while step < task.total_steps:
        n = _call_steps(task, step)
        fn, batch = task.call(step, n)
        state, m = fn(state, self.consts, batch)
        if self.timer.first_call_s is None:
          jax.block_until_ready(m)
          self.timer.first_call(n)
        step += n
        self.log.add(n, m, step)
        rate = (step - start) * per_step / self.timer.train_elapsed()
        progress.update(n, **{f"{unit}_per_s": f"{rate:.0f}"})
        if pre.requested(step):
          self._preempt(step, state, pre)
        self._after_call(step, state)
        self._write(wait=False)
      jax.block_until_ready(state)
      self.timer.t_end = time.perf_counter()
      if step > self.last:
        self._save(step, state)
    finally:
      progress.close()
      self._close()
    return state

  # -- checks -----------------------------------------------------------------

  def _write(self, wait: bool) -> None:
    """Writes the fetched train records; stops on non-finite values."""
    try:
      self.log.write(wait=wait)
    except OSError as e:
      self._storage(e, self.writer.path, "metrics")
    tally, tr = self.log.nonfinite, self.rc.train
    if tally.first is None:
      return
    if tr.on_nonfinite == "stop":
      raise self._nonfinite(
          f"the loss or the gradients are NaN / inf at step {tally.first}")
    if tally.run >= tr.max_consecutive_skips:
      raise self._nonfinite(
          f"{tally.run} consecutive updates were NaN / inf and skipped "
          f"(first at step {tally.first}; train.max_consecutive_skips="
          f"{tr.max_consecutive_skips})")

  def _nonfinite(self, what: str) -> errors.NonFiniteError:
    where = (f"the last good checkpoint is step {self.good} in "
             f"{self.mgr.directory} (kept; a rerun resumes from it)"
             if self.mgr is not None and self.good else
             "no checkpoint was saved")
    o = self.rc.optimizer
    return errors.NonFiniteError(
        f"{what}; {where}. Likely causes: a learning rate too high for "
        f"'{o.name}' (optimizer.learning_rate={o.learning_rate:g}), or "
        "inputs / labels / a loss term that overflow (check the data and "
        "the terms' weights); train.on_nonfinite='skip_update' skips such "
        "updates instead.")

  def _storage(self, e: BaseException, path: str, what: str):
    err = workdir_lib.find_os_error(e)
    if err is None:
      raise e
    kept = (f"; the last good checkpoint (step {self.good}) is intact"
            if self.good else "")
    raise errors.StorageError(
        f"cannot write {what} to {path}: {err.strerror}{kept}. Free space "
        "(or fix the permissions) and rerun the same command to resume."
    ) from None

  def _preempt(self, step: int, state, pre) -> None:
    """Save at `step`, then stop (the report says preempted)."""
    jax.block_until_ready(state)
    self.timer.t_end = time.perf_counter()
    if step > self.last:
      self._save(step, state)
    if self.mgr is not None:
      self.mgr.wait_until_finished()
    since = (None if pre.signal_time is None
             else time.perf_counter() - pre.signal_time)
    self.preempted = {"step": step, "signal": pre.signal_name,
                      "signal_to_saved_s": since}
    raise errors.Preempted(
        f"preempted ({pre.signal_name or 'SIGTERM'}): checkpoint saved at "
        f"step {step} of {self.task.total_steps}"
        + (f" in {self.mgr.directory}" if self.mgr is not None else "")
        + "; rerun the same command to resume.", step)

  def _close(self) -> None:
    try:
      self.log.write(wait=True)
    except Exception:  # pylint: disable=broad-except
      pass  # (the error being raised, if any, says more)
    self.writer.close()
    if self.mgr is not None:
      with _quiet_failures() as failed:
        try:
          self.mgr.close()
        except Exception as e:  # pylint: disable=broad-except
          failed.set()
          self._storage(e, self.mgr.directory, "a checkpoint")

  # -- evaluation and checkpoints ---------------------------------------------

  def _is_eval(self, step: int) -> bool:
    tr, spe = self.rc.train, self.task.steps_per_epoch
    if step == self.task.total_steps:
      return True
    if tr.eval_every_steps:
      return step % tr.eval_every_steps == 0
    return step % spe == 0 and (step // spe) % tr.eval_every_epochs == 0

  def _after_call(self, step: int, state) -> None:
    """Evaluation / checkpoint after the call that ended at `step`."""
    ck, spe = self.rc.checkpoint, self.task.steps_per_epoch
    if self._is_eval(step):
      jax.block_until_ready(state)
      self.log.close_group(step)
      self._write(wait=True)  # (no evaluation of a non-finite state)
      with self.timer.measure("eval"):
        ev = self.task.evaluate(state, self.consts)
      self.evals.append({"step": step, "epoch": step / spe, **ev})
      self.writer.write(step, ev, split="eval", epoch=step / spe)
      self._save(step, state, metrics=self.task.checkpoint_metrics(ev))
    elif (step % spe == 0 and ck.every_epochs
          and (step // spe) % ck.every_epochs == 0):
      self._save(step, state)
    elif ck.every_steps and step // ck.every_steps > self.last // (
        ck.every_steps):
      self._save(step, state)

  def _save(self, step: int, state, metrics=None) -> None:
    self.log.close_group(step)
    self._write(wait=True)  # the records up to `step` precede the save,
    self.last = step        # and a non-finite state is never saved
    if self.mgr is None:
      return
    spe = self.task.steps_per_epoch
    tree = self.task.checkpoint_tree(state)
    what = f"the step-{step} checkpoint"
    self._check_space(tree, what)
    with self.timer.measure("checkpoint"), _quiet_failures() as failed:
      try:
        self.mgr.save(step, tree,
                      data_state={"epoch": step // spe, "step": step % spe},
                      metrics=metrics, force=True)
      except Exception as e:  # pylint: disable=broad-except
        failed.set()
        self._storage(e, self.mgr.directory, what)
    self.good = step

  def _check_space(self, tree, what: str) -> None:
    """A save that cannot fit is one line before Orbax writes anything."""
    need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(tree))
    need = int(need * 1.05) + (256 << 10)  # + Orbax's metadata
    if jax.process_count() > 1:
      return  # (each process writes its shards; Orbax's error is the check)
    try:
      free = shutil.disk_usage(self.mgr.directory).free
    except OSError:
      return
    if free < need:
      kept = (f"; the last good checkpoint (step {self.good}) is intact"
              if self.good else "")
      raise errors.StorageError(
          f"cannot write {what} to {self.mgr.directory}: it needs ~"
          f"{_mb(need)} and {_mb(free)} are free (No space left on device)"
          f"{kept}. Free space and rerun the same command to resume.")


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


class _Flag:
  def __init__(self):
    self.is_set = False

  def set(self):
    self.is_set = True


@contextlib.contextmanager
def _quiet_failures():
  """What Orbax's writer threads print while a failing save unwinds
  (their error logs, asyncio's "Event loop is closed" tracebacks) is
  dropped when the block sets the flag -- the run's own one-line error
  says it -- and replayed otherwise."""
  flag, buf = _Flag(), io.StringIO()
  old = sys.stderr
  sys.stderr = buf
  try:
    with logs.quiet_absl("[process="):
      yield flag
  finally:
    sys.stderr = old
    if not flag.is_set and buf.getvalue():
      old.write(buf.getvalue())


def _report(task: Task, clock, timer, start, evals, info, memory, loop, *,
            finished: bool = True) -> Dict[str, Any]:
  rc = task.rc
  if is_main():
    reporting.plot(task.workdir, task.title())
  teachers = task.teacher_names()
  report = {
      "task": rc.task, "mode": rc.mode, "model": task.model_name(),
      "teacher": (teachers[0] if len(teachers) == 1 else teachers or None),
      "dataset": task.dataset_name(), "seed": int(rc.seed),
      "steps": int(task.total_steps),
      "epochs": task.total_steps / task.steps_per_epoch,
      "resumed_from_step": int(start),
      "batch_size": int(rc.train.batch_size),
      "parallel": rc.train.parallel,
      "num_devices": task.placement.num_devices,
      "num_processes": jax.process_count(),
      "steps_per_call": rc.train.steps_per_call,
      **task.summary(evals), **info, "wall_s": clock.elapsed(),
      **timer.summary(task.total_steps - start, task.units),
      "skipped_updates": loop.log.nonfinite.total,
      "mesh": dict(rc.train.mesh) or None, "memory": memory,
      "paper": dict(rc.report.paper), "notes": rc.report.notes,
      "finished": finished,
  }
  clock.tick("done")
  report["timings"] = clock.timings
  if is_main():
    metrics_io.write_json(os.path.join(task.workdir, "report.json"), report)
  return report


def read_report(workdir: str) -> Optional[Dict[str, Any]]:
  """A finished run's `report.json` (None when absent or unfinished)."""
  try:
    with open(os.path.join(workdir, "report.json")) as f:
      rep = json.load(f)
  except (OSError, ValueError):
    return None
  return rep if rep.get("finished") else None

