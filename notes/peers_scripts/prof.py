import os, sys, time, json, statistics
import numpy as np, jax
sys.path.insert(0, os.getcwd())
from experiments import peer_sides as ps
out = "workdirs/peers_default"
tokens = np.random.default_rng(0).integers(0, 2048, (32, 65)).astype(np.int32)
spec = ps.Spec(f"{out}/hf/teacher", f"{out}/hf/student", tokens, 2.0, 0.5, 0.5, chunk_size=512)
wl = sys.argv[1]
names = sys.argv[2].split(",")
sides = {}
for n in names:
  if n == "kd_jax": sides[n] = ps.kd_jax_side(spec, wl)
  elif n == "edk": sides[n] = ps.easydel_side(spec, wl, True)
  elif n == "ed": sides[n] = ps.easydel_side(spec, wl, False)
for n, s in sides.items():
  for _ in range(3): jax.block_until_ready(s.run())
  progs = s.compiled()
  print(n, ps.cost_of(*progs), ps.memory_of(*progs))
  os.makedirs("/tmp/peers2/hlo", exist_ok=True)
  for i, c in enumerate(progs):
    open(f"/tmp/peers2/hlo/{wl}.{n}.{i}.txt", "w").write(c.as_text())
ts = {n: [] for n in sides}; cs = {n: [] for n in sides}
names = list(sides)
for r in range(8):
  for n in names[r % 2:] + names[:r % 2]:
    s = sides[n]
    for _ in range(3):
      t0 = time.perf_counter(); c0 = time.process_time(); jax.block_until_ready(s.run())
      ts[n].append(time.perf_counter() - t0); cs[n].append(time.process_time() - c0)
print("wall", {n: round(statistics.median(v) * 1e3, 1) for n, v in ts.items()})
print("cpu", {n: round(statistics.median(v) * 1e3, 1) for n, v in cs.items()})
