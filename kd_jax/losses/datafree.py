r"""Losses of data-free distillation: DAFL's generator losses, DeepInversion's
image losses and Adaptive DeepInversion's competition term.

Unlike the distillation losses of `logits` / `features`, these are
differentiated *through the teacher*: DAFL trains a generator and
DeepInversion optimizes the input pixels against a frozen teacher, so the
gradient must reach the images through the teacher's logits and features.
None of them applies `stop_gradient` to its arguments (the teacher's
*parameters* are frozen by not being optimized, as in the authors' code).

* `dafl_one_hot_loss`, `dafl_activation_loss`,
  `dafl_information_entropy_loss` -- Chen et al., ICCV 2019
  (huawei-noah/Efficient-Computing, `Data-Efficient-Model-Compression/DAFL/
  DAFL-train.py`). The student's loss there is KD at T = 1
  (`kd_jax.losses.kd_loss(s, t, temperature=1.0)`).
* `bn_statistics_loss`, `image_total_variation`, `image_l2_norm` --
  DeepInversion (Yin et al., CVPR 2020; NVlabs/DeepInversion,
  `deepinversion.py`, `cifar10/deepinversion_cifar10.py`).
* `adi_competition_loss` -- Adaptive DeepInversion's competition term
  (same files).

Shapes: logits `[..., K]`; images and feature maps NHWC `[B, H, W, C]` (the
references are NCHW). Computations are float32 (float64 stays float64 under
`jax_enable_x64`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kd_jax.losses import _common

Array = jax.Array


def _dtype(*xs):
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _logits(x, name):
  _common.check_float(x, name)
  _common.check_rank(x, name, min_ndim=1, what="([..., num_classes])")
  return jnp.asarray(x, _dtype(x))


def _images(x, name):
  _common.check_float(x, name)
  _common.check_rank(x, name, ndim=4, what="(NHWC [B, H, W, C])")
  return jnp.asarray(x, _dtype(x))


def _safe_sqrt(sq):
  """sqrt with a zero (not NaN) gradient at 0."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


# ---------------------------------------------------------------------------
# DAFL.
# ---------------------------------------------------------------------------


def dafl_one_hot_loss(teacher_logits, *, where=None) -> Array:
  r"""DAFL's one-hot loss: CE of the teacher's prediction vs its own argmax.

  .. math:: \ell_{oh} = -\log \sigma(z)_{\arg\max_c z_c}
     = \mathrm{logsumexp}(z) - \max_c z_c

  (`criterion(outputs_T, outputs_T.data.max(1)[1])` in the authors'
  `DAFL-train.py`; `jnp.mean` over the batch is their value). The argmax is
  a constant; the gradient w.r.t. the logits is `softmax(z) - onehot(argmax)`.

  Args:
    teacher_logits: `[..., K]` logits of the teacher on generated images
      (differentiable: the generator is trained through them).
    where: optional bool mask `[...]`; masked entries give 0.

  Returns:
    `[...]` per-example loss.

  References:
    Chen et al., "Data-Free Learning of Student Networks", ICCV 2019, Eq. 4.

  >>> import jax.numpy as jnp
  >>> round(float(dafl_one_hot_loss(jnp.array([0., 0.]))), 4)  # log 2
  0.6931
  """
  z = _logits(teacher_logits, "teacher_logits")
  where = _common.check_where(where, z.shape[:-1])
  (z,) = _common.mask_inputs(where, z)
  idx = jax.lax.stop_gradient(jnp.argmax(z, axis=-1))
  top = jnp.take_along_axis(z, idx[..., None], axis=-1)[..., 0]
  return _common.apply_where(jax.nn.logsumexp(z, axis=-1) - top, where)


