r"""MLKD: multi-level logit distillation over a weak / strong view pair.

Instance-, batch- and class-level alignment of the softened predictions
:math:`P = \sigma(z / T)` (`[B, C]`) at several temperatures
:math:`T \in \{T_0, 3, 5, 2, 6\}` (:math:`T_0` = 4 on CIFAR-100):

.. math::
  \mathrm{kd}(s, t, T) &= T^2 \operatorname{mean}_b \textstyle\sum_c
      p^t_{bc} (\log p^t_{bc} - \log p^s_{bc}) \quad
      (\text{`kd_jax.losses.kd_loss`}) \\
  \mathrm{cc}(s, t, T) &= \tfrac{1}{C} \| P_t^\top P_t - P_s^\top P_s \|_F^2
      \quad (\text{class correlation}, C \times C) \\
  \mathrm{bc}(s, t, T) &= \tfrac{1}{B} \| P_t P_t^\top - P_s P_s^\top \|_F^2
      \quad (\text{batch correlation}, B \times B)

and, with the KD weight :math:`w` (0.9), the CE weight :math:`w_{ce}` (0.1)
and :math:`(s_w, t_w)` / :math:`(s_s, t_s)` the weak / strong-view logits,

.. math::
  \mathcal{L} = w\,m \sum_T \mathrm{kd}(s_w, t_w, T)
    + w\,[\mathrm{kd}(s_s, t_s, T_0) + \mathrm{kd}(s_s, t_s, 3)
          + \mathrm{kd}(s_s, t_s, 5) + \mathrm{kd}(s_w, t_w, 2)
          + \mathrm{kd}(s_w, t_w, 6)]
    + w\,m_c \sum_T \mathrm{cc}(s_w, t_w, T)
    + w\,m \sum_T \mathrm{bc}(s_w, t_w, T)
    + w_{ce}\,\mathrm{CE}(s_s, y),

the transcription of the authors' `KD_ours.forward_train`: the confidence
masks (no gradient) are `conf_b = max_c softmax(t_w)_b <= median(conf)` and
`sum_b softmax(t_w)_{bc} <= median` over classes (NumPy's linear-interpolation
percentile); since every term is already a scalar, `(term * mask).mean()`
*scales* it by the fraction of kept entries, :math:`m` and :math:`m_c`
(about 1/2) -- no example is selected, unlike the paper's description. The
strong-view bracket uses the weak logits at T = 2 and 6, as the code does;
strong-view cc / bc are computed there but not used, and are left out here.
The weak-view CE is the objective's `ce_weight * CE` (set it to 0.1); this
distiller adds the strong view's. Use the term with weight 1 (the weights
are inside) and no warm-up.

The strong view: the method declares `views = ('strong',)`; the batch
carries `batch['image_strong']` (`kd_jax.data.strong_augment`: crop + flip +
RandAugment(2, 10) + Cutout, as the authors' `get_cifar100_train_transform_
strong`), and the engine runs both networks on it.

Data parallelism: the batch- and class-level terms and the masks use the
local (per-device) batch, as the authors' per-GPU computation.

References:
  Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023. Authors'
  code: github.com/Jin-Ying/Multi-Level-Logit-Distillation
  (`mdistiller/distillers/KD_ours.py`, `configs/cifar100/ours/`); also in
  sunshangquan/logit-standardization-KD (`mdistiller/distillers/MLKD.py`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import register

MLKD_TEMPERATURES = (4.0, 3.0, 5.0, 2.0, 6.0)


def _kd(s, t, temperature, standardize):
  return jnp.mean(losses.kd_loss(s, t, temperature=temperature,
                                 standardize=standardize))


def _correlation(s, t, temperature, axis):
  """`||G_t - G_s||_F^2 / n`: `G = P^T P` (axis 0, classes, n = C) or
  `P P^T` (axis 1, examples, n = B)."""
  ps = jax.nn.softmax(s / temperature, axis=-1)
  pt = jax.nn.softmax(jax.lax.stop_gradient(t) / temperature, axis=-1)
  if axis == 0:
    gs, gt, n = ps.T @ ps, pt.T @ pt, s.shape[1]
  else:
    gs, gt, n = ps @ ps.T, pt @ pt.T, s.shape[0]
  return jnp.sum((gt - gs) ** 2) / n


def confidence_masks(teacher_weak):
  """MLKD's (sample, class) masks: entries at or below the median confidence.

  Returns float32 `[B]` and `[C]` masks (no gradient).
  """
  p = jax.nn.softmax(jax.lax.stop_gradient(teacher_weak), axis=-1)
  conf = jnp.max(p, axis=-1)
  mask = (conf <= jnp.percentile(conf, 50.0)).astype(jnp.float32)
  cconf = jnp.sum(p, axis=0)
  cmask = (cconf <= jnp.percentile(cconf, 50.0)).astype(jnp.float32)
  return mask, cmask


def mlkd_loss(student_weak, teacher_weak, student_strong, teacher_strong,
              labels, *, temperatures: Sequence[float] = MLKD_TEMPERATURES,
              kd_weight: float = 0.9, ce_weight: float = 0.1,
              standardize: bool = False):
  """The MLKD objective without the weak-view CE (see the module docstring).

  Args:
    student_weak, teacher_weak, student_strong, teacher_strong: `[B, C]`
      logits of both networks on both views (teachers are constants).
    labels: int `[B]`.
    temperatures: five temperatures; the first three are used on the strong
      view and the last two on the weak one in the second KD bracket.
    kd_weight / ce_weight: mdistiller `KD.LOSS.KD_WEIGHT` / `CE_WEIGHT`.
    standardize: z-score the logits inside the KD terms (logit
      standardization, Sun et al. CVPR 2024 -- its `--logit-stand`).

  Returns:
    float32 scalar.
  """
  sw, tw, ss, ts = (jnp.asarray(a, jnp.float32) for a in (
      student_weak, teacher_weak, student_strong, teacher_strong))
  for name, a in (("teacher_weak", tw), ("student_strong", ss),
                  ("teacher_strong", ts)):
    if a.shape != sw.shape or sw.ndim != 2:
      raise ValueError(f"mlkd: logits must all be [B, C] like student_weak "
                       f"{tuple(sw.shape)}; {name} has {tuple(a.shape)}.")
  temps = tuple(float(t) for t in temperatures)
  if len(temps) != 5:
    raise ValueError(f"mlkd: needs 5 temperatures; got {temps}.")
  mask, cmask = confidence_masks(tw)
  m, mc = jnp.mean(mask), jnp.mean(cmask)
  kd_weak = m * sum(_kd(sw, tw, t, standardize) for t in temps)
  kd_strong = (sum(_kd(ss, ts, t, standardize) for t in temps[:3])
               + sum(_kd(sw, tw, t, standardize) for t in temps[3:]))
  cc = mc * sum(_correlation(sw, tw, t, 0) for t in temps)
  bc = m * sum(_correlation(sw, tw, t, 1) for t in temps)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(ss, labels))
  return kd_weight * (kd_weak + kd_strong + cc + bc) + ce_weight * ce


@register("mlkd")
class MLKDDistiller(Distiller):
  """MLKD (no parameters; needs the strong view).

  Args:
    temperatures: `(T_0, 3, 5, 2, 6)`, `T_0` = 4 on CIFAR-100 (mdistiller
      `KD.TEMPERATURE`), 1 on ImageNet.
    kd_weight: 0.9 (CIFAR-100), 0.5 (ImageNet).
    ce_weight: weight of the strong view's CE, the same as the objective's
      `ce_weight` for the weak view: 0.1 (CIFAR-100), 0.5 (ImageNet).
    standardize: logit standardization inside the KD terms.
  """
  views = ("strong",)

  def __init__(self, *, temperatures: Sequence[float] = MLKD_TEMPERATURES,
               kd_weight: float = 0.9, ce_weight: float = 0.1,
               standardize: bool = False):
    self.temperatures = tuple(float(t) for t in temperatures)
    if len(self.temperatures) != 5 or min(self.temperatures) <= 0:
      raise ValueError(f"mlkd: `temperatures` must be 5 positive numbers; "
                       f"got {temperatures!r}.")
    self.kd_weight = float(kd_weight)
    self.ce_weight = float(ce_weight)
    self.standardize = bool(standardize)

  def init(self, rng, inputs):
    del rng, inputs
    return {}, {}

  def __call__(self, params, state, inputs):
    views = inputs.views or {}
    if "strong" not in views:
      raise ValueError(
          "mlkd: needs the strong view (`inputs.views['strong']`); the batch "
          "must carry `batch['image_strong']` (kd_jax.data.strong_augment) "
          "and the step must see the distiller's `views`.")
    if inputs.teacher_logits is None or isinstance(inputs.teacher_logits,
                                                   (list, tuple)):
      raise ValueError("mlkd: needs the logits of a single teacher.")
    ss, ts = views["strong"]
    loss = mlkd_loss(inputs.student_logits, inputs.teacher_logits, ss, ts,
                     inputs.labels, temperatures=self.temperatures,
                     kd_weight=self.kd_weight, ce_weight=self.ce_weight,
                     standardize=self.standardize)
    return loss, state
