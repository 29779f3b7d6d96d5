r"""Born-Again Networks: generations of one architecture, and their ensemble.

Generation 0 is trained on the labels; generation :math:`k` has the same
architecture, a fresh initialization, and is distilled from generation
:math:`k-1`:

.. math::
  \mathcal{L}_k = w_{ce}\,\mathrm{CE}(z_k, y)
    + \mathrm{KL}\big(\sigma(z_{k-1}) \,\|\, \sigma(z_k)\big)

(`kd_jax.losses.kd_loss` at :math:`T = 1`; :math:`w_{ce} = 0` for BAN,
1 for BAN+L, as we read the paper -- there is no official code). Each
generation is an ordinary distillation run, so the chain is a seed
experiment (`configs/cifar100_ban.py`), not a distiller. What BAN adds is
the Born-Again Network Ensemble (BANE) of generations :math:`1..k`:

.. math:: \hat p(x) = \tfrac{1}{k} \textstyle\sum_{j=1}^{k} \sigma(z_j(x))

evaluated by `make_ensemble_eval_step` (the mean of the generations'
softmax probabilities; top-1 / top-5 / the CE of :math:`\hat p`).

References:
  Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural
  Networks", ICML 2018 (no official code).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from kd_jax.train import steps as _steps


def ensemble_probabilities(logits: Sequence, *, weights=None):
  """Mean (or `weights`-weighted mean) of the softmax of `[B, K]` logits."""
  logits = list(logits)
  if not logits:
    raise ValueError("ensemble_probabilities: needs at least one model's "
                     "logits.")
  shapes = {tuple(jnp.shape(z)) for z in logits}
  if len(shapes) != 1:
    raise ValueError(f"ensemble_probabilities: the models' logits must have "
                     f"one shape; got {sorted(shapes)}.")
  w = (jnp.full((len(logits),), 1.0 / len(logits)) if weights is None
       else jnp.asarray(weights, jnp.float32) / jnp.sum(
           jnp.asarray(weights, jnp.float32)))
  if w.shape != (len(logits),):
    raise ValueError(f"ensemble_probabilities: {len(logits)} models but "
                     f"{w.shape[0]} weights.")
  return sum(wi * jax.nn.softmax(jnp.asarray(z, jnp.float32), axis=-1)
             for wi, z in zip(w, logits))


def make_ensemble_eval_step(apply_fn, *, axis_name: Optional[str] = None,
                            image_key: str = "image",
                            label_key: str = "label", mask_key: str = "mask",
                            preprocess: Optional[Callable] = None):
  """`eval_step(variables_list, batch) -> metrics` of the ensemble of models
  sharing `apply_fn` (one architecture, e.g. Born-Again generations).

  Metrics, averaged over the unmasked examples (summed over `axis_name`
  first), like `kd_jax.train.make_eval_step`: `loss` (CE of the mean
  probabilities), `top1`, `top5` of the mean probabilities, and `count`.
  With one model they equal `make_eval_step`'s (`loss` up to rounding).
  """
  apply = _steps.as_student_apply(apply_fn)

  def eval_step(variables_list, batch):
    if preprocess is not None:
      batch = preprocess(batch)
    x, labels = batch[image_key], batch[label_key]
    logits = []
    for v in variables_list:
      z, _, _ = _steps._split_student_out(  # pylint: disable=protected-access
          apply(v, x, train=False), "apply_fn")
      logits.append(z)
    p = ensemble_probabilities(logits)
    mask = batch.get(mask_key)
    m = (jnp.ones(labels.shape, jnp.float32) if mask is None
         else mask.astype(jnp.float32))
    picked = jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0]
    ce = -jnp.log(jnp.maximum(picked, jnp.finfo(jnp.float32).tiny))
    k = min(5, p.shape[-1])
    top5 = jnp.any(jax.lax.top_k(p, k)[1] == labels[:, None], axis=-1)
    top1 = jnp.argmax(p, -1) == labels
    sums = {"loss": jnp.sum(ce * m),
            "top1": jnp.sum(top1.astype(jnp.float32) * m),
            "top5": jnp.sum(top5.astype(jnp.float32) * m),
            "count": jnp.sum(m)}
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    denom = jnp.maximum(sums["count"], 1.0)
    return {k_: (v if k_ == "count" else v / denom) for k_, v in sums.items()}

  return eval_step