def dafl_activation_loss(teacher_features, *, where=None) -> Array:
  r"""DAFL's activation loss: minus the mean absolute teacher feature.

  .. math:: \ell_a = -\frac{1}{D} \sum_j |f_j|

  per example over every non-batch axis of `teacher_features` (`[B, ...]`);
  `jnp.mean` over the batch equals the authors' `-features_T.abs().mean()`
  (the feature is the teacher's penultimate embedding: LeNet-5's 120-d
  `conv3` output after ReLU, the ResNets' pooled feature).

  Args:
    teacher_features: `[B, ...]` float array (differentiable).
    where: optional bool mask `[B]`.

  Returns:
    `[B]` per-example loss (<= 0).

  References:
    Chen et al., ICCV 2019, Eq. 5.

  >>> import jax.numpy as jnp
  >>> dafl_activation_loss(jnp.array([[1., -3.], [0., 2.]])).tolist()
  [-2.0, -1.0]
  """
  _common.check_float(teacher_features, "teacher_features")
  _common.check_rank(teacher_features, "teacher_features", min_ndim=2,
                     what="([B, ...])")
  f = jnp.asarray(teacher_features, _dtype(teacher_features))
  where = _common.check_where(where, f.shape[:1])
  (f,) = _common.mask_inputs(where, f)
  per = -jnp.mean(jnp.abs(f).reshape(f.shape[0], -1), axis=-1)
  return _common.apply_where(per, where)


def dafl_information_entropy_loss(teacher_logits, *, log_base: float = 10.0,
                                  axis_name: Optional[str] = None) -> Array:
  r"""DAFL's information-entropy loss: minus the entropy of the mean prediction.

  .. math::
    \ell_{ie} = \sum_k \bar p_k \log_b \bar p_k = -H_b(\bar p), \qquad
    \bar p = \frac{1}{B} \sum_i \sigma(z_i)

  Minimizing it pushes the generator towards class-balanced batches. The
  authors' code uses `torch.log10` (`log_base=10`, the default here); the
  paper writes the entropy without a base (natural log = `log_base=e`,
  which is `ln 10` times the default). Entries with :math:`\bar p_k = 0`
  contribute 0 (the limit), where the reference would give NaN.

  Args:
    teacher_logits: `[B, K]` (or `[..., K]`, averaged over all leading
      axes) logits of the teacher on generated images.
    log_base: the logarithm's base `b > 0, != 1`.
    axis_name: inside `pmap`/`shard_map`, average :math:`\bar p` over this
      device axis, so every device holds the global-batch value.

  Returns:
    float scalar (a batch-level loss).

  References:
    Chen et al., ICCV 2019, Eq. 6; `loss_information_entropy` in
    `DAFL-train.py`.

  >>> import jax.numpy as jnp
  >>> round(float(dafl_information_entropy_loss(jnp.zeros((4, 10)))), 4)
  -1.0
  """
  z = _logits(teacher_logits, "teacher_logits")
  _common.check_positive(log_base, "log_base")
  if isinstance(log_base, (int, float)) and log_base == 1:
    raise ValueError("`log_base` must differ from 1.")
  p = jax.nn.softmax(z, axis=-1).reshape(-1, z.shape[-1])
  p_bar = jnp.mean(p, axis=0)
  if axis_name is not None:
    p_bar = jax.lax.pmean(p_bar, axis_name)
  pos = p_bar > 0
  plogp = jnp.where(pos, p_bar * jnp.log(jnp.where(pos, p_bar, 1.0)), 0.0)
  return jnp.sum(plogp) / jnp.log(jnp.asarray(log_base, z.dtype))


# ---------------------------------------------------------------------------
# DeepInversion.
# ---------------------------------------------------------------------------


