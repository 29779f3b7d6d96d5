"""Tests of `kd_jax.train.lm_steps` against float64 NumPy references.

Student and teacher are bigram models (``logits = W[tokens]``) so the whole
objective -- generation, masks, divergence, token mean -- can be transcribed
in float64 NumPy; the step's gradient (one SGD step with learning rate 1,
``grad = W - W'``) is compared with central finite differences of that
transcription. One test runs GKD with real `kd_jax.models.lm` Transformers
and compiled KV-cache generation inside the jitted step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax.train import create_train_state
from kd_jax.train import lm_steps

V, B, L = 7, 3, 9


def bigram_apply(variables, tokens, train=False, rngs=None):
  del train, rngs
  return variables["params"]["W"][tokens], {}


def teacher_apply(variables, tokens):
  return variables["params"]["W"][tokens], {}


def greedy_bigram_generate(length):
  """JAX greedy generation of a bigram model up to `length` tokens."""

  def gen(variables, prompts, rng):
    del rng
    w = variables["params"]["W"]
    p = prompts.shape[1]

    def body(prev, _):
      nxt = jnp.argmax(w[prev], axis=-1).astype(jnp.int32)
      return nxt, nxt

    _, new = jax.lax.scan(body, prompts[:, -1], None, length=length - p)
    return jnp.concatenate([prompts, new.T], axis=1)

  return gen


# --- float64 NumPy transcriptions -------------------------------------------


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_divergence(s, t, name, temperature, beta):
  lq, lp = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
  q, p = np.exp(lq), np.exp(lp)
  if name == "forward_kl" or (name == "js_divergence" and beta == 0):
    return (p * (lp - lq)).sum(-1)
  if name == "reverse_kl" or (name == "js_divergence" and beta == 1):
    return (q * (lq - lp)).sum(-1)
  if name == "js_divergence":
    m = beta * p + (1 - beta) * q
    return (beta * (p * (lp - np.log(m))).sum(-1)
            + (1 - beta) * (q * (lq - np.log(m))).sum(-1))
  return 0.5 * np.abs(p - q).sum(-1)


def np_loss(w, wt, tokens, mask, *, divergence, temperature, beta, ce_weight,
            kd_weight):
  x, y, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].astype(bool)
  s, t = w[x], wt[x]
  nll = -np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]
  d = np_divergence(s, t, divergence, temperature, beta)
  n = max(m.sum(), 1)
  return (ce_weight * (nll * m).sum() + kd_weight * (d * m).sum()) / n


def np_greedy(w, prompts, length):
  out = [list(r) for r in prompts]
  for row in out:
    while len(row) < length:
      row.append(int(np.argmax(w[row[-1]])))
  return np.array(out)


def np_completion_mask(tokens, prompt_len, eos_id):
  mask = np.zeros(tokens.shape, bool)
  for i, row in enumerate(tokens):
    for j in range(prompt_len, len(row)):
      mask[i, j] = True
      if eos_id is not None and row[j] == eos_id:
        break
  return mask


def fd_grad(f, w, eps=1e-6):
  g = np.zeros_like(w)
  for idx in np.ndindex(w.shape):
    wp, wm = w.copy(), w.copy()
    wp[idx] += eps
    wm[idx] -= eps
    g[idx] = (f(wp) - f(wm)) / (2 * eps)
  return g


# --- fixtures ----------------------------------------------------------------


def _weights(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(V, V)) * 1.5,
          rng.normal(size=(V, V)) * 1.5)


def _state(w):
  return create_train_state({"params": {"W": jnp.asarray(w, jnp.float32)}},
                            optax.sgd(1.0), rng=jax.random.key(0))


def _check_grad(state, new_state, ref_fn, w, metrics):
  grad = np.asarray(state.params["W"]) - np.asarray(new_state.params["W"])
  want = fd_grad(ref_fn, w)
  np.testing.assert_allclose(grad, want, atol=2e-5 * max(1, np.abs(
      want).max()))
  np.testing.assert_allclose(float(metrics["loss"]), ref_fn(w), rtol=1e-5,
                             atol=1e-6)


CASES = [("forward_kl", 1.0, 0.5, 0.0, 1.0),
         ("reverse_kl", 2.0, 0.5, 0.5, 1.0),
         ("js_divergence", 1.0, 0.3, 0.0, 1.0),
         ("js_divergence", 0.7, 1.0, 0.0, 2.0),
         ("total_variation", 1.0, 0.5, 1.0, 0.5)]


@pytest.mark.parametrize("divergence,temperature,beta,ce_w,kd_w", CASES)
def test_token_kd_step_matches_numpy(divergence, temperature, beta, ce_w,
                                     kd_w):
  w, wt = _weights(0)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, V, (B, L))
  mask = rng.random((B, L)) < 0.7
  step = jax.jit(lm_steps.make_lm_distill_step(
      bigram_apply, teacher_apply, optax.sgd(1.0), divergence=divergence,
      temperature=temperature, beta=beta, ce_weight=ce_w, kd_weight=kd_w))
  state = _state(w)
  new_state, metrics = step(state, {"params": {"W": jnp.asarray(wt)}},
                            {"tokens": jnp.asarray(tokens),
                             "mask": jnp.asarray(mask)})
  ref = lambda ww: np_loss(ww, wt, tokens, mask, divergence=divergence,  # noqa: E731
                           temperature=temperature, beta=beta, ce_weight=ce_w,
                           kd_weight=kd_w)
  _check_grad(state, new_state, ref, w, metrics)
  assert float(metrics["tokens"]) == mask[:, 1:].sum()
  assert int(new_state.step) == 1


def test_completion_mask_against_numpy():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 4, (6, 10))
  for eos in (None, 2):
    np.testing.assert_array_equal(
        lm_steps.completion_mask(jnp.asarray(tokens), 3, eos),
        np_completion_mask(tokens, 3, eos))


@pytest.mark.parametrize("kd_w", [0.0, 0.5])
def test_seqkd_step_matches_numpy(kd_w):
  w, wt = _weights(2)
  prompt_len = 3
  tokens = np.random.default_rng(3).integers(0, V, (B, L))
  gen = np_greedy(wt, tokens[:, :prompt_len], L)
  eos = int(gen[0, prompt_len + 1])  # row 0 stops early
  step = jax.jit(lm_steps.make_seqkd_step(
      bigram_apply, greedy_bigram_generate(L), optax.sgd(1.0),
      prompt_len=prompt_len, eos_id=eos, teacher_apply=teacher_apply,
      kd_weight=kd_w, divergence="reverse_kl"))
  state = _state(w)
  new_state, metrics = step(state, {"params": {"W": jnp.asarray(wt)}},
                            {"tokens": jnp.asarray(tokens)})
  mask = np_completion_mask(gen, prompt_len, eos)
  assert mask[0].sum() < L - prompt_len
  ref = lambda ww: np_loss(ww, wt, gen, mask, divergence="reverse_kl",  # noqa: E731
                           temperature=1.0, beta=0.5, ce_weight=1.0,
                           kd_weight=kd_w)
  _check_grad(state, new_state, ref, w, metrics)


@pytest.mark.parametrize("lmbda,seq_kd", [(0.0, False), (1.0, False),
                                          (0.0, True), (1.0, True)])
def test_gkd_step_matches_numpy(lmbda, seq_kd):
  w, wt = _weights(4)
  prompt_len, beta, temperature = 2, 0.4, 0.8
  tokens = np.random.default_rng(5).integers(0, V, (B, L))
  data_mask = np.random.default_rng(6).random((B, L)) < 0.8
  step = jax.jit(lm_steps.make_gkd_step(
      bigram_apply, teacher_apply, optax.sgd(1.0),
      student_generate=greedy_bigram_generate(L),
      teacher_generate=greedy_bigram_generate(L), prompt_len=prompt_len,
      lmbda=lmbda, beta=beta, loss_temperature=temperature, seq_kd=seq_kd,
      eos_id=None))
  state = _state(w)
  new_state, metrics = step(state, {"params": {"W": jnp.asarray(wt)}},
                            {"tokens": jnp.asarray(tokens),
                             "mask": jnp.asarray(data_mask)})
  prompts = tokens[:, :prompt_len]
  if lmbda == 1.0:
    text = np_greedy(w, prompts, L)
    mask = np_completion_mask(text, prompt_len, None)
  elif seq_kd:
    text = np_greedy(wt, prompts, L)
    mask = np_completion_mask(text, prompt_len, None)
  else:
    text = tokens
    mask = data_mask & (np.arange(L) >= prompt_len)
  assert float(metrics["on_policy"]) == lmbda

  def ref(ww):
    # Generated text is a constant of the loss (no gradient through sampling).
    return np_loss(ww, wt, text, mask, divergence="js_divergence",
                   temperature=temperature, beta=beta, ce_weight=0.0,
                   kd_weight=1.0)

  _check_grad(state, new_state, ref, w, metrics)


def test_gkd_mixes_on_and_off_policy_batches():
  w, wt = _weights(7)
  tokens = jnp.asarray(np.random.default_rng(8).integers(0, V, (B, L)))
  step = jax.jit(lm_steps.make_gkd_step(
      bigram_apply, teacher_apply, optax.sgd(0.0),
      student_generate=greedy_bigram_generate(L), prompt_len=2, lmbda=0.5))
  state = _state(w)
  teacher = {"params": {"W": jnp.asarray(wt)}}
  on = []
  losses = {}
  for _ in range(40):
    state, m = step(state, teacher, {"tokens": tokens})
    on.append(float(m["on_policy"]))
    losses.setdefault(on[-1], set()).add(round(float(m["loss"]), 5))
  assert 8 <= sum(on) <= 32  # Binomial(40, 0.5), fixed seed
  # Each branch is deterministic here (greedy, sgd(0)): one loss value each.
  assert len(losses[0.0]) == 1 and len(losses[1.0]) == 1
  assert losses[0.0] != losses[1.0]


def test_bad_arguments():
  with pytest.raises(ValueError, match="divergence must be one of"):
    lm_steps.make_lm_distill_step(bigram_apply, teacher_apply,
                                  optax.sgd(1.0), divergence="kl")
  with pytest.raises(ValueError, match="lmbda must be in"):
    lm_steps.make_gkd_step(bigram_apply, teacher_apply, optax.sgd(1.0),
                           student_generate=None, prompt_len=2, lmbda=2.0)
  with pytest.raises(ValueError, match="seq_kd=True needs teacher_generate"):
    lm_steps.make_gkd_step(bigram_apply, teacher_apply, optax.sgd(1.0),
                           student_generate=None, prompt_len=2, seq_kd=True)
  with pytest.raises(ValueError, match="fused=True needs student_head"):
    lm_steps.make_lm_distill_step(bigram_apply, teacher_apply,
                                  optax.sgd(1.0), fused=True)
  w, wt = _weights(0)
  step = lm_steps.make_seqkd_step(bigram_apply, greedy_bigram_generate(L - 1),
                                  optax.sgd(1.0), prompt_len=2)
  teacher = {"params": {"W": jnp.asarray(wt)}}
  tokens = jnp.zeros((B, L), jnp.int32)
  with pytest.raises(ValueError, match=r"teacher_generate returned shape "
                     r"\(3, 8\); the batch needs \(3, 9\)"):
    step(_state(w), teacher, {"tokens": tokens})
  with pytest.raises(ValueError, match="prompt_len must be an int in"):
    lm_steps.make_seqkd_step(bigram_apply, greedy_bigram_generate(L),
                             optax.sgd(1.0), prompt_len=L)(
                                 _state(w), teacher, {"tokens": tokens})
  with pytest.raises(KeyError, match="has no key 'tokens'"):
    step(_state(w), teacher, {"text": tokens})


def test_gkd_with_transformers_and_compiled_generation():
  from kd_jax.models import lm
  import flax.linen as nn
  cfg_t = lm.LMConfig(vocab_size=19, hidden_size=16, intermediate_size=32,
                      num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=16)
  cfg_s = lm.LMConfig(vocab_size=19, hidden_size=8, intermediate_size=16,
                      num_layers=1, num_heads=2, max_position_embeddings=16)
  teacher = lm.Transformer(cfg_t, dtype=jnp.float32)
  student = lm.Transformer(cfg_s, dtype=jnp.float32)
  x = jnp.zeros((2, 4), jnp.int32)
  tv = nn.unbox(teacher.init(jax.random.key(1), x))
  sv = nn.unbox(student.init(jax.random.key(2), x))
  prompt_len, new = 3, 5
  step = jax.jit(lm_steps.make_gkd_step(
      student, teacher, optax.adam(1e-2),
      student_generate=lm.make_generate_fn(student, max_new_tokens=new,
                                           temperature=0.9, eos_id=1),
      teacher_generate=lm.make_generate_fn(teacher, max_new_tokens=new,
                                           temperature=0.9, eos_id=1),
      prompt_len=prompt_len, lmbda=1.0, seq_kd=True, eos_id=1))
  state = create_train_state(sv, optax.adam(1e-2), rng=jax.random.key(3))
  batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(
      2, 19, (2, prompt_len + new)))}
  new_state, metrics = step(state, tv, batch)
  assert float(metrics["on_policy"]) == 1.0
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
  assert 0 < float(metrics["tokens"]) <= 2 * new
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params,
                         new_state.params)
  assert all(jax.tree.leaves(changed))


def test_eval_step_and_perplexity_against_numpy():
  w, _ = _weights(9)
  rng = np.random.default_rng(10)
  batches = [rng.integers(0, V, (B, L)) for _ in range(2)]
  masks = [rng.random((B, L)) < 0.6 for _ in range(2)]
  step = jax.jit(lm_steps.make_lm_eval_step(teacher_apply))
  sums = [step({"params": {"W": jnp.asarray(w)}},
               {"tokens": jnp.asarray(t), "mask": jnp.asarray(m)})
          for t, m in zip(batches, masks)]
  got = lm_steps.perplexity(sums)
  nll, n, correct = 0.0, 0, 0
  for t, m in zip(batches, masks):
    lp = np_log_softmax(w[t[:, :-1]])
    y, mm = t[:, 1:], m[:, 1:]
    nll += -(np.take_along_axis(lp, y[..., None], -1)[..., 0] * mm).sum()
    n += mm.sum()
    correct += ((lp.argmax(-1) == y) & mm).sum()
  np.testing.assert_allclose(got["perplexity"], np.exp(nll / n), rtol=1e-5)
  assert got["tokens"] == n and got["token_acc"] == correct / n


def test_teacher_topk_fn_against_numpy():
  _, wt = _weights(11)
  tokens = np.random.default_rng(12).integers(0, V, (B, L))
  fn = jax.jit(lm_steps.make_teacher_topk_fn(teacher_apply, k=3,
                                             temperature=2.0))
  lp, idx = fn({"params": {"W": jnp.asarray(wt)}}, jnp.asarray(tokens))
  ref = np_log_softmax(wt[tokens[:, :-1]] / 2.0)
  want_idx = np.argsort(-ref, axis=-1)[..., :3]
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(lp, np.take_along_axis(ref, want_idx, -1),
                             rtol=1e-5)


def _renormalized_topk_kl(s, lp, idx, *, temperature, tail, where):
  """KL(p~ || q~) over the k cached classes (a test-local top-k loss)."""
  del tail
  q = jax.nn.log_softmax(
      jnp.take_along_axis(s / temperature, idx, -1), axis=-1)
  p = jax.nn.log_softmax(lp, axis=-1)
  return jnp.where(where, jnp.sum(jnp.exp(p) * (p - q), -1), 0.0)


def _np_topk_loss(w, tokens, mask, lp, idx, temperature, ce_w, kd_w):
  x, y, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
  s = w[x]
  nll = -np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]
  q = np_log_softmax(np.take_along_axis(s / temperature, idx, -1))
  p = np_log_softmax(lp)
  kd = (np.exp(p) * (p - q)).sum(-1)
  return (ce_w * (nll * m).sum() + kd_w * (kd * m).sum()) / m.sum()


def test_topk_step_with_cached_teacher_matches_numpy():
  w, wt = _weights(13)
  rng = np.random.default_rng(14)
  tokens = rng.integers(0, V, (B, L))
  mask = rng.random((B, L)) < 0.8
  lp, idx = lm_steps.make_teacher_topk_fn(teacher_apply, k=4)(
      {"params": {"W": jnp.asarray(wt)}}, jnp.asarray(tokens))
  lp, idx = np.asarray(lp, np.float64), np.asarray(idx)
  step = jax.jit(lm_steps.make_lm_topk_step(
      bigram_apply, optax.sgd(1.0), topk_loss=_renormalized_topk_kl,
      temperature=1.5, ce_weight=0.3, kd_weight=1.0))
  state = _state(w)
  new_state, metrics = step(state, {
      "tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask),
      "teacher_topk_logprobs": jnp.asarray(lp, jnp.float32),
      "teacher_topk_indices": jnp.asarray(idx)})
  ref = lambda ww: _np_topk_loss(ww, tokens, mask, lp, idx, 1.5, 0.3, 1.0)  # noqa: E731
  _check_grad(state, new_state, ref, w, metrics)
  with pytest.raises(ValueError, match="teacher top-k arrays must be"):
    step(state, {"tokens": jnp.asarray(tokens),
                 "teacher_topk_logprobs": jnp.asarray(lp[:, :3], jnp.float32),
                 "teacher_topk_indices": jnp.asarray(idx[:, :3])})


def test_topk_step_default_loss_full_k_is_forward_kl():
  from kd_jax import losses
  w, wt = _weights(15)
  tokens = np.random.default_rng(16).integers(0, V, (B, L))
  mask = np.ones((B, L), bool)
  lp, idx = lm_steps.make_teacher_topk_fn(teacher_apply, k=V)(
      {"params": {"W": jnp.asarray(wt)}}, jnp.asarray(tokens))
  step = jax.jit(lm_steps.make_lm_topk_step(bigram_apply, optax.sgd(1.0)))
  state = _state(w)
  new_state, metrics = step(state, {"tokens": jnp.asarray(tokens),
                                    "teacher_topk_logprobs": lp,
                                    "teacher_topk_indices": idx})
  ref = lambda ww: np_loss(ww, wt, tokens, mask, divergence="forward_kl",  # noqa: E731
                           temperature=1.0, beta=0.5, ce_weight=0.0,
                           kd_weight=1.0)
  _check_grad(state, new_state, ref, w, metrics)


# --- fused-head path ----------------------------------------------------------

D = 5


def hidden_apply(variables, tokens, train=False, rngs=None, logits=True):
  """Embedding -> tanh hidden [B, T, D] -> head K [D, V] (a tiny LM)."""
  del train, rngs
  p = variables["params"]
  h = jnp.tanh(p["E"][tokens])
  return (h @ p["K"] if logits else None), {"hidden": h}


def hidden_teacher(variables, tokens, logits=True):
  return hidden_apply(variables, tokens, logits=logits)


def _hidden_params(seed):
  rng = np.random.default_rng(seed)
  return {"params": {"E": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
                     "K": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}}


def _reference_fused(h_s, k_s, h_t, k_t, *, divergence, beta, temperature,
                     where, labels, chunk_size):
  """Unfused stand-in with fused_head_divergence's contract."""
  del chunk_size
  names = {"jsd": "js_divergence", "tvd": "total_variation"}
  s, t = h_s @ k_s, h_t @ k_t
  kd = lm_steps.token_divergence(s, t, where,
                                 divergence=names.get(divergence, divergence),
                                 temperature=temperature, beta=beta)
  lse = jax.nn.logsumexp(s, -1)
  ce = jnp.where(where, lse - jnp.take_along_axis(s, labels[..., None],
                                                  -1)[..., 0], 0.0)
  return kd, ce


