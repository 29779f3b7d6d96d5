"""The three sides of `experiments/benchmark_peers.py`: one training step of
kd_jax, tunix and EasyDeL on the same teacher / student / batch / loss.

Each builder returns a `Side` (``run()``: one step on the fixed batch,
returning the loss; ``logits(tokens)``: the student's current logits;
``compiled()``: the compiled program(s) of one step, for XLA's
`memory_analysis()` / `cost_analysis()` / HLO text) or
raises `Unsupported` with the reason. Only `experiments/benchmark_peers.py`
imports this module, inside the peers' virtual environment.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

F32 = jnp.float32
WORKLOADS = ("forward_kl", "jsd", "fused", "intermediate")


class Unsupported(Exception):
  """The side cannot run this workload (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """What every side trains: HF folders, the batch ``[B, S + 1]`` (inputs
  ``[:, :-1]``, targets ``[:, 1:]``) and the loss hyperparameters."""
  teacher_dir: str
  student_dir: str
  tokens: np.ndarray
  temperature: float = 2.0
  alpha: float = 0.5
  beta: float = 0.5
  lr: float = 0.1
  chunk_size: int = 512

  def hf(self, which: str) -> Dict[str, Any]:
    d = self.teacher_dir if which == "teacher" else self.student_dir
    with open(os.path.join(d, "config.json")) as fh:
      return json.load(fh)


@dataclasses.dataclass
class Side:
  name: str
  run: Callable[[], Any]
  logits: Callable[[np.ndarray], np.ndarray]
  compiled: Callable[[], list]
  note: str = ""

  def memory(self) -> Dict[str, int]:
    return memory_of(*self.compiled())


def memory_of(*compiled) -> Dict[str, int]:
  """Per-program XLA sizes; ``peak`` = arguments + outputs - aliased +
  temporaries, maximized over the programs of one step."""
  out = {"temp": 0, "peak": 0}
  for c in compiled:
    m = c.memory_analysis()
    if m is None:
      continue
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes + m.temp_size_in_bytes)
    out["temp"] = max(out["temp"], int(m.temp_size_in_bytes))
    out["peak"] = max(out["peak"], int(peak))
  return out


def cost_of(*compiled) -> Dict[str, float]:
  """XLA's `cost_analysis()` summed over the programs of one step:
  ``flops`` and ``bytes`` (bytes accessed)."""
  out = {"flops": 0.0, "bytes": 0.0}
  for c in compiled:
    cost = c.cost_analysis()
    for d in (cost if isinstance(cost, (list, tuple)) else [cost]):
      out["flops"] += float((d or {}).get("flops", 0.0))
      out["bytes"] += float((d or {}).get("bytes accessed", 0.0))
  return out


# --------------------------------------------------------------------------
# kd_jax: the engine's one LM step (`kd_jax.train.lm_steps.make_lm_step`).


def _kd_objective(spec: Spec, workload: str, s_model, t_model, s_vars,
                  t_vars, tokens):
  from kd_jax import distillers  # pylint: disable=g-import-not-at-top
  from kd_jax.train.objectives import Objective, Term, TermInputs  # pylint: disable=g-import-not-at-top
  t, a = spec.temperature, spec.alpha
  if workload in ("forward_kl", "fused"):
    return Objective(ce_weight=1 - a, terms=(
        Term("forward_kl", a * t * t, temperature=t),)), None
  if workload == "jsd":
    return Objective(ce_weight=0.0, terms=(
        Term("js_divergence", 1.0, temperature=1.0, beta=spec.beta),)), None
  term = Term("hidden", a, distiller=distillers.create(
      "tinybert", layers="last", loss="cosine"))
  obj = Objective(ce_weight=1 - a, terms=(term,))
  x = tokens[:, :-1]
  (ls, fs), (lt, ft) = s_model.apply(s_vars, x), t_model.apply(t_vars, x)
  inputs = TermInputs(ls, tokens[:, 1:], teacher_logits=lt,
                      student_features=fs, teacher_features=ft,
                      where=jnp.ones(x.shape, bool))
  return obj, obj.init_distillers(jax.random.key(7), inputs)


