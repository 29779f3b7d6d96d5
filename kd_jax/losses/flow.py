"""Losses on the flow between layers: FSP and KDSVD.

Both compare how a network transforms its features from one layer to the
next (FSP's Gram matrices of consecutive feature maps; KDSVD's leading
singular vectors of consecutive layers and their correlations), so they take
lists of feature maps (NHWC) and return a float32 scalar; the teacher is a
constant. Conventions and references in each docstring (RepDistiller
`distiller_zoo/FSP.py`, `KDSVD.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _common
from kd_jax.losses.features import _check_batch
from kd_jax.losses.features import _check_channels
from kd_jax.losses.features import _check_groups
from kd_jax.losses.features import _check_nhwc
from kd_jax.losses.features import _f32
from kd_jax.losses.features import _pool_pair
from kd_jax.losses.features import _teacher

__all__ = ["fsp_loss", "kdsvd_loss"]


# ---------------------------------------------------------------------- FSP --

def _fsp_matrices(feats, prefix):
  out = []
  for i in range(len(feats) - 1):
    bot, top = feats[i], feats[i + 1]
    bot, top = _pool_pair(bot, top, f"{prefix}[{i}]", f"{prefix}[{i + 1}]")
    b = bot.shape[0]
    bot = bot.reshape(b, -1, bot.shape[-1])
    top = top.reshape(b, -1, top.shape[-1])
    # G[b, c_top, c_bot] = mean_hw top[b, hw, c_top] * bot[b, hw, c_bot]
    out.append(jnp.einsum("bpt,bpc->btc", top, bot) / bot.shape[1])
  return out


def fsp_loss(student_feats, teacher_feats):
  r"""Flow-of-solution-procedure loss over consecutive layer pairs.

  For layers `l` (bottom) and `l+1` (top), pooled to the same size (taller
  pooled to `H_small x H_small`):

  .. math:: G_{b,j,i} = \frac{1}{HW}\sum_{hw} f^{l}_{b,hw,i}\,f^{l+1}_{b,hw,j},
     \qquad \mathcal{L} = \sum_l \operatorname{mean}\,(G^s - G^t)^2

  Student and teacher channel counts must match at every layer (spatial sizes
  may differ). Matches RepDistiller `FSP` (groups summed by the trainer).

  Args:
    student_feats: list (>= 2) of `[B, H_l, W_l, C_l]`.
    teacher_feats: list of `[B, H'_l, W'_l, C_l]`; constants.

  Returns:
    float32 scalar.

  References:
    Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast
    Optimization, Network Minimization and Transfer Learning", CVPR 2017.

  >>> import jax.numpy as jnp
  >>> f = [jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 5))]
  >>> float(fsp_loss(f, f))
  0.0
  """
  _check_groups(student_feats, teacher_feats, "student_feats",
                "teacher_feats", min_len=2)
  ss, ts = [], []
  for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
    ns, nt = f"student_feats[{i}]", f"teacher_feats[{i}]"
    s = _f32(s, ns)
    t = _teacher(t, nt)
    _check_nhwc(s, ns)
    _check_nhwc(t, nt)
    _check_batch(s, t, ns, nt)
    _check_channels(s, t, ns, nt)
    ss.append(s)
    ts.append(t)
  gs = _fsp_matrices(ss, "student_feats")
  gt = _fsp_matrices(ts, "teacher_feats")
  return sum(jnp.mean((a - b) ** 2) for a, b in zip(gs, gt))


# -------------------------------------------------------------------- KDSVD --

def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _top_right_singular(f, n):
  """Top-n right singular vectors (columns, L2N) and L2N singular values."""
  b, h, w, c = f.shape
  x = f.reshape(b, h * w, c)            # RepDistiller's [B, HW, C] matrix
  _, sv, vh = jnp.linalg.svd(x, full_matrices=False)
  v = _finite(jnp.swapaxes(vh, -1, -2))  # [B, C, r]
  sv = _finite(sv)
  n = min(n, v.shape[-1])
  v = _common.l2_normalize(v[:, :, :n], axis=1)
  sv = _common.l2_normalize(sv[:, :n], axis=1)
  return v, sv


def _fix_sign(v):
  """Deterministic sign: the largest-|.| entry of every column is positive."""
  idx = jnp.argmax(jnp.abs(v), axis=1)                      # [B, n]
  pivot = jnp.take_along_axis(v, idx[:, None, :], axis=1)   # [B, 1, n]
  return v * jnp.where(pivot < 0, -1.0, 1.0)


def kdsvd_loss(student_feats, teacher_feats, *, k: int = 1):
  r"""KD via SVD (self-supervised KD with SVD), over a list of layers.

  Per layer, the matrix `X = f.reshape(B, H*W, C)` is decomposed, `X = U S
  V^T`. The teacher keeps its top `k` right singular vectors, the student
  `k+3`; columns are L2-normalized and non-finite values zeroed. Each teacher
  column `j` selects the student column with the largest `|cos|` and the
  student is multiplied by its sign (the mask is a constant). Both are scaled
  by the teacher's L2-normalized top-`k` singular values. For consecutive
  layers `l-1, l`:

  .. math:: R_{b,a,a',j} = \exp\!\big(-(V^{l}_{b,a,j} - V^{l-1}_{b,a',j})^2/8
     \big), \qquad \mathcal{L} = \sum_{l\ge1}\frac{1}{B}\sum
     (R^s - R^t)^2

  (non-finite terms zeroed; gradient flows into both student layers).
  Matches RepDistiller `KDSVD(k)` on its `[B, HW, C]` matrix -- mdistiller
  uses `f.view(B, C*H, W)`, a different matrix; for non-square maps the
  NHWC reshape here generalizes the reference's `H*H`.

  **Sign convention** (the reference leaves it to LAPACK, and the loss depends
  on it): every teacher singular vector is flipped so that its entry of
  largest magnitude is positive. The student's signs are aligned to the
  teacher's by the reference's mask, so they do not matter.

  Student and teacher channel counts must match at every layer. The gradient
  through the SVD is undefined for repeated singular values (as in torch).

  Args:
    student_feats: list of `[B, H_l, W_l, C_l]`.
    teacher_feats: list of `[B, H'_l, W'_l, C_l]`; constants.
    k: number of teacher singular vectors (>= 1).

  Returns:
    float32 scalar (0 for a single layer).

  References:
    Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular
    Value Decomposition", ECCV 2018.

  >>> import jax, jax.numpy as jnp
  >>> f = [jax.random.normal(jax.random.PRNGKey(i), (2, 4, 4, 5)) for i in (0, 1)]
  >>> abs(float(kdsvd_loss(f, f))) < 1e-6
  True
  """
  _check_groups(student_feats, teacher_feats, "student_feats",
                "teacher_feats")
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"`k` must be an integer >= 1; got {k!r}.")
  total = jnp.zeros((), jnp.float32)
  bsz = None
  prev_s = prev_t = None
  for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
    ns, nt = f"student_feats[{i}]", f"teacher_feats[{i}]"
    fs = _f32(fs, ns)
    ft = _teacher(ft, nt)
    _check_nhwc(fs, ns)
    _check_nhwc(ft, nt)
    _check_batch(fs, ft, ns, nt)
    _check_channels(fs, ft, ns, nt)
    if bsz is None:
      bsz = fs.shape[0]
    vt, st = _top_right_singular(ft, k)
    vt = _fix_sign(vt)
    vs, _ = _top_right_singular(fs, k + 3)
    cos = jnp.einsum("bci,bcj->bij", vs, vt)                 # [B, ns, nt]
    abs_cos = jnp.abs(cos)
    mask = jnp.where(abs_cos == jnp.max(abs_cos, axis=1, keepdims=True),
                     jnp.sign(cos), 0.0)
    vs = jnp.einsum("bci,bij->bcj", vs, jax.lax.stop_gradient(mask))
    vt = vt * st[:, None, :]
    vs = vs * st[:, None, :]
    if i > 0:
      rs = jnp.exp(-(vs[:, :, None, :] - prev_s[:, None, :, :]) ** 2 / 8.0)
      rt = jnp.exp(-(vt[:, :, None, :] - prev_t[:, None, :, :]) ** 2 / 8.0)
      total = total + jnp.sum(_finite((rs - rt) ** 2)) / bsz
    prev_s, prev_t = vs, vt
  return total
