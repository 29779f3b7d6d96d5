r"""kd_jax side by side with the JAX peers tunix and EasyDeL on one LM distillation.

The same Llama-architecture teacher and student (written once by kd_jax as
Hugging Face folders, ``model.safetensors``, and loaded from those files by
each library's own loader), the same batch, sequence length, dtype
(float32), optimizer (SGD) and loss, one training step each:

* ``forward_kl``: :math:`\alpha T^2\,\mathrm{KL}(p_t^T \| p_s^T) + (1-\alpha)
  \mathrm{CE}` per token (tunix ``LogitStrategy``, EasyDeL
  ``distillation_step``, kd_jax ``make_lm_step`` with ``Term('forward_kl',
  alpha * T**2, temperature=T)``);
* ``jsd``: GKD's generalized JSD, ``beta``, T = 1, no CE (EasyDeL
  ``gkd_step`` on the batch; tunix has none: a kd_jax loss in a tunix
  strategy);
* ``fused``: ``forward_kl`` without ``[B, T, V]`` logits (kd_jax
  ``FusedHead``; EasyDeL ``logits_chunk_size``; tunix only through kd_jax's
  fused loss in a strategy);
* ``intermediate``: intermediate-layer methods, *not the same loss*: kd_jax
  TinyBERT (cosine on the last block's hidden state, learned 64 -> 128
  projection) + CE vs tunix ``AttentionTransferStrategy`` (cosine between the
  attention blocks' outputs, teacher average-pooled to the student's shape)
  + CE; EasyDeL's hidden-state MSE needs equal widths.

Rows "tunix + kd_jax loss" / "EasyDeL + kd_jax loss" run kd_jax's losses
inside the peers' own trainers (``examples/tunix_kd_jax.py``,
``examples/easydel_kd_jax.py``).

Before timing: the teacher's and the student's logits of every library
agree with kd_jax's; every side's first loss agrees with a float64 NumPy
computation from those logits (forward_kl / jsd / fused); and after one
step the students' logits agree again (the same gradients). Then
``--rounds`` interleaved rounds of ``--steps`` steps per side (the order
rotates), ``block_until_ready`` after every step; medians. Columns: steady
ms / step (wall and process CPU time), compile = the first three calls -
3 x steady median (tunix's and EasyDeL's steps compile a second time on
their second call: the optimizer's step counter changes sharding / weak
type after the first donated call), XLA's compiled peak (arguments + outputs - aliased + temporaries;
for tunix the larger of its two programs), tokens / s = B * S / steady.

XLA GFLOP / GB = `cost_analysis()` of the same programs (flops, bytes
accessed): equal work with unequal time points at how XLA ran it (``--hlo``
writes each program's optimized HLO to ``OUT/hlo`` to read why).

The peers pin other versions than kd_jax's environment (EasyDeL 0.3.0:
jax 0.9.x, flax 0.12.3), so everything -- kd_jax included, ``pip install
-e .`` -- runs in one virtual environment this script creates
(``--venv``, default ``workdirs/peers_venv``, ~3 GB) and re-runs itself in,
with JAX's persistent compilation cache off (EasyDeL's ``ejit`` turns it
on).

Usage (one command from a fresh clone, repository root, Python >= 3.11 with
``venv``; the first run installs the peers: ~2.5 min from a local wheel
mirror, then ~14 min for the default table on 2 loaded cores):
  python3 -m experiments.benchmark_peers [--workloads forward_kl,jsd,fused,intermediate]
      [--batch 32 --seq 64 --vocab 2048] [--rounds 5 --steps 5] [--out workdirs/peers] [--hlo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = ("jax==0.9.2", "jaxlib==0.9.2", "flax==0.12.3", "google-tunix==0.1.7",
        "easydel==0.3.0", "torch==2.13.0", "pytest>=8")
MARKER = "kd_jax_peers.json"
WARMUP = 3  # untimed calls; compile time = their sum - WARMUP * steady
SIDES = ("kd_jax", "tunix", "tunix + kd_jax loss", "EasyDeL",
         "EasyDeL + kd_jax loss")
PAIR = {"teacher": dict(hidden_size=128, intermediate_size=344, num_layers=2,
                        num_heads=4, num_kv_heads=2),
        "student": dict(hidden_size=64, intermediate_size=172, num_layers=1,
                        num_heads=2, num_kv_heads=1)}


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--venv", default=os.path.join(REPO, "workdirs",
                                                "peers_venv"))
  p.add_argument("--setup", action="store_true",
                 help="only create / update the virtual environment")
  p.add_argument("--here", action="store_true",
                 help="run in this interpreter (the peers installed here)")
  p.add_argument("--workloads", default="forward_kl,jsd,fused,intermediate")
  p.add_argument("--sides", default=",".join(SIDES))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=64, help="trained tokens per row")
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--beta", type=float, default=0.5)
  p.add_argument("--chunk", type=int, default=512)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  p.add_argument("--out", default=os.path.join(REPO, "workdirs", "peers"))
  p.add_argument("--hlo", action="store_true",
                 help="also write each step's optimized HLO to OUT/hlo")
  return p.parse_args(argv)


# --------------------------------------------------------------------------
# The virtual environment (outside kd_jax's dependencies).


def ensure_venv(venv: str) -> str:
  """The venv's python, creating / installing it when its marker differs."""
  py = os.path.join(venv, "bin", "python")
  marker = os.path.join(venv, MARKER)
  want = {"pins": list(PINS), "repo": REPO}
  if os.path.isfile(marker):
    with open(marker) as fh:
      if json.load(fh) == want:
        return py
  print(f"installing the peers into {venv} ({', '.join(PINS)}) ...",
        flush=True)
  if not os.path.isfile(py):
    subprocess.check_call([sys.executable, "-m", "venv", venv])
  pip = [py, "-m", "pip", "install", "-q"]
  subprocess.check_call(pip + ["-U", "pip"])
  subprocess.check_call(pip + list(PINS) + ["-e", REPO])
  with open(marker, "w") as fh:
    json.dump(want, fh)
  return py


