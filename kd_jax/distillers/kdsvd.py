r"""KDSVD: knowledge distillation via SVD (`kd_jax.losses.kdsvd_loss`).

Consecutive selected layers are coupled through their top-`k` singular
vectors (RepDistiller `KDSVD` on `feat[1:-1]`, weight 1 as mdistiller).

References:
  Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular
  Value Decomposition", ECCV 2018. Authors' code (TensorFlow):
  github.com/sseung0703/SSKD_SVD; conventions from RepDistiller
  (`distiller_zoo/KDSVD.py`) and mdistiller (`distillers/KDSVD.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import LayerwiseDistiller
from kd_jax.distillers.base import register

@jax.custom_vjp
def _finite_grad(x):
  """Identity whose backward pass replaces non-finite cotangents by 0."""
  return x


def _finite_grad_fwd(x):
  return x, None


def _finite_grad_bwd(_, g):
  return (jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)),)


_finite_grad.defvjp(_finite_grad_fwd, _finite_grad_bwd)



@register("kdsvd")
class KDSVDDistiller(LayerwiseDistiller):
  r"""KD via SVD: `kdsvd_loss(stages[1:], ..., k)` (weight 1, mdistiller).

  Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular
  Value Decomposition", ECCV 2018; RepDistiller `KDSVD` on `feat[1:-1]`
  (channels must match layer by layer; see `kdsvd_loss` for the sign
  convention of the teacher's singular vectors).

  `finite_grads` (default True) zeroes non-finite gradient entries flowing
  back into the student features: the SVD's gradient is undefined (inf/NaN)
  when a feature matrix has repeated singular values -- e.g. rank-deficient
  maps whose rows repeat (blank image borders); the reference (torch
  `svd` backward) then produces NaN and training diverges. With the
  safeguard such examples simply contribute no KDSVD gradient. The loss
  value is unchanged.

  `per_example` evaluates the loss one example at a time (`lax.map`; the
  loss is a sum of per-example terms divided by `B`, so the value is the
  same). Default: on the CPU backend only, where jaxlib's *batched* LAPACK
  SVD kernel can deadlock inside a larger compiled step (seen with jax
  0.10.2 on a 2-core machine: the kernel waits for thread-pool workers that
  are busy with the rest of the program).
  """

  def __init__(self, *, k: int = 1, per_example=None,
               finite_grads: bool = True, **kwargs):
    super().__init__(**kwargs)
    self.k = k
    self.per_example = per_example
    self.finite_grads = finite_grads

  def __call__(self, params, state, inputs):
    s, t = self._pairs(inputs)
    if self.finite_grads:
      s = [_finite_grad(jnp.asarray(x, jnp.float32)) for x in s]
    per_example = (jax.default_backend() == "cpu" if self.per_example is None
                   else self.per_example)
    if not per_example:
      return losses.kdsvd_loss(s, t, k=self.k), state

    def one(args):
      a, b = args
      return losses.kdsvd_loss([x[None] for x in a], [x[None] for x in b],
                               k=self.k)

    return jnp.mean(jax.lax.map(one, (s, t))), state
