"""kd_jax.data.align on real tokenizer pairs trained on the corpus excerpt.

Three tokenizers (tests/cross_tokenizer_testing.py): byte-level BPE 2,048,
metaspace BPE 4,096 (SentencePiece-style pre-tokenization, byte fallback),
and a byte tokenizer (258 ids). Checks are against the tokenizers
themselves: the bytes the tokens spell, their character offsets, and the
teacher's own encoding of the decoded text.
"""

import json

import numpy as np
import pytest
import tokenizers

from kd_jax.data import align
from kd_jax.data import text as text_lib
from tests import cross_tokenizer_testing as ctt

NAMES = ("bpe2k", "meta4k", "bytes")
PAIRS = [(a, b) for a in NAMES for b in NAMES if a != b]


def _char_to_byte(text):
  out = [0]
  for ch in text:
    out.append(out[-1] + len(ch.encode("utf-8")))
  return out


@pytest.mark.parametrize("name", NAMES)
def test_spans_tile_the_text_and_agree_with_char_offsets(name):
  tok = ctt.tokenizer(name)
  tb = align.TokenBytes(tok)
  assert tb.kind == ("metaspace" if name == "meta4k" else "byte_level")
  for text in ctt.heldout_paragraphs(4) + [ctt.UNICODE_TEXT]:
    ids, lengths = tb.encode(text)
    enc = tok.encode(text, add_special_tokens=False)
    assert list(ids) == enc.ids
    ends = np.cumsum(lengths)
    starts = ends - lengths
    data = text.encode("utf-8")
    assert ends[-1] == len(data)
    # Each token's bytes lie inside the bytes of its character offsets.
    c2b = _char_to_byte(text)
    for i, (s, e) in enumerate(enc.offsets):
      assert c2b[s] <= starts[i] <= ends[i] <= c2b[e] or lengths[i] == 0
    # And spell exactly what the tokenizer decodes (specials aside).
    assert tb.spell(ids).lstrip(b" ") == data.lstrip(b" ")
    assert tok.decode(enc.ids) == text


def _text_of(tb, ids, spans, tokens):
  """The bytes tokens cover (a metaspace token's prepended mark is not)."""
  out = b""
  for k in tokens:
    width = spans[k, 1] - spans[k, 0]
    out += tb.bytes[ids[k]][len(tb.bytes[ids[k]]) - width:]
  return out


@pytest.mark.parametrize("pair", PAIRS)
def test_groups_partition_tokens_and_coincide_in_text(pair):
  aligner = align.Aligner(ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1]))
  for row in ctt.windows(pair[0], 48, 8, seed=2):
    al = aligner.align(row)
    s_seen = [k for s, _, _ in al.groups for k in s]
    t_seen = [k for _, t, _ in al.groups for k in t]
    assert s_seen == list(range(len(row)))
    assert t_seen == list(range(len(al.teacher_ids)))
    for s, t, trained in al.groups:
      s_ids, t_ids = row[s], al.teacher_ids[t]
      if trained:  # the same bytes, or the same special token
        if aligner.student.bytes[s_ids[0]] is None:
          assert len(s) == len(t) == 1
          assert (aligner.student.pieces[s_ids[0]]
                  == aligner.teacher.pieces[t_ids[0]])
        else:
          assert (_text_of(aligner.student, row, al.student_spans, s)
                  == _text_of(aligner.teacher, al.teacher_ids,
                              al.teacher_spans, t))
    n_trained = sum(g[2] for g in al.groups)
    assert n_trained >= len(al.groups) - 3  # token 0, window-edge bytes


@pytest.mark.parametrize("pair", PAIRS)
def test_teacher_tokens_are_the_teachers_encoding_of_the_text(pair):
  s_tok, t_tok = ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1])
  aligner = align.Aligner(s_tok, t_tok)
  for text in ctt.heldout_paragraphs(3) + [ctt.UNICODE_TEXT]:
    ids = s_tok.encode(text, add_special_tokens=False).ids
    al = aligner.align(ids)
    assert list(al.teacher_ids) == t_tok.encode(
        text, add_special_tokens=False).ids
    assert all(g[2] for g in al.groups[1:])  # all but token 0's group