def in_venv(venv: str) -> bool:
  return os.path.realpath(sys.prefix) == os.path.realpath(venv)


# --------------------------------------------------------------------------
# Inside the venv: the pair, the checks, the timing.


def export_pair(args, out: str):
  """HF folders of a random-initialized teacher / student (kd_jax's
  `save_hf_folder`); the RoPE base is 1e6 because tunix 0.1.7's Llama 3
  applies RoPE with its default base whatever the config says."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
  dirs = {}
  for seed, (name, kw) in enumerate(PAIR.items()):
    c = lm.LMConfig(vocab_size=args.vocab, rope_theta=1e6,
                    max_position_embeddings=max(2048, args.seq + 1), **kw)
    m = lm.Transformer(c, dtype=jnp.float32)
    v = m.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    dirs[name] = lm.save_hf_folder(os.path.join(out, "hf", name), c, v)
  return dirs["teacher"], dirs["student"]


def _log_softmax(z):
  import numpy as np  # pylint: disable=g-import-not-at-top
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_loss(spec, workload, s_logits, t_logits):
  """float64 NumPy loss of the workload from the two models' logits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  s, t = s_logits.astype(np.float64), t_logits.astype(np.float64)
  y = spec.tokens[:, 1:]
  if workload == "jsd":
    ls, lt = _log_softmax(s), _log_softmax(t)
    b = spec.beta
    lm = np.logaddexp(np.log(b) + lt, np.log1p(-b) + ls)
    kl = lambda a, m: (np.exp(a) * (a - m)).sum(-1)  # noqa: E731
    return float(np.mean(b * kl(lt, lm) + (1 - b) * kl(ls, lm)))
  temp, a = spec.temperature, spec.alpha
  ls, lt = _log_softmax(s / temp), _log_softmax(t / temp)
  kd = (np.exp(lt) * (lt - ls)).sum(-1)
  ce = -np.take_along_axis(_log_softmax(s), y[..., None], -1)[..., 0]
  return float(np.mean(a * temp * temp * kd + (1 - a) * ce))


def build_sides(spec, workload, names, cache):
  """{name: Side or the reason it cannot run}."""
  from experiments import peer_sides as ps  # pylint: disable=g-import-not-at-top
  builders = {
      "kd_jax": lambda: ps.kd_jax_side(spec, workload),
      "tunix": lambda: ps.tunix_side(spec, workload),
      "tunix + kd_jax loss": lambda: ps.tunix_side(spec, workload, True),
      "EasyDeL": lambda: ps.easydel_side(spec, workload, False,
                                         cache.get("easydel")),
      "EasyDeL + kd_jax loss": lambda: ps.easydel_side(
          spec, workload, True, cache.get("easydel")),
  }
  if any(n.startswith("EasyDeL") for n in names) and "easydel" not in cache:
    cache["easydel"] = ps.easydel_models(spec)
  out = {}
  for name in names:
    try:
      out[name] = builders[name]()
    except ps.Unsupported as e:
      out[name] = str(e)
  return out


