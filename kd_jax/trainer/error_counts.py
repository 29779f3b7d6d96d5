"""Test errors as counts, and the output-bias shift (``evaluation`` section).

Hinton, Vinyals & Dean (2015, Section 3) report MNIST results as numbers of
test errors (of 10,000), the errors on one class ("133 are on the 1010
threes"), and -- for students distilled from transfer sets that lack
classes -- the errors after raising (or lowering) the output biases of the
missing classes by the shift "which optimizes overall performance on the
test set". `ErrorCounter` computes those from the student's test-set logits
after an evaluation (`kd_jax.train.bias_shift` evaluates the shifts); the
classify task adds them to its metrics when ``evaluation.error_counts`` or
``evaluation.bias_shift_classes`` is set:

* ``errors``: test errors (count); ``errors_on``: of those, on the
  examples of ``bias_shift_classes`` (absent without classes);
* ``shift``: the bias shift of ``bias_shift_classes`` with the fewest test
  errors on the grid ``bias_shift_grid = (lowest, highest, step)`` (ties:
  the smallest ``|shift|``, so a shift that changes nothing stays 0);
  ``errors_shifted`` / ``errors_on_shifted``: the errors with it;
* with ``validation_size`` (examples held out of the training split before
  the transfer set drops classes, `kd_jax.trainer.feeds.load_data`): the
  shift chosen the same way on the student's logits of that validation
  split, ``shift_val``, and the TEST errors with it,
  ``errors_shifted_val`` / ``errors_on_shifted_val`` -- a choice that never
  looks at the test set, next to the paper's test-chosen one.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.train import bias_shift as bias_shift_lib
from kd_jax.train import step_utils
from kd_jax.trainer import loop


def shift_grid(grid: Tuple[float, float, float]) -> np.ndarray:
  """The shifts `i * step` in [lowest, highest] (0 is always one of them).

  >>> shift_grid((-0.2, 0.3, 0.1)).round(2).tolist()
  [-0.2, -0.1, 0.0, 0.1, 0.2, 0.3]
  """
  lo, hi, step = (float(g) for g in grid)
  i0, i1 = int(np.ceil(lo / step - 1e-9)), int(np.floor(hi / step + 1e-9))
  return np.round(np.arange(i0, i1 + 1, dtype=np.float64) * step, 10)


def metrics(ev) -> Tuple[loop.Metric, ...]:
  """The `loop.Metric`s of an `EvaluationConfig` (() when inactive)."""
  if not ev.active:
    return ()
  out = [loop.Metric("errors", "test errors", False, gain=True)]
  if ev.bias_shift_classes:  # (labels shared by phases of other classes)
    out += [loop.Metric("errors_on", "errors on the shifted classes", False),
            loop.Metric("shift", "bias shift", False),
            loop.Metric("errors_shifted", "errors after the shift", False),
            loop.Metric("errors_on_shifted",
                        "errors on the shifted classes after the shift",
                        False)]
  if ev.bias_shift_classes and ev.validation_size:
    out += [loop.Metric("shift_val", "bias shift chosen on validation",
                        False),
            loop.Metric("errors_shifted_val",
                        "errors after the validation-chosen shift", False),
            loop.Metric("errors_on_shifted_val", "errors on the shifted "
                        "classes after the validation-chosen shift", False)]
  return tuple(out)


class ErrorCounter:
  """`counter(variables, eval_batches) -> metrics` (see the module doc).

  `variables`: the student's host variables; `eval_batches`: the task's
  un-normalized eval batches (`label`, `image`, optional `mask`);
  `preprocess`: the task's eval normalization.
  """

  def __init__(self, student, ev, preprocess):
    self.ev = ev
    apply = step_utils.as_student_apply(student)

    def logits_fn(variables, batch):
      b = preprocess(batch)
      logits, _, _ = step_utils.split_apply_output(
          apply(variables, b["image"], train=False))
      return logits.astype(jnp.float32)

    self._logits = jax.jit(logits_fn)

  def _gather(self, variables, batches) -> Tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the unmasked examples of `batches`."""
    zs, ys = [], []
    for b in batches:
      z = np.asarray(self._logits(variables, {"image": b["image"]}))
      y = np.asarray(b["label"])
      keep = (np.ones(len(y), bool) if b.get("mask") is None
              else np.asarray(b["mask"]).astype(bool))
      zs.append(z[keep])
      ys.append(y[keep])
    return np.concatenate(zs), np.concatenate(ys)

  def __call__(self, variables, eval_batches, val_batches=None
               ) -> Dict[str, float]:
    """`val_batches`: the validation split's (un-normalized) batches, for
    the `*_val` results (None: not reported)."""
    z, y = self._gather(variables, eval_batches)
    out = {"errors": float(np.sum(np.argmax(z, -1) != y))}
    cls = tuple(self.ev.bias_shift_classes)
    if not cls:
      return out
    on = np.isin(y, cls)
    deltas = shift_grid(self.ev.bias_shift_grid)

    def test_errors(delta):  # (errors, errors on `cls`) with `delta`
      wrong = np.argmax(np.asarray(
          bias_shift_lib.shift_logits(z, cls, delta)), -1) != y
      return float(np.sum(wrong)), float(np.sum(wrong & on))

    delta, errors = bias_shift_lib.choose_bias_shift(z, y, cls, deltas)
    out.update(errors_on=float(np.sum((np.argmax(z, -1) != y) & on)),
               shift=float(delta), errors_shifted=float(errors),
               errors_on_shifted=test_errors(delta)[1])
    if val_batches is not None:
      zv, yv = self._gather(variables, val_batches)
      delta_v, _ = bias_shift_lib.choose_bias_shift(zv, yv, cls, deltas)
      out["shift_val"] = float(delta_v)
      out["errors_shifted_val"], out["errors_on_shifted_val"] = (
          test_errors(delta_v))
    return out
