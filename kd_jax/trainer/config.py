"""The run's config, parsed and validated once into typed, frozen objects.

`parse(config)` turns an `ml_collections.ConfigDict` with the schema of
`configs/base.py` into a `RunConfig` (frozen dataclasses, one per section):
unknown keys are refused with the closest valid names, and every value is
checked (names, class counts, batch size vs devices, loss terms and their
hyperparameters) before any data is loaded or step compiled. Every error is
a `ConfigError` whose message starts with the config key. Nothing after this
step reads the `ConfigDict`.

`build_objective(loss)` is the one config -> `kd_jax.train.Objective`
function: logit terms name a loss of `kd_jax.losses` (`kd_jax.train.Term`),
feature/relation terms name a distiller (`kd_jax.distillers.term_from_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import ml_collections

from kd_jax import distillers as distillers_lib
from kd_jax import models as models_lib
from kd_jax.data import sources as sources_lib
from kd_jax.train import objectives as objectives_lib
from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer import optim

MODES = ("train", "distill", "seed_experiment")
PARALLEL = {"none": "single", "single": "single", "jit": "jit",
            "pmap": "pmap"}
SCHEDULES = ("constant", "step", "cosine")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """An invalid config value; the message starts with the config key."""

  def __init__(self, key: str, msg: str):
    super().__init__(f"config.{key}: {msg}")
    self.key = key


# ---------------------------------------------------------------------------
# The typed sections (defaults = configs/base.py's).


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = "mnist"
  data_dir: str = ""
  cache_dir: str = ""
  mock: bool = False
  mock_num_examples: int = 64
  train_subset: int = 0
  eval_subset: int = 0
  augment: bool = True
  teacher_view: str = "same"
  image_size: int = 224
  num_workers: int = 8
  on_device: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "mlp_student"
  num_classes: int = 10
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  name: str = ""
  num_classes: int = 10
  dtype: str = "float32"
  checkpoint: str = ""
  checkpoint_format: str = "orbax"
  precompute_logits: bool = False
  evaluate: bool = True
  # 'replicated' | 'fsdp' | 'tensor' | ((regex, spec), ...) (mesh runs).
  sharding: Any = "replicated"


@dataclasses.dataclass(frozen=True)
class LossConfig:
  ce_weight: float = 1.0
  warmup_epochs: float = 0.0
  label_smoothing: float = 0.0
  # ((label, ((key, value), ...)), ...) in config order.
  terms: Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...] = ()

  def term_dicts(self) -> Dict[str, Dict[str, Any]]:
    return {label: dict(items) for label, items in self.terms}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "sgd"
  learning_rate: float = 0.05
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 0.0
  schedule: str = "constant"
  decay_epochs: Tuple[int, ...] = (150, 180, 210)
  decay_factor: float = 0.1
  warmup_epochs: float = 0.0
  delta: float = 0.075  # DOT's momentum offset (`optimizer.name = 'dot'`)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 64
  eval_batch_size: int = 500
  num_epochs: int = 1
  num_steps: int = 0
  steps_per_call: int = 1
  eval_every_epochs: int = 1
  log_every_steps: int = 100
  parallel: str = "none"
  num_devices: int = 0
  progress_bar: bool = True
  pretrain_max_steps: int = 0
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
  mode: str
  seed: int
  debug: bool
  data: DataConfig
  model: ModelConfig
  teacher: TeacherConfig
  loss: LossConfig
  optimizer: OptimizerConfig
  train: TrainConfig
  checkpoint: CheckpointConfig
  report: ReportConfig
  config_json: str  # the config as given (written to `config.json`)

  @property
  def distill(self) -> bool:
    return self.mode == "distill"

  @property
  def parallel_mode(self) -> str:
    """`kd_jax.train.DataParallel` mode."""
    return PARALLEL[self.train.parallel]


_SECTIONS = {"data": DataConfig, "model": ModelConfig,
             "teacher": TeacherConfig, "loss": LossConfig,
             "optimizer": OptimizerConfig, "train": TrainConfig,
             "checkpoint": CheckpointConfig, "report": ReportConfig}
_TOP = ("mode", "seed", "debug", "debug_applied", "seed_experiment",
        *_SECTIONS)


def _unknown_key(key: str, valid) -> ConfigError:
  parent, _, leaf = key.rpartition(".")
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


def _plain(v):
  if isinstance(v, ml_collections.ConfigDict):
    return v.to_dict()
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


def section(config, name: str):
  cls = _SECTIONS[name]
  node = config.get(name, None)
  if node is None:
    return cls()
  fields = {f.name for f in dataclasses.fields(cls)}
  check_keys(node, fields, prefix=f"{name}.")
  kw = {k: _plain(node[k]) for k in node}
  if name == "loss":
    terms = kw.get("terms") or {}
    kw["terms"] = tuple((label, tuple((k, _plain(v)) for k, v in
                                      dict(terms[label]).items()))
                        for label in terms)
  elif name == "report":
    kw["paper"] = tuple(dict(kw.get("paper") or {}).items())
  elif name == "train":
    kw["mesh"] = tuple(dict(kw.get("mesh") or {}).items())
    kw["sharding_rules"] = parse_rules(kw.get("sharding_rules"))
  elif name == "teacher":
    sh = kw.get("sharding")
    kw["sharding"] = (sh or "replicated") if (sh is None or isinstance(
        sh, str)) else parse_rules(sh)
  elif name == "optimizer" and "decay_epochs" in kw:
    kw["decay_epochs"] = tuple(kw["decay_epochs"] or ())
  return cls(**kw)


# ---------------------------------------------------------------------------
# Debug shrinking (on the ConfigDict, before parsing).


def apply_debug(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` shrunk for smoke tests when `config.debug` is set.

  Tiny subsets of mock data (TFDS `mock_data`, unless `data.mock` was
  explicitly turned off with real data available), 2 train steps of batch 8,
  one scanned call, an eval on 16 examples, synchronous checkpoints, 32x32
  ImageNet crops, no progress bar. Returns `config` unchanged otherwise.
  """
  if not config.get("debug", False) or config.get("debug_applied", False):
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  c.debug_applied = True
  c.data.mock = c.data.get("mock", True) if c.data.data_dir else True
  if c.get("teacher") and c.teacher.checkpoint and not os.path.exists(
      c.teacher.checkpoint):
    c.teacher.checkpoint = ""  # the default teacher workdir is not there yet
  c.data.mock_num_examples = max(int(c.data.get("mock_num_examples", 64)), 32)
  c.data.train_subset = 32
  c.data.eval_subset = 16
  c.data.image_size = min(int(c.data.get("image_size", 32)), 32)
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.num_steps = 2
  c.train.steps_per_call = min(int(c.train.get("steps_per_call", 1)), 2)
  c.train.log_every_steps = 1
  c.train.pretrain_max_steps = 1
  c.train.progress_bar = False
  c.checkpoint.async_save = False
  if c.get("teacher"):
    c.teacher.evaluate = False
  if c.mode == "seed_experiment":
    c.seed_experiment.seeds = tuple(c.seed_experiment.seeds)[:1]
  return c


