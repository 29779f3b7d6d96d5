r"""Compiled language-model steps: one builder for every LM distillation.

`make_lm_step(student_apply, teacher_apply, objective, tx, ...)` returns a
pure ``step(state, teacher_variables, batch) -> (state, metrics)`` (jit /
pmap it like `kd_jax.train.steps`). Batches are ``{"tokens": int [B, L]}``
(+ optional ``"mask"`` bool ``[B, L]``: which tokens are trained on as
*targets*). The model sees ``tokens[:, :-1]`` and predicts ``tokens[:,
1:]``; the loss is the `kd_jax.train.Objective` at token level: with
per-target logits :math:`z^s_j, z^t_j` and the set :math:`M` of trained
target positions,

.. math::
  \mathcal L = w_{ce}\,\frac{1}{|M|}\sum_{j\in M} -\log
  \mathrm{softmax}(z^s_j)_{y_j} + \sum_k w_k\,\frac{1}{|M|}\sum_{j\in M}
  D_k(z^s_j, z^t_j)

(a mean over trained tokens, TRL's ``reduction="batchmean"`` of
``generalized_jsd_loss``); a term names a loss of `kd_jax.losses`
(``Term('forward_kl', 0.5, temperature=1.0)``, ``reverse_kl`` -- MiniLLM's
direction --, ``js_divergence`` with ``beta``, ``total_variation``; no
:math:`T^2` factor) or a distiller reading the models' features (hidden
states, attention: `kd_jax.distillers`). What differs between the LM
methods is *where the text and the teacher come from*, options of the one
step:

* the data, teacher-forced (token-level KD, Hinton et al. 2015 per token);
* `Generation`: completions of the first ``prompt_len`` tokens generated
  inside the step -- by the teacher (``seq_kd``: sequence-level KD, Kim &
  Rush, EMNLP 2016) and/or, with probability ``lmbda`` (one coin per step,
  drawn first so only the chosen branch generates), by the current student
  (on-policy GKD, Agarwal et al., ICLR 2024, TRL ``GKDTrainer``'s
  ``lmbda`` / ``seq_kd``); the loss then covers the completion positions
  (`completion_mask`) and generated tokens carry no gradient;
* a sparse teacher: the batch carries a cache of the teacher's top-k
  log-probabilities (``teacher_topk_logprobs`` / ``teacher_topk_indices``,
  `make_teacher_topk_fn` computes them) and the terms are top-k losses
  (``Term('topk_kd', temperature=..., tail=...)``);
* `FusedHead`: CE and one divergence computed from the final hidden states
  and the head kernels (`kd_jax.losses.fused_head_divergence`), never
  materializing ``[B, T, V]`` logits.

The older builders (`make_lm_distill_step`, `make_lm_train_step`,
`make_seqkd_step`, `make_gkd_step`, `make_lm_topk_step`) are this step with
a given objective. `make_lm_eval_step` sums the NLL for held-out perplexity
:math:`\exp(\sum \mathrm{nll} / \sum n)` (`perplexity`).

Generation runs inside the compiled step through functions passed in (the
engine never imports a model): ``generate(variables, prompts, rng) -> int
[B, L]`` with ``L = prompt_len + new tokens`` (e.g.
`kd_jax.models.lm.make_generate_fn`). Completion masks cover the generated
positions up to and including the first ``eos_id``.

Apply functions follow `kd_jax.train.step_utils`: ``student_apply(variables,
tokens, train=, rngs=) -> (logits, features)`` (or a Linen module),
``teacher_apply(variables, tokens) -> (logits, features)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from kd_jax import losses as _losses
from kd_jax.train import step_utils
from kd_jax.train.objectives import Objective
from kd_jax.train.objectives import SparseTeacher
from kd_jax.train.objectives import Term
from kd_jax.train.state import student_variables
from kd_jax.train.steps import teacher_forward

DIVERGENCES = ("forward_kl", "reverse_kl", "js_divergence", "total_variation")
TOPK_KEYS = ("teacher_topk_logprobs", "teacher_topk_indices")
# Names of `kd_jax.losses.fused_head_divergence`'s divergences.
_FUSED_NAMES = {"forward_kl": "forward_kl", "reverse_kl": "reverse_kl",
                "js_divergence": "jsd", "total_variation": "tvd"}


@dataclasses.dataclass(frozen=True)
class Generation:
  """Completions generated inside the step (Seq-KD, on-policy GKD).

  prompt_len: the prompt is ``tokens[:, :prompt_len]``; the loss covers the
    positions after it (up to and including the first `eos_id`).
  lmbda: probability that a step trains on the current student's samples.
  seq_kd: otherwise the teacher's samples replace the data completions.
  student_generate / teacher_generate: ``(variables, prompts, rng) -> [B,
    L]`` (needed when ``lmbda > 0`` / ``seq_kd``).
  """
  prompt_len: int
  lmbda: float = 0.0
  seq_kd: bool = False
  eos_id: Optional[int] = None
  student_generate: Optional[Callable] = None
  teacher_generate: Optional[Callable] = None

  def __post_init__(self):
    if not 0.0 <= self.lmbda <= 1.0:
      raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")
    if self.seq_kd and self.teacher_generate is None:
      raise ValueError("seq_kd=True needs teacher_generate")
    if self.lmbda > 0 and self.student_generate is None:
      raise ValueError("lmbda > 0 needs student_generate")


@dataclasses.dataclass(frozen=True)
class FusedHead:
  """CE + one divergence from hidden states and head kernels.

  Both models run with ``logits=False`` (Linen modules, or apply functions
  taking that keyword) and return ``features["hidden"]``; `student_head` /
  `teacher_head` map variables to the ``[D, V]`` head kernel (e.g.
  ``functools.partial(kd_jax.models.lm.head_kernel, config=...)``); `loss`
  (default ``kd_jax.losses.fused_head_divergence``) is called as
  ``loss(h_s, k_s, h_t, k_t, divergence=, beta=, temperature=, where=,
  labels=, chunk_size=[, vocab_size=]) -> (divergence, ce)`` per token.
  """
  student_head: Callable
  teacher_head: Callable
  chunk_size: int = 1024
  loss: Optional[Callable] = None


def _check_divergence(divergence, temperature, beta):
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got "
                     f"{divergence!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta}")


def divergence_term(divergence: str = "forward_kl", weight: float = 1.0, *,
                    temperature: float = 1.0, beta: float = 0.5,
                    vocab_size: Optional[int] = None) -> Term:
  """The `Term` of a token divergence (its name is its label)."""
  _check_divergence(divergence, temperature, beta)
  kw = {"beta": beta} if divergence == "js_divergence" else {}
  if vocab_size is not None:
    kw["vocab_size"] = vocab_size
  return Term(divergence, float(weight), temperature=temperature, **kw)


def token_divergence(student_logits, teacher_logits, mask, *,
                     divergence: str = "forward_kl", temperature=1.0,
                     beta=0.5, vocab_size: Optional[int] = None):
  """Per-token divergence ``[B, T]`` (0 where ``mask`` is False).

  Heads of different widths (a vocabulary padded differently) need
  `vocab_size`: only the first `vocab_size` logits of both are compared.
  """
  t = divergence_term(divergence, temperature=temperature, beta=beta,
                      vocab_size=vocab_size)
  return t.fn(student_logits, teacher_logits, where=mask, **t.hparams)


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
  step_utils.check_batch(batch, ("tokens",))
  tokens = batch["tokens"]
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"batch['tokens'] must be int [batch, length], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  if tokens.shape[1] < 2:
    raise ValueError("batch['tokens'] needs length >= 2 (inputs + targets)")


def _check_prompt_len(prompt_len, tokens):
  if not isinstance(prompt_len, int) or not 1 <= prompt_len < tokens.shape[1]:
    raise ValueError(f"prompt_len must be an int in [1, {tokens.shape[1]}) "
                     f"for batches of length {tokens.shape[1]}, got "
                     f"{prompt_len!r}")


def _generated(gen_fn, variables, prompts, rng, length, who):
  out = gen_fn(variables, prompts, rng).astype(jnp.int32)
  if out.shape != (prompts.shape[0], length):
    raise ValueError(f"{who} returned shape {tuple(out.shape)}; the batch "
                     f"needs {(prompts.shape[0], length)} (prompt_len + "
                     "max_new_tokens must equal the data length)")
  return out


def _complete(g: Generation, state, teacher_variables, tokens, mask, key):
  """(tokens, mask, on_policy) after the step's generation (see
  `Generation`); the coin is drawn before anything is generated."""
  _check_prompt_len(g.prompt_len, tokens)
  length, prompts = tokens.shape[1], tokens[:, :g.prompt_len]
  mask = (jnp.arange(length)[None, :] >= g.prompt_len) & mask
  k_seq, k_coin, k_gen = jax.random.split(key, 3)

  def sampled(gen_fn, variables, k, who):
    out = _generated(gen_fn, variables, prompts, k, length, who)
    return out, completion_mask(out, g.prompt_len, g.eos_id)

  def student(_):
    return sampled(g.student_generate, state.variables, k_gen,
                   "student_generate")

  def off_policy(_):
    if g.seq_kd:
      return sampled(g.teacher_generate, teacher_variables, k_seq,
                     "teacher_generate")
    return tokens, mask

  if g.lmbda == 0.0:  # static: never compile the student's generation
    on_policy = jnp.zeros((), bool)
    tokens, mask = off_policy(None)
  elif g.lmbda == 1.0:
    on_policy = jnp.ones((), bool)
    tokens, mask = student(None)
  else:
    on_policy = jax.random.bernoulli(k_coin, g.lmbda)
    tokens, mask = jax.lax.cond(on_policy, student, off_policy, None)
  return jax.lax.stop_gradient(tokens), mask, on_policy


# The step's generation, for steps built elsewhere (the cross-tokenizer step,
# `kd_jax.train.lm_cross_steps`): ``complete(generation, state,
# teacher_variables, tokens, mask, key) -> (tokens, mask, on_policy)``.
complete = _complete


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


def _fused_loss_fn(objective: Objective, fused: FusedHead):
  """`loss_of(feats, variables, teacher, targets, mask) -> (loss, metrics)`
  of a `FusedHead` step: the objective's CE and its one divergence term."""
  if len(objective.terms) != 1 or objective.terms[0].fn is None or (
      objective.terms[0].name not in _FUSED_NAMES):
    raise ValueError("a fused head computes CE and one divergence term "
                     f"({tuple(_FUSED_NAMES)}); the objective has "
                     f"{[t.label for t in objective.terms]}")
  term = objective.terms[0]
  loss = fused.loss
  if loss is None:
    from kd_jax.losses import fused_head_divergence as loss  # pylint: disable=g-import-not-at-top
  kw = dict(term.hparams)
  kw.setdefault("temperature", 1.0)
  kw.setdefault("beta", 0.5)

  def loss_of(feats, variables, teacher, targets, mask):
    t_hidden, t_kernel = teacher
    kd, ce = loss(feats["hidden"], fused.student_head(variables), t_hidden,
                  t_kernel, divergence=_FUSED_NAMES[term.name], where=mask,
                  labels=targets, chunk_size=fused.chunk_size, **kw)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    total, metrics = objective.combine(jnp.sum(ce) / denom,
                                       [jnp.sum(kd) / denom])
    metrics["tokens"] = count.astype(jnp.float32)
    return total, metrics

  return loss_of


