"""Distillation across tokenizers in the LM task: config, alignment, data.

A teacher with its own tokenizer is named in the teacher section, the losses
are loss terms of a cross-tokenizer kind:

* ``teacher.data_name``: the teacher's own prepared dataset (a
  ``experiments/prepare_corpus.py`` output in ``data.data_dir``, version
  ``data.version``): its tokenizer, its vocabulary size and sequence length
  (the preset teacher's shapes, as in the run that trained it on that
  dataset). Or ``teacher.tokenizer``: a ``tokenizer.json`` (the file or its
  folder, e.g. a Hugging Face teacher's ``hf_dir``). Either turns the
  cross-tokenizer path on, also when the two tokenizers happen to be equal.
* ``teacher.seq_len``: teacher tokens per re-tokenized window (``Lt``);
  0 = the 99.9th percentile over training windows, rounded up to 8, at most
  the teacher's context. Groups with a cut token are not scored (metric
  ``truncated``).
* ``loss.terms.<label> = {'name': 'uld' | 'extended_uld' | 'hybrid',
  'weight': w, ...}`` (`kd_jax.train.lm_cross_steps`; settings:
  ``student_temperature``, ``teacher_temperature``, ``min_prob``, ``beta``,
  ``matched_weight``, ``unmatched_weight`` as `kd_jax.losses`'s, plus
  ``merge`` -- ``'chain'`` (default) or ``'first'``, the alignment's merge
  rule, one per run -- and, for the hybrid, ``matched_by``: ``'bytes'``
  (default) or ``'piece'`` (TRL's exact vocabulary strings),
  `kd_jax.data.align.vocab_mapping`); ``loss.ce_weight`` weighs the
  student's CE (TRL's ``uld_crossentropy_weight``; the terms' weights are
  its ``uld_distillation_weight``).
* ``generation.lmbda`` > 0: on-policy (GKD's coin); the samples are
  re-tokenized for the teacher inside the compiled step by a host callback
  (`kd_jax.data.align.make_retokenize_fn`, one per step, not per token).

Offline, each training window is re-tokenized by grain when the batch is
read (`kd_jax.data.align.AlignedSource`). Bits per byte of every LM phase
use `byte_lengths` of that phase's tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Dict, Optional

import jax
import numpy as np

from kd_jax.data import align
from kd_jax.data import text as text_lib
from kd_jax.train import lm_cross_steps
from kd_jax.trainer import lm_data
from kd_jax.trainer import lm_metadata
from kd_jax.trainer.errors import ConfigError

MATCHED_BY = ("bytes", "piece")
AUTO_QUANTILE = 0.999  # of the training windows' teacher lengths
AUTO_SAMPLE = 1024     # windows sampled (evenly) for the automatic length


@dataclasses.dataclass(frozen=True)
class TeacherData:
  """What builds the teacher model: its tokenizer (`folder`: a dataset
  folder or a tokenizer path), vocabulary size and sequence length."""
  folder: str
  vocab_size: int
  seq_len: int


def enabled(rc) -> bool:
  t = rc.teacher
  return t is not None and bool(getattr(t, "data_name", "")
                                or getattr(t, "tokenizer", ""))


def specs(rc):
  return [s for s in rc.loss.terms if s.kind == "cross_tokenizer"]


def teacher_data(rc) -> TeacherData:
  t = rc.teacher
  if t.data_name:
    folder = os.path.join(rc.data.data_dir, t.data_name, rc.data.version)
    meta = lm_metadata.read_metadata(folder, "teacher.data_name")
    return TeacherData(folder, int(meta["vocab_size"]), int(meta["seq_len"]))
  tok = _load(t.tokenizer, "teacher.tokenizer")
  return TeacherData(t.tokenizer, tok.get_vocab_size(with_added_tokens=True),
                     int(t.seq_len or rc.data.seq_len))


def _load(path: str, key: str):
  from kd_jax.models import lm as lm_models  # pylint: disable=g-import-not-at-top
  try:
    return lm_models.load_tokenizer(path)
  except Exception as e:  # pylint: disable=broad-except  (tokenizers' errors)
    raise ConfigError(key, f"cannot read a tokenizer at {path!r} ({e})."
                      ) from None


def merge_rule(rc) -> str:
  merges = {dict(s.hparams).get("merge", "chain") for s in specs(rc)}
  return merges.pop() if len(merges) == 1 else "chain"


# ---------------------------------------------------------------------------
# Validation.


def _validate_terms(rc) -> None:
  merges = set()
  for s in specs(rc):
    hp, key = dict(s.hparams), f"loss.terms.{s.label}"
    merge = hp.pop("merge", "chain")
    if merge not in align.MERGES:
      raise ConfigError(f"{key}.merge", f"must be one of {align.MERGES}; got "
                        f"{merge!r}.")
    merges.add(merge)
    by = hp.pop("matched_by", "bytes")
    if by not in MATCHED_BY:
      raise ConfigError(f"{key}.matched_by", f"must be one of {MATCHED_BY}; "
                        f"got {by!r}.")
    ids = ((np.zeros(1, np.int32),) * 2 if s.name == "hybrid" else None)
    try:
      lm_cross_steps.CrossTerm(s.name, s.weight, s.label, matched_ids=ids,
                               **hp)
    except (TypeError, ValueError) as e:
      raise ConfigError(key, str(e)) from None
  if len(merges) > 1:
    raise ConfigError("loss.terms", f"the terms' merge rules differ "
                      f"({sorted(merges)}): one alignment per run.")


def _validate_options(rc) -> None:
  t, g, lo = rc.teacher, rc.section("generation"), rc.loss
  if t.data_name and t.tokenizer:
    raise ConfigError("teacher.tokenizer", "give teacher.data_name (a "
                      "prepared dataset) or teacher.tokenizer, not both.")
  if t.precompute:
    raise ConfigError("teacher.precompute", "a top-k cache holds the "
                      "student's vocabulary: not across tokenizers.")
  if lo.fused_head:
    raise ConfigError("loss.fused_head", "compares one vocabulary: not "
                      "across tokenizers.")
  if g.seq_kd:
    raise ConfigError("generation.seq_kd", "the teacher's samples are "
                      "teacher tokens: Seq-KD across tokenizers is not "
                      "supported (use lmbda: the student's samples).")
  if g.lmbda > 0 and jax.process_count() > 1:
    raise ConfigError("generation.lmbda", "on-policy re-tokenization runs "
                      "on one host: not across several processes.")
  v = t.seq_len
  if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v == 1:
    raise ConfigError("teacher.seq_len", f"must be 0 (automatic) or an int "
                      f">= 2; got {v!r}.")


def validate(rc) -> None:
  """The cross-tokenizer keys (`ConfigError` naming the key)."""
  cross = specs(rc)
  if not enabled(rc):
    if cross:
      raise ConfigError(f"loss.terms.{cross[0].label}", f"{cross[0].name!r} "
                        "distils across tokenizers: give the teacher's "
                        "tokenizer (teacher.data_name: its prepared dataset, "
                        "or teacher.tokenizer).")
    return
  other = [s for s in rc.loss.terms if s.kind != "cross_tokenizer"]
  if other:
    raise ConfigError(f"loss.terms.{other[0].label}", "compares the models "
                      "on one vocabulary; the teacher has its own tokenizer "
                      f"(teacher.data_name / tokenizer): use "
                      f"{tuple(lm_cross_steps.CROSS_TERMS)}.")
  if not cross:
    raise ConfigError("loss.terms", "a teacher with its own tokenizer needs "
                      f"a cross-tokenizer term: one of "
                      f"{tuple(lm_cross_steps.CROSS_TERMS)}.")
  _validate_options(rc)
  _validate_terms(rc)
  td = teacher_data(rc)
  student = _load(rc.data.folder, "data")
  teacher = _load(td.folder, "teacher.data_name" if rc.teacher.data_name
                  else "teacher.tokenizer")
  for tok, key in ((student, "data"), (teacher, "teacher.tokenizer")):
    try:
      align.tokenizer_kind(tok)
    except ValueError as e:
      raise ConfigError(key, str(e)) from None


# ---------------------------------------------------------------------------
# The run's alignment, terms and data.


@dataclasses.dataclass
class Setup:
  """A cross-tokenizer run's pieces (built once by the LM task)."""
  aligner: align.Aligner
  teacher_len: int
  cross: lm_cross_steps.CrossTokenizer
  teacher_bytes: np.ndarray
  prompt_len: Optional[int]
  info: Dict[str, Any]


