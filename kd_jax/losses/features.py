"""Feature-based distillation losses: FitNets, AT, NST, VID, AB, FT, OFD and
ReviewKD's hierarchical context loss (FSP and KDSVD, which compare pairs of
layers, are in `kd_jax.losses.flow`).

Pure functions of arrays. Feature maps are NHWC `[B, H, W, C]` (Flax); the
references are NCHW PyTorch code, so their `[B, C, H, W]` reads as
`[B, H, W, C]` here with the same meaning. Every function validates shapes
and dtypes at trace time, computes in float32 (bfloat16/float16 inputs are
upcast), returns a float32 scalar, and treats the teacher as a constant
(`jax.lax.stop_gradient`). The outer training weights of the references
(AT x1000, NST x50, OFD x1e-3, ...) are *not* included. Conventions follow
what the published code computes (RepDistiller `distiller_zoo/`, mdistiller
`distillers/`, the authors' repositories named in each docstring);
deviations of the code from its paper are noted in each docstring.

Losses of single feature groups take one pair of arrays (the distiller sums
groups); AB, FSP, KDSVD, OFD and HCL take lists because the reference weights
or couples the groups.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm as _norm

from kd_jax.losses import _common

__all__ = [
    "fitnet_loss", "at_loss", "attention_map", "nst_loss", "vid_loss",
    "vid_init_log_scale", "ab_loss", "ft_loss", "ofd_loss", "ofd_margin",
    "hcl_loss",
]


# ----------------------------------------------------------------- helpers --

def _f32(x, name):
  _common.check_float(x, name)
  return jnp.asarray(x, jnp.float32)


def _teacher(x, name):
  return jax.lax.stop_gradient(_f32(x, name))


def _check_nhwc(x, name):
  _common.check_rank(x, name, ndim=4, what="(NHWC feature map [B, H, W, C])")


def _check_batch(a, b, name_a, name_b):
  if a.shape[0] != b.shape[0]:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same batch size (axis 0); "
        f"got {name_a}.shape={tuple(a.shape)} and "
        f"{name_b}.shape={tuple(b.shape)}.")


def _check_channels(a, b, name_a, name_b):
  if a.shape[-1] != b.shape[-1]:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same number of channels "
        f"(last axis); got {name_a}.shape={tuple(a.shape)} and "
        f"{name_b}.shape={tuple(b.shape)}.")


def _pool_pair(s, t, name_s, name_t):
  """The references' spatial-mismatch rule, with a clear error if it fails."""
  s, t = _common.pool_to_match(s, t)
  if s.shape[1:3] != t.shape[1:3]:
    raise ValueError(
        f"`{name_s}` and `{name_t}` have incompatible spatial sizes: the "
        "reference rule pools the taller map to H_small x H_small (it assumes "
        f"square maps); after pooling got {name_s} {tuple(s.shape[1:3])} and "
        f"{name_t} {tuple(t.shape[1:3])}.")
  return s, t


def _feature_pair(student, teacher, name_s, name_t):
  """Validates two NHWC maps; f32 student, stop-gradient f32 teacher, pooled."""
  s = _f32(student, name_s)
  t = _teacher(teacher, name_t)
  _check_nhwc(s, name_s)
  _check_nhwc(t, name_t)
  _check_batch(s, t, name_s, name_t)
  return _pool_pair(s, t, name_s, name_t)


def _check_groups(student, teacher, name_s, name_t, *, min_len=1):
  for v, n in ((student, name_s), (teacher, name_t)):
    if not isinstance(v, (list, tuple)):
      raise TypeError(
          f"`{n}` must be a list or tuple of feature arrays (one per layer); "
          f"got {type(v).__name__}.")
  if len(student) != len(teacher):
    raise ValueError(
        f"`{name_s}` and `{name_t}` must have the same number of layers; got "
        f"{len(student)} and {len(teacher)}.")
  if len(student) < min_len:
    raise ValueError(
        f"`{name_s}` needs at least {min_len} layer(s); got {len(student)}.")