@pytest.mark.parametrize("use_library", [False, True])
def test_fused_step_equals_unfused(use_library):
  from kd_jax import losses
  sv, tv = _hidden_params(20), _hidden_params(21)
  rng = np.random.default_rng(22)
  tokens = jnp.asarray(rng.integers(0, V, (B, L)))
  mask = jnp.asarray(rng.random((B, L)) < 0.8)
  kw = dict(divergence="js_divergence", beta=0.3, temperature=1.5,
            ce_weight=0.4, kd_weight=1.0)
  head = lambda v: v["params"]["K"]  # noqa: E731
  plain = jax.jit(lm_steps.make_lm_distill_step(
      hidden_apply, hidden_teacher, optax.sgd(1.0), **kw))
  fused = jax.jit(lm_steps.make_lm_distill_step(
      hidden_apply, hidden_teacher, optax.sgd(1.0), fused=True,
      student_head=head, teacher_head=head, chunk_size=8,
      fused_loss=None if use_library else _reference_fused, **kw))
  state = create_train_state(sv, optax.sgd(1.0), rng=jax.random.key(0))
  batch = {"tokens": tokens, "mask": mask}
  s1, m1 = plain(state, tv, batch)
  s2, m2 = fused(state, tv, batch)
  # (the divergence's metric is keyed by its term label)
  for key in ("loss", "ce", "js_divergence", "tokens"):
    np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               s1.params, s2.params)


