"""DeepInversion as a task of the one loop (``task = 'deepinversion'``).

DeepInversion / Adaptive DeepInversion (Yin et al., CVPR 2020;
`kd_jax.distillers.deepinversion`): a batch of images is optimized so that
the frozen teacher classifies it as cycling targets ``[0, 1, ..., K-1, 0,
...]`` and its BatchNorm inputs match the running statistics (plus image
priors and, with ``adi_weight > 0``, the competition with a student). The
method lives in the distillers file; this file is the trainer's floor of
it: the config section ``deepinversion`` (the loss weights), the frozen
networks' variables, the loop's protocol and PNG grids.

The state: the synthesized batch, its optimizer state, the step, the PRNG
key (jitter) and the best batch so far. One loop step = one inversion
iteration; the batch is ``train.batch_size`` images, the iterations
``train.num_steps``, the pixels' optimizer ``optimizer`` (the authors':
Adam, lr 0.05 on CIFAR). Evaluation: the loss terms of the current
(un-jittered) batch, the teacher's top-1 on it against the targets
(``synth_top1``), the student's with ADI; ``synthesized.png`` (rewritten)
and ``images/step_<k>.png`` at every evaluation; at the end
``best.png`` / ``best_images.npy`` (the lowest-loss batch, the authors'
output). No image of any dataset is read (``data.name`` gives the shape
and the normalization only). One device (``train.parallel='none'``).

The ADI student is ``model`` (a trained classification run's workdir in
``model.init_checkpoint``; a seed experiment's ``init_from``); without a
checkpoint it is random (debug runs only).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import image_grid
from kd_jax.data import sources as sources_lib
from kd_jax.distillers import deepinversion as di
from kd_jax.train import optim
from kd_jax.train import steps as steps_lib
from kd_jax.trainer import classify
from kd_jax.trainer import classify_config
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import feeds as feeds_lib
from kd_jax.trainer import loop
from kd_jax.trainer import placement as placement_lib
from kd_jax.trainer import programs as programs_lib
from kd_jax.trainer import teachers as teachers_lib
from kd_jax.trainer.errors import ConfigError

_WEIGHTS = ("bn_weight", "first_bn_multiplier", "tv_l2_weight",
            "tv_l1_weight", "l2_weight", "ce_weight", "adi_weight",
            "adi_temperature")


@dataclasses.dataclass(frozen=True)
class DeepInversionSection:
  """``config.deepinversion`` (defaults: the authors' CIFAR-10 settings,
  `cifar10/deepinversion_cifar10.py`; ADI off)."""
  bn_weight: float = 10.0            # --r_feature_weight
  first_bn_multiplier: float = 1.0   # ImageNet script: 10
  tv_l2_weight: float = 2.5e-5       # --di_var_scale
  tv_l1_weight: float = 0.0
  l2_weight: float = 0.0             # --di_l2_scale
  ce_weight: float = 1.0
  adi_weight: float = 0.0            # --cig_scale (> 0: ADI, needs `model`)
  adi_temperature: float = 3.0
  jitter: int = 2
  flip: bool = False
  clip: bool = False   # pixels clipped to the normalized [0, 1] range
  spatial_only: bool = True
  grid_rows: int = 10  # images per row of the PNG grids


@dataclasses.dataclass(frozen=True)
class InversionModelConfig(classify_config.ModelConfig):
  """``model``: the ADI student; ``init_checkpoint`` a trained run's
  workdir (or Orbax dir)."""
  init_checkpoint: str = ""


def _image_shape(rc):
  return tuple(sources_lib.dataset_info(rc.data.name).image_shape)


def inversion_config(rc) -> di.DeepInversionConfig:
  s = rc.section("deepinversion")
  clip = None
  if s.clip:
    mean, std = feeds_lib._normalization(  # pylint: disable=protected-access
        rc, sources_lib.dataset_info(rc.data.name))
    clip = (tuple(-m / d for m, d in zip(mean, std)),
            tuple((1 - m) / d for m, d in zip(mean, std)))
  return di.DeepInversionConfig(
      **{k: getattr(s, k) for k in _WEIGHTS}, jitter=s.jitter, flip=s.flip,
      clip_range=clip, spatial_only=s.spatial_only)


def validate(rc, check_paths: bool):
  """The classification checks of data / teacher, then DeepInversion's."""
  s = rc.section("deepinversion")
  classify_config.check_frozen_teacher_task(rc, "deepinversion", "inverts")
  if not rc.train.num_steps:
    raise ConfigError("train.num_steps", "task 'deepinversion' runs "
                      "train.num_steps inversion iterations; give it (> 0).")
  for k in _WEIGHTS:
    config_lib.check_number(f"deepinversion.{k}", getattr(s, k), 0)
  config_lib.check_number("deepinversion.adi_temperature", s.adi_temperature,
                          0, open_lo=True)
  if isinstance(s.jitter, bool) or not isinstance(s.jitter, int) or (
      s.jitter < 0):
    raise ConfigError("deepinversion.jitter", f"must be an int >= 0; got "
                      f"{s.jitter!r}.")
  config_lib.check_positive_int("deepinversion.grid_rows", s.grid_rows)
  if rc.optimizer.name not in ("sgd", "adam", "adamw", "rmsprop"):
    raise ConfigError("optimizer.name", "task 'deepinversion' optimizes the "
                      "pixels with 'sgd' / 'adam' / 'adamw' / 'rmsprop'; got "
                      f"{rc.optimizer.name!r}.")
  if any(v is not None for v in dict(rc.data.views or {}).values()):
    raise ConfigError("data.views", "task 'deepinversion' synthesizes the "
                      "teacher's input directly; give no views.")
  if (check_paths and s.adi_weight and not rc.model.init_checkpoint
      and not rc.debug):
    raise ConfigError("model.init_checkpoint", "deepinversion.adi_weight > 0 "
                      "competes with a trained student: give its run's "
                      "workdir (a seed experiment's init_from).")
  # pylint: disable=protected-access
  classify_config._validate_data(rc)
  classify_config._validate_teacher(rc, rc.teacher, check_paths)
  if sources_lib.dataset_info(rc.data.name).image_shape is None:
    raise ConfigError("data.name", "task 'deepinversion' needs a dataset of "
                      f"fixed image size (MNIST / CIFAR); got "
                      f"{rc.data.name!r}.")
  return rc


