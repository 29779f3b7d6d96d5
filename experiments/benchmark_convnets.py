r"""CPU conv-net steps: kd_jax (this tree, optionally an older checkout) vs PyTorch.

    python -m experiments.benchmark_convnets [--workloads cnn_train,r56_r20]
        [--rounds 3] [--steps 10] [--scan 8] [--before /path/to/old/checkout]

Each cell is measured in its own fresh process (XLA reads `XLA_FLAGS` once
per process), and the processes run round-robin, `--rounds` times over all
cells, so that background load on a shared machine hits every cell alike;
a cell's number is the median over rounds of the per-process median over
`--steps` timed calls after two warm-up calls (compilation excluded).

Cells per workload:
  * `kd_jax` -- this tree, `kd_jax.xla_flags.use_fast_cpu_flags()` applied;
  * `kd_jax, no flags` -- this tree with `KD_JAX_FAST_CPU_FLAGS=0`;
  * `kd_jax scan` -- `--scan` steps per `lax.scan` call (time per step);
  * `before` / `before scan` -- `--before` (an older checkout, e.g. from
    `git worktree add /tmp/before <commit>`), default XLA flags;
  * `torch` -- a plain PyTorch eager implementation of the same step.

`--inprocess`: instead, one process per workload runs, interleaved call by
call, the kd_jax step traced with kd_jax's CPU fusion workarounds off
("before": plain weight-gradient transposes, no ResNet block fusion
boundary) and on ("after"), and the PyTorch step at 1 and at 2 threads
(`torch.set_num_threads` switched between calls); medians and minima over
`--rounds` x `--steps` calls. On a shared machine this is the fairest
comparison (every cell sees the same load).

Workloads (batch 64, Adam): `cnn_train` -- the MNIST CNN teacher's
supervised train step; `r56_r20`, `r32x4_r8x4` -- CIFAR-100 distillation
step (teacher forward in inference mode, student train step, 0.1 CE +
0.9 KD at T=4); `_bf16` suffix: bfloat16 compute (kd_jax only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS = {"r56_r20": ("resnet56", "resnet20"),
         "r32x4_r8x4": ("resnet32x4", "resnet8x4")}


def _jax_worker(workload: str, steps: int, scan: int) -> float:
  try:
    from kd_jax import xla_flags  # pylint: disable=g-import-not-at-top
    xla_flags.use_fast_cpu_flags()
  except ImportError:  # an older checkout (--before) without the helper
    pass
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  from kd_jax.train import objectives, steps as steps_lib  # pylint: disable=g-import-not-at-top
  from kd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top

  name = workload.removesuffix("_bf16")
  dtype = jnp.bfloat16 if workload.endswith("_bf16") else jnp.float32
  tx = optax.adam(1e-3)

  def make(model_name, k, shape):
    m = models.create(model_name, num_classes=k, dtype=dtype)
    v = jax.jit(lambda: m.init({"params": jax.random.key(1)},
                               jnp.zeros((1,) + shape), train=False))()
    return m, v

  if name == "cnn_train":
    k, shape = 10, (28, 28, 1)
    m, v = make("cnn_teacher", k, shape)
    fn = steps_lib.make_train_step(m, tx)
    args = lambda st: (st,)
  else:
    k, shape = 100, (32, 32, 3)
    tm, tv = make(PAIRS[name][0], k, shape)
    m, v = make(PAIRS[name][1], k, shape)
    obj = objectives.Objective(ce_weight=0.1, terms=(
        objectives.Term("kd", 0.9, temperature=4.0),))
    fn = steps_lib.make_distill_step(m, tm, obj, tx)
    args = lambda st: (st, tv)
  st = state_lib.create_train_state(v, tx, rng=jax.random.key(3))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(64,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, k, size=(64,)), jnp.int32)}
  if scan:
    fn = steps_lib.make_multi_step(fn)
    batch = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (scan,) + a.shape), batch)
  fn = jax.jit(fn)
  for _ in range(2):
    jax.block_until_ready(fn(*args(st), batch))
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args(st), batch))
    ts.append((time.perf_counter() - t0) / max(scan, 1))
  return statistics.median(ts)


def _jax_step(workload: str):
  """(compiled step thunk) for a workload, traced with the current switches."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  from kd_jax.train import objectives, steps as steps_lib  # pylint: disable=g-import-not-at-top
  from kd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  tx = optax.adam(1e-3)

  def make(name, k, shape):
    m = models.create(name, num_classes=k)
    return m, jax.jit(lambda: m.init({"params": jax.random.key(1)},
                                     jnp.zeros((1,) + shape), train=False))()

  if workload == "cnn_train":
    k, shape = 10, (28, 28, 1)
    m, v = make("cnn_teacher", k, shape)
    fn, extra = steps_lib.make_train_step(m, tx), ()
  else:
    k, shape = 100, (32, 32, 3)
    tm, tv = make(PAIRS[workload][0], k, shape)
    m, v = make(PAIRS[workload][1], k, shape)
    obj = objectives.Objective(ce_weight=0.1, terms=(
        objectives.Term("kd", 0.9, temperature=4.0),))
    fn, extra = steps_lib.make_distill_step(m, tm, obj, tx), (tv,)
  st = state_lib.create_train_state(v, tx, rng=jax.random.key(3))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(64,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, k, size=(64,)), jnp.int32)}
  comp = jax.jit(fn).lower(st, *extra, batch).compile()
  return lambda: jax.block_until_ready(comp(st, *extra, batch))


