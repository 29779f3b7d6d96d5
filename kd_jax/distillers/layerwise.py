"""Parameter-free multi-layer distillers: AT, NST, KDSVD.

Thin distillers that pick the reference's layers and sum
`kd_jax.losses.{at,nst}_loss` over them (KDSVD couples consecutive layers in
`kdsvd_loss`). Default selection: RepDistiller's `feat[1:-1]`, i.e. the stage
outputs after the stem, `features['stages'][1:]` for the zoo models (whose
`stages` list is RepDistiller's `feat[:-1]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec


@jax.custom_vjp
def _finite_grad(x):
  """Identity whose backward pass replaces non-finite cotangents by 0."""
  return x


def _finite_grad_fwd(x):
  return x, None


def _finite_grad_bwd(_, g):
  return (jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)),)


_finite_grad.defvjp(_finite_grad_fwd, _finite_grad_bwd)


class _Layerwise(Distiller):
  """Shared selection logic: `feature_key` + student/teacher layer lists."""

  def __init__(self, *, feature_key: str = "stages", layers: LayerSpec = "1:",
               teacher_layers: LayerSpec = None):
    self.feature_key = feature_key
    self.layers = layers
    self.teacher_layers = layers if teacher_layers is None else teacher_layers

  def _pairs(self, inputs):
    s = self._student(inputs, self.feature_key, self.layers)
    t = self._teacher(inputs, self.feature_key, self.teacher_layers)
    self._check_pairs(s, t)
    return s, t

  def init(self, rng, inputs):
    del rng
    self._pairs(inputs)  # validates the selection on the real shapes
    return {}, {}


class ATDistiller(_Layerwise):
  r"""Attention transfer: :math:`\sum_l` `at_loss(s_l, t_l, p)` (weight 1000).

  Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017;
  RepDistiller `--distill attention -b 1000` on `feat[1:-1]`.

  >>> import jax, jax.numpy as jnp
  >>> from kd_jax.train import TermInputs
  >>> f = {'stages': [jnp.ones((2, 8, 8, 4)), jnp.ones((2, 4, 4, 8))]}
  >>> inp = TermInputs(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32),
  ...                  student_features=f, teacher_features=f)
  >>> d = ATDistiller()
  >>> p, s = d.init(jax.random.PRNGKey(0), inp)
  >>> float(d(p, s, inp)[0])
  0.0
  """
  name = "at"

  def __init__(self, *, p: float = 2, **kwargs):
    super().__init__(**kwargs)
    self.p = p

  def __call__(self, params, state, inputs):
    s, t = self._pairs(inputs)
    loss = sum(losses.at_loss(a, b, p=self.p) for a, b in zip(s, t))
    return jnp.asarray(loss, jnp.float32), state


class NSTDistiller(_Layerwise):
  r"""Neural selectivity transfer: :math:`\sum_l` `nst_loss` (weight 50).

  Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
  Transfer", 2017; RepDistiller `--distill nst -b 50` on `feat[1:-1]`.
  """
  name = "nst"

  def __call__(self, params, state, inputs):
    s, t = self._pairs(inputs)
    loss = sum(losses.nst_loss(a, b) for a, b in zip(s, t))
    return jnp.asarray(loss, jnp.float32), state


class KDSVDDistiller(_Layerwise):
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
  name = "kdsvd"

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
