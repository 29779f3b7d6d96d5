r"""Post-hoc bias shift of some classes' logits, and choosing the shift.

Hinton, Vinyals & Dean (2015, Section 3) distil MNIST students on transfer
sets that lack classes; such a student learns too low a bias for the
missing classes, and raising the output bias of those classes by a constant
repairs most of the errors ("if this bias is increased by 3.5 (which
optimizes overall performance on the test set), the distilled model makes
109 errors"). Adding :math:`\delta` to the bias :math:`b_c` of the output
layer adds :math:`\delta` to logit :math:`z_c` of every example, so the
shift is evaluated on logits:

.. math::
  \hat y(\delta) = \arg\max_c \big(z_c + \delta\,[c \in S]\big),
  \qquad \mathrm{err}(\delta) = \sum_n [\hat y_n(\delta) \ne y_n]

`choose_bias_shift` evaluates :math:`\mathrm{err}` on a grid of
:math:`\delta` and returns the minimizer. On the test set that is the
paper's (optimistic) protocol; on a validation split held out from the
training set (`kd_jax.data.split_validation`) it is an honest one.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _class_mask(classes: Iterable[int], num_classes: int) -> jax.Array:
  cls = [int(c) for c in classes]
  if not cls or any(not 0 <= c < num_classes for c in cls):
    raise ValueError(f"`classes` must be a non-empty list of ids in [0, "
                     f"{num_classes}); got {cls}.")
  return jnp.zeros((num_classes,), jnp.float32).at[jnp.asarray(cls)].set(1.0)


def _check(logits, labels):
  if logits.ndim != 2:
    raise ValueError(f"`logits` must be [N, K]; got shape {tuple(logits.shape)}.")
  if labels.shape != logits.shape[:1]:
    raise ValueError(f"`labels` must be [N] = [{logits.shape[0]}]; got shape "
                     f"{tuple(labels.shape)}.")


def shift_logits(logits: jax.Array, classes: Sequence[int],
                 delta: float) -> jax.Array:
  """`logits[..., c] + delta` for `c` in `classes` (the output-bias shift).

  Example:
    >>> import jax.numpy as jnp
    >>> shift_logits(jnp.zeros((1, 4)), [1, 3], 2.5)
    Array([[0. , 2.5, 0. , 2.5]], dtype=float32)
  """
  logits = jnp.asarray(logits, jnp.float32)
  return logits + delta * _class_mask(classes, logits.shape[-1])


def errors_under_shifts(logits: jax.Array, labels: jax.Array,
                        classes: Sequence[int], deltas: Sequence[float],
                        *, count_class: int = None) -> np.ndarray:
  """Number of top-1 errors for each shift in `deltas` (int64 `[D]`).

  With `count_class=c`, only errors on examples of class `c` are counted
  (e.g. the paper's "14 of them on 3s").

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[2., 0.], [2., 1.], [0., 2.]]); y = jnp.array([1, 1, 1])
    >>> errors_under_shifts(z, y, [1], [0.0, 1.5, 3.0]).tolist()
    [2, 1, 0]
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  _check(logits, labels)
  mask = _class_mask(classes, logits.shape[-1])
  deltas = jnp.asarray(list(deltas), jnp.float32)
  counted = (jnp.ones(labels.shape, bool) if count_class is None
             else labels == count_class)

  def errors(d):
    pred = jnp.argmax(logits + d * mask, axis=-1)
    return jnp.sum((pred != labels) & counted)

  return np.asarray(jax.jit(jax.vmap(errors))(deltas), np.int64)


def choose_bias_shift(logits: jax.Array, labels: jax.Array,
                      classes: Sequence[int], deltas: Sequence[float]
                      ) -> Tuple[float, int]:
  """`(delta, errors)`: the shift of `deltas` with the fewest errors.

  Ties go to the smallest `|delta|` (then the smaller value), so an
  uninformative split keeps the bias where it is.

  Example:
    >>> import jax.numpy as jnp
    >>> z = jnp.array([[2., 0.], [2., 1.], [0., 2.]]); y = jnp.array([1, 1, 0])
    >>> choose_bias_shift(z, y, [1], [-1.0, 0.0, 1.5, 3.0])
    (3.0, 1)
    >>> choose_bias_shift(z[::2], jnp.array([0, 1]), [1], [-1.0, 0.0, 1.5])
    (0.0, 0)
  """
  deltas = [float(d) for d in deltas]
  if not deltas:
    raise ValueError("`deltas` must not be empty.")
  errs = errors_under_shifts(logits, labels, classes, deltas)
  best = min(range(len(deltas)),
             key=lambda i: (int(errs[i]), abs(deltas[i]), deltas[i]))
  return deltas[best], int(errs[best])