def _inprocess(workload: str, rounds: int, steps: int):
  """Interleaved before/after/torch cells in this process; prints a table."""
  from kd_jax import xla_flags  # pylint: disable=g-import-not-at-top
  flags = xla_flags.use_fast_cpu_flags()
  from kd_jax.models import _canonical_conv, resnet_cifar  # pylint: disable=g-import-not-at-top
  cells = {}
  for label, on in (("kd_jax before", False), ("kd_jax after", True)):
    _canonical_conv.LAYOUT_COPY_VIA_COND = on
    resnet_cifar.FUSION_BOUNDARY = on
    cells[label] = _jax_step(workload)
  _canonical_conv.LAYOUT_COPY_VIA_COND = resnet_cifar.FUSION_BOUNDARY = True
  import torch  # pylint: disable=g-import-not-at-top
  tstep = _torch_step(workload)
  for n in (1, 2):
    cells[f"torch {n} thread{'s' * (n > 1)}"] = (
        lambda n=n: (torch.set_num_threads(n), tstep()))
  for f in cells.values():
    f(), f()
  ts = {k: [] for k in cells}
  loads = [os.getloadavg()[0]]
  for _ in range(rounds):
    for k, f in cells.items():
      for _ in range(steps):
        t0 = time.perf_counter()
        f()
        ts[k].append(1e3 * (time.perf_counter() - t0))
    loads.append(os.getloadavg()[0])
  print(f"\n{workload}: {os.cpu_count()} CPUs, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r} (this call added "
        f"{flags['added']}), load {min(loads):.1f}-{max(loads):.1f}; "
        f"{rounds} rounds x {steps} calls per cell, interleaved")
  print("| cell | median ms | min ms | speed vs torch 1 thread | "
        "speed vs torch 2 threads |")
  print("|---|---|---|---|---|")
  t1 = statistics.median(ts["torch 1 thread"])
  t2 = statistics.median(ts["torch 2 threads"])
  for k, v in ts.items():
    m = statistics.median(v)
    print(f"| {k} | {m:.1f} | {min(v):.1f} | {t1 / m:.2f}x | {t2 / m:.2f}x |",
          flush=True)


