"""`shard_fused_loss`: the fused head loss per device on a mesh.

References: the same loss called plainly on one device (values and
gradients), float64 NumPy logits for the values, and the unsharded
distillation step for the step-level check. Needs the 8 simulated CPU
devices of conftest.py.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import losses
from kd_jax.models import lm
from kd_jax.train import create_train_state
from kd_jax.train import lm_steps
from kd_jax.train import sharding as S
from kd_jax.train.mesh_losses import shard_fused_loss

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _need_8():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")


def _inputs(seed=0, b=4, t=6, ds=8, dt=12, v=20):
  r = np.random.default_rng(seed)
  return dict(hs=r.normal(size=(b, t, ds)).astype(np.float32),
              ws=r.normal(size=(ds, v)).astype(np.float32) / 3,
              ht=r.normal(size=(b, t, dt)).astype(np.float32),
              wt=r.normal(size=(dt, v)).astype(np.float32) / 3,
              mask=r.random((b, t)) > 0.2,
              labels=r.integers(0, v, (b, t)).astype(np.int32))


def _np_kl(x):
  def logp(h, w):
    z = h.astype(np.float64) @ w.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  ls, lt = logp(x["hs"], x["ws"]), logp(x["ht"], x["wt"])
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  ce = -np.take_along_axis(ls, x["labels"][..., None], -1)[..., 0]
  return np.where(x["mask"], kl, 0), np.where(x["mask"], ce, 0)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_values_and_gradients_equal_the_plain_call(divergence):
  _need_8()
  mesh = S.make_mesh(MESH)
  x = _inputs()
  sharded = shard_fused_loss(mesh)

  def objective(fn, hs, ws):
    div, ce = fn(hs, ws, x["ht"], x["wt"], where=x["mask"],
                 labels=x["labels"], divergence=divergence, chunk_size=4)
    n = jnp.sum(x["mask"])
    return jnp.sum(div) / n + 0.3 * jnp.sum(ce) / n, (div, ce)

  plain = jax.jit(jax.value_and_grad(functools.partial(
      objective, losses.fused_head_divergence), (0, 1), has_aux=True))
  on_mesh = jax.jit(jax.value_and_grad(functools.partial(
      objective, sharded), (0, 1), has_aux=True))
  hs = jax.device_put(x["hs"], NamedSharding(mesh, P(("data", "fsdp"))))
  (v1, (d1, c1)), g1 = plain(x["hs"], x["ws"])
  (v2, (d2, c2)), g2 = on_mesh(hs, x["ws"])
  np.testing.assert_allclose(v2, v1, rtol=1e-6)
  np.testing.assert_allclose(d2, d1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c2, c1, rtol=1e-5, atol=1e-6)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  if divergence == "forward_kl":
    kl, ce = _np_kl(x)
    np.testing.assert_allclose(d2, kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(c2, ce, rtol=1e-4, atol=1e-6)
  # the time dimension is split over 'tensor' (6 % 2 == 0)
  assert d2.sharding.spec == P(("data", "fsdp"), "tensor")


def test_batch_not_divisible_is_one_clear_error():
  _need_8()
  x = _inputs(b=2)
  loss = shard_fused_loss(S.make_mesh(MESH))
  with pytest.raises(ValueError, match=r"multiple of the batch axes "
                     r"\('data', 'fsdp'\) of size 4"):
    loss(x["hs"], x["ws"], x["ht"], x["wt"])
  with pytest.raises(ValueError, match=r"batch axes \['pipe'\]"):
    shard_fused_loss(S.make_mesh(MESH), batch_axes=("pipe",))


def test_distill_step_on_a_mesh_equals_the_unsharded_step():
  _need_8()
  cfg = dict(vocab_size=40, hidden_size=16, intermediate_size=32,
             num_heads=4, num_kv_heads=2, max_position_embeddings=16)
  student = lm.Transformer(lm.LMConfig(num_layers=1, **cfg), jnp.float32,
                           scan_layers=True)
  teacher = lm.Transformer(lm.LMConfig(num_layers=2, **cfg), jnp.float32)
  x = jnp.zeros((1, 4), jnp.int32)
  sv = nn.unbox(student.init(jax.random.key(0), x))
  tv = nn.unbox(teacher.init(jax.random.key(1), x))
  tx = optax.adamw(1e-2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (8, 9)),
                       jnp.int32)
  heads = dict(student_head=functools.partial(lm.head_kernel,
                                              config=student.config),
               teacher_head=functools.partial(lm.head_kernel,
                                              config=teacher.config),
               chunk_size=8, ce_weight=0.5, kd_weight=0.5)
  par = S.MeshParallel(MESH, state_rules=S.ShardingRules(fsdp_axes=(
      "fsdp",), min_bytes=0, logical_rules=S.DEFAULT_LOGICAL_RULES))
  state = create_train_state(sv, tx, rng=jax.random.key(2))
  ref_step = jax.jit(lm_steps.make_lm_distill_step(
      student, teacher, tx, fused=True, **heads))
  s1, m1 = ref_step(state, tv, {"tokens": tokens})
  step = par.compile(lm_steps.make_lm_distill_step(
      student, teacher, tx, fused=True,
      fused_loss=shard_fused_loss(par.mesh), **heads), donate_state=False)
  names = S.logical_axis_names(student, x)
  s2, m2 = step(par.shard_state(state, logical_names=names),
                par.shard_teacher(tv, "fsdp", min_bytes=0),
                par.shard_batch({"tokens": np.asarray(tokens)}))
  for k in ("loss", "forward_kl", "ce"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      b, a, rtol=1e-4, atol=1e-6), s1.params, par.fetch(s2.params))
