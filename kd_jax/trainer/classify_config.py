"""Image classification (``task = 'classify'``): its config sections.

``data`` (a TFDS image dataset, in memory or streamed), ``model`` and each
teacher (a network of the zoo, `kd_jax.models`); see `configs/base.py` for
the keys. `validate` checks them against the dataset and the zoo.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Tuple

from kd_jax import models as models_lib
from kd_jax.data import sources as sources_lib
from kd_jax.data import views as views_lib
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import terms as terms_lib
from kd_jax.trainer.errors import ConfigError

DTYPES = ("float32", "bfloat16")


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
  # Which `train_subset` examples: 'first' N, or 'random' (N drawn with the
  # run's seed; the same N for every phase of a seed).
  subset: str = "first"
  # 'dataset': (x / 255 - mean) / std with the dataset's statistics;
  # 'unit': x / 255.
  normalization: str = "dataset"
  # Per-model input views {'student': spec, 'teacher': spec}
  # (`kd_jax.data.views`: a name or {'name': ..., **arguments}; None: as is).
  views: Any = None
  # Random translation by up to `jitter` px (in-memory data; 0 = off).
  jitter: int = 0
  # Transfer sets without classes (Hinton et al. 2015, Section 3): the
  # training split minus `omit_classes`, or only `keep_classes`.
  omit_classes: Tuple[int, ...] = ()
  keep_classes: Tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  """Extra test-set results (`evaluation` section; off by default).

  `error_counts`: report the test errors as counts (`errors`, out of the
  test set's size, and `errors_on` for `bias_shift_classes`);
  `bias_shift_classes`: also choose the shift of these classes' output
  biases that minimizes the test errors (`kd_jax.train.bias_shift`; the
  paper's protocol, "to optimize test performance") over
  `bias_shift_grid` = (lowest, highest, step) and report it (`shift`,
  `errors_shifted`, `errors_on_shifted`).
  `validation_size` (0 = off): hold out this many examples of the training
  split (`kd_jax.data.split_validation`, stratified, seed 0: the same
  examples for every seed and phase; carved BEFORE `data.omit_classes` /
  `keep_classes`, so it holds the classes a transfer set lacks), train on
  the rest, and also choose the shift on that validation split (`shift_val`)
  and report the test errors with it (`errors_shifted_val`,
  `errors_on_shifted_val`): an honest choice next to the paper's.
  """
  error_counts: bool = False
  bias_shift_classes: Tuple[int, ...] = ()
  bias_shift_grid: Tuple[float, float, float] = (-15.0, 15.0, 0.1)
  validation_size: int = 0

  @property
  def active(self) -> bool:
    return bool(self.error_counts or self.bias_shift_classes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "mlp_student"
  num_classes: int = 10
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  label: str = "teacher"
  name: str = ""
  num_classes: int = 10
  dtype: str = "float32"
  checkpoint: str = ""
  checkpoint_format: str = "orbax"
  # Run the teacher once over the (un-augmented) training set instead of
  # every step.
  precompute: bool = False
  evaluate: bool = True
  weight: float = 1.0
  # 'replicated' | 'fsdp' | 'tensor' | ((regex, spec), ...) (mesh runs).
  sharding: Any = "replicated"


def same_class_pairs(rc) -> bool:
  """Whether the train batches carry a same-class partner per example
  (`image_pair`, `label_pair`, `pair_index`): a distiller term declares the
  `'pair'` view (CS-KD)."""
  return "pair" in terms_lib.term_views(rc.loss.terms)


def augments(rc) -> bool:
  """Whether training images are augmented (the dataset's standard crops /
  flips, or `data.jitter`)."""
  info = sources_lib.dataset_info(rc.data.name)
  return (bool(rc.data.augment) and bool(info.crop_padding or info.flip)
          ) or bool(rc.data.jitter)


def evaluation(rc) -> EvaluationConfig:
  """The run's `evaluation` section (defaults when absent)."""
  return dict(rc.extra).get("evaluation", EvaluationConfig())


def _check_model(key: str, name: str, num_classes, dtype, want_classes: int,
                 what: str) -> None:
  avail = models_lib.available_models()
  if name not in avail:
    raise ConfigError(f"{key}.name", f"unknown model name {name!r}; valid "
                      f"names: {', '.join(avail)}.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"{key}.num_classes",
                      f"must be a positive int; got {num_classes!r}.")
  if num_classes != want_classes:
    raise ConfigError(f"{key}.num_classes", (
        f"{num_classes} does not match {what} ({want_classes} classes)."
        if key == "model" else f"teacher has {num_classes} classes but "
        f"{what} has {want_classes}; they must match."))
  if dtype not in DTYPES:
    raise ConfigError(f"{key}.dtype", f"must be one of {DTYPES}; got "
                      f"{dtype!r}.")


def _validate_data(rc) -> None:
  d = rc.data
  try:
    info = sources_lib.dataset_info(d.name)
  except ValueError as e:
    raise ConfigError("data.name", str(e)) from None
  for key in ("mock_num_examples", "image_size"):
    config_lib.check_positive_int(f"data.{key}", getattr(d, key))
  for key in ("train_subset", "eval_subset", "num_workers"):
    v = getattr(d, key)
    if not isinstance(v, int) or v < 0:
      raise ConfigError(f"data.{key}", f"must be an int >= 0; got {v!r}.")
  if not info.in_memory and not d.augment:
    raise ConfigError("data.augment", f"dataset {d.name!r} is streamed "
                      "with its standard crops; data.augment=False is only "
                      "supported for in-memory datasets.")
  if d.teacher_view not in ("same", "separate"):
    raise ConfigError("data.teacher_view", "must be 'same' or 'separate'; got "
                      f"{d.teacher_view!r}.")
  _check_model("model", rc.model.name, rc.model.num_classes, rc.model.dtype,
               info.num_classes, f"dataset {d.name!r}")
  _validate_views(rc, info)
  _validate_hinton_data(rc, info)


def _validate_views(rc, info) -> None:
  """`data.subset`, `data.normalization`, `data.views` (each view built
  once: unknown names and bad arguments are one line here)."""
  d = rc.data
  if d.subset not in ("first", "random"):
    raise ConfigError("data.subset", f"must be 'first' or 'random'; got "
                      f"{d.subset!r}.")
  if d.normalization not in ("dataset", "unit"):
    raise ConfigError("data.normalization", "must be 'dataset' or 'unit'; "
                      f"got {d.normalization!r}.")
  views = d.views or {}
  if not isinstance(views, dict):
    raise ConfigError("data.views", "must be a section {'student': view, "
                      f"'teacher': view}}; got {views!r}.")
  for k, spec in views.items():
    if k not in ("student", "teacher"):
      raise ConfigError(f"data.views.{k}", "unknown key; valid keys: "
                        "student, teacher.")
    if spec is None:
      continue
    try:
      shape = views_lib.view_output_shape(
          spec, info.image_shape or (d.image_size, d.image_size, 3))
    except (ValueError, TypeError, KeyError) as e:
      raise ConfigError(f"data.views.{k}", str(e).strip("'\"")) from None
    if len(shape) != 3:
      raise ConfigError(f"data.views.{k}", f"must give [H, W, C] images; "
                        f"got {shape}.")
  if not any(v is not None for v in views.values()):
    return
  if not info.in_memory:
    raise ConfigError("data.views", "per-model views need an in-memory "
                      f"dataset (MNIST / CIFAR); {d.name!r} is streamed.")
  if d.teacher_view == "separate":
    raise ConfigError("data.views", "incompatible with data.teacher_view="
                      "'separate' (the views give the teacher its input).")


def _class_ids(key: str, v, num_classes: int) -> None:
  if not isinstance(v, tuple) or any(
      isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes
      for c in v) or len(set(v)) != len(v):
    raise ConfigError(key, f"must be distinct class ids in [0, {num_classes})"
                      f"; got {v!r}.")


def _validate_hinton_data(rc, info) -> None:
  """`data.jitter` / `omit_classes` / `keep_classes` and the `evaluation`
  section."""
  d = rc.data
  if isinstance(d.jitter, bool) or not isinstance(d.jitter, int) or (
      d.jitter < 0):
    raise ConfigError("data.jitter", f"must be an int >= 0; got {d.jitter!r}.")
  if d.jitter and not info.in_memory:
    raise ConfigError("data.jitter", f"dataset {d.name!r} is streamed; "
                      "jitter is for in-memory datasets (MNIST / CIFAR).")
  k = rc.model.num_classes
  _class_ids("data.omit_classes", d.omit_classes, k)
  _class_ids("data.keep_classes", d.keep_classes, k)
  if d.omit_classes and d.keep_classes:
    raise ConfigError("data.keep_classes", "give omit_classes or "
                      "keep_classes, not both.")
  if (d.omit_classes or d.keep_classes) and not info.in_memory:
    raise ConfigError("data.omit_classes" if d.omit_classes else
                      "data.keep_classes", f"dataset {d.name!r} is streamed; "
                      "class subsets are for in-memory datasets.")
  if len(d.omit_classes) >= k:
    raise ConfigError("data.omit_classes", "omits every class.")
  ev = evaluation(rc)
  _class_ids("evaluation.bias_shift_classes", ev.bias_shift_classes, k)
  g = ev.bias_shift_grid
  if not (isinstance(g, tuple) and len(g) == 3 and all(
      isinstance(x, (int, float)) and not isinstance(x, bool) for x in g)
          and g[0] <= 0 <= g[1] and g[2] > 0
          and (g[1] - g[0]) / g[2] <= 100_000):
    raise ConfigError("evaluation.bias_shift_grid", "must be (lowest <= 0, "
                      "highest >= 0, step > 0) with at most 100000 steps; got "
                      f"{g!r}.")
  vs = ev.validation_size
  if isinstance(vs, bool) or not isinstance(vs, int) or vs < 0:
    raise ConfigError("evaluation.validation_size", "must be an int >= 0 "
                      f"(0 = off); got {vs!r}.")
  if vs and not ev.bias_shift_classes:
    raise ConfigError("evaluation.validation_size", "needs "
                      "evaluation.bias_shift_classes (the shift it chooses).")
  if vs and not info.in_memory:
    raise ConfigError("evaluation.validation_size", f"dataset {d.name!r} is "
                      "streamed; a validation split is for in-memory datasets.")


def _validate_teacher(rc, t, check_paths: bool) -> None:
  key = (lambda f: config_lib.teacher_key(rc, t, f))  # noqa: E731
  _check_model(key("name").rsplit(".", 1)[0], t.name, t.num_classes, t.dtype,
               rc.model.num_classes, "the student (model.num_classes)")
  if t.checkpoint_format not in ("orbax", "torch"):
    raise ConfigError(key("checkpoint_format"), "must be 'orbax' or 'torch'; "
                      f"got {t.checkpoint_format!r}.")
  if check_paths and not t.checkpoint and not rc.debug:
    raise ConfigError(
        key("checkpoint"), "distillation needs a trained teacher: the "
        "workdir of a teacher-training run (mode 'train') or a converted "
        "checkpoint. (Only debug runs may use a randomly initialized "
        "teacher.)")
  if check_paths and t.checkpoint and not os.path.exists(t.checkpoint):
    raise ConfigError(key("checkpoint"),
                      f"path {t.checkpoint!r} does not exist.")
  if t.precompute:
    if augments(rc):
      raise ConfigError(
          key("precompute"), "precomputed teacher logits are exact only "
          f"without augmentation; dataset {rc.data.name!r} is augmented (set "
          "data.augment=False or precompute=False).")
    if rc.data.teacher_view == "separate":
      raise ConfigError(key("precompute"),
                        "incompatible with data.teacher_view='separate'.")
    if any(v is not None for v in (rc.data.views or {}).values()):
      raise ConfigError(key("precompute"), "incompatible with data.views "
                        "(the teacher runs on its view every step).")


def _validate_loss(rc) -> None:
  lo = rc.loss
  if lo.fused_head:
    raise ConfigError("loss.fused_head", "a fused head loss is for language "
                      "models (task 'lm').")
  views = terms_lib.term_views(lo.terms)
  if "pair" in views and not sources_lib.dataset_info(rc.data.name).in_memory:
    raise ConfigError(f"loss.terms.{views['pair']}", "same-class pairs "
                      "(CS-KD) need an in-memory dataset (MNIST / CIFAR); "
                      f"{rc.data.name!r} is streamed.")
  for s in lo.terms:
    if s.kind == "cross_tokenizer":
      raise ConfigError(f"loss.terms.{s.label}", f"{s.name!r} distils "
                        "across tokenizers: a language-model term (task "
                        "'lm').")
  if not rc.distill:
    return
  if not lo.terms:
    raise ConfigError("loss.terms", "mode 'distill' needs at least one KD "
                      "term (e.g. {'kd': {'weight': 0.9, 'temperature': 4}}).")
  distillers = [s.label for s in lo.terms if s.kind == "distiller"]
  has_views = any(v is not None for v in (rc.data.views or {}).values())
  if distillers and (any(t.precompute for t in rc.teachers)
                     or rc.data.teacher_view == "separate" or has_views):
    raise ConfigError(
        "loss.terms", "feature/relation distiller terms need the teacher's "
        "features every step: incompatible with teacher.precompute / "
        "data.teacher_view='separate' / data.views.")
  if len(rc.teachers) > 1:
    if distillers:
      raise ConfigError("loss.terms", f"distiller terms {distillers} support "
                        "a single teacher.")
    if any(t.precompute for t in rc.teachers) and (
        lo.multi_teacher != "mean_logits" or not all(
            t.precompute for t in rc.teachers)):
      raise ConfigError("teachers", "precomputed logits of several teachers "
                        "need precompute on every teacher and "
                        "loss.multi_teacher='mean_logits'.")
  terms_lib.check_values(lo.terms, (2, rc.model.num_classes))


def validate(rc, check_paths: bool):
  _validate_data(rc)
  for t in rc.teachers:
    _validate_teacher(rc, t, check_paths)
  _validate_loss(rc)
  return rc


def debug(c) -> None:
  """Image debug runs: TFDS `mock_data` (unless real data was given with
  `data.mock=False`), 32 train / 16 eval examples, crops <= 32 px, at most
  16 held-out validation examples (`evaluation.validation_size`)."""
  if "data" not in c:
    c.data = {}
  d = c.data
  d.mock = d.get("mock", True) if d.get("data_dir", "") else True
  d.mock_num_examples = max(int(d.get("mock_num_examples", 64)), 32)
  d.train_subset = 32
  d.eval_subset = 16
  d.image_size = min(int(d.get("image_size", 32)), 32)
  vs = (c.get("evaluation", None) or {}).get("validation_size", 0)
  if type(vs) is int and vs > 0:  # (bad values: left for `validate`)
    c.evaluation.validation_size = min(vs, 16)
    d.mock_num_examples = max(d.mock_num_examples, 64)
  for t in config_lib._teacher_nodes(c):  # pylint: disable=protected-access
    if t.get("checkpoint", "") and not os.path.exists(t.checkpoint):
      t.checkpoint = ""  # the default teacher workdir is not there yet


config_lib.register_task("classify", config_lib.TaskSchema(
    data=DataConfig, model=ModelConfig, teacher=TeacherConfig,
    validate=validate, debug=debug,
    extra={"evaluation": EvaluationConfig}))


def check_frozen_teacher_task(rc, task: str, what: str) -> None:
  """The shape of a task that trains no student from data against a
  frozen teacher (DAFL, DeepInversion): mode 'distill', one teacher, the
  task's own losses, one device, `on_nonfinite='stop'` (one line each)."""
  if rc.mode != "distill":
    raise ConfigError("mode", f"task {task!r} {what} a frozen teacher: mode "
                      f"must be 'distill'; got {rc.mode!r}.")
  if len(rc.teachers) != 1:
    raise ConfigError("teachers", f"task {task!r} takes one teacher.")
  if rc.loss.terms:
    raise ConfigError("loss.terms", f"task {task!r} has its own losses (the "
                      f"{task} section's weights); give no loss terms.")
  if rc.train.parallel != "none":
    raise ConfigError("train.parallel", f"task {task!r} runs on one device "
                      f"(train.parallel='none'); got {rc.train.parallel!r}.")
  if rc.train.on_nonfinite != "stop":
    raise ConfigError("train.on_nonfinite", f"task {task!r} supports 'stop' "
                      "only.")
