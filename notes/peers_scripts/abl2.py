import os, sys, time, statistics, functools
import numpy as np, jax, jax.numpy as jnp, optax
sys.path.insert(0, os.getcwd())
from kd_jax.models import lm
from kd_jax import losses
from kd_jax.train import create_train_state, lm_steps
from kd_jax.train.objectives import Objective, Term
out = "workdirs/peers_default"
F32 = jnp.float32
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 2048, (32, 65)).astype(np.int32))
sm, sv, _ = lm.load_hf_folder(f"{out}/hf/student", dtype=F32)
tm, tv, _ = lm.load_hf_folder(f"{out}/hf/teacher", dtype=F32)
T, A = 2.0, 0.5
tx = optax.sgd(0.1)
x, y = tokens[:, :-1], tokens[:, 1:]

def plain(params, opt, tvars):
  zt = jax.lax.stop_gradient(tm.apply(tvars, x)[0])
  def lf(p):
    zs = sm.apply({"params": p}, x)[0]
    kd = losses.forward_kl(zs, zt, temperature=T)
    ce = optax.softmax_cross_entropy_with_integer_labels(zs, y)
    return jnp.mean(A * T * T * kd + (1 - A) * ce)
  l, g = jax.value_and_grad(lf)(params)
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), opt, l

def objective_only(params, opt, tvars):
  obj = Objective(ce_weight=1 - A, terms=(Term("forward_kl", A * T * T, temperature=T),))
  zt = jax.lax.stop_gradient(tm.apply(tvars, x)[0])
  def lf(p):
    zs = sm.apply({"params": p}, x)[0]
    loss, aux = obj(zs, y, where=jnp.ones(y.shape, bool), teacher_logits=zt)
    return loss
  l, g = jax.value_and_grad(lf)(params)
  u, opt = tx.update(g, opt, params)
  return optax.apply_updates(params, u), opt, l

from kd_jax.train.objectives import _token_cross_entropy
def variant(where=False, tokce=False, top1=False):
  def f(params, opt, tvars):
    zt = jax.lax.stop_gradient(tm.apply(tvars, x)[0])
    m = jnp.ones(y.shape, bool)
    def lf(p):
      zs = sm.apply({"params": p}, x)[0]
      kd = losses.forward_kl(zs, zt, temperature=T, where=m) if where else losses.forward_kl(zs, zt, temperature=T)
      ce = _token_cross_entropy(zs, y, m, jnp.float32(y.size)) if tokce else jnp.mean(optax.softmax_cross_entropy_with_integer_labels(zs, y))
      l = A * T * T * jnp.sum(kd) / y.size + (1 - A) * ce
      aux = jnp.mean(jnp.argmax(zs, -1) == y) if top1 else 0.0
      return l, aux
    (l, a), g = jax.value_and_grad(lf, has_aux=True)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l + a
  return f
fns = {"plain": plain, "objective": objective_only, "where": variant(where=True), "tokce": variant(tokce=True), "top1": variant(top1=True)}
progs = {}
states = {}
for n, f in fns.items():
  progs[n] = jax.jit(f, donate_argnums=(0, 1))
  p = jax.tree.map(jnp.array, sv["params"])
  states[n] = (p, tx.init(p))
obj = Objective(ce_weight=1 - A, terms=(Term("forward_kl", A * T * T, temperature=T),))
step = jax.jit(lm_steps.make_lm_step(sm, tm, obj, tx), donate_argnums=0)
st = {"s": create_train_state(jax.tree.map(jnp.array, sv), tx, rng=jax.random.key(0))}
def run_lm():
  st["s"], m = step(st["s"], tv, {"tokens": tokens}); return m["loss"]
def mk(n):
  def r():
    p, o, l = progs[n](*states[n], tv); states[n] = (p, o); return l
  return r
runs = {n: mk(n) for n in fns}
for n, r in runs.items():
  for _ in range(2): jax.block_until_ready(r())
ts = {n: [] for n in runs}
for k in range(4):
  for n, r in runs.items():
    for _ in range(3):
      t0 = time.perf_counter(); jax.block_until_ready(r()); ts[n].append(time.perf_counter() - t0)
print({n: round(statistics.median(v) * 1e3, 1) for n, v in ts.items()})
