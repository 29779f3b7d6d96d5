"""kd_jax's cross-tokenizer losses and alignment against TRL's GOLD trainer.

TRL (``trl.experimental.gold.gold_trainer``, PyTorch, the ``test`` extra)
runs offline on the same token sequences and logits: its ``ULDLoss``
(positional ULD, extended ULD with both merge strategies, the hybrid loss,
the CE weight) against `kd_jax.losses.cross_tokenizer`, and its byte-offset
encoding and alignment walk against `kd_jax.data.align`. The sequences are
real: prompt + completion text of the held-out excerpt tokenized by BPE
tokenizers trained on the corpus excerpt (tests/cross_tokenizer_testing.py).

Tolerance: float32 on both sides, ``rtol=2e-5, atol=2e-6`` on values of
size 0.1-2 (sums of up to 4,096 sorted probabilities, accumulated in a
different order by XLA and PyTorch).

How kd_jax inputs map to TRL's: TRL's logits are per input position
(``[B, L, V]``, labels unshifted with -100 outside the completion); kd_jax's
row ``r`` predicts token ``r + 1`` (the logits of ``tokens[:, :-1]``). TRL's
``"bayesian"`` strategy slices ``logits[start - 1:]`` so its rows are kd_jax's
rows (``merge="chain"``, rows ``logits[:, :-1]``). TRL's ``"observed"``
slices ``logits[start:]`` and multiplies ``probs[k, token_ids[k]]`` -- the
distribution at position ``k`` (which predicts token ``k + 1``) read at
token ``k``: kd_jax's ``merge="first"`` reproduces it when given
``logits[:, 1:]`` (shifted by one). kd_jax's trainer uses the causal rows.
"""

import os
import types

import numpy as np
import pytest

pytest.importorskip(
    "trl", reason="TRL is the reference of these tests (pip install "
    "'.[test]'; it needs Python >= 3.11)")

# Installed TRL must import: a broken or changed TRL fails, not skips.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # (its API warning)
# pylint: disable=g-import-not-at-top,wrong-import-position
import torch
from trl.experimental import utils as trl_utils
from trl.experimental.gold import gold_trainer as gold
import jax.numpy as jnp

from kd_jax.data import align
from kd_jax.losses import cross_tokenizer as xt
from tests import cross_tokenizer_testing as ctt
# pylint: enable=g-import-not-at-top,wrong-import-position

RTOL, ATOL = 2e-5, 2e-6
EOS, PAD = 1, 0


def _config(**kw):
  base = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
              uld_student_temperature=1.0, uld_teacher_temperature=1.0,
              uld_skip_student_eos=False, uld_skip_teacher_eos=False,
              use_extended_uld=True, uld_token_merge_strategy="bayesian",
              uld_use_hybrid_loss=False, uld_hybrid_matched_weight=None,
              uld_hybrid_unmatched_weight=None, beta=0.5)
  base.update(kw)
  return types.SimpleNamespace(**base)


def _batch(student, teacher, *, merge="chain", completion_eos=True):
  """Prompt + completion pairs of the held-out text, both tokenizations.

  The student sequence is ``prompt ids + completion ids (+ EOS) + pads``;
  the completion (and its EOS) is the trained part.
  """
  s_tok, t_tok = ctt.tokenizer(student), ctt.tokenizer(teacher)
  paras = ctt.heldout_paragraphs(3, 200)
  rows, masks = [], []
  for i, p in enumerate(paras):
    cut = p.index(" ", 40 + 25 * i)
    prompt = s_tok.encode(p[:cut], add_special_tokens=False).ids
    comp = s_tok.encode(p[cut:], add_special_tokens=False).ids
    comp = comp + ([EOS] if completion_eos else [])
    rows.append(prompt + comp)
    masks.append([False] * len(prompt) + [True] * len(comp))
  length = max(map(len, rows)) + 2
  tokens = np.full((len(rows), length), PAD, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, (r, m) in enumerate(zip(rows, masks)):
    tokens[i, :len(r)], mask[i, :len(m)] = r, m
  aligner = align.Aligner(s_tok, t_tok, merge=merge)
  t_len = align.teacher_length_for(aligner, tokens) + 3
  out = aligner.align_batch(tokens, mask, teacher_len=t_len)
  assert not out["truncated"].any() and not out["dropped"].any()
  spans = [aligner.align(tokens[i], mask[i]) for i in range(len(rows))]
  return aligner, tokens, mask, out, spans


def _logits(shape, seed, scale=3.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)
          ).astype(np.float32)