def _power(x, p):
  """`x ** p` as torch `pow`: integer exponents stay valid for x < 0."""
  if isinstance(p, (int, float)) and float(p).is_integer():
    return x ** int(p)
  return jnp.power(x, p)


def attention_map(feat, *, p=2):
  r"""Spatial attention map of AT: `L2N(mean_c f^p)` over the flattened H*W.

  .. math:: A(f)_b = \frac{q_b}{\max(\lVert q_b \rVert_2, 10^{-12})}, \quad
     q_{b,hw} = \frac{1}{C}\sum_c f_{b,h,w,c}^{\,p}

  The power is applied before the channel mean and without an absolute value
  (torch `pow`), as in RepDistiller `Attention.at`. Returns `[B, H*W]` f32.

  >>> import jax.numpy as jnp
  >>> a = attention_map(jnp.ones((2, 3, 3, 4)))
  >>> a.shape, round(float(jnp.sum(a[0] ** 2)), 6)
  ((2, 9), 1.0)
  """
  x = _f32(feat, "feat")
  _check_nhwc(x, "feat")
  q = jnp.mean(_power(x, p), axis=-1).reshape(x.shape[0], -1)
  return _common.l2_normalize(q, axis=-1)


# ------------------------------------------------------------------ FitNets --

def fitnet_loss(student_feat, teacher_feat):
  r"""FitNets hint loss: mean squared error over all elements.

  .. math:: \mathcal{L} = \frac{1}{N}\sum (f_s - f_t)^2

  `student_feat` is the regressor (ConvReg) output, already of the teacher's
  shape; the regressor itself belongs to the distiller. Matches RepDistiller
  `HintLoss` (`nn.MSELoss()`) and mdistiller `F.mse_loss`.

  Args:
    student_feat: float array, any rank >= 1 (NHWC for conv features).
    teacher_feat: same shape; treated as a constant.

  Returns:
    float32 scalar.

  References:
    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

  >>> import jax.numpy as jnp
  >>> float(fitnet_loss(jnp.zeros((2, 4, 4, 3)), jnp.ones((2, 4, 4, 3))))
  1.0
  """
  s = _f32(student_feat, "student_feat")
  t = _teacher(teacher_feat, "teacher_feat")
  _common.check_rank(s, "student_feat", min_ndim=1)
  _common.check_same_shape(s, t, "student_feat", "teacher_feat")
  return jnp.mean((s - t) ** 2)


# ----------------------------------------------------------------------- AT --

def at_loss(student_feat, teacher_feat, *, p=2):
  r"""Attention transfer loss for one feature group.

  .. math:: \mathcal{L} = \frac{1}{B\,HW}\sum_{b,hw}
     \big(A(f_s)_{b,hw} - A(f_t)_{b,hw}\big)^2

  with `A` the normalized spatial attention map (`attention_map`). If the
  heights differ, the taller map is average-pooled to `H_small x H_small`
  first. Channel counts may differ. Matches RepDistiller `Attention(p)` and
  mdistiller `at_loss`; sum the groups and apply the weight (1000) outside.
  The paper's map uses `|f|^p` and a `beta/2` factor; the code (followed here)
  uses `f^p` and a plain mean.

  Args:
    student_feat: `[B, H, W, C_s]`.
    teacher_feat: `[B, H', W', C_t]`; treated as a constant.
    p: power applied before the channel mean (> 0).

  Returns:
    float32 scalar.

  References:
    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer",
    ICLR 2017.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  >>> float(at_loss(x, x))
  0.0
  """
  _common.check_positive(p, "p")
  s, t = _feature_pair(student_feat, teacher_feat, "student_feat",
                       "teacher_feat")
  return jnp.mean((attention_map(s, p=p) - attention_map(t, p=p)) ** 2)


# ---------------------------------------------------------------------- NST --