def _teacher_inputs(objective, teacher_apply, fused, teacher_variables,
                    tokens, batch):
  """What the loss sees of the teacher: None (no KD term), a
  `SparseTeacher` (top-k cache in the batch), `(hidden, kernel)` (fused
  head) or `(logits, features)` of ``tokens[:, :-1]``."""
  if not objective.terms or teacher_apply is None and not any(
      k in batch for k in TOPK_KEYS):
    return None
  if any(t.sparse for t in objective.terms):
    step_utils.check_batch(batch, TOPK_KEYS)
    lp = batch["teacher_topk_logprobs"].astype(jnp.float32)
    idx = batch["teacher_topk_indices"].astype(jnp.int32)
    want = (tokens.shape[0], tokens.shape[1] - 1)
    if lp.shape[:2] != want or idx.shape != lp.shape:
      raise ValueError(f"teacher top-k arrays must be {list(want)} + [k]; got "
                       f"logprobs {list(lp.shape)}, indices "
                       f"{list(idx.shape)}")
    return SparseTeacher(lp, idx), None
  if fused is not None:
    hidden = _headless(teacher_apply, False)(
        teacher_variables, tokens[:, :-1])[1]["hidden"]
    return (jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(
        fused.teacher_head(teacher_variables))), None
  return teacher_forward(teacher_apply, teacher_variables, tokens[:, :-1])