def test_multi_token_groups_on_both_sides_and_examples():
  """bpe2k vs meta4k: each side sometimes splits what the other keeps."""
  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("meta4k")
  aligner = align.Aligner(s_tok, t_tok)
  text = ctt.excerpt()["heldout"][:3000]
  al = aligner.align(s_tok.encode(text).ids)
  sizes = np.array([(len(s), len(t)) for s, t, ok in al.groups if ok])
  assert (sizes[:, 0] > 1).any() and (sizes[:, 1] > 1).any()
  assert (sizes == 1).all(axis=1).mean() > 0.5  # mostly one to one
  # A multi-byte character: byte-level pieces vs byte-fallback pieces.
  al = aligner.align(s_tok.encode("\u00a3").ids)
  assert [aligner.teacher.pieces[i] for i in al.teacher_ids][-2:] == [
      "<0xC2>", "<0xA3>"]


def test_special_tokens_pair_and_masks_carry_over():
  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("meta4k")
  eos = text_lib.special_ids(s_tok)["eos_id"]
  prompt = s_tok.encode("It was a truth").ids
  completion = s_tok.encode(" universally acknowledged").ids + [eos]
  rest = s_tok.encode("Chapter 2").ids
  ids = prompt + completion + rest
  mask = [False] * len(prompt) + [True] * len(completion) + [False] * len(
      rest)
  aligner = align.Aligner(s_tok, t_tok)
  al = aligner.align(ids, mask)
  t_eos = text_lib.special_ids(t_tok)["eos_id"]
  k = list(al.teacher_ids).index(t_eos)
  assert al.teacher_mask[k] and not al.teacher_mask[k + 1]
  # The prompt and the completion are tokenized separately for the teacher.
  n_p = len(t_tok.encode("It was a truth").ids)
  assert list(al.teacher_ids[:n_p]) == t_tok.encode("It was a truth").ids
  for s, t, trained in al.groups:
    m = {mask[i] for i in s}
    assert len(m) == 1 and {bool(al.teacher_mask[i]) for i in t} <= m
    assert trained == (m == {True})
  eos_groups = [g for g in al.groups if ids[g[0][0]] == eos]
  assert eos_groups == [([len(prompt) + len(completion) - 1], [k], True)]


def test_invalid_utf8_leaves_an_unscored_hole():
  """A sampled byte sequence need not be UTF-8: the teacher cannot encode
  the stray byte; its group is not scored and the rest still is."""
  s_tok, t_tok = ctt.tokenizer("bytes"), ctt.tokenizer("bpe2k")
  aligner = align.Aligner(s_tok, t_tok)
  good = s_tok.encode("abc de").ids
  stray = s_tok.token_to_id(align._bytes_to_unicode()[0xA3])  # pylint: disable=protected-access
  al = aligner.align(good[:3] + [stray] + good[3:])
  hole = [g for g in al.groups if 3 in g[0]]
  assert len(hole) == 1 and not hole[0][2] and hole[0][1] == []
  assert t_tok.decode(list(al.teacher_ids)) == "abc de"
  # Scored: everything but the hole and the group of token 0.
  scored = sorted(k for s, _, ok in al.groups if ok for k in s)
  assert scored == [k for k in range(7) if k not in al.groups[0][0] + [3]]


