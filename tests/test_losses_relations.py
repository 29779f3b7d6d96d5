"""Relation-based losses vs. independent float64 NumPy implementations, and
global-batch semantics under `pmap` (all-gather over `axis_name`) and under
`jit` with a batch sharded over the 8 simulated CPU devices.

NumPy references are written from RepDistiller (`distiller_zoo/SP.py`, `PKT.py`,
`RKD.py`, `CC.py`, `crd/criterion.py`, `crd/memory.py`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kd_jax import losses

RNG = np.random.default_rng(1)
N_DEV = 8


def randn(*shape):
  return RNG.standard_normal(shape)


def f32(x):
  return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------- NumPy references --

def np_l2n(x, axis):
  return x / np.maximum(np.sqrt((x * x).sum(axis=axis, keepdims=True)), 1e-12)


def np_sp(s, t):
  b = s.shape[0]
  s, t = s.reshape(b, -1), t.reshape(b, -1)
  gs, gt = np_l2n(s @ s.T, 1), np_l2n(t @ t.T, 1)
  return ((gt - gs) ** 2).sum() / b ** 2


def np_pkt(s, t, eps=1e-7):
  def probs(f):
    f = f.reshape(f.shape[0], -1)
    f = f / (np.sqrt((f ** 2).sum(1, keepdims=True)) + eps)
    m = (f @ f.T + 1) / 2
    return m / m.sum(1, keepdims=True)
  ps, pt = probs(s), probs(t)
  return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_smooth_l1(x):
  return np.where(np.abs(x) < 1, 0.5 * x ** 2, np.abs(x) - 0.5)


def np_rkd(s, t, wd=25.0, wa=50.0, squared=False):
  def dist(e):
    b = e.shape[0]
    d = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        if i != j:
          v = max((e[i] ** 2).sum() + (e[j] ** 2).sum() - 2 * e[i] @ e[j], 1e-12)
          d[i, j] = v if squared else np.sqrt(v)
    return d / d[d > 0].mean()

  def angle(e):
    b = e.shape[0]
    a = np.zeros((b, b, b))
    for i in range(b):
      for j in range(b):
        for k in range(b):
          vj, vk = e[j] - e[i], e[k] - e[i]
          nj, nk = np.linalg.norm(vj), np.linalg.norm(vk)
          vj = vj / max(nj, 1e-12)
          vk = vk / max(nk, 1e-12)
          a[i, j, k] = vj @ vk
    return a
  s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
  ld = np_smooth_l1(dist(s) - dist(t)).mean()
  la = np_smooth_l1(angle(s) - angle(t)).mean()
  return wd * ld + wa * la


def np_cc(s, t):
  d = np.abs(s - t).reshape(s.shape[0], -1)
  return sum((d[i] * d[i + 1]).sum() for i in range(len(d) - 1)) / (len(d) - 1)


TAU = float(np.float32(0.07))


def np_crd(es, et, mem_s, mem_t, cidx, zs, zt):
  n, b = mem_s.shape[0], es.shape[0]
  m = cidx.shape[1] - 1
  pn = 1.0 / n

  def nce(x):
    total = 0.0
    for i in range(b):
      total += np.log(x[i, 0] / (x[i, 0] + m * pn + 1e-7))
      for k in range(1, m + 1):
        total += np.log(m * pn / (x[i, k] + m * pn + 1e-7))
    return -total / b
  xs = np.array([[np.exp(mem_t[cidx[i, k]] @ es[i] / TAU) / zs
                  for k in range(m + 1)] for i in range(b)])
  xt = np.array([[np.exp(mem_s[cidx[i, k]] @ et[i] / TAU) / zt
                  for k in range(m + 1)] for i in range(b)])
  return nce(xs) + nce(xt)


def fd_grad(f, x, eps=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


def check(jax_fn, np_fn, x, *, rtol=1e-5, atol=1e-7, grtol=2e-3):
  val, g = jax.jit(jax.value_and_grad(jax_fn))(f32(x))
  np.testing.assert_allclose(val, np_fn(x), rtol=rtol, atol=atol)
  g = np.asarray(g, np.float64)
  ref = fd_grad(np_fn, x)
  scale = np.abs(ref).max()
  assert scale > 0, "degenerate gradient test"
  np.testing.assert_allclose(g, ref, rtol=grtol, atol=1e-6 + grtol * scale)


# ------------------------------------------------------- values, gradients --

def test_sp_value_grad():
  s, t = randn(5, 2, 2, 3), randn(5, 7)
  check(lambda x: losses.sp_loss(x, f32(t)), lambda x: np_sp(x, t), s)


def test_pkt_value_grad():
  s, t = randn(6, 4), randn(6, 3)
  check(lambda x: losses.pkt_loss(x, f32(t)), lambda x: np_pkt(x, t), s,
        atol=1e-8)


def test_pkt_zero_row_is_finite():
  s, t = randn(4, 3), randn(4, 3)
  s[1] = 0.0
  val, g = jax.jit(jax.value_and_grad(
      lambda x: losses.pkt_loss(x, f32(t))))(f32(s))
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(val, np_pkt(s, t), rtol=1e-5)


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_value_grad(squared):
  s, t = randn(5, 3), randn(5, 4)
  check(lambda x: losses.rkd_loss(x, f32(t), squared=squared),
        lambda x: np_rkd(x, t, squared=squared), s, rtol=2e-5)


def test_rkd_weights_and_duplicate_rows():
  s, t = randn(4, 3), randn(4, 3)
  s[2] = s[1]                      # zero-length difference: L2N gives 0
  fn = jax.jit(jax.value_and_grad(
      lambda x: losses.rkd_loss(x, f32(t), distance_weight=1.0,
                                angle_weight=0.0)))
  val, g = fn(f32(s))
  np.testing.assert_allclose(val, np_rkd(s, t, 1.0, 0.0), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(g)))
  val = jax.jit(lambda x: losses.rkd_loss(x, f32(t), distance_weight=0.0,
                                          angle_weight=1.0))(f32(s))
  np.testing.assert_allclose(val, np_rkd(s, t, 0.0, 1.0), rtol=1e-5)


def test_cc_value_grad():
  s, t = randn(6, 4), randn(6, 4)
  check(lambda x: losses.cc_loss(x, f32(t)), lambda x: np_cc(x, t), s)


def _crd_inputs(b=4, k=5, n=12, d=6, seed=2):
  r = np.random.default_rng(seed)
  es = np_l2n(r.standard_normal((b, d)), 1)
  et = np_l2n(r.standard_normal((b, d)), 1)
  ms = np_l2n(r.standard_normal((n, d)), 1)
  mt = np_l2n(r.standard_normal((n, d)), 1)
  idx = r.permutation(n)[:b]
  cidx = np.concatenate([idx[:, None], r.integers(0, n, (b, k))], axis=1)
  return es, et, ms, mt, idx, cidx


def test_crd_value_grads():
  es, et, ms, mt, _, cidx = _crd_inputs()
  zs, zt = 11.0, 13.0
  args = (f32(ms), f32(mt), jnp.asarray(cidx))
  check(lambda x: losses.crd_loss(x, f32(et), *args, z_student=zs,
                                  z_teacher=zt),
        lambda x: np_crd(x, et, ms, mt, cidx, zs, zt), es)
  # the teacher-side embedding is trainable in the reference: it gets grads
  check(lambda x: losses.crd_loss(f32(es), x, *args, z_student=zs,
                                  z_teacher=zt),
        lambda x: np_crd(es, x, ms, mt, cidx, zs, zt), et)
  # the banks are constants
  gm = jax.jit(jax.grad(lambda m: losses.crd_loss(
      f32(es), f32(et), m, f32(mt), jnp.asarray(cidx), z_student=zs,
      z_teacher=zt)))(f32(ms))
  assert float(jnp.abs(gm).max()) == 0.0


def test_crd_normalization_and_memory_update():
  es, et, ms, mt, idx, cidx = _crd_inputs()
  zs, zt = jax.jit(losses.crd_normalization)(f32(es), f32(et), f32(ms),
                                             f32(mt), jnp.asarray(cidx))
  n = ms.shape[0]
  ref_zs = n * np.mean([[np.exp(mt[c] @ es[i] / TAU) for c in cidx[i]]
                        for i in range(len(es))])
  ref_zt = n * np.mean([[np.exp(ms[c] @ et[i] / TAU) for c in cidx[i]]
                        for i in range(len(et))])
  np.testing.assert_allclose([zs, zt], [ref_zs, ref_zt], rtol=1e-5)
  new = jax.jit(functools.partial(losses.crd_memory_update, momentum=0.5))(
      f32(ms), f32(es), jnp.asarray(idx))
  ref = ms.copy()
  for i, y in enumerate(idx):
    v = 0.5 * ms[y] + 0.5 * es[i]
    ref[y] = v / np.linalg.norm(v)
  np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-7)


def test_bf16_inputs_computed_in_f32():
  s, t = randn(4, 3), randn(4, 5)

  def all_losses(c):
    return {"sp": losses.sp_loss(c(s), c(t)),
            "pkt": losses.pkt_loss(c(s), c(t)),
            "rkd": losses.rkd_loss(c(s), c(t)),
            "cc": losses.cc_loss(c(s), c(t[:, :3]))}
  lo = jax.jit(lambda: all_losses(lambda x: jnp.asarray(x, jnp.bfloat16)))()
  ref = jax.jit(lambda: all_losses(
      lambda x: jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32)))()
  for k, v in lo.items():
    assert v.dtype == jnp.float32 and v.shape == (), k
    np.testing.assert_allclose(v, ref[k], rtol=1e-6, err_msg=k)


# --------------------------------------------------- global-batch semantics --

B_GLOBAL = 16   # 2 samples per device


def _batch_cases():
  r = np.random.default_rng(3)
  s = r.standard_normal((B_GLOBAL, 2, 2, 3))
  t = r.standard_normal((B_GLOBAL, 5))
  return {
      "sp": (losses.sp_loss, s, t),
      "pkt": (losses.pkt_loss, s.reshape(B_GLOBAL, -1), t),
      "rkd": (losses.rkd_loss, s.reshape(B_GLOBAL, -1), t),
      "cc": (losses.cc_loss, s.reshape(B_GLOBAL, -1)[:, :5], t),
  }


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "cc"])
def test_pmap_all_gather_matches_global_batch(name):
  fn, s, t = _batch_cases()[name]
  s, t = f32(s), f32(t)
  val, grad = jax.jit(jax.value_and_grad(fn))(s, t)

  shard = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])
  pv, pg = jax.pmap(jax.value_and_grad(functools.partial(fn, axis_name="d")),
                    axis_name="d")(shard(s), shard(t))
  # every device holds the global-batch value ...
  np.testing.assert_allclose(pv, np.full(N_DEV, float(val)), rtol=2e-6)
  # ... and the local gradient is N_DEV x the matching slice of the global one
  # (the transpose of all_gather is a reduce-scatter over the devices' copies)
  np.testing.assert_allclose(np.asarray(pg).reshape(grad.shape) / N_DEV, grad,
                             rtol=1e-4, atol=1e-7 * float(jnp.abs(grad).max()))
  # without axis_name each device only sees its shard: a different loss
  local = jax.pmap(fn)(shard(s), shard(t))
  assert not np.allclose(np.asarray(local), float(val), rtol=1e-3)


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "cc"])
def test_pmap_param_gradient_pmean_equals_one_device(name):
  """The engine's recipe: loss per device, pmean of parameter gradients."""
  fn, s, t = _batch_cases()[name]
  s, t = f32(s.reshape(B_GLOBAL, -1)), f32(t)
  w = f32(np.random.default_rng(4).standard_normal((s.shape[1], s.shape[1])))

  def one_device(w):
    return fn(jnp.tanh(s @ w), t)

  def per_device(w, x, t):
    return fn(jnp.tanh(x @ w), t, axis_name="d")

  def step(w, x, t):
    return jax.lax.pmean(jax.grad(per_device)(w, x, t), "d")

  g1 = jax.jit(jax.grad(one_device))(w)
  shard = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])
  gp = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0))(w, shard(s),
                                                           shard(t))
  for g in np.asarray(gp):
    np.testing.assert_allclose(g, g1, rtol=1e-4,
                               atol=1e-6 * float(jnp.abs(g1).max()))


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "cc"])
def test_jit_sharded_batch_matches_one_device(name):
  fn, s, t = _batch_cases()[name]
  s, t = f32(s), f32(t)
  mesh = Mesh(np.array(jax.devices()[:N_DEV]), ("data",))
  shard_s = jax.device_put(s, NamedSharding(mesh, P("data")))
  shard_t = jax.device_put(t, NamedSharding(mesh, P("data")))
  assert len(shard_s.sharding.device_set) == N_DEV
  vg = jax.jit(jax.value_and_grad(fn))
  val, grad = vg(s, t)
  sval, sgrad = vg(shard_s, shard_t)
  np.testing.assert_allclose(sval, val, rtol=2e-6)
  np.testing.assert_allclose(sgrad, grad, rtol=1e-4,
                             atol=1e-7 * float(jnp.abs(grad).max()))


