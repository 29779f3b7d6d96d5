"""Relation-based distillation losses: SP, PKT, RKD, CC and CRD.

These losses couple the samples of a batch, so under data parallelism each
device's shard alone would give a different loss. Every one takes
`axis_name=None`; inside `pmap`/`shard_map` over that axis, pass its name and
the inputs are all-gathered (`_common.all_gather_batch`, device order) so the
*value* on every device equals the 1-device value on the global batch. The
per-device gradient then follows JAX's collective semantics: the transpose of
`all_gather` is a reduce-scatter, so the gradient w.r.t. a device's shard is
`n_devices` times the matching slice of the global-batch gradient -- exactly
what makes the usual `pmean` of parameter gradients equal the 1-device
gradient (mean over devices of `n * (local share)` = sum of shares). Under
`jit` with a sharded batch none of this is needed.

Inputs are `[B, ...]` and flattened to `[B, D]`. Computation is float32, the
teacher is a constant (except CRD's trainable teacher-side embedding) and
outer training weights (SP x3000, PKT x30000, CRD x0.8, ...) are not
included. Conventions: RepDistiller's `distiller_zoo/` (SP, PKT, RKD, CC) and
`crd/` (CRD), as each docstring says. Scalars are returned as 0-d arrays (SP and CRD references return
shape `[1]`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _common

__all__ = [
    "sp_loss", "pkt_loss", "rkd_loss", "cc_loss", "crd_loss",
    "crd_normalization", "crd_memory_update", "CRD_TEMPERATURE",
]

# The references read tau back from a float32 buffer.
CRD_TEMPERATURE = float(np.float32(0.07))


def _pair(student, teacher, name_s, name_t, *, axis_name, same_shape=False,
          min_batch=1):
  _common.check_float(student, name_s)
  _common.check_float(teacher, name_t)
  _common.check_rank(student, name_s, min_ndim=2, what="([B, ...])")
  _common.check_rank(teacher, name_t, min_ndim=2, what="([B, ...])")
  if same_shape:
    _common.check_same_shape(student, teacher, name_s, name_t)
  elif jnp.shape(student)[0] != jnp.shape(teacher)[0]:
    raise ValueError(
        f"`{name_s}` and `{name_t}` must have the same batch size (axis 0); "
        f"got {name_s}.shape={tuple(jnp.shape(student))} and "
        f"{name_t}.shape={tuple(jnp.shape(teacher))}.")
  s = jnp.asarray(student, jnp.float32)
  t = jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32))
  s = _common.all_gather_batch(s, axis_name)
  t = _common.all_gather_batch(t, axis_name)
  s = s.reshape(s.shape[0], -1)
  t = t.reshape(t.shape[0], -1)
  if s.shape[0] < min_batch:
    raise ValueError(
        f"this loss needs a (global) batch of at least {min_batch} samples; "
        f"got `{name_s}` with batch {s.shape[0]}.")
  return s, t


# ----------------------------------------------------------------------- SP --

def sp_loss(student_feat, teacher_feat, *, axis_name: Optional[str] = None):
  r"""Similarity-preserving loss.

  .. math:: \tilde G = \operatorname{L2N_{rows}}(F F^\top), \qquad
     \mathcal{L} = \frac{1}{B^2}\lVert \tilde G_t - \tilde G_s \rVert_F^2

  with `F` the features flattened to `[B, D]` and `L2N` clamping the row norm
  at 1e-12. Matches RepDistiller `Similarity` and mdistiller `sp_loss`
  (weight 3000 outside; the reference returns shape `[1]`, this a scalar).

  Args:
    student_feat: `[B, ...]` float array.
    teacher_feat: `[B, ...]` (any feature size); constant.
    axis_name: all-gather the batch over this `pmap`/`shard_map` axis.

  Returns:
    float32 scalar.

  References:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(12.).reshape(3, 4)
  >>> float(sp_loss(x, 2 * x))  # row-normalized Grams are scale invariant
  0.0
  """
  s, t = _pair(student_feat, teacher_feat, "student_feat", "teacher_feat",
               axis_name=axis_name)
  b = s.shape[0]
  gs = _common.l2_normalize(s @ s.T, axis=1)
  gt = _common.l2_normalize(t @ t.T, axis=1)
  return jnp.sum((gt - gs) ** 2) / (b * b)


# ---------------------------------------------------------------------- PKT --

def _pkt_probs(f, eps):
  f = f / (_common.safe_norm(f, axis=1, keepdims=True) + eps)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  m = (f @ f.T + 1.0) / 2.0
  return m / jnp.sum(m, axis=1, keepdims=True)


def pkt_loss(student_emb, teacher_emb, *, eps: float = 1e-7,
             axis_name: Optional[str] = None):
  r"""Probabilistic knowledge transfer (cosine-kernel conditional densities).

  .. math:: \hat f = \frac{f}{\lVert f\rVert_2 + \epsilon}, \quad
     P_{ij} = \frac{(\hat f_i\cdot\hat f_j + 1)/2}
     {\sum_{j'} (\hat f_i\cdot\hat f_{j'} + 1)/2}, \quad
     \mathcal{L} = \frac{1}{B^2}\sum_{i,j} P^t_{ij}\,
     \log\frac{P^t_{ij}+\epsilon}{P^s_{ij}+\epsilon}

  The eps is *added* to the norm (NaNs zeroed, as in the code); the mean runs
  over all `B^2` entries, diagonal included (not a per-row KL sum). Matches
  RepDistiller `PKT` and mdistiller `pkt_loss` (weight 30000 outside).
  With `eps=0` a zero row gives NaN gradients, as in the reference.

  Args:
    student_emb: `[B, ...]` (flattened to `[B, D_s]`).
    teacher_emb: `[B, ...]`; constant.
    eps: the reference's 1e-7 (>= 0).
    axis_name: all-gather the batch over this axis.

  Returns:
    float32 scalar.

  References:
    Passalis & Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018.

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(12.).reshape(3, 4)
  >>> abs(float(pkt_loss(x, x))) < 1e-7
  True
  """
  _common.check_nonnegative(eps, "eps")
  s, t = _pair(student_emb, teacher_emb, "student_emb", "teacher_emb",
               axis_name=axis_name)
  ps = _pkt_probs(s, eps)
  pt = _pkt_probs(t, eps)
  return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


# ---------------------------------------------------------------------- RKD --

def _pdist(e, squared):
  sq = jnp.sum(e * e, axis=1)
  d = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (e @ e.T), 1e-12)
  if not squared:
    d = jnp.sqrt(d)
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _normalized_pdist(e, squared):
  d = _pdist(e, squared)
  pos = d > 0
  mean = jnp.sum(jnp.where(pos, d, 0.0)) / jnp.sum(pos)
  return d / mean


def _angles(e):
  r"""`a[i, j, k] = <v_ij, v_ik>`, `v_ij = L2N(e_j - e_i)`, via one B x B Gram.

  $(e_j - e_i) \cdot (e_k - e_i) = G_{jk} - G_{ij} - G_{ik} + G_{ii}$ with
  $G = e e^\top$ of the batch-centred embeddings (angles are translation
  invariant; centring keeps the cancellation small): a `[B, B] x D` product
  instead of the `[B, B, D] x [B, D, B]` batched one. The norms
  $\lVert e_j - e_i \rVert$ come from the differences themselves, so a
  duplicate row gives exactly the reference's zero vector (angle 0).
  """
  e = e - jnp.mean(e, axis=0, keepdims=True)
  g = e @ e.T
  num = (g[None, :, :] - g[:, :, None] - g[:, None, :]
         + jnp.diagonal(g)[:, None, None])
  n = _common.safe_norm(e[None, :, :] - e[:, None, :], axis=-1)  # n[i, j]
  # torch F.normalize: x / max(|x|, 1e-12); the zero vector stays 0.
  inv = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1e-12), 0.0)
  return num * inv[:, :, None] * inv[:, None, :]


def _smooth_l1(x):
  ax = jnp.abs(x)
  return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def rkd_loss(student_emb, teacher_emb, *, distance_weight: float = 25.0,
             angle_weight: float = 50.0, squared: bool = False,
             axis_name: Optional[str] = None):
  r"""Relational KD: distance-wise plus angle-wise potentials.

  Distances by the Gram expansion, clamped, diagonal set to 0, normalized by
  the mean of the positive entries (the student's normalizer is *not*
  detached):

  .. math:: d_{ij} = \sqrt{\max(\lVert e_i\rVert^2 + \lVert e_j\rVert^2 -
     2 e_i\!\cdot\! e_j,\;10^{-12})}\;(i\ne j), \quad
     \mathcal{L}_d = \operatorname{mean}_{B^2}\operatorname{SL1}(d^s/\mu_s,\,
     d^t/\mu_t)

  .. math:: v_{ij} = \operatorname{L2N}(e_j - e_i), \quad
     a_{ijk} = v_{ij}\cdot v_{ik}, \quad
     \mathcal{L}_a = \operatorname{mean}_{B^3}\operatorname{SL1}(a^s, a^t)

  `L = distance_weight * L_d + angle_weight * L_a`; SL1 is smooth-L1 with
  beta=1. Means include the zero diagonal (`j=i` or `k=i` give `v_{ii}=0`,
  with a finite zero gradient). `squared=True` skips the sqrt (mdistiller
  option). Matches RepDistiller `RKDLoss(25, 50)` and mdistiller `rkd_loss`.

  Args:
    student_emb: `[B, ...]` (flattened), global batch >= 2.
    teacher_emb: `[B, ...]`; constant.
    distance_weight: weight of the distance term.
    angle_weight: weight of the angle term.
    squared: use squared distances.
    axis_name: all-gather the batch over this axis.

  Returns:
    float32 scalar.

  References:
    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([[0., 0.], [1., 0.], [0., 2.]])
  >>> abs(float(rkd_loss(x, 3 * x))) < 1e-6  # invariant to scale
  True
  """
  s, t = _pair(student_emb, teacher_emb, "student_emb", "teacher_emb",
               axis_name=axis_name, min_batch=2)
  loss_d = jnp.mean(_smooth_l1(_normalized_pdist(s, squared)
                               - _normalized_pdist(t, squared)))
  loss_a = jnp.mean(_smooth_l1(_angles(s) - _angles(t)))
  return distance_weight * loss_d + angle_weight * loss_a


# ----------------------------------------------------------------------- CC --

def cc_loss(student_emb, teacher_emb, *, axis_name: Optional[str] = None):
  r"""Correlation congruence as implemented in RepDistiller `Correlation`.

  .. math:: \delta = |f_s - f_t|, \qquad
     \mathcal{L} = \frac{1}{B-1}\sum_{i=0}^{B-2}\sum_d
     \delta_{i,d}\,\delta_{i+1,d}

  Deviation from the paper, followed here: the paper's CC matches
  kernel-based correlation matrices of the batch; the code multiplies the
  absolute differences of *consecutive* samples, so the value depends on the
  batch order. Under `axis_name` the global batch is gathered in device order
  (the order `pmap`/`jit` sharding split it in), so pairs that straddle shard
  boundaries are included exactly as on one device. The embedding layers are
  the distiller's. OFAKD's `Correlation` multiplies this by 0.02 outside.

  Args:
    student_emb: `[B, ...]` embedded student features; global batch >= 2.
    teacher_emb: same shape; constant.
    axis_name: all-gather the batch over this axis.

  Returns:
    float32 scalar.

  References:
    Peng et al., "Correlation Congruence for Knowledge Distillation",
    ICCV 2019.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1., 0.], [2., 0.], [0., 0.]]); t = jnp.zeros((3, 2))
  >>> float(cc_loss(s, t))  # (1*2 + 2*0) / 2
  1.0
  """
  s, t = _pair(student_emb, teacher_emb, "student_emb", "teacher_emb",
               axis_name=axis_name, same_shape=True, min_batch=2)
  delta = jnp.abs(s - t)
  return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


# ---------------------------------------------------------------------- CRD --

def _check_crd(student_emb, teacher_emb, student_memory, teacher_memory,
               contrast_idx):
  for x, n in ((student_emb, "student_emb"), (teacher_emb, "teacher_emb"),
               (student_memory, "student_memory"),
               (teacher_memory, "teacher_memory")):
    _common.check_float(x, n)
    _common.check_rank(x, n, ndim=2)
  _common.check_same_shape(student_emb, teacher_emb, "student_emb",
                           "teacher_emb")
  _common.check_same_shape(student_memory, teacher_memory, "student_memory",
                           "teacher_memory")
  if jnp.shape(student_memory)[1] != jnp.shape(student_emb)[1]:
    raise ValueError(
        "memory banks must be [N, D] with D the embedding size "
        f"{jnp.shape(student_emb)[1]}; got student_memory.shape="
        f"{tuple(jnp.shape(student_memory))}.")
  dt = jnp.result_type(contrast_idx)
  if not jnp.issubdtype(dt, jnp.integer):
    raise TypeError(
        f"`contrast_idx` must hold integer dataset indices; got dtype {dt}.")
  b = jnp.shape(student_emb)[0]
  if jnp.ndim(contrast_idx) != 2 or jnp.shape(contrast_idx)[0] != b or (
      jnp.shape(contrast_idx)[1] < 2):
    raise ValueError(
        f"`contrast_idx` must have shape [{b}, K+1] with K >= 1 (column 0 the "
        f"positive's index); got {tuple(jnp.shape(contrast_idx))}.")
  s = jnp.asarray(student_emb, jnp.float32)
  t = jnp.asarray(teacher_emb, jnp.float32)  # trainable teacher-side Embed
  ms = jax.lax.stop_gradient(jnp.asarray(student_memory, jnp.float32))
  mt = jax.lax.stop_gradient(jnp.asarray(teacher_memory, jnp.float32))
  return s, t, ms, mt, jnp.asarray(contrast_idx, jnp.int32)


def _crd_scores(s, t, ms, mt, cidx, temperature):
  # out_s: student anchor vs. the teacher bank; out_t: teacher vs. student bank
  out_s = jnp.exp(jnp.einsum("bkd,bd->bk", mt[cidx], s) / temperature)
  out_t = jnp.exp(jnp.einsum("bkd,bd->bk", ms[cidx], t) / temperature)
  return out_s, out_t


def crd_normalization(student_emb, teacher_emb, student_memory,
                      teacher_memory, contrast_idx, *,
                      temperature: float = CRD_TEMPERATURE,
                      axis_name: Optional[str] = None):
  r"""CRD's partition-function estimates `(Z_s, Z_t)`, computed once.

  .. math:: Z_s = N\cdot\operatorname{mean}_{b,k}
     \exp(\langle m^t_{c_{bk}}, e^s_b\rangle/\tau), \quad
     Z_t = N\cdot\operatorname{mean}_{b,k}
     \exp(\langle m^s_{c_{bk}}, e^t_b\rangle/\tau)

  RepDistiller `ContrastMemory` sets them on its first call (`Z_v1`,
  `Z_v2`) and keeps them fixed; a distiller computes them on the first batch,
  stores them in its state and passes them to `crd_loss`. Returned as
  stop-gradient float32 scalars; with `axis_name` the mean is global.

  >>> import jax.numpy as jnp
  >>> e = jnp.zeros((2, 3)); mem = jnp.zeros((5, 3))
  >>> [float(z) for z in crd_normalization(e, e, mem, mem, jnp.zeros((2, 4), jnp.int32))]
  [5.0, 5.0]
  """
  s, t, ms, mt, cidx = _check_crd(student_emb, teacher_emb, student_memory,
                                  teacher_memory, contrast_idx)
  _common.check_positive(temperature, "temperature")
  out_s, out_t = _crd_scores(s, t, ms, mt, cidx, temperature)
  n = ms.shape[0]
  zs, zt = jnp.mean(out_s), jnp.mean(out_t)
  if axis_name is not None:
    zs, zt = jax.lax.pmean((zs, zt), axis_name)
  return jax.lax.stop_gradient(zs * n), jax.lax.stop_gradient(zt * n)


def _nce(x, n_data, eps=1e-7):
  m = x.shape[1] - 1
  mpn = m / float(n_data)
  log_d1 = jnp.log(x[:, 0] / (x[:, 0] + mpn + eps))
  log_d0 = jnp.log(mpn / (x[:, 1:] + mpn + eps))
  return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / x.shape[0]


def crd_loss(student_emb, teacher_emb, student_memory, teacher_memory,
             contrast_idx, *, z_student, z_teacher,
             temperature: float = CRD_TEMPERATURE,
             axis_name: Optional[str] = None):
  r"""Contrastive representation distillation (NCE, memory bank given).

  With `c = contrast_idx` (`[B, K+1]`, column 0 the positive = the sample's
  dataset index), the banks `m^s, m^t` (`[N, D]`, as before this step's
  update, constants) and the L2-normalized embeddings `e^s, e^t`:

  .. math:: x^s_{bk} = \exp(\langle m^t_{c_{bk}}, e^s_b\rangle/\tau)/Z_s,
     \quad x^t_{bk} = \exp(\langle m^s_{c_{bk}}, e^t_b\rangle/\tau)/Z_t

  .. math:: h(x) = -\frac1B\Big(\sum_b \log\frac{x_{b0}}{x_{b0}+KP_n+\epsilon}
     + \sum_{b,k\ge1}\log\frac{KP_n}{x_{bk}+KP_n+\epsilon}\Big), \quad
     \mathcal{L} = h(x^s) + h(x^t)

  with `P_n = 1/N`, `eps = 1e-7`, `tau = float32(0.07)`. Unlike the other
  losses, *both* embeddings receive gradients: in the reference both `Embed`
  heads (linear + L2N) are trainable, only the teacher network's features
  that feed the teacher head are constants. The bank rows are constants.
  Pure: `z_student`/`z_teacher` come from `crd_normalization` (fixed after
  the first step) and the momentum update is `crd_memory_update`. Matches
  RepDistiller `CRDLoss`/`ContrastMemory` (weight 0.8 outside).

  Args:
    student_emb: `[B, D]` L2-normalized student embedding (`Embed` output,
      which divides by the plain norm, no eps).
    teacher_emb: `[B, D]` L2-normalized teacher embedding (its `Embed` head
      is trainable, so it is differentiated too).
    student_memory: `[N, D]` student bank (`memory_v1`).
    teacher_memory: `[N, D]` teacher bank (`memory_v2`).
    contrast_idx: int `[B, K+1]`.
    z_student: `Z_v1` (student anchor vs. teacher bank).
    z_teacher: `Z_v2`.
    temperature: tau.
    axis_name: the loss is a per-sample mean; with `axis_name` it is
      `pmean`-ed so every device holds the global-batch value.

  Returns:
    float32 scalar.

  References:
    Tian, Krishnan & Isola, "Contrastive Representation Distillation",
    ICLR 2020.

  >>> import jax.numpy as jnp
  >>> e = jnp.zeros((2, 3)); mem = jnp.zeros((5, 3)); c = jnp.zeros((2, 2), jnp.int32)
  >>> round(float(crd_loss(e, e, mem, mem, c, z_student=5., z_teacher=5.)), 4)
  2.7726
  """
  s, t, ms, mt, cidx = _check_crd(student_emb, teacher_emb, student_memory,
                                  teacher_memory, contrast_idx)
  _common.check_positive(temperature, "temperature")
  _common.check_positive(z_student, "z_student")
  _common.check_positive(z_teacher, "z_teacher")
  out_s, out_t = _crd_scores(s, t, ms, mt, cidx, temperature)
  zs = jax.lax.stop_gradient(jnp.asarray(z_student, jnp.float32))
  zt = jax.lax.stop_gradient(jnp.asarray(z_teacher, jnp.float32))
  n = ms.shape[0]
  loss = _nce(out_s / zs, n) + _nce(out_t / zt, n)
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def crd_memory_update(memory, emb, idx, *, momentum: float = 0.5,
                      axis_name: Optional[str] = None):
  r"""CRD's momentum update of one memory bank (pure; returns the new bank).

  .. math:: m_{y_b} \leftarrow \frac{\mu\,m_{y_b} + (1-\mu)\,e_b}
     {\lVert \mu\,m_{y_b} + (1-\mu)\,e_b \rVert_2}

  (plain norm, no eps), as `ContrastMemory.forward` after computing the loss.
  With `axis_name`, the embeddings and indices of all devices are gathered
  first so every replica's bank receives the global batch's update. Indices
  are expected to be distinct within the (global) batch.

  Args:
    memory: `[N, D]` bank.
    emb: `[B, D]` this step's embeddings for the bank (student -> `memory_v1`).
    idx: int `[B]` dataset indices.
    momentum: mu in [0, 1].
    axis_name: gather over this axis.

  Returns:
    the updated `[N, D]` bank, float32, no gradient.

  >>> import jax.numpy as jnp
  >>> m = crd_memory_update(jnp.ones((3, 2)), jnp.zeros((1, 2)), jnp.array([1]))
  >>> [round(float(v), 4) for v in m[1]]
  [0.7071, 0.7071]
  """
  _common.check_float(memory, "memory")
  _common.check_float(emb, "emb")
  _common.check_rank(memory, "memory", ndim=2, what="([N, D])")
  _common.check_rank(emb, "emb", ndim=2, what="([B, D])")
  if jnp.shape(memory)[1] != jnp.shape(emb)[1]:
    raise ValueError(
        f"`emb` must be [B, {jnp.shape(memory)[1]}] to match the bank; got "
        f"{tuple(jnp.shape(emb))}.")
  if not jnp.issubdtype(jnp.result_type(idx), jnp.integer) or (
      jnp.shape(idx) != (jnp.shape(emb)[0],)):
    raise ValueError(
        f"`idx` must be an integer array of shape ({jnp.shape(emb)[0]},); got "
        f"{jnp.result_type(idx)} {tuple(jnp.shape(idx))}.")
  if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
    raise ValueError(f"`momentum` must be in [0, 1]; got {momentum}.")
  mem = jax.lax.stop_gradient(jnp.asarray(memory, jnp.float32))
  e = jax.lax.stop_gradient(jnp.asarray(emb, jnp.float32))
  idx = jnp.asarray(idx, jnp.int32)
  e = _common.all_gather_batch(e, axis_name)
  idx = _common.all_gather_batch(idx, axis_name)
  pos = mem[idx] * momentum + e * (1.0 - momentum)
  pos = pos / jnp.sqrt(jnp.sum(pos * pos, axis=1, keepdims=True))
  return mem.at[idx].set(pos)
