"""Optimizers and learning-rate schedules by name: the one optimizer table.

`make_optimizer(spec, steps_per_epoch=, total_steps=)` turns an
`OptimizerSpec` (the parsed `config.optimizer`, or anything with its fields
as attributes) into an optax transformation and its LR schedule (in steps).
The table `OPTIMIZERS` maps `spec.name` to an `OptimizerEntry`; a method that
needs its own optimizer registers it from its own file
(`register_optimizer`, e.g. DOT in `kd_jax/distillers/dot.py`), so adding one
touches nothing here.

Schedules (`spec.schedule`, all in optimizer steps):

* `constant`;
* `step`: LR x `decay_factor` after each of `decay_epochs` (mdistiller's
  `adjust_learning_rate`: epoch e (1-based) uses `lr * factor ** #{d : e >
  d}`);
* `cosine`: cosine decay to 0 over the run;
* `warmup_cosine`: optax's `warmup_cosine_decay_schedule` from 0 to the LR
  over `warmup_steps` (clipped to [1, total_steps // 2]), then cosine decay
  to 0 at `total_steps` (the language-model recipe).

`warmup_epochs > 0` adds a linear warm-up from 0 in front of `constant`,
`step` and `cosine`. `grad_clip > 0` clips the global gradient norm first.
`max_norm > 0` projects each hidden unit's incoming weight vector onto the
L2 ball of that radius after every update (`kd_jax.train.transforms.max_norm`,
last in the chain; the output layer too with `max_norm_output`; Hinton et
al. 2012). It needs the engine's trainable tree `{'student', 'distiller'}`.
Weight decay is PyTorch's coupled L2 (`grad += wd * param`) for sgd/adam,
decoupled for adamw, and whatever an entry with `decay_inside=True` does.

>>> tx, sched = make_optimizer(OptimizerSpec(name="adam", learning_rate=1e-3),
...                            steps_per_epoch=10, total_steps=100)
>>> float(sched(50))
0.001
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, NamedTuple, Tuple

import optax

from kd_jax.train import transforms

SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """`config.optimizer`, typed (defaults = `configs/base.py`'s)."""
  name: str = "sgd"
  learning_rate: float = 0.05
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 0.0
  schedule: str = "constant"
  decay_epochs: Tuple[int, ...] = (150, 180, 210)
  decay_factor: float = 0.1
  warmup_epochs: float = 0.0
  warmup_steps: int = 0
  grad_clip: float = 0.0
  delta: float = 0.075  # DOT's momentum offset (`name = 'dot'`)
  max_norm: float = 0.0  # > 0: max-norm constraint of each unit's weights
  max_norm_output: bool = False  # ... the output layer's units too


class OptimizerEntry(NamedTuple):
  """How `spec.name` is built.

  build: `(spec, schedule) -> optax.GradientTransformation`.
  decay_inside: the builder applies `weight_decay` itself (else it is
    chained before it as coupled L2).
  split_gradients: the transformation takes `{'task', 'distill'}` gradients:
    the distill step is built with `make_distill_step(...,
    split_gradients=True)`; such an optimizer needs a distillation run, and
    a single-loss program (a distiller's pretrain stage) uses plain SGD with
    the same momentum and LR instead (`stage_spec`).
  """
  build: Callable
  decay_inside: bool = False
  split_gradients: bool = False


def _sgd(spec, sched):
  return optax.sgd(sched, momentum=float(spec.momentum) or None,
                   nesterov=bool(spec.nesterov))


def _adam(spec, sched):
  del spec
  return optax.adam(sched)


def _adamw(spec, sched):
  return optax.adamw(sched, weight_decay=float(spec.weight_decay or 0.0))


def _rmsprop(spec, sched):
  """Keras 0.x `RMSprop` (rho 0.9, epsilon 1e-6 inside the square root, zero
  accumulator): `optax.rmsprop(lr, decay=0.9, eps=1e-6)`; Lopez-Paz et al.'s
  generalized-distillation experiments (ICLR 2016). `momentum` is unused."""
  del spec
  return optax.rmsprop(sched, decay=0.9, eps=1e-6)


OPTIMIZERS: Dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(_sgd),
    "adam": OptimizerEntry(_adam),
    "adamw": OptimizerEntry(_adamw, decay_inside=True),
    "rmsprop": OptimizerEntry(_rmsprop),
}
"""`optimizer.name` -> entry (methods add theirs with `register_optimizer`)."""


def register_optimizer(name: str, entry: OptimizerEntry) -> OptimizerEntry:
  """Adds `entry` to `OPTIMIZERS` under `name` (a method's own optimizer)."""
  if not isinstance(entry, OptimizerEntry):
    raise TypeError(f"register_optimizer({name!r}): expected an "
                    f"OptimizerEntry; got {type(entry).__name__}.")
  other = OPTIMIZERS.get(name)
  if other is not None and other.build is not entry.build:
    raise ValueError(f"optimizer name {name!r} is already registered.")
  OPTIMIZERS[name] = entry
  return entry


def split_gradients(spec) -> bool:
  """Whether `spec`'s transformation takes `{'task', 'distill'}` gradients."""
  return OPTIMIZERS[spec.name].split_gradients


def stage_spec(spec):
  """The optimizer of a single-loss program (a distiller's pretrain stage):
  `spec` itself, or plain SGD with its momentum, LR and weight decay when
  `spec` needs split gradients (DOT)."""
  if not split_gradients(spec):
    return spec
  return dataclasses.replace(spec, name="sgd", nesterov=False)


def make_schedule(spec, *, steps_per_epoch: int,
                  total_steps: int) -> Callable:
  """The LR schedule of `spec` in steps (see the module docstring)."""
  lr = float(spec.learning_rate)
  if spec.schedule == "warmup_cosine":
    warm = max(1, min(int(getattr(spec, "warmup_steps", 0) or 0),
                      total_steps // 2))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm,
                                              max(total_steps, warm + 1))
  if spec.schedule == "constant":
    sched = optax.constant_schedule(lr)
  elif spec.schedule == "step":
    bounds = {int(e) * steps_per_epoch: float(spec.decay_factor)
              for e in spec.decay_epochs}
    sched = optax.piecewise_constant_schedule(lr, bounds)
  elif spec.schedule == "cosine":
    sched = optax.cosine_decay_schedule(lr, max(total_steps, 1))
  else:
    raise ValueError(f"unknown schedule {spec.schedule!r}; valid: "
                     f"{SCHEDULES}.")
  warm = int(round(float(spec.warmup_epochs or 0) * steps_per_epoch))
  if warm > 0:
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), sched], [warm])
  return sched


def make_optimizer(spec, *, steps_per_epoch: int, total_steps: int
                   ) -> Tuple[optax.GradientTransformation, Callable]:
  """optax transformation + LR schedule of `spec` (an `OptimizerSpec`)."""
  if spec.name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {spec.name!r}; valid: "
                     f"{tuple(OPTIMIZERS)}.")
  sched = make_schedule(spec, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps)
  build, decay_inside, _ = OPTIMIZERS[spec.name]
  tx = build(spec, sched)
  wd = float(spec.weight_decay or 0.0)
  if wd and not decay_inside:
    tx = optax.chain(optax.add_decayed_weights(wd), tx)
  clip = float(getattr(spec, "grad_clip", 0.0) or 0.0)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  radius = float(getattr(spec, "max_norm", 0.0) or 0.0)
  if radius > 0:
    output = bool(getattr(spec, "max_norm_output", False))
    tx = optax.chain(tx, transforms.max_norm(radius, mask=functools.partial(
        transforms.student_max_norm_mask, output_layer=output)))
  return tx, sched
