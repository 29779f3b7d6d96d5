"""One run (train a network, or distill a student) from a config.

`train_and_evaluate(config, workdir)`:

1. `config.parse` validates the config once into a `RunConfig`;
2. `feeds.load_data` decodes the data (once, in memory for MNIST / CIFAR);
3. `programs.build_programs`: the step -- teacher forward, student
   forward/backward, loss, optimizer update, and the augmentation /
   normalization -- is one XLA program; with `steps_per_call > 1` a
   `lax.scan` runs that many steps per call, data-parallel over
   `train.parallel` (`'none'`, `'jit'` sharding or `'pmap'`);
4. the loop (`_train_loop`): every `eval_every_epochs` the student is
   evaluated; metrics go to `metrics.jsonl` + TensorBoard, a tqdm bar shows
   steps and examples/s, `curves.png` is drawn at the end;
5. Orbax checkpoints hold the whole train state; a restarted run with the
   same workdir resumes from the newest checkpoint that restores ("resumed
   from step N of M") and ends bit-identical to an uninterrupted run, with
   the same `metrics.jsonl` records: train records are written at steps that
   depend only on the step (epoch ends, multiples of `log_every_steps`,
   checkpoint steps).

In multi-process runs every process runs this; only process 0 writes
`config.json`, `metrics.jsonl`, TensorBoard events, `curves.png` and
`report.json` (checkpoints are written by Orbax's multi-process protocol).

The run's summary (`report.json`, also returned) has the last-epoch and
best-epoch eval accuracy, wall time, and train throughput.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

import jax
import ml_collections
import numpy as np

from kd_jax import metrics_io
from kd_jax.data import sources as sources_lib
from kd_jax.train import parallel as parallel_lib
from kd_jax.trainer import checkpointing
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import feeds as feeds_lib
from kd_jax.trainer import mesh as mesh_lib
from kd_jax.trainer import programs as programs_lib


# ---------------------------------------------------------------------------
# Small helpers: timing, progress, logging.


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

  def summary(self, trained: int, batch_size: int) -> Dict[str, Any]:
    train_s = (self.t_end - self.t_loop - self.eval_s) if trained else 0.0
    steady_steps = trained - self.first_steps
    steady_s = (self.t_end - self.t_first_end - self._overhead
                if self.t_first_end is not None else 0.0)
    return {
        "train_s": train_s, "eval_s": self.eval_s,
        "checkpoint_s": self.ckpt_s, "first_call_s": self.first_call_s,
        "examples_per_sec": (trained * batch_size / train_s if train_s
                             else None),
        "steady_examples_per_sec": (steady_steps * batch_size / steady_s
                                    if steady_steps > 0 and steady_s > 0
                                    else None)}


class _Progress:
  """tqdm bar (or nothing) with examples/s."""

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

  def __init__(self, writer, dp, schedule, steps_per_epoch: int,
               log_every: int):
    self.writer, self.dp, self.schedule = writer, dp, schedule
    self.spe, self.log_every = steps_per_epoch, max(int(log_every), 1)
    self._open: List = []
    self._closed: List = []

  def add(self, n: int, metrics, step: int) -> None:
    self._open.append((n, metrics))
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
      for n, m in chunks:
        for k, v in self.dp.fetch(m).items():
          v = np.asarray(v, np.float64)
          agg[k] = agg.get(k, 0.0) + float(v.sum() if v.ndim else v * n)
        tot += n
      rec = {k: v / tot for k, v in agg.items()}
      rec["lr"] = float(self.schedule(max(step - 1, 0)))
      self.writer.write(step, rec, split="train", epoch=step / self.spe)


def _weighted_eval(metrics_list: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
  tot = sum(float(m["count"]) for m in metrics_list)
  out = {k: sum(float(m[k]) * float(m["count"]) for m in metrics_list)
            / max(tot, 1.0) for k in ("loss", "top1", "top5")}
  out["count"] = tot
  return out


def evaluate(run: "Run", fn, variables_dev) -> Dict[str, float]:
  outs = [fn(variables_dev, run.dp.shard_batch(b))
          for b in run.spec.data.eval_batches()]
  return _weighted_eval([run.dp.fetch(o) for o in outs])


# ---------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Run:
  """Everything the loop of one run needs (built by `_prepare`)."""
  rc: config_lib.RunConfig
  workdir: str
  spec: programs_lib.ProgramSpec
  progs: programs_lib.Programs
  dp: parallel_lib.DataParallel
  schedule: Any
  total_steps: int
  on_device: bool
  rngs: Any
  is_main: bool
  memory: Optional[Dict[str, int]] = None  # mesh runs: bytes per device

  @property
  def spe(self) -> int:
    return self.spec.steps_per_epoch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dry_run: bool = False) -> Dict[str, Any]:
  """Runs one train / distill phase; returns (and writes) its report.

  Resumes from `<workdir>/checkpoints` when it holds a finalized checkpoint.

  `dry_run=True` does everything up to the first step -- validation, data
  loading, model/teacher/optimizer construction, building the step, eval
  and init programs -- and then traces them with `jax.eval_shape` on a real
  batch instead of compiling and running them: a cheap check that a config
  is consistent end to end. Returns `{'dry_run': True, 'metrics': {name:
  shape}, ...}` and writes nothing but `config.json`.
  """
  clock = Clock()
  rc = config_lib.parse(config_lib.apply_debug(config))
  is_main = jax.process_index() == 0
  prepare_workdir(workdir, rc.config_json if is_main else None)
  with contextlib.ExitStack() as stack:
    if rc.data.mock and not sources_lib.dataset_info(rc.data.name).in_memory:
      # Streaming pipelines read records lazily: keep the mock active.
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      stack.enter_context(tfds.testing.mock_data(
          num_examples=int(rc.data.mock_num_examples)))
      stack.enter_context(_without_mock_metadata_warning())
    data = feeds_lib.load_data(rc)
    stack.callback(data.close)
    clock.tick("data_loaded")
    run = _prepare(rc, workdir, data, dry_run=dry_run, is_main=is_main)
    if dry_run:
      out = programs_lib.dry_run(run.spec, run.progs, run.rngs,
                                 spc=rc.train.steps_per_call,
                                 total_steps=run.total_steps,
                                 on_device=run.on_device)
      clock.tick("traced")
      out["timings"] = clock.timings
      return out
    return _execute(run, clock)


class _MockMetadataFilter(logging.Filter):
  """Drops TFDS's "Variant folder ... has no dataset_info.json": mocked
  datasets have no prepared folder, by design."""

  def filter(self, record):
    return not str(record.msg).startswith("Variant folder %s has no")


@contextlib.contextmanager
def _without_mock_metadata_warning():
  log, filt = logging.getLogger("absl"), _MockMetadataFilter()
  log.addFilter(filt)
  try:
    yield
  finally:
    log.removeFilter(filt)


def prepare_workdir(workdir: str, config_json: Optional[str]) -> None:
  """Creates `workdir` (and writes `config.json` when given); a workdir that
  is a file or not writable is a `ConfigError`."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(
        "workdir", f"{workdir!r} is a file; give a directory.")
  try:
    os.makedirs(workdir, exist_ok=True)
    if config_json is not None:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_json)
    elif not os.access(workdir, os.W_OK):
      raise PermissionError(workdir)
  except OSError as e:
    raise config_lib.ConfigError(
        "workdir", f"cannot write to {workdir!r} ({e.strerror or e}).") from None


