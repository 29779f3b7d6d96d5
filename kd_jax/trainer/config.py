"""The run's config, parsed and validated once into typed, frozen objects.

One schema for every task (`configs/base.py` documents every key):
``task`` (``'classify'``: image classification, the default; ``'lm'``:
language modelling), ``mode`` (``'train'`` | ``'distill'``; a
``'seed_experiment'`` runs through `experiments.seed_experiment`),
``seed``, ``debug`` and the sections ``data``, ``model``, ``teacher`` (or
several: ``teachers.<label>``), ``loss``, ``optimizer``, ``train``,
``checkpoint``, ``report`` -- plus a task's own (``generation`` for
``'lm'``). ``data``, ``model`` and the teachers hold the task's fields
(`kd_jax.trainer.classify_config`, `kd_jax.trainer.lm_config`); the rest is
shared.

`parse(config)` turns an `ml_collections.ConfigDict` into a `RunConfig`:
unknown keys are refused with the closest valid names (in every task), and
every value is checked -- names, ranges of every numeric hyperparameter,
loss terms against their losses' signatures and values, batch sizes vs
devices and meshes -- before any data is loaded or step compiled. Every
error is a `ConfigError` whose message starts with the config key. Nothing
after this step reads the `ConfigDict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import ml_collections

from kd_jax import distillers as distillers_lib
from kd_jax.train import optim as optim_lib
from kd_jax.train import placement as placement_lib
from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer import terms as terms_lib
from kd_jax.trainer.errors import ConfigError

MODES = ("train", "distill", "seed_experiment")
MULTI_TEACHER = ("mean_logits", "mean_losses")
OptimizerConfig = optim_lib.OptimizerSpec


# ---------------------------------------------------------------------------
# The shared sections (defaults = configs/base.py's).


@dataclasses.dataclass(frozen=True)
class LossConfig:
  ce_weight: float = 1.0
  warmup_epochs: float = 0.0
  label_smoothing: float = 0.0
  terms: Tuple[terms_lib.TermSpec, ...] = ()
  # Several teachers: distil from the weighted mean of their logits, or
  # average every term over them.
  multi_teacher: str = "mean_logits"
  # Language models: CE + the one divergence term from the hidden states
  # and the head kernels, `chunk_size` tokens at a time.
  fused_head: bool = False
  chunk_size: int = 1024


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 64
  eval_batch_size: int = 500
  num_epochs: int = 1
  num_steps: int = 0
  steps_per_call: int = 1
  eval_every_epochs: int = 1
  eval_every_steps: int = 0
  log_every_steps: int = 100
  parallel: str = "none"
  num_devices: int = 0
  progress_bar: bool = True
  pretrain_max_steps: int = 0
  # A NaN / inf loss or gradient: 'stop' (one line naming the step; the last
  # good checkpoint is kept) or 'skip_update' (optax's apply_if_finite; stop
  # after `max_consecutive_skips` in a row).
  on_nonfinite: str = "stop"
  max_consecutive_skips: int = 10
  # (('data', d), ('fsdp', f), ('tensor', t)): a device mesh (parallel 'jit').
  mesh: Tuple[Tuple[str, int], ...] = ()
  # ((regex, spec), ...): the student state's rules on the mesh.
  sharding_rules: Tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  enabled: bool = True
  every_steps: int = 0
  every_epochs: int = 1
  keep: int = 2
  keep_best: bool = True
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class ReportConfig:
  paper: Tuple[Tuple[str, Any], ...] = ()
  notes: str = ""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One train / distill phase, validated."""
  task: str
  mode: str
  seed: int
  debug: bool
  data: Any          # the task's data section
  model: Any         # the task's model section
  teachers: Tuple[Any, ...]  # the task's teacher sections (label, ...)
  loss: LossConfig
  optimizer: optim_lib.OptimizerSpec
  train: TrainConfig
  checkpoint: CheckpointConfig
  report: ReportConfig
  config_json: str   # the config as given (written to `config.json`)
  extra: Tuple[Tuple[str, Any], ...] = ()  # the task's own sections

  @property
  def distill(self) -> bool:
    return self.mode == "distill"

  @property
  def teacher(self):
    """The first teacher (None without one)."""
    return self.teachers[0] if self.teachers else None

  def section(self, name: str):
    """A task section (e.g. ``'generation'``)."""
    return dict(self.extra)[name]


