r"""MiniLLM: knowledge distillation of language models by reverse-KL policy
gradient (Gu, Dong, Wei & Huang, ICLR 2024).

Authors' code: github.com/microsoft/LMOps, ``minillm/`` (``minillm/sampler.py``
builds the rollouts, ``losses.py`` the PPO and pre-training losses,
``reward.py`` the teacher reward); teacher-mixed sampling lives in their
transformers fork (github.com/t1101675/transformers, branch ``minillm``).
Names and defaults below are theirs (the values of their training scripts,
``scripts/*/minillm/train_*.sh``; their argument parser's defaults switch
the method's parts off).

The objective is the sequence-level reverse KL :math:`\mathrm{KL}(q_\theta \|
p)` of the student :math:`q_\theta` from the teacher :math:`p`, optimized on
the student's own samples. One **rollout** (no gradient; `make_rollout`):

1. sample responses to the prompts from :math:`\tilde p = \alpha p +
   (1-\alpha) q_{\theta}` (teacher-mixed sampling,
   `kd_jax.models.lm.generate` with ``mix_in_alpha = teacher_mixed_alpha``);
2. on the sampled text, per response token: the sampling student's
   :math:`\log q(y_t)` (``old_log_probs``, at ``temperature``), the reward
   :math:`r_t = \mathrm{clip}((\log p(y_t) - \log q(y_t)) / s, \pm c)`
   (`kd_jax.losses.minillm_rewards`; the teacher at temperature 1) and the
   importance weight :math:`w_t = q(y_t) / \tilde p(y_t)`
   (`kd_jax.losses.teacher_mixed_weights`).

Then ``ppo_epochs`` passes over the rollouts in shuffled minibatches
(`ppo_minibatches`), each an optimizer update of (`minillm_loss`)

.. math::
  \mathcal L = \underbrace{\overline{\max(-\hat A_t \rho_t, -\hat A_t\,
  \mathrm{clip}(\rho_t, 1 \pm \epsilon))}}_{\text{long-term, PPO}}
  + \underbrace{\overline{\mathrm{KL}(q_\theta(\cdot|y_{<t}) \|
  p(\cdot|y_{<t}))}}_{\text{single-step decomposition}}
  + \lambda_{LM}\,\overline{(1-r)\,\mathrm{CE} + r\,H(p, q_\theta)}

(bars: token means over the response mask, resp. the pre-training tokens)
with :math:`\rho_t = w_t\,q_\theta(y_t)/q_{\theta_{old}}(y_t)`, the
length-normalized, whitened discounted advantages :math:`\hat A_t`
(`kd_jax.losses.minillm_advantages`), the single-step term the exact
reverse KL of each step (`kd_jax.losses.reverse_kl`; ``single_step_reg``) and
the pre-training term (`kd_jax.losses.minillm_pt_loss`, weight ``lm_coef``,
``kd_ratio``) on a batch of plain text -- the authors' :math:`\mathcal
D_{PT}`.

Where kd_jax differs from the authors' code (on purpose, documented):

* Response masks: up to and including the first EOS among the generated
  tokens (`response_mask`); the authors mark a token as trained when the
  token before it is not the pad id (= EOS for their models), which equals
  this unless the prompt ends with that id.
* The authors generate a second, pure-student batch only to log ``rev_kl``;
  kd_jax logs the estimate on the rollout itself (``rollout_rev_kl``).
* Top-k / top-p sampling is not supported (their scripts use ``top_k=0,
  top_p=1.0``; with filtering their losses mask the filtered vocabulary).

The pieces are pure functions of logits (`make_rollout`, `minillm_loss`,
`ppo_minibatches`); `make_update_fn` assembles one outer step (rollout +
``ppo_epochs`` passes of optimizer updates) from apply functions, a
generate function and an optax optimizer, for the trainer's LM task to
call. The module registers no `Distiller` (MiniLLM is a training
procedure, not a loss term on one batch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from kd_jax.losses import divergences
from kd_jax.losses import minillm as mloss


@dataclasses.dataclass(frozen=True)
class MiniLLMConfig:
  """MiniLLM's hyperparameters, the authors' names and script values.

  Attributes:
    teacher_mixed_alpha: teacher weight :math:`\\alpha` of the sampling
      mixture (``--teacher-mixed-alpha 0.2``); None samples from the student
      alone (weights 1).
    temperature: sampling temperature; the student's log-probabilities, the
      importance weights and the single-step term use it, the teacher reward
      does not (``--temperature 1.0``).
    reward_scaling: reward divisor (``--reward-scaling 0.5``), None: none.
    cliprange_reward: reward clip (``--cliprange-reward 100``), None: none.
    gamma: discount of the reward-to-go (``--gamma``, default 0.95).
    length_norm: divide the reward-to-go by the remaining length (always
      on in the authors' code; False is the paper's ablation).
    whiten: whiten the advantages over the (global) minibatch.
    cliprange: PPO clip :math:`\\epsilon` (``--cliprange``, default 0.2).
    single_step_reg: add the single-step reverse KL (``--single-step-reg``).
    lm_coef: weight of the pre-training term (``--lm-coef``, default 1).
    kd_ratio: teacher share of the pre-training term (``--kd-ratio 0.5``).
    ppo_epochs: passes over each rollout (``--ppo-epochs 4``).
  """
  teacher_mixed_alpha: Optional[float] = 0.2
  temperature: float = 1.0
  reward_scaling: Optional[float] = 0.5
  cliprange_reward: Optional[float] = 100.0
  gamma: float = 0.95
  length_norm: bool = True
  whiten: bool = True
  cliprange: float = 0.2
  single_step_reg: bool = True
  lm_coef: float = 1.0
  kd_ratio: float = 0.5
  ppo_epochs: int = 4

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"minillm.{name} must be {want}, got "
                       f"{getattr(self, name)!r}")
    a = self.teacher_mixed_alpha
    if a is not None and not 0.0 <= a <= 1.0:
      bad("teacher_mixed_alpha", "None or in [0, 1]")
    if not self.temperature > 0:
      bad("temperature", "> 0")
    if self.reward_scaling is not None and not self.reward_scaling > 0:
      bad("reward_scaling", "None or > 0")
    if self.cliprange_reward is not None and not self.cliprange_reward >= 0:
      bad("cliprange_reward", "None or >= 0")
    if not 0.0 <= self.gamma <= 1.0:
      bad("gamma", "in [0, 1]")
    if not self.cliprange >= 0:
      bad("cliprange", ">= 0")
    if not self.lm_coef >= 0:
      bad("lm_coef", ">= 0")
    if not 0.0 <= self.kd_ratio <= 1.0:
      bad("kd_ratio", "in [0, 1]")
    if not isinstance(self.ppo_epochs, int) or self.ppo_epochs < 1:
      bad("ppo_epochs", "an int >= 1")


class Rollout(NamedTuple):
  """One batch of sampled responses and what the updates need of it.

  ``tokens`` ``[B, L]`` (prompt + response); every other field covers the
  response window ``[B, R]``, ``R = L - prompt_len`` (the predictions of
  ``tokens[:, prompt_len:]``).
  """
  tokens: jax.Array
  mask: jax.Array
  old_log_probs: jax.Array
  rewards: jax.Array
  weights: jax.Array


def response_mask(tokens, prompt_len: int, eos_id: Optional[int]):
  """bool ``[B, R]``: the generated tokens ``tokens[:, prompt_len:]`` up to
  and including the first `eos_id` (all of them when `eos_id` is None)."""
  gen = tokens[:, prompt_len:]
  if eos_id is None:
    return jnp.ones(gen.shape, bool)
  eos = gen == eos_id
  return (jnp.cumsum(eos, axis=1) - eos) == 0


def _window(logits, prompt_len):
  """Logits ``[B, L-1, V]`` of ``tokens[:, :-1]`` -> the response window."""
  return logits[:, prompt_len - 1:]


def _check(tokens, logits, name, prompt_len):
  b, length = tokens.shape
  if logits.shape[:2] != (b, length - 1):
    raise ValueError(f"{name} must be the logits of tokens[:, :-1], shape "
                     f"[{b}, {length - 1}, V]; got {tuple(logits.shape)}")
  if not isinstance(prompt_len, int) or not 1 <= prompt_len < length:
    raise ValueError(f"prompt_len must be an int in [1, {length}), got "
                     f"{prompt_len!r}")


def make_rollout(tokens, student_logits, teacher_logits, config: MiniLLMConfig,
                 *, prompt_len: int, eos_id: Optional[int] = None,
                 mask=None) -> Tuple[Rollout, Dict[str, jax.Array]]:
  """``(Rollout, metrics)`` from the sampled text and both models' logits.

  Args:
    tokens: int ``[B, L]``, prompts (``prompt_len`` tokens) + samples.
    student_logits: ``[B, L-1, V]``, the *sampling* student on
      ``tokens[:, :-1]`` (the weights that generated, before any update).
    teacher_logits: ``[B, L-1, V]``, the teacher on ``tokens[:, :-1]``.
    config: `MiniLLMConfig`.
    prompt_len: prompt length P (the response window starts there).
    eos_id: end of sequence (the response mask stops after it).
    mask: optional bool ``[B, R]`` replacing `response_mask`.

  Returns:
    The rollout and metrics: ``reward`` (the discounted cumulative reward
    per sequence, divided by its length when ``length_norm``, as the
    authors log it), ``rollout_rev_kl`` (the reverse-KL estimate per
    token of the rollout, summed per sequence / length) and
    ``response_len`` (mean response length).
  """
  _check(tokens, student_logits, "student_logits", prompt_len)
  _check(tokens, teacher_logits, "teacher_logits", prompt_len)
  if mask is None:
    mask = response_mask(tokens, prompt_len, eos_id)
  targets = tokens[:, prompt_len:]
  s = jax.lax.stop_gradient(_window(student_logits, prompt_len))
  t = jax.lax.stop_gradient(_window(teacher_logits, prompt_len))
  temp = config.temperature
  lq = mloss.token_log_probs(s, targets, temperature=temp, where=mask)
  lp_reward = mloss.token_log_probs(t, targets, where=mask)
  lp = (lp_reward if temp == 1.0 else
        mloss.token_log_probs(t, targets, temperature=temp, where=mask))
  rewards = mloss.minillm_rewards(
      lp_reward, lq, reward_scaling=config.reward_scaling,
      cliprange_reward=config.cliprange_reward, where=mask)
  if config.teacher_mixed_alpha is None:
    weights = jnp.ones(lq.shape, lq.dtype)
  else:
    weights = mloss.teacher_mixed_weights(
        lq, lp, teacher_mixed_alpha=config.teacher_mixed_alpha, where=mask)
  rollout = Rollout(tokens=tokens, mask=mask, old_log_probs=lq,
                    rewards=rewards, weights=weights)
  return rollout, rollout_metrics(rollout, lp_reward, lq, config)


def rollout_metrics(rollout: Rollout, teacher_log_probs, student_log_probs,
                    config: MiniLLMConfig) -> Dict[str, jax.Array]:
  """The authors' logged ``reward`` / ``rev_kl`` / lengths of a rollout."""
  m = rollout.mask
  lens = jnp.maximum(jnp.sum(m, axis=1), 1).astype(jnp.float32)
  disc = config.gamma ** jnp.arange(m.shape[1], dtype=jnp.float32)
  cum = jnp.sum(rollout.rewards * disc, axis=1)
  rev = jnp.sum(mloss.reverse_kl_estimate(teacher_log_probs,
                                          student_log_probs, where=m), axis=1)
  if config.length_norm:
    cum, rev = cum / lens, rev / lens
  return {"reward": jnp.mean(cum), "rollout_rev_kl": jnp.mean(rev),
          "response_len": jnp.mean(jnp.sum(m, axis=1).astype(jnp.float32)),
          "weight_mean": jnp.sum(jnp.where(m, rollout.weights, 0.0))
                         / jnp.maximum(jnp.sum(m), 1)}