# ---------------------------------------------------------------------------
# The objective.


def build_objective(loss, *, num_data: Optional[int] = None,
                    dataset_labels=None, teacher_variables=None,
                    placeholders: bool = True) -> objectives_lib.Objective:
  """`config.loss` (a `LossConfig` or a mapping) -> `kd_jax.train.Objective`.

  Logit terms name a loss of `kd_jax.losses` (`name`, default the label);
  feature/relation terms name a distiller (`distiller`, see
  `kd_jax.distillers.term_from_config`), which may need run-time information:
  the training-set size and labels (CRD) and the teacher's variables (OFD).
  With `placeholders=True` (validation) dummies stand in for those. Errors
  are `ConfigError`s naming the key.
  """
  if not isinstance(loss, LossConfig):
    loss = section({"loss": loss}, "loss")
  terms = []
  for label, tc in loss.term_dicts().items():
    if distillers_lib.is_distiller_term(tc):
      terms.append(_distiller_term(label, tc, num_data, dataset_labels,
                                   teacher_variables, placeholders))
    else:
      terms.append(_logit_term(label, tc))
  try:
    return objectives_lib.Objective(
        ce_weight=float(loss.ce_weight), terms=tuple(terms),
        warmup_epochs=float(loss.warmup_epochs or 0),
        label_smoothing=float(loss.label_smoothing or 0.0))
  except (ValueError, TypeError) as e:
    raise ConfigError("loss", str(e)) from None


