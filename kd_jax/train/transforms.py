r"""optax transformations of the dropout-era recipes (Hinton et al. 2012).

* `max_norm(radius)`: after the update, every incoming weight vector (the
  kernel column of one output unit) is projected onto the L2 ball of
  `radius` -- "we set an upper bound on the L2 norm of the incoming weight
  vector for each individual hidden unit; if a weight-update violates this
  constraint, we renormalize the weights of the hidden unit by division".
* `hinton_sgd(learning_rate, momentum)`: the momentum update of the same
  paper's MNIST appendix, with the learning rate scaled by `(1 - p_t)`,
  both possibly scheduled:

  .. math::
    \Delta w_t = p_t\,\Delta w_{t-1} - (1 - p_t)\,\epsilon_t\,\langle\nabla_w L\rangle,
    \qquad w_t = w_{t-1} + \Delta w_t .

* `hinton2012_schedules(...)`: that appendix's schedules, per epoch,
  :math:`\epsilon_e = \epsilon_0 f^e` and a momentum rising linearly from
  :math:`p_i` to :math:`p_f` over the first `ramp_epochs` epochs.

How `max_norm` composes with momentum. Put it LAST in the chain::

    tx = optax.chain(hinton_sgd(lr, mom), max_norm(3.873))   # or optax.sgd(...)

The momentum transformation turns the gradient into the step
:math:`\Delta w_t` and keeps it as its state (the velocity); `max_norm`
then sees :math:`\tilde w_t = w_{t-1} + \Delta w_t`, projects it,
:math:`w_t = \Pi(\tilde w_t)`, and returns :math:`w_t - w_{t-1}` as the
update. The velocity stored by the momentum transformation is the
*unprojected* :math:`\Delta w_t` (the projection changes the weights, not
the velocity), which is what the 2012 recipe does: the weight-update is
computed, applied, and the violating vectors are renormalized. With
`optax.sgd(lr, momentum=p)` the same holds for its trace. Placing it before
the momentum transformation would project the *gradient*, a different
thing. Because `optax.apply_updates` adds the update back,
`w_{t-1} + (w_t - w_{t-1})` equals :math:`w_t` up to one float rounding.

References:
  Hinton, Srivastava, Krizhevsky, Sutskever & Salakhutdinov, "Improving
  neural networks by preventing co-adaptation of feature detectors",
  arXiv:1207.0580, 2012 (weight constraint: main text; schedules: Appendix
  A). Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
  from Overfitting", JMLR 2014 (max-norm, radius `c` of 3 to 4).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]


def _check_radius(radius):
  if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (
      radius > 0 and radius < float("inf")):
    raise ValueError(f"`radius` must be a positive finite number; got "
                     f"{radius!r}.")
  return float(radius)


def default_max_norm_mask(params) -> Any:
  """True for the leaves that hold weight matrices (`ndim >= 2`): Dense and
  convolution kernels; biases and scales (`ndim <= 1`) are left alone."""
  return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def student_max_norm_mask(tree, *, output_layer: bool = False) -> Any:
  """Max-norm mask of the engine's trainable tree `{'student': params,
  'distiller': params}`: the student's weight matrices (`ndim >= 2`),
  without the output layer -- the student's last top-level module in
  creation order (Flax keeps that order), e.g. an MLP's last `Dense` --
  unless `output_layer` (Hinton et al. 2012 constrain "each hidden unit");
  distiller parameters are never constrained.

  Example:
    >>> import jax.numpy as jnp
    >>> t = {'student': {'Dense_0': {'kernel': jnp.ones((4, 3)),
    ...                              'bias': jnp.ones(3)},
    ...                  'Dense_1': {'kernel': jnp.ones((3, 2)),
    ...                              'bias': jnp.ones(2)}},
    ...      'distiller': {'w': jnp.ones((2, 2))}}
    >>> m = student_max_norm_mask(t)
    >>> m['student']['Dense_0'], m['student']['Dense_1']['kernel'], m['distiller']
    ({'bias': False, 'kernel': True}, False, {'w': False})
  """
  params = tree["student"]
  last = list(params)[-1] if len(params) else None
  student = {k: jax.tree_util.tree_map(
      lambda p, k=k: jnp.ndim(p) >= 2 and (output_layer or k != last), v)
             for k, v in params.items()}
  return {"student": student, "distiller": jax.tree_util.tree_map(
      lambda _: False, tree["distiller"])}


def project_max_norm(w: jax.Array, radius: float) -> jax.Array:
  r"""Projects every incoming weight vector of `w` onto the L2 ball.

  The incoming vector of output unit `j` is `w[..., j]` (all axes but the
  last: a Dense kernel `[in, out]` or a conv kernel `[kh, kw, in, out]`):

  .. math:: w_{:, j} \leftarrow w_{:, j}\,\min(1, r / \lVert w_{:, j}\rVert_2)

  Example:
    >>> import jax.numpy as jnp
    >>> project_max_norm(jnp.array([[3., 0.3], [4., 0.4]]), 1.0)
    Array([[0.6, 0.3],
           [0.8, 0.4]], dtype=float32)
  """
  radius = _check_radius(radius)
  if w.ndim < 2:
    raise ValueError(f"max-norm needs a weight matrix (ndim >= 2); got shape "
                     f"{tuple(w.shape)}.")
  axes = tuple(range(w.ndim - 1))
  sq = jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes, keepdims=True)
  norm = jnp.sqrt(sq)
  # min(1, r / |w|) without dividing by a zero norm.
  scale = jnp.where(norm > radius, radius / jnp.maximum(norm, radius), 1.0)
  return (w * scale).astype(w.dtype)


def max_norm(radius: float, *, mask: Optional[Any] = None
             ) -> optax.GradientTransformation:
  r"""Max-norm constraint as an optax transformation (put it last).

  Returns the update that lands each masked parameter on its projection
  `project_max_norm(params + updates, radius)`; other leaves pass through.
  Needs `params` in `update` (the engine's steps pass them). Stateless.

  Args:
    radius: the bound `r` on the L2 norm of each incoming weight vector.
      Hinton et al. (2012) bound the *squared* length by `l = 15`, i.e.
      `radius = sqrt(15) ~= 3.873`; Srivastava et al. (2014) use `c` of 3-4.
    mask: which leaves are constrained: a pytree of bools with the
      structure of `params`, or a callable `params -> such a pytree`.
      Default: every leaf with `ndim >= 2` (`default_max_norm_mask`).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(1.0), max_norm(1.0))
    >>> params = {'kernel': jnp.array([[0.6], [0.0]]), 'bias': jnp.array([5.])}
    >>> grads = {'kernel': jnp.array([[-0.6], [-0.8]]), 'bias': jnp.array([-5.])}
    >>> upd, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, upd)
    >>> [round(float(v), 4) for v in new['kernel'][:, 0]], float(new['bias'][0])
    ([0.8321, 0.5547], 10.0)
  """
  radius = _check_radius(radius)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("max_norm needs `params` in `update(updates, state, "
                       "params)`: it projects the updated parameters.")
    m = default_max_norm_mask(params) if mask is None else (
        mask(params) if callable(mask) else mask)

    def one(u, p, on):
      if not on:
        return u
      new = project_max_norm(p + u, radius)
      return (new - p).astype(u.dtype)

    out = jax.tree_util.tree_map(one, updates, params, m)
    return out, state

  return optax.GradientTransformation(init_fn, update_fn)


