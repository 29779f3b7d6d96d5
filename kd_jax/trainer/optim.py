"""The optimizer of a run: `config.optimizer` -> optax transformation +
learning-rate schedule (in steps)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Tuple

import optax

from kd_jax.distillers import dot as dot_lib

def _sgd(opt, sched):
  return optax.sgd(sched, momentum=float(opt.momentum) or None,
                   nesterov=bool(opt.nesterov))


def _adam(opt, sched):
  del opt
  return optax.adam(sched)


def _adamw(opt, sched):
  return optax.adamw(sched, weight_decay=float(opt.weight_decay or 0.0))


def _dot(opt, sched):
  return dot_lib.dot(sched, momentum=float(opt.momentum),
                     delta=float(opt.delta),
                     weight_decay=float(opt.weight_decay or 0.0),
                     distill_only=dot_lib.engine_distill_only)


class OptimizerEntry(NamedTuple):
  """How `optimizer.name` is built.

  build: `(opt_config, schedule) -> optax.GradientTransformation`.
  decay_inside: the builder applies `weight_decay` itself (else it is
    chained before it as coupled L2).
  split_gradients: the transformation takes `{'task', 'distill'}` gradients:
    the distill step is built with `make_distill_step(...,
    split_gradients=True)`; such an optimizer needs mode 'distill', and a
    distiller's pretrain stage (one loss, no split) uses plain SGD with the
    same momentum and LR instead (`stage_optimizer_config`).
  """
  build: Callable
  decay_inside: bool = False
  split_gradients: bool = False


# `optimizer.name` -> entry. A method's own optimizer goes here: DOT (Zhao
# et al., ICCV 2023; `kd_jax.distillers.dot`), SGD with separate momenta
# (`momentum -/+ delta`) for the task and the distillation gradients.
OPTIMIZERS: Dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(_sgd),
    "adam": OptimizerEntry(_adam),
    "adamw": OptimizerEntry(_adamw, decay_inside=True),
    "dot": OptimizerEntry(_dot, decay_inside=True, split_gradients=True),
}


def split_gradients(opt) -> bool:
  """Whether `opt`'s transformation takes `{'task', 'distill'}` gradients."""
  return OPTIMIZERS[opt.name].split_gradients


def stage_optimizer_config(opt):
  """The optimizer config of a single-loss program (a distiller's pretrain
  stage): `opt` itself, or plain SGD with its momentum, LR and weight decay
  when `opt` needs split gradients (DOT)."""
  if not split_gradients(opt):
    return opt
  return dataclasses.replace(opt, name="sgd", nesterov=False)


def make_schedule(opt, *, steps_per_epoch: int,
                  total_steps: int) -> Callable:
  """LR schedule in steps: `constant`; `step` (LR × `decay_factor` after each
  of `decay_epochs`: mdistiller's `adjust_learning_rate`, epoch e (1-based)
  uses `lr * factor ** #{d : e > d}`); `cosine` (to 0 over the run); an
  optional linear warm-up over `warmup_epochs`."""
  lr = float(opt.learning_rate)
  if opt.schedule == "constant":
    sched = optax.constant_schedule(lr)
  elif opt.schedule == "step":
    bounds = {int(e) * steps_per_epoch: float(opt.decay_factor)
              for e in opt.decay_epochs}
    sched = optax.piecewise_constant_schedule(lr, bounds)
  else:
    sched = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  warm = int(round(float(opt.warmup_epochs or 0) * steps_per_epoch))
  if warm > 0:
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), sched], [warm])
  return sched


def make_optimizer(opt, *, steps_per_epoch: int, total_steps: int
                   ) -> Tuple[optax.GradientTransformation, Callable]:
  """optax transformation + LR schedule from `config.optimizer` (an
  `OptimizerConfig`, or anything with its fields as attributes).

  Weight decay is PyTorch's coupled L2 (`grad += wd * param`) for sgd/adam,
  decoupled for adamw, added to the task gradient inside DOT.
  """
  sched = make_schedule(opt, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps)
  build, decay_inside, _ = OPTIMIZERS[opt.name]
  tx = build(opt, sched)
  wd = float(opt.weight_decay or 0.0)
  if wd and not decay_inside:
    tx = optax.chain(optax.add_decayed_weights(wd), tx)
  return tx, sched