def _make_dp(rc: config_lib.RunConfig) -> parallel_lib.DataParallel:
  mode, n = rc.parallel_mode, rc.train.num_devices
  devices = None
  if n and mode != "single":
    devices = (jax.local_devices() if mode == "pmap" else jax.devices())[:n]
  return parallel_lib.DataParallel(mode, devices=devices)


def _prepare(rc, workdir, data, *, dry_run: bool, is_main: bool) -> Run:
  """Models, teacher, objective, optimizer and programs of a run."""
  spe = data.train.steps_per_epoch
  total_steps = (int(rc.train.num_steps) if rc.train.num_steps
                 else int(rc.train.num_epochs) * spe)
  student, teacher = programs_lib.create_models(rc)
  dp = (mesh_lib.make_parallel(rc, student, teacher, data.image_shape)
        or _make_dp(rc))
  init_rng, state_rng, teacher_rng = jax.random.split(
      jax.random.key(int(rc.seed)), 3)
  tx, schedule = programs_lib.make_optimizer(
      rc.optimizer, steps_per_epoch=spe, total_steps=total_steps)
  # A dry run without a checkpoint has abstract teacher variables: OFD then
  # estimates its margins from data instead of the teacher's BN parameters.
  abstract_teacher = dry_run and not rc.teacher.checkpoint
  teacher_vars = None
  if rc.distill and isinstance(dp, mesh_lib.TrainerMesh):
    dp.teacher_target(jax.eval_shape(  # teacher.sharding errors, early
        lambda r: programs_lib.init_variables(teacher, r, data.image_shape),
        teacher_rng))
  if rc.distill:
    teacher_vars = programs_lib.teacher_variables(
        rc, teacher, data.image_shape, teacher_rng, dp,
        abstract=abstract_teacher)
  # Distiller terms get what only the run knows (CRD: the training-set size
  # and labels; OFD: the teacher's BN parameters).
  objective = config_lib.build_objective(
      rc.loss, num_data=data.train.num_examples,
      dataset_labels=data.train.labels,
      teacher_variables=None if abstract_teacher else teacher_vars,
      placeholders=abstract_teacher)
  # In-memory datasets are put on device once; the host then sends only the
  # example indices of each chunk and the gather runs inside the program.
  on_device = bool(rc.data.on_device) and isinstance(data.train,
                                                     feeds_lib.InMemoryFeed)
  spec = programs_lib.ProgramSpec(
      rc=rc, data=data, dp=dp, student=student, teacher=teacher,
      teacher_vars=teacher_vars, objective=objective, tx=tx,
      steps_per_epoch=spe, precompute=rc.distill and rc.teacher.precompute_logits,
      separate=rc.distill and rc.data.teacher_view == "separate",
      dry_run=dry_run)
  key = None
  if not objective.distiller_terms:
    # (Distillers' constants -- CRD labels, OFD margins -- depend on the data
    # and the teacher: their programs are not shared between runs.)
    key = config_lib.program_key(rc, {
        "spe": spe, "total": total_steps, "precompute": spec.precompute,
        "shape": data.image_shape, "pad": data.crop_padding,
        "flip": data.flip, "spc": rc.train.steps_per_call,
        "ndev": dp.num_devices, "on_device": on_device})
  progs = programs_lib.build_programs(spec, key)
  return Run(rc=rc, workdir=workdir, spec=spec, progs=progs, dp=dp,
             schedule=schedule, total_steps=total_steps, on_device=on_device,
             rngs=(init_rng, state_rng), is_main=is_main)