def _trl_inputs(tokens, mask, out, spans):
  """TRL's labels / byte offsets for the same sequences (kd_jax spans)."""
  t_tokens, t_mask = out["teacher_tokens"], out["teacher_mask"]
  s_off = np.zeros(tokens.shape + (2,), np.int64)
  t_off = np.zeros(t_tokens.shape + (2,), np.int64)
  for i, al in enumerate(spans):
    s_off[i, :len(al.student_spans)] = al.student_spans
    t_off[i, :len(al.teacher_spans)] = al.teacher_spans
  return dict(
      student_labels=torch.tensor(np.where(mask, tokens, -100)),
      teacher_labels=torch.tensor(np.where(t_mask, t_tokens, -100)),
      student_input_ids=torch.tensor(tokens, dtype=torch.long),
      teacher_input_ids=torch.tensor(t_tokens, dtype=torch.long),
      student_byte_offsets=torch.tensor(s_off),
      teacher_byte_offsets=torch.tensor(t_off))


def _ours(s_logits, t_logits, tokens, mask, out, *, shift, **kw):
  rows = slice(1, None) if shift else slice(None, -1)
  al = xt.TokenAlignment.from_batch(out)
  d = xt.extended_uld_loss(s_logits[:, rows], t_logits[:, rows], tokens[:, 1:],
                           out["teacher_tokens"][:, 1:], al, **kw)
  return d, al.group_mask


@pytest.mark.parametrize("pair", [("bpe2k", "meta4k"), ("meta4k", "bytes"),
                                  ("bytes", "bpe2k")])
@pytest.mark.parametrize("strategy", ["bayesian", "observed"])
def test_extended_uld_matches_trl(pair, strategy):
  merge = "chain" if strategy == "bayesian" else "first"
  aligner, tokens, mask, out, spans = _batch(*pair, merge=merge)
  vs, vt = aligner.student.vocab_size, aligner.teacher.vocab_size
  s_logits = _logits(tokens.shape + (vs,), 0)
  t_logits = _logits(out["teacher_tokens"].shape + (vt,), 1)
  temps = dict(uld_student_temperature=1.5, uld_teacher_temperature=0.8)
  trl = gold.ULDLoss(_config(uld_token_merge_strategy=strategy, **temps))
  ref = trl(torch.tensor(s_logits), torch.tensor(t_logits),
            **_trl_inputs(tokens, mask, out, spans)).item()
  d, where = _ours(s_logits, t_logits, tokens, mask, out,
                   shift=strategy == "observed", student_temperature=1.5,
                   teacher_temperature=0.8)
  ours = float(jnp.mean(xt.sequence_mean(d, where)))
  np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)
  # Multi-token groups occur (the merge is exercised): on the side with the
  # finer tokenizer, and on both sides for the BPE / metaspace pair.
  g = out["group_mask"].shape[1]
  multi = [(out[k] < g).any() for k in ("student_group", "teacher_group")]
  assert multi == {("bpe2k", "meta4k"): [True, True],
                   ("meta4k", "bytes"): [False, True],
                   ("bytes", "bpe2k"): [True, False]}[pair]


@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.4)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hybrid_matches_trl(weights, beta):
  pair = ("bpe2k", "bytes")  # 258 byte ids matched, both sides keep others
  aligner, tokens, mask, out, spans = _batch(*pair)
  s_tok, t_tok = ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1])
  s_ids, t_ids = align.vocab_mapping(s_tok, t_tok)
  vs, vt = aligner.student.vocab_size, aligner.teacher.vocab_size + 6
  assert 0 < len(s_ids) < vs and len(t_ids) < vt  # (padded teacher head)
  s_logits = _logits(tokens.shape + (vs,), 2)
  t_logits = _logits(out["teacher_tokens"].shape + (vt,), 3)
  cfg = _config(uld_use_hybrid_loss=True, beta=beta,
                uld_hybrid_matched_weight=weights[0],
                uld_hybrid_unmatched_weight=weights[1])
  trl = gold.ULDLoss(cfg, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
  ref = trl(torch.tensor(s_logits), torch.tensor(t_logits),
            **_trl_inputs(tokens, mask, out, spans)).item()
  d, where = _ours(s_logits, t_logits, tokens, mask, out, shift=False,
                   matched_ids=(s_ids, t_ids), beta=beta,
                   matched_weight=weights[0], unmatched_weight=weights[1])
  ours = float(jnp.mean(xt.sequence_mean(d, where)))
  np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL)


