r"""Compiled language-model distillation steps (teacher-forced, Seq-KD, GKD).

Every builder returns a pure ``step(state, teacher_variables, batch) ->
(state, metrics)`` (jit / pmap it like `kd_jax.train.steps`). Batches are
``{"tokens": int [B, L]}`` (+ optional ``"mask"`` bool ``[B, L]``: which
tokens are trained on as *targets*). The model sees ``tokens[:, :-1]`` and
predicts ``tokens[:, 1:]``; with per-target logits :math:`z^s_j, z^t_j` and
the set :math:`M` of trained target positions,

.. math::
  \mathcal L = w_{ce}\,\frac{1}{|M|}\sum_{j\in M} -\log
  \mathrm{softmax}(z^s_j)_{y_j} + w_{kd}\,\frac{1}{|M|}\sum_{j\in M}
  D(z^s_j, z^t_j)

(a mean over trained tokens, TRL's ``reduction="batchmean"`` of
``generalized_jsd_loss``), with :math:`D` one of ``forward_kl``,
``reverse_kl``, ``js_divergence`` (``beta``), ``total_variation`` of
`kd_jax.losses` at ``temperature`` (no :math:`T^2` factor).

* `make_lm_train_step`: plain next-token NLL (teachers, student baselines).
* `make_lm_distill_step`: supervised token-level KD, teacher-forced on the
  data (Hinton et al., 2015, per token). MiniLLM-style reverse KL
  (Gu et al., ICLR 2024) is ``divergence="reverse_kl"`` here or GKD with
  ``beta=1``.
* `make_seqkd_step`: sequence-level KD (Kim & Rush, EMNLP 2016): the
  teacher continues the first ``prompt_len`` tokens inside the step and the
  student is trained on its output with NLL (``ce_weight``), optionally plus
  the token-level term on the same text (``kd_weight``, their
  "Word-KD + Seq-KD").
* `make_lm_eval_step`: summed NLL and token count of a batch, for
  held-out perplexity :math:`\exp(\sum \mathrm{nll} / \sum n)` (`perplexity`).
* `make_lm_topk_step`: offline KD from a cached sparse teacher (its top-k
  log-probabilities per token, `make_teacher_topk_fn` computes them) with a
  top-k loss (``kd_jax.losses.topk_kd_loss`` by default).
* `make_gkd_step`: on-policy GKD (Agarwal et al., ICLR 2024) with TRL
  ``GKDTrainer``'s parameters: ``seq_kd`` (the teacher generates the
  completions first), then with probability ``lmbda`` the completions are the
  current student's samples; the loss is ``js_divergence(beta,
  temperature)`` on the completion tokens.

Generation runs inside the compiled step through functions passed in
(the engine never imports a model): ``generate(variables, prompts, rng) ->
int [B, L]`` with ``L = prompt_len + new tokens`` (e.g.
`kd_jax.models.lm.make_generate_fn`). Completion masks cover the generated
positions up to and including the first ``eos_id``. Generated tokens carry no
gradient.

Apply functions follow `kd_jax.train.steps`: ``student_apply(variables,
tokens, train=, rngs=) -> (logits, features)`` (or a Linen module),
``teacher_apply(variables, tokens) -> (logits, features)``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kd_jax.losses import divergences as _div
from kd_jax.train import steps as _steps
from kd_jax.train.state import TrainState
from kd_jax.train.state import student_variables

DIVERGENCES = ("forward_kl", "reverse_kl", "js_divergence", "total_variation")


def _check_divergence(divergence, temperature, beta):
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got "
                     f"{divergence!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta}")


def token_divergence(student_logits, teacher_logits, mask, *,
                     divergence: str = "forward_kl", temperature=1.0,
                     beta=0.5, vocab_size: Optional[int] = None):
  """Per-token divergence ``[B, T]`` (0 where ``mask`` is False).

  Heads of different widths (a vocabulary padded differently) need
  `vocab_size`: only the first `vocab_size` logits of both are compared.
  """
  vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
  if vocab_size is not None:
    if not 1 <= vocab_size <= min(vs, vt):
      raise ValueError(f"vocab_size {vocab_size} must be in [1, "
                       f"{min(vs, vt)}] (student {vs}, teacher {vt} logits)")
    student_logits = student_logits[..., :vocab_size]
    teacher_logits = teacher_logits[..., :vocab_size]
  elif vs != vt:
    raise ValueError(f"student vocabulary ({vs} logits) != teacher vocabulary "
                     f"({vt}); pass vocab_size= (the shared tokenizer's size)")
  fn = getattr(_div, divergence)
  kw = {"beta": beta} if divergence == "js_divergence" else {}
  return fn(student_logits, teacher_logits, temperature=temperature,
            where=mask, **kw)


def lm_loss(student_logits, teacher_logits, targets, mask, *,
            divergence="forward_kl", temperature=1.0, beta=0.5,
            ce_weight=0.0, kd_weight=1.0, kd_fn=None, vocab_size=None):
  """``(loss, metrics)``: weighted token-mean NLL + divergence (see module).

  `teacher_logits` may be None when ``kd_weight == 0`` or when `kd_fn`
  (``kd_fn(student_logits, mask) -> per-token [B, T]``, e.g. a top-k loss
  against a cached teacher) replaces the divergence.
  """
  s = student_logits.astype(jnp.float32)
  mask = mask.astype(bool)
  count = jnp.sum(mask)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  logp = jax.nn.log_softmax(s, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  ce = jnp.sum(jnp.where(mask, nll, 0.0)) / denom
  if kd_weight and kd_fn is not None:
    kd = jnp.sum(kd_fn(s, mask)) / denom
  elif kd_weight:
    kd = jnp.sum(token_divergence(s, teacher_logits, mask,
                                  divergence=divergence,
                                  temperature=temperature, beta=beta,
                                  vocab_size=vocab_size)) / denom
  else:
    kd = jnp.zeros((), jnp.float32)
  loss = ce_weight * ce + kd_weight * kd
  acc = jnp.sum(jnp.where(mask, jnp.argmax(s, -1) == targets, False)) / denom
  return loss, {"loss": loss, "ce": ce, "kd": kd, "token_acc": acc,
                "tokens": count.astype(jnp.float32)}


def completion_mask(tokens, prompt_len: int, eos_id: Optional[int]):
  """bool ``[B, L]``: positions >= prompt_len up to and including the first
  ``eos_id`` there (all of them when `eos_id` is None)."""
  pos = jnp.arange(tokens.shape[1])[None, :]
  gen = pos >= prompt_len
  if eos_id is None:
    return jnp.broadcast_to(gen, tokens.shape)
  eos = gen & (tokens == eos_id)
  eos_before = jnp.cumsum(eos, axis=1) - eos  # EOS strictly before j
  return gen & (eos_before == 0)


def _check_tokens_batch(batch):
  _steps._check_batch(batch, ("tokens",))  # pylint: disable=protected-access
  tokens = batch["tokens"]
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"batch['tokens'] must be int [batch, length], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  if tokens.shape[1] < 2:
    raise ValueError("batch['tokens'] needs length >= 2 (inputs + targets)")


def _generated(gen_fn, variables, prompts, rng, length, who):
  out = gen_fn(variables, prompts, rng).astype(jnp.int32)
  if out.shape != (prompts.shape[0], length):
    raise ValueError(f"{who} returned shape {tuple(out.shape)}; the batch "
                     f"needs {(prompts.shape[0], length)} (prompt_len + "
                     "max_new_tokens must equal the data length)")
  return out


def _apply_update(state: TrainState, student_apply, tx, tokens, mask,
                  teacher_logits, loss_kw, rngs, axis_name, loss_of=None):
  """Student forward on ``tokens[:, :-1]``, loss on targets, optax update.

  `loss_of(logits, features, variables, targets, mask) -> (loss, metrics)`
  replaces `lm_loss` when given (the fused-head path).
  """
  inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]

  def loss_fn(trainable):
    variables = student_variables(trainable["student"], state.batch_stats)
    out = student_apply(variables, inputs, train=True, rngs=rngs)
    logits, feats, updates = _steps._split_student_out(out)  # pylint: disable=protected-access
    if loss_of is not None:
      loss, metrics = loss_of(logits, feats, variables, targets, tmask)
    else:
      loss, metrics = lm_loss(logits, teacher_logits, targets, tmask,
                              **loss_kw)
    return loss, (metrics, updates)

  trainable = state.trainable()
  grads, (metrics, updates) = jax.grad(loss_fn, has_aux=True)(trainable)
  grads = _steps._pmean(grads, axis_name)  # pylint: disable=protected-access
  metrics = _steps._pmean(metrics, axis_name)  # pylint: disable=protected-access
  upd, opt_state = tx.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, upd)
  new_state = state.replace(
      step=state.step + 1, params=trainable["student"],
      distiller_params=trainable["distiller"],
      batch_stats=updates.get("batch_stats", state.batch_stats),
      opt_state=opt_state)
  return new_state, metrics


def _keys(state, axis_name, rng_streams):
  key = _steps._step_rng(state.rng, state.step, axis_name)  # pylint: disable=protected-access
  dkey, gkey = jax.random.split(key)
  rngs = {n: jax.random.fold_in(dkey, i) for i, n in enumerate(rng_streams)}
  return rngs, gkey


def _teacher_logits(teacher_apply, teacher_variables, tokens):
  return _steps.teacher_forward(teacher_apply, teacher_variables,
                                tokens[:, :-1])[0]


def make_lm_distill_step(student_apply, teacher_apply, tx, *,
                         divergence: str = "forward_kl",
                         temperature: float = 1.0, beta: float = 0.5,
                         ce_weight: float = 0.0, kd_weight: float = 1.0,
                         fused: bool = False,
                         student_head: Optional[Callable] = None,
                         teacher_head: Optional[Callable] = None,
                         fused_loss: Optional[Callable] = None,
                         chunk_size: int = 1024,
                         vocab_size: Optional[int] = None,
                         axis_name: Optional[str] = None,
                         rng_streams: Sequence[str] = ("dropout",)):
  """Teacher-forced token-level KD: ``step(state, teacher_variables, batch)``.

  Args:
    student_apply, teacher_apply: see the module docstring.
    tx: optax transformation of ``{'student', 'distiller'}``.
    divergence, temperature, beta: the token divergence.
    ce_weight, kd_weight: weights of the NLL and the divergence.
    fused: compute the NLL and the divergence from the final hidden states
      and the head kernels, never materializing ``[B, T, V]`` logits. Both
      models then run with ``logits=False`` (Linen modules, or apply
      functions taking that keyword) and return ``features["hidden"]``;
      `student_head` / `teacher_head` map variables to the ``[D, V]`` head
      kernel (e.g. ``functools.partial(kd_jax.models.lm.head_kernel,
      config=...)``); the loss is `fused_loss` (default
      ``kd_jax.losses.fused_head_divergence``), called as
      ``fused_loss(h_s, k_s, h_t, k_t, divergence=, beta=, temperature=,
      where=, labels=, chunk_size=) -> (divergence, ce)`` per token.
    vocab_size: compare only the first `vocab_size` logits (student and
      teacher heads of different widths); required when they differ.
    axis_name: ``pmap`` axis for gradient / metric averaging.
    rng_streams: PRNG streams handed to the student.
  """
  _check_divergence(divergence, temperature, beta)
  loss_kw = dict(divergence=divergence, temperature=temperature, beta=beta,
                 ce_weight=ce_weight, kd_weight=kd_weight,
                 vocab_size=vocab_size)
  if fused:
    return _fused_distill_step(
        student_apply, teacher_apply, tx, loss_kw, student_head=student_head,
        teacher_head=teacher_head, fused_loss=fused_loss,
        chunk_size=chunk_size, axis_name=axis_name, rng_streams=rng_streams)
  student_apply = _steps.as_student_apply(student_apply)

  def step(state, teacher_variables, batch):
    _check_tokens_batch(batch)
    tokens = batch["tokens"].astype(jnp.int32)
    mask = batch.get("mask", jnp.ones(tokens.shape, bool))
    t_logits = (_teacher_logits(teacher_apply, teacher_variables, tokens)
                if kd_weight else None)
    rngs, _ = _keys(state, axis_name, rng_streams)
    return _apply_update(state, student_apply, tx, tokens, mask, t_logits,
                         loss_kw, rngs, axis_name)

  return step


def make_lm_train_step(apply_fn, tx, *, axis_name: Optional[str] = None,
                       rng_streams: Sequence[str] = ("dropout",)):
  """Next-token NLL training: ``step(state, batch) -> (state, metrics)``."""
  inner = make_lm_distill_step(apply_fn, None, tx, ce_weight=1.0,
                               kd_weight=0.0, axis_name=axis_name,
                               rng_streams=rng_streams)
  return lambda state, batch: inner(state, None, batch)


# Names of `kd_jax.losses.fused_head_divergence`'s divergences.
_FUSED_NAMES = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
                "js_divergence": "jsd", "total_variation": "tvd"}


def _headless(apply_fn, train: bool):
  """An apply function run with ``logits=False`` (Linen modules wrapped)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if isinstance(apply_fn, nn.Module):
    module = apply_fn
    if train:
      return lambda v, x, train=True, rngs=None: module.apply(
          v, x, train=train, rngs=rngs, logits=False)
    return lambda v, x: module.apply(v, x, train=False, logits=False)
  if train:
    return lambda v, x, train=True, rngs=None: apply_fn(
        v, x, train=train, rngs=rngs, logits=False)
  return lambda v, x: apply_fn(v, x, logits=False)


