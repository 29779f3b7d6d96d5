r"""The compiled LM step of a teacher with another tokenizer.

The teacher reads the same text as its own tokens: the batch carries them
with the alignment of both tokenizations (`kd_jax.data.align`:
``teacher_tokens`` and the index arrays of `kd_jax.data.align.ALIGNMENT_KEYS`,
leading batch axis), or -- on-policy -- the step re-tokenizes the student's
samples itself (`CrossTokenizer.retokenize`, a host callback,
`kd_jax.data.align.make_retokenize_fn`). Inside one compiled program:
completions sampled (optional), the teacher's forward on
``teacher_tokens[:, :-1]`` (frozen), the student's forward / backward on
``tokens[:, :-1]``, the loss

.. math::
  \mathcal L = w_{ce}\,\frac{\sum_{b,r} m_{br}\,\mathrm{ce}_{br}}{\sum m_{br}}
  + \sum_k w_k\,\frac1B \sum_b \frac{\sum_g n_{bg}\, d^k_{bg}}
  {\max(1, \sum_g n_{bg})}

(TRL GOLD's ``ULDLoss`` reduction, `kd_jax.losses.uld_objective`: the CE
token mean of the student's targets plus, per term, the mean over sequences
of the mean over each sequence's scored pairs) and the update. The terms
(`CrossTerm`, ``name``):

* ``'uld'``: the paper's ULD (Boizard et al., 2024), positions paired by
  index -- the k-th trained student row with the k-th trained teacher row,
  ``k < min`` of their counts (TRL ``use_extended_uld=False``);
* ``'extended_uld'``: TRL GOLD's extended ULD on the text-aligned, merged
  token groups (`kd_jax.losses.extended_uld_loss`);
* ``'hybrid'``: GOLD's hybrid loss on the same groups (tokens both
  vocabularies hold compared by the generalized JSD, the rest by ULD;
  ``matched_ids`` from `kd_jax.data.align.vocab_mapping`).

Metrics: ``ce``, each term's label (its raw value), ``loss``, ``top1``
(student token accuracy), ``tokens`` (trained targets), ``groups`` (scored
groups per sequence), ``truncated`` (teacher tokens cut per sequence: raise
the teacher length when it is not ~0), ``nonfinite`` and, with generation,
``on_policy``.

References: Boizard, Haddad, Hudelot & Colombo, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs", TMLR 2025,
https://github.com/Nicolas-BZRD/llm-recipes; HuggingFace TRL GOLD
(``trl/experimental/gold``), https://github.com/huggingface/trl; Agarwal et
al., "On-Policy Distillation of Language Models", ICLR 2024 (``lmbda``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses
from kd_jax.train import lm_steps
from kd_jax.train import step_utils
from kd_jax.train.state import student_variables
from kd_jax.train.steps import teacher_forward

# Term name -> its hyperparameters (beyond `weight`).
CROSS_TERMS = {
    "uld": ("student_temperature", "teacher_temperature"),
    "extended_uld": ("student_temperature", "teacher_temperature",
                     "min_prob"),
    "hybrid": ("student_temperature", "teacher_temperature", "min_prob",
               "beta", "matched_weight", "unmatched_weight"),
}
# The alignment arrays a batch carries (`kd_jax.data.align.ALIGNMENT_KEYS`;
# the engine does not import the data floor).
ALIGNMENT_KEYS = ("teacher_tokens", "teacher_mask", "student_base",
                  "student_group", "teacher_base", "teacher_group",
                  "group_mask", "truncated", "dropped")
_BOOL_KEYS = ("teacher_mask", "group_mask")


def _number(x) -> bool:
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossTerm:
  """One cross-tokenizer KD term (see the module docstring for `name`).

  matched_ids: ``(student_ids, teacher_ids)`` int ``[M]`` (``'hybrid'``).
  The other fields are the losses' (`kd_jax.losses.extended_uld_loss`).
  """
  name: str
  weight: float = 1.0
  label: str = ""
  student_temperature: float = 1.0
  teacher_temperature: float = 1.0
  min_prob: float = losses.cross_tokenizer.MIN_PROB
  beta: float = 0.5
  matched_weight: Optional[float] = None
  unmatched_weight: Optional[float] = None
  matched_ids: Optional[Tuple[np.ndarray, np.ndarray]] = None

  def __post_init__(self):
    if self.name not in CROSS_TERMS:
      raise ValueError(f"unknown cross-tokenizer term {self.name!r}; valid: "
                       f"{', '.join(CROSS_TERMS)}")
    if not self.label:
      object.__setattr__(self, "label", self.name)
    if not _number(self.weight) or self.weight < 0:
      raise ValueError(f"weight must be a number >= 0; got {self.weight!r}")
    for k in ("student_temperature", "teacher_temperature"):
      v = getattr(self, k)
      if not _number(v) or not v > 0:
        raise ValueError(f"{k} must be a number > 0; got {v!r}")
    if not _number(self.min_prob) or not 0 < self.min_prob < 1:
      raise ValueError(f"min_prob must be in (0, 1); got {self.min_prob!r}")
    if not _number(self.beta) or not 0 <= self.beta <= 1:
      raise ValueError(f"beta must be a number in [0, 1]; got {self.beta!r}")
    mw, uw = self.matched_weight, self.unmatched_weight
    if (mw is None) != (uw is None) or any(
        w is not None and (not _number(w) or w < 0) for w in (mw, uw)):
      raise ValueError("matched_weight and unmatched_weight must both be "
                       "None (adaptive: M / V_t) or both numbers >= 0; got "
                       f"{mw!r}, {uw!r}")
    if (self.name == "hybrid") != (self.matched_ids is not None):
      raise ValueError("matched_ids (student_ids, teacher_ids) are given "
                       "for, and only for, the 'hybrid' term")

  def values(self, s_logits, t_logits, s_targets, t_targets, s_where,
             t_where, alignment) -> jax.Array:
    """Per-sequence values ``[B]`` (mean over the sequence's pairs)."""
    temps = dict(student_temperature=self.student_temperature,
                 teacher_temperature=self.teacher_temperature)
    if self.name == "uld":
      s_rows, t_rows, where = positional_pairs(s_where, t_where)
      take = lambda x, r: jnp.take_along_axis(x, r[..., None], axis=1)
      d = losses.uld_loss(take(s_logits, s_rows), take(t_logits, t_rows),
                          where=where, **temps)
      return losses.sequence_mean(d, where)
    matched = None
    if self.name == "hybrid":
      matched = tuple(jnp.asarray(i, jnp.int32) for i in self.matched_ids)
    d = losses.extended_uld_loss(
        s_logits, t_logits, s_targets, t_targets, alignment,
        min_prob=self.min_prob, matched_ids=matched, beta=self.beta,
        matched_weight=self.matched_weight,
        unmatched_weight=self.unmatched_weight, **temps)
    return losses.sequence_mean(d, alignment.group_mask)


def positional_pairs(s_where, t_where):
  """``(student_rows, teacher_rows, where)`` ``[B, K]``: the k-th trained
  row of each side (``K = min(Rs, Rt)``), paired while both have one."""
  k = min(s_where.shape[1], t_where.shape[1])

  def first_rows(w):
    return jnp.argsort(~w, axis=1, stable=True)[:, :k].astype(jnp.int32)

  n = jnp.minimum(jnp.sum(s_where, 1), jnp.sum(t_where, 1))
  where = jnp.arange(k)[None, :] < n[:, None]
  return first_rows(s_where), first_rows(t_where), where


@dataclasses.dataclass(frozen=True, eq=False)
class CrossTokenizer:
  """The cross-tokenizer options of the step.

  terms: the `CrossTerm`s (at least one).
  ce_weight: weight of the student's next-token CE (TRL
    ``uld_crossentropy_weight``; the terms' weights are its
    ``uld_distillation_weight``).
  retokenize: ``(tokens [B, L], mask [B, L]) -> {key: array}`` of
    `ALIGNMENT_KEYS` (traceable; `kd_jax.data.align.make_retokenize_fn`):
    needed when the student's samples are trained on.
  """
  terms: Tuple[CrossTerm, ...]
  ce_weight: float = 0.0
  retokenize: Optional[Callable] = None

  def __post_init__(self):
    if not self.terms or not all(isinstance(t, CrossTerm)
                                 for t in self.terms):
      raise ValueError("terms must be one or more CrossTerm objects")
    labels = [t.label for t in self.terms]
    bad = [x for x in labels if labels.count(x) > 1 or x in _RESERVED]
    if bad:
      raise ValueError(f"term labels must be distinct and not one of "
                       f"{_RESERVED}; got {labels}")
    if not _number(self.ce_weight) or self.ce_weight < 0:
      raise ValueError(f"ce_weight must be >= 0; got {self.ce_weight!r}")


_RESERVED = ("ce", "loss", "top1", "tokens", "groups", "truncated",
             "on_policy", "nonfinite")


def cross_loss(cross: CrossTokenizer, s_logits, t_logits, tokens, mask,
               al) -> Tuple[jax.Array, dict]:
  """``(loss, metrics)`` of student logits ``[B, L-1, Vs]`` (of
  ``tokens[:, :-1]``) and teacher logits ``[B, Lt-1, Vt]`` (of
  ``al["teacher_tokens"][:, :-1]``); `mask` bool ``[B, L]`` (trained
  targets), `al` the alignment dict."""
  s_logits = s_logits.astype(jnp.float32)
  t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
  targets, where = tokens[:, 1:], mask[:, 1:]
  t_tokens = al["teacher_tokens"]
  alignment = losses.TokenAlignment.from_batch(al)
  logp = jax.nn.log_softmax(s_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(where)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  ce = jnp.sum(jnp.where(where, nll, 0.0)) / denom
  metrics = {"ce": ce}
  loss = cross.ce_weight * ce
  for term in cross.terms:
    value = jnp.mean(term.values(s_logits, t_logits, targets, t_tokens[:, 1:],
                                 where, al["teacher_mask"][:, 1:], alignment))
    metrics[term.label] = value
    loss = loss + term.weight * value
  correct = where & (jnp.argmax(s_logits, -1) == targets)
  metrics.update(
      loss=loss, top1=jnp.sum(correct) / denom,
      tokens=count.astype(jnp.float32),
      groups=jnp.mean(jnp.sum(al["group_mask"], 1).astype(jnp.float32)),
      truncated=jnp.mean(al["truncated"].astype(jnp.float32)))
  return loss, metrics


def _alignment(batch, tokens, mask, cross, generation, on_policy):
  """The step's alignment: the batch's, or the samples' re-tokenized (only
  in the branch that trains on them)."""
  def from_batch():
    step_utils.check_batch(batch, ALIGNMENT_KEYS)
    return {k: batch[k].astype(jnp.bool_ if k in _BOOL_KEYS else jnp.int32)
            for k in ALIGNMENT_KEYS}

  def sampled():
    out = cross.retokenize(tokens, mask)
    return {k: out[k].astype(jnp.bool_ if k in _BOOL_KEYS else jnp.int32)
            for k in ALIGNMENT_KEYS}

  if generation is None or generation.lmbda == 0.0:
    return from_batch()
  if generation.lmbda == 1.0:
    return sampled()
  return jax.lax.cond(on_policy, sampled, from_batch)


def make_cross_tokenizer_step(student_apply, teacher_apply,
                              cross: CrossTokenizer, tx, *,
                              generation: Optional[lm_steps.Generation] = None,
                              axis_name: Optional[str] = None,
                              rng_streams: Sequence[str] = ("dropout",),
                              on_nonfinite: str = "stop"):
  """``step(state, teacher_variables, batch) -> (state, metrics)``.

  `batch`: ``tokens`` int ``[B, L]`` (+ ``mask``) and the alignment arrays
  (`ALIGNMENT_KEYS`; not read when every step trains on samples,
  ``generation.lmbda == 1``). With `generation` (``lmbda`` > 0; Seq-KD is
  not possible: the teacher samples its own tokens) the data branch's
  alignment must cover the positions after ``prompt_len`` (what
  `kd_jax.data.align.AlignedSource` with ``prompt_len`` gives).
  `on_nonfinite`: ``'stop'`` / ``'skip_update'``
  (`kd_jax.train.step_utils.nonfinite_guard`; metric ``nonfinite``).
  """
  if generation is not None:
    if generation.seq_kd:
      raise ValueError("seq_kd (the teacher's samples) is not supported "
                       "across tokenizers")
    if generation.lmbda > 0 and cross.retokenize is None:
      raise ValueError("on-policy steps (lmbda > 0) need "
                       "cross.retokenize")
  student_fn = step_utils.as_student_apply(student_apply)

  def step(state, teacher_variables, batch):
    step_utils.check_batch(batch, ("tokens",))
    tokens = batch["tokens"].astype(jnp.int32)
    mask = batch.get("mask", jnp.ones(tokens.shape, bool))
    key = step_utils.step_rng(state.rng, state.step, axis_name)
    dkey, gkey = jax.random.split(key)
    rngs = step_utils.stream_rngs(dkey, rng_streams)
    on_policy = None
    if generation is not None:
      tokens, mask, on_policy = lm_steps.complete(
          generation, state, teacher_variables, tokens, mask, gkey)
    al = _alignment(batch, tokens, mask, cross, generation, on_policy)
    t_logits = teacher_forward(teacher_apply, teacher_variables,
                               al["teacher_tokens"][:, :-1])[0]

    def loss_fn(params):
      variables = student_variables(params, state.batch_stats)
      out = student_fn(variables, tokens[:, :-1], train=True, rngs=rngs)
      logits, _, updates = step_utils.split_apply_output(out)
      loss, metrics = cross_loss(cross, logits, t_logits, tokens, mask, al)
      return loss, (metrics, updates)

    trainable = state.trainable()
    grads, (metrics, updates) = jax.grad(
        lambda p: loss_fn(p["student"]), has_aux=True)(trainable)
    grads = step_utils.pmean_floats(grads, axis_name)
    metrics = step_utils.pmean_floats(metrics, axis_name)
    if on_policy is not None:
      metrics = dict(metrics, on_policy=on_policy.astype(jnp.float32))
    new_state = state.apply_gradients(
        tx, grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    new_state, flags = step_utils.nonfinite_guard(
        state, new_state, metrics["loss"], grads, on_nonfinite)
    return new_state, {**metrics, **flags}

  return step
