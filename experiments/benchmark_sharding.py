r"""Teacher sharding benchmark: per-device bytes and step time per strategy.

    python -m experiments.benchmark_sharding [--pairs cnn,vit] [--rounds 3]
        [--batch 16] [--res 32] [--cnn_teacher resnet50] [--budget_mib 256]
        [--fake_devices 8]

For each model pair -- a large ImageNet-style CNN teacher (`resnet50`, or
`resnet101` / `resnet152` with `--cnn_teacher`) -> resnet18 at `--res`
resolution, and a ViT-S-like teacher -> ViT-Tiny-like student -- and each
teacher strategy

  * `replicated`: every device holds the whole teacher (mesh `{'data': N}`);
  * `fsdp`:       the teacher FSDP-sharded over all N devices (`{'data': N}`);
  * `tensor`:     Megatron tensor parallelism of a ViT teacher over a
                  `'tensor'` axis of 2 (`{'data': N/2, 'tensor': 2}`);
                  CNNs have no logical axis names, so n/a for them,

the script prints the student state and teacher bytes per device (from the
arrays' addressable shards), XLA's temporary bytes of the compiled distill
step (`memory_analysis()`), the peak estimate `arguments + temp + outputs -
aliased` per device, and the median step time (rounds after one warm-up,
strategies interleaved so that load hits all alike).

Part 2 -- the largest teacher that fits a per-device budget (`--budget_mib`):
for each strategy, a family of teachers (ViT widths; CNN depths) is lowered
and compiled *abstractly* (`jax.ShapeDtypeStruct`s with shardings: nothing
is allocated or run) and the largest whose peak estimate fits is reported.

The student is replicated (state rules: FSDP over `'fsdp'`, size 1 here) and
trained with SGD. On CPU the device count comes from
`--xla_force_host_platform_device_count` (`--fake_devices`, set before JAX
starts); on a GPU/TPU host pass `--fake_devices 0` and all real devices are
used. CPU times are indicative only.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", default="cnn,vit")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--res", type=int, default=32)
  p.add_argument("--cnn_teacher", default="resnet50",
                 choices=("resnet34", "resnet50", "resnet101", "resnet152"))
  p.add_argument("--budget_mib", type=float, default=256.0)
  p.add_argument("--cnn_family", default="resnet34,resnet50,resnet101",
                 help="teachers tried for the budget (add resnet152)")
  p.add_argument("--fake_devices", type=int, default=8)
  p.add_argument("--no_budget", action="store_true")
  return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.fake_devices:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count="
                             f"{ARGS.fake_devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from kd_jax import train  # noqa: E402
from kd_jax.models import resnet_imagenet  # noqa: E402
from kd_jax.models import vit  # noqa: E402
from kd_jax.train import sharding as S  # noqa: E402

CNN_LAYERS = {"resnet34": ("basic", (3, 4, 6, 3)),
              "resnet50": ("bottleneck", (3, 4, 6, 3)),
              "resnet101": ("bottleneck", (3, 4, 23, 3)),
              "resnet152": ("bottleneck", (3, 8, 36, 3))}
K = 1000


def cnn(name, res):
  block, layers = CNN_LAYERS.get(name, ("basic", (2, 2, 2, 2)))
  return resnet_imagenet.ResNet(block=block, layers=layers, num_classes=K,
                                arch=name)


def vit_model(width, depth, res, heads=None):
  return vit.VisionTransformer(img_size=res, patch_size=4, embed_dim=width,
                               depth=depth, num_heads=heads or width // 64,
                               num_classes=K, logical_axes=True)


def pair(name, a):
  """(student, teacher, image shape)."""
  if name == "cnn":
    return cnn("resnet18", a.res), cnn(a.cnn_teacher, a.res)
  return vit_model(192, 6, a.res, 3), vit_model(384, 12, a.res, 6)


def strategies(name):
  n = jax.device_count()
  out = [("replicated", {"data": n}), ("fsdp", {"data": n})]
  if name == "vit" and n % 2 == 0:
    out.append(("tensor", {"data": n // 2, "tensor": 2}))
  return out


def abstract_setup(student, teacher, a, par, strategy):
  """Sharded ShapeDtypeStructs of (state, teacher vars, batch) + step."""
  x = jax.ShapeDtypeStruct((a.batch, a.res, a.res, 3), jnp.float32)
  key = jax.random.key(0)
  tx = optax.sgd(0.01, momentum=0.9)
  sv = jax.eval_shape(lambda x: nn.meta.unbox(student.init(key, x)), x)
  tv = jax.eval_shape(lambda x: nn.meta.unbox(teacher.init(key, x)), x)
  state = jax.eval_shape(
      lambda v: train.create_train_state(v, tx, rng=key), sv)
  xs = np.zeros(x.shape, np.float32)
  names = (S.logical_axis_names(teacher, xs[:1])
           if strategy == "tensor" else None)
  state = S.abstract_with_shardings(state, par.state_shardings(state))
  tv = S.abstract_with_shardings(tv, par.teacher_shardings(
      tv, strategy, logical_names=names))
  batch = {"image": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                         sharding=par.batch_sharding()),
           "label": jax.ShapeDtypeStruct((a.batch,), jnp.int32,
                                         sharding=par.batch_sharding())}
  obj = train.Objective(ce_weight=0.5,
                        terms=(train.Term("kd", 0.5, temperature=4.0),))
  step = train.make_distill_step(student, teacher, obj, tx)
  return state, tv, batch, step


def gather_schedule(compiled):
  """What XLA does with an FSDP teacher: in the scheduled ENTRY computation
  of the optimized HLO, the all-gathers and the compute ops (convolution /
  dot, fused or not) in program order. Returns (all-gathers, number of
  separate runs of consecutive all-gathers, longest run): runs ~ layers
  means weights are gathered layer by layer next to their use; one long run
  means the whole teacher is gathered up front."""
  txt = compiled.as_text()
  i = txt.find("\nENTRY")
  entry = txt[i:txt.find("\n}\n", i)] if i >= 0 else ""
  # Fusion bodies are listed before ENTRY: which of them compute.
  computes = set(re.findall(
      r"\n(?:%)?([\w.\-]+) [^\n]*\{[^}]*?(?:convolution|dot)\(", txt))
  seq = []
  for line in entry.split("\n")[1:]:
    m = re.search(r"= \S+ ([\w\-]+)\(", line)
    if not m:
      continue
    op = m.group(1)
    if op in ("all-gather", "all-gather-start"):
      seq.append("G")
    elif op in ("convolution", "dot") or (
        op == "fusion" and any(f"calls=%{c}" in line or f"calls={c}" in line
                               for c in computes)):
      seq.append("C")
  runs = [r for r in "".join(seq).split("C") if r]
  return seq.count("G"), len(runs), max((len(r) for r in runs), default=0)


def bytes_per_device(tree):
  """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return total