def _poly_kernel_mean(a, b):
  r"""mean over b, i, j of (a_{b,:,i} . b_{b,:,j})^2 for a [B, P, Ca], b [B, P, Cb].

  With G = A^T B, ||G||_F^2 = sum_{pq} (A A^T)_{pq} (B B^T)_{pq}: when the
  spatial size P is small next to the channels (late CNN stages: P = 64,
  C = 256) the two P x P Grams cost P^2 (Ca + Cb) instead of P Ca Cb.
  """
  n, hw, ca = a.shape
  cb = b.shape[-1]
  if hw * (ca + cb) < ca * cb:
    ga = jnp.einsum("bpi,bqi->bpq", a, a)
    gb = jnp.einsum("bpj,bqj->bpq", b, b)
    return jnp.sum(ga * gb) / (n * ca * cb)
  g = jnp.einsum("bpi,bpj->bij", a, b)
  return jnp.mean(g * g)


def nst_loss(student_feat, teacher_feat):
  r"""Neural selectivity transfer (squared MMD, polynomial kernel d=2, c=0).

  Each channel's spatial response is flattened and L2-normalized
  (`u = L2N(f_{b,:,c})` over H*W), then

  .. math:: \mathcal{L} = \bar k(t,t) + \bar k(s,s) - 2\,\bar k(s,t), \quad
     \bar k(a,b) = \operatorname{mean}_{b,i,j}\,(u^a_{b,i}\cdot u^b_{b,j})^2

  where each mean runs over its own `B*C_a*C_b` entries. `k(t,t)` is a
  constant. The taller map is pooled first. Kernels are per sample, so the
  loss does not couple the batch (no `axis_name`). Matches RepDistiller
  `NSTLoss` and mdistiller `nst_loss` (weight 50 outside).

  Args:
    student_feat: `[B, H, W, C_s]`.
    teacher_feat: `[B, H', W', C_t]`; treated as a constant.

  Returns:
    float32 scalar.

  References:
    Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", arXiv:1707.01219, 2017.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  >>> abs(float(nst_loss(x, x))) < 1e-6
  True
  """
  s, t = _feature_pair(student_feat, teacher_feat, "student_feat",
                       "teacher_feat")
  b, h, w = s.shape[:3]
  us = _common.l2_normalize(s.reshape(b, h * w, s.shape[-1]), axis=1)
  ut = _common.l2_normalize(t.reshape(b, h * w, t.shape[-1]), axis=1)
  return (jax.lax.stop_gradient(_poly_kernel_mean(ut, ut))
          + _poly_kernel_mean(us, us) - 2.0 * _poly_kernel_mean(us, ut))


# ---------------------------------------------------------------------- VID --

def vid_init_log_scale(init_pred_var: float = 5.0, eps: float = 1e-5) -> float:
  r"""VID's initial raw scale `s0 = log(exp(init_pred_var - eps) - 1)`.

  With it, `softplus(s0) + eps == init_pred_var` (RepDistiller default 5.0).

  >>> round(math.log1p(math.exp(vid_init_log_scale())) + 1e-5, 6)
  5.0
  """
  if not init_pred_var - eps > 0:
    raise ValueError(
        f"`init_pred_var` must be > eps={eps}; got {init_pred_var}.")
  return math.log(math.expm1(init_pred_var - eps))