def _prompt_len(rc) -> Optional[int]:
  g = rc.section("generation")
  return rc.data.seq_len - g.max_new_tokens if g.max_new_tokens else None


def _masks(n: int, length: int, prompt_len: Optional[int]):
  if prompt_len is None:
    return [None] * n
  return [np.arange(length) >= prompt_len] * n


def auto_teacher_len(aligner, rows, prompt_len: Optional[int]) -> int:
  """The `AUTO_QUANTILE` of the rows' teacher lengths, rounded up to 8."""
  counts = [len(aligner.align(r, m).teacher_ids) for r, m in
            zip(rows, _masks(len(rows), rows.shape[1], prompt_len))]
  need = float(np.quantile(counts, AUTO_QUANTILE)) if counts else 2.0
  return max(8, int(math.ceil(need / 8) * 8))


def _sample_rows(tokens, k: int) -> np.ndarray:
  idx = np.unique(np.linspace(0, len(tokens) - 1, min(k, len(tokens))
                              ).round().astype(int))
  return np.stack([np.asarray(tokens[int(i)]["tokens"], np.int32)
                   for i in idx])


def _terms(rc, s_tok, t_tok):
  out, info = [], {}
  for s in specs(rc):
    hp = dict(s.hparams)
    hp.pop("merge", None)
    by = hp.pop("matched_by", "bytes")
    ids = None
    if s.name == "hybrid":
      ids = align.vocab_mapping(s_tok, t_tok, by=by)
      info[f"{s.label}_matched_tokens"] = int(len(ids[0]))
    out.append(lm_cross_steps.CrossTerm(s.name, s.weight, s.label,
                                        matched_ids=ids, **hp))
  return tuple(out), info