def test_vocab_mismatch_needs_vocab_size():
  w, _ = _weights(30)
  wt_wide = np.random.default_rng(31).normal(size=(V, V + 3))
  tokens = jnp.asarray(np.random.default_rng(32).integers(0, V, (B, L)))
  teacher = {"params": {"W": jnp.asarray(wt_wide)}}
  step = lm_steps.make_lm_distill_step(bigram_apply, teacher_apply,
                                       optax.sgd(1.0))
  with pytest.raises(ValueError, match=r"has 7 classes but `teacher_logits` "
                     r"has 10; pass `vocab_size=`"):
    step(_state(w), teacher, {"tokens": tokens})
  step = jax.jit(lm_steps.make_lm_distill_step(
      bigram_apply, teacher_apply, optax.sgd(1.0), vocab_size=V))
  state = _state(w)
  new_state, metrics = step(state, teacher, {"tokens": tokens})
  mask = np.ones((B, L), bool)
  ref = lambda ww: np_loss(ww, wt_wide[:, :V], np.asarray(tokens), mask,  # noqa: E731
                           divergence="forward_kl", temperature=1.0, beta=0.5,
                           ce_weight=0.0, kd_weight=1.0)
  _check_grad(state, new_state, ref, w, metrics)


def test_train_step_is_nll_against_numpy():
  w, _ = _weights(40)
  rng = np.random.default_rng(41)
  tokens = rng.integers(0, V, (B, L))
  mask = rng.random((B, L)) < 0.9
  step = jax.jit(lm_steps.make_lm_train_step(bigram_apply, optax.sgd(1.0)))
  state = _state(w)
  new_state, metrics = step(state, {"tokens": jnp.asarray(tokens),
                                    "mask": jnp.asarray(mask)})
  ref = lambda ww: np_loss(ww, ww, tokens, mask, divergence="forward_kl",  # noqa: E731
                           temperature=1.0, beta=0.5, ce_weight=1.0,
                           kd_weight=0.0)
  _check_grad(state, new_state, ref, w, metrics)