def bn_statistics_loss(features, running_mean, running_var, *,
                       axis_name: Optional[str] = None) -> Array:
  r"""DeepInversion's feature-statistics loss of one BatchNorm layer.

  .. math::
    \mathcal{R}_{feature} = \| \sigma^2_{BN} - \sigma^2(x) \|_2
        + \| \mu_{BN} - \mu(x) \|_2

  where :math:`x` is the *input* of the BatchNorm layer on the synthesized
  batch, :math:`\mu(x), \sigma^2(x)` its per-channel mean and biased
  variance over the batch and spatial axes, and :math:`\mu_{BN},
  \sigma^2_{BN}` the layer's running statistics (`DeepInversionFeatureHook`
  in the authors' code; sum it over layers, the ImageNet script scales the
  first layer by `first_bn_multiplier`).

  Args:
    features: `[B, ..., C]` BN input (NHWC maps or `[B, C]`).
    running_mean, running_var: `[C]` running statistics (constants).
    axis_name: inside `pmap`/`shard_map`: batch statistics of the global
      batch (mean of the per-device means and second moments).

  Returns:
    float scalar.

  References:
    Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
    DeepInversion", CVPR 2020, Eq. 3-4.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0., 2.], [2., 2.]])        # mean [1, 2], var [1, 0]
  >>> float(bn_statistics_loss(x, jnp.zeros(2), jnp.zeros(2)))  # 1 + sqrt 5
  3.2360680103302
  """
  _common.check_float(features, "features")
  _common.check_rank(features, "features", min_ndim=2, what="([B, ..., C])")
  c = features.shape[-1]
  for name, v in (("running_mean", running_mean),
                  ("running_var", running_var)):
    _common.check_float(v, name)
    if tuple(jnp.shape(v)) != (c,):
      raise ValueError(f"`{name}` must have shape ({c},) (the channels of "
                       f"`features`); got {tuple(jnp.shape(v))}.")
  dt = _dtype(features)
  x = jnp.asarray(features, dt).reshape(-1, c)
  mean = jnp.mean(x, axis=0)
  sq = jnp.mean(x * x, axis=0)
  if axis_name is not None:
    mean, sq = jax.lax.pmean((mean, sq), axis_name)
    var = sq - mean * mean
  else:
    var = jnp.mean(jnp.square(x - mean), axis=0)
  rm = jax.lax.stop_gradient(jnp.asarray(running_mean, dt))
  rv = jax.lax.stop_gradient(jnp.asarray(running_var, dt))
  return (_safe_sqrt(jnp.sum(jnp.square(rv - var)))
          + _safe_sqrt(jnp.sum(jnp.square(rm - mean))))


def _tv_diffs(x):
  """The four neighbour differences of the reference (NHWC)."""
  return (x[:, :, :-1, :] - x[:, :, 1:, :],      # along W
          x[:, :-1, :, :] - x[:, 1:, :, :],      # along H
          x[:, 1:, :-1, :] - x[:, :-1, 1:, :],   # anti-diagonal
          x[:, :-1, :-1, :] - x[:, 1:, 1:, :])   # diagonal


def image_total_variation(images, *, kind: str = "l2") -> Array:
  r"""DeepInversion's total-variation image prior (batch-level scalar).

  With :math:`d_1 \dots d_4` the differences of horizontally, vertically
  and diagonally (both ways) adjacent pixels over the whole batch:

  * `kind='l2'`: :math:`\sum_{k=1}^4 \|d_k\|_F` (`loss_var_l2`; the
    Frobenius norm of the whole batch, not per image);
  * `kind='l1'`: :math:`\sum_{k=1}^4 \mathrm{mean}|d_k|` (`loss_var_l1`).

  (`get_image_prior_losses` in `deepinversion.py`; the CIFAR script's
  `loss_var` is the `l2` form.) Not to be confused with
  `kd_jax.losses.total_variation`, the distance between distributions.

  Args:
    images: NHWC `[B, H, W, C]`, H, W >= 2.
    kind: `'l2'` or `'l1'`.

  Returns:
    float scalar.

  References:
    Yin et al., CVPR 2020, Eq. 2 (:math:`\mathcal{R}_{TV}`); Mahendran &
    Vedaldi, "Understanding Deep Image Representations by Inverting Them",
    CVPR 2015.

  >>> import jax.numpy as jnp
  >>> x = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.)
  >>> float(image_total_variation(x, kind='l1'))   # 1/2 + 1/2 + 0 + 1
  2.0
  """
  x = _images(images, "images")
  if x.shape[1] < 2 or x.shape[2] < 2:
    raise ValueError(f"`images` needs H, W >= 2 for neighbour differences; "
                     f"got shape {tuple(x.shape)}.")
  if kind == "l2":
    return sum(_safe_sqrt(jnp.sum(jnp.square(d))) for d in _tv_diffs(x))
  if kind == "l1":
    return sum(jnp.mean(jnp.abs(d)) for d in _tv_diffs(x))
  raise ValueError(f"`kind` must be 'l2' or 'l1'; got {kind!r}.")