def _distiller_term(label, tc, num_data, dataset_labels, teacher_variables,
                    placeholders):
  try:
    return distillers_lib.term_from_config(
        label, tc, num_data=num_data, dataset_labels=dataset_labels,
        teacher_variables=teacher_variables, placeholders=placeholders)
  except (ValueError, TypeError) as e:
    msg, prefix = str(e), f"loss.terms.{label}: "
    raise ConfigError(f"loss.terms.{label}", msg[len(prefix):]
                      if msg.startswith(prefix) else msg) from None


def _logit_term(label, tc):
  tc = dict(tc)
  name = tc.pop("name", label)
  weight = tc.pop("weight", 1.0)
  warmup = tc.pop("warmup", True)
  try:
    return objectives_lib.Term(name, float(weight), label=label,
                               warmup=bool(warmup), **tc)
  except (ValueError, TypeError) as e:
    key = f"loss.terms.{label}" + (".name" if "unknown loss name" in str(e)
                                   else "")
    raise ConfigError(key, str(e)) from None


# ---------------------------------------------------------------------------
# Parsing + validation.


def parse(config: ml_collections.ConfigDict, *,
          check_paths: bool = True) -> RunConfig:
  """Validates `config` (a train / distill phase) into a `RunConfig`.

  Raises `ConfigError` (naming the key) before any data is loaded or step
  compiled. `check_paths=False` skips the checks of `teacher.checkpoint`
  (for phases whose teacher is trained later in the same experiment).
  """
  check_keys(config, _TOP)
  mode = config.get("mode", None)
  if mode not in MODES:
    raise ConfigError("mode", f"must be one of {MODES}; got {mode!r}.")
  if mode == "seed_experiment":
    raise ConfigError("mode", "a 'seed_experiment' config runs through "
                      "experiments.seed_experiment, not one phase.")
  sections = {name: section(config, name) for name in _SECTIONS}
  rc = RunConfig(mode=mode, seed=int(config.get("seed", 0)),
                 debug=bool(config.get("debug", False)),
                 config_json=config.to_json_best_effort(indent=2,
                                                        sort_keys=True),
                 **sections)
  _validate_data_model(rc)
  _validate_loss(rc)
  if rc.distill:
    _validate_teacher(rc, check_paths)
  _validate_optimizer(rc.optimizer)
  _validate_split_optimizer(rc)
  _validate_mesh(rc)
  _validate_train(rc)
  return rc


def num_devices(rc: RunConfig) -> int:
  mode = rc.parallel_mode
  if mode == "single":
    return 1
  if rc.train.mesh:
    sizes = [int(v) for _, v in rc.train.mesh]
    return math.prod(sizes) if min(sizes) > 0 else len(jax.devices())
  avail = len(jax.local_devices()) if mode == "pmap" else len(jax.devices())
  return rc.train.num_devices if rc.train.num_devices > 0 else avail


def augments(rc: RunConfig) -> bool:
  info = sources_lib.dataset_info(rc.data.name)
  return bool(rc.data.augment) and bool(info.crop_padding or info.flip)


def _validate_data_model(rc: RunConfig) -> None:
  try:
    info = sources_lib.dataset_info(rc.data.name)
  except ValueError as e:
    raise ConfigError("data.name", str(e)) from None
  avail = models_lib.available_models()
  if rc.model.name not in avail:
    raise ConfigError("model.name", f"unknown model name {rc.model.name!r}; "
                      f"valid names: {', '.join(avail)}.")
  nc = rc.model.num_classes
  if not isinstance(nc, int) or nc < 1:
    raise ConfigError("model.num_classes",
                      f"must be a positive int; got {nc!r}.")
  if nc != info.num_classes:
    raise ConfigError(
        "model.num_classes", f"{nc} does not match dataset {rc.data.name!r} "
        f"({info.num_classes} classes).")
  dtypes = [("model.dtype", rc.model.dtype)]
  if rc.distill:
    dtypes.append(("teacher.dtype", rc.teacher.dtype))
  for key, v in dtypes:
    if v not in DTYPES:
      raise ConfigError(key, f"must be one of {DTYPES}; got {v!r}.")
  if not info.in_memory and not rc.data.augment:
    raise ConfigError("data.augment", f"dataset {rc.data.name!r} is streamed "
                      "with its standard crops; data.augment=False is only "
                      "supported for in-memory datasets.")
  if rc.data.teacher_view not in ("same", "separate"):
    raise ConfigError("data.teacher_view", "must be 'same' or 'separate'; got "
                      f"{rc.data.teacher_view!r}.")