def debug(c) -> None:
  classify_config.debug(c)
  m = c.get("model", None)
  if m is not None and m.get("init_checkpoint", "") and not os.path.exists(
      m.init_checkpoint):
    m.init_checkpoint = ""  # the student phase's workdir is not there yet


config_lib.register_task("deepinversion", config_lib.TaskSchema(
    data=classify_config.DataConfig, model=InversionModelConfig,
    teacher=classify_config.TeacherConfig, validate=validate, debug=debug,
    extra={"deepinversion": DeepInversionSection}))


@loop.register("deepinversion")
class DeepInversionTask(loop.Task):
  """A batch of images optimized against a frozen teacher."""

  @classmethod
  def metrics(cls, rc):
    out = (loop.Metric("synth_top1", "teacher top-1 % on synthesized", True,
                       100.0),
           loop.Metric("inversion_loss", "inversion loss", False, table=False,
                       digits=4),
           loop.Metric("bn", "BN-statistics loss", False, table=False,
                       digits=4))
    if rc.section("deepinversion").adi_weight:
      out += (loop.Metric("student_synth_top1",
                          "student top-1 % on synthesized", False, 100.0),)
    return out

  def __init__(self, rc, workdir: str, *, dry_run: bool = False):
    self.rc, self.workdir, self.dry_run = rc, workdir, dry_run
    s = self.sec = rc.section("deepinversion")
    self.cfg = inversion_config(rc)
    self.total_steps = int(rc.train.num_steps)
    self.steps_per_epoch = self.total_steps  # (one batch: one "epoch")
    self.units = {"examples": rc.train.batch_size}  # (synthesized)
    student, (teacher,) = classify.create_models(rc)
    self.shape = shape = _image_shape(rc)
    self.placement = placement_lib.make_placement(
        rc, student, [teacher], jnp.zeros((1,) + shape, jnp.float32))
    self.rng, teacher_rng, student_rng = jax.random.split(
        jax.random.key(int(rc.seed)), 3)
    self.tx, self.schedule = optim.make_optimizer(
        rc.optimizer, steps_per_epoch=self.total_steps,
        total_steps=self.total_steps)
    abstract = dry_run and not rc.teacher.checkpoint
    self.teacher_vars = classify.teacher_variables(
        rc, rc.teacher, teacher, shape, teacher_rng, self.placement,
        abstract=abstract)
    self.student = student if s.adi_weight else None
    self.student_vars = (self._student_variables(student, student_rng)
                         if s.adi_weight else None)
    self.targets = di.cycling_targets(rc.train.batch_size,
                                      rc.teacher.num_classes)
    self.step_fn = di.make_inversion_step(teacher, self.cfg, self.tx,
                                          student_apply=self.student)
    self.train_step = self._loop_step
    p = self.placement
    self.single = p.compile(self.train_step, stacked=False)
    self.multi = p.compile(steps_lib.make_multi_step(self.train_step),
                           stacked=True)
    cfg, stu = self.cfg, self.student
    self._eval = jax.jit(lambda x, t, c: di.evaluate_images(
        x, t, teacher, c["teacher"], cfg, stu, c.get("student")))

  def _student_variables(self, student, rng):
    init = lambda r: programs_lib.init_variables(  # noqa: E731
        student, r, self.shape)
    path = self.rc.model.init_checkpoint
    if not path and self.dry_run:
      return jax.eval_shape(init, rng)
    if not path:
      logging.warning("debug run: ADI competes with a randomly initialized "
                      "student (no model.init_checkpoint).")
      return jax.jit(init)(jax.random.fold_in(rng, 11))
    return teachers_lib.restore(path, jax.eval_shape(init, rng),
                                self.placement, "config.model.init_checkpoint")

  def _loop_step(self, state, consts, batch):
    del batch  # (the step counter is in the state)
    state, m = self.step_fn(state, self.targets, consts["teacher"],
                            consts.get("student"))
    return state, {**m, "nonfinite": (~jnp.isfinite(m["loss"])).astype(
        jnp.float32)}

  # -- the protocol ---------------------------------------------------------

  def title(self) -> str:
    adi = " (ADI)" if self.sec.adi_weight else ""
    return f"deepinversion{adi}: <- {self.teacher_names()[0]}"

  def init_state(self):
    return jax.jit(lambda r: di.init_inversion(
        r, (self.rc.train.batch_size,) + self.shape, self.tx))(self.rng)

  def constants(self, clock):
    consts = {"teacher": self.placement.place_teacher(self.teacher_vars)}
    if self.student_vars is not None:
      consts["student"] = self.placement.place_teacher(self.student_vars)
    clock.tick("teacher_ready")
    return consts, {}

  def call(self, step: int, n: int):
    steps = np.arange(step, step + n, dtype=np.int32)
    if n == 1 and self.rc.train.steps_per_call == 1:
      return self.single, self.placement.shard_batch({"step": steps})
    return self.multi, self.placement.shard_batch({"step": steps[:, None]},
                                                  stacked=True)

  def evaluate(self, state, consts) -> Dict[str, float]:
    m = jax.device_get(self._eval(state.images, self.targets, consts))
    out = {("synth_top1" if k == "teacher_top1" else
            "student_synth_top1" if k == "student_top1" else
            "inversion_loss" if k == "loss" else k): float(v)
           for k, v in m.items()}
    if loop.is_main():
      imgs, step = np.asarray(state.images), int(state.step)
      self._grid(os.path.join(self.workdir, "synthesized.png"), imgs)
      self._grid(os.path.join(self.workdir, "images", f"step_{step}.png"),
                 imgs)
      if step == self.total_steps:  # the end: the authors' output
        best = np.asarray(state.best_images)
        self._grid(os.path.join(self.workdir, "best.png"), best)
        np.save(os.path.join(self.workdir, "best_images.npy"), best)
    return out

  def _grid(self, path, images):
    image_grid.save_image_grid(path, images, nrow=self.sec.grid_rows)

  def summary(self, evals) -> Dict[str, Any]:
    out = super().summary(evals)
    out["convention"] = (
        "synth_top1: the frozen teacher's top-1 on the current synthesized "
        "batch (un-jittered) against the cycling targets; no real image read")
    out["synthesized_images"] = "synthesized.png"
    out["best_images"] = "best.png, best_images.npy (the lowest-loss batch)"
    return out

  # -- checkpoints ----------------------------------------------------------

  def checkpoint_tree(self, state):
    return di.inversion_checkpoint_tree(state)

  def restore_template(self, host_state):
    return jax.device_get(di.inversion_checkpoint_tree(host_state))

  def restored_state(self, tree, host_state):
    return di.inversion_from_tree(tree, jax.random.key_impl(host_state.rng))

  def dry_run_report(self) -> Dict[str, Any]:
    """Traces init / step with `jax.eval_shape` (no compile)."""
    st = jax.eval_shape(self.init_state)
    tv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      self.teacher_vars)
    consts = {"teacher": tv}
    if self.student_vars is not None:
      consts["student"] = self.student_vars
    _, metrics = jax.eval_shape(self.train_step, st, consts,
                                {"step": np.zeros((1,), np.int32)})
    return {"dry_run": True, "images": list(st.images.shape),
            "metrics": {k: tuple(v.shape) for k, v in metrics.items()}}
