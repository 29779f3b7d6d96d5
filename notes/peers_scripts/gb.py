import os, sys, time, statistics
import numpy as np, jax, jax.numpy as jnp, optax
from kd_jax.models import lm
from kd_jax.train import create_train_state, lm_steps, step_utils
from kd_jax.train.objectives import Objective, Term
out = "workdirs/peers_default"
F32 = jnp.float32
tokens = jnp.asarray(np.random.default_rng(0).integers(0, 2048, (32, 65)).astype(np.int32))
sm, sv, _ = lm.load_hf_folder(f"{out}/hf/student", dtype=F32)
tm, tv, _ = lm.load_hf_folder(f"{out}/hf/teacher", dtype=F32)
tx = optax.sgd(0.1)
objs = {"forward_kl": Objective(ce_weight=0.5, terms=(Term("forward_kl", 2.0, temperature=2.0),)),
        "jsd": Objective(ce_weight=0.0, terms=(Term("js_divergence", 1.0, temperature=1.0, beta=0.5),))}
real = step_utils.gradient_boundary
res = {}
for wl, obj in objs.items():
  runs, finals = {}, {}
  for name, gb in (("before", lambda x: x), ("after", real)):
    step_utils.gradient_boundary = gb
    f = jax.jit(lm_steps.make_lm_step(sm, tm, obj, tx))
    st = create_train_state(jax.tree.map(jnp.array, sv), tx, rng=jax.random.key(0))
    f.lower(st, tv, {"tokens": tokens}).compile()  # trace now, with this gb
    box = {"s": st}
    def r(f=f, box=box):
      box["s"], m = f(box["s"], tv, {"tokens": tokens}); return m["loss"]
    runs[name] = (r, box)
  step_utils.gradient_boundary = real
  for name, (r, box) in runs.items():
    for _ in range(3): jax.block_until_ready(r())
    finals[name] = jax.tree.map(np.asarray, box["s"].params)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(finals["before"]), jax.tree.leaves(finals["after"])))
  ts = {n: [] for n in runs}
  for k in range(4):
    for n, (r, _) in runs.items():
      for _ in range(3):
        t0 = time.perf_counter(); jax.block_until_ready(r()); ts[n].append(time.perf_counter() - t0)
  print(wl, "params bit-identical after 3 steps:", same, {n: round(statistics.median(v) * 1e3, 1) for n, v in ts.items()}, jax.__version__, flush=True)
