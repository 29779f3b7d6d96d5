"""Language-model runs: the config parsed once into typed, frozen objects.

A config with ``task = "lm"`` (see ``configs/lm_jane_austen.py``) selects
the language-model trainer (`kd_jax.trainer.lm`). ``mode`` is one of

* ``train``: next-token NLL (a teacher, or the student alone);
* ``token_kd``: teacher-forced token-level KD with ``kd.divergence``
  (``forward_kl``, ``reverse_kl`` -- MiniLLM's direction --,
  ``js_divergence`` with ``kd.beta``, ``total_variation``), plain logits or
  the fused head loss (``kd.fused``);
* ``seq_kd``: sequence-level KD (Kim & Rush, 2016) on teacher continuations;
* ``gkd``: on-policy GKD (Agarwal et al., 2024) with TRL ``GKDTrainer``'s
  ``lmbda``, ``beta``, ``temperature``, ``seq_kd``;
* ``topk``: offline KD from the teacher's cached top-k log-probabilities.

Nothing below `parse` reads the `ConfigDict`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Tuple

import ml_collections

from kd_jax.trainer import config as config_lib
from kd_jax.trainer.config import ConfigError

MODES = ("train", "token_kd", "seq_kd", "gkd", "topk")
DIVERGENCES = ("forward_kl", "reverse_kl", "js_divergence", "total_variation")
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class LMData:
  folder: str            # data_dir/name/version (a prepared text dataset)
  batch_size: int
  eval_batch_size: int
  eval_sequences: int    # first N sequences of each held-out split (0 = all)
  train_sequences: int   # first N train sequences (0 = all)
  eval_splits: Tuple[str, ...]
  seq_len: int = 0       # from the dataset's metadata
  vocab_size: int = 0
  eos_id: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class LMModel:
  preset: str            # a `kd_jax.models.lm.PRESETS` name ...
  hf_dir: str            # ... or a Hugging Face checkpoint folder
  overrides: Mapping[str, Any]  # LMConfig fields over the preset
  dtype: str
  remat: bool
  checkpoint: str = ""   # teacher: an LM run's workdir (its checkpoints)
  # teacher on a mesh: 'replicated' | 'fsdp' | 'tensor' | ((regex, spec), ...)
  sharding: Any = "replicated"


@dataclasses.dataclass(frozen=True)
class LMKD:
  divergence: str
  temperature: float
  beta: float
  ce_weight: float
  kd_weight: float
  fused: bool
  chunk_size: int
  vocab_size: Optional[int]


@dataclasses.dataclass(frozen=True)
class LMGKD:
  lmbda: float
  beta: float
  temperature: float
  seq_kd: bool
  max_new_tokens: int
  top_k: Optional[int]
  top_p: Optional[float]


@dataclasses.dataclass(frozen=True)
class LMTopk:
  k: int
  tail: str
  temperature: float
  cache_dir: str         # default: <teacher workdir>/topk_cache


@dataclasses.dataclass(frozen=True)
class LMOptim:
  learning_rate: float
  warmup_steps: int
  weight_decay: float
  grad_clip: float


@dataclasses.dataclass(frozen=True)
class LMRunConfig:
  mode: str
  seed: int
  steps: int
  log_every: int
  eval_every: int
  data: LMData
  student: LMModel
  teacher: Optional[LMModel]
  kd: LMKD
  gkd: LMGKD
  topk: LMTopk
  optim: LMOptim
  checkpoint_enabled: bool
  checkpoint_keep: int
  config_json: str
  # (('data', d), ('fsdp', f), ('tensor', t)): a device mesh (as the CNN
  # trainer's `train.mesh`); () = one device (or, with several processes,
  # {'data': all devices}).
  mesh: Tuple[Tuple[str, int], ...] = ()
  sharding_rules: Tuple[Any, ...] = ()  # ((regex, spec), ...) of the state


def _get(c, key, default):
  return c.get(key, default) if c is not None else default


def _positive(key, v):
  if not isinstance(v, int) or isinstance(v, bool) or v < 1:
    raise ConfigError(key, f"must be a positive int, got {v!r}.")
  return v


def _model(c, key, *, teacher: bool) -> LMModel:
  if c is None:
    raise ConfigError(key, "missing section.")
  preset, hf_dir = str(_get(c, "preset", "")), str(_get(c, "hf_dir", ""))
  from kd_jax.models.lm import PRESETS  # pylint: disable=g-import-not-at-top
  ckpt = str(_get(c, "checkpoint", "")) if teacher else ""
  if hf_dir and ckpt:
    raise ConfigError(f"{key}.hf_dir", "give hf_dir or checkpoint, not both.")
  if not hf_dir and preset not in PRESETS:
    raise ConfigError(f"{key}.preset", f"unknown preset {preset!r}; "
                      f"available: {sorted(PRESETS)} (or set hf_dir).")
  if hf_dir and not os.path.isdir(hf_dir):
    raise ConfigError(f"{key}.hf_dir", f"checkpoint folder {hf_dir!r} not "
                      "found.")
  dtype = str(_get(c, "dtype", "bfloat16"))
  if dtype not in DTYPES:
    raise ConfigError(f"{key}.dtype", f"must be one of {DTYPES}, got "
                      f"{dtype!r}.")
  ov = _get(c, "overrides", None)
  ov = dict(ov.to_dict() if hasattr(ov, "to_dict") else (ov or {}))
  sh = _get(c, "sharding", None) if teacher else None
  sh = (sh or "replicated") if sh is None or isinstance(sh, str) else (
      config_lib.parse_rules(sh))
  return LMModel(preset=preset, hf_dir=hf_dir, overrides=ov, dtype=dtype,
                 remat=bool(_get(c, "remat", False)), checkpoint=ckpt,
                 sharding=sh)


def read_metadata(folder: str, key: str = "data") -> dict:
  """The prepared dataset's ``kd_jax_text.json`` (a `ConfigError` naming
  the folder when it is missing)."""
  from kd_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, text_lib.METADATA_FILE)
  if not os.path.isdir(folder):
    raise ConfigError(key, f"data folder {folder!r} not found; prepare it "
                      "with experiments/prepare_corpus.py.")
  if not os.path.isfile(path):
    raise ConfigError(key, f"{folder!r} is not a prepared text dataset (no "
                      f"{text_lib.METADATA_FILE}); prepare it with "
                      "experiments/prepare_corpus.py.")
  with open(path) as f:
    return json.load(f)


def _data(c) -> LMData:
  if c is None:
    raise ConfigError("data", "missing section.")
  folder = os.path.join(str(_get(c, "data_dir", "")), str(_get(c, "name", "")),
                        str(_get(c, "version", "1.0.0")))
  meta = read_metadata(folder, "data.data_dir")
  splits = tuple(_get(c, "eval_splits", ("validation", "test")))
  for s in ("train",) + splits:
    if s not in meta.get("splits", {}):
      raise ConfigError("data.eval_splits", f"split {s!r} not in the dataset "
                        f"{folder!r} (splits: {sorted(meta['splits'])}).")
  return LMData(
      folder=folder,
      batch_size=_positive("data.batch_size", _get(c, "batch_size", 32)),
      eval_batch_size=_positive("data.eval_batch_size",
                                _get(c, "eval_batch_size", 64)),
      eval_sequences=int(_get(c, "eval_sequences", 0)),
      train_sequences=int(_get(c, "train_sequences", 0)),
      eval_splits=splits, seq_len=int(meta["seq_len"]),
      vocab_size=int(meta["vocab_size"]), eos_id=meta.get("eos_id"))


def _kd(c) -> LMKD:
  div = str(_get(c, "divergence", "forward_kl"))
  if div not in DIVERGENCES:
    raise ConfigError("kd.divergence", f"must be one of {DIVERGENCES}, got "
                      f"{div!r}.")
  vs = _get(c, "vocab_size", None)
  return LMKD(divergence=div, temperature=float(_get(c, "temperature", 1.0)),
              beta=float(_get(c, "beta", 0.5)),
              ce_weight=float(_get(c, "ce_weight", 0.0)),
              kd_weight=float(_get(c, "kd_weight", 1.0)),
              fused=bool(_get(c, "fused", False)),
              chunk_size=int(_get(c, "chunk_size", 1024)),
              vocab_size=int(vs) if vs else None)


def _gkd(c, seq_len: int) -> LMGKD:
  lmbda = float(_get(c, "lmbda", 0.5))
  if not 0.0 <= lmbda <= 1.0:
    raise ConfigError("gkd.lmbda", f"must be in [0, 1], got {lmbda}.")
  new = int(_get(c, "max_new_tokens", 32))
  if not 1 <= new < seq_len:
    raise ConfigError("gkd.max_new_tokens", f"must be in [1, {seq_len}) (the "
                      f"data's sequence length), got {new}.")
  tk, tp = _get(c, "top_k", None), _get(c, "top_p", None)
  return LMGKD(lmbda=lmbda, beta=float(_get(c, "beta", 0.5)),
               temperature=float(_get(c, "temperature", 0.9)),
               seq_kd=bool(_get(c, "seq_kd", False)), max_new_tokens=new,
               top_k=int(tk) if tk else None, top_p=float(tp) if tp else None)


def parse(config: ml_collections.ConfigDict) -> LMRunConfig:
  """Validates an LM run's config once; every error is a `ConfigError`."""
  mode = str(config.get("mode", "train"))
  if mode not in MODES:
    raise ConfigError("mode", f"must be one of {MODES} for task 'lm', got "
                      f"{mode!r}.")
  data = _data(config.get("data"))
  teacher = (None if mode == "train" else
             _model(config.get("teacher"), "teacher", teacher=True))
  if teacher is not None and not (teacher.hf_dir or teacher.checkpoint):
    raise ConfigError("teacher.checkpoint", f"mode {mode!r} needs a teacher: "
                      "an LM run's workdir (checkpoint) or hf_dir.")
  tr = config.get("train", ml_collections.ConfigDict())
  opt = config.get("optimizer", ml_collections.ConfigDict())
  tc, ck = config.get("topk"), config.get("checkpoint")
  steps = _positive("train.steps", _get(tr, "steps", 100))
  mesh = _get(tr, "mesh", None)
  mesh = tuple(dict(mesh.to_dict() if hasattr(mesh, "to_dict") else
                    (mesh or {})).items())
  rules = config_lib.parse_rules(_get(tr, "sharding_rules", ()))
  _validate_mesh(mesh, rules, data, teacher)
  return LMRunConfig(
      mode=mode, seed=int(config.get("seed", 0)), steps=steps,
      log_every=_positive("train.log_every", _get(tr, "log_every", 10)),
      eval_every=int(_get(tr, "eval_every", 0)) or steps,
      data=data, student=_model(config.get("student"), "student",
                                teacher=False),
      teacher=teacher, kd=_kd(config.get("kd")),
      gkd=_gkd(config.get("gkd"), data.seq_len),
      topk=LMTopk(k=_positive("topk.k", _get(tc, "k", 32)),
                  tail=str(_get(tc, "tail", "bucket")),
                  temperature=float(_get(tc, "temperature", 1.0)),
                  cache_dir=str(_get(tc, "cache_dir", ""))),
      optim=LMOptim(learning_rate=float(_get(opt, "learning_rate", 1e-3)),
                    warmup_steps=int(_get(opt, "warmup_steps", 0)),
                    weight_decay=float(_get(opt, "weight_decay", 0.0)),
                    grad_clip=float(_get(opt, "grad_clip", 1.0))),
      checkpoint_enabled=bool(_get(ck, "enabled", True)),
      checkpoint_keep=int(_get(ck, "keep", 1)),
      config_json=config.to_json_best_effort(indent=2, sort_keys=True),
      mesh=mesh, sharding_rules=rules)


