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
import glob, gzip, collections
for n, sd in sides.items():
  d = f"/tmp/peers2/trace_{n}_{wl}"
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(3): jax.block_until_ready(sd.run())
  f = glob.glob(f"{d}/**/*perfetto_trace.json.gz", recursive=True)[0]
  ev = json.load(gzip.open(f)); ev = ev["traceEvents"] if isinstance(ev, dict) else ev
  tot = collections.Counter(); kinds = collections.Counter()
  for e in ev:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "Thunk", "PjRt", "TfrtCpu")):
      tot[e["name"]] += e.get("dur", 0)
      k = "dot" if e["name"].startswith("dot") else "fusion/other"
      kinds[k] += e.get("dur", 0)
  print(n, {k: round(v / 3e3, 1) for k, v in kinds.items()}, [(k, round(v / 3e3, 1)) for k, v in tot.most_common(12)], flush=True)