@pytest.mark.parametrize("merge", ["chain", "first"])
def test_align_batch_index_arrays(merge):
  s_tok, t_tok = ctt.tokenizer("meta4k"), ctt.tokenizer("bytes")
  aligner = align.Aligner(s_tok, t_tok, merge=merge)
  tokens = ctt.windows("meta4k", 20, 3, seed=4)
  mask = np.ones_like(tokens, bool)
  mask[:, :4] = False
  out = aligner.align_batch(tokens, mask, teacher_len=200)
  g_max = tokens.shape[1] - 1
  assert out["student_group"].shape == (3, 19)
  assert out["teacher_group"].shape == (3, 199)
  for i in range(3):
    groups = [g for g in aligner.align(tokens[i], mask[i]).groups if g[2]]
    assert out["group_mask"][i].sum() == len(groups)
    for g, (s, t, _) in enumerate(groups):
      for side, tok in (("student", s), ("teacher", t)):
        base = tok[-1] if merge == "chain" else tok[0]
        assert out[f"{side}_base"][i, g] == base - 1
        rows = np.flatnonzero(out[f"{side}_group"][i] == g)
        assert sorted(rows + 1) == sorted(set(tok) - {base})
    assert (out["student_group"][i] <= g_max).all()
  np.testing.assert_array_equal(
      out["teacher_tokens"][0, :out["teacher_mask"][0].size][
          out["teacher_mask"][0]],
      [x for x, m in zip(aligner.align(tokens[0], mask[0]).teacher_ids,
                         aligner.align(tokens[0], mask[0]).teacher_mask)
       if m])


def test_truncated_teacher_and_too_many_groups():
  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("bytes")
  aligner = align.Aligner(s_tok, t_tok)
  tokens = ctt.windows("bpe2k", 32, 2, seed=5)
  full = aligner.align_batch(tokens, teacher_len=400)
  short = aligner.align_batch(tokens, teacher_len=40)
  n_t = [len(aligner.align(r).teacher_ids) for r in tokens]
  np.testing.assert_array_equal(short["truncated"], np.array(n_t) - 40)
  assert short["group_mask"].sum() < full["group_mask"].sum()
  assert (short["teacher_base"][short["group_mask"]] < 39).all()
  few = aligner.align_batch(tokens, teacher_len=400, num_groups=5)
  assert few["group_mask"].all()
  np.testing.assert_array_equal(few["dropped"],
                                full["group_mask"].sum(1) - 5)


def test_vocab_mapping():
  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("meta4k")
  by_piece = align.vocab_mapping(s_tok, t_tok)
  by_bytes = align.vocab_mapping(s_tok, t_tok, by="bytes")
  s_tb, t_tb = align.TokenBytes(s_tok), align.TokenBytes(t_tok)
  for s_ids, t_ids in (by_piece, by_bytes):
    assert np.all(np.diff(t_ids) > 0) and len(set(s_ids)) == len(s_ids)
  for s, t in zip(*by_piece):
    assert s_tb.pieces[s] == t_tb.pieces[t]
  t_plain = {t_tb.bytes[i] for i in range(t_tb.vocab_size)
             if not t_tb.fallback[i]}
  for s, t in zip(*by_bytes):
    assert s_tb.bytes[s] == t_tb.bytes[t]
    if s_tb.bytes[s] is None:
      assert s_tb.pieces[s] == t_tb.pieces[t]
    elif t_tb.fallback[t]:  # a fallback id only where no plain piece spells it
      assert t_tb.bytes[t] not in t_plain
  # "\u0120the" vs "\u2581the": strings rarely match, bytes often do.
  assert len(by_bytes[0]) > 2 * len(by_piece[0]) > 0
  assert len(by_bytes[0]) > 0.9 * s_tb.vocab_size
  assert s_tb.pieces[by_bytes[0][0]] == "<|pad|>"


def test_token_byte_lengths():
  tb = align.TokenBytes(ctt.tokenizer("bytes"))
  assert (align.token_byte_lengths(ctt.tokenizer("bytes"))[2:] == 1).all()
  assert tb.lengths[0] == tb.lengths[1] == 0 and tb.vocab_size == 258


def test_bad_inputs():
  s_tok = ctt.tokenizer("bpe2k")
  spec = json.loads(s_tok.to_str())
  spec["normalizer"] = {"type": "Lowercase"}
  lower = tokenizers.Tokenizer.from_str(json.dumps(spec))
  with pytest.raises(ValueError, match="normalizer"):
    align.Aligner(s_tok, lower)
  with pytest.raises(ValueError, match="merge must be"):
    align.Aligner(s_tok, s_tok, merge="bayes")
  aligner = align.Aligner(s_tok, ctt.tokenizer("bytes"))
  with pytest.raises(ValueError, match=r"student token ids must be in \[0, "
                     "2048\\)"):
    aligner.align([5, 4096])
  with pytest.raises(ValueError, match="mask has 1 entries for 2 tokens"):
    aligner.align([5, 6], [True])
  with pytest.raises(ValueError, match="teacher_len"):
    aligner.align_batch(np.zeros((1, 4), np.int32), teacher_len=1)
  with pytest.raises(ValueError, match="pre_tokenizer must be"):
    text_lib.train_bpe_tokenizer(["a b"], vocab_size=300,
                                 pre_tokenizer="whitespace")


