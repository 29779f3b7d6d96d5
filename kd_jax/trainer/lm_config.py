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
* ``generation``: completions generated inside the step after a prompt of
  ``seq_len - max_new_tokens`` tokens (0: off, train on the data): by the
  teacher (``seq_kd``: Seq-KD) and/or, with probability ``lmbda``, by the
  student (on-policy GKD, TRL's names), sampled at ``temperature`` with
  optional ``top_k`` / ``top_p``.

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
import json
import os
from typing import Any, Mapping, Optional, Tuple

from kd_jax.trainer import config as config_lib
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


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  max_new_tokens: int = 0   # 0: no generation (train on the data)
  lmbda: float = 0.0
  seq_kd: bool = False
  temperature: float = 0.9
  top_k: int = 0
  top_p: float = 0.0


def read_metadata(folder: str, key: str = "data") -> dict:
  """The prepared dataset's ``kd_jax_text.json`` (a `ConfigError` naming
  the folder when it is missing)."""
  from kd_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, text_lib.METADATA_FILE)
  if not os.path.isdir(folder):
    raise ConfigError(key, f"data folder {folder!r} not found; prepare it "
                      "with experiments/prepare_corpus.py (see docs/lm.md).")
  if not os.path.isfile(path):
    raise ConfigError(key, f"{folder!r} is not a prepared text dataset (no "
                      f"{text_lib.METADATA_FILE}); prepare it with "
                      "experiments/prepare_corpus.py.")
  with open(path) as f:
    return json.load(f)


def _validate_data(rc):
  d = rc.data
  for key in ("eval_sequences", "train_sequences"):
    v = getattr(d, key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f"data.{key}", f"must be an int >= 0; got {v!r}.")
  meta = read_metadata(d.folder, "data.data_dir")
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


def validate(rc, check_paths: bool):
  rc = dataclasses.replace(rc, data=_validate_data(rc))
  _validate_model("model", rc.model, teacher=False)
  _validate_teachers(rc, check_paths)
  _validate_generation(rc)
  _validate_loss(rc)
  return rc


def debug(c) -> None:
  """LM debug runs: 16 train / 8 eval sequences."""
  if "data" not in c:
    c.data = {}
  c.data.train_sequences = 16
  c.data.eval_sequences = 8
  c.train.eval_every_steps = 2


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
  for k in ("num_steps", "eval_every_steps", "log_every_steps"):
    if tr.get(k):
      tr[k] = max(1, int(round(tr[k] * factor)))
  data = d["data"] = dict(d.get("data", {}))
  if data.get("train_sequences"):
    data["train_sequences"] = int(round(data["train_sequences"] * factor))
  return d


config_lib.register_task("lm", config_lib.TaskSchema(
    data=TextDataConfig, model=LMModelConfig, teacher=LMTeacherConfig,
    validate=validate, debug=debug, scale=scale,
    extra={"generation": GenerationConfig}))