def check_models(spec, cache, report):
  """Max |logit difference| of each library's teacher and student vs
  kd_jax's (the same safetensors)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from examples import tunix_kd_jax as tk  # pylint: disable=g-import-not-at-top
  from experiments import peer_sides as ps  # pylint: disable=g-import-not-at-top
  from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
  x = spec.tokens[:, :-1]
  ref = {}
  for w, d in (("student", spec.student_dir), ("teacher", spec.teacher_dir)):
    m, v, _ = lm.load_hf_folder(d, dtype=jnp.float32)
    ref[w] = np.asarray(m.apply(v, jnp.asarray(x))[0])
  got = {"tunix": dict(zip(("student", "teacher"), (
      np.asarray(tk.llama_logits(m, jnp.asarray(x)))
      for m in ps.tunix_models(spec))))}
  if "easydel" in cache:
    got["EasyDeL"] = {}
    for w, m in zip(("student", "teacher"), cache["easydel"]):
      with m.mesh:
        got["EasyDeL"][w] = np.asarray(m(
            input_ids=jnp.asarray(x),
            attention_mask=jnp.ones(x.shape, jnp.int32)).logits)
  for lib, per in got.items():
    for w, z in per.items():
      report[f"logits {lib} {w} vs kd_jax"] = float(np.abs(z - ref[w]).max())
  report["logit scale (max |z|)"] = float(max(np.abs(r).max()
                                              for r in ref.values()))
  return ref


def first_steps(spec, workload, sides, ref, report, tol):
  """One step per side (compile + run, timed); the loss vs float64 NumPy,
  then the students' logits vs kd_jax's after that step."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  want = (None if workload == "intermediate" else
          reference_loss(spec, workload, ref["student"], ref["teacher"]))
  first, after = {}, {}
  for name, side in sides.items():
    t0 = time.perf_counter()
    loss = float(jax.block_until_ready(side.run()))
    first[name] = time.perf_counter() - t0
    key = f"{workload}: first loss {name}"
    report[key] = loss
    if want is not None:
      rel = abs(loss - want) / abs(want)
      report[key + " rel. error vs float64"] = rel
      if rel > tol:
        raise SystemExit(f"{workload}: {name}'s loss {loss} differs from the "
                         f"float64 reference {want} (rel. {rel:.2e})")
    after[name] = side.logits(spec.tokens[:, :-1])
  if "kd_jax" in after and workload != "intermediate":
    for name, z in after.items():
      d = float(np.abs(z - after["kd_jax"]).max())
      report[f"{workload}: student logits after 1 step, {name} vs kd_jax"] = d
  for name, side in sides.items():  # tunix and EasyDeL compile step 2 again
    warm = [first[name]]
    for _ in range(WARMUP - 1):
      t0 = time.perf_counter()
      jax.block_until_ready(side.run())
      warm.append(time.perf_counter() - t0)
    first[name] = warm
  return first


def time_sides(sides, rounds, steps):
  """{name: (median wall s, median CPU s)} over interleaved rounds."""
  import jax  # pylint: disable=g-import-not-at-top
  names = list(sides)
  wall = {n: [] for n in names}
  cpu = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names):] + names[:r % len(names)]:
      for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(sides[n].run())
        wall[n].append(time.perf_counter() - t0)
        cpu[n].append(time.process_time() - c0)
  return {n: (statistics.median(wall[n]), statistics.median(cpu[n]))
          for n in names}


def _mib(n):
  return f"{n / 2**20:.1f}"


