"""Data-free distillation as a task of the one loop (``task = 'dafl'``).

DAFL (Chen et al., ICCV 2019; `kd_jax.distillers.dafl`): a generator is
trained beside the student so that the frozen teacher is confident, active
and class-balanced on its images; the student is distilled on those images
only. This file is the trainer's floor of it -- the method (generator,
losses, the one compiled step updating both networks) lives in
`kd_jax.distillers.dafl`; here: the config section ``dafl``, the teacher's
variables, the placement, the loop's protocol (calls, checkpoints of both
train states, evaluation) and a PNG grid of generated images
(``generated.png``, rewritten at each evaluation).

No training image is read: the run loads only the eval split (the student
is evaluated on the real test set through ``data.views.student``, e.g. the
28 -> 32 resize of DAFL's LeNet-5 MNIST). Each step's noise is
``fold_in(generator.rng, step)``, so a resumed run is bit-identical to an
uninterrupted one. One device (``train.parallel='none'``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import image_grid
from kd_jax.data import sources as sources_lib
from kd_jax.data import views as views_lib
from kd_jax.distillers import dafl as dafl_lib
from kd_jax.train import optim
from kd_jax.train import steps as steps_lib
from kd_jax.trainer import classify
from kd_jax.trainer import classify_config
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import feeds as feeds_lib
from kd_jax.trainer import loop
from kd_jax.trainer import placement as placement_lib
from kd_jax.trainer import programs as programs_lib
from kd_jax.trainer.errors import ConfigError

GRID_TAG = 0x6772  # the grid's fixed noise: fold_in(key(seed), GRID_TAG)


@dataclasses.dataclass(frozen=True)
class DAFLSection:
  """``config.dafl`` (defaults: the authors' MNIST command; the batch is
  ``train.batch_size``, the student's optimizer ``optimizer``)."""
  latent_dim: int = 100
  img_size: int = 32
  channels: int = 1
  one_hot_weight: float = 1.0
  entropy_weight: float = 5.0
  activation_weight: float = 0.1
  entropy_log_base: float = 10.0
  kd_temperature: float = 1.0
  feature_key: str = "pooled"
  iters_per_epoch: int = 120
  generator_optimizer: str = "adam"
  generator_learning_rate: float = 0.2
  generator_momentum: float = 0.0
  grid_images: int = 40


def dafl_config(rc) -> dafl_lib.DAFLConfig:
  s = rc.section("dafl")
  return dafl_lib.DAFLConfig(
      batch_size=rc.train.batch_size, latent_dim=s.latent_dim,
      img_size=s.img_size, channels=s.channels,
      one_hot_weight=s.one_hot_weight, entropy_weight=s.entropy_weight,
      activation_weight=s.activation_weight,
      entropy_log_base=s.entropy_log_base, kd_temperature=s.kd_temperature,
      feature_key=s.feature_key)


def _generator_spec(s: DAFLSection) -> optim.OptimizerSpec:
  return optim.OptimizerSpec(name=s.generator_optimizer,
                             learning_rate=s.generator_learning_rate,
                             momentum=s.generator_momentum)


def validate(rc, check_paths: bool):
  """The classification checks of data / model / teacher, then DAFL's."""
  s = rc.section("dafl")
  classify_config.check_frozen_teacher_task(rc, "dafl",
                                           "distils a student from")
  try:
    dafl_config(rc)
  except (TypeError, ValueError) as e:
    raise ConfigError("dafl", str(e)) from None
  for key in ("iters_per_epoch", "grid_images"):
    config_lib.check_positive_int(f"dafl.{key}", getattr(s, key))
  config_lib.check_number("dafl.generator_learning_rate",
                          s.generator_learning_rate, 0, open_lo=True)
  config_lib.check_number("dafl.generator_momentum", s.generator_momentum,
                          0, 0.999)
  if s.generator_optimizer not in optim.OPTIMIZERS or optim.split_gradients(
      _generator_spec(s)):
    raise ConfigError("dafl.generator_optimizer", "must be one of "
                      f"{('sgd', 'adam', 'adamw', 'rmsprop')}; got "
                      f"{s.generator_optimizer!r}.")
  if dict(rc.data.views or {}).get("teacher") is not None:
    raise ConfigError("data.views.teacher", "the DAFL teacher sees the "
                      "generated images; give no teacher view.")
  # pylint: disable=protected-access
  classify_config._validate_data(rc)
  classify_config._validate_teacher(rc, rc.teacher, check_paths)
  info = sources_lib.dataset_info(rc.data.name)
  if not info.in_memory:
    raise ConfigError("data.name", "task 'dafl' evaluates on an in-memory "
                      f"dataset (MNIST / CIFAR); got {rc.data.name!r}.")
  want = (s.img_size, s.img_size, s.channels)
  got = views_lib.view_output_shape(
      dict(rc.data.views or {}).get("student"), info.image_shape)
  if tuple(got) != want:
    raise ConfigError("data.views.student", f"the test images reach the "
                      f"student as {tuple(got)}, the generator makes {want}; "
                      "set e.g. {'name': 'resize', 'size': "
                      f"{s.img_size}}} (or dafl.img_size / channels).")
  return rc


def debug(c) -> None:
  classify_config.debug(c)


config_lib.register_task("dafl", config_lib.TaskSchema(
    data=classify_config.DataConfig, model=classify_config.ModelConfig,
    teacher=classify_config.TeacherConfig, validate=validate, debug=debug,
    extra={"dafl": DAFLSection}))


@loop.register("dafl")
class DAFLTask(loop.Task):
  """A generator and a student trained together from a frozen teacher."""

  @classmethod
  def metrics(cls, rc):
    return (loop.Metric("top1", "top-1 %", True, 100.0, gain=True),
            loop.Metric("top5", "top-5 %", True, 100.0, table=False),
            loop.Metric("loss", "eval loss", False, table=False))

  def __init__(self, rc, workdir: str, *, dry_run: bool = False):
    self.rc, self.workdir, self.dry_run = rc, workdir, dry_run
    s = self.sec = rc.section("dafl")
    self.data = feeds_lib.load_eval_data(rc)  # (no training images)
    self.steps_per_epoch = spe = s.iters_per_epoch
    self.total_steps = config_lib.total_steps(rc, spe)
    self.units = {"examples": rc.train.batch_size}  # (generated)
    student, (teacher,) = classify.create_models(rc)
    self.shape = shape = (s.img_size, s.img_size, s.channels)
    self.placement = placement_lib.make_placement(
        rc, student, [teacher], jnp.zeros((1,) + shape, jnp.float32))
    self.rng, teacher_rng = jax.random.split(jax.random.key(int(rc.seed)))
    tx, self.schedule = optim.make_optimizer(
        rc.optimizer, steps_per_epoch=spe, total_steps=self.total_steps)
    gtx, _ = optim.make_optimizer(_generator_spec(s), steps_per_epoch=spe,
                                  total_steps=self.total_steps)
    self.teacher, self.student = teacher, student
    self.teacher_vars = classify.teacher_variables(
        rc, rc.teacher, teacher, shape, teacher_rng, self.placement,
        abstract=dry_run and not rc.teacher.checkpoint)
    self.generator = dafl_lib.Generator(img_size=s.img_size,
                                        channels=s.channels,
                                        latent_dim=s.latent_dim)
    self.core = dafl_lib.DAFLTask(
        generator=self.generator, teacher_apply=teacher, student=student,
        student_init=lambda k: programs_lib.init_variables(student, k, shape),
        gen_tx=gtx, student_tx=tx, cfg=dafl_config(rc),
        axis_name=self.placement.axis_name)
    self.train_step = _with_nonfinite(self.core.train_step)
    p = self.placement
    self.single = p.compile(self.train_step, stacked=False)
    self.multi = p.compile(steps_lib.make_multi_step(self.train_step),
                           stacked=True)
    pre = feeds_lib.eval_preprocess(self.data)
    ev = steps_lib.make_eval_step(student, axis_name=p.axis_name,
                                  preprocess=pre)
    self.eval_step = lambda st, b: ev(st.student, b)  # noqa: E731
    self.evaluate_fn = p.compile(self.eval_step, stacked=False,
                                 donate_state=False)
    self.teacher_eval = p.compile(
        steps_lib.make_eval_step(teacher, axis_name=p.axis_name,
                                 preprocess=pre),
        stacked=False, donate_state=False)
    n, latent = s.grid_images, s.latent_dim
    self._grid = jax.jit(lambda st, r: dafl_lib.generate(
        self.generator, st, r, n, latent))

  # -- the protocol ---------------------------------------------------------

  def title(self) -> str:
    return f"dafl: {self.model_name()} <- {self.teacher_names()[0]}"

  def dataset_name(self) -> str:
    return self.rc.data.name

  def init_state(self):
    return jax.jit(self.core.init_state)(self.rng)

  def constants(self, clock):
    info = {}
    placed = self.placement.place_teacher(self.teacher_vars)
    if self.rc.teacher.evaluate:
      info["teacher_top1"] = self._evaluate(self.teacher_eval, placed)["top1"]
    clock.tick("teacher_ready")
    return {"teacher": placed}, info

  def call(self, step: int, n: int):
    steps = np.arange(step, step + n, dtype=np.int32)
    if n == 1 and self.rc.train.steps_per_call == 1:
      return self.single, self.placement.shard_batch({"step": steps})
    return self.multi, self.placement.shard_batch({"step": steps[:, None]},
                                                  stacked=True)

  def _evaluate(self, fn, variables) -> Dict[str, float]:
    outs = [fn(variables, self.placement.shard_batch(b))
            for b in self.data.eval_batches()]
    return classify._weighted_eval(  # pylint: disable=protected-access
        [self.placement.fetch(o) for o in outs])

  def evaluate(self, state, consts) -> Dict[str, float]:
    del consts
    out = self._evaluate(self.evaluate_fn, state)
    if loop.is_main():  # the generator's images, same noise every time
      imgs = self._grid(state, jax.random.fold_in(
          jax.random.key(int(self.rc.seed)), GRID_TAG))
      image_grid.save_image_grid(os.path.join(self.workdir, "generated.png"),
                                 np.asarray(imgs))
    return out

  def summary(self, evals) -> Dict[str, Any]:
    out = super().summary(evals)
    out["convention"] = ("student on the real test set; last_top1: after the "
                         "final epoch; best_top1: max over evaluations (the "
                         "authors keep the best)")
    out["generated_images"] = "generated.png"
    return out

  def close(self) -> None:
    self.data.close()

  # -- checkpoints: both train states in one tree ---------------------------

  def checkpoint_tree(self, state):
    p = self.placement
    return {"generator": p.checkpoint_tree(state.generator),
            "student": p.checkpoint_tree(state.student)}

  def restore_template(self, host_state):
    p = self.placement
    return {"generator": p.restore_template(host_state.generator),
            "student": p.restore_template(host_state.student)}

  def restored_state(self, tree, host_state):
    p = self.placement
    impl = jax.random.key_impl(host_state.student.rng)
    return dafl_lib.DAFLState(
        generator=p.restored_state(tree["generator"], impl),
        student=p.restored_state(tree["student"], impl))

  def dry_run_report(self) -> Dict[str, Any]:
    """Traces init / train / eval with `jax.eval_shape` (no compile)."""
    st = jax.eval_shape(self.core.init_state, self.rng)
    tv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      self.teacher_vars)
    _, metrics = jax.eval_shape(self.train_step, st, {"teacher": tv},
                                {"step": np.zeros((1,), np.int32)})
    batch = next(iter(self.data.eval_batches()))
    ev = jax.eval_shape(self.eval_step, st, batch)
    count = lambda t: sum(int(np.prod(x.shape))  # noqa: E731
                          for x in jax.tree.leaves(t))
    return {"dry_run": True, "num_params": count(st.student.params),
            "num_generator_params": count(st.generator.params),
            "metrics": {k: tuple(v.shape) for k, v in metrics.items()},
            "eval_metrics": {k: tuple(v.shape) for k, v in ev.items()}}


def _with_nonfinite(step):
  """The step plus `metrics['nonfinite']` (1.0 when a loss is NaN / inf):
  the loop's ``train.on_nonfinite='stop'``."""
  def train_step(state, consts, batch):
    state, m = step(state, consts["teacher"], batch)
    bad = ~jnp.isfinite(m["generator_loss"] + m["kd"])
    return state, {**m, "nonfinite": bad.astype(jnp.float32)}
  return train_step