def _fused_distill_step(student_apply, teacher_apply, tx, loss_kw, *,
                        student_head, teacher_head, fused_loss, chunk_size,
                        axis_name, rng_streams):
  """`make_lm_distill_step(fused=True)`: losses from hidden states + heads."""
  if student_head is None or teacher_head is None:
    raise ValueError("fused=True needs student_head and teacher_head "
                     "(variables -> [D, V] head kernel)")
  if fused_loss is None:
    from kd_jax import losses as _losses  # pylint: disable=g-import-not-at-top
    fused_loss = getattr(_losses, "fused_head_divergence", None)
    if fused_loss is None:
      raise ValueError("kd_jax.losses has no fused_head_divergence; pass "
                       "fused_loss=")
  student_fn = _headless(student_apply, True)
  teacher_fn = _headless(teacher_apply, False)
  ce_w, kd_w = loss_kw["ce_weight"], loss_kw["kd_weight"]

  def step(state, teacher_variables, batch):
    _check_tokens_batch(batch)
    tokens = batch["tokens"].astype(jnp.int32)
    mask = batch.get("mask", jnp.ones(tokens.shape, bool))
    t_hidden = jax.lax.stop_gradient(
        teacher_fn(teacher_variables, tokens[:, :-1])[1]["hidden"])
    t_kernel = jax.lax.stop_gradient(teacher_head(teacher_variables))

    def loss_of(_, feats, variables, targets, tmask):
      kd, ce = fused_loss(
          feats["hidden"], student_head(variables), t_hidden, t_kernel,
          divergence=_FUSED_NAMES[loss_kw["divergence"]],
          beta=loss_kw["beta"], temperature=loss_kw["temperature"],
          where=tmask, labels=targets, chunk_size=chunk_size,
          **({} if loss_kw["vocab_size"] is None else
             {"vocab_size": loss_kw["vocab_size"]}))
      count = jnp.sum(tmask)
      denom = jnp.maximum(count, 1).astype(jnp.float32)
      ce, kd = jnp.sum(ce) / denom, jnp.sum(kd) / denom
      loss = ce_w * ce + kd_w * kd
      return loss, {"loss": loss, "ce": ce, "kd": kd,
                    "tokens": count.astype(jnp.float32)}

    rngs, _ = _keys(state, axis_name, rng_streams)
    return _apply_update(state, student_fn, tx, tokens, mask, None, None,
                         rngs, axis_name, loss_of=loss_of)

  return step


