import time, statistics, sys
import numpy as np, jax, jax.numpy as jnp, optax
B, T, V = 32, 64, 2048
s = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, V)), jnp.float32)
y = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T)))
def logsm_ce(s):
  logp = jax.nn.log_softmax(s, axis=-1)
  return jnp.sum(-jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0])
def optax_ce(s):
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(s, y))
def lse_ce(s):
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  sh = s - m
  lse = jnp.log(jnp.sum(jnp.exp(sh), -1))
  return jnp.sum(lse - jnp.take_along_axis(sh, y[..., None], axis=-1)[..., 0])
def argmax_top1(s):
  return jnp.sum(jnp.argmax(s, -1) == y)
def firstmax_top1(s):
  m = jnp.max(s, -1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
  first = jnp.min(jnp.where((s == m) | jnp.isnan(s), iota, s.shape[-1]), -1)
  return jnp.sum(first == y)
fns = {"log_softmax+take (grad)": jax.jit(jax.grad(logsm_ce)), "optax (grad)": jax.jit(jax.grad(optax_ce)),
       "lse-take (grad)": jax.jit(jax.grad(lse_ce)),
       "argmax top1": jax.jit(argmax_top1), "first-max top1": jax.jit(firstmax_top1)}
for f in fns.values(): jax.block_until_ready(f(s))
ts = {n: [] for n in fns}
for r in range(5):
  for n, f in fns.items():
    for _ in range(5):
      t0 = time.perf_counter(); jax.block_until_ready(f(s)); ts[n].append(time.perf_counter() - t0)
print(jax.__version__, {n: round(statistics.median(v) * 1e3, 2) for n, v in ts.items()})
print("top1 equal:", int(fns["argmax top1"](s)), int(fns["first-max top1"](s)))
z = jnp.zeros((B, T, V)); print("ties:", int(jax.jit(argmax_top1)(z)), int(jax.jit(firstmax_top1)(z)))