def _torch_worker(workload: str, steps: int) -> float:
  step = _torch_step(workload)
  for _ in range(2):
    step()
  ts = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def _torch_step(workload: str):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if workload == "cnn_train":
    student = nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(512, 10))
    teacher, k, shape = None, 10, (1, 28, 28)
  else:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch_reference_models as ref  # pylint: disable=g-import-not-at-top
    teacher = ref.build(PAIRS[workload][0], 100).eval()
    student = ref.build(PAIRS[workload][1], 100)
    k, shape = 100, (3, 32, 32)
  opt = torch.optim.Adam(student.parameters(), lr=1e-3)
  x = torch.randn((64,) + shape)
  y = torch.randint(0, k, (64,))

  def logits(out):
    return out[0] if isinstance(out, tuple) else out

  def step():
    s = logits(student(x))
    loss = F.cross_entropy(s, y)
    if teacher is not None:
      with torch.no_grad():
        t = logits(teacher(x))
      kd = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1),
                    reduction="batchmean") * 16
      loss = 0.1 * loss + 0.9 * kd
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  return step


def _cells(workload, args):
  """(label, env overrides, argv) per cell."""
  # Run by path (not -m) so that PYTHONPATH decides which kd_jax is used.
  me = [sys.executable, os.path.abspath(__file__), "--worker",
        workload, "--steps", str(args.steps)]
  cells = [("kd_jax", {"PYTHONPATH": ROOT}, me),
           ("kd_jax, no flags", {"PYTHONPATH": ROOT,
                                 "KD_JAX_FAST_CPU_FLAGS": "0"}, me)]
  if args.scan:
    cells.append((f"kd_jax scan {args.scan}", {"PYTHONPATH": ROOT},
                  me + ["--scan-steps", str(args.scan)]))
  if args.before:
    old = {"PYTHONPATH": os.path.abspath(args.before) + os.pathsep + ROOT,
           "KD_JAX_FAST_CPU_FLAGS": "0"}
    cells.append(("before", old, me))
    if args.scan and args.before_scan:
      cells.append((f"before scan {args.scan}", old,
                    me + ["--scan-steps", str(args.scan)]))
  if not workload.endswith("_bf16"):
    cells.append(("torch", {"PYTHONPATH": ROOT}, me + ["--torch"]))
  return cells


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workloads", default="cnn_train,r56_r20")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--scan", type=int, default=8)
  ap.add_argument("--before", default="",
                  help="an older kd_jax checkout to compare against")
  ap.add_argument("--before-scan", action="store_true",
                  help="also time the old checkout's scanned step (slow)")
  ap.add_argument("--torch-threads", type=int, default=0)
  ap.add_argument("--inprocess", action="store_true",
                  help="interleaved before/after/torch cells in one process")
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--scan-steps", type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    if args.torch:
      if args.torch_threads:
        __import__("torch").set_num_threads(args.torch_threads)
      sec = _torch_worker(args.worker, args.steps)
    else:
      sec = _jax_worker(args.worker, args.steps, args.scan_steps)
    print(json.dumps({"ms": sec * 1e3}))
    return
  if args.inprocess:
    for w in args.workloads.split(","):
      _inprocess(w, args.rounds, args.steps)
    return
  results = {}
  for r in range(args.rounds):
    for w in args.workloads.split(","):
      for label, env, cmd in _cells(w, args):
        if args.torch_threads and "--torch" in cmd:
          cmd = cmd + ["--torch-threads", str(args.torch_threads)]
        e = dict(os.environ, **env)
        e.pop("XLA_FLAGS", None)
        out = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True,
                             text=True, check=False)
        if out.returncode:
          print(f"# {w} / {label} failed: {out.stderr[-500:]}", flush=True)
          continue
        ms = json.loads(out.stdout.strip().splitlines()[-1])["ms"]
        results.setdefault((w, label), []).append(ms)
        print(f"# round {r}: {w} / {label}: {ms:.1f} ms "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
  print(f"\n{os.cpu_count()} CPUs; medians over {args.rounds} rounds of "
        f"per-process medians of {args.steps} steps; ms per step.\n")
  print("| workload | cell | ms/step | torch ms / cell ms |")
  print("|---|---|---|---|")
  for w in args.workloads.split(","):
    t = results.get((w.replace("_bf16", ""), "torch"))
    tm = statistics.median(t) if t else None
    for (ww, label), v in results.items():
      if ww != w:
        continue
      m = statistics.median(v)
      ratio = f"{tm / m:.2f}x" if tm else ""
      print(f"| {w} | {label} | {m:.1f} | {ratio} |")


if __name__ == "__main__":
  main()
