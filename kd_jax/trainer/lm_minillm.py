"""MiniLLM as the LM task's program (``minillm.enabled``).

MiniLLM (Gu, Dong, Wei & Huang, ICLR 2024; `kd_jax.distillers.minillm`) is
a training procedure, not a loss term on one batch: every *outer step*
samples ``num_rollouts`` responses to data prompts (teacher-mixed), then
makes ``U = ppo_epochs x num_rollouts / batch_size`` optimizer updates on
minibatches of them (plus a pre-training batch each). In the one loop a
call is one outer step (or several, ``train.steps_per_call`` rounded up
to a multiple of U) and the loop's step counts optimizer updates: the
state's ``step`` grows by U per outer step, so ``train.num_steps``, the LR
schedule, evaluations, checkpoints, resume and ``tokens/s`` are all in
updates, as in every other LM run.

The batch of outer step ``o``: ``tokens`` ``[N, L]`` (the prompts are
``tokens[:, :seq_len - max_new_tokens]``, the data's rows ``ds[o]`` of a
stream of ``N``-row batches) and ``pt_tokens`` ``[b, U, L]`` (rows first,
so every array is sharded over its rows): update ``u``'s pre-training
rows are batch ``o * U + u`` of an independently shuffled stream of
``b``-row batches (seed + 1), the authors' :math:`\\mathcal D_{PT}`.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.data import text as text_lib
from kd_jax.distillers import minillm
from kd_jax.models import lm as lm_models
from kd_jax.train import step_utils
from kd_jax.trainer import lm_config
from kd_jax.trainer.errors import ConfigError


def prompt_len(rc) -> int:
  return rc.data.seq_len - rc.section("generation").max_new_tokens


def make_step(rc, student, teacher, tx):
  """``step(state, teacher_variables, batch) -> (state, metrics)``: one
  outer step; metrics are ``[U]`` (the updates' values, ``nonfinite``
  included; rollout statistics repeated) so the loop's train records and
  its NaN / inf checks see every update."""
  cfg = lm_config.minillm_config(rc)
  m, g = rc.section("minillm"), rc.section("generation")
  u, p, eos = lm_config.minillm_updates(rc), prompt_len(rc), rc.data.eos_id
  kw = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
            eos_id=eos)
  params = lambda tr: {"params": tr["student"]}  # noqa: E731
  if cfg.teacher_mixed_alpha is None:
    gen = lm_models.make_generate_fn(student, **kw)
    generate = lambda tr, tv, x, key: gen(params(tr), x, key)  # noqa: E731
  else:
    gen = lm_models.make_generate_fn(
        student, mix_in_model=teacher,
        mix_in_alpha=cfg.teacher_mixed_alpha, **kw)
    generate = lambda tr, tv, x, key: gen(params(tr), x, key, tv)  # noqa: E731
  update = minillm.make_update_fn(
      lambda tr, x: student.apply(params(tr), x)[0].astype(jnp.float32),
      lambda tv, x: teacher.apply(tv, x)[0].astype(jnp.float32),
      generate, tx, cfg, prompt_len=p, batch_size=rc.train.batch_size,
      chunk_size=m.chunk_size or None, eos_id=eos, per_update_metrics=True,
      on_nonfinite=rc.train.on_nonfinite)
  completion = m.pt_positions == "completion"

  def step(state, teacher_variables, batch):
    inner = {"tokens": batch["tokens"].astype(jnp.int32)}
    if "pt_tokens" in batch:
      pt = jnp.swapaxes(batch["pt_tokens"], 0, 1).astype(jnp.int32)
      inner["pt_tokens"] = pt
      if completion:
        inner["pt_mask"] = jnp.broadcast_to(
            jnp.arange(pt.shape[-1]) >= p, pt.shape)
    key = step_utils.step_rng(state.rng, state.step, None)
    trainable, opt_state, metrics = update(
        state.trainable(), state.opt_state, teacher_variables, inner, key)
    new = state.replace(step=state.step + u, params=trainable["student"],
                        distiller_params=trainable["distiller"],
                        opt_state=opt_state)
    return new, dict(metrics, loss=metrics["tot_loss"])

  return step


class Feed:
  """The batches of outer steps (see the module docstring)."""

  def __init__(self, rc, tokens):
    m, b = rc.section("minillm"), rc.train.batch_size
    self.u, self.pt = lm_config.minillm_updates(rc), m.pt
    try:
      self.prompts = text_lib.lm_dataset(tokens, batch_size=m.num_rollouts,
                                         seed=rc.seed)
      self.pt_ds = (text_lib.lm_dataset(tokens, batch_size=b,
                                        seed=rc.seed + 1) if m.pt else None)
    except ValueError as e:
      raise ConfigError("minillm.num_rollouts", str(e)) from None

  def outer(self, o: int) -> Dict[str, np.ndarray]:
    out = {"tokens": np.asarray(self.prompts[o]["tokens"], np.int32)}
    if self.pt_ds is not None:
      out["pt_tokens"] = np.stack(
          [np.asarray(self.pt_ds[o * self.u + i]["tokens"], np.int32)
           for i in range(self.u)], axis=1)
    return out

  def batch(self, step: int, n: int):
    """(host batch, stacked) of the updates ``[step, step + n)``."""
    first, k = step // self.u, n // self.u
    if k == 1:
      return self.outer(first), False
    rows = [self.outer(o) for o in range(first, first + k)]
    return jax.tree.map(lambda *xs: np.stack(xs), *rows), True


def steps_per_epoch(rc, num_sequences: int) -> int:
  """Updates per pass over the prompts."""
  m = rc.section("minillm")
  return max(1, num_sequences // m.num_rollouts) * lm_config.minillm_updates(
      rc)


def budget(rc) -> Dict[str, Any]:
  """Per update: the target tokens the loss sees (rollout responses + the
  pre-training positions), the tokens the teacher processes (mixed
  sampling, the rollout's rewards, each minibatch and pre-training batch)
  and the sampled tokens."""
  m, g = rc.section("minillm"), rc.section("generation")
  b, n, u = rc.train.batch_size, m.num_rollouts, lm_config.minillm_updates(rc)
  length, new = rc.data.seq_len - 1, g.max_new_tokens
  pt_pos = new if m.pt_positions == "completion" else length
  loss = b * new + (b * pt_pos if m.pt else 0)
  teacher = (n * length * (2 if m.teacher_mixed_alpha else 1)) / u
  teacher += b * length * (1 + (m.pt and m.kd_ratio > 0))
  return {"loss": loss, "teacher": teacher, "generated": n * new / u}