@dataclasses.dataclass(frozen=True)
class TaskSchema:
  """What a task adds to the schema.

  data / model / teacher: its section dataclasses (a teacher section has a
    `label` field, set from its key).
  extra: its own sections `{name: dataclass}`.
  validate: `(rc, check_paths) -> rc` (may fill derived fields).
  debug: `(ConfigDict) -> None`, shrinks a debug run's task sections.
  top_keys: other top-level keys it accepts.
  scale: `(phase config dict, factor) -> dict`, a seed experiment's
    ``seed_experiment.scale`` (widths, steps, data).
  """
  data: type
  model: type
  teacher: type
  validate: Callable
  debug: Callable
  extra: Mapping[str, type] = dataclasses.field(default_factory=dict)
  top_keys: Tuple[str, ...] = ()
  scale: Optional[Callable] = None  # (phase dict, factor) -> phase dict


TASK_SCHEMAS: Dict[str, TaskSchema] = {}


def register_task(name: str, schema: TaskSchema) -> TaskSchema:
  TASK_SCHEMAS[name] = schema
  return schema


_COMMON = {"loss": LossConfig, "optimizer": optim_lib.OptimizerSpec,
           "train": TrainConfig, "checkpoint": CheckpointConfig,
           "report": ReportConfig}
_TOP = ("task", "mode", "seed", "debug", "debug_applied", "seed_experiment",
        "teacher", "teachers", "data", "model", *_COMMON)


# ---------------------------------------------------------------------------
# Sections.


def _unknown_key(key: str, valid) -> ConfigError:
  parent, _, leaf = key.rpartition(".")
  del parent
  close = (difflib.get_close_matches(leaf, list(valid), n=1, cutoff=0.6)
           or sorted(v for v in valid if v.startswith(leaf))[:1])
  hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
          else f"valid keys: {', '.join(sorted(valid))}.")
  return ConfigError(key, f"unknown key; {hint}")


def check_keys(node: Mapping[str, Any], valid, prefix: str = "") -> None:
  """`ConfigError` for a key of `node` not in `valid` (closest names)."""
  for k in node:
    if k not in valid:
      raise _unknown_key(prefix + k, valid)


def plain(v):
  """A ConfigDict / list value as plain Python (dicts, tuples)."""
  if isinstance(v, ml_collections.ConfigDict):
    return v.to_dict()
  if isinstance(v, ml_collections.FieldReference):
    return plain(v.get())
  if isinstance(v, list):
    return tuple(v)
  return v


def parse_rules(rules):
  """(regex, spec) rules -> tuples (specs: tuples of axis names / None)."""
  out = []
  for r in rules or ():
    if isinstance(r, (list, tuple)) and len(r) == 2:
      spec = r[1]
      r = (r[0], tuple(spec) if isinstance(spec, (list, tuple)) else spec)
    out.append(r)
  return tuple(out)


def _convert(name: str, value):
  """Field-specific conversions of plain values."""
  if name in ("mesh", "paper"):
    return tuple(dict(value or {}).items())
  if name == "sharding_rules":
    return parse_rules(value)
  if name == "sharding":
    return (value or "replicated") if value is None or isinstance(
        value, str) else parse_rules(value)
  if name == "overrides":
    return dict(value or {})
  if isinstance(value, list):
    return tuple(value)
  return value