def _constants(run: Run, clock: Clock):
  """Replicated step constants (the teacher / its logits table, the
  device-resident dataset) and the teacher's eval accuracy."""
  consts, teacher_acc = {}, None
  data = run.spec.data
  if run.on_device:
    consts["data"] = run.dp.replicate({"image": data.train.images,
                                       "label": data.train.labels})
  if run.rc.distill:
    tv_dev = mesh_lib.place_teacher(run.dp, run.spec.teacher_vars)
    if run.rc.teacher.evaluate:
      teacher_acc = evaluate(run, run.progs.teacher_evaluate, tv_dev)["top1"]
    if run.spec.precompute:
      tv_dev = programs_lib.precompute_logits(run.spec, run.dp)
    consts["teacher"] = tv_dev
    clock.tick("teacher_ready")
  return consts, teacher_acc


def _resume(run: Run, mgr, state):
  """(state, start_step): the newest restorable checkpoint, if any."""
  if mgr is None:
    return state, 0
  key_impl = jax.random.key_impl(state.rng)
  on_mesh = isinstance(run.dp, mesh_lib.TrainerMesh)
  template = (mesh_lib.restore_template(run.dp, state) if on_mesh else
              checkpointing.state_to_tree(run.dp.fetch(state,
                                                       replicated=False)))
  restored = checkpointing.restore_newest(mgr, template)
  if restored is None:
    return state, 0
  tree = restored.state if on_mesh else jax.device_get(restored.state)
  state = checkpointing.tree_to_state(tree, key_impl)
  start = int(restored.step)
  if int(state.step) != start:
    raise checkpointing.CheckpointRestoreError(
        f"checkpoint step {start} in {mgr.directory} holds a state at step "
        f"{int(state.step)}.")
  if run.is_main:
    print(f"resumed from step {start} of {run.total_steps} "
          f"({mgr.directory})", flush=True)
  return state, start