def make_seqkd_step(student_apply, teacher_generate: Callable, tx, *,
                    prompt_len: int, eos_id: Optional[int] = None,
                    teacher_apply=None, divergence: str = "forward_kl",
                    temperature: float = 1.0, beta: float = 0.5,
                    ce_weight: float = 1.0, kd_weight: float = 0.0,
                    vocab_size: Optional[int] = None,
                    axis_name: Optional[str] = None,
                    rng_streams: Sequence[str] = ("dropout",)):
  """Sequence-level KD: train on the teacher's continuation of each prompt.

  ``teacher_generate(teacher_variables, prompts [B, prompt_len], rng) ->
  [B, L]`` runs inside the step (L = the batch's length); the loss covers
  the generated positions (`completion_mask`). With ``kd_weight > 0`` the
  token-level divergence to ``teacher_apply`` on the same text is added.
  """
  _check_divergence(divergence, temperature, beta)
  if kd_weight and teacher_apply is None:
    raise ValueError("kd_weight > 0 needs teacher_apply")
  student_apply = _steps.as_student_apply(student_apply)
  loss_kw = dict(divergence=divergence, temperature=temperature, beta=beta,
                 ce_weight=ce_weight, kd_weight=kd_weight,
                 vocab_size=vocab_size)

  def step(state, teacher_variables, batch):
    _check_tokens_batch(batch)
    tokens = batch["tokens"].astype(jnp.int32)
    _check_prompt_len(prompt_len, tokens)
    rngs, gkey = _keys(state, axis_name, rng_streams)
    tokens = jax.lax.stop_gradient(_generated(
        teacher_generate, teacher_variables, tokens[:, :prompt_len], gkey,
        tokens.shape[1], "teacher_generate"))
    mask = completion_mask(tokens, prompt_len, eos_id)
    t_logits = (_teacher_logits(teacher_apply, teacher_variables, tokens)
                if kd_weight else None)
    return _apply_update(state, student_apply, tx, tokens, mask, t_logits,
                         loss_kw, rngs, axis_name)

  return step