def test_cc_pairs_straddle_shard_boundaries():
  # delta nonzero only on samples 1 and 2 (devices 0 and 1 with 2 per
  # device): the only contributing pair crosses the shard boundary.
  s = np.zeros((B_GLOBAL, 2))
  s[1] = [1.0, 2.0]
  s[2] = [3.0, 1.0]
  t = np.zeros_like(s)
  pv = jax.pmap(functools.partial(losses.cc_loss, axis_name="d"),
                axis_name="d")(f32(s).reshape(N_DEV, 2, 2),
                               f32(t).reshape(N_DEV, 2, 2))
  np.testing.assert_allclose(pv, np.full(N_DEV, (3 + 2) / (B_GLOBAL - 1)),
                             rtol=1e-6)


def test_crd_pmap_matches_global_batch():
  es, et, ms, mt, idx, cidx = _crd_inputs(b=B_GLOBAL, n=40, seed=9)
  es, et, ms, mt = map(f32, (es, et, ms, mt))
  cidx, idx = jnp.asarray(cidx), jnp.asarray(idx)
  zs, zt = losses.crd_normalization(es, et, ms, mt, cidx)

  def loss(es, et, cidx, axis_name=None):
    return losses.crd_loss(es, et, ms, mt, cidx, z_student=zs, z_teacher=zt,
                           axis_name=axis_name)
  val, grad = jax.jit(jax.value_and_grad(loss))(es, et, cidx)
  shard = lambda x: x.reshape((N_DEV, -1) + x.shape[1:])

  def per_device(es, et, cidx, idx):
    v, g = jax.value_and_grad(functools.partial(loss, axis_name="d"))(
        es, et, cidx)
    z = losses.crd_normalization(es, et, ms, mt, cidx, axis_name="d")
    mem = losses.crd_memory_update(ms, es, idx, axis_name="d")
    return v, g, z, mem
  pv, pg, pz, pmem = jax.pmap(per_device, axis_name="d")(
      shard(es), shard(et), shard(cidx), shard(idx))
  np.testing.assert_allclose(pv, np.full(N_DEV, float(val)), rtol=2e-6)
  np.testing.assert_allclose(np.asarray(pg).reshape(grad.shape) / N_DEV, grad,
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(pz[0], np.full(N_DEV, float(zs)), rtol=1e-5)
  np.testing.assert_allclose(pz[1], np.full(N_DEV, float(zt)), rtol=1e-5)
  full_mem = losses.crd_memory_update(ms, es, idx)
  for m in np.asarray(pmem):
    np.testing.assert_allclose(m, full_mem, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ bad inputs --

def test_errors():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="same batch size"):
    losses.sp_loss(x, jnp.ones((5, 3)))
  with pytest.raises(ValueError, match=r"`student_feat` must have at least 2"):
    losses.sp_loss(jnp.ones(4), x)
  with pytest.raises(TypeError, match="`teacher_emb` must have a floating dtype"):
    losses.pkt_loss(x, jnp.ones((4, 3), jnp.int32))
  with pytest.raises(ValueError, match="`eps` must be >= 0"):
    losses.pkt_loss(x, x, eps=-1.0)
  with pytest.raises(ValueError, match="batch of at least 2"):
    losses.rkd_loss(jnp.ones((1, 3)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="`student_emb` and `teacher_emb` must have the same shape"):
    losses.cc_loss(x, jnp.ones((4, 2)))
  mem = jnp.ones((10, 3))
  cidx = jnp.zeros((4, 3), jnp.int32)
  with pytest.raises(ValueError, match=r"`contrast_idx` must have shape \[4, K\+1\]"):
    losses.crd_loss(x, x, mem, mem, jnp.zeros((4, 1), jnp.int32),
                    z_student=1.0, z_teacher=1.0)
  with pytest.raises(TypeError, match="`contrast_idx` must hold integer"):
    losses.crd_loss(x, x, mem, mem, jnp.zeros((4, 3)), z_student=1.0,
                    z_teacher=1.0)
  with pytest.raises(ValueError, match="memory banks must be \\[N, D\\]"):
    losses.crd_loss(x, x, jnp.ones((10, 2)), jnp.ones((10, 2)), cidx,
                    z_student=1.0, z_teacher=1.0)
  with pytest.raises(ValueError, match="`z_student` must be > 0"):
    losses.crd_loss(x, x, mem, mem, cidx, z_student=0.0, z_teacher=1.0)
  with pytest.raises(ValueError, match="`momentum` must be in"):
    losses.crd_memory_update(mem, x, jnp.arange(4), momentum=2.0)
  with pytest.raises(ValueError, match=r"`idx` must be an integer array of shape \(4,\)"):
    losses.crd_memory_update(mem, x, jnp.arange(3))


def test_rkd_angles_accurate_with_large_common_offset():
  # Post-ReLU-like embeddings: a large shared mean and a small spread. The
  # Gram-based angles centre the batch first, so they stay accurate.
  s, t = randn(16, 32), randn(16, 32)
  s = s + 50.0
  val = jax.jit(lambda x: losses.rkd_loss(x, f32(t), distance_weight=0.0,
                                          angle_weight=1.0))(f32(s))
  np.testing.assert_allclose(val, np_rkd(s, t, 0.0, 1.0), rtol=1e-4)