def kd_jax_side(spec: Spec, workload: str) -> Side:
  from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
  from kd_jax.train import create_train_state, lm_steps  # pylint: disable=g-import-not-at-top
  s_model, s_vars, _ = lm.load_hf_folder(spec.student_dir, dtype=F32)
  t_model, t_vars, _ = lm.load_hf_folder(spec.teacher_dir, dtype=F32)
  if workload == "intermediate":
    s_model = s_model.clone(capture=("hidden_states",))
    t_model = t_model.clone(capture=("hidden_states",))
  tokens = jnp.asarray(spec.tokens)
  obj, dist = _kd_objective(spec, workload, s_model, t_model, s_vars, t_vars,
                            tokens)
  fused = None
  if workload == "fused":
    fused = lm_steps.FusedHead(
        functools.partial(lm.head_kernel, config=s_model.config),
        functools.partial(lm.head_kernel, config=t_model.config),
        chunk_size=spec.chunk_size)
  tx = optax.sgd(spec.lr)
  step = jax.jit(lm_steps.make_lm_step(s_model, t_model, obj, tx, fused=fused),
                 donate_argnums=0)
  dp, ds = dist or (None, None)
  box = {"state": create_train_state(s_vars, tx, rng=jax.random.key(0),
                                     distiller_params=dp, distiller_state=ds)}
  batch = {"tokens": tokens}

  def run():
    box["state"], metrics = step(box["state"], t_vars, batch)
    return metrics["loss"]

  def logits(tok):
    return np.asarray(s_model.apply({"params": box["state"].params},
                                    jnp.asarray(tok))[0])

  def compiled():
    return [step.lower(box["state"], t_vars, batch).compile()]

  note = "fused head" if fused else ""
  return Side("kd_jax", run, logits, compiled, note)


# --------------------------------------------------------------------------
# tunix: its DistillationTrainer's two programs per step (the teacher's
# `get_teacher_outputs`, then the student's `train_step`).


def _tunix_config(hf):
  from tunix.models.llama3 import model as tl  # pylint: disable=g-import-not-at-top
  return tl.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
      num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]),
      norm_eps=hf["rms_norm_eps"], weight_tying=hf["tie_word_embeddings"])


def tunix_models(spec: Spec):
  """(student, teacher): tunix Llama 3 modules from the same safetensors."""
  from tunix.models.llama3 import params as tp  # pylint: disable=g-import-not-at-top
  return tuple(tp.create_model_from_safe_tensors(
      d, _tunix_config(spec.hf(w)), dtype=F32)
               for d, w in ((spec.student_dir, "student"),
                            (spec.teacher_dir, "teacher")))


def _tunix_strategy(spec: Spec, workload: str, kd_loss: bool, student,
                    teacher):
  from tunix.distillation import strategies  # pylint: disable=g-import-not-at-top
  from tunix.models.llama3 import model as tl  # pylint: disable=g-import-not-at-top
  from examples import tunix_kd_jax as tk  # pylint: disable=g-import-not-at-top
  v = spec.hf("student")["vocab_size"]
  one_hot = lambda input_tokens, targets, target_mask: jax.nn.one_hot(  # noqa: E731
      targets, v)
  t, a = spec.temperature, spec.alpha
  if workload == "forward_kl" and not kd_loss:
    return strategies.LogitStrategy(tk.llama_logits, tk.llama_logits, one_hot,
                                    temperature=t, alpha=a)
  if workload == "forward_kl":
    return tk.KdJaxLogitStrategy(tk.llama_logits, tk.llama_logits,
                                 tk.target_labels, temperature=t, alpha=a)
  if workload == "jsd":
    if not kd_loss:
      raise Unsupported("tunix 0.1.7 has no JSD strategy (logit KL only)")
    return tk.KdJaxLogitStrategy(
        tk.llama_logits, tk.llama_logits, tk.target_labels,
        divergence="js_divergence", temperature=1.0, alpha=1.0,
        beta=spec.beta, kd_scale=1.0)
  if workload == "fused":
    if not kd_loss:
      raise Unsupported("tunix 0.1.7 materializes [B, T, V] logits (no "
                        "chunked / fused head loss)")
    return tk.KdJaxFusedStrategy(tk.llama_hidden, tk.llama_hidden,
                                 tk.target_labels, temperature=t, alpha=a,
                                 chunk_size=spec.chunk_size)
  if kd_loss:
    raise Unsupported("(no kd_jax-loss variant of this row)")
  return strategies.AttentionTransferStrategy(
      tk.llama_logits, tk.llama_logits, one_hot, attention_layer=tl.Attention,
      alpha=a)


