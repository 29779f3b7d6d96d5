"""Intermediate-layer distillation for language models: TinyBERT hidden
states and MiniLM / MiniLMv2 self-attention relations.

The losses are checked against float64 NumPy transcriptions of the papers'
equations written with explicit loops (per relation head, per query
position, causal keys), their gradients against finite differences, the
'qk' relation against the model's own grouped-query attention (keys of a
KV head shared by its query heads, as Hugging Face's ``repeat_kv``), and
the distillers end to end (layer map, projection) against NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import distillers
from kd_jax import losses
from kd_jax.distillers import minilm as minilm_lib
from kd_jax.losses import transformer as tf_losses
from kd_jax.models import lm
from kd_jax.train import TermInputs

jax.config.update("jax_enable_x64", False)


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_relation_kl(sa, sb, ta, tb, heads, where=None):
  """Per-query mean over relation heads of KL(A_t || A_s), causal, loops."""
  b, t, _ = sa.shape
  out = np.zeros((b, t))
  for x in range(b):
    for i in range(t):
      kl = 0.0
      for r in range(heads):
        rel = []
        for a, bb in ((sa, sb), (ta, tb)):
          d = a.shape[-1] // heads
          qa = a[x, i, r * d:(r + 1) * d]
          keys = bb[x, :i + 1, r * d:(r + 1) * d]
          rel.append(np_softmax(keys @ qa / np.sqrt(d)))
        ps, pt = rel
        kl += np.sum(pt * (np.log(pt) - np.log(ps)))
      out[x, i] = kl / heads
  return out if where is None else np.where(where, out, 0.0)


@pytest.mark.parametrize("ds,dt,heads", [(8, 8, 2), (8, 12, 4), (6, 12, 3)])
def test_attention_relation_loss_against_numpy(ds, dt, heads):
  rng = np.random.default_rng(ds + dt)
  sa, sb = rng.normal(size=(2, 2, 5, ds))
  ta, tb = rng.normal(size=(2, 2, 5, dt))
  where = rng.random((2, 5)) < 0.7
  got = losses.attention_relation_loss(sa, sb, ta, tb,
                                       num_relation_heads=heads,
                                       where=jnp.asarray(where))
  want = np_relation_kl(sa, sb, ta, tb, heads, where)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
  # Same relations -> 0; the teacher is a constant (no gradient).
  same = losses.attention_relation_loss(ta, tb, ta, tb,
                                        num_relation_heads=heads)
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
  g = jax.grad(lambda t: jnp.sum(losses.attention_relation_loss(
      jnp.asarray(sa), jnp.asarray(sb), t, t, num_relation_heads=heads)))(
          jnp.asarray(ta))
  assert float(jnp.abs(g).max()) == 0.0


def test_attention_relation_gradient_against_finite_differences():
  rng = np.random.default_rng(3)
  sa = rng.normal(size=(1, 4, 6))
  ta = rng.normal(size=(1, 4, 6))
  f = lambda s: jnp.sum(losses.attention_relation_loss(  # noqa: E731
      s, s, jnp.asarray(ta), jnp.asarray(ta), num_relation_heads=2))
  g = np.asarray(jax.grad(f)(jnp.asarray(sa, jnp.float32)))
  eps, num = 1e-3, np.zeros_like(sa)
  for idx in np.ndindex(sa.shape):
    e = np.zeros_like(sa)
    e[idx] = eps
    num[idx] = (np_relation_kl(sa + e, sa + e, ta, ta, 2).sum()
                - np_relation_kl(sa - e, sa - e, ta, ta, 2).sum()) / (2 * eps)
  np.testing.assert_allclose(g, num, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_against_numpy(kind):
  rng = np.random.default_rng(7)
  s, t = rng.normal(size=(2, 2, 5, 6))
  where = rng.random((2, 5)) < 0.6
  got = losses.hidden_state_loss(s, t, kind=kind, where=jnp.asarray(where))
  if kind == "mse":
    want = ((s - t) ** 2).mean(-1)
  else:
    want = 1 - (s * t).sum(-1) / (np.linalg.norm(s, axis=-1)
                                  * np.linalg.norm(t, axis=-1))
  np.testing.assert_allclose(np.asarray(got), np.where(where, want, 0),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="project the student first"):
    losses.hidden_state_loss(s, t[..., :3])


def _models(capture=("hidden_states", "attention")):
  cs = lm.LMConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                   num_layers=2, num_heads=2, num_kv_heads=1)
  ct = lm.LMConfig(vocab_size=40, hidden_size=24, intermediate_size=48,
                   num_layers=4, num_heads=4, num_kv_heads=2)
  ms = lm.Transformer(cs, dtype=jnp.float32, capture=capture)
  mt = lm.Transformer(ct, dtype=jnp.float32, capture=capture)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 6)))
  vs, vt = ms.init(jax.random.key(0), x), mt.init(jax.random.key(1), x)
  (ls, fs), (lt, ft) = ms.apply(vs, x), mt.apply(vt, x)
  where = jnp.asarray(np.random.default_rng(1).random((2, 6)) < 0.8)
  return TermInputs(ls, x, teacher_logits=lt, student_features=fs,
                    teacher_features=ft, where=where), fs, ft, where


def test_captured_features_and_qk_relation_is_the_models_attention():
  """'qk' with R = heads reproduces the model's causal GQA probabilities."""
  inputs, fs, ft, _ = _models()
  assert len(ft["hidden_states"]) == 5 and len(ft["attention"]) == 4
  att = ft["attention"][2]
  q, k = np.asarray(att["q"], np.float64), np.asarray(att["k"], np.float64)
  a, b, heads = minilm_lib._vectors(att, "qk")  # pylint: disable=protected-access
  logp = tf_losses._relation_logprobs(  # pylint: disable=protected-access
      jnp.asarray(a), jnp.asarray(b), heads, True)
  dh, group = q.shape[-1], q.shape[2] // k.shape[2]
  for h in range(q.shape[2]):
    kv = h // group   # the KV head of query head h (HF `repeat_kv`)
    for i in range(q.shape[1]):
      want = np_softmax(k[0, :i + 1, kv] @ q[0, i, h] / np.sqrt(dh))
      np.testing.assert_allclose(np.exp(np.asarray(logp[0, h, i, :i + 1])),
                                 want, rtol=1e-4, atol=1e-6)
  # The final block's output is the last hidden state before the norm.
  np.testing.assert_array_equal(fs["hidden_states"][-1], fs["stages"][-1])


