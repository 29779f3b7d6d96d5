r"""Aligning two tokenizations of one text (distillation across tokenizers).

A teacher and a student with different tokenizers read the same text as
different token sequences. This module (host side: NumPy and the
``tokenizers`` package, no JAX) puts both on one coordinate, the UTF-8 byte,
and groups the tokens whose visible text coincides; the losses of
`kd_jax.losses.cross_tokenizer` then compare one distribution per group.

1. **Byte spans** (`TokenBytes`, `TokenBytes.encode`): every vocabulary entry
   is mapped to the bytes it spells -- byte-level BPE pieces through GPT-2's
   byte <-> unicode table, metaspace (SentencePiece-style) pieces with
   ``\u2581`` read as a space and ``<0xNN>`` byte-fallback pieces as one
   byte -- and the token spans of a text are the cumulative sums of their
   lengths. The spans are *checked*: the tokens must spell the text exactly
   (up to metaspace's prepended space, which is removed from the first
   token), otherwise a ValueError names the tokenizer and the byte. Special
   tokens (``<|endoftext|>``) have no bytes; `Aligner` gives each one a
   virtual byte of its own so that the two sides' end-of-text tokens pair up.
2. **Groups** (`group_spans`): a cut is a byte position that is a token
   boundary on both sides; the tokens between two consecutive cuts form a
   group (one or more tokens per side). For contiguous spans this is
   exactly TRL GOLD's ``_align_by_byte_offsets`` walk (advance the side whose
   token ends first; close a group where both ends coincide). A group is
   *valid* when both sides cover exactly the same bytes (not the case around
   bytes one side could not tokenize: invalid UTF-8 in a sample, a character
   cut at a window edge).
3. **Index arrays** (`Aligner.align_batch`): fixed-shape int32 arrays that
   tell the compiled loss which logit row holds each group's distribution
   and which rows' token probabilities multiply into it (the merge rule,
   below). Rows follow kd_jax's convention: a model reads ``tokens[:, :-1]``
   and row ``r`` predicts token ``r + 1``; token 0 has no predicting row, so
   a group holding token 0 on either side is not scored.

**The merge rule.** A group of tokens ``y_i..y_j`` on one side is one
(unnormalized) distribution over that side's vocabulary. kd_jax's default,
``merge="chain"`` (TRL's ``uld_token_merge_strategy="bayesian"``), is the
chain rule: the full distribution predicting the *last* token, given the
actual earlier tokens of the group, times their probabilities,

.. math::
  m(v) = p(v \mid y_{<j}) \prod_{k=i}^{j-1} p(y_k \mid y_{<k}),

so ``m(y_j)`` is the probability of the whole group's text and ``m`` sums to
the probability of its observed prefix. ``merge="first"`` (TRL's default,
``"observed"``) takes the distribution predicting the *first* token times the
probabilities of the later ones, ``m(v) = p(v | y_{<i}) prod_{k=i+1}^{j}
p(y_k | y_{<k})``. One-token groups are the plain distribution in both. The
scalar probabilities are floored at ``min_prob`` (TRL: 1e-8) in the loss.

Prompt / completion masks carry over: a student token mask (which tokens
are trained targets) becomes a group mask; text runs of different mask
value are tokenized separately for the teacher (as GOLD tokenizes prompt and
completion separately), so no group straddles the boundary.

References: Boizard, Haddad, Hudelot & Colombo, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs", TMLR 2025
(arXiv:2402.12030), https://github.com/Nicolas-BZRD/llm-recipes; HuggingFace
TRL ``trl/experimental/gold`` (GOLD trainer: extended ULD, byte-offset
alignment, token merging, hybrid loss), https://github.com/huggingface/trl.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional, Sequence

import numpy as np

MERGES = ("chain", "first")
_FALLBACK_PREFIX, _FALLBACK_SUFFIX = "<0x", ">"


def _bytes_to_unicode() -> dict:
  """GPT-2's byte -> printable unicode table (byte-level BPE pieces)."""
  bs = (list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _component_types(spec) -> list:
  if spec is None:
    return []
  if spec.get("type") == "Sequence":
    inner = (spec.get("pretokenizers") or spec.get("decoders")
             or spec.get("normalizers") or [])
    return [t for s in inner for t in _component_types(s)]
  return [spec]


def _space_replacement(norm) -> Optional[str]:
  """The character a ``Replace(" " -> c)`` normalizer writes for spaces."""
  pattern = norm.get("pattern") or {}
  if norm.get("type") == "Replace" and pattern.get("String") == " ":
    return norm.get("content")
  return None


def tokenizer_kind(tokenizer) -> tuple:
  """``("byte_level", None)`` or ``("metaspace", replacement)``.

  Read from the tokenizer's JSON: a ByteLevel pre-tokenizer or decoder
  (GPT-2, Llama-3, Qwen), or metaspace pieces -- a Metaspace pre-tokenizer,
  or Llama-2's normalizer ``Prepend("▁") + Replace(" ", "▁")``.
  Normalizers that rewrite text (lower-casing, NFKC, accents, a
  SentencePiece charsmap) are rejected: the tokens would not spell the text.
  NFC is accepted (the spelling is checked per text anyway).
  """
  spec = json.loads(tokenizer.to_str())
  replacement = None
  for norm in _component_types(spec.get("normalizer")):
    rep = _space_replacement(norm)
    if rep is not None:
      replacement = rep
    elif norm.get("type") not in ("NFC", "Prepend"):
      raise ValueError(
          "cross-tokenizer alignment needs tokens that spell the text; the "
          f"tokenizer's normalizer {norm.get('type')} rewrites it")
  pre = _component_types(spec.get("pre_tokenizer"))
  dec = _component_types(spec.get("decoder"))
  for part in pre:
    if part.get("type") == "Metaspace":
      return "metaspace", part.get("replacement", "\u2581")
  if replacement is not None:
    return "metaspace", replacement
  if any(p.get("type") == "ByteLevel" for p in pre + dec):
    return "byte_level", None
  raise ValueError(
      "cross-tokenizer alignment supports byte-level BPE (ByteLevel) and "
      "metaspace (SentencePiece-style) tokenizers; got pre-tokenizer "
      f"{[p.get('type') for p in pre]} and decoder "
      f"{[d.get('type') for d in dec]}")


def _piece_bytes(piece: str, kind: str, replacement) -> bytes:
  if kind == "byte_level":
    try:
      return bytes(_UNICODE_TO_BYTE[c] for c in piece)
    except KeyError:  # an added non-special token written in plain text
      return piece.encode("utf-8")
  if (len(piece) == 6 and piece.startswith(_FALLBACK_PREFIX)
      and piece.endswith(_FALLBACK_SUFFIX)):
    try:
      return bytes([int(piece[3:5], 16)])
    except ValueError:
      pass
  return piece.replace(replacement, " ").encode("utf-8")


class TokenBytes:
  """The bytes every id of a ``tokenizers.Tokenizer`` spells.

  Attributes:
    kind: ``"byte_level"`` or ``"metaspace"`` (`tokenizer_kind`).
    pieces: the vocabulary string of each id.
    bytes: the UTF-8 bytes of each id; None for special tokens.
    lengths: int32 ``[vocab_size]`` byte lengths (0 for special tokens).
    fallback: bool ``[vocab_size]``, True for ``<0xNN>`` byte-fallback ids.
    specials: ``{content: id}`` of the special tokens.
  """

  def __init__(self, tokenizer):
    import tokenizers  # pylint: disable=g-import-not-at-top

    self.kind, self.replacement = tokenizer_kind(tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1
    self.specials = {t.content: i for i, t in
                     tokenizer.get_added_tokens_decoder().items() if t.special}
    special_ids = set(self.specials.values())
    self.pieces = [""] * size
    self.bytes = [None] * size
    self.fallback = np.zeros(size, bool)
    for piece, i in vocab.items():
      self.pieces[i] = piece
      if i in special_ids:
        continue
      self.bytes[i] = _piece_bytes(piece, self.kind, self.replacement)
      self.fallback[i] = (self.kind == "metaspace" and len(piece) == 6
                          and piece.startswith(_FALLBACK_PREFIX))
    self.lengths = np.asarray([len(b) if b is not None else 0
                               for b in self.bytes], np.int32)
    # A private copy that reads special-token strings in a text as text
    # (a sample may spell "<|endoftext|>"; only ids are special here).
    self._tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._tok.encode_special_tokens = True

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  def spell(self, ids: Sequence[int]) -> bytes:
    """The bytes of non-special `ids`, concatenated."""
    return b"".join(self.bytes[int(i)] for i in ids)

  def encode(self, text: str) -> tuple:
    """``(ids, lengths)`` of `text`: int32 ids and each token's byte length.

    The lengths sum to ``len(text.encode())`` (metaspace's prepended space is
    taken off the first token, which may then have length 0). Raises a
    ValueError when the tokens do not spell the text.
    """
    ids = np.asarray(self._tok.encode(text, add_special_tokens=False).ids,
                     np.int32)
    if any(self.bytes[i] is None for i in ids):
      raise ValueError(f"special token in the encoding of {text[:40]!r}")
    lengths = self.lengths[ids].copy()
    spelled, want = self.spell(ids), text.encode("utf-8")
    if (spelled != want and self.kind == "metaspace" and len(ids)
        and spelled == b" " + want and lengths[0] >= 1):
      lengths[0] -= 1  # the prepended word-boundary mark
    elif spelled != want:
      k = next((i for i, (a, b) in enumerate(zip(spelled, want)) if a != b),
               min(len(spelled), len(want)))
      raise ValueError(
          f"the {self.kind} tokens of {text[:40]!r} do not spell the text "
          f"(first difference at byte {k}): cannot align them")
    return ids, lengths


def token_byte_lengths(tokenizer) -> np.ndarray:
  """int32 ``[vocab_size]``: UTF-8 bytes each id spells (specials: 0).

  The denominator of bits per byte (`kd_jax.losses.bits_per_byte`): summed
  over the predicted tokens of a held-out split. For metaspace tokenizers
  the prepended space of a document's first word is counted (one byte per
  tokenized run, which the text does not have).
  """
  return TokenBytes(tokenizer).lengths


# ---------------------------------------------------------------------------
# Groups.
# ---------------------------------------------------------------------------


def group_spans(s_spans, t_spans) -> list:
  """Groups of tokens whose bytes coincide.

  Args:
    s_spans, t_spans: ``[n, 2]`` (start, end) byte spans of each side's
      tokens, non-overlapping and in order (holes allowed; zero-width tokens
      allowed).

  Returns:
    A list of ``(student_tokens, teacher_tokens, valid)``: token index lists
    of each group in byte order, and whether both sides are non-empty and
    cover exactly the same bytes. Every token is in exactly one group.
  """
  s_spans = np.asarray(s_spans, np.int64).reshape(-1, 2)
  t_spans = np.asarray(t_spans, np.int64).reshape(-1, 2)
  cuts = np.intersect1d(np.unique(s_spans), np.unique(t_spans))
  if not len(cuts):
    return ([] if not len(s_spans) and not len(t_spans) else
            [(list(range(len(s_spans))), list(range(len(t_spans))), False)])
  # A token belongs to the gap between cuts that holds its start (a
  # zero-width token at a cut goes with the tokens that follow it).
  s_gap = np.searchsorted(cuts, s_spans[:, 0], side="right")
  t_gap = np.searchsorted(cuts, t_spans[:, 0], side="right")
  gaps = np.union1d(s_gap, t_gap)  # starts are in order: so are the gaps
  s_lo, s_hi = (np.searchsorted(s_gap, gaps, side=x) for x in ("left",
                                                                "right"))
  t_lo, t_hi = (np.searchsorted(t_gap, gaps, side=x) for x in ("left",
                                                                "right"))
  s_len = s_spans[:, 1] - s_spans[:, 0]
  t_len = t_spans[:, 1] - t_spans[:, 0]
  groups = []
  for a, b, c, d in zip(s_lo.tolist(), s_hi.tolist(), t_lo.tolist(),
                        t_hi.tolist()):
    valid = a < b and c < d
    if valid:
      start, end = s_spans[a, 0], s_spans[b - 1, 1]
      valid = bool(end > start and t_spans[c, 0] == start
                   and t_spans[d - 1, 1] == end
                   and s_len[a:b].sum() == end - start
                   and t_len[c:d].sum() == end - start)
    groups.append((list(range(a, b)), list(range(c, d)), valid))
  return groups


@dataclasses.dataclass
class SequenceAlignment:
  """One student sequence and its teacher tokenization, grouped.

  Attributes:
    teacher_ids: int32 ``[n_t]`` the teacher's tokens of the same text.
    student_spans, teacher_spans: ``[n, 2]`` spans on the shared coordinate
      (text bytes; each special token takes one virtual byte).
    teacher_mask: bool ``[n_t]`` (the student mask carried over).
    groups: ``[(student_tokens, teacher_tokens, trained)]``, ``trained`` =
      valid, all student tokens masked in and no token 0 on either side.
  """
  teacher_ids: np.ndarray
  student_spans: np.ndarray
  teacher_spans: np.ndarray
  teacher_mask: np.ndarray
  groups: list


def _utf8_pieces(data: bytes):
  """``[(offset, text)]`` of the valid UTF-8 stretches of `data`."""
  out, pos = [], 0
  while pos < len(data):
    try:
      out.append((pos, data[pos:].decode("utf-8")))
      break
    except UnicodeDecodeError as e:
      if e.start:
        out.append((pos, data[pos:pos + e.start].decode("utf-8")))
      pos += max(e.end, e.start + 1)
  return out


class Aligner:
  """Re-tokenizes student token sequences for a teacher and aligns them.

  Both tokenizers must be byte-level BPE or metaspace (`tokenizer_kind`).
  Special tokens pair by their string (``<|endoftext|>`` with
  ``<|endoftext|>``); a student special token the teacher lacks leaves a
  hole (its group is not scored). A metaspace student's leading space at the
  start of the sequence or after a special token is read as the mark it
  prepends to a document (not text); inside a packed window that space may
  have been real, which only changes the teacher's context before the first
  scored group.

  Args:
    student_tokenizer, teacher_tokenizer: ``tokenizers.Tokenizer`` objects.
    merge: ``"chain"`` (default) or ``"first"``: the merge rule (module
      docstring).
  """

  def __init__(self, student_tokenizer, teacher_tokenizer, *,
               merge: str = "chain"):
    if merge not in MERGES:
      raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    self.merge = merge
    self.student = TokenBytes(student_tokenizer)
    self.teacher = TokenBytes(teacher_tokenizer)
    self.special_map = {i: self.teacher.specials[c] for c, i in
                        self.student.specials.items()
                        if c in self.teacher.specials}
    self.teacher_pad_id = self.teacher.specials.get(
        "<|pad|>", min(self.teacher.specials.values(), default=0))

  def _runs(self, ids, mask):
    """Maximal runs of non-special tokens of one mask value, and specials."""
    runs, start = [], 0
    for k in range(1, len(ids) + 1):
      cut = (k == len(ids) or self.student.bytes[ids[k]] is None
             or self.student.bytes[ids[k - 1]] is None
             or mask[k] != mask[k - 1])
      if cut:
        runs.append((start, k))
        start = k
    return runs

  def align(self, student_ids, mask=None) -> SequenceAlignment:
    """Teacher tokens and groups of one student sequence.

    Args:
      student_ids: int ``[n]`` student tokens (text, special tokens, pads).
      mask: optional bool ``[n]``: which student tokens are trained targets
        (e.g. the completion); default all.
    """
    ids = np.asarray(student_ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.student.vocab_size):
      raise ValueError(f"student token ids must be in [0, "
                       f"{self.student.vocab_size}); got {ids.min()}.."
                       f"{ids.max()}")
    mask = (np.ones(len(ids), bool) if mask is None
            else np.asarray(mask, bool).reshape(-1))
    if len(mask) != len(ids):
      raise ValueError(f"mask has {len(mask)} entries for {len(ids)} tokens")
    s_spans = np.zeros((len(ids), 2), np.int64)
    t_ids, t_spans, t_mask, pos = [], [], [], 0
    for a, b in self._runs(ids, mask):
      if self.student.bytes[ids[a]] is None:  # one special token
        s_spans[a] = (pos, pos + 1)
        if int(ids[a]) in self.special_map:
          t_ids.append(self.special_map[int(ids[a])])
          t_spans.append((pos, pos + 1))
          t_mask.append(mask[a])
        pos += 1
        continue
      lengths = self.student.lengths[ids[a:b]].copy()
      data = self.student.spell(ids[a:b])
      if (self.student.kind == "metaspace" and data[:1] == b" "
          and (a == 0 or self.student.bytes[ids[a - 1]] is None)):
        # The space metaspace prepends to a document's first word (a
        # sequence start is taken as one): not text.
        lengths[0] -= 1
        data = data[1:]
      ends = pos + np.cumsum(lengths)
      s_spans[a:b, 0], s_spans[a:b, 1] = ends - lengths, ends
      for offset, text in _utf8_pieces(data):
        tid, tlen = self.teacher.encode(text)
        tend = pos + offset + np.cumsum(tlen)
        t_ids.extend(tid.tolist())
        t_spans.extend(zip((tend - tlen).tolist(), tend.tolist()))
        t_mask.extend([mask[a]] * len(tid))
      pos = int(ends[-1])
    t_spans = np.asarray(t_spans, np.int64).reshape(-1, 2)
    groups = []
    for s_tok, t_tok, valid in group_spans(s_spans, t_spans):
      trained = (valid and all(mask[k] for k in s_tok) and s_tok[0] > 0
                 and t_tok[0] > 0)
      groups.append((s_tok, t_tok, trained))
    return SequenceAlignment(np.asarray(t_ids, np.int32), s_spans, t_spans,
                             np.asarray(t_mask, bool), groups)

  def align_batch(self, student_tokens, mask=None, *, teacher_len: int,
                  num_groups: Optional[int] = None,
                  pad_after_mask: bool = False) -> dict:
    """Fixed-shape arrays for `kd_jax.losses.cross_tokenizer` (one batch).

    Args:
      student_tokens: int ``[B, L]``.
      mask: optional bool ``[B, L]`` of trained student tokens.
      teacher_len: ``Lt``, the teacher sequence length: teacher tokens are
        padded (teacher pad id) or cut to it; groups with a cut token are
        not scored.
      num_groups: ``G``, groups kept per sequence (default ``L - 1``, the
        most there can be: every scored group holds a student target).
      pad_after_mask: read the student tokens after a row's last trained
        token as the student's pad token (what a sampler emits after EOS is
        not text the teacher should spend tokens on).

    Returns:
      NumPy arrays: ``teacher_tokens`` int32 ``[B, Lt]``; ``teacher_mask``
      bool ``[B, Lt]``; ``student_base`` / ``teacher_base`` int32 ``[B, G]``
      (the logit row holding each group's distribution); ``student_group``
      int32 ``[B, L-1]`` / ``teacher_group`` ``[B, Lt-1]`` (for each logit
      row, the group its target token's probability multiplies into, or
      ``G``: none); ``group_mask`` bool ``[B, G]``; ``truncated`` int32
      ``[B]`` (teacher tokens cut) and ``dropped`` int32 ``[B]`` (scored
      groups beyond ``G``).
    """
    student_tokens = np.asarray(student_tokens)
    if student_tokens.ndim != 2 or student_tokens.shape[1] < 2:
      raise ValueError(f"student_tokens must be [B, L] with L >= 2; got "
                       f"shape {student_tokens.shape}")
    if teacher_len < 2:
      raise ValueError(f"teacher_len must be >= 2, got {teacher_len}")
    b, length = student_tokens.shape
    g_max = length - 1 if num_groups is None else int(num_groups)
    mask = (np.ones((b, length), bool) if mask is None
            else np.asarray(mask, bool))
    if mask.shape != (b, length):
      raise ValueError(f"mask must have shape {(b, length)}; got "
                       f"{mask.shape}")
    pad = self.student.specials.get("<|pad|>")
    if pad_after_mask and pad is not None:
      last = np.where(mask.any(1), length - 1 - np.argmax(mask[:, ::-1], 1),
                      length - 1)
      after = np.arange(length)[None, :] > last[:, None]
      student_tokens = np.where(after, pad, student_tokens)
    out = {
        "teacher_tokens": np.full((b, teacher_len), self.teacher_pad_id,
                                  np.int32),
        "teacher_mask": np.zeros((b, teacher_len), bool),
        "student_base": np.zeros((b, g_max), np.int32),
        "teacher_base": np.zeros((b, g_max), np.int32),
        "student_group": np.full((b, length - 1), g_max, np.int32),
        "teacher_group": np.full((b, teacher_len - 1), g_max, np.int32),
        "group_mask": np.zeros((b, g_max), bool),
        "truncated": np.zeros((b,), np.int32),
        "dropped": np.zeros((b,), np.int32),
    }
    for i in range(b):
      al = self.align(student_tokens[i], mask[i])
      n_t = min(len(al.teacher_ids), teacher_len)
      out["teacher_tokens"][i, :n_t] = al.teacher_ids[:n_t]
      out["teacher_mask"][i, :n_t] = al.teacher_mask[:n_t]
      out["truncated"][i] = len(al.teacher_ids) - n_t
      self._fill_groups(out, i, al.groups, teacher_len, g_max)
    return out

  def _fill_groups(self, out, i, groups, teacher_len, g_max):
    g = 0
    for s_tok, t_tok, trained in groups:
      if not trained or t_tok[-1] >= teacher_len:
        continue
      if g == g_max:
        out["dropped"][i] += 1
        continue
      for side, tok in (("student", s_tok), ("teacher", t_tok)):
        base = tok[-1] if self.merge == "chain" else tok[0]
        out[f"{side}_base"][i, g] = base - 1
        for k in tok:
          if k != base:
            out[f"{side}_group"][i, k - 1] = g
      out["group_mask"][i, g] = True
      g += 1


# ---------------------------------------------------------------------------
# Vocabularies (the hybrid loss) and lengths.
# ---------------------------------------------------------------------------


def vocab_mapping(student_tokenizer, teacher_tokenizer, *,
                  by: str = "piece") -> tuple:
  """``(student_ids, teacher_ids)``: int32 ``[M]`` tokens both vocabularies
  hold, sorted by teacher id (the matched set of GOLD's hybrid loss).

  ``by="piece"`` matches vocabulary strings exactly, as TRL GOLD does
  (``"\u0120the"`` of a byte-level tokenizer does not match ``"\u2581the"``
  of a metaspace one). ``by="bytes"`` matches the bytes the tokens spell
  (special tokens by string), so a byte-level and a metaspace vocabulary
  share their words; where several ids of one side spell the same bytes (a
  metaspace byte-fallback ``<0x41>`` and ``A``) the id that is not a
  fallback, else the lowest, is kept.
  """
  if by not in ("piece", "bytes"):
    raise ValueError(f"by must be 'piece' or 'bytes', got {by!r}")
  if by == "piece":
    s_vocab = student_tokenizer.get_vocab(with_added_tokens=True)
    t_vocab = teacher_tokenizer.get_vocab(with_added_tokens=True)
    pairs = sorted((t, s_vocab[p]) for p, t in t_vocab.items()
                   if p in s_vocab)
  else:
    keys = []
    for tb in (TokenBytes(student_tokenizer), TokenBytes(teacher_tokenizer)):
      table = {}
      order = sorted(range(tb.vocab_size),
                     key=lambda i, tb=tb: (bool(tb.fallback[i]), i))
      for i in order:
        key = (("special", tb.pieces[i]) if tb.bytes[i] is None
               else ("bytes", tb.bytes[i]))
        table.setdefault(key, i)
      keys.append(table)
    pairs = sorted((t, keys[0][k]) for k, t in keys[1].items()
                   if k in keys[0])
  t_ids = np.asarray([p[0] for p in pairs], np.int32)
  s_ids = np.asarray([p[1] for p in pairs], np.int32)
  return s_ids, t_ids


def teacher_length_for(aligner: Aligner, student_tokens, *,
                       quantile: float = 1.0, multiple: int = 8) -> int:
  """A teacher length covering `quantile` of these student sequences'
  re-tokenizations, rounded up to `multiple` (choose ``teacher_len``)."""
  counts = [len(aligner.align(row).teacher_ids)
            for row in np.asarray(student_tokens)]
  need = float(np.quantile(counts, quantile)) if counts else 2.0
  return max(2, int(math.ceil(need / multiple) * multiple))


# ---------------------------------------------------------------------------
# On-policy: the student's samples, re-tokenized for the teacher (host).
# ---------------------------------------------------------------------------


def completion_mask(tokens, prompt_len: int, eos_id: Optional[int]):
  """bool ``[B, L]``: positions >= `prompt_len` up to and including the
  first `eos_id` there (NumPy twin of ``kd_jax.train.lm_steps.
  completion_mask``)."""
  tokens = np.asarray(tokens)
  gen = np.arange(tokens.shape[1])[None, :] >= prompt_len
  if eos_id is None:
    return np.broadcast_to(gen, tokens.shape).copy()
  eos = gen & (tokens == eos_id)
  return gen & (np.cumsum(eos, axis=1) - eos == 0)


def align_samples(aligner: Aligner, tokens, *, prompt_len: int,
                  eos_id: Optional[int], teacher_len: int,
                  num_groups: Optional[int] = None) -> dict:
  """Teacher tokens and alignment of sampled sequences (on-policy, host).

  `tokens` ``[B, L]`` are prompts (``tokens[:, :prompt_len]``) followed by
  the student's samples. The completion (up to and including the first
  `eos_id`, `completion_mask`) is the trained part; what follows it is read
  as the student's pad token, so it costs no teacher tokens. The prompt and
  the completion are re-tokenized separately (their boundary is a group
  boundary), as TRL GOLD does.

  Returns:
    `Aligner.align_batch`'s arrays plus ``student_mask`` (bool ``[B, L]``,
    the completion mask).
  """
  tokens = np.asarray(tokens)
  if not 1 <= prompt_len < tokens.shape[1]:
    raise ValueError(f"prompt_len must be in [1, {tokens.shape[1]}), got "
                     f"{prompt_len}")
  mask = completion_mask(tokens, prompt_len, eos_id)
  out = aligner.align_batch(tokens, mask, teacher_len=teacher_len,
                            num_groups=num_groups, pad_after_mask=True)
  out["student_mask"] = mask
  return out


ALIGNMENT_KEYS = ("teacher_tokens", "teacher_mask", "student_base",
                  "student_group", "teacher_base", "teacher_group",
                  "group_mask", "truncated", "dropped")


def alignment_shapes(batch: int, length: int, teacher_len: int,
                     num_groups: Optional[int] = None) -> dict:
  """``{key: (shape, dtype)}`` of `Aligner.align_batch`'s arrays."""
  g = length - 1 if num_groups is None else int(num_groups)
  i32, b = np.int32, np.bool_
  return {"teacher_tokens": ((batch, teacher_len), i32),
          "teacher_mask": ((batch, teacher_len), b),
          "student_base": ((batch, g), i32),
          "student_group": ((batch, length - 1), i32),
          "teacher_base": ((batch, g), i32),
          "teacher_group": ((batch, teacher_len - 1), i32),
          "group_mask": ((batch, g), b),
          "truncated": ((batch,), i32), "dropped": ((batch,), i32)}


def make_retokenize_fn(aligner: Aligner, *, teacher_len: int,
                       num_groups: Optional[int] = None):
  """``fn(tokens int [B, L], mask bool [B, L]) -> {key: array}`` (traceable).

  `Aligner.align_batch` (``pad_after_mask=True``) run on the host through
  ``jax.pure_callback``, so a compiled on-policy step (generation ->
  re-tokenization -> teacher forward -> loss -> update) stays one program,
  also inside ``lax.scan`` and ``lax.cond`` (the callback runs only when
  its branch is taken). `mask` is the step's trained-token mask (the
  completion mask of samples, or the data's). Per call: one device -> host
  copy of the ``[B, L]`` ids and mask, the host work (tokenizers, Python),
  one host -> device copy of the arrays of `alignment_shapes`. Under a
  sharded ``jit`` the callback receives the whole batch; call it inside
  ``shard_map`` for per-shard (multi-host) work.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def host(tokens, mask):
    out = aligner.align_batch(np.asarray(tokens), np.asarray(mask),
                              teacher_len=teacher_len, num_groups=num_groups,
                              pad_after_mask=True)
    return {k: out[k] for k in ALIGNMENT_KEYS}

  def fn(tokens, mask):
    b, length = tokens.shape
    spec = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in
            alignment_shapes(b, length, teacher_len, num_groups).items()}
    return jax.pure_callback(host, spec, tokens, mask,
                             vmap_method="sequential")

  return fn


class AlignedSource:
  """Random-access source adding a teacher's tokens + alignment to each
  sequence of a student token source (offline cross-tokenizer distillation).

  Items are ``{"tokens": [L], "teacher_tokens": [Lt], "student_base": [G],
  ...}`` (`ALIGNMENT_KEYS`, no batch axis): `kd_jax.data.text.lm_dataset`
  batches them as it batches tokens. The alignment is computed when an item
  is read (about 0.5 ms per 64-token sequence on one CPU core; grain's
  worker processes parallelize it).

  Args:
    source: items ``{"tokens": [L]}`` (a TFDS token split) or ``[L]`` arrays.
    aligner: the `Aligner` (student tokenizer = the source's).
    teacher_len: ``Lt``.
    num_groups: ``G`` (default ``L - 1``).
    prompt_len: optional: only tokens at positions ``>= prompt_len`` are
      trained (prompt and completion are re-tokenized separately).
  """

  def __init__(self, source, aligner: Aligner, *, teacher_len: int,
               num_groups: Optional[int] = None,
               prompt_len: Optional[int] = None):
    self._source, self._aligner = source, aligner
    self._teacher_len, self._num_groups = teacher_len, num_groups
    self._prompt_len = prompt_len

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    item = self._source[i]
    item = dict(item) if isinstance(item, dict) else {"tokens": item}
    tokens = np.asarray(item["tokens"], np.int32)
    mask = None
    if self._prompt_len is not None:
      mask = np.arange(len(tokens))[None, :] >= self._prompt_len
    out = self._aligner.align_batch(tokens[None], mask,
                                    teacher_len=self._teacher_len,
                                    num_groups=self._num_groups)
    item["tokens"] = tokens
    item.update({k: out[k][0] for k in ALIGNMENT_KEYS})
    return item