def make_lm_step(student_apply, teacher_apply, objective: Objective, tx, *,
                 generation: Optional[Generation] = None,
                 fused: Optional[FusedHead] = None,
                 axis_name: Optional[str] = None,
                 rng_streams: Sequence[str] = ("dropout",),
                 on_nonfinite: str = "stop"):
  """``step(state, teacher_variables, batch) -> (state, metrics)``.

  Args:
    student_apply, teacher_apply: see the module docstring (`teacher_apply`
      None: no teacher forward -- supervised training, or a top-k cache in
      the batch).
    objective: the token-level `Objective` (CE weight, KD terms, distiller
      terms reading the models' features).
    tx: optax transformation of ``{'student', 'distiller'}``.
    generation: completions generated inside the step (`Generation`).
    fused: CE + one divergence from hidden states and head kernels.
    axis_name: ``pmap`` axis for gradient / metric averaging.
    rng_streams: PRNG streams handed to the student.
    on_nonfinite: ``'stop'`` / ``'skip_update'``
      (`step_utils.nonfinite_guard`).

  Metrics: the objective's (``ce``, one per term label, ``loss``, ``top1``
  = token accuracy, ``kd_factor``), ``tokens`` (trained targets),
  ``nonfinite`` and, with `generation`, ``on_policy``.
  """
  student_fn = (_headless(student_apply, True) if fused is not None
                else step_utils.as_student_apply(student_apply))
  loss_of = _fused_loss_fn(objective, fused) if fused is not None else None

  def step(state, teacher_variables, batch):
    _check_tokens_batch(batch)
    tokens = batch["tokens"].astype(jnp.int32)
    mask = batch.get("mask", jnp.ones(tokens.shape, bool))
    key = step_utils.step_rng(state.rng, state.step, axis_name)
    dkey, gkey = jax.random.split(key)
    rngs = step_utils.stream_rngs(dkey, rng_streams)
    if generation is not None:
      tokens, mask, on_policy = _complete(generation, state,
                                          teacher_variables, tokens, mask,
                                          gkey)
    t_out, t_feats = _teacher_inputs(objective, teacher_apply, fused,
                                     teacher_variables, tokens, batch) or (
                                         None, None)
    inputs, targets, tmask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]

    def loss_fn(trainable):
      variables = student_variables(trainable["student"], state.batch_stats)
      out = student_fn(variables, inputs, train=True, rngs=rngs)
      logits, feats, updates = step_utils.split_apply_output(out)
      if logits is not None:  # its cotangent summed once (XLA:CPU)
        logits = step_utils.gradient_boundary(logits)
      if loss_of is not None:
        loss, metrics = loss_of(feats, variables, t_out, targets, tmask)
        return loss, (metrics, updates, state.distiller_state)
      loss, aux = objective(
          logits, targets, where=tmask, teacher_logits=t_out,
          student_features=feats, teacher_features=t_feats,
          distiller_params=trainable["distiller"],
          distiller_state=state.distiller_state, train=True,
          rng=jax.random.fold_in(gkey, 7), axis_name=axis_name, batch=batch,
          step=state.step)
      return loss, (aux["metrics"], updates, aux["distiller_state"])

    grads, (metrics, updates, dstate) = jax.grad(loss_fn, has_aux=True)(
        state.trainable())
    grads = step_utils.pmean_floats(grads, axis_name)
    metrics = step_utils.pmean_floats(metrics, axis_name)
    if generation is not None:
      metrics = dict(metrics, on_policy=on_policy.astype(jnp.float32))
    new_state = state.apply_gradients(
        tx, grads, batch_stats=updates.get("batch_stats", state.batch_stats),
        distiller_state=step_utils.pmean_floats(dstate, axis_name))
    new_state, flags = step_utils.nonfinite_guard(
        state, new_state, metrics["loss"], grads, on_nonfinite)
    return new_state, {**metrics, **flags}

  return step