def test_hybrid_differs_from_trl_only_when_a_side_has_no_unmatched_token():
  """A byte-level student (every id also in a byte-level teacher): TRL skips
  the unmatched ULD term; kd_jax adds the teacher's unmatched mass there (a
  constant of the teacher: the student's gradient is the same)."""
  pair = ("bytes", "bpe2k")
  aligner, tokens, mask, out, spans = _batch(*pair)
  s_tok, t_tok = ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1])
  s_ids, t_ids = align.vocab_mapping(s_tok, t_tok)
  vs, vt = aligner.student.vocab_size, aligner.teacher.vocab_size
  assert len(s_ids) == vs < vt
  s_logits, t_logits = _logits(tokens.shape + (vs,), 4), _logits(
      out["teacher_tokens"].shape + (vt,), 5)
  cfg = _config(uld_use_hybrid_loss=True, uld_hybrid_matched_weight=1.0,
                uld_hybrid_unmatched_weight=0.5)
  trl = gold.ULDLoss(cfg, student_tokenizer=s_tok, teacher_tokenizer=t_tok)
  ref = trl(torch.tensor(s_logits), torch.tensor(t_logits),
            **_trl_inputs(tokens, mask, out, spans)).item()
  kw = dict(matched_ids=(s_ids, t_ids), matched_weight=1.0,
            unmatched_weight=0.5)
  d, where = _ours(s_logits, t_logits, tokens, mask, out, shift=False, **kw)
  _, tl = xt.aligned_log_probs(s_logits[:, :-1], t_logits[:, :-1],
                               tokens[:, 1:], out["teacher_tokens"][:, 1:],
                               xt.TokenAlignment.from_batch(out))
  t_rest = np.exp(np.asarray(tl, np.float64))
  t_rest[..., t_ids] = 0.0
  extra = 0.5 * np.where(where, t_rest.sum(-1), 0.0)
  ours = float(jnp.mean(xt.sequence_mean(d, where)))
  trl_plus = ref + float(np.mean(xt.sequence_mean(jnp.asarray(extra), where)))
  np.testing.assert_allclose(ours, trl_plus, rtol=RTOL, atol=ATOL)
  assert ours > ref + 1e-3


@pytest.mark.parametrize("strategy", ["bayesian", "observed"])
def test_positional_uld_and_ce_weight_match_trl(strategy):
  """``use_extended_uld=False`` (the paper's ULD, positions paired by index)
  with TRL's CE term: `uld_loss` + `uld_objective`."""
  rng = np.random.default_rng(6)
  b, ls, lt, vs, vt = 3, 12, 15, 37, 53
  s_logits, t_logits = _logits((b, ls, vs), 7), _logits((b, lt, vt), 8)
  s_ids = rng.integers(2, vs, (b, ls))
  t_ids = rng.integers(2, vt, (b, lt))
  s_start, s_size = [3, 5, 2], [6, 4, 9]
  t_start, t_size = [4, 2, 5], [8, 3, 7]
  s_lab = np.full((b, ls), -100)
  t_lab = np.full((b, lt), -100)
  for i in range(b):
    s_lab[i, s_start[i]:s_start[i] + s_size[i]] = s_ids[i, s_start[i]:
                                                         s_start[i] + s_size[i]]
    t_lab[i, t_start[i]:t_start[i] + t_size[i]] = t_ids[i, t_start[i]:
                                                         t_start[i] + t_size[i]]
  cfg = _config(use_extended_uld=False, uld_token_merge_strategy=strategy,
                uld_crossentropy_weight=0.3, uld_distillation_weight=2.0,
                uld_student_temperature=2.0, uld_teacher_temperature=0.7)
  ref = gold.ULDLoss(cfg)(
      torch.tensor(s_logits), torch.tensor(t_logits),
      torch.tensor(s_lab), torch.tensor(t_lab), torch.tensor(s_ids),
      torch.tensor(t_ids)).item()
  # kd_jax: gather the paired rows (index k of both answers), pad to G.
  shift = 1 if strategy == "bayesian" else 0
  g = max(min(a, c) for a, c in zip(s_size, t_size))
  s_rows = np.zeros((b, g), np.int32)
  t_rows = np.zeros((b, g), np.int32)
  where = np.zeros((b, g), bool)
  for i in range(b):
    n = min(s_size[i], t_size[i])
    s_rows[i, :n] = np.arange(n) + s_start[i] - shift
    t_rows[i, :n] = np.arange(n) + t_start[i] - shift
    where[i, :n] = True
  take = lambda x, r: np.take_along_axis(x, r[..., None], axis=1)
  d = xt.uld_loss(take(s_logits, s_rows), take(t_logits, t_rows),
                  student_temperature=2.0, teacher_temperature=0.7,
                  where=jnp.asarray(where))
  ce_logp = np.asarray(jnp.asarray(s_logits[:, :-1]) - jnp.asarray(
      np.log(np.exp(s_logits[:, :-1].astype(np.float64)).sum(-1,
                                                              keepdims=True))))
  tgt = np.maximum(s_lab[:, 1:], 0)
  ce = -np.take_along_axis(ce_logp, tgt[..., None], axis=-1)[..., 0]
  ours = xt.uld_objective(ce, s_lab[:, 1:] != -100, d, where,
                          crossentropy_weight=0.3, distillation_weight=2.0)
  np.testing.assert_allclose(float(ours), ref, rtol=RTOL, atol=ATOL)