def section(cls, node, prefix: str, **fixed):
  """A section dataclass from a config node (None: the defaults)."""
  fields = {f.name for f in dataclasses.fields(cls)} - set(fixed)
  if node is None:
    return cls(**fixed)
  if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(prefix.rstrip("."), f"must be a section (mapping); got "
                      f"{node!r}.")
  check_keys(node, fields, prefix=prefix)
  kw = {k: _convert(k, plain(node[k])) for k in node}
  if cls is LossConfig and "terms" in kw:
    kw["terms"] = terms_lib.parse_terms(node["terms"])
  try:
    return cls(**kw, **fixed)
  except TypeError as e:
    raise ConfigError(prefix.rstrip("."), str(e)) from None


def _teachers(config, schema: TaskSchema) -> Tuple[Any, ...]:
  one, several = config.get("teacher", None), config.get("teachers", None)
  if one is not None and several is not None and len(several):
    raise ConfigError("teachers", "give `teacher` (one) or `teachers.<label>` "
                      "(several), not both.")
  if several is not None and len(several):
    return tuple(section(schema.teacher, several[label],
                         f"teachers.{label}.", label=str(label))
                 for label in several)
  if one is None:
    return ()
  return (section(schema.teacher, one, "teacher.", label="teacher"),)


# ---------------------------------------------------------------------------
# Parsing.


def task_schema(config) -> Tuple[str, TaskSchema]:
  task = config.get("task", "classify") or "classify"
  if task not in TASK_SCHEMAS:
    raise ConfigError("task", f"must be one of {tuple(TASK_SCHEMAS)}; got "
                      f"{task!r}.")
  return task, TASK_SCHEMAS[task]


def parse(config: ml_collections.ConfigDict, *,
          check_paths: bool = True) -> RunConfig:
  """Validates `config` (a train / distill phase) into a `RunConfig`.

  Raises `ConfigError` (naming the key) before any data is loaded or step
  compiled. `check_paths=False` skips the checks of teacher checkpoints
  (for phases whose teacher is trained later in the same experiment).
  """
  task, schema = task_schema(config)
  check_keys(config, _TOP + tuple(schema.extra) + schema.top_keys)
  mode = config.get("mode", None)
  if mode not in MODES:
    raise ConfigError("mode", f"must be one of {MODES}; got {mode!r}.")
  if mode == "seed_experiment":
    raise ConfigError("mode", "a 'seed_experiment' config runs through "
                      "experiments.seed_experiment, not one phase.")
  common = {name: section(cls, config.get(name, None), f"{name}.")
            for name, cls in _COMMON.items()}
  extra = tuple((name, section(cls, config.get(name, None), f"{name}."))
                for name, cls in schema.extra.items())
  rc = RunConfig(
      task=task, mode=mode, seed=int(config.get("seed", 0)),
      debug=bool(config.get("debug", False)),
      data=section(schema.data, config.get("data", None), "data."),
      model=section(schema.model, config.get("model", None), "model."),
      teachers=_teachers(config, schema) if mode == "distill" else (),
      config_json=config.to_json_best_effort(indent=2, sort_keys=True),
      extra=extra, **common)
  _validate_optimizer(rc)
  _validate_train(rc)
  _validate_checkpoint(rc.checkpoint)
  _validate_loss(rc)
  _validate_mesh(rc)
  return schema.validate(rc, check_paths)