def _execute(run: Run, clock: Clock) -> Dict[str, Any]:
  """Init, resume, pretrain stages, the loop and the report."""
  state = run.progs.init_state(*run.rngs)
  clock.tick("state_initialized")
  consts, teacher_acc = _constants(run, clock)
  mgr = checkpointing.open_manager(run.rc.checkpoint, run.workdir)
  try:
    state, start = _resume(run, mgr, state)
  except BaseException:
    if mgr is not None:
      mgr.close()
    raise
  writer = (metrics_io.MetricsWriter(run.workdir, tensorboard=True,
                                     resume_step=start if start else None)
            if run.is_main else NullWriter())
  pretrain = {}
  if run.spec.objective.distiller_terms and start == 0:
    state, pretrain = programs_lib.run_pretrain_stages(run.spec, state, writer)
    if pretrain:
      clock.tick("pretrain_done")
  evals = ([r for r in metrics_io.read_jsonl(writer.path)
            if r.get("split") == "eval"] if run.is_main else [])
  state_dev = mesh_lib.place_state(run.dp, state)
  del state
  if start < run.total_steps:
    fn, batch, _ = _next_batch(run, start)
    run.memory = mesh_lib.memory(run.dp, fn, state_dev, consts, batch)
  clock.tick("train_start")
  timer = LoopTimer()
  state_dev = _train_loop(run, state_dev, consts, start, writer, mgr, evals,
                          timer)
  clock.tick("train_end")
  return _report(run, clock, timer, start, evals, teacher_acc, pretrain,
                 state_dev)


@dataclasses.dataclass
class _Saver:
  run: Run
  mgr: Any
  timer: LoopTimer
  log: TrainLog
  last: int

  def __call__(self, step, state_dev, metrics=None):
    self.log.close_group(step)
    self.log.write(wait=True)  # the records up to `step` precede the save
    self.last = step
    if self.mgr is None:
      return
    with self.timer.measure("checkpoint"):
      if isinstance(self.run.dp, mesh_lib.TrainerMesh):
        tree = mesh_lib.state_tree(state_dev)  # each process its shards
      else:
        tree = checkpointing.state_to_tree(self.run.dp.fetch(state_dev))
      self.mgr.save(step, tree,
                    data_state={"epoch": step // self.run.spe,
                                "step": step % self.run.spe},
                    metrics=metrics, force=True)


def _next_batch(run: Run, step: int):
  """(fn, device batch, n steps) of the call starting at `step`."""
  in_epoch = step % run.spe
  n = min(run.rc.train.steps_per_call, run.spe - in_epoch,
          run.total_steps - step)
  feed = run.spec.data.train
  if n == 1 and run.rc.train.steps_per_call == 1:
    batch = feed.index_batch(step) if run.on_device else feed.batch(step)
    fn, stacked = run.progs.single, False
  else:
    batch = (feed.index_chunk(step, n) if run.on_device
             else feed.chunk(step, n))
    fn, stacked = run.progs.multi, True
  return fn, run.dp.shard_batch(batch, stacked=stacked), n


def _after_call(run: Run, step: int, state_dev, saver: _Saver, writer,
                evals) -> None:
  """Evaluation / checkpoint after the call that ended at `step`."""
  ck = run.rc.checkpoint
  if step % run.spe == 0 or step == run.total_steps:
    cur_epoch = math.ceil(step / run.spe)
    if (cur_epoch % max(int(run.rc.train.eval_every_epochs), 1) == 0
        or step == run.total_steps):
      jax.block_until_ready(state_dev)
      with saver.timer.measure("eval"):
        ev = evaluate(run, run.progs.evaluate, state_dev)
      evals.append({"step": step, "epoch": step / run.spe, **ev})
      saver.log.close_group(step)
      saver.log.write(wait=True)
      writer.write(step, ev, split="eval", epoch=step / run.spe)
      saver(step, state_dev, metrics={"accuracy": ev["top1"]})
    elif ck.every_epochs and cur_epoch % int(ck.every_epochs) == 0:
      saver(step, state_dev)
  elif ck.every_steps and step // ck.every_steps > saver.last // ck.every_steps:
    saver(step, state_dev)