def _check_prompt_len(prompt_len, tokens):
  if not isinstance(prompt_len, int) or not 1 <= prompt_len < tokens.shape[1]:
    raise ValueError(f"prompt_len must be an int in [1, {tokens.shape[1]}) "
                     f"for batches of length {tokens.shape[1]}, got "
                     f"{prompt_len!r}")


def make_gkd_step(student_apply, teacher_apply, tx, *,
                  student_generate: Callable, prompt_len: int,
                  teacher_generate: Optional[Callable] = None,
                  lmbda: float = 0.5, beta: float = 0.5,
                  temperature: float = 0.9, seq_kd: bool = False,
                  eos_id: Optional[int] = None,
                  vocab_size: Optional[int] = None,
                  axis_name: Optional[str] = None,
                  rng_streams: Sequence[str] = ("dropout",)):
  """On-policy GKD with TRL ``GKDTrainer``'s ``lmbda, beta, temperature,
  seq_kd`` (defaults as TRL's ``GKDConfig``).

  Per step: the data completions (positions >= ``prompt_len``, and
  ``batch["mask"]`` if given) are replaced by the teacher's when ``seq_kd``;
  then, with probability ``lmbda`` (one draw per step, ``metrics
  ["on_policy"]``), by ``student_generate(current student variables,
  prompts, rng)`` -- a ``lax.cond``, so only the taken branch generates.
  Loss: ``js_divergence(beta, temperature)`` token mean over the completion
  tokens (teacher logits on the final text). The generate functions should
  sample at the same ``temperature`` (TRL uses one for both).
  """
  _check_divergence("js_divergence", temperature, beta)
  if not 0.0 <= lmbda <= 1.0:
    raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
  if seq_kd and teacher_generate is None:
    raise ValueError("seq_kd=True needs teacher_generate")
  student_apply = _steps.as_student_apply(student_apply)
  loss_kw = dict(divergence="js_divergence", temperature=temperature,
                 beta=beta, ce_weight=0.0, kd_weight=1.0,
                 vocab_size=vocab_size)

  def step(state, teacher_variables, batch):
    _check_tokens_batch(batch)
    tokens = batch["tokens"].astype(jnp.int32)
    _check_prompt_len(prompt_len, tokens)
    length, prompts = tokens.shape[1], tokens[:, :prompt_len]
    mask = jnp.arange(length)[None, :] >= prompt_len
    mask = mask & batch.get("mask", jnp.ones(tokens.shape, bool))
    rngs, gkey = _keys(state, axis_name, rng_streams)
    k_seq, k_coin, k_gen = jax.random.split(gkey, 3)
    if seq_kd:
      tokens = _generated(teacher_generate, teacher_variables, prompts, k_seq,
                          length, "teacher_generate")
      mask = completion_mask(tokens, prompt_len, eos_id)

    def student_branch(_):
      out = _generated(student_generate, state.variables, prompts, k_gen,
                       length, "student_generate")
      return out, completion_mask(out, prompt_len, eos_id)

    if lmbda == 0.0:  # static: never compile the student's generation
      on_policy = jnp.zeros((), bool)
    elif lmbda == 1.0:
      on_policy = jnp.ones((), bool)
      tokens, mask = student_branch(None)
    else:
      on_policy = jax.random.bernoulli(k_coin, lmbda)
      tokens, mask = jax.lax.cond(on_policy, student_branch,
                                  lambda _: (tokens, mask), None)
    tokens = jax.lax.stop_gradient(tokens)
    t_logits = _teacher_logits(teacher_apply, teacher_variables, tokens)
    state, metrics = _apply_update(state, student_apply, tx, tokens, mask,
                                   t_logits, loss_kw, rngs, axis_name)
    metrics = dict(metrics, on_policy=on_policy.astype(jnp.float32))
    return state, metrics

  return step