def vid_loss(predicted_mean, teacher_feat, log_scale, *, eps: float = 1e-5):
  r"""Variational information distillation: Gaussian negative log-likelihood.

  .. math:: \sigma^2_c = \log(1 + e^{s_c}) + \epsilon, \qquad
     \mathcal{L} = \operatorname{mean}_{b,h,w,c}\;\tfrac12\Big(
     \frac{(\mu - f_t)^2}{\sigma^2_c} + \log \sigma^2_c\Big)

  `predicted_mean` is the regressor output `mu` (three bias-free 1x1 convs
  with ReLUs, part of the distiller); `log_scale` is the trainable raw
  per-channel scale `s` (init `vid_init_log_scale()`, giving sigma^2 = 5).
  No `log(2 pi)` constant, as in the code. Matches RepDistiller `VIDLoss`
  (where `s` is trainable; in mdistiller it is never optimized and stays at
  its initial value -- pass a constant to reproduce that). Gradients flow to
  `predicted_mean` and `log_scale`.

  Pooling: the reference pools the *student input* of the regressor when it
  is taller than the teacher (do that in the distiller, with
  `_common.adaptive_avg_pool_to`) and pools the teacher when it is taller;
  this function does the latter and rejects a taller `predicted_mean`.
  `softplus` is evaluated stably; it equals the reference's
  `log(1 + exp(s))` wherever that is finite.

  Args:
    predicted_mean: `[B, H, W, C]` (or `[B, C]` for vector features).
    teacher_feat: `[B, H', W', C]` with `H' >= H` (or `[B, C]`); constant.
    log_scale: `[C]` raw scales.
    eps: variance floor added after the softplus.

  Returns:
    float32 scalar.

  References:
    Ahn, Hu, Damianou, Lawrence & Dai, "Variational Information Distillation
    for Knowledge Transfer", CVPR 2019.

  >>> import jax.numpy as jnp
  >>> mu = jnp.zeros((2, 4, 4, 3)); s = jnp.full((3,), vid_init_log_scale())
  >>> round(float(vid_loss(mu, mu, s)), 6) == round(0.5 * math.log(5.0), 6)
  True
  """
  mu = _f32(predicted_mean, "predicted_mean")
  t = _teacher(teacher_feat, "teacher_feat")
  ls = _f32(log_scale, "log_scale")
  _common.check_positive(eps, "eps")
  if mu.ndim not in (2, 4):
    raise ValueError(
        "`predicted_mean` must be NHWC [B, H, W, C] or [B, C]; got shape "
        f"{tuple(mu.shape)}.")
  if t.ndim != mu.ndim:
    raise ValueError(
        f"`teacher_feat` must have the rank of `predicted_mean` ({mu.ndim}); "
        f"got shape {tuple(t.shape)}.")
  _check_batch(mu, t, "predicted_mean", "teacher_feat")
  _check_channels(mu, t, "predicted_mean", "teacher_feat")
  if ls.shape != (mu.shape[-1],):
    raise ValueError(
        f"`log_scale` must have shape ({mu.shape[-1]},) (one raw scale per "
        f"teacher channel); got {tuple(ls.shape)}.")
  if mu.ndim == 4:
    if mu.shape[1] > t.shape[1]:
      raise ValueError(
          f"`predicted_mean` is spatially larger than `teacher_feat` "
          f"({tuple(mu.shape[1:3])} vs {tuple(t.shape[1:3])}); as in the "
          "reference, pool the student feature *before* the regressor.")
    mu, t = _pool_pair(mu, t, "predicted_mean", "teacher_feat")
  var = jax.nn.softplus(ls) + eps
  return jnp.mean(0.5 * ((mu - t) ** 2 / var + jnp.log(var)))


# ----------------------------------------------------------------------- AB --

