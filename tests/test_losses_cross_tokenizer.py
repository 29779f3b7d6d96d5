"""kd_jax.losses.cross_tokenizer against float64 NumPy transcriptions.

The transcriptions follow the paper's formula (sort each distribution in
decreasing order, zero-pad the smaller vocabulary, L1) and TRL GOLD's
``ULDLoss`` (merging a group's probabilities from its token lists, the
hybrid's JSD on floored probabilities, the unmatched sub-vectors sorted on
their own); they read the groups of `kd_jax.data.align` as token lists, not
the index arrays the JAX code uses. Gradients: directional finite
differences in float64. Tolerances: `loss_testing.assert_close_to_reference`
(float32 rounding floor measured on a float32 run of the transcription).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.data import align
from kd_jax.losses import cross_tokenizer as xt
from tests import cross_tokenizer_testing as ctt
from tests.loss_testing import assert_close_to_reference, random_logits


# --- float64 NumPy transcriptions -----------------------------------------


def np_log_softmax(x, temperature=1.0):
  x = x / temperature
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sorted_l1(p, q):
  """Paper: sort decreasing, zero-pad to the larger vocabulary, L1."""
  v = max(p.shape[-1], q.shape[-1])
  pad = lambda a: np.concatenate(
      [a, np.zeros(a.shape[:-1] + (v - a.shape[-1],), a.dtype)], -1)
  ps = pad(-np.sort(-p, axis=-1))
  qs = pad(-np.sort(-q, axis=-1))
  return np.abs(ps - qs).sum(-1)


def np_merge(logp, token_ids, groups, merge, min_prob=1e-8):
  """TRL's ``_merge_probabilities_with_alignment_groups`` on causal rows:
  ``logp[k - 1]`` is the distribution predicting token ``k``."""
  out = []
  for tok in groups:
    base = tok[-1] if merge == "chain" else tok[0]
    p = np.exp(logp[base - 1])
    for k in tok:
      if k != base:
        p = p * max(np.exp(logp[k - 1, token_ids[k]]), min_prob)
    out.append(p)
  return np.stack(out) if out else np.zeros((0, logp.shape[-1]), logp.dtype)


def np_matched_jsd(p, q, beta, min_prob=1e-8):
  """TRL ``generalized_jsd_loss(logits_are_probs=True)``, summed per row."""
  a, b = np.log(np.maximum(p, min_prob)), np.log(np.maximum(q, min_prob))
  if beta == 0:
    return (np.exp(b) * (b - a)).sum(-1)
  if beta == 1:
    return (np.exp(a) * (a - b)).sum(-1)
  m = np.logaddexp(a + np.log1p(-beta), b + np.log(beta))
  return (beta * (np.exp(b) * (b - m)).sum(-1)
          + (1 - beta) * (np.exp(a) * (a - m)).sum(-1))


def np_hybrid(p, q, s_ids, t_ids, beta, w_m, w_u):
  """TRL ``_compute_hybrid_uld_loss`` per row: JSD on matched entries, ULD
  on the sorted unmatched sub-vectors."""
  if w_m is None:
    w_m = len(t_ids) / q.shape[-1]
    w_u = 1 - w_m
  s_rest = np.setdiff1d(np.arange(p.shape[-1]), s_ids)
  t_rest = np.setdiff1d(np.arange(q.shape[-1]), t_ids)
  matched = np_matched_jsd(p[..., s_ids], q[..., t_ids], beta)
  return w_m * matched + w_u * np_sorted_l1(p[..., s_rest], q[..., t_rest])


# --- positional ULD ---------------------------------------------------------


@pytest.mark.parametrize("vs,vt", [(7, 7), (5, 11), (13, 4)])
@pytest.mark.parametrize("temps", [(1.0, 1.0), (2.0, 0.5)])
def test_uld_loss_matches_numpy(vs, vt, temps):
  rng = np.random.default_rng(vs * vt)
  s = (3 * rng.standard_normal((3, 4, vs))).astype(np.float32)
  t = (3 * rng.standard_normal((3, 4, vt))).astype(np.float32)
  where = rng.random((3, 4)) > 0.3
  out = xt.uld_loss(s, t, student_temperature=temps[0],
                    teacher_temperature=temps[1], where=where)

  def ref(dtype):
    d = np_sorted_l1(np.exp(np_log_softmax(s.astype(dtype), temps[0])),
                     np.exp(np_log_softmax(t.astype(dtype), temps[1])))
    return np.where(where, d, 0.0)

  assert_close_to_reference(out, ref)


def test_uld_is_zero_for_permuted_distributions_and_at_most_two():
  s, _ = random_logits(0, (5, 9))
  perm = np.random.default_rng(1).permutation(9)
  np.testing.assert_allclose(xt.uld_loss(s, s[:, perm]), 0.0, atol=1e-6)
  far = np.array([[30.0] + [-30.0] * 8])
  near = np.array([[-30.0] * 4 + [30.0] * 5])  # 1 vs 5 equal modes
  np.testing.assert_allclose(xt.uld_loss(far, near), 1.6, rtol=1e-6)
  assert float(jnp.max(xt.uld_loss(*random_logits(2, (50, 9))))) <= 2.0


def test_uld_distance_accepts_unnormalized_logs():
  p = np.log(np.array([[0.2, 0.1, 0.05]]))  # sums to 0.35
  q = np.log(np.array([[0.3, 0.3]]))
  np.testing.assert_allclose(xt.uld_distance(p, q), [0.1 + 0.2 + 0.05],
                             rtol=1e-6)


# --- extended ULD and hybrid on real alignments ---------------------------


@functools.lru_cache(maxsize=None)
def _aligned(student, teacher, merge, length=40, count=3):
  aligner = align.Aligner(ctt.tokenizer(student), ctt.tokenizer(teacher),
                          merge=merge)
  tokens = ctt.windows(student, length, count, seed=3)
  mask = np.ones_like(tokens, bool)
  mask[:, :7] = False  # a "prompt"
  t_len = align.teacher_length_for(aligner, tokens)
  out = aligner.align_batch(tokens, mask, teacher_len=t_len)
  seqs = [aligner.align(tokens[i], mask[i]) for i in range(count)]
  return aligner, tokens, out, seqs


def _np_extended(s_logits, t_logits, tokens, out, seqs, merge, temps, dist):
  """Per-group distances from the token lists (float64), [B, G] zero-padded."""
  res = np.zeros(out["group_mask"].shape)
  for i, al in enumerate(seqs):
    groups = [(s, t) for s, t, ok in al.groups if ok]
    s_m = np_merge(np_log_softmax(s_logits[i], temps[0]), tokens[i],
                   [g[0] for g in groups], merge)
    t_m = np_merge(np_log_softmax(t_logits[i], temps[1]),
                   out["teacher_tokens"][i], [g[1] for g in groups], merge)
    res[i, :len(groups)] = dist(s_m, t_m)
  return res


def _logits_for(aligner, tokens, out, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  b, ls = tokens.shape
  s = 3 * rng.standard_normal((b, ls - 1, aligner.student.vocab_size))
  t = 3 * rng.standard_normal((b, out["teacher_tokens"].shape[1] - 1,
                               aligner.teacher.vocab_size))
  return s.astype(dtype), t.astype(dtype)


@pytest.mark.parametrize("pair", [("bpe2k", "meta4k"), ("meta4k", "bytes"),
                                  ("bytes", "bpe2k")])
@pytest.mark.parametrize("merge", ["chain", "first"])
def test_extended_uld_matches_numpy(pair, merge):
  aligner, tokens, out, seqs = _aligned(*pair, merge)
  s, t = _logits_for(aligner, tokens, out)
  temps = (1.3, 0.9)
  got = xt.extended_uld_loss(
      s, t, tokens[:, 1:], out["teacher_tokens"][:, 1:],
      xt.TokenAlignment.from_batch(out), student_temperature=temps[0],
      teacher_temperature=temps[1])
  assert got.shape == out["group_mask"].shape
  ref = lambda dt: _np_extended(s.astype(dt), t.astype(dt), tokens, out,
                                seqs, merge, temps, np_sorted_l1)
  assert_close_to_reference(got, ref, scale=2.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("by", ["piece", "bytes"])
def test_extended_hybrid_matches_numpy(beta, by):
  pair = ("bpe2k", "meta4k")
  aligner, tokens, out, seqs = _aligned(*pair, "chain")
  s_ids, t_ids = align.vocab_mapping(ctt.tokenizer(pair[0]),
                                     ctt.tokenizer(pair[1]), by=by)
  s, t = _logits_for(aligner, tokens, out, seed=1)
  weights = (None, None) if by == "piece" else (0.6, 0.8)
  got = xt.extended_uld_loss(
      s, t, tokens[:, 1:], out["teacher_tokens"][:, 1:],
      xt.TokenAlignment.from_batch(out), matched_ids=(s_ids, t_ids),
      beta=beta, matched_weight=weights[0], unmatched_weight=weights[1])
  dist = lambda p, q: np_hybrid(p, q, s_ids, t_ids, beta, *weights)
  ref = lambda dt: _np_extended(s.astype(dt), t.astype(dt), tokens, out,
                                seqs, "chain", (1.0, 1.0), dist)
  assert_close_to_reference(got, ref, scale=20.0)


def test_hybrid_uld_loss_positional_matches_numpy():
  rng = np.random.default_rng(5)
  s = (2 * rng.standard_normal((4, 9))).astype(np.float32)
  t = (2 * rng.standard_normal((4, 12))).astype(np.float32)
  s_ids, t_ids = np.array([0, 3, 4, 8]), np.array([1, 2, 7, 11])
  got = xt.hybrid_uld_loss(s, t, s_ids, t_ids, beta=0.5,
                           student_temperature=2.0)
  ref = lambda dt: np_hybrid(np.exp(np_log_softmax(s.astype(dt), 2.0)),
                             np.exp(np_log_softmax(t.astype(dt))), s_ids,
                             t_ids, 0.5, None, None)
  assert_close_to_reference(got, ref, scale=10.0)


# --- gradients ---------------------------------------------------------------


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _directional_check(f, x, args, seed, eps=1e-6, rtol=1e-5):
  """d/de f(x + e d, *args) vs central differences. `args` are passed to the
  jitted functions (closed-over arrays would be constant-folded by XLA: a
  sort of them at compile time takes minutes)."""
  d = np.random.default_rng(seed).standard_normal(x.shape)
  g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x), *args))
  f = jax.jit(f)
  num = (float(f(jnp.asarray(x + eps * d), *args)) - float(
      f(jnp.asarray(x - eps * d), *args))) / (2 * eps)
  np.testing.assert_allclose(np.sum(g * d), num, rtol=rtol, atol=1e-9)
  return g


@pytest.mark.parametrize("vp,vq", [(9, 6), (5, 8)])
def test_sorted_l1_custom_jvp_in_both_arguments(x64, vp, vq):
  """The sort-free derivative (binary search for each entry's rank) against
  central differences, tangents in both arguments, unequal lengths."""
  rng = np.random.default_rng(vp)
  p, q = rng.random((4, vp)), rng.random((4, vq))
  dp, dq = rng.standard_normal(p.shape), rng.standard_normal(q.shape)
  f = jax.jit(lambda a, b: jnp.sum(xt._sorted_l1(a, b)))  # pylint: disable=protected-access
  _, tangent = jax.jvp(f, (p, q), (dp, dq))
  eps = 1e-6
  num = (f(p + eps * dp, q + eps * dq) - f(p - eps * dp, q - eps * dq)) / (
      2 * eps)
  np.testing.assert_allclose(tangent, num, rtol=1e-7)
  np.testing.assert_allclose(f(p, q), np_sorted_l1(p, q).sum(), rtol=1e-12)


def test_uld_loss_gradient_finite_differences(x64):
  s, t = random_logits(7, (3, 6, 11))
  s, t = s.astype(np.float64), t[..., :8].astype(np.float64)
  where = np.random.default_rng(0).random((3, 6)) > 0.25
  f = lambda x, t, w: jnp.sum(xt.uld_loss(x, t, student_temperature=1.7,
                                          where=w))
  g = _directional_check(f, s, (t, where), 1)
  assert np.all(g[~where] == 0)
  assert np.all(np.abs(g.sum(-1)) < 1e-9)  # softmax: gradients sum to 0


@pytest.mark.parametrize("hybrid", [False, True])
def test_extended_gradient_finite_differences(x64, hybrid):
  pair = ("bpe2k", "meta4k")
  aligner, tokens, out, _ = _aligned(*pair, "chain", 24, 2)
  s, t = _logits_for(aligner, tokens, out, np.float64, seed=2)
  kw = {}
  if hybrid:
    kw = dict(matched_ids=align.vocab_mapping(
        ctt.tokenizer(pair[0]), ctt.tokenizer(pair[1]), by="bytes"),
              beta=0.4)
  al = xt.TokenAlignment.from_batch(out)
  f = lambda x, t, s_tgt, t_tgt, al: jnp.sum(xt.sequence_mean(
      xt.extended_uld_loss(x, t, s_tgt, t_tgt, al, **kw), al.group_mask))
  g = _directional_check(f, s, (t, tokens[:, 1:], out["teacher_tokens"][:, 1:],
                                al), 3)
  used = np.zeros(s.shape[:2], bool)  # rows of scored groups only
  for i in range(len(s)):
    used[i, out["student_base"][i][out["group_mask"][i]]] = True
    used[i, out["student_group"][i] < out["group_mask"].shape[1]] = True
  assert np.all(g[~used] == 0) and np.any(g[used] != 0)
  # The teacher is a constant.
  gt = jax.grad(lambda y: jnp.sum(xt.extended_uld_loss(
      jnp.asarray(s), y, tokens[:, 1:], out["teacher_tokens"][:, 1:], al,
      **kw)))(jnp.asarray(t))
  assert not np.any(np.asarray(gt))


def test_masked_groups_are_zero_with_finite_gradients_despite_nan():
  s, t = random_logits(9, (2, 3, 6))
  s[0, 1] = np.nan
  t[1, 2] = np.inf
  where = np.ones((2, 3), bool)
  where[0, 1] = where[1, 2] = False
  for fn in (xt.uld_loss, functools.partial(
      xt.hybrid_uld_loss, student_ids=np.array([0, 1]),
      teacher_ids=np.array([2, 3]))):
    loss = lambda x, y, w, fn=fn: jnp.sum(fn(x, y, where=w))
    val = jax.jit(lambda x, y, w, fn=fn: fn(x, y, where=w))(s, t, where)
    assert np.all(np.isfinite(val)) and val[0, 1] == 0 and val[1, 2] == 0
    g = jax.jit(jax.grad(loss))(s, t, where)
    assert np.all(np.isfinite(g)) and np.all(g[0, 1] == 0)


# --- reductions and the metric ---------------------------------------------


def test_sequence_mean_and_objective_match_numpy():
  rng = np.random.default_rng(11)
  d, dw = rng.random((3, 5)), rng.random((3, 5)) > 0.5
  dw[2] = False  # a sequence with no aligned group contributes 0
  ce, cw = rng.random((3, 7)), rng.random((3, 7)) > 0.3
  seq = np.array([d[i][dw[i]].mean() if dw[i].any() else 0.0
                  for i in range(3)])
  np.testing.assert_allclose(xt.sequence_mean(d, dw), seq, rtol=1e-6)
  got = xt.uld_objective(ce, cw, d, dw, crossentropy_weight=0.4,
                         distillation_weight=1.5)
  np.testing.assert_allclose(got, 0.4 * ce[cw].mean() + 1.5 * seq.mean(),
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["bpe2k", "meta4k", "bytes"])
def test_target_bytes_and_bits_per_byte(name):
  tok = ctt.tokenizer(name)
  table = align.token_byte_lengths(tok)
  docs = ctt.heldout_paragraphs(3)
  ids = np.concatenate([np.asarray(tok.encode(d).ids) for d in docs])
  n = int(np.sum(xt.target_bytes(ids, table)))
  want = sum(len(d.encode()) for d in docs)
  # metaspace counts the space it prepends to each document's first word
  assert n == want + (len(docs) if name == "meta4k" else 0)
  where = np.arange(len(ids)) % 3 > 0
  np.testing.assert_array_equal(xt.target_bytes(ids, table, where=where),
                                np.where(where, table[ids], 0))
  np.testing.assert_allclose(xt.bits_per_byte(n * np.log(2.0) * 1.5, n), 1.5,
                             rtol=1e-6)


def test_exported():
  for name in ("uld_loss", "extended_uld_loss", "hybrid_uld_loss",
               "hybrid_distance", "uld_distance", "matched_jsd",
               "merge_token_groups", "uld_objective", "bits_per_byte",
               "TokenAlignment"):
    assert getattr(losses, name) is getattr(xt, name)


# --- bad input ---------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda: xt.uld_loss(np.zeros((2, 3)), np.zeros((3, 4))), "leading dims"),
    (lambda: xt.uld_loss(np.zeros((2, 3), np.int32), np.zeros((2, 4))),
     "floating"),
    (lambda: xt.uld_loss(np.zeros((2, 3)), np.zeros((2, 4)),
                         teacher_temperature=0.0), "teacher_temperature"),
    (lambda: xt.matched_jsd(np.zeros((2, 3)), np.zeros((2, 3)), beta=1.5),
     "beta"),
    (lambda: xt.hybrid_distance(np.zeros((2, 3)), np.zeros((2, 4)),
                                np.array([0, 1]), np.array([0, 4])),
     "teacher_ids"),
    (lambda: xt.hybrid_distance(np.zeros((2, 3)), np.zeros((2, 4)),
                                np.array([0]), np.array([0]),
                                matched_weight=0.5), "both be None"),
    (lambda: xt.merge_token_groups(np.zeros((2, 3, 4)), np.zeros((2, 2),
                                                                 np.int32),
                                   np.zeros((2, 1), np.int32),
                                   np.zeros((2, 3), np.int32)), "targets"),
    (lambda: xt.merge_token_groups(np.zeros((3, 4)), None, None, None),
     "rank 3"),
])
def test_bad_inputs_raise_clear_errors(call, match):
  with pytest.raises((ValueError, TypeError), match=match):
    call()