@pytest.mark.parametrize("pair", [("bpe2k", "meta4k"), ("meta4k", "bytes")])
def test_align_samples_retokenizes_prompt_and_completion(pair):
  """On-policy: prompts + sampled completions (EOS, then anything)."""
  s_tok, t_tok = ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1])
  s_ids, t_ids = text_lib.special_ids(s_tok), text_lib.special_ids(t_tok)
  aligner = align.Aligner(s_tok, t_tok)
  paras = ctt.heldout_paragraphs(2, 200)
  prompt_len, length = 6, 40
  rows, texts = [], []
  for i, p in enumerate(paras):
    ids = s_tok.encode(p).ids
    comp = ids[prompt_len:prompt_len + 20 + 5 * i]
    garbage = s_tok.encode(" and then more text").ids
    row = (ids[:prompt_len] + comp + [s_ids["eos_id"]] + garbage)[:length]
    rows.append(row + [s_ids["pad_id"]] * (length - len(row)))
    texts.append((s_tok.decode(ids[:prompt_len]), s_tok.decode(comp)))
  tokens = np.asarray(rows, np.int32)
  out = align.align_samples(aligner, tokens, prompt_len=prompt_len,
                            eos_id=s_ids["eos_id"], teacher_len=160)
  np.testing.assert_array_equal(
      out["student_mask"],
      align.completion_mask(tokens, prompt_len, s_ids["eos_id"]))
  for i, (prompt, comp) in enumerate(texts):
    assert out["student_mask"][i].sum() == 20 + 5 * i + 1  # + EOS
    want = (t_tok.encode(prompt).ids + t_tok.encode(comp).ids
            + [t_ids["eos_id"]])
    got = out["teacher_tokens"][i]
    assert list(got[:len(want)]) == want
    assert (got[len(want):] == t_ids["pad_id"]).all()  # no garbage
    assert out["teacher_mask"][i].sum() == len(t_tok.encode(comp).ids) + 1
  assert out["group_mask"].any(axis=1).all()


def test_prepare_corpus_metaspace_and_byte_counts(tmp_path):
  from experiments import prepare_corpus  # pylint: disable=g-import-not-at-top
  paths = {}
  paras = ctt.excerpt()["train"][:20000].split("\n")
  for split, part in (("train", paras[:-20]), ("validation", paras[-20:-10]),
                      ("test", paras[-10:] + [ctt.UNICODE_TEXT])):
    paths[split] = str(tmp_path / f"{split}.txt")
    with open(paths[split], "w", encoding="utf-8") as fh:
      fh.write("\n".join(part))
  prepare_corpus.main(["--data_dir", str(tmp_path / "out"), "--name", "m",
                       "--vocab_size", "400", "--seq_len", "16",
                       "--pre_tokenizer", "metaspace",
                       "--train_files", paths["train"],
                       "--validation_files", paths["validation"],
                       "--test_files", paths["test"]])
  folder = tmp_path / "out" / "m" / "1.0.0"
  meta = json.loads((folder / "kd_jax_text.json").read_text())
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  assert align.tokenizer_kind(tok) == ("metaspace", "\u2581")
  assert meta["pre_tokenizer"] == "metaspace"
  test_text = open(paths["test"], encoding="utf-8").read()
  assert meta["stats"]["test"]["bytes"] == len(test_text.encode("utf-8"))
  assert meta["stats"]["test"]["bytes"] > meta["stats"]["test"]["characters"]


