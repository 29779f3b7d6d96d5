"""Feature-based losses vs. independent float64 NumPy implementations.

The NumPy references below are written from the authors' code (RepDistiller
`distiller_zoo/`, mdistiller `distillers/` for KDSVD / OFD / ReviewKD), not
from kd_jax.
Gradients are checked against central finite differences of those references.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm as sp_norm

from kd_jax import losses
from kd_jax.losses import features as F

RNG = np.random.default_rng(0)


def randn(*shape):
  return RNG.standard_normal(shape)


# ------------------------------------------------------- NumPy references --

def np_adaptive_pool(x, out):
  """torch adaptive_avg_pool2d to (out, out) on NHWC float64."""
  b, h, w, c = x.shape
  res = np.zeros((b, out, out, c))
  for i in range(out):
    h0, h1 = (i * h) // out, -((-(i + 1) * h) // out)
    for j in range(out):
      w0, w1 = (j * w) // out, -((-(j + 1) * w) // out)
      res[:, i, j, :] = x[:, h0:h1, w0:w1, :].mean(axis=(1, 2))
  return res


def np_pool_match(s, t):
  if s.shape[1] > t.shape[1]:
    s = np_adaptive_pool(s, t.shape[1])
  elif t.shape[1] > s.shape[1]:
    t = np_adaptive_pool(t, s.shape[1])
  return s, t


def np_l2n(x, axis):
  n = np.sqrt((x * x).sum(axis=axis, keepdims=True))
  return x / np.maximum(n, 1e-12)


def np_fitnet(s, t):
  return ((s - t) ** 2).mean()


def np_att_map(f, p):
  b = f.shape[0]
  return np_l2n((f ** p).mean(axis=3).reshape(b, -1), 1)


def np_at(s, t, p=2):
  s, t = np_pool_match(s, t)
  return ((np_att_map(s, p) - np_att_map(t, p)) ** 2).mean()


def np_nst(s, t):
  s, t = np_pool_match(s, t)

  def units(f):  # [B, C, HW], unit vectors over HW
    b, h, w, c = f.shape
    return np_l2n(np.transpose(f, (0, 3, 1, 2)).reshape(b, c, h * w), 2)

  def k(a, bb):
    vals = []
    for n in range(a.shape[0]):
      for i in range(a.shape[1]):
        for j in range(bb.shape[1]):
          vals.append(np.dot(a[n, i], bb[n, j]) ** 2)
    return np.mean(vals)

  us, ut = units(s), units(t)
  return k(ut, ut) + k(us, us) - 2 * k(us, ut)


def np_vid(mu, t, log_scale, eps=1e-5):
  if t.ndim == 4 and t.shape[1] > mu.shape[1]:
    t = np_adaptive_pool(t, mu.shape[1])
  var = np.log(1.0 + np.exp(log_scale)) + eps
  return (0.5 * ((mu - t) ** 2 / var + np.log(var))).mean()


def np_ab(ss, ts, margin=1.0):
  n, bsz, total = len(ss), ss[0].shape[0], 0.0
  for i, (s, t) in enumerate(zip(ss, ts)):
    a = (s + margin) ** 2 * ((s > -margin) & (t <= 0))
    b = (s - margin) ** 2 * ((s <= margin) & (t > 0))
    total += 2.0 ** (i - n + 1) * (a + b).sum() / bsz * 3 / 1000
  return total


def np_ft(s, t, p1=2, p2=1):
  s, t = np_pool_match(s, t)
  d = np_att_map(s, p1) - np_att_map(t, p1)
  return np.abs(d).mean() if p2 == 1 else (d ** p2).mean()


def np_fsp(ss, ts):
  def mats(fs):
    out = []
    for i in range(len(fs) - 1):
      bot, top = np_pool_match(fs[i], fs[i + 1])
      b, h, w, cb = bot.shape
      ct = top.shape[3]
      g = np.zeros((b, ct, cb))
      for n in range(b):
        for j in range(ct):
          for c in range(cb):
            g[n, j, c] = (bot[n, :, :, c] * top[n, :, :, j]).mean()
      out.append(g)
    return out
  return sum(((a - b) ** 2).mean() for a, b in zip(mats(ss), mats(ts)))


def np_svd_v(f, n):
  b, h, w, c = f.shape
  vs, ss = [], []
  for i in range(b):
    x = f[i].reshape(h * w, c)                # rows = spatial, cols = channels
    _, sv, vt = np.linalg.svd(x, full_matrices=False)
    v = vt.T[:, :n]
    vs.append(v / np.linalg.norm(v, axis=0, keepdims=True))
    ss.append(sv[:n] / np.linalg.norm(sv[:n]))
  return np.stack(vs), np.stack(ss)


def np_kdsvd(ss, ts, k=1):
  total, bsz, prev = 0.0, ss[0].shape[0], None
  for fs, ft in zip(ss, ts):
    vt, st = np_svd_v(ft, k)
    # documented convention: largest-|.| entry of each teacher vector > 0
    for b in range(vt.shape[0]):
      for j in range(vt.shape[2]):
        piv = vt[b, np.argmax(np.abs(vt[b, :, j])), j]
        if piv < 0:
          vt[b, :, j] *= -1
    vs, _ = np_svd_v(fs, k + 3)
    aligned = np.zeros_like(vt)
    for b in range(vt.shape[0]):
      cos = vs[b].T @ vt[b]                     # [k+3, k]
      for j in range(vt.shape[2]):
        m = np.abs(cos[:, j]).max()
        for i in range(cos.shape[0]):
          if abs(cos[i, j]) == m:
            aligned[b, :, j] += np.sign(cos[i, j]) * vs[b, :, i]
    vt = vt * st[:, None, :]
    vs = aligned * st[:, None, :]
    if prev is not None:
      ps, pt = prev
      rs = np.exp(-(vs[:, :, None, :] - ps[:, None, :, :]) ** 2 / 8)
      rt = np.exp(-(vt[:, :, None, :] - pt[:, None, :, :]) ** 2 / 8)
      total += ((rs - rt) ** 2).sum() / bsz
    prev = (vs, vt)
  return total


def np_margin(gamma, beta):
  out = []
  for g, m in zip(gamma, beta):
    s = abs(g)
    if sp_norm.cdf(-m / s) > 0.001:
      out.append(-s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
                 / sp_norm.cdf(-m / s) + m)
    else:
      out.append(-3 * s)
  return np.array(out)


def np_ofd(ss, ts, margins):
  # clovaai/overhaul-distillation distillation_loss, summed, / B (no 1/1000)
  n, total = len(ss), 0.0
  for i, (s, t, m) in enumerate(zip(ss, ts, margins)):
    if t.shape[1] > s.shape[1]:
      t = np_adaptive_pool(t, s.shape[1])
    target = np.maximum(t, m)
    mask = (s > target) | (target > 0)
    total += ((s - target) ** 2 * mask).sum() / 2 ** (n - i - 1)
  return total / ss[0].shape[0]


def np_hcl(ss, ts):
  total = 0.0
  for s, t in zip(ss, ts):
    h = s.shape[1]
    loss, cnt, tot = ((s - t) ** 2).mean(), 1.0, 1.0
    for l in (4, 2, 1):
      if l >= h:
        continue
      cnt /= 2
      loss += ((np_adaptive_pool(s, l) - np_adaptive_pool(t, l)) ** 2).mean() * cnt
      tot += cnt
    total += loss / tot
  return total


# ------------------------------------------------------------------ utils --

def fd_grad(f, x, eps=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += eps
    xm[idx] -= eps
    g[idx] = (f(xp) - f(xm)) / (2 * eps)
  return g


def f32(x):
  return jnp.asarray(x, jnp.float32)


def check(jax_fn, np_fn, x, *, rtol=1e-5, atol=1e-7, grad=True, grtol=2e-3):
  """Value (and FD gradient) of `jax_fn` at `x` vs. the float64 reference."""
  val, g = jax.jit(jax.value_and_grad(jax_fn))(f32(x))
  np.testing.assert_allclose(val, np_fn(x), rtol=rtol, atol=atol)
  if grad:
    g = np.asarray(g, np.float64)
    ref = fd_grad(np_fn, x)
    scale = np.abs(ref).max()
    assert scale > 0, "degenerate gradient test"
    np.testing.assert_allclose(g, ref, rtol=grtol, atol=1e-6 + grtol * scale)


def jv(fn, *args, **kw):
  """Jitted value (one compile instead of one per eager op)."""
  return jax.jit(lambda *a: fn(*a, **kw))(*args)


# ---------------------------------------------------- single-group losses --

SPATIAL_CASES = [((2, 4, 4, 3), (2, 4, 4, 5)),   # same size, channels differ
                 ((2, 8, 8, 3), (2, 4, 4, 2)),   # student pooled (ratio 2)
                 ((2, 4, 4, 3), (2, 6, 6, 2))]   # teacher pooled (ratio 1.5)


def test_fitnet_value_grad():
  s, t = randn(2, 3, 3, 4), randn(2, 3, 3, 4)
  check(lambda x: losses.fitnet_loss(x, f32(t)), lambda x: np_fitnet(x, t), s)
  v, w = randn(3, 5), randn(3, 5)   # vector features work too
  np.testing.assert_allclose(jv(losses.fitnet_loss, f32(v), f32(w)),
                             np_fitnet(v, w), rtol=1e-5)


@pytest.mark.parametrize("ss,ts", SPATIAL_CASES)
def test_at_value(ss, ts):
  s, t = randn(*ss), randn(*ts)
  np.testing.assert_allclose(jv(losses.at_loss, f32(s), f32(t)), np_at(s, t),
                             rtol=1e-5)
  np.testing.assert_allclose(jv(losses.at_loss, f32(s), f32(t), p=3),
                             np_at(s, t, 3), rtol=1e-4)


def test_at_grad_and_teacher_constant():
  s, t = randn(2, 4, 4, 3), randn(2, 2, 2, 5)
  check(lambda x: losses.at_loss(x, f32(t)), lambda x: np_at(x, t), s)
  gt = jax.jit(jax.grad(lambda y: losses.at_loss(f32(s), y)))(f32(t))
  assert float(jnp.abs(gt).max()) == 0.0


@pytest.mark.parametrize("ss,ts", SPATIAL_CASES)
def test_nst_value(ss, ts):
  s, t = randn(*ss), randn(*ts)
  np.testing.assert_allclose(jv(losses.nst_loss, f32(s), f32(t)),
                             np_nst(s, t), rtol=1e-4, atol=1e-6)


def test_nst_grad():
  s, t = randn(2, 3, 3, 3), randn(2, 3, 3, 4)
  check(lambda x: losses.nst_loss(x, f32(t)), lambda x: np_nst(x, t), s,
        atol=1e-6)


def test_vid_value_grad():
  mu, t = randn(2, 2, 2, 3), randn(2, 4, 4, 3)   # teacher pooled
  ls = randn(3)
  check(lambda x: losses.vid_loss(x, f32(t), f32(ls)),
        lambda x: np_vid(x, t, ls), mu)
  check(lambda x: losses.vid_loss(f32(mu), f32(t), x),
        lambda x: np_vid(mu, t, x), ls)
  v, w = randn(4, 3), randn(4, 3)                 # vector features
  np.testing.assert_allclose(jv(losses.vid_loss, f32(v), f32(w), f32(ls)),
                             np_vid(v, w, ls), rtol=1e-5)


def test_vid_init_scale():
  s0 = losses.vid_init_log_scale(5.0)
  assert abs(np.log1p(np.exp(s0)) + 1e-5 - 5.0) < 1e-12


@pytest.mark.parametrize("ss,ts", SPATIAL_CASES)
def test_ft_value(ss, ts):
  s, t = randn(*ss), randn(*ts)
  for p2 in (1, 2):
    np.testing.assert_allclose(jv(losses.ft_loss, f32(s), f32(t), p2=p2),
                               np_ft(s, t, p2=p2), rtol=1e-5, atol=1e-8)


def test_ft_grad():
  s, t = randn(2, 3, 3, 3), randn(2, 3, 3, 2)
  check(lambda x: losses.ft_loss(x, f32(t)), lambda x: np_ft(x, t), s)


# ------------------------------------------------------ multi-group losses --

def test_ab_value_grad():
  ss = [randn(3, 4, 4, 2), randn(3, 2, 2, 3), randn(3, 5)]
  ts = [randn(*s.shape) for s in ss]
  np.testing.assert_allclose(
      jv(losses.ab_loss, [f32(s) for s in ss], [f32(t) for t in ts],
         margin=0.5), np_ab(ss, ts, 0.5), rtol=1e-5)
  for i in (0, 2):   # weights .25 and 1 of the three groups

    def f(x, i=i):
      g = [f32(s) for s in ss]
      g[i] = x
      return losses.ab_loss(g, [f32(t) for t in ts])

    def ref(x, i=i):
      g = list(ss)
      g[i] = x
      return np_ab(g, ts)
    check(f, ref, ss[i])


def test_fsp_value_grad():
  ss = [randn(2, 4, 4, 2), randn(2, 4, 4, 3), randn(2, 2, 2, 2)]
  ts = [randn(2, 6, 6, 2), randn(2, 3, 3, 3), randn(2, 3, 3, 2)]

  def f(x):
    return losses.fsp_loss([f32(ss[0]), x, f32(ss[2])], [f32(t) for t in ts])
  check(f, lambda x: np_fsp([ss[0], x, ss[2]], ts), ss[1])


def _kdsvd_inputs():
  r = np.random.default_rng(7)
  ss = [r.standard_normal(s) for s in ((2, 3, 3, 5), (2, 4, 4, 4), (2, 2, 3, 6))]
  ts = [r.standard_normal(s) for s in ((2, 4, 4, 5), (2, 3, 3, 4), (2, 3, 2, 6))]
  return ss, ts


def test_kdsvd_value_and_sign_convention():
  ss, ts = _kdsvd_inputs()
  fn = jax.jit(losses.kdsvd_loss, static_argnames="k")
  for k in (1, 2):
    np.testing.assert_allclose(
        fn([f32(s) for s in ss], [f32(t) for t in ts], k=k),
        np_kdsvd(ss, ts, k), rtol=1e-4, atol=1e-7)
  base = fn([f32(s) for s in ss], [f32(t) for t in ts], k=1)
  # -X has the same singular vectors up to sign: the convention (teacher) and
  # the alignment mask (student) must make the loss invariant.
  flipped_t = fn([f32(s) for s in ss], [f32(-t) for t in ts], k=1)
  flipped_s = fn([f32(-s) for s in ss], [f32(t) for t in ts], k=1)
  np.testing.assert_allclose(flipped_t, base, rtol=1e-5)
  np.testing.assert_allclose(flipped_s, base, rtol=1e-5)
  assert float(base) > 0


def test_kdsvd_grad():
  ss, ts = _kdsvd_inputs()

  def f(x):
    return losses.kdsvd_loss([x, f32(ss[1])], [f32(t) for t in ts[:2]])
  check(f, lambda x: np_kdsvd([x, ss[1]], ts[:2]), ss[0], rtol=1e-4,
        grtol=1e-2)


def test_ofd_margin_vs_scipy():
  gamma = np.array([1.0, -0.5, 2.0, 0.3, 1.0, 0.2])
  beta = np.array([0.0, 0.3, -1.0, 0.8, -4.0, 1.0])   # last: Phi(-5) < 1e-3
  got = jv(losses.ofd_margin, f32(gamma), f32(beta))
  np.testing.assert_allclose(got, np_margin(gamma, beta), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(got[-1], -3 * 0.2, rtol=1e-6)
  assert np.all(np.asarray(got) < 0)


def test_ofd_value_grad():
  ss = [randn(2, 4, 4, 3), randn(2, 2, 2, 4)]
  ts = [randn(2, 8, 8, 3), randn(2, 2, 2, 4)]       # first teacher pooled
  ms = [np_margin(randn(3), randn(3)), np_margin(randn(4), randn(4))]

  def f(x):
    return losses.ofd_loss([x, f32(ss[1])], [f32(t) for t in ts],
                           [f32(m) for m in ms])
  check(f, lambda x: np_ofd([x, ss[1]], ts, ms), ss[0])


def test_ofd_partial_l2_zero_region():
  # teacher <= margin and student <= teacher: no loss, no gradient
  m = np.full(3, -0.5)
  s = np.full((1, 2, 2, 3), -2.0)
  t = np.full((1, 2, 2, 3), -1.0)
  f = jax.jit(jax.value_and_grad(
      lambda x: losses.ofd_loss([x], [f32(t)], [f32(m)])))
  val, g = f(f32(s))
  assert float(val) == 0.0 and float(jnp.abs(g).max()) == 0.0
  # a student above max(t, margin) = -0.5 is pulled down to it: 12 * 1^2
  val, _ = f(f32(np.full((1, 2, 2, 3), 0.5)))
  np.testing.assert_allclose(val, 12.0, rtol=1e-6)


def test_hcl_value_grad():
  # heights 8 (levels 4,2,1), 5 (4,2,1 with uneven bins), 2 (1), 1 (none)
  ss = [randn(2, 8, 8, 2), randn(2, 5, 5, 3), randn(2, 2, 2, 2),
        randn(2, 1, 1, 4)]
  ts = [randn(*s.shape) for s in ss]
  np.testing.assert_allclose(
      jv(losses.hcl_loss, [f32(s) for s in ss], [f32(t) for t in ts]),
      np_hcl(ss, ts), rtol=1e-5)

  def f(x):
    return losses.hcl_loss([f32(ss[0]), x], [f32(t) for t in ts[:2]])
  check(f, lambda x: np_hcl([ss[0], x], ts[:2]), ss[1])


# -------------------------------------------------------------- bf16 --

def _all_losses_with(conv):
  r = np.random.default_rng(5)
  a, b = r.standard_normal((2, 4, 4, 3)), r.standard_normal((2, 2, 2, 3))
  ls = r.standard_normal(3)
  return jax.jit(lambda a, b, ls: _all_losses(conv, a, b, ls))(a, b, ls)


def _all_losses(c, a, b, ls):
  return {
      "fitnet": losses.fitnet_loss(c(a), c(a[::-1])),
      "at": losses.at_loss(c(a), c(b)),
      "nst": losses.nst_loss(c(a), c(b)),
      "vid": losses.vid_loss(c(b), c(a), c(ls)),
      "ab": losses.ab_loss([c(a)], [c(a[::-1])]),
      "ft": losses.ft_loss(c(a), c(b)),
      "fsp": losses.fsp_loss([c(a), c(b)], [c(a[::-1]), c(b[::-1])]),
      "kdsvd": losses.kdsvd_loss([c(a), c(b)], [c(a[::-1]), c(b[::-1])]),
      "ofd": losses.ofd_loss([c(b)], [c(a)], [c(-jnp.ones(3))]),
      "hcl": losses.hcl_loss([c(a)], [c(a[::-1])]),
  }


def test_bf16_inputs_computed_in_f32():
  lo = _all_losses_with(lambda x: jnp.asarray(x, jnp.bfloat16))
  # reference: the same bf16-rounded values, fed as float32
  ref = _all_losses_with(
      lambda x: jnp.asarray(jnp.asarray(x, jnp.bfloat16), jnp.float32))
  for k, v in lo.items():
    assert v.dtype == jnp.float32, k
    assert v.shape == (), k
    np.testing.assert_allclose(v, ref[k], rtol=1e-6, atol=1e-8, err_msg=k)
    assert np.isfinite(float(v)), k


# ------------------------------------------------------------ bad inputs --

def test_errors():
  x4 = jnp.ones((2, 4, 4, 3))
  with pytest.raises(ValueError,
                     match="`student_feat` and `teacher_feat` must have the same shape"):
    losses.fitnet_loss(x4, jnp.ones((2, 4, 4, 2)))
  with pytest.raises(TypeError, match="`student_feat` must have a floating dtype"):
    losses.at_loss(jnp.ones((2, 4, 4, 3), jnp.int32), x4)
  with pytest.raises(ValueError, match=r"`teacher_feat` must have rank 4 \(NHWC"):
    losses.at_loss(x4, jnp.ones((2, 16)))
  with pytest.raises(ValueError, match="same batch size"):
    losses.nst_loss(x4, jnp.ones((3, 4, 4, 3)))
  with pytest.raises(ValueError, match="incompatible spatial sizes"):
    losses.at_loss(x4, jnp.ones((2, 4, 2, 3)))
  with pytest.raises(ValueError, match="`p` must be > 0"):
    losses.at_loss(x4, x4, p=0)
  with pytest.raises(ValueError, match=r"`log_scale` must have shape \(3,\)"):
    losses.vid_loss(x4, x4, jnp.ones(4))
  with pytest.raises(ValueError, match="pool the student feature"):
    losses.vid_loss(jnp.ones((2, 8, 8, 3)), x4, jnp.ones(3))
  with pytest.raises(ValueError, match="same number of channels"):
    losses.vid_loss(x4, jnp.ones((2, 4, 4, 5)), jnp.ones(3))
  with pytest.raises(TypeError, match="`student_preacts` must be a list"):
    losses.ab_loss(x4, [x4])
  with pytest.raises(ValueError, match="same number of layers; got 2 and 1"):
    losses.ab_loss([x4, x4], [x4])
  with pytest.raises(ValueError, match="`margin` must be >= 0"):
    losses.ab_loss([x4], [x4], margin=-1.0)
  with pytest.raises(ValueError, match="at least 2 layer"):
    losses.fsp_loss([x4], [x4])
  with pytest.raises(ValueError, match=r"`student_feats\[1\]` and "
                     r"`teacher_feats\[1\]` must have the same number of channels"):
    losses.fsp_loss([x4, x4], [x4, jnp.ones((2, 4, 4, 4))])
  with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
    losses.kdsvd_loss([x4], [x4], k=0)
  with pytest.raises(ValueError, match=r"`margins\[0\]` must have shape \(3,\)"):
    losses.ofd_loss([x4], [x4], [jnp.ones(2)])
  with pytest.raises(ValueError, match="one \\[C\\] array per group"):
    losses.ofd_loss([x4], [x4], [jnp.ones(3), jnp.ones(3)])
  with pytest.raises(ValueError, match="OFD pools only the teacher"):
    losses.ofd_loss([x4], [jnp.ones((2, 2, 2, 3))], [jnp.ones(3)])
  with pytest.raises(ValueError, match=r"`student_feats\[0\]` and "
                     r"`teacher_feats\[0\]` must have the same shape"):
    losses.hcl_loss([x4], [jnp.ones((2, 2, 2, 3))])
  with pytest.raises(ValueError, match="`bn_scale` and `bn_bias` must have the same shape"):
    losses.ofd_margin(jnp.ones(3), jnp.ones(2))


@pytest.mark.parametrize("ss,ts", [((2, 2, 2, 12), (2, 2, 2, 12)),
                                   ((2, 2, 2, 10), (2, 4, 4, 16))])
def test_nst_few_positions_many_channels(ss, ts):
  # H*W small next to C: the loss takes its P x P Gram path.
  s, t = randn(*ss), randn(*ts)
  np.testing.assert_allclose(jv(losses.nst_loss, f32(s), f32(t)),
                             np_nst(s, t), rtol=1e-4, atol=1e-6)
  check(lambda x: losses.nst_loss(x, f32(t)), lambda x: np_nst(x, t), s,
        atol=1e-6)