# --- alignment: TRL's byte offsets and group walk -------------------------


@pytest.mark.parametrize("name", ["bpe2k", "bytes"])
def test_byte_spans_match_trl_encode_with_byte_offsets(name):
  """TRL derives byte offsets from the tokenizer's character offsets (byte-
  level tokenizers only); kd_jax from the bytes the tokens spell."""
  tok = ctt.tokenizer(name)
  tb = align.TokenBytes(tok)
  texts = ctt.heldout_paragraphs(4) + [ctt.UNICODE_TEXT]
  for text, (ids, offs) in zip(texts, trl_utils.encode_with_byte_offsets(
      tok, texts)):
    our_ids, lengths = tb.encode(text)
    ends = np.cumsum(lengths)
    assert list(our_ids) == list(ids)
    np.testing.assert_array_equal(np.stack([ends - lengths, ends], -1),
                                  np.asarray(offs).reshape(-1, 2))


@pytest.mark.parametrize("pair", [("bpe2k", "meta4k"), ("meta4k", "bytes"),
                                  ("bpe2k", "bytes")])
def test_groups_match_trl_walk(pair):
  aligner = align.Aligner(ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1]))
  for row in ctt.windows(pair[0], 48, 6, seed=1):
    al = aligner.align(row)
    ours = align.group_spans(al.student_spans, al.teacher_spans)
    s_groups, t_groups = gold.ULDLoss._align_by_byte_offsets(  # pylint: disable=protected-access
        al.student_spans.tolist(), al.teacher_spans.tolist())
    if all(v for _, _, v in ours):  # contiguous spans: the same walk
      assert [g[0] for g in ours] == s_groups
      assert [g[1] for g in ours] == t_groups


@pytest.mark.parametrize("pair", [("meta4k", "bpe2k"), ("bpe2k", "bytes")])
def test_align_samples_teacher_inputs_match_trl(pair):
  """On-policy re-tokenization: TRL's ``build_teacher_inputs_from_texts``
  (prompt and completion texts -> teacher ids, labels, completion byte
  offsets; byte-level teachers only) vs `align.align_samples` on the
  student's token ids."""
  transformers = pytest.importorskip("transformers")
  s_tok, t_tok = ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1])
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=t_tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
  prompt_len, rows, prompts, comps = 5, [], [], []
  for i, p in enumerate(ctt.heldout_paragraphs(3, 160)):
    ids = s_tok.encode(p).ids
    comp = ids[prompt_len:prompt_len + 12 + 4 * i]
    rows.append(ids[:prompt_len] + comp + [EOS])
    # (Not `decode`: a metaspace decoder strips the completion's first space.)
    spell = align.TokenBytes(s_tok).spell
    prompts.append(spell(ids[:prompt_len]).decode().removeprefix(" "))
    comps.append(spell(comp).decode())
  length = max(map(len, rows))
  tokens = np.asarray([r + [PAD] * (length - len(r)) for r in rows])
  t_ids, t_labels, _, t_offs = gold.build_teacher_inputs_from_texts(
      hf, prompts, comps)
  t_ids, t_labels, t_offs = (x.numpy() for x in (t_ids, t_labels, t_offs))
  out = align.align_samples(align.Aligner(s_tok, t_tok), tokens,
                            prompt_len=prompt_len, eos_id=EOS,
                            teacher_len=t_ids.shape[1])
  np.testing.assert_array_equal(out["teacher_tokens"], t_ids)
  np.testing.assert_array_equal(out["teacher_mask"], t_labels != -100)
  aligner = align.Aligner(s_tok, t_tok)
  for i, row in enumerate(tokens):
    al = aligner.align(row, out["student_mask"][i])
    m = al.teacher_mask
    rel = al.teacher_spans[m] - al.teacher_spans[m][0, 0]
    rel[-1] = rel[-2, 1]  # TRL: the EOS is (content_len, content_len)
    np.testing.assert_array_equal(rel, t_offs[i][:len(m)][m])