def ab_loss(student_preacts, teacher_preacts, *, margin: float = 1.0):
  r"""Activation-boundary loss (alternative L2 with margin), over all groups.

  For group `i` of `n` (pre-ReLU features; the student's already through its
  connector):

  .. math:: S_i = \sum \big[(s+m)^2\,\mathbb 1(s>-m \wedge t\le 0)
     + (s-m)^2\,\mathbb 1(s\le m \wedge t>0)\big], \qquad
     \mathcal{L} = \sum_i 2^{\,i-n+1}\,\frac{S_i}{B}\cdot\frac{3}{1000}

  (weights `[.25, .5, 1]` for n=3; the indicators are constants). Matches
  RepDistiller `ABLoss(feat_num, margin)`, which uses it in the
  initialization stage only. The `3/1000` factor and per-group weights are
  part of the reference loss and included here.

  Args:
    student_preacts: list of float arrays `[B, ...]`, shallow to deep.
    teacher_preacts: list of the same shapes; constants.
    margin: `m >= 0`.

  Returns:
    float32 scalar.

  References:
    Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation
    Boundaries Formed by Hidden Neurons", AAAI 2019.

  >>> import jax.numpy as jnp
  >>> s = [jnp.full((2, 4), 2.0)]; t = [jnp.ones((2, 4))]
  >>> float(ab_loss(s, t))  # s > m and t > 0: no penalty
  0.0
  """
  _check_groups(student_preacts, teacher_preacts, "student_preacts",
                "teacher_preacts")
  _common.check_nonnegative(margin, "margin")
  n = len(student_preacts)
  total = jnp.zeros((), jnp.float32)
  bsz = None
  for i, (s, t) in enumerate(zip(student_preacts, teacher_preacts)):
    ns, nt = f"student_preacts[{i}]", f"teacher_preacts[{i}]"
    s = _f32(s, ns)
    t = _teacher(t, nt)
    _common.check_rank(s, ns, min_ndim=1)
    _common.check_same_shape(s, t, ns, nt)
    if bsz is None:
      bsz = s.shape[0]
    neg = jax.lax.stop_gradient(((s > -margin) & (t <= 0)).astype(s.dtype))
    pos = jax.lax.stop_gradient(((s <= margin) & (t > 0)).astype(s.dtype))
    group = jnp.sum((s + margin) ** 2 * neg + (s - margin) ** 2 * pos)
    total = total + (2.0 ** (i - n + 1)) * group / bsz / 1000.0 * 3.0
  return total


# ----------------------------------------------------------------------- FT --

def ft_loss(student_factor, teacher_factor, *, p1=2, p2=1):
  r"""Factor-transfer loss between translator and paraphraser factors.

  .. math:: \Phi(f) = A_{p_1}(f), \qquad
     \mathcal{L} = \operatorname{mean}_{b,hw} |\Phi(f_s) - \Phi(f_t)|
     \;\;(p_2 = 1), \;\; \operatorname{mean}\,(\Phi(f_s)-\Phi(f_t))^{p_2}
     \text{ otherwise}

  where `A_p` is AT's normalized attention map (`attention_map`); the taller
  map is pooled first. Deviation from the paper, followed here: the paper
  L2-normalizes the whole factor tensor, the code (RepDistiller
  `FactorTransfer`) builds an AT-style map; also for `p2 != 1` the code takes
  `pow(p2)` without an absolute value.

  Args:
    student_factor: `[B, H, W, C_s]` translator output.
    teacher_factor: `[B, H', W', C_t]` paraphraser (encoder) output; constant.
    p1: power inside the factor map (> 0).
    p2: 1 for L1, otherwise the power of the difference.

  Returns:
    float32 scalar.

  References:
    Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via
    Factor Transfer", NeurIPS 2018.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  >>> float(ft_loss(x, x))
  0.0
  """
  _common.check_positive(p1, "p1")
  _common.check_positive(p2, "p2")
  s, t = _feature_pair(student_factor, teacher_factor, "student_factor",
                       "teacher_factor")
  d = attention_map(s, p=p1) - attention_map(t, p=p1)
  if p2 == 1:
    return jnp.mean(jnp.abs(d))
  return jnp.mean(_power(d, p2))


# ---------------------------------------------------------------------- OFD --

