"""Language modelling as a task of the one loop (``task = 'lm'``).

The run's pieces: a prepared text dataset (`lm_data`), Llama/Qwen2 student
and teacher (`kd_jax.models.lm`: a preset, or a Hugging Face folder), the
placement, the teacher's variables (an LM run's workdir or the HF folder,
restored into its placement), the token-level `Objective`
(`terms.build_objective`), the optimizer (`kd_jax.train.optim`), and the
engine's one LM step (`kd_jax.train.lm_steps.make_lm_step`) with the run's
options: `generation` (Seq-KD / on-policy GKD), the teacher's top-k cache
(``teacher.precompute``) or the fused head loss (``loss.fused_head``);
or, with ``minillm.enabled``, MiniLLM's outer steps (`lm_minillm`: one call
= rollouts + U optimizer updates; the loop's steps count the updates).
``model.init_checkpoint`` starts the student from another run's newest
parameters. ``units['tokens']`` and the report's ``loss_tokens`` /
``teacher_tokens`` / ``generated_tokens`` are the run's budget (`budget`).
Held-out perplexity :math:`\\exp(\\sum \\mathrm{nll} / \\sum n)` of every
``data.eval_splits`` split is the evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import distillers as distillers_lib
from kd_jax import logs
from kd_jax.models import lm as lm_models
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.train import create_train_state
from kd_jax.train import lm_steps
from kd_jax.train import mesh_losses
from kd_jax.train import sharding as sharding_lib
from kd_jax.train import objectives as objectives_lib
from kd_jax.train import optim
from kd_jax.train import steps as steps_lib
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import lm_config
from kd_jax.trainer import lm_data
from kd_jax.trainer import lm_minillm
from kd_jax.trainer import loop
from kd_jax.trainer import placement as placement_lib
from kd_jax.trainer import teachers as teachers_lib
from kd_jax.trainer import terms as terms_lib
from kd_jax.trainer.errors import ConfigError


def build_model(spec, rc, key: str, features=()):
  """(module, variables or None): a preset (initialized later) or a Hugging
  Face folder; checks the dataset's tokenizer and sequence length fit.
  `features`: what the model's features dict must also hold (e.g.
  ``('attention',)`` for attention distillers)."""
  dtype = jnp.dtype(spec.dtype)
  variables = None
  if spec.hf_dir:
    try:
      model, variables, _ = lm_models.load_hf_folder(
          spec.hf_dir, dtype=dtype, scan_layers=spec.scan_layers)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"{key}.hf_dir", str(e)) from None
  else:
    kw = dict(vocab_size=rc.data.vocab_size,
              max_position_embeddings=rc.data.seq_len)
    kw.update(spec.overrides)
    try:
      cfg = lm_models.preset_config(spec.preset, **kw)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{key}.overrides", str(e)) from None
    model = lm_models.Transformer(cfg, dtype=dtype, remat=spec.remat,
                                  scan_layers=spec.scan_layers)
  if features:
    model = model.clone(capture=tuple(features))
  try:
    lm_models.load_tokenizer(rc.data.folder,
                             vocab_size=model.config.vocab_size)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(key, f"the dataset's {e}.") from None
  limit = model.config.max_position_embeddings
  if rc.data.seq_len > limit:
    raise ConfigError(key, f"the dataset's sequences ({rc.data.seq_len} "
                      f"tokens) are longer than the model's context "
                      f"(max_position_embeddings {limit}).")
  return model, variables


def init_variables(model, seed: int):
  x = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(model.init(jax.random.key(seed), x))


def _check_vocab(rc, student, teacher) -> None:
  vs, vt = student.config.vocab_size, teacher.config.vocab_size
  has = any("vocab_size" in dict(s.hparams) for s in rc.loss.terms)
  if vs != vt and not has and not rc.teacher.precompute and rc.loss.terms:
    raise ConfigError("loss.terms", f"teacher vocabulary {vt} != student "
                      f"vocabulary {vs}; set the terms' vocab_size to the "
                      "shared prefix (e.g. the tokenizer's size).")


def _generation(rc, student, teacher) -> Optional[lm_steps.Generation]:
  g = rc.section("generation")
  if not g.max_new_tokens:
    return None

  def gen_fn(model):
    return lm_models.make_generate_fn(
        model, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
        top_k=g.top_k or None, top_p=g.top_p or None, eos_id=rc.data.eos_id)

  return lm_steps.Generation(
      rc.data.seq_len - g.max_new_tokens, lmbda=g.lmbda, seq_kd=g.seq_kd,
      eos_id=rc.data.eos_id,
      student_generate=gen_fn(student) if g.lmbda > 0 else None,
      teacher_generate=gen_fn(teacher) if g.seq_kd else None)


def budget(rc) -> Dict[str, float]:
  """Per optimizer step: ``loss`` (target tokens the loss sees: every
  position, or the completion positions when text is generated),
  ``teacher`` (tokens the teacher processes: its forward, its generation;
  expected values under GKD's coin) and ``generated`` (sampled tokens)."""
  if rc.section("minillm").enabled:
    return lm_minillm.budget(rc)
  g, b, length = rc.section("generation"), rc.train.batch_size, (
      rc.data.seq_len - 1)
  new = g.max_new_tokens
  has_teacher = rc.teacher is not None and not rc.teacher.precompute
  teacher = b * length if has_teacher and rc.loss.terms else 0.0
  gen_teacher = (1 - g.lmbda) * g.seq_kd if new else 0.0
  teacher += gen_teacher * b * length
  return {"loss": b * (new or length), "teacher": teacher,
          "generated": (g.lmbda + gen_teacher) * b * new}


def _features(rc) -> tuple:
  """What the models' features must hold for the run's distiller terms
  (their `lm_features`)."""
  out = []
  for spec in rc.loss.terms:
    if spec.kind == "distiller":
      cls = distillers_lib.registry()[spec.name]
      out += [f for f in getattr(cls, "lm_features", ()) if f not in out]
  return tuple(out)


@loop.register("lm")
class LMTask(loop.Task):
  """Train a language model, or distil a student from a frozen teacher."""

  @classmethod
  def metrics(cls, rc):
    splits = rc.data.eval_splits
    return tuple(loop.Metric(f"{s}_ppl", f"{s} ppl", higher=False,
                             gain=s == splits[-1]) for s in splits)

  def __init__(self, rc, workdir: str, *, dry_run: bool = False):
    del dry_run
    self.rc, self.workdir = rc, workdir
    feats = _features(rc)
    self.student, self._s_vars = build_model(rc.model, rc, "model", feats)
    self.teacher = self._t_vars = None
    if rc.teacher is not None:
      self.teacher, self._t_vars = build_model(rc.teacher, rc, "teacher",
                                               feats)
      _check_vocab(rc, self.student, self.teacher)
    x = jnp.zeros((1, min(8, rc.data.seq_len)), jnp.int32)
    self.placement = placement_lib.make_placement(
        rc, self.student, [self.teacher] if self.teacher else [], x)
    if self.teacher is not None:
      placement_lib.check_rules(rc, self.placement, None, [jax.eval_shape(
          lambda: init_variables(self.teacher, 0))])
    tokens = lm_data.source(rc, "train", rc.data.train_sequences)
    self.minillm = rc.section("minillm").enabled
    if self.minillm:
      u = lm_config.minillm_updates(rc)
      spc = -(-rc.train.steps_per_call // u) * u  # whole outer steps
      self.rc = rc = dataclasses.replace(rc, train=dataclasses.replace(
          rc.train, steps_per_call=spc))
      self.steps_per_epoch = lm_minillm.steps_per_epoch(rc, len(tokens))
    else:
      self.steps_per_epoch = max(1, len(tokens) // rc.train.batch_size)
    self.total_steps = config_lib.total_steps(rc, self.steps_per_epoch)
    self.budget = budget(rc)
    self.units = {"tokens": self.budget["loss"],
                  "examples": rc.train.batch_size}
    self.tx, self.schedule = optim.make_optimizer(
        rc.optimizer, steps_per_epoch=self.steps_per_epoch,
        total_steps=self.total_steps)
    self.objective = terms_lib.build_objective(
        rc.loss, run_info=distillers_lib.RunInfo())
    self.ds = self.eval_batches = None
    self._programs()

  def _programs(self):
    rc, p = self.rc, self.placement
    if self.minillm:
      step = lm_minillm.make_step(rc, self.student, self.teacher, self.tx)
      fn = lambda state, consts, batch: step(  # noqa: E731
          state, consts["teacher"], batch)
      self.single = p.compile(fn)
      self.multi = p.compile(steps_lib.make_multi_step(fn), stacked=True)
      self.eval_fn = p.compile(lm_steps.make_lm_eval_step(
          self.student, axis_name=p.axis_name), donate_state=False)
      return
    fused = None
    if rc.loss.fused_head:
      # On a mesh each device computes the head loss of its own tokens
      # (plain jit would gather the scanned tokens: `mesh_losses`).
      loss = (mesh_losses.shard_fused_loss(p.mesh)
              if isinstance(p, sharding_lib.MeshParallel)
              and p.num_devices > 1 else None)
      fused = lm_steps.FusedHead(
          functools.partial(lm_models.head_kernel,
                            config=self.student.config),
          functools.partial(lm_models.head_kernel,
                            config=self.teacher.config), rc.loss.chunk_size,
          loss)
    teacher = None if (rc.teacher is None or rc.teacher.precompute) else (
        self.teacher)
    step = lm_steps.make_lm_step(
        self.student, teacher, self.objective, self.tx,
        generation=_generation(rc, self.student, self.teacher), fused=fused,
        axis_name=p.axis_name, on_nonfinite=rc.train.on_nonfinite)
    fn = lambda state, consts, batch: step(  # noqa: E731
        state, consts.get("teacher"), batch)
    self.single = p.compile(fn)
    self.multi = p.compile(steps_lib.make_multi_step(fn), stacked=True)
    self.eval_fn = p.compile(lm_steps.make_lm_eval_step(
        self.student, axis_name=p.axis_name), donate_state=False)

  # -- the protocol ---------------------------------------------------------

  def model_name(self) -> str:
    return self.rc.model.preset or self.rc.model.hf_dir

  def dataset_name(self) -> str:
    return self.rc.data.name

  def init_state(self):
    rc = self.rc
    s_vars = (self._s_vars if self._s_vars is not None
              else init_variables(self.student, rc.seed))
    if rc.model.init_checkpoint:
      s_vars = self._init_from_checkpoint(s_vars)
    state = create_train_state(s_vars, self.tx,
                               rng=jax.random.key(rc.seed + 1))
    if self.objective.distiller_terms:
      state = self._init_distillers(state)
    placement_lib.check_rules(rc, self.placement, state, [])
    return state

  def _init_from_checkpoint(self, s_vars):
    """The student's parameters from an LM run's newest checkpoint (its
    architecture checked against `model` from the metadata)."""
    abstract = jax.eval_shape(lambda: s_vars)
    with logs.quiet_absl("Metadata file does not exist"):
      try:
        return ckpt_lib.load_teacher_variables(
            teachers_lib.checkpoint_dir(self.rc.model.init_checkpoint),
            abstract)
      except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError("model.init_checkpoint", str(e)) from None

  def _init_distillers(self, state):
    """The distillers' params / state from the first batch through both
    models (the teacher randomly initialized when only shapes matter)."""
    tokens = np.asarray(lm_data.source(self.rc, "train", 0)[0]["tokens"],
                        np.int32)[None]
    t_vars = (self._t_vars if self._t_vars is not None
              else init_variables(self.teacher, 0))
    s_logits, s_feats = self.student.apply(state.variables, tokens[:, :-1],
                                           train=False)
    t_logits, t_feats = self.teacher.apply(t_vars, tokens[:, :-1],
                                           train=False)
    inputs = objectives_lib.TermInputs(
        student_logits=s_logits.astype(jnp.float32),
        labels=jnp.asarray(tokens[:, 1:]),
        teacher_logits=t_logits.astype(jnp.float32),
        student_features=s_feats, teacher_features=t_feats,
        where=jnp.ones(tokens[:, 1:].shape, bool))
    params, dstate = self.objective.init_distillers(
        jax.random.key(self.rc.seed + 2), inputs)
    return create_train_state(state.variables, self.tx, rng=state.rng,
                              distiller_params=params, distiller_state=dstate)

  def teacher_variables(self):
    """The teacher's variables, placed (its checkpoint or HF folder)."""
    rc, t = self.rc, self.rc.teacher
    if self._t_vars is not None:
      return self.placement.place_teacher(self._t_vars)
    abstract = jax.eval_shape(lambda: init_variables(self.teacher, 0))
    return teachers_lib.restore(t.checkpoint, abstract, self.placement,
                                config_lib.teacher_key(rc, t, "checkpoint"))

  def constants(self, clock):
    rc, p = self.rc, self.placement
    consts, info = {}, {"model_params": self.student.config.num_params,
                        "seq_len": rc.data.seq_len,
                        "tokens_per_step": self.units["tokens"],
                        "init_checkpoint": rc.model.init_checkpoint or None}
    info.update({f"{k}_tokens": v * self.total_steps
                 for k, v in self.budget.items()})
    tv = None
    if self.teacher is not None:
      tv = self.teacher_variables()
      info["teacher_params"] = self.teacher.config.num_params
      if not rc.teacher.precompute:
        consts["teacher"] = tv
      clock.tick("teacher_ready")
    if self.minillm:
      self.ds = lm_minillm.Feed(rc, lm_data.source(
          rc, "train", rc.data.train_sequences))
    else:
      self.ds, cache = lm_data.train_dataset(rc, self.teacher, tv, p)
      info.update(cache)
    self.eval_batches = {s: [lm_data.shard(p, b)
                             for b in lm_data.eval_batches(rc, s)]
                         for s in rc.data.eval_splits}
    if self.teacher is not None and rc.teacher.evaluate:
      ev = self._perplexity(lm_steps.make_lm_eval_step(self.teacher), tv)
      info.update({f"teacher_{k}": v for k, v in ev.items()
                   if k.endswith("_ppl")})
    return consts, info

  def call(self, step: int, n: int):
    if self.minillm:
      batch, stacked = self.ds.batch(step, n)
      fn = self.multi if stacked else self.single
      return fn, lm_data.shard(self.placement, batch, stacked=stacked)
    if n == 1 and self.rc.train.steps_per_call == 1:
      return self.single, lm_data.shard(self.placement, self.ds[step])
    rows = [self.ds[s] for s in range(step, step + n)]
    batch = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    return self.multi, lm_data.shard(self.placement, batch, stacked=True)

  def _perplexity(self, eval_fn, variables) -> Dict[str, float]:
    if not hasattr(eval_fn, "lower"):
      eval_fn = self.placement.compile(eval_fn, donate_state=False)
    out = {}
    for split, batches in self.eval_batches.items():
      r = lm_steps.perplexity(self.placement.fetch(
          [eval_fn(variables, b) for b in batches]))
      out[f"{split}_ppl"], out[f"{split}_nll"] = r["perplexity"], r["nll"]
      out[f"{split}_token_acc"] = r["token_acc"]
    return out

  def evaluate(self, state, consts) -> Dict[str, float]:
    del consts
    return self._perplexity(self.eval_fn, state.variables)

  def summary(self, evals: List[Dict[str, Any]]) -> Dict[str, Any]:
    out = super().summary(evals)
    out["seq_len"] = self.rc.data.seq_len
    return out