def image_l2_norm(images, *, where=None) -> Array:
  r"""DeepInversion's :math:`\ell_2` image prior, per image: :math:`\|x_i\|_2`.

  The ImageNet script uses `torch.norm(x.view(B, -1), dim=1).mean()` =
  `jnp.mean` of this; the CIFAR script's `torch.norm(x)` is the norm of the
  whole batch, `sqrt(sum(image_l2_norm(x) ** 2))`.

  Args:
    images: `[B, ...]` float array.
    where: optional bool mask `[B]`.

  Returns:
    `[B]`.

  >>> import jax.numpy as jnp
  >>> image_l2_norm(jnp.full((2, 2, 2, 1), 0.5)).tolist()
  [1.0, 1.0]
  """
  _common.check_float(images, "images")
  _common.check_rank(images, "images", min_ndim=2, what="([B, ...])")
  x = jnp.asarray(images, _dtype(images))
  where = _common.check_where(where, x.shape[:1])
  (x,) = _common.mask_inputs(where, x)
  per = _safe_sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))
  return _common.apply_where(per, where)


def adi_competition_loss(student_logits, teacher_logits, *,
                         temperature: float = 3.0, clip: float = 0.01
                         ) -> Array:
  r"""Adaptive DeepInversion's competition term, as the authors compute it.

  With :math:`P = \sigma(z^s/T)`, :math:`Q = \sigma(z^t/T)`, :math:`M =
  (P + Q)/2`, each clipped to :math:`[c, 1 - c]` (:math:`c` = 0.01) *after*
  `M` is formed, and the KLs averaged over the batch:

  .. math::
    \mathcal{R}_{compete} = 1 - \mathrm{clip}_{[0, 1]}\Big(
      \tfrac12 \overline{\mathrm{KL}}(M \| P) + \tfrac12
      \overline{\mathrm{KL}}(M \| Q)\Big),
    \quad \mathrm{KL}(M \| P) = \sum_k M_k (\log M_k - \log P_k)

  (`loss_verifier_cig` in `deepinversion.py`; `nn.KLDivLoss(reduction=
  'batchmean')(log P, M)` is :math:`\overline{\mathrm{KL}}(M\|P)`, the
  reverse of the paper's JS form :math:`\mathrm{KL}(P\|M)`). Minimizing it
  makes the images ones on which student and teacher *disagree*. The
  gradient flows into both logits (towards the input pixels); the clips
  make it zero for clipped probabilities and for a batch mean outside
  [0, 1].

  Args:
    student_logits, teacher_logits: `[B, K]`.
    temperature: `T` (3 in the authors' code).
    clip: `c`.

  Returns:
    float scalar.

  References:
    Yin et al., CVPR 2020, Eq. 8 (Adaptive DeepInversion).

  >>> import jax.numpy as jnp
  >>> float(adi_competition_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3))))
  1.0
  """
  for name, v in (("student_logits", student_logits),
                  ("teacher_logits", teacher_logits)):
    _common.check_float(v, name)
    _common.check_rank(v, name, ndim=2, what="([B, num_classes])")
  _common.check_same_shape(student_logits, teacher_logits, "student_logits",
                           "teacher_logits")
  dt = _dtype(student_logits, teacher_logits)
  s = jnp.asarray(student_logits, dt)
  t = jnp.asarray(teacher_logits, dt)
  _common.check_positive(temperature, "temperature")
  if isinstance(clip, (int, float)) and not 0 < clip < 0.5:
    raise ValueError(f"`clip` must be in (0, 0.5); got {clip}.")
  p = jax.nn.softmax(s / temperature, axis=-1)
  q = jax.nn.softmax(t / temperature, axis=-1)
  m = 0.5 * (p + q)
  p, q, m = (jnp.clip(v, clip, 1.0 - clip) for v in (p, q, m))
  b = s.shape[0]
  kl_mp = jnp.sum(m * (jnp.log(m) - jnp.log(p))) / b
  kl_mq = jnp.sum(m * (jnp.log(m) - jnp.log(q))) / b
  return 1.0 - jnp.clip(0.5 * kl_mp + 0.5 * kl_mq, 0.0, 1.0)
