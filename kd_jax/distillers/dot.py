r"""DOT: distillation-oriented trainer -- separate momenta for task and KD gradients.

An optax `GradientTransformation` whose updates are **not** the gradient of
one loss but the pair `{'task': g_task, 'distill': g_kd}` that
`kd_jax.train.make_distill_step(..., split_gradients=True)` hands it (task =
`ce_weight * CE`, distill = the KD terms, from one forward pass). SGD with
two momentum buffers, :math:`\mu_{task} = \mu - \Delta` and
:math:`\mu_{kd} = \mu + \Delta`, one learning rate, no dampening, no
Nesterov:

.. math::
  b_{task} &\leftarrow \mu_{task}\, b_{task} + g_{task} + \lambda p \\
  b_{kd} &\leftarrow \mu_{kd}\, b_{kd} + g_{kd} \\
  p &\leftarrow p - \eta\,(b_{task} + b_{kd})

Both buffers start at their first gradient (PyTorch's SGD convention, not at
zero); weight decay :math:`\lambda` goes into the task gradient. Parameters
that only the KD loss reaches (a distiller's own parameters, marked by
`distill_only`) keep one buffer with the average momentum
:math:`(\mu_{task} + \mu_{kd}) / 2` and get the weight decay in their KD
gradient from the second step on -- the authors' branch for parameters
without a task gradient. (In JAX every parameter receives both gradients;
a student parameter the KD loss does not reach gets a zero KD gradient and
keeps decaying its KD buffer, where PyTorch, seeing `grad is None`, would
use the averaged task momentum. For KD on the logits every student
parameter reaches both losses.) The authors apply the task update before
the KD update within a step; the sum is applied at once here (same value up
to float rounding).

CIFAR-100: :math:`\mu = 0.9`, :math:`\Delta = 0.075`, lr 0.05, weight decay
5e-4 (mdistiller `configs/cifar100/dot/*.yaml`, `SOLVER.DOT.DELTA`);
ImageNet ResNet-34 -> ResNet-18: :math:`\Delta = 0.09`.

References:
  Zhao, Cui, Song & Liang, "DOT: A Distillation-Oriented Trainer", ICCV 2023.
  Authors' code: github.com/megvii-research/mdistiller
  (`mdistiller/engine/dot.py::DistillationOrientedTrainer`,
  `mdistiller/engine/trainer.py::DOT`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from kd_jax.train import optim as optim_lib

PyTree = Any
ScalarOrSchedule = Union[float, Callable[[jnp.ndarray], jnp.ndarray]]


class DOTState(NamedTuple):
  """Step count and the two momentum buffers (parameter-shaped)."""
  count: jnp.ndarray
  task_momentum: PyTree
  distill_momentum: PyTree


def engine_distill_only(params: Mapping[str, PyTree]) -> PyTree:
  """`distill_only` mask for the engine's `{'student', 'distiller'}` tree:
  the distiller's parameters only see the KD loss."""
  return {k: jax.tree_util.tree_map(lambda _: k == "distiller", v)
          for k, v in params.items()}


def _check_split(grads):
  if not (isinstance(grads, Mapping) and set(grads) == {"task", "distill"}):
    raise ValueError(
        "dot: expects the gradients split as {'task': ..., 'distill': ...}; "
        "build the step with `make_distill_step(..., split_gradients=True)`.")


def dot(learning_rate: ScalarOrSchedule, *, momentum: float = 0.9,
        delta: float = 0.075, weight_decay: float = 0.0,
        distill_only: Optional[Callable[[PyTree], PyTree]] = None
        ) -> optax.GradientTransformation:
  """The DOT optimizer (see the module docstring).

  Args:
    learning_rate: a float or an optax schedule of the step count.
    momentum: :math:`\\mu` (mdistiller `SOLVER.MOMENTUM`, 0.9).
    delta: :math:`\\Delta` (`SOLVER.DOT.DELTA`, 0.075 on CIFAR-100).
    weight_decay: :math:`\\lambda` (5e-4 on CIFAR-100), on every parameter.
    distill_only: optional `params -> bool pytree` marking the parameters
      only the KD loss reaches (`engine_distill_only` for the engine's
      train state); default: none.

  Returns:
    an `optax.GradientTransformation` taking `{'task', 'distill'}` updates.
  """
  m_task, m_kd = momentum - delta, momentum + delta
  if not (0.0 <= m_task and m_kd < 1.0):
    raise ValueError(f"dot: momenta {m_task} and {m_kd} must lie in [0, 1); "
                     f"check momentum={momentum}, delta={delta}.")
  m_avg = 0.5 * (m_task + m_kd)

  def init(params):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return DOTState(jnp.zeros((), jnp.int32), zeros,
                    jax.tree_util.tree_map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    _check_split(grads)
    if params is None:
      raise ValueError("dot: `update` needs `params` (weight decay).")
    first = state.count == 0
    only = (jax.tree_util.tree_map(lambda _: False, params)
            if distill_only is None else distill_only(params))
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)

    def leaf(g_t, g_d, b_t, b_d, p, kd_only):
      if kd_only:
        g = g_d + jnp.where(first, 0.0, weight_decay) * p
        b_d = jnp.where(first, g_d, m_avg * b_d + g)
        return -lr * b_d, b_t, b_d
      g_t = g_t + weight_decay * p
      b_t = jnp.where(first, g_t, m_task * b_t + g_t)
      b_d = jnp.where(first, g_d, m_kd * b_d + g_d)
      return -lr * (b_t + b_d), b_t, b_d

    leaves, treedef = jax.tree_util.tree_flatten(params)
    flat = [treedef.flatten_up_to(t) for t in (
        grads["task"], grads["distill"], state.task_momentum,
        state.distill_momentum)]
    masks = treedef.flatten_up_to(only)
    out = [leaf(*args, p, bool(m)) for *args, p, m in zip(*flat, leaves,
                                                          masks)]
    unflat = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
    return unflat(0), DOTState(optax.safe_increment(state.count), unflat(1),
                               unflat(2))

  return optax.GradientTransformation(init, update)


def _build(spec, schedule):
  """`optimizer.name = 'dot'` (the engine's optimizer table)."""
  return dot(schedule, momentum=float(spec.momentum), delta=float(spec.delta),
             weight_decay=float(spec.weight_decay or 0.0),
             distill_only=engine_distill_only)


optim_lib.register_optimizer(
    "dot", optim_lib.OptimizerEntry(_build, decay_inside=True,
                                    split_gradients=True))