def test_retokenize_fn_inside_compiled_scan_and_cond():
  """The on-policy host step as a callback in a compiled program."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("meta4k")
  aligner = align.Aligner(s_tok, t_tok)
  eos = text_lib.special_ids(s_tok)["eos_id"]
  tokens = ctt.windows("bpe2k", 24, 4, seed=6)
  tokens[1, 15] = eos
  kw = dict(prompt_len=5, eos_id=eos, teacher_len=40)
  fn = align.make_retokenize_fn(aligner, teacher_len=40)
  want = align.align_samples(aligner, tokens, **kw)
  mask = align.completion_mask(tokens, 5, eos)

  @jax.jit
  def run(tokens, mask, flags):
    def body(carry, flag):
      out = jax.lax.cond(flag, fn, lambda t, m: jax.tree.map(
          jnp.zeros_like, jax.eval_shape(fn, t, m)), tokens, mask)
      return carry + out["group_mask"].sum(), out
    return jax.lax.scan(body, 0, flags)

  total, outs = run(jnp.asarray(tokens), jnp.asarray(mask),
                    jnp.asarray([True, False, True]))
  assert set(outs) == set(align.ALIGNMENT_KEYS)
  for k, v in outs.items():
    np.testing.assert_array_equal(v[0], want[k])
    np.testing.assert_array_equal(v[2], want[k])
    assert not np.asarray(v[1]).any()
  assert int(total) == 2 * want["group_mask"].sum()


def test_aligned_source_batches_with_lm_dataset():
  s_tok, t_tok = ctt.tokenizer("bpe2k"), ctt.tokenizer("bytes")
  aligner = align.Aligner(s_tok, t_tok)
  rows = ctt.windows("bpe2k", 16, 6, seed=7)
  src = align.AlignedSource(rows, aligner, teacher_len=80, prompt_len=4)
  ds = text_lib.lm_dataset(src, batch_size=3, shuffle=False, num_epochs=1)
  batch = ds[1]
  mask = np.broadcast_to(np.arange(16) >= 4, (3, 16))
  want = aligner.align_batch(rows[3:6], mask, teacher_len=80)
  unmasked = aligner.align_batch(rows[3:6], teacher_len=80)
  assert want["group_mask"].sum() < unmasked["group_mask"].sum()  # prompts
  np.testing.assert_array_equal(batch["tokens"], rows[3:6])
  for k in align.ALIGNMENT_KEYS:
    np.testing.assert_array_equal(batch[k], want[k])
  shapes = align.alignment_shapes(3, 16, 80)
  assert {k: (batch[k].shape, batch[k].dtype) for k in shapes} == {
      k: (s, np.dtype(d)) for k, (s, d) in shapes.items()}


def _llama2_like(texts):
  """Llama-2's layout: no pre-tokenizer, normalizer Prepend + Replace."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, trainers
  tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                         normalizers.Replace(" ", "\u2581")])
  tok.decoder = decoders.Sequence([
      decoders.Replace("\u2581", " "), decoders.ByteFallback(),
      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<|pad|>", "<|endoftext|>"]
      + byte_tokens, show_progress=False))
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = spec["added_tokens"][:2]
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


def test_llama2_and_qwen_style_tokenizers_align():
  """Layouts of public checkpoints, rebuilt locally: Llama-2 (metaspace by a
  normalizer) and Qwen2 (byte-level with an NFC normalizer)."""
  texts = ctt.excerpt()["train"][:20000].split("\n")
  llama = _llama2_like(texts)
  spec = json.loads(ctt.tokenizer("bpe2k").to_str())
  spec["normalizer"] = {"type": "NFC"}
  qwen = tokenizers.Tokenizer.from_str(json.dumps(spec))
  assert align.tokenizer_kind(llama) == ("metaspace", "\u2581")
  assert align.tokenizer_kind(qwen) == ("byte_level", None)
  aligner = align.Aligner(qwen, llama)
  for text in ctt.heldout_paragraphs(2) + [ctt.UNICODE_TEXT]:
    al = aligner.align(qwen.encode(text).ids)
    assert list(al.teacher_ids) == llama.encode(text).ids
    assert al.teacher_spans[-1, 1] == len(text.encode("utf-8"))
    assert all(g[2] for g in al.groups[1:])