# ---------------------------------------------------------------------------
# The step with a given objective (the builders of earlier versions).


def _objective(ce_weight, kd_weight, **term_kw):
  terms = ((divergence_term(weight=kd_weight, **term_kw),) if kd_weight
           else ())
  return Objective(ce_weight=float(ce_weight), terms=terms)


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
  """Teacher-forced token-level KD: ``ce_weight`` NLL + ``kd_weight``
  ``divergence`` (`make_lm_step` with that objective; ``fused=True`` with
  `student_head` / `teacher_head`: see `FusedHead`)."""
  _check_divergence(divergence, temperature, beta)
  obj = _objective(ce_weight, kd_weight, divergence=divergence,
                   temperature=temperature, beta=beta, vocab_size=vocab_size)
  head = None
  if fused:
    if student_head is None or teacher_head is None:
      raise ValueError("fused=True needs student_head and teacher_head "
                       "(variables -> [D, V] head kernel)")
    head = FusedHead(student_head, teacher_head, chunk_size, fused_loss)
  return make_lm_step(student_apply, teacher_apply, obj, tx, fused=head,
                      axis_name=axis_name, rng_streams=rng_streams)


def make_lm_train_step(apply_fn, tx, *, axis_name: Optional[str] = None,
                       rng_streams: Sequence[str] = ("dropout",)):
  """Next-token NLL training: ``step(state, batch) -> (state, metrics)``."""
  inner = make_lm_step(apply_fn, None, Objective(ce_weight=1.0), tx,
                       axis_name=axis_name, rng_streams=rng_streams)
  return lambda state, batch: inner(state, None, batch)


