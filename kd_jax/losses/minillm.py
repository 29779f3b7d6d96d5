r"""MiniLLM's policy-gradient terms (Gu et al., ICLR 2024), per token.

MiniLLM minimizes the *sequence-level* reverse KL
:math:`\mathrm{KL}(q_\theta \| p) = \mathbb E_{y \sim q_\theta}
\sum_t \log \frac{q_\theta(y_t \mid y_{<t}, x)}{p(y_t \mid y_{<t}, x)}` of the
student :math:`q_\theta` from the teacher :math:`p` by policy gradient on the
student's own samples. The authors' code (microsoft/LMOps ``minillm/``,
``minillm/sampler.py``, ``losses.py``, ``reward.py``, ``utils.py``) splits one
PPO-style update into the functions of this module; with ``lp`` the teacher's
and ``lq`` the student's log-probability of the sampled token :math:`y_t`:

* `token_log_probs`: ``log_softmax(logits / T)[y_t]`` (``get_log_probs``).
* `minillm_rewards`: :math:`r_t = \mathrm{clip}((\log p(y_t) - \log
  q(y_t)) / s, \pm c)` (``reward_fn`` + ``ent_rewards``, ``reward_scaling``
  :math:`s`, ``cliprange_reward`` :math:`c`).
* `teacher_mixed_weights`: teacher-mixed sampling draws from
  :math:`\tilde p = \alpha p + (1-\alpha) q_\theta`; the importance weight is
  the single-step ratio :math:`w_t = q_\theta(y_t) / \tilde p(y_t)`.
* `minillm_advantages`: the discounted reward-to-go
  :math:`R_t = \sum_{k \ge t} \gamma^{k-t} r_k`, length-normalized by the
  number of response tokens from :math:`t` on, then whitened over the batch
  (``_get_advantages_and_returns``).
* `minillm_pg_loss`: the clipped surrogate
  :math:`\max(-A_t \rho_t, -A_t\,\mathrm{clip}(\rho_t, 1\pm\epsilon))` with
  :math:`\rho_t = w_t \exp(\log q_\theta(y_t) - \log q_{\theta_{old}}(y_t))`
  (``_pg_loss``).
* The single-step term :math:`\mathrm{KL}(q_\theta(\cdot \mid y_{<t}) \|
  p(\cdot \mid y_{<t}))` -- the exact expectation over the vocabulary of the
  step's own reward (``_reg_loss``: cross-entropy minus entropy) -- is
  `kd_jax.losses.reverse_kl` at the sampling temperature.
* `minillm_pt_loss`: the pre-training term on plain text,
  :math:`(1-r)\,\mathrm{CE} + r\,H(p, q_\theta)` (``pt_loss``, ``kd_ratio``
  :math:`r`; :math:`H` is the soft cross-entropy, not the KL).
* `reverse_kl_estimate`: the logged ``rev_kl``, :math:`e^{u} - 1 - u`
  with :math:`u = \log p(y_t) - \log q(y_t)` (``get_rev_kl``).

Conventions as in `kd_jax.losses.divergences`: per-token float32 outputs
``[...]`` (token means are the caller's), ``where=`` masks (masked entries
give 0, or 1 for a weight), the teacher and every rollout quantity are
constants (``stop_gradient``), bfloat16 inputs are computed in float32.

References:
  Gu, Dong, Wei & Huang, "MiniLLM: Knowledge Distillation of Large Language
  Models", ICLR 2024; code: github.com/microsoft/LMOps (``minillm/``).
  Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _common

Array = jax.Array


def _float(x, name):
  _common.check_float(x, name)
  return jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))


def _same(a, b, name_a, name_b):
  _common.check_same_shape(a, b, name_a, name_b)


def _is_number(x) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


def token_log_probs(logits, tokens, *, temperature=1.0, where=None) -> Array:
  r"""``log_softmax(logits / T)`` at the given tokens, per position.

  .. math:: \ell_t = z_{t, y_t} / T - \log \textstyle\sum_v e^{z_{t,v}/T}

  Args:
    logits: ``[..., V]`` float.
    tokens: int ``[...]`` in ``[0, V)``.
    temperature: ``T > 0``.
    where: optional bool ``[...]``; masked positions give 0 (as the authors'
      ``get_log_probs``).

  Returns:
    float32 ``[...]``; differentiable in `logits`.

  >>> import jax.numpy as jnp
  >>> z = jnp.log(jnp.array([[0.25, 0.75]]))
  >>> round(float(token_log_probs(z, jnp.array([1]))[0]), 5)  # ln 0.75
  -0.28768
  """
  z = _float(logits, "logits")
  _common.check_rank(z, "logits", min_ndim=1, what="([..., V])")
  tokens = _common.check_labels(tokens, z.shape[:-1], name="tokens")
  _common.check_positive(temperature, "temperature")
  where = _common.check_where(where, z.shape[:-1])
  (z,) = _common.mask_inputs(where, z)
  if where is not None:
    tokens = jnp.where(where, tokens, 0)
  logp = jax.nn.log_softmax(z / temperature, axis=-1)
  out = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  return _common.apply_where(out, where)


def minillm_rewards(teacher_log_probs, student_log_probs, *,
                    reward_scaling: Optional[float] = 0.5,
                    cliprange_reward: Optional[float] = 100.0,
                    where=None) -> Array:
  r"""MiniLLM's per-token reward :math:`\log p(y_t) - \log q(y_t)`, scaled
  and clipped.

  .. math::
    r_t = \mathrm{clip}\big((\log p(y_t \mid y_{<t}) - \log q(y_t \mid
    y_{<t})) / s,\; -c,\; c\big)

  The authors' sampler adds the teacher reward (``reward_fn``: the
  teacher's log-probability at temperature 1) and the entropy reward
  ``-logprobs`` (the sampling student's log-probability at the sampling
  temperature), divides by ``reward_scaling`` and clips to
  ``cliprange_reward`` (their scripts: 0.5 and 100; the argument parser's
  defaults: None and 1).

  Args:
    teacher_log_probs: ``[...]`` float, :math:`\log p(y_t)`.
    student_log_probs: ``[...]``, :math:`\log q(y_t)` of the sampling student.
    reward_scaling: divisor :math:`s > 0`, or None (no scaling).
    cliprange_reward: clip bound :math:`c > 0`, or None / 0 (no clipping;
      the authors skip it when the value is falsy).
    where: optional bool ``[...]``; masked positions give 0.

  Returns:
    float32 ``[...]``, a constant (no gradient).

  >>> import jax.numpy as jnp
  >>> minillm_rewards(jnp.array([-1.0, -9.0]), jnp.array([-2.0, -1.0]),
  ...                 reward_scaling=0.5, cliprange_reward=10.0)
  Array([  2., -10.], dtype=float32)
  """
  lp = _float(teacher_log_probs, "teacher_log_probs")
  lq = _float(student_log_probs, "student_log_probs")
  _same(lp, lq, "teacher_log_probs", "student_log_probs")
  if reward_scaling is not None:
    _common.check_positive(reward_scaling, "reward_scaling")
  if cliprange_reward is not None:
    _common.check_nonnegative(cliprange_reward, "cliprange_reward")
  where = _common.check_where(where, lp.shape)
  lp, lq = _common.mask_inputs(where, lp, lq)
  r = jax.lax.stop_gradient(lp - lq)
  if reward_scaling is not None:
    r = r / reward_scaling
  if cliprange_reward:
    r = jnp.clip(r, -cliprange_reward, cliprange_reward)
  return _common.apply_where(r, where)


def teacher_mixed_weights(student_log_probs, teacher_log_probs, *,
                          teacher_mixed_alpha: float = 0.2,
                          where=None) -> Array:
  r"""Importance weights of teacher-mixed sampling, per token.

  The rollout token was drawn from :math:`\tilde p = \alpha p + (1-\alpha)
  q_\theta` (`kd_jax.models.lm.generate` with ``mix_in_alpha``); the
  single-step weight that corrects the policy gradient back to
  :math:`q_\theta` is

  .. math::
    w_t = \frac{q_\theta(y_t)}{\alpha\, p(y_t) + (1-\alpha)\, q_\theta(y_t)}
    \in [0, 1/(1-\alpha)]

  computed in log space (``logaddexp``). Both log-probabilities are at the
  sampling temperature (the authors' ``raw_logprobs`` and
  ``t_rollout_logprobs``). ``alpha = 0`` gives 1 everywhere.

  Args:
    student_log_probs: ``[...]``, :math:`\log q_\theta(y_t)`.
    teacher_log_probs: ``[...]``, :math:`\log p(y_t)`.
    teacher_mixed_alpha: :math:`\alpha \in [0, 1]` (the authors' scripts: 0.2).
    where: optional bool ``[...]``; masked positions give 1 (the authors'
      value there: both log-probabilities are 0).

  Returns:
    float32 ``[...]``, a constant (no gradient).

  >>> import jax.numpy as jnp
  >>> w = teacher_mixed_weights(jnp.log(jnp.array([0.5])),
  ...                           jnp.log(jnp.array([0.1])),
  ...                           teacher_mixed_alpha=0.2)
  >>> round(float(w[0]), 5)  # 0.5 / (0.2 * 0.1 + 0.8 * 0.5)
  1.19048
  """
  lq = _float(student_log_probs, "student_log_probs")
  lp = _float(teacher_log_probs, "teacher_log_probs")
  _same(lq, lp, "student_log_probs", "teacher_log_probs")
  if _is_number(teacher_mixed_alpha) and not 0 <= teacher_mixed_alpha <= 1:
    raise ValueError("`teacher_mixed_alpha` must be in [0, 1]; got "
                     f"{teacher_mixed_alpha}.")
  where = _common.check_where(where, lq.shape)
  lq, lp = _common.mask_inputs(where, lq, lp)
  lq, lp = jax.lax.stop_gradient(lq), jax.lax.stop_gradient(lp)
  a = jnp.asarray(teacher_mixed_alpha, lq.dtype)
  log_mix = jnp.logaddexp(jnp.log1p(-a) + lq, jnp.log(a) + lp)
  w = jnp.exp(lq - log_mix)
  return w if where is None else jnp.where(where, w, 1.0)


def _reward_to_go(r, gamma):
  """:math:`R_t = r_t + \\gamma R_{t+1}` along the last axis."""
  def body(carry, x):
    carry = x + gamma * carry
    return carry, carry
  rt = jnp.moveaxis(r, -1, 0)
  _, out = jax.lax.scan(body, jnp.zeros_like(rt[0]), rt, reverse=True)
  return jnp.moveaxis(out, 0, -1)


def _whiten(x, axis_name):
  """(x - mean) / sqrt(var + 1e-8) over every entry (all devices)."""
  total = jnp.stack([jnp.sum(x), jnp.asarray(x.size, x.dtype)])
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  mean = total[0] / total[1]
  sq = jnp.sum(jnp.square(x - mean))
  if axis_name is not None:
    sq = jax.lax.psum(sq, axis_name)
  var = sq / total[1]
  return (x - mean) * jax.lax.rsqrt(var + 1e-8)


def minillm_advantages(rewards, *, gamma: float = 0.95,
                       length_norm: bool = True, whiten: bool = True,
                       where=None, axis_name=None) -> Array:
  r"""MiniLLM's advantages: length-normalized discounted reward-to-go,
  whitened.

  Over the response window ``[..., R]`` (time last) with mask :math:`m`:

  .. math::
    R_t = \sum_{k \ge t} \gamma^{k-t} r_k, \qquad
    A_t = \frac{R_t}{\max(1, \sum_{k \ge t} m_k)}, \qquad
    \hat A = \frac{A - \mathrm{mean}(A)}{\sqrt{\mathrm{var}(A) + 10^{-8}}}

  as the authors' ``_get_advantages_and_returns``: their long-term reward
  includes the step's own :math:`r_t` (the paper's
  :math:`R^{\mathrm{Norm}}_{t+1}` starts at :math:`t+1`), and the division
  by the remaining length is always applied (their ``--length-norm`` flag
  only changes the logged reward); ``length_norm=False`` drops it (the
  paper's ablation). Whitening (``whiten``, default on) uses the mean and
  the population variance of **every entry of the window**, masked ones
  included (they are 0 before whitening), over all devices of
  ``axis_name`` -- the authors' ``get_global_statistics`` under
  ``torch.distributed``. Pass the window of generated tokens only (as the
  authors' rollout store holds it), not the prompt positions.

  Args:
    rewards: ``[..., R]`` float, 0 where masked (`minillm_rewards`).
    gamma: discount :math:`\gamma` (authors' default 0.95).
    length_norm: divide by the number of unmasked tokens from t on.
    whiten: normalize over the batch.
    where: optional bool ``[..., R]``; the response mask (None: all tokens).
    axis_name: ``pmap`` / ``shard_map`` axis for the global statistics.

  Returns:
    float32 ``[..., R]``, a constant (no gradient).

  >>> import jax.numpy as jnp
  >>> minillm_advantages(jnp.array([[1.0, 2.0, 0.0]]), gamma=0.5,
  ...                    where=jnp.array([[True, True, False]]), whiten=False)
  Array([[1., 2., 0.]], dtype=float32)
  """
  r = _float(rewards, "rewards")
  _common.check_rank(r, "rewards", min_ndim=1, what="([..., R])")
  if _is_number(gamma) and not 0 <= gamma <= 1:
    raise ValueError(f"`gamma` must be in [0, 1]; got {gamma}.")
  where = _common.check_where(where, r.shape)
  (r,) = _common.mask_inputs(where, r)
  r = jax.lax.stop_gradient(r)
  rw = _reward_to_go(r, jnp.asarray(gamma, r.dtype))
  if length_norm:
    m = (jnp.ones(r.shape, r.dtype) if where is None
         else where.astype(r.dtype))
    lens = jnp.flip(jnp.cumsum(jnp.flip(m, -1), axis=-1), -1)
    rw = rw / jnp.where(lens == 0, 1.0, lens)
  return _whiten(rw, axis_name) if whiten else rw


def minillm_pg_loss(student_logits, tokens, old_log_probs, advantages,
                    weights=None, *, cliprange: float = 0.2,
                    temperature=1.0, where=None) -> Array:
  r"""MiniLLM's clipped policy-gradient term per token (``_pg_loss``).

  .. math::
    \rho_t = w_t\, e^{\log q_\theta(y_t) - \log q_{\theta_{old}}(y_t)},\qquad
    \ell_t = \max\big(-\hat A_t \rho_t,\; -\hat A_t\,
    \mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\big)

  with :math:`\log q_\theta(y_t)` from `student_logits` at ``temperature``
  (the gradient flows through it only) and the importance weight
  :math:`w_t` of teacher-mixed sampling inside the clipped ratio, as the
  authors' code has it. The token mean over the mask is the caller's.

  Args:
    student_logits: ``[..., V]`` float, the current student.
    tokens: int ``[...]``, the sampled tokens.
    old_log_probs: ``[...]``, :math:`\log q_{\theta_{old}}(y_t)` at sampling.
    advantages: ``[...]``, `minillm_advantages`.
    weights: ``[...]`` `teacher_mixed_weights`, or None (all 1).
    cliprange: PPO's :math:`\epsilon` (authors' default 0.2).
    temperature: the sampling temperature ``T > 0``.
    where: optional bool ``[...]``; masked positions give 0.

  Returns:
    float32 ``[...]``.

  >>> import jax.numpy as jnp
  >>> z = jnp.log(jnp.array([[0.5, 0.5]]))
  >>> float(minillm_pg_loss(z, jnp.array([0]), jnp.log(jnp.array([0.25])),
  ...                       jnp.array([1.0]))[0])  # ratio 2, clipped to 1.2
  -1.2
  """
  lq = token_log_probs(student_logits, tokens, temperature=temperature,
                       where=where)
  shape = lq.shape
  old = _float(old_log_probs, "old_log_probs")
  adv = _float(advantages, "advantages")
  for x, name in ((old, "old_log_probs"), (adv, "advantages")):
    if x.shape != shape:
      raise ValueError(f"`{name}` must have shape {shape} (the leading dims "
                       f"of the logits); got {x.shape}.")
  w = jnp.ones(shape, lq.dtype) if weights is None else _float(
      weights, "weights")
  if w.shape != shape:
    raise ValueError(f"`weights` must have shape {shape}; got {w.shape}.")
  _common.check_nonnegative(cliprange, "cliprange")
  where = _common.check_where(where, shape)
  old, adv, w = _common.mask_inputs(where, old, adv, w)
  old, adv, w = (jax.lax.stop_gradient(x) for x in (old, adv, w))
  ratio = jnp.exp(lq - old) * w
  loss1 = -adv * ratio
  loss2 = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  return _common.apply_where(jnp.maximum(loss1, loss2), where)


def minillm_pt_loss(student_logits, teacher_logits, targets, *,
                    kd_ratio: float = 0.5, where=None) -> Array:
  r"""MiniLLM's pre-training term on plain text, per token (``pt_loss``).

  .. math::
    \ell_t = (1 - r)\,\big(-\log q_\theta(y_t)\big)
      + r\,\Big(-\sum_v p_v \log q_{\theta,v}\Big)

  the next-token cross-entropy mixed with the soft cross-entropy to the
  teacher (``kd_ratio`` :math:`r`, their scripts 0.5), both at temperature
  1. The soft term is a cross-entropy, not a KL: it exceeds
  `kd_jax.losses.forward_kl` by the teacher's entropy (same gradient).

  Args:
    student_logits: ``[..., V]`` float.
    teacher_logits: ``[..., V]`` float (a constant), or None when
      ``kd_ratio == 0``.
    targets: int ``[...]``, the next tokens.
    kd_ratio: :math:`r \in [0, 1]`.
    where: optional bool ``[...]``; masked positions give 0.

  Returns:
    float32 ``[...]``.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.5, 0.5]])); t = jnp.log(jnp.array([[0.9, 0.1]]))
  >>> round(float(minillm_pt_loss(s, t, jnp.array([0]))[0]), 5)  # ln 2
  0.69315
  """
  if _is_number(kd_ratio) and not 0 <= kd_ratio <= 1:
    raise ValueError(f"`kd_ratio` must be in [0, 1]; got {kd_ratio}.")
  s = _float(student_logits, "student_logits")
  _common.check_rank(s, "student_logits", min_ndim=1, what="([..., V])")
  where = _common.check_where(where, s.shape[:-1])
  ce = -token_log_probs(s, targets, where=where)
  if teacher_logits is None:
    if not (_is_number(kd_ratio) and kd_ratio == 0):
      raise ValueError("`teacher_logits` is None but `kd_ratio` is "
                       f"{kd_ratio}; pass the teacher's logits or "
                       "kd_ratio=0.")
    return ce
  t = _float(teacher_logits, "teacher_logits")
  _same(s, t, "student_logits", "teacher_logits")
  s, t = _common.mask_inputs(where, s, jax.lax.stop_gradient(t))
  p = jax.nn.softmax(t, axis=-1)
  soft = -jnp.sum(p * jax.nn.log_softmax(s, axis=-1), axis=-1)
  out = (1.0 - kd_ratio) * ce + kd_ratio * soft
  return _common.apply_where(out, where)


def reverse_kl_estimate(teacher_log_probs, student_log_probs, *,
                        where=None) -> Array:
  r"""The per-token reverse-KL estimate MiniLLM logs (``get_rev_kl``).

  .. math:: e^{u} - 1 - u, \quad u = \log p(y_t) - \log q(y_t)

  (Schulman's "k3" estimator: unbiased for :math:`\mathrm{KL}(q\|p)` when
  :math:`y_t \sim q`, and never negative). A constant; masked positions
  give 0.

  >>> import jax.numpy as jnp
  >>> round(float(reverse_kl_estimate(jnp.log(jnp.array([0.5])),
  ...                                 jnp.zeros(1))[0]), 5)  # 0.5 - 1 + ln 2
  0.19315
  """
  lp = _float(teacher_log_probs, "teacher_log_probs")
  lq = _float(student_log_probs, "student_log_probs")
  _same(lp, lq, "teacher_log_probs", "student_log_probs")
  where = _common.check_where(where, lp.shape)
  lp, lq = _common.mask_inputs(where, lp, lq)
  u = jax.lax.stop_gradient(lp - lq)
  return _common.apply_where(jnp.expm1(u) - u, where)
