"""Tests for kd_jax.losses.tokens: fused LM-head divergences, top-k KD, and
the `vocab_size=` handling of the divergences.

Values are compared with float64 NumPy transcriptions on the *materialized*
logits `h @ W + b`, gradients with float64 NumPy analytic gradients (forward
KL, cross-entropy), float64 materialized JAX gradients and float64 central
finite differences.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax import losses
from loss_testing import assert_close_to_reference, jcall
from test_losses_divergences import (np_forward_kl, np_generalized_jsd,
                                     np_log_softmax, np_reverse_kl,
                                     np_total_variation)

NP_DIVS = {
    "forward_kl": np_forward_kl,
    "reverse_kl": np_reverse_kl,
    "jsd": functools.partial(np_generalized_jsd, beta=0.5),
    "tvd": np_total_variation,
}
MAT_DIVS = {
    "forward_kl": losses.forward_kl,
    "reverse_kl": losses.reverse_kl,
    "jsd": functools.partial(losses.js_divergence, beta=0.5),
    "tvd": losses.total_variation,
}


def heads(seed, lead, ds, dt, v, bias=True):
  """Random student/teacher heads; logits have std ~2."""
  r = np.random.default_rng(seed)
  f = lambda *s: r.standard_normal(s).astype(np.float32)
  hs, ht = f(*lead, ds), f(*lead, dt)
  ws = (2 * f(ds, v) / np.sqrt(ds)).astype(np.float32)
  wt = (2 * f(dt, v) / np.sqrt(dt)).astype(np.float32)
  bs = f(v) if bias else None
  bt = f(v) if bias else None
  mask = r.random(lead) < 0.7
  labels = r.integers(0, v, lead).astype(np.int32)
  return dict(hs=hs, ws=ws, bs=bs, ht=ht, wt=wt, bt=bt, mask=mask,
              labels=labels)


def np_logits(h, w, b, dtype):
  out = np.asarray(h, dtype) @ np.asarray(w, dtype)
  return out if b is None else out + np.asarray(b, dtype)


def np_ce(s, labels, dtype=np.float64):
  s = np.asarray(s, dtype)
  return -np.take_along_axis(np_log_softmax(s), labels[..., None], -1)[..., 0]


def fused(x, divergence="forward_kl", **kw):
  return losses.fused_head_divergence(
      x["hs"], x["ws"], x["ht"], x["wt"], divergence=divergence,
      student_bias=x["bs"], teacher_bias=x["bt"], **kw)


# ---------------------------------------------------------------------------
# Fused head divergence: values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", sorted(NP_DIVS))
@pytest.mark.parametrize("lead,chunk,temperature,masked", [
    ((2, 5), 4, 1.0, True),      # chunk does not divide N = 10
    ((13,), 1024, 2.0, False),   # one chunk (chunk > N)
    ((3, 2, 3), 5, 0.5, True),   # three leading dims, padded last chunk
])
def test_fused_values_match_numpy(divergence, lead, chunk, temperature, masked):
  x = heads(0, lead, 6, 9, 40)
  mask = x["mask"] if masked else None
  got = jcall(fused, x, divergence=divergence, temperature=temperature, where=mask,
              chunk_size=chunk)
  assert got.dtype == jnp.float32 and got.shape == lead

  def ref(dt):
    s = np_logits(x["hs"], x["ws"], x["bs"], dt)
    t = np_logits(x["ht"], x["wt"], x["bt"], dt)
    out = NP_DIVS[divergence](s, t, temperature=temperature, dtype=dt)
    return out if mask is None else np.where(mask, out, 0)
  assert_close_to_reference(got, ref)


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])
def test_fused_labels_give_divergence_and_cross_entropy(divergence):
  x = heads(1, (3, 4), 5, 7, 30)
  div, ce = jcall(fused, x, divergence=divergence, temperature=2.0, where=x["mask"],
                  labels=x["labels"], chunk_size=5)
  assert div.shape == ce.shape == (3, 4) and ce.dtype == jnp.float32
  s = lambda dt: np_logits(x["hs"], x["ws"], x["bs"], dt)
  t = lambda dt: np_logits(x["ht"], x["wt"], x["bt"], dt)
  assert_close_to_reference(div, lambda dt: np.where(
      x["mask"], NP_DIVS[divergence](s(dt), t(dt), temperature=2.0, dtype=dt), 0))
  # Cross-entropy at temperature 1 regardless of `temperature`.
  assert_close_to_reference(ce, lambda dt: np.where(
      x["mask"], np_ce(s(dt), x["labels"], dt), 0))


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_fused_jsd_beta_endpoints(beta):
  x = heads(2, (9,), 4, 4, 16)
  got = jcall(fused, x, divergence="jsd", beta=beta, chunk_size=4)
  assert_close_to_reference(got, lambda dt: np_generalized_jsd(
      np_logits(x["hs"], x["ws"], x["bs"], dt),
      np_logits(x["ht"], x["wt"], x["bt"], dt), beta, 1.0, dtype=dt))


def test_fused_bfloat16_inputs_compute_in_float32():
  x = heads(3, (4, 3), 8, 8, 24)
  xb = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("hs", "ws", "ht", "wt")
            else v) for k, v in x.items()}
  got = jcall(fused, xb, where=x["mask"], chunk_size=5)
  assert got.dtype == jnp.float32
  # Reference on the bf16-rounded inputs, in float64: the products of bf16
  # numbers are exact in float32, so only the float32 sums round.
  r = {k: np.asarray(v, np.float32) for k, v in xb.items()
       if k in ("hs", "ws", "ht", "wt")}
  ref = np.where(x["mask"], np_forward_kl(
      np_logits(r["hs"], r["ws"], x["bs"], np.float64),
      np_logits(r["ht"], r["wt"], x["bt"], np.float64), 1.0), 0)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  g = jax.jit(jax.grad(lambda w: jnp.sum(fused({**xb, "ws": w},
                                               chunk_size=5))))(xb["ws"])
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, float)))


def test_masked_tokens_are_zero_with_finite_gradients_despite_nan():
  x = heads(4, (2, 6), 5, 5, 20)
  mask = x["mask"]
  hs = np.where(mask[..., None], x["hs"], np.nan).astype(np.float32)
  ht = np.where(mask[..., None], x["ht"], np.inf).astype(np.float32)
  y = {**x, "hs": hs, "ht": ht}

  def f(hs, ws, bs):
    div, ce = fused({**y, "hs": hs, "ws": ws, "bs": bs}, where=mask,
                    labels=x["labels"], chunk_size=4)
    return jnp.sum(div + ce), (div, ce)
  (val, (div, ce)), grads = jax.jit(jax.value_and_grad(
      f, argnums=(0, 1, 2), has_aux=True))(hs, x["ws"], x["bs"])
  assert np.isfinite(val)
  assert np.all(np.asarray(div)[~mask] == 0) and np.all(np.asarray(ce)[~mask] == 0)
  for g in grads:
    assert np.all(np.isfinite(g))
  assert np.all(np.asarray(grads[0])[~mask] == 0)


# ---------------------------------------------------------------------------
# Fused head divergence: gradients.
# ---------------------------------------------------------------------------


def np_fkl_ce_grads(x, g_div, g_ce, temperature):
  """float64 analytic grads of sum(g_div * KL_T + g_ce * CE) w.r.t. h, W, b.

  d KL(p || q_T) / d s = (q_T - p_T) / T; d CE / d s = softmax(s) - onehot.
  """
  s = np_logits(x["hs"], x["ws"], x["bs"], np.float64)
  t = np_logits(x["ht"], x["wt"], x["bt"], np.float64)
  q_t = np.exp(np_log_softmax(s / temperature))
  p_t = np.exp(np_log_softmax(t / temperature))
  onehot = np.eye(s.shape[-1])[x["labels"]]
  a = (g_div[..., None] * (q_t - p_t) / temperature
       + g_ce[..., None] * (np.exp(np_log_softmax(s)) - onehot))
  a = np.where(x["mask"][..., None], a, 0)
  h = np.asarray(x["hs"], np.float64)
  dh = a @ np.asarray(x["ws"], np.float64).T
  a2 = a.reshape(-1, a.shape[-1])
  dw = h.reshape(-1, h.shape[-1]).T @ a2
  return dh, dw, a2.sum(0)


@pytest.mark.parametrize("uniform", [True, False])
def test_fused_grads_match_numpy_analytic(uniform):
  """Uniform cotangent (mean-style reduction) and per-token weights."""
  x = heads(5, (3, 5), 6, 4, 33)
  r = np.random.default_rng(6)
  count = x["mask"].sum()
  if uniform:
    g_div = np.full((3, 5), 0.7 / count)
    g_ce = np.full((3, 5), 0.3 / count)
  else:
    g_div, g_ce = r.random((3, 5)), r.random((3, 5))

  def f(hs, ws, bs):
    div, ce = fused({**x, "hs": hs, "ws": ws, "bs": bs}, temperature=2.0,
                    where=x["mask"], labels=x["labels"], chunk_size=4)
    if uniform:  # the common reduction: masked mean
      m = x["mask"]
      return jnp.sum(jnp.where(m, 0.7 * div + 0.3 * ce, 0.0)) / jnp.sum(m)
    return jnp.sum(g_div * div + g_ce * ce)
  got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x["hs"], x["ws"], x["bs"])
  for g, ref in zip(got, np_fkl_ce_grads(x, g_div, g_ce, 2.0)):
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * scale)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("divergence", sorted(NP_DIVS))
def test_fused_grads_match_materialized_float64(x64, divergence):
  """float32 fused grads vs the float64 materialized computation."""
  x = heads(7, (2, 7), 5, 6, 25)
  w = np.random.default_rng(8).random((2, 7))

  def loss(hs, ws, bs, use_fused):
    if use_fused:
      d = fused({**x, "hs": hs, "ws": ws, "bs": bs}, divergence,
                temperature=1.5, where=x["mask"], chunk_size=3)
    else:
      s = hs @ ws + bs
      t = jnp.asarray(x["ht"], hs.dtype) @ x["wt"] + x["bt"]
      d = MAT_DIVS[divergence](s, t, temperature=1.5, where=x["mask"])
    return jnp.sum(w * d), jnp.mean(d)
  args32 = (x["hs"], x["ws"], x["bs"])
  args64 = tuple(np.asarray(a, np.float64) for a in args32)
  for which in (0, 1):  # per-token weights, then a plain mean
    fn = lambda *a, fz: loss(*a, fz)[which]
    got = jax.jit(jax.grad(functools.partial(fn, fz=True), (0, 1, 2)))(*args32)
    ref = jax.jit(jax.grad(functools.partial(fn, fz=False), (0, 1, 2)))(*args64)
    for g, r in zip(got, ref):
      assert g.dtype == jnp.float32
      np.testing.assert_allclose(g, r, rtol=1e-5,
                                 atol=1e-6 * np.max(np.abs(r)))


@pytest.mark.parametrize("divergence,beta", [
    ("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
def test_fused_directional_finite_differences(x64, divergence, beta):
  """d/de f(W + e D) by central differences vs <grad f, D> (all in float64)."""
  x = heads(9, (11,), 4, 5, 12)
  x = {k: (np.asarray(v, np.float64) if v.dtype == np.float32 else v)
       for k, v in x.items()}
  w = np.random.default_rng(10).random(11)
  r = np.random.default_rng(11)

  def f(hs, ws, bs):
    div, ce = fused({**x, "hs": hs, "ws": ws, "bs": bs}, divergence,
                    beta=beta, temperature=1.3, where=x["mask"],
                    labels=x["labels"], chunk_size=4)
    assert div.dtype == jnp.float64
    return jnp.sum(w * div + 0.5 * ce)
  primal = (x["hs"], x["ws"], x["bs"])
  grads = jax.jit(jax.grad(f, (0, 1, 2)))(*primal)
  fj = jax.jit(f)
  for _ in range(2):
    dirs = [r.standard_normal(p.shape) for p in primal]
    eps = 1e-5
    plus = fj(*[p + eps * d for p, d in zip(primal, dirs)])
    minus = fj(*[p - eps * d for p, d in zip(primal, dirs)])
    fd = (plus - minus) / (2 * eps)
    an = sum(np.sum(g * d) for g, d in zip(grads, dirs))
    np.testing.assert_allclose(an, fd, rtol=1e-6)


def test_fused_grad_w_r_t_one_argument_only():
  x = heads(12, (10,), 4, 4, 16)
  mean = lambda **kw: jnp.mean(fused({**x, **kw}, chunk_size=4))
  g_h = jax.jit(jax.grad(lambda h: mean(hs=h)))(x["hs"])
  g_w = jax.jit(jax.grad(lambda w: mean(ws=w)))(x["ws"])
  g_all = jax.jit(jax.grad(lambda h, w: mean(hs=h, ws=w), (0, 1)))(
      x["hs"], x["ws"])
  np.testing.assert_allclose(g_h, g_all[0], rtol=1e-6)
  np.testing.assert_allclose(g_w, g_all[1], rtol=1e-6)
  # The teacher gets no gradient.
  g_t = jax.grad(lambda w: mean(wt=w))(x["wt"])
  assert np.all(np.asarray(g_t) == 0)


def test_fused_under_vmap_matches_leading_dims():
  """vmap over a batch axis (cond becomes select: both gradient branches)."""
  x = heads(27, (3, 6), 4, 5, 10)
  wts = np.arange(6.0)
  f = lambda h, t, w: losses.fused_head_divergence(h, w, t, x["wt"],
                                                   chunk_size=4)
  vf = jax.vmap(f, in_axes=(0, 0, None))
  for weights in (1.0, wts):  # uniform and per-token cotangents
    g_v = jax.jit(jax.grad(lambda w: jnp.sum(weights * vf(
        x["hs"], x["ht"], w))))(x["ws"])
    g_1 = jax.jit(jax.grad(lambda w: jnp.sum(weights * f(
        x["hs"], x["ht"], w))))(x["ws"])
    np.testing.assert_allclose(g_v, g_1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Data-parallel: jit over sharded tokens and shard_map (each device its tokens).
# ---------------------------------------------------------------------------


def test_fused_under_shard_map_and_sharded_jit():
  n_dev = jax.device_count()
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x = heads(13, (2 * n_dev, 3), 4, 6, 20)

  def per_device(hs, ht, mask, ws, wt):
    d = losses.fused_head_divergence(hs, ws, ht, wt, where=mask, chunk_size=4)
    return d

  sm = jax.shard_map(per_device, mesh=mesh,
                     in_specs=(P("data"), P("data"), P("data"), P(), P()),
                     out_specs=P("data"))

  weights = np.random.default_rng(26).random(x["mask"].shape)

  def loss(ws, use_sm, weighted):
    f = sm if use_sm else per_device
    d = f(x["hs"], x["ht"], x["mask"], ws, x["wt"])
    w = weights if weighted else 1.0  # per-token weights: the second pass
    return jnp.sum(w * d) / jnp.sum(x["mask"]), d
  for weighted in (False, True):
    (v_sm, d_sm), g_sm = jax.jit(jax.value_and_grad(functools.partial(
        loss, use_sm=True, weighted=weighted), has_aux=True))(x["ws"])
    (v_1, d_1), g_1 = jax.jit(jax.value_and_grad(functools.partial(
        loss, use_sm=False, weighted=weighted), has_aux=True))(x["ws"])
    np.testing.assert_allclose(d_sm, d_1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g_sm, g_1, rtol=1e-5, atol=1e-7)
  ref = np.where(x["mask"], np_forward_kl(
      np_logits(x["hs"], x["ws"], None, np.float64),
      np_logits(x["ht"], x["wt"], None, np.float64), 1.0), 0)
  np.testing.assert_allclose(d_sm, ref, rtol=1e-5, atol=1e-6)
  # Plain jit with the tokens sharded over the mesh.
  shard = NamedSharding(mesh, P("data"))
  args = [jax.device_put(a, shard) for a in (x["hs"], x["ht"], x["mask"])]
  d_jit = jax.jit(per_device)(*args, x["ws"], x["wt"])
  np.testing.assert_allclose(d_jit, d_1, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Vocabulary mismatch.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MAT_DIVS))
def test_divergences_vocab_size(name):
  fn = MAT_DIVS[name]
  r = np.random.default_rng(14)
  s = r.standard_normal((4, 30)).astype(np.float32)
  t = r.standard_normal((4, 26)).astype(np.float32)
  with pytest.raises(ValueError, match="30 classes.*has 26.*vocab_size"):
    fn(s, t)
  got = jcall(fn, s, t, vocab_size=24)
  np_ref = NP_DIVS[name]
  assert_close_to_reference(
      got, lambda dt: np_ref(s[:, :24], t[:, :24], temperature=1.0, dtype=dt))
  g = jax.grad(lambda z: jnp.sum(fn(z, t, vocab_size=24)))(s)
  assert np.all(np.asarray(g)[:, 24:] == 0)
  with pytest.raises(ValueError, match="vocab_size`=27 exceeds the 26"):
    fn(s, t, vocab_size=27)
  with pytest.raises(ValueError, match="positive Python int"):
    fn(s, t, vocab_size=0)


def test_fused_vocab_size_with_padded_heads():
  x = heads(15, (7,), 4, 5, 40)
  xt = {**x, "wt": x["wt"][:, :36], "bt": x["bt"][:36]}
  with pytest.raises(ValueError, match="`student_kernel` has 40 classes but "
                     "`teacher_kernel` has 36"):
    fused(xt)
  got = jcall(fused, xt, vocab_size=33, chunk_size=3)
  assert_close_to_reference(got, lambda dt: np_forward_kl(
      np_logits(x["hs"], x["ws"][:, :33], x["bs"][:33], dt),
      np_logits(x["ht"], x["wt"][:, :33], x["bt"][:33], dt), 1.0, dtype=dt))
  g = jax.grad(lambda w: jnp.mean(fused({**xt, "ws": w}, vocab_size=33,
                                        chunk_size=3)))(x["ws"])
  assert np.all(np.asarray(g)[:, 33:] == 0)


# ---------------------------------------------------------------------------
# Top-k (sparse teacher) KD.
# ---------------------------------------------------------------------------


def np_topk_kd(s, lp, idx, temperature, tail, dtype=np.float64):
  """Direct transcription: tails as 1 - sum of the k probabilities."""
  s, lp = np.asarray(s, dtype), np.asarray(lp, dtype)
  log_q = np_log_softmax(s / dtype(temperature))
  q_k = np.exp(np.take_along_axis(log_q, idx, -1))
  p_k = np.exp(lp)
  pt, qt = p_k / p_k.sum(-1, keepdims=True), q_k / q_k.sum(-1, keepdims=True)
  if tail == "renormalize":
    return np.sum(pt * np.log(pt / qt), -1)
  if tail == "ignore":
    return np.sum(pt * np.log(pt / q_k), -1)
  p_r, q_r = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
  tail_term = np.where(p_r > 0, p_r * np.log(np.maximum(p_r, 1e-300) / q_r), 0)
  return np.sum(p_k * np.log(p_k / q_k), -1) + tail_term


def topk_inputs(seed, lead, v, k, temperature=1.0):
  r = np.random.default_rng(seed)
  s = (2 * r.standard_normal(lead + (v,))).astype(np.float32)
  t = (2 * r.standard_normal(lead + (v,))).astype(np.float32)
  lp_full = np_log_softmax(t.astype(np.float64) / temperature)
  idx = np.argsort(-lp_full, -1)[..., :k].astype(np.int32)
  lp = np.take_along_axis(lp_full, idx, -1).astype(np.float32)
  return s, t, lp, idx


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
@pytest.mark.parametrize("lead,v,k,temperature", [
    ((5,), 20, 4, 1.0), ((2, 3), 50, 10, 2.0), ((6,), 8, 1, 1.0)])
def test_topk_matches_numpy(tail, lead, v, k, temperature):
  s, _, lp, idx = topk_inputs(16, lead, v, k, temperature)
  got = jcall(losses.topk_kd_loss, s, lp, idx, temperature=temperature,
              tail=tail)
  assert got.shape == lead and got.dtype == jnp.float32
  assert_close_to_reference(
      got, lambda dt: np_topk_kd(s, lp, idx, temperature, tail, dt))


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_topk_with_k_equal_v_is_forward_kl(tail):
  s, t, lp, idx = topk_inputs(17, (4, 3), 16, 16, 2.0)
  got = jcall(losses.topk_kd_loss, s, lp, idx, temperature=2.0, tail=tail)
  assert_close_to_reference(got, lambda dt: np_forward_kl(s, t, 2.0, dtype=dt))


def test_topk_bucket_lower_bounds_full_kl():
  s, t, lp, idx = topk_inputs(18, (20,), 30, 5)
  bucket = jcall(losses.topk_kd_loss, s, lp, idx)
  assert np.all(np.asarray(bucket) <= np_forward_kl(s, t, 1.0) + 1e-6)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_topk_grads_finite_differences_and_mask(x64, tail):
  s, _, lp, idx = topk_inputs(19, (6,), 12, 4)
  s, lp = s.astype(np.float64), lp.astype(np.float64)
  mask = np.array([True, False, True, True, False, True])
  s_nan = np.where(mask[:, None], s, np.nan)
  w = np.random.default_rng(20).random(6)
  f = lambda z: jnp.sum(w * losses.topk_kd_loss(
      z, lp, idx, temperature=1.5, tail=tail, where=mask))
  g = np.asarray(jax.jit(jax.grad(f))(s_nan))
  assert np.all(g[~mask] == 0) and np.all(np.isfinite(g))
  fz = jax.jit(jax.vmap(f))
  eps, n = 1e-6, s.size
  eye = np.eye(n).reshape((n,) + s.shape)
  vals = np.asarray(fz(np.concatenate([s + eps * eye, s - eps * eye])))
  fd = ((vals[:n] - vals[n:]) / (2 * eps)).reshape(s.shape)
  np.testing.assert_allclose(g[mask], fd[mask], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_fused_topk_values_and_grads(tail):
  r = np.random.default_rng(21)
  lead, d, v, k = (3, 4), 5, 24, 6
  h = r.standard_normal(lead + (d,)).astype(np.float32)
  w = (r.standard_normal((d, v)) / 2).astype(np.float32)
  b = r.standard_normal(v).astype(np.float32)
  _, _, lp, idx = topk_inputs(22, lead, v, k, 2.0)
  mask = r.random(lead) < 0.7
  labels = r.integers(0, v, lead).astype(np.int32)
  kd, ce = jcall(losses.fused_head_topk_kd, h, w, lp, idx, temperature=2.0,
                 tail=tail, where=mask, labels=labels, chunk_size=5,
                 student_bias=b)
  logits = lambda dt: np_logits(h, w, b, dt)
  assert_close_to_reference(kd, lambda dt: np.where(
      mask, np_topk_kd(logits(dt), lp, idx, 2.0, tail, dt), 0))
  assert_close_to_reference(ce, lambda dt: np.where(
      mask, np_ce(logits(dt), labels, dt), 0))
  with jax.enable_x64(True):  # float64 materialized gradient as reference
    def mat(w_):
      z = h.astype(np.float64) @ w_ + b
      return jnp.sum(r_w * losses.topk_kd_loss(
          z, lp, idx, temperature=2.0, tail=tail, where=mask))
    r_w = np.random.default_rng(23).random(lead)
    ref = jax.grad(mat)(w.astype(np.float64))
  got = jax.jit(jax.grad(lambda w_: jnp.sum(r_w * losses.fused_head_topk_kd(
      h, w_, lp, idx, temperature=2.0, tail=tail, where=mask, chunk_size=5,
      student_bias=b))))(w)
  np.testing.assert_allclose(got, ref, rtol=1e-5,
                             atol=1e-6 * np.max(np.abs(ref)))


def test_topk_vocab_size_drops_padded_logits():
  s, _, lp, idx = topk_inputs(24, (5,), 20, 4)
  padded = np.concatenate([s, np.full((5, 4), 9.0, np.float32)], -1)
  np.testing.assert_allclose(
      jcall(losses.topk_kd_loss, padded, lp, idx, vocab_size=20),
      jcall(losses.topk_kd_loss, s, lp, idx), rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad inputs: one clear message naming the problem.
# ---------------------------------------------------------------------------


def _bad_cases():
  x = heads(25, (2, 3), 4, 5, 10)
  hs, ws, ht, wt = x["hs"], x["ws"], x["ht"], x["wt"]
  fh = losses.fused_head_divergence
  lp, idx = np.zeros((2, 3, 2), np.float32), np.zeros((2, 3, 2), np.int32)
  s = np.zeros((2, 3, 10), np.float32)
  return [
      (lambda: fh(hs, ws, ht, wt, divergence="kl"), ValueError,
       "`divergence` must be one of"),
      (lambda: fh(hs, ws[:3], ht, wt), ValueError,
       "`student_hidden` has 4 features but `student_kernel` has shape (3, 10)"),
      (lambda: fh(hs, ws, ht[:1], wt), ValueError,
       "`student_hidden` and `teacher_hidden` must have the same leading"),
      (lambda: fh(hs, ws[None], ht, wt), ValueError,
       "`student_kernel` must have rank 2"),
      (lambda: fh(hs, ws, ht, wt, temperature=0.0), ValueError,
       "`temperature` must be > 0"),
      (lambda: fh(hs, ws, ht, wt, temperature=jnp.float32(2)), TypeError,
       "`temperature` must be a Python number"),
      (lambda: fh(hs, ws, ht, wt, divergence="jsd", beta=1.5), ValueError,
       "`beta` must be in [0, 1]"),
      (lambda: fh(hs, ws, ht, wt, chunk_size=0), ValueError,
       "`chunk_size` must be a positive int"),
      (lambda: fh(hs, ws, ht, wt, student_bias=np.zeros(9, np.float32)),
       ValueError, "`student_bias` must have shape (10,)"),
      (lambda: fh(hs, ws, ht, wt, labels=np.zeros((2, 3), np.float32)),
       TypeError, "`labels` must hold integer class indices"),
      (lambda: fh(hs, ws, ht, wt, where=np.ones((2, 3), np.int32)), TypeError,
       "`where` must be a boolean mask"),
      (lambda: fh(hs.astype(np.int32), ws, ht, wt), TypeError,
       "`student_hidden` must have a floating dtype"),
      (lambda: losses.topk_kd_loss(s, lp, idx, tail="drop"), ValueError,
       "`tail` must be one of"),
      (lambda: losses.topk_kd_loss(s, lp, idx[..., :1]), ValueError,
       "`teacher_topk_logprobs` and `teacher_topk_indices` must have the same"),
      (lambda: losses.topk_kd_loss(s, lp, idx.astype(np.float32)), TypeError,
       "`teacher_topk_indices` must hold integer class indices"),
      (lambda: losses.topk_kd_loss(s[:1], lp, idx), ValueError,
       "`student_logits` and `teacher_topk_logprobs` must have the same"),
      (lambda: losses.topk_kd_loss(s[..., :1], lp, idx), ValueError,
       "top-k size k=2 must be in [1, 1]"),
      (lambda: losses.fused_head_topk_kd(hs, ws, lp, idx, vocab_size=11),
       ValueError, "`vocab_size`=11 exceeds the 10 classes of `student_kernel`"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise_clear_errors(case):
  fn, exc, msg = _bad_cases()[case]
  with pytest.raises(exc, match=re.escape(msg)):
    fn()


# ---------------------------------------------------------------------------
# Memory (compile only, moderate size): bounded by the chunk, not by N.
# ---------------------------------------------------------------------------


def test_fused_temp_memory_is_bounded_by_the_chunk_compile_only():
  n, d, v, chunk = 2048, 32, 16384, 128
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)

  def loss(hs, ws, ht, wt, use_fused):
    if use_fused:
      out = losses.fused_head_divergence(hs, ws, ht, wt, chunk_size=chunk)
    else:
      out = losses.forward_kl(hs @ ws, ht @ wt)
    return jnp.mean(out)
  temps = {}
  for use_fused in (True, False):
    f = jax.jit(jax.value_and_grad(functools.partial(loss, use_fused=use_fused),
                                   argnums=(0, 1)))
    stats = f.lower(spec(n, d), spec(d, v), spec(n, d), spec(d, v)).compile(
    ).memory_analysis()
    temps[use_fused] = stats.temp_size_in_bytes
  chunk_bytes = chunk * v * 4
  assert temps[True] <= 12 * chunk_bytes, (temps, chunk_bytes)
  assert temps[False] >= n * v * 4  # the materialized version holds [N, V]