def make_seqkd_step(student_apply, teacher_generate: Callable, tx, *,
                    prompt_len: int, eos_id: Optional[int] = None,
                    teacher_apply=None, divergence: str = "forward_kl",
                    temperature: float = 1.0, beta: float = 0.5,
                    ce_weight: float = 1.0, kd_weight: float = 0.0,
                    vocab_size: Optional[int] = None,
                    axis_name: Optional[str] = None,
                    rng_streams: Sequence[str] = ("dropout",)):
  """Sequence-level KD: train on the teacher's continuation of each prompt
  (NLL with ``ce_weight``, plus the token divergence to `teacher_apply` on
  the same text with ``kd_weight``: their "Word-KD + Seq-KD")."""
  _check_divergence(divergence, temperature, beta)
  if kd_weight and teacher_apply is None:
    raise ValueError("kd_weight > 0 needs teacher_apply")
  obj = _objective(ce_weight, kd_weight, divergence=divergence,
                   temperature=temperature, beta=beta, vocab_size=vocab_size)
  gen = Generation(prompt_len, seq_kd=True, eos_id=eos_id,
                   teacher_generate=teacher_generate)
  return make_lm_step(student_apply, teacher_apply, obj, tx, generation=gen,
                      axis_name=axis_name, rng_streams=rng_streams)


def make_gkd_step(student_apply, teacher_apply, tx, *,
                  student_generate: Callable, prompt_len: int,
                  teacher_generate: Optional[Callable] = None,
                  lmbda: float = 0.5, beta: float = 0.5,
                  loss_temperature: float = 1.0, seq_kd: bool = False,
                  eos_id: Optional[int] = None,
                  vocab_size: Optional[int] = None,
                  axis_name: Optional[str] = None,
                  rng_streams: Sequence[str] = ("dropout",),
                  temperature: Optional[float] = None):
  """On-policy GKD with TRL ``GKDTrainer``'s ``lmbda, beta, seq_kd``:
  `Generation` + ``js_divergence(beta)`` on the completion tokens, no NLL
  term.

  TRL's ``temperature`` (0.9) is the *sampling* temperature: it belongs to
  the generate functions (``lm.make_generate_fn(temperature=0.9)``), and
  TRL computes ``generalized_jsd_loss`` at temperature 1. The loss
  temperature here is `loss_temperature` (default 1, TRL's); passing
  `temperature` is an error that says so.
  """
  if temperature is not None:
    raise ValueError("temperature is TRL's sampling temperature: give it to "
                     "student_generate / teacher_generate (lm.make_generate_fn"
                     "(temperature=...)); the loss temperature is "
                     "loss_temperature (TRL: 1)")
  _check_divergence("js_divergence", loss_temperature, beta)
  if not 0.0 <= lmbda <= 1.0:
    raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
  if seq_kd and teacher_generate is None:
    raise ValueError("seq_kd=True needs teacher_generate")
  obj = _objective(0.0, 1.0, divergence="js_divergence",
                   temperature=loss_temperature, beta=beta,
                   vocab_size=vocab_size)
  gen = Generation(prompt_len, lmbda=lmbda, seq_kd=seq_kd, eos_id=eos_id,
                   student_generate=student_generate,
                   teacher_generate=teacher_generate)
  return make_lm_step(student_apply, teacher_apply, obj, tx, generation=gen,
                      axis_name=axis_name, rng_streams=rng_streams)