def ofd_margin(bn_scale, bn_bias):
  r"""OFD margin per channel from the teacher's pre-ReLU BatchNorm affine.

  The BN output of channel `c` is modelled as `N(m, s^2)` with `m = beta_c`,
  `s = |gamma_c|`; the margin is the mean of its negative part:

  .. math:: \text{margin} = m - s\,\frac{\varphi(m/s)}{\Phi(-m/s)}
     \quad\text{if } \Phi(-m/s) > 0.001, \text{ else } -3s

  as `get_margin_from_BN` in clovaai/overhaul-distillation (and mdistiller
  `OFD`). Computed in float32 (the reference computes in Python floats and
  stores float32). For `gamma_c = 0` returns `min(beta_c, 0)`, the limit the
  reference reaches where it does not divide by zero.

  Args:
    bn_scale: `[C]` BN weight `gamma` of the teacher's layer before ReLU.
    bn_bias: `[C]` BN bias `beta`.

  Returns:
    float32 `[C]` margins (all <= 0), a constant.

  References:
    Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature
    Distillation", ICCV 2019.

  >>> import jax.numpy as jnp
  >>> [round(float(v), 4) for v in ofd_margin(jnp.ones(2), jnp.zeros(2))]
  [-0.7979, -0.7979]
  """
  g = _f32(bn_scale, "bn_scale")
  m = _f32(bn_bias, "bn_bias")
  _common.check_rank(g, "bn_scale", ndim=1, what="([C])")
  _common.check_same_shape(g, m, "bn_scale", "bn_bias")
  s = jnp.abs(g)
  pos = s > 0
  s_safe = jnp.where(pos, s, 1.0)
  z = m / s_safe
  cdf = _norm.cdf(-z)
  truncated = (-s_safe * jnp.exp(-z * z / 2.0) / math.sqrt(2.0 * math.pi)
               / jnp.where(cdf > 0.001, cdf, 1.0) + m)
  margin = jnp.where(cdf > 0.001, truncated, -3.0 * s)
  margin = jnp.where(pos, margin, jnp.minimum(m, 0.0))
  return jax.lax.stop_gradient(margin)


def ofd_loss(student_preacts, teacher_preacts, margins):
  r"""OFD partial L2 distillation loss over the pre-ReLU feature groups.

  For group `i` of `n` (student already through its connector conv+BN, the
  teacher's pre-ReLU feature `t`, per-channel `margin` from `ofd_margin`):

  .. math:: \tilde t = \max(t, \text{margin}), \qquad
     S_i = \sum (s - \tilde t)^2\;\mathbb 1\big(s > \tilde t \,\vee\,
     \tilde t > 0\big), \qquad
     \mathcal{L} = \frac{1}{B}\sum_i \frac{S_i}{2^{\,n-1-i}}

  i.e. where the teacher is negative, the student is only pulled down to
  `max(t, margin)` and never pushed up from below it (a "partial" L2). clovaai's `Distiller`
  returns the sum and the training script divides by the batch *and by
  1000*; mdistiller returns the per-batch mean and multiplies by
  `FEAT_WEIGHT = 1e-3`. That 1e-3 is a training weight and, as for every
  loss here, is not included: multiply by 1e-3 outside to reproduce the
  references. If the teacher map is taller, it is average-pooled to the
  student's size (mdistiller); clovaai requires equal sizes.

  Args:
    student_preacts: list of `[B, H, W, C_l]` connector outputs.
    teacher_preacts: list of `[B, H', W', C_l]` pre-ReLU maps; constants.
    margins: list of `[C_l]` margins; constants.

  Returns:
    float32 scalar.

  References:
    Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature
    Distillation", ICCV 2019.

  >>> import jax.numpy as jnp
  >>> s = [-jnp.ones((2, 3, 3, 4))]; t = [-jnp.full((2, 3, 3, 4), 5.0)]
  >>> float(ofd_loss(s, t, [jnp.full((4,), -0.5)]))  # s <= margin, t <= margin
  0.0
  """
  _check_groups(student_preacts, teacher_preacts, "student_preacts",
                "teacher_preacts")
  if not isinstance(margins, (list, tuple)):
    raise TypeError(
        "`margins` must be a list with one [C] array per group; got "
        f"{type(margins).__name__}.")
  if len(margins) != len(student_preacts):
    raise ValueError(
        f"`margins` must have one [C] array per group ({len(student_preacts)}"
        f"); got {len(margins)}.")
  n = len(student_preacts)
  total = jnp.zeros((), jnp.float32)
  bsz = None
  for i, (s, t, mg) in enumerate(zip(student_preacts, teacher_preacts,
                                     margins)):
    s, target = _ofd_group(i, s, t, mg)
    if bsz is None:
      bsz = s.shape[0]
    mask = jax.lax.stop_gradient(((s > target) | (target > 0)).astype(s.dtype))
    total = total + jnp.sum((s - target) ** 2 * mask) / (2.0 ** (n - 1 - i))
  return total / bsz