def tunix_side(spec: Spec, workload: str, kd_loss: bool = False) -> Side:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tunix.distillation import distillation_trainer as dt  # pylint: disable=g-import-not-at-top
  from examples import tunix_kd_jax as tk  # pylint: disable=g-import-not-at-top
  student, teacher = tunix_models(spec)
  strategy = _tunix_strategy(spec, workload, kd_loss, student, teacher)
  trainer = dt.DistillationTrainer(
      student, teacher, strategy, optax.sgd(spec.lr),
      dt.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9))
  trainer = trainer.with_gen_model_input_fn(tk.next_token_inputs)
  train_step, _ = trainer.jit_train_and_eval_step()
  tokens = jnp.asarray(spec.tokens)
  example = dt.TrainingInput(input_tokens=tokens,
                             input_mask=jnp.ones(tokens.shape, bool))

  def run():  # what DistillationTrainer.train does per step
    loss, _, _ = train_step(trainer._prepare_inputs(example))  # pylint: disable=protected-access
    return loss

  def logits(tok):
    model = getattr(trainer.model, "model", trainer.model)
    out = np.asarray(tk.llama_logits(model, jnp.asarray(tok)))
    nnx.pop(model, nnx.Intermediate)  # features sown by a feature strategy
    return out

  def compiled():
    ex = trainer._prepare_inputs(example)  # pylint: disable=protected-access
    inputs = tk.next_token_inputs(example)
    t_prog = strategy._teacher_forward_fn.lower(  # pylint: disable=protected-access
        trainer.teacher_model, **inputs).compile()
    s_prog = nnx.jit(trainer.create_train_step_fn(),
                     donate_argnames=("optimizer",)).lower(
                         trainer.model, trainer.optimizer, ex).compile()
    return [t_prog, s_prog]

  name = "tunix + kd_jax loss" if kd_loss else "tunix"
  note = "AttentionTransferStrategy" if workload == "intermediate" else ""
  return Side(name, run, logits, compiled, note)


def tunix_projection_params(spec: Spec) -> int:
  """Parameters of tunix's FeatureProjectionStrategy projection for the
  decoder-layer outputs at this batch: its ``nnx.LinearGeneral`` maps the
  whole stacked feature array ``[L_s, B, T, D_s]`` to ``[L_t, B, T, D_t]``
  (``feature_extraction/projection.py``), so batch and time are projected
  too."""
  s, t = spec.hf("student"), spec.hf("teacher")
  b, length = spec.tokens.shape[0], spec.tokens.shape[1] - 1
  fin = s["num_hidden_layers"] * b * length * s["hidden_size"]
  fout = t["num_hidden_layers"] * b * length * t["hidden_size"]
  return fin * fout + fout


# --------------------------------------------------------------------------
# EasyDeL: its pure step functions (`distillation_step`, `gkd_step`) jitted
# as its trainer does (state donated), under the model's mesh.


