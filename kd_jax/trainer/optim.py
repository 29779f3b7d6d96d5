"""The optimizer of a run: `config.optimizer` -> optax transformation +
learning-rate schedule (in steps)."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import optax

def _sgd(opt, sched):
  return optax.sgd(sched, momentum=float(opt.momentum) or None,
                   nesterov=bool(opt.nesterov))


def _adam(opt, sched):
  del opt
  return optax.adam(sched)


def _adamw(opt, sched):
  return optax.adamw(sched, weight_decay=float(opt.weight_decay or 0.0))


# `optimizer.name` -> (builder(opt_config, schedule) -> optax transformation,
# whether the builder applies `weight_decay` itself). A method's own
# optimizer goes here: e.g. DOT (Zhao et al., ICCV 2023), an optax
# transformation with separate momenta for the task and the distillation
# gradients -- it also needs the engine's step to hand it the two gradients
# separately (`kd_jax.train.steps`), which the plain entries do not.
OPTIMIZERS: Dict[str, Tuple[Callable, bool]] = {
    "sgd": (_sgd, False),
    "adam": (_adam, False),
    "adamw": (_adamw, True),
}


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
  decoupled for adamw.
  """
  sched = make_schedule(opt, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps)
  build, decay_inside = OPTIMIZERS[opt.name]
  tx = build(opt, sched)
  wd = float(opt.weight_decay or 0.0)
  if wd and not decay_inside:
    tx = optax.chain(optax.add_decayed_weights(wd), tx)
  return tx, sched
