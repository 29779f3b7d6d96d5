"""Teacher-mixed sampling (MiniLLM) in `kd_jax.models.lm.generate`, and the
host-side token-id check.

References: greedy mixed decoding is compared with a host loop that runs
both models *without* a KV cache on the whole sequence at every step and
takes the argmax of the float64 mixture of their softmaxes; sampling is
compared with the float64 mixture distribution of the first new token
(frequencies over many rows within 5 standard errors); ``mix_in_alpha`` 0
and 1 reproduce the student's and the teacher's own sampling.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import lm

V = 16


def _model(seed, *, hidden=16, layers=1, vocab=V, init=0.5):
  cfg = lm.LMConfig(vocab_size=vocab, hidden_size=hidden,
                    intermediate_size=2 * hidden, num_layers=layers,
                    num_heads=2, max_position_embeddings=32,
                    initializer_range=init)
  model = lm.Transformer(cfg, dtype=jnp.float32)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed),
                                           jnp.zeros((1, 4), jnp.int32)))
  return model, variables


@pytest.fixture(scope="module")
def pair():
  return _model(0), _model(1, hidden=32)


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_greedy_mixture_matches_uncached_host_loop(pair):
  (s, sv), (t, tv) = pair
  prompts = np.random.default_rng(0).integers(0, V, (3, 4))
  alpha, new = 0.4, 5
  got = lm.generate(s, sv, prompts, max_new_tokens=new, mix_in_model=t,
                    mix_in_variables=tv, mix_in_alpha=alpha)
  seq = prompts.copy()
  s_apply, t_apply = jax.jit(s.apply), jax.jit(t.apply)
  for _ in range(new):
    zs = s_apply(sv, jnp.asarray(seq))[0][:, -1]
    zt = t_apply(tv, jnp.asarray(seq))[0][:, -1]
    mix = (1 - alpha) * _np_softmax(zs) + alpha * _np_softmax(zt)
    seq = np.concatenate([seq, mix.argmax(-1)[:, None]], axis=1)
  np.testing.assert_array_equal(got, seq)
  # The mixture is not one of the two models' own greedy decodes.
  own = [lm.generate(m, v, prompts, max_new_tokens=new)
         for m, v in ((s, sv), (t, tv))]
  assert not all(np.array_equal(got, o) for o in own)


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_follows_the_mixture(pair, top_k):
  (s, sv), (t, tv) = pair
  n, alpha, temp = 4000, 0.3, 0.7
  prompt = np.random.default_rng(1).integers(0, V, (1, 5))
  prompts = np.repeat(prompt, n, axis=0)
  out = lm.generate(s, sv, prompts, max_new_tokens=1, temperature=temp,
                    top_k=top_k, rng=jax.random.key(2), mix_in_model=t,
                    mix_in_variables=tv, mix_in_alpha=alpha)
  freq = np.bincount(np.asarray(out[:, -1]), minlength=V) / n

  def warped(model, variables):
    z = np.asarray(model.apply(variables, jnp.asarray(prompt))[0][0, -1],
                   np.float64) / temp
    if top_k is not None:
      z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    return _np_softmax(z)

  p = (1 - alpha) * warped(s, sv) + alpha * warped(t, tv)
  tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-9
  np.testing.assert_array_less(np.abs(freq - p), tol)
  if top_k is not None:  # only the union of both top-k sets is sampled
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p))


def test_alpha_endpoints_are_the_two_models(pair):
  (s, sv), (t, tv) = pair
  prompts = np.random.default_rng(3).integers(0, V, (8, 3))
  kw = dict(max_new_tokens=4, temperature=1.0, rng=jax.random.key(4))
  mixed = lambda a: lm.generate(s, sv, prompts, mix_in_model=t,
                                mix_in_variables=tv, mix_in_alpha=a, **kw)
  student = lm.generate(s, sv, prompts, **kw)
  teacher = lm.generate(t, tv, prompts, **kw)
  assert not np.array_equal(student, teacher)
  np.testing.assert_array_equal(mixed(0.0), student)
  np.testing.assert_array_equal(mixed(1.0), teacher)


def test_mixed_generate_fn_inside_jit_with_eos(pair):
  (s, sv), (t, tv) = pair
  fn = lm.make_generate_fn(s, max_new_tokens=6, temperature=1.0, eos_id=3,
                           mix_in_model=t, mix_in_alpha=0.2)
  prompts = jnp.asarray(np.random.default_rng(5).integers(4, V, (16, 3)))
  out = jax.jit(fn)(sv, prompts, jax.random.key(6), tv)
  direct = lm.generate(s, sv, prompts, max_new_tokens=6, temperature=1.0,
                       eos_id=3, rng=jax.random.key(6), mix_in_model=t,
                       mix_in_variables=tv, mix_in_alpha=0.2)
  np.testing.assert_array_equal(out, direct)
  gen = np.asarray(out[:, 3:])
  for row in gen:  # after the first EOS, only EOS (the default pad)
    hits = np.flatnonzero(row == 3)
    if hits.size:
      assert (row[hits[0]:] == 3).all()


def test_token_ids_out_of_range_are_one_error(pair):
  (s, sv), (t, tv) = pair
  big, _ = _model(0, vocab=256)
  with pytest.raises(ValueError, match=r"prompt_tokens: token id 300 is "
                     r"outside the model's vocabulary \[0, 256\)"):
    lm.generate(big, _model(0, vocab=256)[1], np.array([[1, 2, 300]]),
                max_new_tokens=2)
  with pytest.raises(ValueError, match="token id -1"):
    lm.generate(s, sv, jnp.array([[1, -1, 2]]), max_new_tokens=2)
  with pytest.raises(ValueError, match="token id 16 "):
    lm.check_token_ids(np.array([[0, 16]]), V)
  lm.check_token_ids(np.array([[0, 15]]), V)  # in range: no error


def test_mixing_argument_errors(pair):
  (s, sv), (t, tv) = pair
  p = np.zeros((1, 3), np.int32)
  with pytest.raises(ValueError, match="together"):
    lm.generate(s, sv, p, max_new_tokens=1, mix_in_model=t, mix_in_alpha=0.2)
  with pytest.raises(ValueError, match=r"mix_in_alpha must be in \[0, 1\]"):
    lm.generate(s, sv, p, max_new_tokens=1, mix_in_model=t,
                mix_in_variables=tv, mix_in_alpha=1.5)
  other, ov = _model(2, vocab=V + 1)
  with pytest.raises(ValueError, match="one vocabulary"):
    lm.generate(s, sv, p, max_new_tokens=1, mix_in_model=other,
                mix_in_variables=ov, mix_in_alpha=0.2)
  with pytest.raises(ValueError, match="together"):
    lm.make_generate_fn(s, max_new_tokens=1, mix_in_model=t)
