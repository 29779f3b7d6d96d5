"""Image classification (``task = 'classify'``): its config sections.

``data`` (a TFDS image dataset, in memory or streamed), ``model`` and each
teacher (a network of the zoo, `kd_jax.models`); see `configs/base.py` for
the keys. `validate` checks them against the dataset and the zoo.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from kd_jax import models as models_lib
from kd_jax.data import sources as sources_lib
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
  info = sources_lib.dataset_info(rc.data.name)
  return bool(rc.data.augment) and bool(info.crop_padding or info.flip)


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
  if not rc.distill:
    return
  if not lo.terms:
    raise ConfigError("loss.terms", "mode 'distill' needs at least one KD "
                      "term (e.g. {'kd': {'weight': 0.9, 'temperature': 4}}).")
  distillers = [s.label for s in lo.terms if s.kind == "distiller"]
  if distillers and (any(t.precompute for t in rc.teachers)
                     or rc.data.teacher_view == "separate"):
    raise ConfigError(
        "loss.terms", "feature/relation distiller terms need the teacher's "
        "features every step: incompatible with teacher.precompute / "
        "data.teacher_view='separate'.")
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
  `data.mock=False`), 32 train / 16 eval examples, crops <= 32 px."""
  if "data" not in c:
    c.data = {}
  d = c.data
  d.mock = d.get("mock", True) if d.get("data_dir", "") else True
  d.mock_num_examples = max(int(d.get("mock_num_examples", 64)), 32)
  d.train_subset = 32
  d.eval_subset = 16
  d.image_size = min(int(d.get("image_size", 32)), 32)
  for t in config_lib._teacher_nodes(c):  # pylint: disable=protected-access
    if t.get("checkpoint", "") and not os.path.exists(t.checkpoint):
      t.checkpoint = ""  # the default teacher workdir is not there yet


config_lib.register_task("classify", config_lib.TaskSchema(
    data=DataConfig, model=ModelConfig, teacher=TeacherConfig,
    validate=validate, debug=debug))