def make_lm_eval_step(apply_fn, *, axis_name: Optional[str] = None):
  """``step(variables, batch) -> {"nll_sum", "tokens", "correct"}`` (sums).

  `apply_fn(variables, tokens) -> (logits, features)` (or a Linen module,
  run with ``train=False``); the NLL of ``tokens[:, 1:]`` given the prefix,
  over ``batch["mask"][:, 1:]`` when present. Sums (not means) so batches
  and devices add up exactly; see `perplexity`.
  """
  apply_fn = _steps.as_teacher_apply(apply_fn)

  def step(variables, batch):
    _check_tokens_batch(batch)
    tokens = batch["tokens"].astype(jnp.int32)
    mask = batch.get("mask", jnp.ones(tokens.shape, bool))[:, 1:]
    logits = apply_fn(variables, tokens[:, :-1])[0].astype(jnp.float32)
    targets = tokens[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    out = {"nll_sum": jnp.sum(jnp.where(mask, nll, 0.0)),
           "tokens": jnp.sum(mask).astype(jnp.float32),
           "correct": jnp.sum(mask & (jnp.argmax(logits, -1) == targets)
                              ).astype(jnp.float32)}
    if axis_name is not None:
      out = jax.lax.psum(out, axis_name)
    return out

  return step


def perplexity(sums: Sequence[dict]) -> dict:
  """``{"perplexity", "nll", "token_acc", "tokens"}`` from eval-step sums."""
  nll = float(sum(float(s["nll_sum"]) for s in sums))
  n = float(sum(float(s["tokens"]) for s in sums))
  correct = float(sum(float(s["correct"]) for s in sums))
  if n == 0:
    raise ValueError("no evaluated tokens")
  return {"perplexity": math.exp(nll / n), "nll": nll / n,
          "token_acc": correct / n, "tokens": n}


def make_teacher_topk_fn(teacher_apply, *, k: int, temperature: float = 1.0):
  """``fn(variables, tokens [B, L]) -> (logprobs, indices)`` ``[B, L-1, k]``.

  The k largest of ``log_softmax(z / T)`` (float32, descending) of the
  teacher's logits for ``tokens[:, :-1]`` (the predictions of
  ``tokens[:, 1:]``) and their int32 vocabulary indices: what an offline
  cache stores (e.g. as bfloat16 + int32).
  """
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  teacher_apply = _steps.as_teacher_apply(teacher_apply)

  def fn(variables, tokens):
    logits = teacher_apply(variables, tokens[:, :-1])[0].astype(jnp.float32)
    if k > logits.shape[-1]:
      raise ValueError(f"k={k} exceeds the vocabulary {logits.shape[-1]}")
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    values, indices = jax.lax.top_k(logp, k)
    return values, indices.astype(jnp.int32)

  return fn


def make_lm_topk_step(student_apply, tx, *, topk_loss: Optional[Callable] = None,
                      temperature: float = 1.0, tail: str = "bucket",
                      ce_weight: float = 0.0, kd_weight: float = 1.0,
                      axis_name: Optional[str] = None,
                      rng_streams: Sequence[str] = ("dropout",)):
  """Offline KD: ``step(state, batch)`` with the teacher read from the batch.

  The batch holds ``tokens`` [B, L] and the cache's
  ``teacher_topk_logprobs`` / ``teacher_topk_indices`` [B, L-1, k] (as
  `make_teacher_topk_fn` makes them). The KD term is
  ``topk_loss(student_logits, logprobs, indices, temperature=, tail=,
  where=)`` per token (default ``kd_jax.losses.topk_kd_loss``).
  """
  if topk_loss is None:
    from kd_jax import losses as _losses  # pylint: disable=g-import-not-at-top
    topk_loss = getattr(_losses, "topk_kd_loss", None)
    if topk_loss is None:
      raise ValueError("kd_jax.losses has no topk_kd_loss; pass topk_loss=")
  student_apply = _steps.as_student_apply(student_apply)
  base_kw = dict(ce_weight=ce_weight, kd_weight=kd_weight)

  def step(state, batch):
    _check_tokens_batch(batch)
    _steps._check_batch(batch, ("teacher_topk_logprobs",  # pylint: disable=protected-access
                                "teacher_topk_indices"))
    tokens = batch["tokens"].astype(jnp.int32)
    lp = batch["teacher_topk_logprobs"].astype(jnp.float32)
    idx = batch["teacher_topk_indices"].astype(jnp.int32)
    want = (tokens.shape[0], tokens.shape[1] - 1)
    if lp.shape[:2] != want or idx.shape != lp.shape:
      raise ValueError(f"teacher top-k arrays must be {list(want)} + [k]; got "
                       f"logprobs {list(lp.shape)}, indices "
                       f"{list(idx.shape)}")
    mask = batch.get("mask", jnp.ones(tokens.shape, bool))

    def kd_fn(s, m):
      return topk_loss(s, lp, idx, temperature=temperature, tail=tail,
                       where=m)

    rngs, _ = _keys(state, axis_name, rng_streams)
    return _apply_update(state, student_apply, tx, tokens, mask, None,
                         dict(base_kw, kd_fn=kd_fn), rngs, axis_name)

  return step