def ppo_minibatches(rng, num_rollouts: int, batch_size: int,
                    ppo_epochs: int) -> jax.Array:
  """int32 ``[ppo_epochs, num_rollouts // batch_size, batch_size]``: a new
  random order of the rollouts per epoch, the last partial minibatch
  dropped (the authors' ``DataLoader(shuffle=True, drop_last=True)``)."""
  if not 1 <= batch_size <= num_rollouts:
    raise ValueError(f"batch_size {batch_size} must be in [1, num_rollouts "
                     f"= {num_rollouts}]")
  n = num_rollouts // batch_size
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_rollouts))(
      jax.random.split(rng, ppo_epochs))
  return perms[:, :n * batch_size].reshape(ppo_epochs, n, batch_size).astype(
      jnp.int32)


def select(rollout: Rollout, index) -> Rollout:
  """The rows `index` (int ``[b]``) of a rollout (a PPO minibatch)."""
  return Rollout(*(jnp.take(x, index, axis=0) for x in rollout))


def _token_mean(per_token, mask):
  return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1).astype(
      jnp.float32)


def minillm_loss(student_logits, teacher_logits, rollout: Rollout,
                 config: MiniLLMConfig, *, prompt_len: int,
                 pt: Optional[Tuple[Any, Any, Any, Any]] = None,
                 axis_name=None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """``(loss, metrics)`` of one PPO minibatch update (the authors'
  ``ppo_loss`` + ``lm_coef * pt_loss``).

  Args:
    student_logits: ``[b, L-1, V]``, the *current* student on
      ``rollout.tokens[:, :-1]`` (differentiated).
    teacher_logits: ``[b, L-1, V]``, the teacher on the same tokens (the
      single-step term; may be None when ``single_step_reg`` is off).
    rollout: the minibatch's rows of the `Rollout` (`select`).
    config: `MiniLLMConfig`.
    prompt_len: the rollout's prompt length.
    pt: the pre-training batch ``(student_logits, teacher_logits, targets,
      mask)`` (``[b', L'-1, V]`` logits of plain text, its next tokens and
      bool mask; teacher_logits may be None when ``kd_ratio == 0``), or
      None (no pre-training term, the authors' ``*_no_pt`` scripts).
    axis_name: data-parallel axis: the advantages are whitened over the
      global minibatch (token means stay per device, as theirs).

  Returns:
    The scalar loss and the authors' logged terms (``pg_loss``,
    ``reg_loss``, ``rl_loss``, ``pt_loss``, ``lm_loss``, ``ds_loss``,
    ``tot_loss``).
  """
  _check(rollout.tokens, student_logits, "student_logits", prompt_len)
  m = rollout.mask
  targets = rollout.tokens[:, prompt_len:]
  s = _window(student_logits, prompt_len)
  temp = config.temperature
  adv = mloss.minillm_advantages(
      rollout.rewards, gamma=config.gamma, length_norm=config.length_norm,
      whiten=config.whiten, where=m, axis_name=axis_name)
  pg = _token_mean(mloss.minillm_pg_loss(
      s, targets, rollout.old_log_probs, adv, rollout.weights,
      cliprange=config.cliprange, temperature=temp, where=m), m)
  metrics = {"pg_loss": pg}
  loss = pg
  if teacher_logits is not None:
    _check(rollout.tokens, teacher_logits, "teacher_logits", prompt_len)
    reg = _token_mean(divergences.reverse_kl(
        s, _window(teacher_logits, prompt_len), temperature=temp, where=m), m)
    metrics["reg_loss"] = reg
    if config.single_step_reg:
      loss = loss + reg
  elif config.single_step_reg:
    raise ValueError("single_step_reg needs teacher_logits on the rollout")
  metrics["rl_loss"] = loss
  if pt is not None:
    pt_s, pt_t, pt_targets, pt_mask = pt
    per = mloss.minillm_pt_loss(pt_s, pt_t, pt_targets,
                                kd_ratio=config.kd_ratio, where=pt_mask)
    metrics["pt_loss"] = _token_mean(per, pt_mask)
    ce = -mloss.token_log_probs(pt_s, pt_targets, where=pt_mask)
    metrics["lm_loss"] = _token_mean(ce, pt_mask)
    loss = loss + config.lm_coef * metrics["pt_loss"]
  metrics["tot_loss"] = loss
  return loss, metrics


def make_update_fn(student_apply, teacher_apply, generate, tx,
                   config: MiniLLMConfig, *, prompt_len: int,
                   batch_size: int, chunk_size: Optional[int] = None,
                   eos_id: Optional[int] = None, axis_name=None,
                   per_update_metrics: bool = False,
                   on_nonfinite: Optional[str] = None):
  """One MiniLLM outer step -- a rollout and its PPO updates -- as a pure
  function (jit it; no host loop).

  ``fn(params, opt_state, teacher_variables, batch, rng) -> (params,
  opt_state, metrics)`` with ``batch = {"tokens": int [N, L]}`` (the
  prompts are ``tokens[:, :prompt_len]``; N = the authors'
  ``num_rollouts``) and optionally ``"pt_tokens": int [U, b', L']``, one
  plain-text batch per update (``U = ppo_epochs * (N // batch_size)``),
  with an optional bool ``"pt_mask"`` ``[U, b', L']`` (which tokens are
  pre-training *targets*, as the LM steps' ``mask``; default all).

  1. Rollout, in chunks of `chunk_size` rows (``lax.map``; default all N):
     ``generate(params, teacher_variables, prompts, key) -> [n, L]``
     (teacher-mixed sampling, e.g. `kd_jax.models.lm.make_generate_fn` with
     ``mix_in_model=teacher, mix_in_alpha=config.teacher_mixed_alpha``),
     then the student (these ``params``) and the teacher on the samples
     and `make_rollout` -- only the ``[n, R]`` statistics are kept.
  2. ``U`` updates (``lax.scan`` over `ppo_minibatches`): the student on its
     minibatch of rollouts and on ``pt_tokens[u]`` (with gradient), the
     teacher on both (no gradient; recomputed per minibatch as the authors
     do, so no ``[N, L, V]`` array is kept), `minillm_loss`, ``tx``.

  Args:
    student_apply: ``(params, tokens [B, T]) -> logits [B, T, V]``.
    teacher_apply: ``(teacher_variables, tokens) -> logits``.
    generate: see 1.
    tx: the optax optimizer of ``params``.
    config: `MiniLLMConfig` (``ppo_epochs``, the loss terms).
    prompt_len, eos_id: the rollout's prompt length and end token.
    batch_size: PPO minibatch rows (``--batch-size``).
    chunk_size: rollout chunk rows (``--chunk-size``), dividing N.
    axis_name: data-parallel axis (``pmap``): gradients and metrics are
      averaged over it, advantages whitened over the global minibatch.
    per_update_metrics: metrics of shape ``[U]`` (each update's; the
      rollout's repeated) instead of their means.
    on_nonfinite: None, or ``'stop'`` / ``'skip_update'`` (as the engine's
      `kd_jax.train.step_utils.nonfinite_guard`): a ``nonfinite`` metric
      per update (NaN / inf loss or gradients) and, with
      ``'skip_update'``, such updates leave parameters and optimizer state
      as they were.

  Returns:
    The step function; its metrics are the updates' means of
    `minillm_loss`'s terms plus the rollout's `rollout_metrics` (means over
    the chunks).
  """
  if on_nonfinite not in (None, "stop", "skip_update"):
    raise ValueError(f"on_nonfinite must be None, 'stop' or 'skip_update'; "
                     f"got {on_nonfinite!r}")
  spec = _StepSpec(student_apply, teacher_apply, generate, tx, config,
                   prompt_len, batch_size, chunk_size, eos_id, axis_name,
                   on_nonfinite)

  def step(params, opt_state, tv, batch, rng):
    k_gen, k_order = jax.random.split(rng)
    rollout, roll_metrics = _rollout(spec, params, tv, batch["tokens"], k_gen)
    n = rollout.tokens.shape[0]
    order = ppo_minibatches(k_order, n, batch_size, config.ppo_epochs)
    order = order.reshape(-1, batch_size)
    pt = batch.get("pt_tokens")
    if pt is not None and pt.shape[0] != order.shape[0]:
      raise ValueError(f"pt_tokens needs one batch per update: "
                       f"{order.shape[0]} (ppo_epochs x N // batch_size), "
                       f"got {pt.shape[0]}")
    pt_mask = batch.get("pt_mask")
    if pt_mask is not None and (pt is None or pt_mask.shape != pt.shape):
      raise ValueError(f"pt_mask must have pt_tokens' shape "
                       f"{None if pt is None else tuple(pt.shape)}; got "
                       f"{tuple(pt_mask.shape)}")
    update = functools.partial(_ppo_update, spec, tv, rollout)
    (params, opt_state), ms = jax.lax.scan(update, (params, opt_state),
                                           (order, pt, pt_mask))
    u = order.shape[0]
    if per_update_metrics:
      metrics = dict(ms)
      metrics.update({k: jnp.broadcast_to(jnp.mean(v), (u,))
                      for k, v in roll_metrics.items()})
    else:
      metrics = {k: jnp.mean(v) for k, v in ms.items()}
      metrics.update({k: jnp.mean(v) for k, v in roll_metrics.items()})
    if axis_name is not None:
      metrics = jax.lax.pmean(metrics, axis_name)
    return params, opt_state, metrics

  return step


class _StepSpec(NamedTuple):
  student_apply: Any
  teacher_apply: Any
  generate: Any
  tx: Any
  config: MiniLLMConfig
  prompt_len: int
  batch_size: int
  chunk_size: Optional[int]
  eos_id: Optional[int]
  axis_name: Any
  on_nonfinite: Optional[str] = None


def _rollout(spec: _StepSpec, params, tv, tokens, key):
  """`make_rollout` of the samples of every prompt, `chunk_size` rows at a
  time (``lax.map``); per-chunk metrics stacked."""
  prompts = tokens[:, :spec.prompt_len]
  n = prompts.shape[0]
  chunk = n if spec.chunk_size is None else spec.chunk_size
  if n % chunk:
    raise ValueError(f"chunk_size {chunk} must divide the {n} rollouts")

  def one(xs):
    p, k = xs
    sampled = jax.lax.stop_gradient(spec.generate(params, tv, p, k))
    if sampled.shape[1] <= spec.prompt_len:
      raise ValueError(f"generate returned {sampled.shape[1]} tokens; the "
                       f"prompts alone have {spec.prompt_len}")
    s = spec.student_apply(params, sampled[:, :-1])
    t = spec.teacher_apply(tv, sampled[:, :-1])
    return make_rollout(sampled, s, t, spec.config,
                        prompt_len=spec.prompt_len, eos_id=spec.eos_id)

  keys = jax.random.split(key, n // chunk)
  parts, metrics = jax.lax.map(
      one, (prompts.reshape((n // chunk, chunk) + prompts.shape[1:]), keys))
  return Rollout(*(x.reshape((n,) + x.shape[2:]) for x in parts)), metrics


def _ppo_update(spec: _StepSpec, tv, rollout: Rollout, carry, xs):
  """One minibatch update (a ``lax.scan`` body): the teacher on the
  minibatch (and the pt batch), `minillm_loss`, the optimizer."""
  import optax  # pylint: disable=g-import-not-at-top
  params, opt_state = carry
  idx, pt_tokens, pt_mask = xs
  mb = select(rollout, idx)
  t_mb = jax.lax.stop_gradient(spec.teacher_apply(tv, mb.tokens[:, :-1]))
  pt_t = None
  if pt_tokens is not None and spec.config.kd_ratio > 0:
    pt_t = jax.lax.stop_gradient(spec.teacher_apply(tv, pt_tokens[:, :-1]))

  def loss_fn(p):
    pt_batch = None
    if pt_tokens is not None:
      where = (jnp.ones(pt_tokens[:, 1:].shape, bool) if pt_mask is None
               else pt_mask[:, 1:].astype(bool))
      pt_batch = (spec.student_apply(p, pt_tokens[:, :-1]), pt_t,
                  pt_tokens[:, 1:], where)
    return minillm_loss(spec.student_apply(p, mb.tokens[:, :-1]), t_mb, mb,
                        spec.config, prompt_len=spec.prompt_len, pt=pt_batch,
                        axis_name=spec.axis_name)

  grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
  if spec.axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), spec.axis_name)
  updates, new_opt = spec.tx.update(grads, opt_state, params)
  new = optax.apply_updates(params, updates)
  if spec.on_nonfinite is not None:
    finite = (jnp.isfinite(metrics["tot_loss"])
              & jnp.isfinite(optax.global_norm(grads)))
    metrics = dict(metrics, nonfinite=jnp.logical_not(finite).astype(
        jnp.float32))
    if spec.on_nonfinite == "skip_update":
      keep = lambda a, b: jax.tree.map(  # noqa: E731
          lambda x, y: jnp.where(finite, x, y), a, b)
      new, new_opt = keep(new, params), keep(new_opt, opt_state)
  return (new, new_opt), metrics