def easydel_models(spec: Spec):
  """(student, teacher): EasyDeL LlamaForCausalLM from the same folders
  (its HF-PyTorch import; float32 compute, attention and softmax)."""
  import easydel as ed  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  kw = dict(from_torch=True, dtype=F32, param_dtype=F32,
            torch_dtype=torch.float32, verbose=False,
            config_kwargs=dict(attn_dtype=F32, kvdtype=F32,
                               attn_softmax_dtype=F32))
  return tuple(ed.AutoEasyDeLModelForCausalLM.from_pretrained(d, **kw)
               for d in (spec.student_dir, spec.teacher_dir))


def _easydel_step(spec: Spec, workload: str, kd_loss: bool):
  from easydel.trainers.distillation_trainer import _fn as dfn  # pylint: disable=g-import-not-at-top
  from easydel.trainers.generalized_knowledge_distillation_trainer import _fn as gfn  # pylint: disable=g-import-not-at-top
  t, a = spec.temperature, spec.alpha
  if kd_loss:
    if workload not in ("forward_kl", "jsd", "fused"):
      raise Unsupported("(no kd_jax-loss variant of this row)")
    from examples import easydel_kd_jax as ek  # pylint: disable=g-import-not-at-top
    kw = dict(temperature=t, alpha=a)
    if workload == "jsd":
      kw = dict(divergence="js_divergence", temperature=1.0, alpha=1.0,
                beta=spec.beta, kd_scale=1.0)
    if workload == "fused":
      kw["fused_chunk_size"] = spec.chunk_size
    return functools.partial(ek.kd_jax_distillation_step, **kw)
  if workload == "jsd":
    return functools.partial(gfn.gkd_step, beta=spec.beta, temperature=1.0)
  kw = dict(temperature=t, alpha=a)
  if workload == "fused":
    # EasyDeL's own chunked loss: its chunk is sequence positions of every
    # row (it pads the sequence to a multiple of it); the same tokens per
    # chunk as kd_jax's `chunk_size` (flattened tokens)
    kw["logits_chunk_size"] = max(1, spec.chunk_size // spec.tokens.shape[0])
  if workload == "intermediate":
    kw.update(alpha=1.0, hidden_state_weight=a, hidden_state_layers=(-1,))
  return functools.partial(dfn.distillation_step, **kw)


def easydel_side(spec: Spec, workload: str, kd_loss: bool = False,
                 models: Optional[tuple] = None) -> Side:
  student, teacher = models or easydel_models(spec)
  fn = _easydel_step(spec, workload, kd_loss)
  tokens = np.asarray(spec.tokens)
  batch = {"input_ids": jnp.asarray(tokens[:, :-1]),
           "attention_mask": jnp.ones(tokens[:, :-1].shape, jnp.int32),
           "labels": jnp.asarray(tokens[:, 1:])}
  mesh = student.mesh
  fresh = lambda s: jax.tree.map(  # noqa: E731  (the step donates its state)
      lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, s)
  box = {"state": fresh(student.to_state()).init_tx(optax.sgd(spec.lr))}
  t_state = fresh(teacher.to_state())
  step = jax.jit(fn, donate_argnums=0)
  if workload == "intermediate":
    try:  # EasyDeL's hidden-state MSE needs equal widths
      with mesh:
        jax.eval_shape(fn, box["state"], batch, t_state)
    except ValueError as e:
      raise Unsupported(f"EasyDeL: {str(e).splitlines()[0]}") from None

  def run():
    with mesh:
      box["state"], metrics = step(box["state"], batch, t_state)
    return metrics.loss

  def logits(tok):
    with mesh:
      out = box["state"].model(input_ids=jnp.asarray(tok),
                               attention_mask=jnp.ones(tok.shape, jnp.int32))
    return np.asarray(out.logits)

  def compiled():
    with mesh:
      return [step.lower(box["state"], batch, t_state).compile()]

  name = "EasyDeL + kd_jax loss" if kd_loss else "EasyDeL"
  note = {"fused": "logits_chunk_size", "jsd": "gkd_step (teacher-forced)",
          "intermediate": "hidden_state_weight"}.get(workload, "")
  if kd_loss and workload == "fused":
    note = "fused_head_divergence"
  return Side(name, run, logits, compiled, note)