def peak(mem):
  return (mem["step_argument_bytes"] + mem["step_temp_bytes"] +
          mem["step_output_bytes"] - mem["step_alias_bytes"])


def measure(name, a):
  student, teacher = pair(name, a)
  rows, runs = [], []
  for strategy, mesh in strategies(name):
    par = S.MeshParallel(mesh)
    state, tv, batch, step = abstract_setup(student, teacher, a, par, strategy)
    run = par.compile(step, donate_state=False)
    t0 = time.perf_counter()
    compiled = run.lower(state, tv, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = S.step_memory(compiled)
    # Concrete zeros in the same shardings (values do not matter for time).
    zeros = lambda t: jax.tree.map(  # noqa: E731
        lambda s: jax.jit(lambda: jnp.zeros(s.shape, s.dtype),
                          out_shardings=s.sharding)()
        if not jnp.issubdtype(s.dtype, jax.dtypes.prng_key) else
        jax.device_put(jax.random.key(0), s.sharding), t)
    args = (zeros(state), zeros(tv), zeros(batch))
    rep = S.memory_report(args[0], args[1], compiled)
    rows.append(dict(pair=name, strategy=strategy, mesh=mesh,
                     compile_s=compile_s, peak=peak(mem), times=[],
                     gathers=gather_schedule(compiled), **rep))
    runs.append((compiled, args))
  for r, (compiled, args) in zip(rows, runs):  # warm-up
    jax.block_until_ready(compiled(*args))
  for _ in range(a.rounds):  # interleaved rounds
    for r, (compiled, args) in zip(rows, runs):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      r["times"].append(time.perf_counter() - t0)
  return rows


def mib(n):
  return f"{n / 2**20:8.2f}"


def print_table(rows):
  print(f"{'pair':5} {'strategy':10} {'mesh':28} {'state/dev':>9} "
        f"{'teacher/dev':>11} {'teacher':>8} {'temp':>8} {'peak/dev':>8} "
        f"{'step ms':>8} {'all-gathers (runs, longest)':>28}  (MiB)")
  for r in rows:
    mesh = str(r["mesh"])
    print(f"{r['pair']:5} {r['strategy']:10} {mesh:28} "
          f"{mib(r['state_bytes_per_device']):>9} "
          f"{mib(r['teacher_bytes_per_device']):>11} "
          f"{mib(r['teacher_bytes_total']):>8} {mib(r['step_temp_bytes']):>8} "
          f"{mib(r['peak']):>8} "
          f"{1e3 * statistics.median(r['times']):8.1f} "
          f"{'%d (%d, %d)' % r['gathers']:>28}")


def family(name, a):
  if name == "cnn":
    return [(n, cnn(n, a.res)) for n in a.cnn_family.split(",")]
  return [(f"vit-w{w}-d12", vit_model(w, 12, a.res))
          for w in (192, 384, 768, 1024, 1280)]


def largest_fitting(name, a):
  student, _ = pair(name, a)
  budget = a.budget_mib * 2**20
  print(f"\nlargest {name} teacher with peak/device <= {a.budget_mib} MiB "
        "(abstract compile, nothing allocated):")
  for strategy, mesh in strategies(name):
    par = S.MeshParallel(mesh)
    best, line = None, []
    for tname, teacher in family(name, a):
      state, tv, batch, step = abstract_setup(student, teacher, a, par,
                                              strategy)
      mem = S.step_memory(par.compile(step, donate_state=False).lower(
          state, tv, batch).compile())
      line.append(f"{tname}={peak(mem) / 2**20:.1f}")
      if peak(mem) <= budget:
        best = tname
    print(f"  {strategy:10} {str(mesh):28} -> {best or 'none'}   "
          f"[peak MiB: {', '.join(line)}]")


def main(a):
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} "
        f"({jax.devices()[0].platform}); batch {a.batch}, {a.res}x{a.res}; "
        f"load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
  rows = []
  for name in a.pairs.split(","):
    rows += measure(name, a)
  print_table(rows)
  if not a.no_budget:
    for name in a.pairs.split(","):
      largest_fitting(name, a)


if __name__ == "__main__":
  main(ARGS)
  sys.exit(0)