def _validate_loss(rc: RunConfig) -> None:
  objective = build_objective(rc.loss)
  if rc.mode == "train" and objective.terms:
    raise ConfigError(
        "loss.terms", f"mode 'train' is supervised training; got KD terms "
        f"{[t.label for t in objective.terms]} (use mode 'distill').")
  if not rc.distill:
    return
  if not objective.terms:
    raise ConfigError("loss.terms", "mode 'distill' needs at least one KD "
                      "term (e.g. {'kd': {'weight': 0.9, 'temperature': 4}}).")
  if objective.distiller_terms and (rc.teacher.precompute_logits
                                    or rc.data.teacher_view == "separate"):
    raise ConfigError(
        "loss.terms", "feature/relation distiller terms need the teacher's "
        "features every step: incompatible with "
        "teacher.precompute_logits / data.teacher_view='separate'.")


def _validate_teacher(rc: RunConfig, check_paths: bool) -> None:
  t = rc.teacher
  avail = models_lib.available_models()
  if t.name not in avail:
    raise ConfigError("teacher.name", f"unknown model name {t.name!r}; valid "
                      f"names: {', '.join(avail)}.")
  if t.num_classes != rc.model.num_classes:
    raise ConfigError(
        "teacher.num_classes", f"teacher has {t.num_classes!r} classes but the "
        f"student (model.num_classes) has {rc.model.num_classes}; they must "
        "match.")
  if t.checkpoint_format not in ("orbax", "torch"):
    raise ConfigError("teacher.checkpoint_format",
                      f"must be 'orbax' or 'torch'; got {t.checkpoint_format!r}.")
  if check_paths and not t.checkpoint and not rc.debug:
    raise ConfigError(
        "teacher.checkpoint", "distillation needs a trained teacher: the "
        "workdir of a teacher-training run (mode 'train') or a converted "
        "checkpoint. (Only debug runs may use a randomly initialized "
        "teacher.)")
  if check_paths and t.checkpoint and not os.path.exists(t.checkpoint):
    raise ConfigError("teacher.checkpoint",
                      f"path {t.checkpoint!r} does not exist.")
  if t.precompute_logits:
    if augments(rc):
      raise ConfigError(
          "teacher.precompute_logits", "precomputed teacher logits are "
          f"exact only without augmentation; dataset {rc.data.name!r} is "
          "augmented (set data.augment=False or precompute_logits=False).")
    if rc.data.teacher_view == "separate":
      raise ConfigError("teacher.precompute_logits",
                        "incompatible with data.teacher_view='separate'.")


def _validate_optimizer(opt: OptimizerConfig) -> None:
  names = tuple(optim.OPTIMIZERS)
  if opt.name not in names:
    raise ConfigError("optimizer.name", f"must be one of {names}; got "
                      f"{opt.name!r}.")
  if opt.schedule not in SCHEDULES:
    raise ConfigError("optimizer.schedule", f"must be one of {SCHEDULES}; "
                      f"got {opt.schedule!r}.")
  if not opt.learning_rate > 0:
    raise ConfigError("optimizer.learning_rate",
                      f"must be > 0; got {opt.learning_rate!r}.")


def _validate_split_optimizer(rc: RunConfig) -> None:
  """Optimizers taking `{'task', 'distill'}` gradients (DOT) need a distill
  run whose gradients can be split."""
  opt = rc.optimizer
  if not optim.split_gradients(opt):
    return
  if not rc.distill:
    raise ConfigError("optimizer.name", f"{opt.name!r} takes separate task "
                      "and distillation gradients: it needs mode 'distill' "
                      f"(got {rc.mode!r}); use 'sgd' for supervised runs.")
  if not (0 <= opt.delta <= opt.momentum and opt.momentum + opt.delta < 1):
    raise ConfigError("optimizer.delta", f"must satisfy 0 <= delta <= momentum "
                      f"and momentum + delta < 1; got delta={opt.delta!r}, "
                      f"momentum={opt.momentum!r}.")