def table(rows, tokens_per_step):
  lines = ["| workload | library | steady ms/step | CPU ms/step | compile s | "
           "compiled peak MiB (temp) | XLA GFLOP / GB accessed | tokens/s | "
           "vs kd_jax (time) | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "skip" in r and r["skip"].startswith("("):
      continue
    if "skip" in r:
      lines.append(f"| {r['workload']} | {r['side']} | – | – | – | – | – | – "
                   f"| – | not run: {r['skip']} |")
      continue
    lines.append(
        f"| {r['workload']} | {r['side']} | {r['wall'] * 1e3:.1f} | "
        f"{r['cpu'] * 1e3:.1f} | {r['compile']:.2f} | {_mib(r['peak'])} "
        f"({_mib(r['temp'])}) | {r.get('flops', 0) / 1e9:.2f} / "
        f"{r.get('bytes', 0) / 1e9:.2f} | {tokens_per_step / r['wall']:,.0f} | "
        f"{r.get('ratio', float('nan')):.2f}× | {r['note']} |")
  return "\n".join(lines)


def no_persistent_cache():
  """EasyDeL's ``ejit`` (ejkernel) turns on JAX's persistent compilation
  cache when its functions are defined; off, so that compile times are
  compiles and every run measures the same thing."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)
  cc.reset_cache()


def dump_hlo(out, workload, name, programs):
  """The optimized HLO of each program of the step, for reading why."""
  d = os.path.join(out, "hlo")
  os.makedirs(d, exist_ok=True)
  slug = name.replace(" + ", "+").replace(" ", "_")
  for i, c in enumerate(programs):
    with open(os.path.join(d, f"{workload}.{slug}.{i}.txt"), "w") as fh:
      fh.write(c.as_text())


def run_workload(spec, workload, names, cache, report, args):
  from experiments import peer_sides as ps  # pylint: disable=g-import-not-at-top
  sides = build_sides(spec, workload, names, cache)
  no_persistent_cache()
  ready = {n: s for n, s in sides.items() if not isinstance(s, str)}
  rows = [{"workload": workload, "side": n, "skip": s}
          for n, s in sides.items() if isinstance(s, str)]
  first = first_steps(spec, workload, ready, cache["ref"], report, 1e-4)
  timed = time_sides(ready, args.rounds, args.steps)
  for n, side in ready.items():
    wall, cpu = timed[n]
    programs = side.compiled()
    if args.hlo:
      dump_hlo(args.out, workload, n, programs)
    rows.append({"workload": workload, "side": n, "wall": wall, "cpu": cpu,
                 "compile": sum(first[n]) - WARMUP * wall,
                 "first_calls": first[n], **ps.memory_of(*programs),
                 **ps.cost_of(*programs), "note": side.note})
  base = next((r["wall"] for r in rows if r["side"] == "kd_jax"
               and "wall" in r), None)
  for r in rows:
    if base and "wall" in r:
      r["ratio"] = r["wall"] / base
  return sorted(rows, key=lambda r: names.index(r["side"]))


def machine():
  import jax  # pylint: disable=g-import-not-at-top
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  versions = {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax",
                                         "google-tunix", "easydel")}
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as fh:
      cpu = next(l.split(":", 1)[1].strip() for l in fh
                 if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "backend":
          jax.default_backend(), "devices": str(jax.devices()[0]),
          "versions": versions}


def inner(args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import peer_sides as ps  # pylint: disable=g-import-not-at-top
  os.makedirs(args.out, exist_ok=True)
  load0 = os.getloadavg()
  teacher_dir, student_dir = export_pair(args, args.out)
  tokens = np.random.default_rng(0).integers(
      0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
  spec = ps.Spec(teacher_dir, student_dir, tokens, args.temperature,
                 args.alpha, args.beta, chunk_size=args.chunk)
  names = [n.strip() for n in args.sides.split(",") if n.strip()]
  report, cache, rows = {}, {}, []
  if any(n.startswith("EasyDeL") for n in names):
    cache["easydel"] = ps.easydel_models(spec)
  cache["ref"] = check_models(spec, cache, report)
  for key, val in report.items():
    if key.startswith("logits") and val > 1e-4 * max(
        1.0, report["logit scale (max |z|)"]):
      raise SystemExit(f"{key}: {val:.2e}: the models disagree; not timing")
  for workload in args.workloads.split(","):
    rows += run_workload(spec, workload, names, cache, report, args)
  proj = ps.tunix_projection_params(spec)
  rows.append({"workload": "intermediate", "side": "tunix", "skip":
               f"FeatureProjectionStrategy: its projection maps [L, B, T, D] "
               f"as a whole: {proj:,} parameters ({_mib(proj * 4)} MiB "
               f"float32)"})
  info = {"machine": machine(), "load_before": load0,
          "load_after": os.getloadavg(), "args": vars(args),
          "checks": report, "rows": rows}
  with open(os.path.join(args.out, "peers.json"), "w") as fh:
    json.dump(info, fh, indent=1, default=str)
  print(json.dumps({"machine": info["machine"], "load 1/5/15 min before":
                    load0, "after": info["load_after"]}, indent=1))
  print("\nchecks:\n" + "\n".join(f"  {k}: {v:.3g}" if isinstance(v, float)
                                  else f"  {k}: {v}"
                                  for k, v in report.items()))
  print("\n" + table(rows, args.batch * args.seq))


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  if args.here or in_venv(args.venv):
    if not args.setup:
      inner(args)
    return 0
  py = ensure_venv(args.venv)
  if args.setup:
    return 0
  # EasyDeL's ejit points JAX's persistent compilation cache at
  # ~/.cache/ejkernel-cache; off from the start (compile times are compiles)
  env = dict(os.environ, PYTHONPATH=REPO,
             JAX_ENABLE_COMPILATION_CACHE="false")
  return subprocess.call([py, "-m", "experiments.benchmark_peers",
                          *(sys.argv[1:] if argv is None else argv)],
                         cwd=REPO, env=env)


if __name__ == "__main__":
  sys.exit(main())