def _ofd_group(i, s, t, mg):
  """Checked float32 student map and its target `max(t, margin)` of OFD
  group `i` (the teacher average-pooled to the student's size)."""
  ns, nt, nm = (f"student_preacts[{i}]", f"teacher_preacts[{i}]",
                f"margins[{i}]")
  s = _f32(s, ns)
  t = _teacher(t, nt)
  mg = jax.lax.stop_gradient(_f32(mg, nm))
  _check_nhwc(s, ns)
  _check_nhwc(t, nt)
  _check_batch(s, t, ns, nt)
  _check_channels(s, t, ns, nt)
  if mg.shape != (s.shape[-1],):
    raise ValueError(
        f"`{nm}` must have shape ({s.shape[-1]},) (one margin per channel); "
        f"got {tuple(mg.shape)}.")
  if t.shape[1] < s.shape[1]:
    raise ValueError(
        f"`{nt}` is spatially smaller than `{ns}` ({tuple(t.shape[1:3])} vs "
        f"{tuple(s.shape[1:3])}); OFD pools only the teacher.")
  if t.shape[1:3] != s.shape[1:3]:
    t = _common.adaptive_avg_pool_to(t, s.shape[1])
    if t.shape[1:3] != s.shape[1:3]:
      raise ValueError(
          f"`{nt}` cannot be pooled to the size of `{ns}` "
          f"({tuple(s.shape[1:3])}); maps must be square.")
  return s, jnp.maximum(t, mg)


# ------------------------------------------------------------- ReviewKD HCL --

def hcl_loss(student_feats, teacher_feats, *, levels: Sequence[int] = (4, 2, 1)):
  r"""ReviewKD hierarchical context loss, summed over feature groups.

  For each group of height `H` (student already through the ABF fusion):

  .. math:: \mathcal{L}_g = \frac{\operatorname{MSE}(f_s, f_t) + \sum_{l}
     2^{-j(l)}\,\operatorname{MSE}(P_l f_s, P_l f_t)}{1 + \sum_l 2^{-j(l)}}

  where `l` runs over `levels` with `l < H` (others are skipped), `P_l` is
  `adaptive_avg_pool2d` to `l x l`, and `j(l)` = 1, 2, ... counts the levels
  used so far (weights 1/2, 1/4, 1/8). Matches `hcl` in
  dvlab-research/ReviewKD and mdistiller `hcl_loss`; the warm-up factor and
  the loss weight are applied outside.

  Args:
    student_feats: list of `[B, H, W, C]` (pooled features as `[B, 1, 1, C]`).
    teacher_feats: list of the same shapes; constants.
    levels: pooling output sizes, in the reference order.

  Returns:
    float32 scalar.

  References:
    Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review",
    CVPR 2021.

  >>> import jax.numpy as jnp
  >>> s = [jnp.zeros((1, 4, 4, 2))]; t = [jnp.ones((1, 4, 4, 2))]
  >>> float(hcl_loss(s, t))  # every level's MSE is 1
  1.0
  """
  _check_groups(student_feats, teacher_feats, "student_feats",
                "teacher_feats")
  for l in levels:
    if not isinstance(l, int) or l < 1:
      raise ValueError(f"`levels` must hold integers >= 1; got {levels!r}.")
  total = jnp.zeros((), jnp.float32)
  for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
    ns, nt = f"student_feats[{i}]", f"teacher_feats[{i}]"
    s = _f32(s, ns)
    t = _teacher(t, nt)
    _check_nhwc(s, ns)
    _common.check_same_shape(s, t, ns, nt)
    h = s.shape[1]
    loss = jnp.mean((s - t) ** 2)
    cnt = tot = 1.0
    for l in levels:
      if l >= h:
        continue
      cnt /= 2.0
      ps = _common.adaptive_avg_pool_to(s, l)
      pt = _common.adaptive_avg_pool_to(t, l)
      loss = loss + jnp.mean((ps - pt) ** 2) * cnt
      tot += cnt
    total = total + loss / tot
  return total