def apply_debug(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` shrunk for smoke tests when `config.debug` is set.

  2 train steps of batch 8, one scanned call, small evaluations,
  synchronous checkpoints, no progress bar, no teacher evaluation, plus the
  task's own shrinking (image tasks: TFDS `mock_data` unless real data was
  given, tiny subsets, 32x32 crops; language models: a few sequences).
  Returns `config` unchanged otherwise.
  """
  if not config.get("debug", False) or config.get("debug_applied", False):
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  c.debug_applied = True
  for sec in ("train", "checkpoint"):
    if sec not in c:
      c[sec] = ml_collections.ConfigDict()
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_steps = 2
  c.train.steps_per_call = min(int(c.train.get("steps_per_call", 1)), 2)
  c.train.log_every_steps = 1
  c.train.pretrain_max_steps = 1
  c.train.progress_bar = False
  c.checkpoint.async_save = False
  for t in _teacher_nodes(c):
    t.evaluate = False
  if c.get("mode", None) == "seed_experiment":
    c.seed_experiment.seeds = tuple(c.seed_experiment.seeds)[:1]
  task_schema(c)[1].debug(c)
  return c


def _teacher_nodes(c):
  if c.get("teacher", None) is not None:
    yield c.teacher
  for label in (c.get("teachers", None) or {}):
    yield c.teachers[label]


# ---------------------------------------------------------------------------
# Checks of the shared sections.


def _check(key: str, value, ok: bool, want: str) -> None:
  if not ok:
    raise ConfigError(key, f"must be {want}; got {value!r}.")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and (
      math.isfinite(v))


def _validate_optimizer(rc: RunConfig) -> None:
  o = rc.optimizer
  names = tuple(optim_lib.OPTIMIZERS)
  _check("optimizer.name", o.name, o.name in names, f"one of {names}")
  _check("optimizer.schedule", o.schedule, o.schedule in optim_lib.SCHEDULES,
         f"one of {optim_lib.SCHEDULES}")
  _check("optimizer.learning_rate", o.learning_rate,
         _is_num(o.learning_rate) and o.learning_rate > 0, "> 0")
  _check("optimizer.momentum", o.momentum,
         _is_num(o.momentum) and 0 <= o.momentum < 1, "in [0, 1)")
  for key in ("weight_decay", "warmup_epochs", "grad_clip"):
    v = getattr(o, key)
    _check(f"optimizer.{key}", v, _is_num(v) and v >= 0, ">= 0")
  _check("optimizer.warmup_steps", o.warmup_steps,
         _is_int(o.warmup_steps) and o.warmup_steps >= 0, "an int >= 0")
  _check("optimizer.decay_factor", o.decay_factor,
         _is_num(o.decay_factor) and o.decay_factor > 0, "> 0")
  if optim_lib.split_gradients(o):
    if not rc.distill:
      raise ConfigError("optimizer.name", f"{o.name!r} takes separate task "
                        "and distillation gradients: it needs mode 'distill' "
                        f"(got {rc.mode!r}); use 'sgd' for supervised runs.")
    if not (0 <= o.delta <= o.momentum and o.momentum + o.delta < 1):
      raise ConfigError("optimizer.delta", f"must satisfy 0 <= delta <= "
                        f"momentum and momentum + delta < 1; got "
                        f"delta={o.delta!r}, momentum={o.momentum!r}.")


def num_devices(rc: RunConfig) -> int:
  """Devices of the run's placement."""
  tr = rc.train
  if tr.parallel in ("none", "single"):
    return 1
  if tr.mesh:
    sizes = [int(v) for _, v in tr.mesh]
    return math.prod(sizes) if min(sizes) > 0 else len(jax.devices())
  avail = (len(jax.local_devices()) if tr.parallel == "pmap"
           else len(jax.devices()))
  return tr.num_devices if tr.num_devices > 0 else avail


def _validate_train(rc: RunConfig) -> None:
  tr = rc.train
  _check("train.parallel", tr.parallel, tr.parallel in
         placement_lib.PARALLEL, f"one of {placement_lib.PARALLEL}")
  if tr.parallel in ("none", "single") and jax.process_count() > 1:
    raise ConfigError("train.parallel", f"{tr.parallel!r} runs on one device "
                      f"of one process and cannot span {jax.process_count()} "
                      "processes; use --config.train.parallel=jit.")
  for key in ("num_epochs", "num_steps", "eval_every_steps", "num_devices",
              "pretrain_max_steps"):
    v = getattr(tr, key)
    _check(f"train.{key}", v, _is_int(v) and v >= 0, "an int >= 0")
  _check("train.on_nonfinite", tr.on_nonfinite,
         tr.on_nonfinite in ("stop", "skip_update"),
         "'stop' or 'skip_update'")
  for key in ("batch_size", "eval_batch_size", "steps_per_call",
              "eval_every_epochs", "log_every_steps", "max_consecutive_skips"):
    v = getattr(tr, key)
    _check(f"train.{key}", v, _is_int(v) and v >= 1, "an int >= 1")
  if not tr.num_epochs and not tr.num_steps:
    raise ConfigError("train.num_epochs", "one of train.num_epochs / "
                      "train.num_steps must be positive.")
  ndev = num_devices(rc)
  avail = (len(jax.local_devices()) if tr.parallel == "pmap"
           else len(jax.devices()))
  if ndev > avail:
    raise ConfigError("train.num_devices", f"{ndev} devices requested but "
                      f"only {avail} are available.")
  if not tr.mesh:
    div = ndev * (jax.process_count() if tr.parallel == "pmap" else 1)
    div = math.lcm(div, jax.process_count())
    for key in ("batch_size", "eval_batch_size"):
      bs = getattr(tr, key)
      if bs % div:
        raise ConfigError(
            f"train.{key}", f"{bs} is not divisible by the number of devices "
            f"{ndev} (train.parallel={tr.parallel!r}, {jax.process_count()} "
            f"process(es)); use a multiple of {div}.")


def _validate_checkpoint(ck: CheckpointConfig) -> None:
  _check("checkpoint.keep", ck.keep, _is_int(ck.keep) and ck.keep >= 1,
         "an int >= 1")
  for key in ("every_steps", "every_epochs"):
    v = getattr(ck, key)
    _check(f"checkpoint.{key}", v, _is_int(v) and v >= 0, "an int >= 0")


def _validate_loss(rc: RunConfig) -> None:
  lo = rc.loss
  _check("loss.ce_weight", lo.ce_weight, _is_num(lo.ce_weight)
         and lo.ce_weight >= 0, ">= 0")
  _check("loss.warmup_epochs", lo.warmup_epochs, _is_num(lo.warmup_epochs)
         and lo.warmup_epochs >= 0, ">= 0")
  _check("loss.label_smoothing", lo.label_smoothing,
         _is_num(lo.label_smoothing) and 0 <= lo.label_smoothing < 1,
         "in [0, 1)")
  _check("loss.multi_teacher", lo.multi_teacher,
         lo.multi_teacher in MULTI_TEACHER, f"one of {MULTI_TEACHER}")
  _check("loss.chunk_size", lo.chunk_size, _is_int(lo.chunk_size)
         and lo.chunk_size >= 1, "an int >= 1")
  need = [t.label for t in lo.terms if not terms_lib.teacher_free(t)]
  if rc.mode == "train" and need:
    raise ConfigError(
        "loss.terms", f"mode 'train' is supervised training (or "
        f"self-distillation with teacher-free distillers: "
        f"{', '.join(_teacher_free_methods())}); got KD terms {need} that "
        "need a teacher (use mode 'distill').")
  if rc.distill and not rc.teachers:
    raise ConfigError("teacher", "mode 'distill' needs a teacher section "
                      "(`teacher`, or `teachers.<label>` for several).")
  weights = [getattr(t, "weight", 1.0) for t in rc.teachers]
  for t, w in zip(rc.teachers, weights):
    key = "teacher" if len(rc.teachers) == 1 else f"teachers.{t.label}"
    _check(f"{key}.weight", w, _is_num(w) and w >= 0, ">= 0")
  if rc.teachers and not sum(weights) > 0:
    raise ConfigError("teachers", "the teachers' weights must have a positive "
                      "sum.")


def _teacher_free_methods():
  reg = distillers_lib.registry()
  return sorted(n for n, cls in reg.items()
                if not getattr(cls, "needs_teacher", True))


def _validate_mesh(rc: RunConfig) -> None:
  """`train.mesh` / `train.sharding_rules` / the teachers' `sharding`: the
  checks that need no model; rules naming no parameter are checked when the
  run places its state."""
  tr = rc.train
  if not tr.mesh:
    if tr.sharding_rules:
      raise ConfigError("train.sharding_rules", "needs train.mesh (a device "
                        "mesh, train.parallel='jit').")
    for t in rc.teachers:
      if t.sharding != "replicated" and tr.parallel != "jit":
        raise ConfigError(_teacher_key(rc, t, "sharding"),
                          f"{t.sharding!r} needs a device mesh "
                          "(train.parallel='jit' / train.mesh).")
    return
  if tr.parallel != "jit":
    raise ConfigError("train.mesh", "a device mesh needs train.parallel="
                      f"'jit'; got {tr.parallel!r}.")
  if tr.num_devices:
    raise ConfigError("train.num_devices", "give either train.num_devices or "
                      "train.mesh (its product is the device count).")
  try:
    mesh = sharding_lib.make_mesh(dict(tr.mesh))
    sharding_lib.state_rules(mesh, rules=tr.sharding_rules)
  except (TypeError, ValueError) as e:
    raise ConfigError("train.mesh" if not isinstance(e, TypeError) else
                      "train.sharding_rules", str(e)) from None
  for t in rc.teachers:
    try:
      sharding_lib.teacher_rules(t.sharding)
    except ValueError as e:
      raise ConfigError(_teacher_key(rc, t, "sharding"), str(e)) from None
  div = mesh.shape["data"] * mesh.shape["fsdp"]
  div = math.lcm(div, jax.process_count())
  procs = jax.process_count()
  where = f"train.mesh {dict(tr.mesh)}" + (f", {procs} processes"
                                           if procs > 1 else "")
  for key in ("batch_size", "eval_batch_size"):
    bs = getattr(tr, key)
    if bs % div:
      raise ConfigError(
          f"train.{key}", f"{bs} is not divisible by data x fsdp = "
          f"{mesh.shape['data']} x {mesh.shape['fsdp']} ({where}); use a "
          f"multiple of {div}.")


def _teacher_key(rc: RunConfig, t, field: str) -> str:
  return (f"teacher.{field}" if len(rc.teachers) == 1
          else f"teachers.{t.label}.{field}")


def teacher_key(rc: RunConfig, t, field: str) -> str:
  """The config key of field `field` of teacher `t` (for error messages)."""
  return _teacher_key(rc, t, field)


def total_steps(rc: RunConfig, steps_per_epoch: int) -> int:
  return (int(rc.train.num_steps) if rc.train.num_steps
          else int(rc.train.num_epochs) * steps_per_epoch)


def check_positive_int(key: str, v) -> int:
  _check(key, v, _is_int(v) and v >= 1, "an int >= 1")
  return v


def check_number(key: str, v, lo: Optional[float] = None,
                 hi: Optional[float] = None, *, open_lo: bool = False) -> float:
  """`ConfigError` unless `v` is a finite number in the range."""
  ok = _is_num(v) and (lo is None or (v > lo if open_lo else v >= lo)) and (
      hi is None or v <= hi)
  want = " and ".join(w for w in (
      (f"> {lo:g}" if open_lo else f">= {lo:g}") if lo is not None else "",
      f"<= {hi:g}" if hi is not None else "") if w) or "a finite number"
  _check(key, v, ok, want)
  return float(v)


def build_objective(loss, *, run_info=None):
  """The `Objective` of a `config.loss` section (a `LossConfig`, a mapping
  or a `ConfigDict`): `terms.build_objective` after parsing it."""
  if not isinstance(loss, LossConfig):
    loss = section(LossConfig, loss, "loss.")
  return terms_lib.build_objective(loss, run_info=run_info)