def make_setup(rc, teacher_model) -> Setup:
  """The aligner, the teacher length, the engine's terms and (on-policy)
  the re-tokenizing callback."""
  td = teacher_data(rc)
  s_tok, t_tok = _load(rc.data.folder, "data"), _load(td.folder, "teacher")
  aligner = align.Aligner(s_tok, t_tok, merge=merge_rule(rc))
  limit = int(teacher_model.config.max_position_embeddings)
  prompt_len = _prompt_len(rc)
  if rc.teacher.seq_len:
    lt = rc.teacher.seq_len
    if lt > limit:
      raise ConfigError("teacher.seq_len", f"{lt} teacher tokens exceed the "
                        f"teacher's context (max_position_embeddings "
                        f"{limit}).")
    auto = None
  else:
    rows = _sample_rows(lm_data.source(rc, "train", rc.data.train_sequences),
                        AUTO_SAMPLE)
    auto = auto_teacher_len(aligner, rows, prompt_len)
    lt = min(auto, limit)
  terms, info = _terms(rc, s_tok, t_tok)
  g = rc.section("generation")
  retokenize = (align.make_retokenize_fn(aligner, teacher_len=lt)
                if g.lmbda > 0 else None)
  cross = lm_cross_steps.CrossTokenizer(terms, ce_weight=rc.loss.ce_weight,
                                        retokenize=retokenize)
  info.update(teacher_len=lt, teacher_len_auto=auto,
              teacher_vocab_size=td.vocab_size, merge=aligner.merge,
              teacher_tokenizer=aligner.teacher.kind)
  return Setup(aligner, lt, cross, byte_lengths(t_tok), prompt_len, info)


def train_source(rc, setup: Setup):
  """The training windows with the teacher's tokens and the alignment
  (only the tokens when every step trains on the student's samples)."""
  tokens = lm_data.source(rc, "train", rc.data.train_sequences)
  if rc.section("generation").lmbda == 1.0:
    return tokens
  return align.AlignedSource(tokens, setup.aligner,
                             teacher_len=setup.teacher_len,
                             prompt_len=setup.prompt_len)


def train_dataset(rc, setup: Setup):
  try:
    return text_lib.lm_dataset(train_source(rc, setup),
                               batch_size=rc.train.batch_size, seed=rc.seed)
  except ValueError as e:
    raise ConfigError("train.batch_size", str(e)) from None


def teacher_eval_batches(setup: Setup, batches, limit: int):
  """The student's held-out batches re-tokenized for the teacher
  (``{"tokens", "mask"}``): the teacher's bits per byte on the same text;
  the length covers every window (at most the teacher's context)."""
  if not batches:
    return []
  rows = np.concatenate([b["tokens"] for b in batches])
  masks = np.concatenate([b["mask"] for b in batches])
  need = max(len(setup.aligner.align(r, m).teacher_ids)
             for r, m in zip(rows, masks))
  lt = max(8, min(limit, int(math.ceil(need / 8) * 8)))
  out = []
  for b in batches:
    al = setup.aligner.align_batch(b["tokens"], b["mask"], teacher_len=lt)
    out.append({"tokens": al["teacher_tokens"], "mask": al["teacher_mask"]})
  return out


@functools.lru_cache(maxsize=16)
def folder_byte_lengths(folder: str) -> Optional[np.ndarray]:
  """`byte_lengths` of a dataset folder's tokenizer (cached; read-only)."""
  out = byte_lengths(folder)
  if out is not None:
    out.setflags(write=False)
  return out


def byte_lengths(tokenizer_or_path) -> Optional[np.ndarray]:
  """int32 ``[V]`` bytes per id (`kd_jax.data.align.token_byte_lengths`);
  None when the tokenizer's pieces do not spell bytes this module reads
  (no bits per byte then)."""
  tok = tokenizer_or_path
  if isinstance(tok, str):
    try:
      tok = _load(tok, "data")
    except ConfigError:
      return None
  try:
    return align.token_byte_lengths(tok)
  except ValueError:
    return None