def _token_mean(x, where):
  return float(np.sum(np.where(where, x, 0)) / max(np.sum(where), 1))


def test_tinybert_uniform_map_with_projection_against_numpy():
  inputs, fs, ft, where = _models()
  d = distillers.create("tinybert", layers="uniform", embeddings=True)
  params, state = d.init(jax.random.key(0), inputs)
  assert sorted(params) == ["proj_0", "proj_1", "proj_2"]  # 16 -> 24 wide
  value, _ = d(params, state, inputs)
  want = 0.0
  for i, (m, n) in enumerate(((0, 0), (1, 2), (2, 4))):  # g(m) = 2m
    w = np.asarray(params[f"proj_{i}"]["kernel"], np.float64)
    s = np.asarray(fs["hidden_states"][m], np.float64) @ w
    t = np.asarray(ft["hidden_states"][n], np.float64)
    want += _token_mean(((s - t) ** 2).mean(-1), np.asarray(where))
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  # The projections get gradients (they are trained with the student).
  g = jax.grad(lambda p: d(p, state, inputs)[0])(params)
  assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g))


def test_minilm_v2_relations_with_different_heads_against_numpy():
  inputs, fs, ft, where = _models()
  d = distillers.create("minilm", relations=("qq", "kk", "vv"),
                        num_relation_heads=2, layers=[(1, 2), (-1, -1)])
  params, state = d.init(jax.random.key(0), inputs)
  value, _ = d(params, state, inputs)
  want = 0.0
  for m, n in ((1, 2), (2, 4)):
    for key in "qkv":
      sx = np.asarray(fs["attention"][m - 1][key], np.float64)
      tx = np.asarray(ft["attention"][n - 1][key], np.float64)
      sx, tx = sx.reshape(2, 6, -1), tx.reshape(2, 6, -1)
      want += _token_mean(np_relation_kl(sx, sx, tx, tx, 2),
                          np.asarray(where))
  # (float32 sums of KLs ~1e-4: the float32 rounding floor is ~1e-7)
  np.testing.assert_allclose(float(value), want, rtol=1e-4, atol=2e-7)
  with pytest.raises(ValueError, match="set num_relation_heads"):
    distillers.create("minilm").init(jax.random.key(0), inputs)
  with pytest.raises(ValueError, match="out of range"):
    distillers.create("minilm", layers=[(3, 1)], relations=("vv",),
                      num_relation_heads=1).init(jax.random.key(0), inputs)


# One entry per registered language-model method (`lm_features`): its
# constructor arguments on the models above.
LM_CASES = {
    "tinybert": {"layers": "uniform"},
    "minilm": {"relations": ("qq", "kk", "vv"), "num_relation_heads": 2},
}


def test_every_registered_lm_distiller_has_a_case():
  lm_methods = sorted(n for n in distillers.available()
                      if getattr(distillers.registry()[n], "lm_features", ()))
  assert sorted(LM_CASES) == lm_methods


@pytest.mark.parametrize("name", sorted(LM_CASES))
def test_lm_distiller_trains_its_student(name):
  """Init on real features, a few gradient steps on the distiller loss
  alone (student and projections), the loss goes down."""
  import optax
  inputs, fs, ft, where = _models(distillers.registry()[name].lm_features)
  cs = lm.LMConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                   num_layers=2, num_heads=2, num_kv_heads=1)
  ms = lm.Transformer(cs, dtype=jnp.float32,
                      capture=distillers.registry()[name].lm_features)
  x = inputs.labels
  d = distillers.create(name, **LM_CASES[name])
  params, state = d.init(jax.random.key(0), inputs)
  sv = ms.init(jax.random.key(0), x)
  tx = optax.adam(1e-2)
  trainable = {"s": sv, "d": params}
  opt = tx.init(trainable)

  def loss_fn(tr):
    _, f = ms.apply(tr["s"], x)
    return d(tr["d"], state, TermInputs(
        inputs.student_logits, x, student_features=f,
        teacher_features=ft, where=where))[0]

  vals = []
  for _ in range(5):
    v, g = jax.value_and_grad(loss_fn)(trainable)
    upd, opt = tx.update(g, opt, trainable)
    trainable = optax.apply_updates(trainable, upd)
    vals.append(float(v))
  assert np.all(np.isfinite(vals)) and vals[-1] < vals[0], vals