def make_lm_topk_step(student_apply, tx, *, topk_loss: Optional[Callable] = None,
                      temperature: float = 1.0, tail: str = "bucket",
                      ce_weight: float = 0.0, kd_weight: float = 1.0,
                      axis_name: Optional[str] = None,
                      rng_streams: Sequence[str] = ("dropout",)):
  """Offline KD: ``step(state, batch)`` with the teacher read from the batch
  (``tokens`` [B, L] and the cache's ``teacher_topk_logprobs`` /
  ``teacher_topk_indices`` [B, L-1, k]); the KD term is ``topk_loss``
  (default ``kd_jax.losses.topk_kd_loss``)."""
  term = (Term("topk_kd", float(kd_weight), temperature=temperature,
               tail=tail) if topk_loss is None else
          Term("topk_kd", float(kd_weight), fn=topk_loss,
               temperature=temperature, tail=tail))
  term.sparse = True
  obj = Objective(ce_weight=float(ce_weight),
                  terms=(term,) if kd_weight else ())
  inner = make_lm_step(student_apply, None, obj, tx, axis_name=axis_name,
                       rng_streams=rng_streams)

  def step(state, batch):
    step_utils.check_batch(batch, TOPK_KEYS)
    return inner(state, None, batch)

  return step


# ---------------------------------------------------------------------------
# Evaluation and the teacher's top-k cache.


def make_lm_eval_step(apply_fn, *, axis_name: Optional[str] = None,
                      byte_lengths=None):
  """``step(variables, batch) -> {"nll_sum", "tokens", "correct"[,
  "bytes"]}`` (sums).

  `apply_fn(variables, tokens) -> (logits, features)` (or a Linen module,
  run with ``train=False``); the NLL of ``tokens[:, 1:]`` given the prefix,
  over ``batch["mask"][:, 1:]`` when present. Sums (not means) so batches
  and devices add up exactly; see `perplexity`. With `byte_lengths` (int
  ``[V]``: the bytes each id of the model's tokenizer spells,
  `kd_jax.data.align.token_byte_lengths`) also the bytes of the evaluated
  targets (`kd_jax.losses.target_bytes`), for bits per byte.
  """
  apply_fn = step_utils.as_teacher_apply(apply_fn)
  table = None if byte_lengths is None else jnp.asarray(byte_lengths,
                                                         jnp.int32)

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
    if table is not None:
      # float32 sums are exact up to 2**24 bytes per batch.
      out["bytes"] = jnp.sum(_losses.target_bytes(
          targets, table, where=mask)).astype(jnp.float32)
    if axis_name is not None:
      out = jax.lax.psum(out, axis_name)
    return out

  return step


def perplexity(sums: Sequence[dict]) -> dict:
  """``{"perplexity", "nll", "token_acc", "tokens"}`` from eval-step sums,
  plus ``"bits_per_byte"`` and ``"bytes"`` when they hold ``"bytes"``
  (`kd_jax.losses.bits_per_byte`: the NLL in bits over the targets'
  bytes)."""
  nll = float(sum(float(s["nll_sum"]) for s in sums))
  n = float(sum(float(s["tokens"]) for s in sums))
  correct = float(sum(float(s["correct"]) for s in sums))
  if n == 0:
    raise ValueError("no evaluated tokens")
  out = {"perplexity": math.exp(nll / n), "nll": nll / n,
         "token_acc": correct / n, "tokens": n}
  if sums and all("bytes" in s for s in sums):
    num_bytes = float(sum(float(s["bytes"]) for s in sums))
    out["bytes"] = num_bytes
    out["bits_per_byte"] = (nll / (num_bytes * math.log(2.0)) if num_bytes
                            else math.nan)
  return out


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
  teacher_apply = step_utils.as_teacher_apply(teacher_apply)

  def fn(variables, tokens):
    logits = teacher_apply(variables, tokens[:, :-1])[0].astype(jnp.float32)
    if k > logits.shape[-1]:
      raise ValueError(f"k={k} exceeds the vocabulary {logits.shape[-1]}")
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    values, indices = jax.lax.top_k(logp, k)
    return values, indices.astype(jnp.int32)

  return fn