class HintonSGDState(NamedTuple):
  count: jax.Array
  velocity: Any


def _value(v: ScalarOrSchedule, count):
  return v(count) if callable(v) else jnp.asarray(v, jnp.float32)


def hinton_sgd(learning_rate: ScalarOrSchedule, momentum: ScalarOrSchedule
               ) -> optax.GradientTransformation:
  r"""Momentum SGD of Hinton et al. (2012), Appendix A:
  :math:`\Delta w_t = p_t \Delta w_{t-1} - (1-p_t)\epsilon_t g_t`.

  Unlike `optax.sgd(lr, momentum)` (:math:`v_t = g_t + p v_{t-1}`,
  update :math:`-\epsilon_t v_t`), the learning rate enters each step's
  contribution before it is accumulated and is scaled by `(1 - p_t)`, so
  the steady-state step is :math:`\epsilon` whatever the momentum. Both
  `learning_rate` and `momentum` may be schedules `count -> value`
  (`count` = number of updates done so far, 0 for the first).

  Example:
    >>> import jax.numpy as jnp
    >>> tx = hinton_sgd(10.0, 0.5)
    >>> g = {'w': jnp.array([1.0])}
    >>> s = tx.init(g)
    >>> u, s = tx.update(g, s)
    >>> u, s = tx.update(g, s)
    >>> float(u['w'][0])   # 0.5 * (-5) - 0.5 * 10 * 1
    -7.5
  """
  def init_fn(params):
    return HintonSGDState(
        count=jnp.zeros([], jnp.int32),
        velocity=jax.tree_util.tree_map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    lr = _value(learning_rate, state.count)
    p = _value(momentum, state.count)
    vel = jax.tree_util.tree_map(
        lambda v, g: (p * v - (1.0 - p) * lr * g).astype(v.dtype),
        state.velocity, updates)
    return vel, HintonSGDState(count=state.count + 1, velocity=vel)

  return optax.GradientTransformation(init_fn, update_fn)


def hinton2012_schedules(steps_per_epoch: int, *, lr0: float = 10.0,
                         decay: float = 0.998, p_initial: float = 0.5,
                         p_final: float = 0.99, ramp_epochs: float = 500
                         ) -> Tuple[Callable, Callable]:
  r"""`(learning_rate(count), momentum(count))` of Hinton et al. 2012, App. A.

  With epoch :math:`e = \lfloor count / steps\_per\_epoch \rfloor` (0-based):
  :math:`\epsilon = \epsilon_0 f^{e}` and
  :math:`p = p_i + (p_f - p_i) \min(e / E_{ramp}, 1)`. The paper's values
  are the defaults (`lr0=10`, `f=0.998`, 0.5 -> 0.99 over 500 epochs, for
  3000 epochs of minibatches of 100); shorter runs compress them (e.g.
  `decay = 0.998 ** (3000 / epochs)`).
  """
  if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
    raise ValueError(f"`steps_per_epoch` must be a positive int; got "
                     f"{steps_per_epoch!r}.")
  if not (0 < decay <= 1) or lr0 <= 0 or ramp_epochs < 0:
    raise ValueError(f"need lr0 > 0, 0 < decay <= 1, ramp_epochs >= 0; got "
                     f"{lr0}, {decay}, {ramp_epochs}.")
  if not (0 <= p_initial < 1 and 0 <= p_final < 1):
    raise ValueError(f"momenta must be in [0, 1); got {p_initial}, {p_final}.")

  def epoch(count):
    return (jnp.asarray(count) // steps_per_epoch).astype(jnp.float32)

  log_decay = math.log(decay)  # float64: 0.998 ** 3000 in float32 is 1e-4 off

  def learning_rate(count):
    return lr0 * jnp.exp(epoch(count) * log_decay)

  def momentum(count):
    frac = (jnp.minimum(epoch(count) / ramp_epochs, 1.0) if ramp_epochs > 0
            else jnp.float32(1.0))
    return p_initial + (p_final - p_initial) * frac

  return learning_rate, momentum
