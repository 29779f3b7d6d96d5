r"""CS-KD: class-wise self-knowledge distillation.

Each training example :math:`x` (label :math:`y`) is paired with another
example :math:`x'` of the same class; the network's softened prediction on
:math:`x'` (a constant) is the target of its prediction on :math:`x`:

.. math::
  \mathcal{L} = \mathrm{CE}(z(x), y) + \lambda\, T^2\,
    \mathrm{KL}\big(\sigma(z(x') / T) \,\|\, \sigma(z(x) / T)\big),
  \qquad T = 4,\ \lambda = 1 \text{ (CIFAR-100; 3 on the fine-grained sets)}

averaged over the batch of anchors (`kd_jax.losses.kd_loss`: the authors'
`KDLoss` = `KLDivLoss(reduction='sum') * T**2 / batch`). The CE is the
objective's (`loss.ce_weight = 1`); this distiller is the class-wise term,
with the term weight :math:`\lambda` (`--lamda`).

What the authors' `train.py` does and kd_jax transcribes:

* a batch is `batch_size` anchors followed by their `batch_size` partners
  (`datasets.PairBatchSampler`); the CE is over the anchors only;
* the partners go through the network in a *second* forward, in train mode
  (BatchNorm normalizes them with their own batch statistics and updates
  the running statistics after the anchors'), under `torch.no_grad()`;
* a partner is `random.choice(classwise_indices[y])`, any example of the
  class -- possibly the anchor itself (probability 1 / class size; the paper
  says "another sample"). kd_jax's pipeline draws partners the same way,
  deterministically per (seed, epoch, example): `InMemoryPipeline(...,
  same_class_pairs=True)` (`pair_exclude_self=True` gives the paper's
  wording).

The partner view: the distiller declares `views = ('pair',)`; the step must
run the student on `batch['image_pair']` (train mode, BatchNorm statistics
continuing from the anchor forward, no gradient) and hand the logits over
as `inputs.views['pair'] = (student_pair_logits, None)` (see
`notes/selfkd.md` for the engine wiring). No teacher (`needs_teacher =
False`).

Recipe (README): SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128 (+ 128
partners), 200 epochs, LR x0.1 at 50% and 75% of the epochs, CIFAR crop +
flip (`configs/cifar100_cskd.py`).

References:
  Yun, Park, Lee & Shin, "Regularizing Class-wise Predictions via
  Self-knowledge Distillation", CVPR 2020. Authors' code:
  github.com/alinlab/cs-kd (`train.py::KDLoss`, `train.py::train`,
  `datasets.py::PairBatchSampler`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import register

PAIR_VIEW = "pair"


def pair_logits(inputs):
  """The student's logits on the partner examples, `inputs.views['pair']`
  (a `(student_logits, teacher_logits_or_None)` pair or an array)."""
  views = inputs.views or {}
  if PAIR_VIEW not in views:
    raise ValueError(
        "cskd: needs the same-class partner view (`inputs.views['pair']`): "
        "the batch must carry `batch['image_pair']` "
        "(`InMemoryPipeline(same_class_pairs=True)`) and the step must run "
        "the student on it (the distiller's `views`).")
  v = views[PAIR_VIEW]
  return v[0] if isinstance(v, (tuple, list)) else v


@register("cskd")
class CSKDDistiller(Distiller):
  """Class-wise self-KD term (no parameters; needs the pair view).

  Args:
    temperature: `T` (the authors' `--temp`, 4).
  """
  views = (PAIR_VIEW,)
  needs_teacher = False

  def __init__(self, *, temperature: float = 4.0):
    if not float(temperature) > 0:
      raise ValueError(f"cskd: `temperature` must be > 0; got "
                       f"{temperature!r}.")
    self.temperature = float(temperature)

  def init(self, rng, inputs):
    del rng, inputs
    return {}, {}

  def __call__(self, params, state, inputs):
    target = pair_logits(inputs)
    s = jnp.asarray(inputs.student_logits, jnp.float32)
    if tuple(target.shape) != tuple(s.shape):
      raise ValueError(
          f"cskd: the partner logits {tuple(target.shape)} must have the "
          f"anchors' shape {tuple(s.shape)} (one partner per anchor).")
    target = jax.lax.stop_gradient(jnp.asarray(target, jnp.float32))
    loss = jnp.mean(losses.kd_loss(s, target, temperature=self.temperature))
    return loss, state