def mesh_spec(mesh) -> Tuple[Tuple[str, int], ...]:
  """The mesh a run uses: `train.mesh`, else with several processes
  ``{'data': all devices}`` (data parallel), else () (one device)."""
  import jax  # pylint: disable=g-import-not-at-top
  if mesh:
    return tuple(mesh)
  return (("data", -1),) if jax.process_count() > 1 else ()


def _validate_mesh(mesh, rules, data: LMData, teacher) -> None:
  """`train.mesh` / `train.sharding_rules` / `teacher.sharding` (the checks
  that need no model: the engine's `make_mesh` / `state_rules` /
  `teacher_rules`); the batch sizes must split over data x fsdp and the
  processes."""
  import jax  # pylint: disable=g-import-not-at-top
  from kd_jax.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  if not mesh:
    if rules:
      raise ConfigError("train.sharding_rules", "needs train.mesh (a device "
                        "mesh).")
    if teacher is not None and teacher.sharding != "replicated":
      raise ConfigError("teacher.sharding", f"{teacher.sharding!r} needs "
                        "train.mesh (a device mesh).")
  mesh = mesh_spec(mesh)
  if not mesh:
    return
  try:
    m = sharding_lib.make_mesh(dict(mesh))
    sharding_lib.state_rules(m, rules=rules)
  except (TypeError, ValueError) as e:
    raise ConfigError("train.sharding_rules" if isinstance(e, TypeError)
                      else "train.mesh", str(e)) from None
  if teacher is not None:
    try:
      sharding_lib.teacher_rules(teacher.sharding)
    except ValueError as e:
      raise ConfigError("teacher.sharding", str(e)) from None
  div = m.shape["data"] * m.shape["fsdp"]
  div = div * jax.process_count() // math.gcd(div, jax.process_count())
  procs = jax.process_count()
  where = f"train.mesh {dict(mesh)}" + (f", {procs} processes" if procs > 1
                                        else "")
  for key in ("batch_size", "eval_batch_size"):
    bs = getattr(data, key)
    if bs % div:
      raise ConfigError(
          f"data.{key}", f"{bs} is not divisible by data x fsdp = "
          f"{m.shape['data']} x {m.shape['fsdp']} ({where}); use a multiple "
          f"of {div}.")
