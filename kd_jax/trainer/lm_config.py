"""Language modelling (``task = 'lm'``): its config sections.

* ``data``: a prepared text dataset (``experiments/prepare_corpus.py``):
  ``data_dir`` / ``name`` / ``version``, the first ``train_sequences`` /
  ``eval_sequences`` sequences (0 = all), ``eval_splits`` (perplexity; the
  first one selects the "best" step).
* ``model`` / each teacher: a Llama/Qwen2 decoder (`kd_jax.models.lm`),
  either a ``preset`` with ``overrides`` or a Hugging Face folder
  (``hf_dir``); a teacher is an LM run's workdir (``checkpoint``) or an HF
  folder. ``precompute`` caches the teacher's top-``topk`` log-probabilities
  of the training sequences once (in ``cache_dir``, default
  ``<teacher>/topk_cache``); the loss terms are then top-k losses
  (``topk_kd``).
* ``model.init_checkpoint``: an LM run's workdir whose newest checkpoint's
  parameters start the student (a fresh optimizer; on-policy GKD and
  MiniLLM start from a supervised student, as their papers do).
* ``generation``: completions generated inside the step after a prompt of
  ``seq_len - max_new_tokens`` tokens (0: off, train on the data): by the
  teacher (``seq_kd``: Seq-KD) and/or, with probability ``lmbda``, by the
  student (on-policy GKD, TRL's names), sampled at ``temperature`` with
  optional ``top_k`` / ``top_p``. With ``lmbda = 0`` and no ``seq_kd`` the
  loss covers the data's completion positions (supervised KD / SFT on the
  same positions). GKD's loss temperature is its ``js_divergence`` term's
  ``temperature`` (default 1, TRL's: sampling only uses ``temperature``).
* ``minillm`` (``enabled``): MiniLLM (`kd_jax.distillers.minillm`, the
  authors' names): each call is one outer step -- ``num_rollouts``
  teacher-mixed samples of the prompts, then ``ppo_epochs`` passes of
  ``train.batch_size``-row minibatch updates (U = ppo_epochs x num_rollouts
  / batch_size optimizer steps; ``train.num_steps``, the LR schedule and
  checkpoints count those updates) with a pre-training batch of
  ``train.batch_size`` training sequences per update (``pt``). The student
  samples ``generation.max_new_tokens`` tokens at
  ``generation.temperature`` (the authors' ``--temperature``: the
  log-probabilities and the single-step term use it too).

Token KD is an objective like every other: ``loss.terms.forward_kl =
{'weight': 0.5, 'temperature': 1.0}`` (``reverse_kl``, ``js_divergence``
with ``beta``, ``total_variation``; ``vocab_size`` for heads padded
differently), with ``loss.ce_weight`` on the data NLL; ``loss.fused_head``
computes CE + the one divergence from hidden states in ``loss.chunk_size``
token chunks. Distiller terms (`kd_jax.distillers`) read the models' hidden
states and attention.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple

from kd_jax.trainer import config as config_lib
from kd_jax.trainer import lm_metadata
from kd_jax.trainer import terms as terms_lib
from kd_jax.trainer.errors import ConfigError

DTYPES = ("bfloat16", "float32")
DIVERGENCES = ("forward_kl", "reverse_kl", "js_divergence", "total_variation")


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
  data_dir: str = "workdirs/lm_data"
  name: str = ""
  version: str = "1.0.0"
  eval_sequences: int = 0   # first N sequences of each held-out split
  train_sequences: int = 0  # first N train sequences (0 = all)
  eval_splits: Tuple[str, ...] = ("validation", "test")
  # From the dataset's metadata (filled by `validate`).
  seq_len: int = 0
  vocab_size: int = 0
  eos_id: Optional[int] = None

  @property
  def folder(self) -> str:
    return os.path.join(self.data_dir, self.name, self.version)


@dataclasses.dataclass(frozen=True)
class LMModelConfig:
  preset: str = "llama_tiny"  # a `kd_jax.models.lm.PRESETS` name ...
  hf_dir: str = ""            # ... or a Hugging Face checkpoint folder
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dtype: str = "bfloat16"
  remat: bool = False
  scan_layers: bool = False  # the blocks as one nn.scan (stacked params)
  # An LM run's workdir: its newest checkpoint's parameters start the
  # student (fresh optimizer state, step 0).
  init_checkpoint: str = ""


@dataclasses.dataclass(frozen=True)
class LMTeacherConfig:
  label: str = "teacher"
  preset: str = "llama_tiny"
  hf_dir: str = ""
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dtype: str = "bfloat16"
  remat: bool = False
  scan_layers: bool = False
  checkpoint: str = ""      # an LM run's workdir (its checkpoints)
  precompute: bool = False  # top-k cache of the training sequences
  topk: int = 32
  cache_dir: str = ""       # default: <teacher>/topk_cache
  evaluate: bool = False    # the teacher's held-out perplexity first
  weight: float = 1.0
  # 'replicated' | 'fsdp' | 'tensor' | ((regex, spec), ...) (mesh runs).
  sharding: Any = "replicated"
  # A teacher with its own tokenizer (`kd_jax.trainer.lm_cross`): its
  # prepared dataset in data.data_dir (tokenizer, vocabulary, sequence
  # length) or its tokenizer.json; teacher tokens per window (0: automatic).
  data_name: str = ""
  tokenizer: str = ""
  seq_len: int = 0


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 0   # 0: no generation (train on the data)
  lmbda: float = 0.0
  seq_kd: bool = False
  temperature: float = 0.9
  top_k: int = 0
  top_p: float = 0.0


@dataclasses.dataclass(frozen=True)
class MiniLLMSection:
  """`config.minillm`: MiniLLM's procedure (`kd_jax.distillers.minillm`,
  the authors' names; defaults = their training scripts' values except the
  sizes)."""
  enabled: bool = False
  num_rollouts: int = 64      # prompts sampled per outer step
  chunk_size: int = 0         # rollout rows per generation chunk (0: all)
  pt: bool = True             # the pre-training term (False: *_no_pt)
  pt_positions: str = "all"   # 'all' | 'completion' (positions >= prompt)
  teacher_mixed_alpha: float = 0.2  # 0: sample from the student alone
  reward_scaling: float = 0.5
  cliprange_reward: float = 100.0   # 0: no clipping
  gamma: float = 0.95
  length_norm: bool = True
  whiten: bool = True
  cliprange: float = 0.2
  single_step_reg: bool = True
  lm_coef: float = 1.0
  kd_ratio: float = 0.5
  ppo_epochs: int = 4


def _validate_data(rc):
  d = rc.data
  for key in ("eval_sequences", "train_sequences"):
    v = getattr(d, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f"data.{key}", f"must be an int >= 0; got {v!r}.")
  meta = lm_metadata.read_metadata(d.folder, "data.data_dir", data_dir=d.data_dir,
                       name=d.name)
  splits = tuple(d.eval_splits)
  for s in ("train",) + splits:
    if s not in meta.get("splits", {}):
      raise ConfigError("data.eval_splits", f"split {s!r} not in the dataset "
                        f"{d.folder!r} (splits: {sorted(meta['splits'])}).")
  return dataclasses.replace(d, eval_splits=splits,
                             seq_len=int(meta["seq_len"]),
                             vocab_size=int(meta["vocab_size"]),
                             eos_id=meta.get("eos_id"))


def _validate_model(key: str, m, *, teacher: bool) -> None:
  from kd_jax.models.lm import PRESETS  # pylint: disable=g-import-not-at-top
  if teacher and m.hf_dir and m.checkpoint:
    raise ConfigError(f"{key}.hf_dir", "give hf_dir or checkpoint, not both.")
  if not m.hf_dir and m.preset not in PRESETS:
    raise ConfigError(f"{key}.preset", f"unknown preset {m.preset!r}; "
                      f"available: {sorted(PRESETS)} (or set hf_dir).")
  if m.hf_dir and not os.path.isdir(m.hf_dir):
    raise ConfigError(f"{key}.hf_dir", f"checkpoint folder {m.hf_dir!r} not "
                      "found.")
  if m.dtype not in DTYPES:
    raise ConfigError(f"{key}.dtype", f"must be one of {DTYPES}, got "
                      f"{m.dtype!r}.")


def _validate_teachers(rc, check_paths: bool) -> None:
  if len(rc.teachers) > 1:
    raise ConfigError("teachers", "language-model runs distil from one "
                      "teacher (give `teacher`).")
  for t in rc.teachers:
    _validate_model("teacher", t, teacher=True)
    if check_paths and not (t.hf_dir or t.checkpoint):
      raise ConfigError("teacher.checkpoint", "mode 'distill' needs a "
                        "teacher: an LM run's workdir (checkpoint) or hf_dir.")
    if check_paths and t.checkpoint and not os.path.exists(t.checkpoint):
      raise ConfigError("teacher.checkpoint",
                        f"path {t.checkpoint!r} does not exist.")
    config_lib.check_positive_int("teacher.topk", t.topk)


def _validate_generation(rc) -> None:
  g, seq = rc.section("generation"), rc.data.seq_len
  new = g.max_new_tokens
  if not isinstance(new, int) or new < 0 or (new and not new < seq):
    raise ConfigError("generation.max_new_tokens", f"must be 0 (off) or in "
                      f"[1, {seq}) (the data's sequence length); got {new!r}.")
  config_lib.check_number("generation.lmbda", g.lmbda, 0.0, 1.0)
  config_lib.check_number("generation.temperature", g.temperature, 0.0,
                          open_lo=True)
  config_lib.check_number("generation.top_p", g.top_p, 0.0, 1.0)
  if not isinstance(g.top_k, int) or g.top_k < 0:
    raise ConfigError("generation.top_k", f"must be an int >= 0; got "
                      f"{g.top_k!r}.")
  if (g.lmbda > 0 or g.seq_kd) and not new:
    raise ConfigError("generation.max_new_tokens", "lmbda > 0 / seq_kd "
                      "generate completions: set max_new_tokens > 0.")
  if (g.lmbda > 0 or g.seq_kd) and rc.mode != "distill":
    raise ConfigError("generation", "generated completions (lmbda / seq_kd) "
                      "need mode 'distill'.")


def _validate_loss(rc) -> None:
  lo, g = rc.loss, rc.section("generation")
  if not rc.distill and lo.terms:
    raise ConfigError("loss.terms", "task 'lm' in mode 'train' takes no "
                      f"terms; got {[s.label for s in lo.terms]} (teacher-free "
                      "distillers are image methods).")
  if rc.section("minillm").enabled:
    return  # MiniLLM's loss is its own (_validate_minillm)
  if rc.distill and not lo.terms and not g.seq_kd:
    raise ConfigError("loss.terms", "mode 'distill' needs a KD term (e.g. "
                      "{'forward_kl': {'weight': 0.5}}) or the teacher's "
                      "completions (generation.seq_kd).")
  specs = [s.term() for s in lo.terms if s.kind == "loss"]
  cached = any(t.precompute for t in rc.teachers)
  for s, t in zip([s for s in lo.terms if s.kind == "loss"], specs):
    if t.sparse != cached:
      raise ConfigError(f"loss.terms.{s.label}", (
          f"{s.name!r} reads a top-k cache: set teacher.precompute=True"
          if t.sparse else
          "the teacher is a top-k cache (teacher.precompute): use 'topk_kd'"))
  if cached and (g.max_new_tokens or lo.fused_head):
    raise ConfigError("teacher.precompute", "a top-k cache holds the data "
                      "sequences: incompatible with generation / "
                      "loss.fused_head.")
  if lo.fused_head and (len(lo.terms) != 1 or lo.terms[0].kind != "loss"
                        or lo.terms[0].name not in DIVERGENCES):
    raise ConfigError("loss.fused_head", f"computes CE and one divergence "
                      f"term ({', '.join(DIVERGENCES)}); got "
                      f"{[s.label for s in lo.terms]}.")
  if lo.warmup_epochs or lo.label_smoothing:
    raise ConfigError("loss.warmup_epochs" if lo.warmup_epochs else
                      "loss.label_smoothing", "not supported for task 'lm'.")
  terms_lib.check_values(lo.terms, (1, 2, rc.data.vocab_size),
                         token_level=True)


def _validate_init(rc, check_paths: bool) -> None:
  path = rc.model.init_checkpoint
  if not path:
    return
  if rc.model.hf_dir:
    raise ConfigError("model.init_checkpoint", "give model.hf_dir or "
                      "model.init_checkpoint, not both.")
  if check_paths and not os.path.exists(path):
    raise ConfigError("model.init_checkpoint",
                      f"path {path!r} does not exist.")


def minillm_config(rc):
  """The run's `kd_jax.distillers.minillm.MiniLLMConfig` (`ConfigError`
  naming the key of a bad value)."""
  from kd_jax.distillers import minillm  # pylint: disable=g-import-not-at-top
  m, g = rc.section("minillm"), rc.section("generation")
  kw = {f.name: getattr(m, f.name) for f in dataclasses.fields(
      minillm.MiniLLMConfig) if hasattr(m, f.name)}
  kw["temperature"] = g.temperature
  kw["teacher_mixed_alpha"] = m.teacher_mixed_alpha or None  # 0: none
  kw["cliprange_reward"] = m.cliprange_reward or None        # 0: none
  for k in ("teacher_mixed_alpha", "reward_scaling", "cliprange_reward",
            "gamma", "cliprange", "lm_coef", "kd_ratio"):
    if kw[k] is not None:
      config_lib.check_number(f"minillm.{k}", kw[k])
  try:
    return minillm.MiniLLMConfig(**kw)
  except ValueError as e:
    key, _, msg = str(e).partition(" ")
    raise ConfigError(key, msg + ".") from None


def minillm_updates(rc) -> int:
  """U: optimizer updates of one MiniLLM outer step (= one call)."""
  m = rc.section("minillm")
  return m.ppo_epochs * (m.num_rollouts // rc.train.batch_size)


def _validate_minillm(rc) -> None:
  m, g, tr = rc.section("minillm"), rc.section("generation"), rc.train
  if not m.enabled:
    return
  why = [(rc.mode != "distill", "mode", "needs mode 'distill'"),
         (bool(rc.loss.terms) or rc.loss.fused_head, "loss.terms",
          "MiniLLM's loss is its own (policy gradient + single-step reverse "
          "KL + minillm.lm_coef x the pre-training term): leave loss.terms "
          "empty and loss.fused_head off"),
         (not g.max_new_tokens, "generation.max_new_tokens",
          "MiniLLM samples responses: set max_new_tokens > 0"),
         (g.lmbda > 0 or g.seq_kd, "generation", "lmbda / seq_kd are GKD's "
          "and Seq-KD's; MiniLLM samples from the (teacher-mixed) student "
          "itself"),
         (g.top_k > 0 or 0 < g.top_p < 1, "generation.top_k",
          "MiniLLM's losses take the full vocabulary: top_k / top_p must be "
          "0 (the authors' scripts: top_k=0, top_p=1)"),
         (tr.parallel == "pmap", "train.parallel", "MiniLLM runs on a mesh "
          "('none' / 'jit'), not 'pmap'"),
         (any(t.precompute for t in rc.teachers), "teacher.precompute",
          "MiniLLM needs the teacher itself (rewards on sampled text), not "
          "a top-k cache")]
  for bad, key, msg in why:
    if bad:
      raise ConfigError(key, f"minillm.enabled: {msg}.")
  config_lib.check_positive_int("minillm.num_rollouts", m.num_rollouts)
  if m.num_rollouts % tr.batch_size:
    raise ConfigError("minillm.num_rollouts", f"{m.num_rollouts} must be a "
                      f"multiple of train.batch_size {tr.batch_size} (the "
                      "PPO minibatch).")
  c = m.chunk_size
  if not isinstance(c, int) or c < 0 or (c and m.num_rollouts % c):
    raise ConfigError("minillm.chunk_size", f"must be 0 (all rollouts at "
                      f"once) or divide num_rollouts {m.num_rollouts}; got "
                      f"{c!r}.")
  if m.pt_positions not in ("all", "completion"):
    raise ConfigError("minillm.pt_positions", f"must be 'all' or "
                      f"'completion'; got {m.pt_positions!r}.")
  minillm_config(rc)
  u = minillm_updates(rc)
  for key, v in (("train.num_steps", tr.num_steps),
                 ("train.eval_every_steps", tr.eval_every_steps),
                 ("checkpoint.every_steps", rc.checkpoint.every_steps)):
    if v % u:
      raise ConfigError(key, f"{v} is not a multiple of {u}, the updates of "
                        f"one MiniLLM outer step (ppo_epochs {m.ppo_epochs} "
                        f"x num_rollouts {m.num_rollouts} / batch_size "
                        f"{tr.batch_size}).")


def validate(rc, check_paths: bool):
  from kd_jax.trainer import lm_cross  # pylint: disable=g-import-not-at-top
  rc = dataclasses.replace(rc, data=_validate_data(rc))
  _validate_model("model", rc.model, teacher=False)
  _validate_init(rc, check_paths)
  _validate_teachers(rc, check_paths)
  _validate_generation(rc)
  lm_cross.validate(rc)  # a teacher with its own tokenizer
  _validate_loss(rc)
  _validate_minillm(rc)
  return rc


def debug(c) -> None:
  """LM debug runs: 16 train / 8 eval sequences."""
  if "data" not in c:
    c.data = {}
  c.data.train_sequences = 16
  c.data.eval_sequences = 8
  c.train.eval_every_steps = 2
  m = c.get("minillm", None)
  if m is not None and m.get("enabled", False):
    m.num_rollouts, m.ppo_epochs, m.chunk_size = c.train.batch_size, 1, 0


def scaled_model(model: dict, scale: float) -> dict:
  """A model section with widths multiplied by `scale` (preset + overrides;
  widths stay multiples of ``2 * num_heads`` so head_dim stays even)."""
  if scale == 1 or model.get("hf_dir"):
    return model
  from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
  base = dict(lm.PRESETS[model.get("preset", "llama_tiny")],
              **model.get("overrides", {}))
  q = 2 * base["num_heads"]
  ov = dict(model.get("overrides", {}))
  for k in ("hidden_size", "intermediate_size"):
    ov[k] = max(q, int(round(base[k] * scale / q)) * q)
  return dict(model, overrides=ov)


def scale(d: dict, factor: float) -> dict:
  """A phase config (a dict) scaled by `factor`: both models' widths, the
  steps (and eval / log intervals) and the training sequences."""
  if factor == 1:
    return d
  d = dict(d)
  for sec in ("model", "teacher"):
    if d.get(sec):
      d[sec] = scaled_model(d[sec], factor)
  tr = d["train"] = dict(d.get("train", {}))
  m = d.get("minillm") or {}
  u = 1  # a MiniLLM phase's steps stay whole outer steps of U updates
  if m.get("enabled"):
    u = (m.get("ppo_epochs", MiniLLMSection.ppo_epochs)
         * (m.get("num_rollouts", MiniLLMSection.num_rollouts)
            // max(1, tr.get("batch_size", 1))))
  for k in ("num_steps", "eval_every_steps", "log_every_steps"):
    if tr.get(k):
      q = u if k != "log_every_steps" else 1
      tr[k] = max(q, int(round(tr[k] * factor / q)) * q)
  data = d["data"] = dict(d.get("data", {}))
  if data.get("train_sequences"):
    data["train_sequences"] = int(round(data["train_sequences"] * factor))
  return d


config_lib.register_task("lm", config_lib.TaskSchema(
    data=TextDataConfig, model=LMModelConfig, teacher=LMTeacherConfig,
    validate=validate, debug=debug, scale=scale,
    extra={"generation": GenerationConfig, "minillm": MiniLLMSection}))