def _validate_mesh(rc: RunConfig) -> None:
  """`train.mesh` / `train.sharding_rules` / `teacher.sharding`: the checks
  that need no model (the engine's `make_mesh` / `teacher_rules`); rules
  naming no parameter are checked when the run builds its mesh."""
  tr = rc.train
  if not tr.mesh:
    if tr.sharding_rules:
      raise ConfigError("train.sharding_rules", "needs train.mesh (a device "
                        "mesh, train.parallel='jit').")
    if rc.distill and rc.teacher.sharding != "replicated":
      raise ConfigError("teacher.sharding", f"{rc.teacher.sharding!r} needs "
                        "train.mesh (a device mesh, train.parallel='jit').")
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
  if rc.distill:
    try:
      sharding_lib.teacher_rules(rc.teacher.sharding)
    except ValueError as e:
      raise ConfigError("teacher.sharding", str(e)) from None
  div = mesh.shape["data"] * mesh.shape["fsdp"]
  for key in ("batch_size", "eval_batch_size"):
    bs = getattr(tr, key)
    if isinstance(bs, int) and bs % div:
      raise ConfigError(
          f"train.{key}", f"{bs} is not divisible by data x fsdp = "
          f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {div} (train.mesh "
          f"{dict(tr.mesh)}); use a multiple of {div}.")


def _validate_train(rc: RunConfig) -> None:
  tr = rc.train
  if tr.parallel not in PARALLEL:
    raise ConfigError("train.parallel", f"must be one of "
                      f"{tuple(k for k in PARALLEL if k != 'single')}; got "
                      f"{tr.parallel!r}.")
  if rc.parallel_mode == "single" and jax.process_count() > 1:
    raise ConfigError("train.parallel", f"{tr.parallel!r} runs on one device "
                      f"of one process and cannot span {jax.process_count()} "
                      "processes; use --config.train.parallel=jit.")
  ndev = num_devices(rc)
  avail = (len(jax.local_devices()) if rc.parallel_mode == "pmap"
           else len(jax.devices()))
  if ndev > avail:
    raise ConfigError("train.num_devices", f"{ndev} devices requested but "
                      f"only {avail} are available.")
  for key in ("batch_size", "eval_batch_size"):
    bs = getattr(tr, key)
    if not isinstance(bs, int) or bs < 1:
      raise ConfigError(f"train.{key}", f"must be a positive int; got {bs!r}.")
    if not tr.mesh and bs % (ndev * jax.process_count()):  # (mesh: above)
      raise ConfigError(
          f"train.{key}", f"{bs} is not divisible by the number of devices "
          f"{ndev} (train.parallel={tr.parallel!r}, {jax.process_count()} "
          f"process(es)); use a multiple of {ndev * jax.process_count()}.")
  spc = tr.steps_per_call
  if not isinstance(spc, int) or spc < 1:
    raise ConfigError("train.steps_per_call",
                      f"must be an int >= 1; got {spc!r}.")
  if not (tr.num_epochs and tr.num_epochs > 0) and not (
      tr.num_steps and tr.num_steps > 0):
    raise ConfigError("train.num_epochs", "one of train.num_epochs / "
                      "train.num_steps must be positive.")


def program_key(rc: RunConfig, extra: Mapping[str, Any]) -> str:
  """What the compiled programs of a run depend on (not the seed: it only
  enters through the state and the data)."""
  parts = {k: dataclasses.asdict(getattr(rc, k))
           for k in ("model", "loss", "optimizer")}
  parts["teacher"] = {k: v for k, v in dataclasses.asdict(rc.teacher).items()
                      if k != "checkpoint"}
  parts["data"] = {k: getattr(rc.data, k) for k in ("name", "augment",
                                                    "teacher_view")}
  parts["train"] = {k: getattr(rc.train, k) for k in
                    ("batch_size", "eval_batch_size", "parallel",
                     "num_devices", "mesh", "sharding_rules")}
  parts["mode"] = rc.mode
  parts["extra"] = dict(extra)
  return json.dumps(parts, sort_keys=True, default=str)