def _train_loop(run: Run, state_dev, consts, start: int, writer, mgr, evals,
                timer: LoopTimer):
  bs = run.rc.train.batch_size
  progress = _Progress(bool(run.rc.train.progress_bar) and run.is_main,
                       run.total_steps,
                       start, f"{run.rc.mode} {run.rc.model.name}")
  log = TrainLog(writer, run.dp, run.schedule, run.spe,
                 run.rc.train.log_every_steps)
  saver = _Saver(run, mgr, timer, log, start)
  step = start
  try:
    while step < run.total_steps:
      fn, batch, n = _next_batch(run, step)
      state_dev, m = fn(state_dev, consts, batch)
      if timer.first_call_s is None:
        jax.block_until_ready(m)
        timer.first_call(n)
      step += n
      log.add(n, m, step)
      progress.update(n, ex_per_s=f"{(step - start) * bs / timer.train_elapsed():.0f}")
      _after_call(run, step, state_dev, saver, writer, evals)
      log.write()
    jax.block_until_ready(state_dev)
    timer.t_end = time.perf_counter()
    if step > saver.last:
      saver(step, state_dev)
  finally:
    progress.close()
    log.write(wait=True)
    writer.close()
    if mgr is not None:
      mgr.close()
  return state_dev


def _report(run: Run, clock: Clock, timer: LoopTimer, start: int, evals,
            teacher_acc, pretrain, state_dev) -> Dict[str, Any]:
  rc, workdir = run.rc, run.workdir
  final_state = run.dp.fetch(state_dev)
  if run.is_main:
    _plot(rc, workdir)
  last = evals[-1] if evals else None
  best = max(evals, key=lambda r: r["top1"]) if evals else None
  report = {
      "mode": rc.mode, "model": rc.model.name,
      "teacher": rc.teacher.name if rc.distill else None,
      "dataset": rc.data.name, "seed": int(rc.seed),
      "steps": int(run.total_steps), "epochs": run.total_steps / run.spe,
      "resumed_from_step": int(start), "batch_size": int(rc.train.batch_size),
      "parallel": rc.train.parallel, "num_devices": run.dp.num_devices,
      "num_processes": jax.process_count(),
      "steps_per_call": rc.train.steps_per_call,
      "last_top1": last["top1"] if last else None,
      "last_top5": last["top5"] if last else None,
      "last_loss": last["loss"] if last else None,
      "best_top1": best["top1"] if best else None,
      "best_epoch": best["epoch"] if best else None,
      "teacher_top1": teacher_acc, "wall_s": clock.elapsed(),
      **timer.summary(run.total_steps - start, rc.train.batch_size),
      "pretrain": pretrain or None,
      "mesh": dict(rc.train.mesh) or None, "memory": run.memory,
      "paper": dict(rc.report.paper), "notes": rc.report.notes,
      "convention": "last_top1: after the final epoch; best_top1: max over "
                    "evaluated epochs (test set)",
  }
  clock.tick("done")
  report["timings"] = clock.timings
  if run.is_main:
    metrics_io.write_json(os.path.join(workdir, "report.json"), report)
  report["_final_state"] = final_state
  return report


def _plot(rc: config_lib.RunConfig, workdir: str) -> None:
  records = metrics_io.read_jsonl(os.path.join(workdir,
                                               metrics_io.METRICS_FILE))
  title = (f"{rc.mode}: {rc.model.name}"
           + (f" <- {rc.teacher.name}" if rc.distill else ""))
  try:
    metrics_io.plot_curves(records, os.path.join(workdir, metrics_io.PLOT_FILE),
                           title=title)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("could not plot curves: %s", e)
