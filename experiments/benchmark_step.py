r"""Step benchmark: is distillation more than running both networks?

    python -m experiments.benchmark_step [--pairs mnist_mlp,cifar_r32x4_r8x4]
        [--rounds 30] [--scan 32] [--torch] [--epochs 5]
    python -m experiments.benchmark_step --suite=accelerator [--batch 256]
        [--accel-pairs imagenet_r34_r18] [--peak-tflops 989]

`--suite=accelerator`: examples/s and model-FLOPs utilization (XLA's cost
analysis FLOPs of the compiled distillation step / time / the device's peak
from `PEAK_TFLOPS`, or `--peak-tflops`) of CIFAR ResNet pairs, ResNet-34 ->
ResNet-18 and ResNet-50 -> ViT-Tiny/16 at 224x224, float32 and bfloat16,
on whatever backend JAX finds (one device).

Part 1 -- per model pair, the median time after warm-up (jitted, rounds
interleaved a/b/c so that load on a shared machine hits all three alike) of

  (a) the teacher forward pass (inference mode),
  (b) a plain supervised student train step (forward, backward, optax update),
  (c) the distillation step (teacher forward + student train step + KD loss),

each measured two ways: one jitted call per step, and `--scan` steps compiled
into one `lax.scan` call (time per step; no dispatch overhead). Printed:
(c) / ((a) + (b)) -- target <= 1.10 -- and examples/s.

Part 2 (`--torch`) -- the MNIST seed recipe's distillation phase end to end
(MLP 784-512-256-10 teacher, dropout 0.5, in inference mode; MLP 784-128-10
student; batch 64; Adam 1e-3; 0.7 CE + 0.3 KD, T=5), data loading included:
kd_jax's trainer (`kd_jax.trainer.train_and_evaluate`: the scanned
multi-step, one call per epoch, the training split on device and the batch
gather inside the program) against a plain
PyTorch eager implementation of the same recipe written here (in-memory
tensors, one Python step per batch). Both read the same decoded MNIST arrays;
the decode itself is excluded from both. Target: kd_jax >= 3x PyTorch's
examples/s. Needs real MNIST (`TFDS_DATA_DIR`) or falls back to random data.

Timings on a shared machine are noisy; run it on an idle one for the record.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

from kd_jax import xla_flags  # before JAX starts a backend
FLAGS_APPLIED = xla_flags.use_fast_cpu_flags()  # KD_JAX_FAST_CPU_FLAGS=0: off

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import models
from kd_jax.train import objectives
from kd_jax.train import state as state_lib
from kd_jax.train import steps

# name -> (teacher, student, num_classes, input shape, batch, objective)
PAIRS = {
    "mnist_mlp": ("mlp_teacher", "mlp_student", 10, (28, 28, 1), 64,
                  dict(ce=0.7, kd=0.3, t=5.0)),
    "mnist_cnn": ("cnn_teacher", "mlp_student", 10, (28, 28, 1), 64,
                  dict(ce=0.7, kd=0.3, t=5.0)),
    "cifar_r56_r20": ("resnet56", "resnet20", 100, (32, 32, 3), 64,
                      dict(ce=0.1, kd=0.9, t=4.0)),
    "cifar_r32x4_r8x4": ("resnet32x4", "resnet8x4", 100, (32, 32, 3), 64,
                         dict(ce=0.1, kd=0.9, t=4.0)),
    "cifar_wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2", 100, (32, 32, 3), 64,
                              dict(ce=0.1, kd=0.9, t=4.0)),
    "cifar_vgg13_vgg8": ("vgg13", "vgg8", 100, (32, 32, 3), 64,
                         dict(ce=0.1, kd=0.9, t=4.0)),
}
DEFAULT_PAIRS = "mnist_mlp,mnist_cnn,cifar_r56_r20,cifar_vgg13_vgg8"


def _block(x):
  return jax.block_until_ready(x)


def _is_conv(name: str) -> bool:
  return not name.endswith("_mlp")


def _bench_pair(name: str, rounds: int, scan: int) -> Dict[str, float]:
  tname, sname, k, shape, bs, obj_cfg = PAIRS[name]
  teacher = models.create(tname, num_classes=k)
  student = models.create(sname, num_classes=k)
  x0 = jnp.zeros((1,) + shape)
  tv = teacher.init({"params": jax.random.key(1)}, x0, train=False)
  sv = student.init({"params": jax.random.key(2)}, x0, train=False)
  tx = optax.adam(1e-3)
  objective = objectives.Objective(
      ce_weight=obj_cfg["ce"],
      terms=(objectives.Term("kd", obj_cfg["kd"], temperature=obj_cfg["t"]),))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(bs,) + shape), jnp.float32),
           "label": jnp.asarray(rng.integers(0, k, size=(bs,)), jnp.int32)}
  chunk = jax.tree_util.tree_map(
      lambda v: jnp.broadcast_to(v, (scan,) + v.shape), batch)

  def fwd(tv, b):
    return steps.teacher_forward(teacher, tv, b["image"])[0]

  def fwd_scan(tv, bs_):
    def body(acc, b):
      return acc + jnp.sum(fwd(tv, b)), None
    return jax.lax.scan(body, jnp.float32(0), bs_)[0]

  train = steps.make_train_step(student, tx)
  distill = steps.make_distill_step(student, teacher, objective, tx)
  fns = {
      "a": (jax.jit(fwd), lambda f, st: f(tv, batch)),
      "b": (jax.jit(train), lambda f, st: f(st, batch)),
      "c": (jax.jit(distill), lambda f, st: f(st, tv, batch)),
  }
  if scan:
    fns.update({
        "a_scan": (jax.jit(fwd_scan), lambda f, st: f(tv, chunk)),
        "b_scan": (jax.jit(steps.make_multi_step(train)),
                   lambda f, st: f(st, chunk)),
        "c_scan": (jax.jit(steps.make_multi_step(distill)),
                   lambda f, st: f(st, tv, chunk)),
    })
  state = state_lib.create_train_state(sv, tx, rng=jax.random.key(3))
  times: Dict[str, List[float]] = {key: [] for key in fns}
  for key, (f, call) in fns.items():  # compile + warm up
    _block(call(f, state))
    _block(call(f, state))
  for _ in range(rounds):
    for key, (f, call) in fns.items():
      t0 = time.perf_counter()
      _block(call(f, state))
      dt = time.perf_counter() - t0
      times[key].append(dt / (scan if key.endswith("_scan") else 1))
  med = {key: statistics.median(v) for key, v in times.items()}
  med["batch"] = bs
  return med


def part1(pairs: List[str], rounds: int, scan: int, conv_rounds: int,
          scan_convs: bool):
  print(f"\n## (c) distillation step vs (a) teacher forward + (b) student "
        f"train step\n\nMedian of {rounds} ({conv_rounds} for conv nets) "
        f"interleaved rounds after warm-up; 'scan' = {scan} steps per "
        "compiled call (time per step; MLP pairs only unless --scan-convs, "
        "to keep the default run short).\n")
  print("| pair | mode | (a) teacher fwd ms | (b) student step ms | "
        "(c) distill step ms | (c)/((a)+(b)) | distill examples/s | "
        "target <= 1.10 |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for p in pairs:
    conv = _is_conv(p)
    do_scan = scan if (not conv or scan_convs) else 0
    m = _bench_pair(p, conv_rounds if conv else rounds, do_scan)
    for mode, sfx in (("jit/step", ""), ("scan", "_scan"))[:2 if do_scan else 1]:
      a, b, c = m["a" + sfx], m["b" + sfx], m["c" + sfx]
      ratio = c / (a + b)
      rows.append((p, mode, ratio))
      print(f"| {p} | {mode} | {a * 1e3:.3f} | {b * 1e3:.3f} | "
            f"{c * 1e3:.3f} | {ratio:.3f} | {m['batch'] / c:,.0f} | "
            f"{'yes' if ratio <= 1.10 else 'NO'} |", flush=True)
  return rows


# ---------------------------------------------------------------------------
# Part 2: the MNIST distillation phase vs PyTorch eager.


def _mnist_arrays():
  from kd_jax.data import sources  # pylint: disable=g-import-not-at-top
  d = os.environ.get("TFDS_DATA_DIR")
  if d and os.path.isdir(os.path.join(d, "mnist")):
    x, y = sources.load_arrays("mnist", "train", data_dir=d)
    xt, yt = sources.load_arrays("mnist", "test", data_dir=d)
    return (x, y, xt, yt), "real MNIST"
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
  y = rng.integers(0, 10, (60000,)).astype(np.int32)
  return (x, y, x[:10000], y[:10000]), "random data (no TFDS_DATA_DIR)"


def torch_distill_phase(x, y, xt, yt, epochs: int, seed: int = 0,
                        threads: int = 0):
  """The seed recipe's distillation phase in plain PyTorch eager."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(512, 256), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(256, 10)).eval()
  student = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(),
                          nn.Linear(128, 10))
  opt = torch.optim.Adam(student.parameters(), lr=1e-3)
  mean, std = 0.1307, 0.3081
  t_load = time.perf_counter()
  X = (torch.from_numpy(x).float().div_(255.0) - mean) / std
  X = X.permute(0, 3, 1, 2).contiguous()
  Y = torch.from_numpy(y.astype(np.int64))
  load_s = time.perf_counter() - t_load
  T, bs, n = 5.0, 64, X.shape[0]
  steps_per_epoch = n // bs
  t0 = time.perf_counter()
  for _ in range(epochs):
    perm = torch.randperm(n)
    for i in range(steps_per_epoch):
      idx = perm[i * bs:(i + 1) * bs]
      xb, yb = X[idx], Y[idx]
      with torch.no_grad():
        tl = teacher(xb)
      sl = student(xb)
      ce = F.cross_entropy(sl, yb)
      kd = F.kl_div(F.log_softmax(sl / T, 1), F.softmax(tl / T, 1),
                    reduction="batchmean") * T * T
      loss = 0.7 * ce + 0.3 * kd
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
  train_s = time.perf_counter() - t0
  with torch.no_grad():
    Xt = ((torch.from_numpy(xt).float() / 255.0 - mean) / std).permute(
        0, 3, 1, 2)
    acc = (student(Xt).argmax(1).numpy() == yt).mean()
  return {"train_s": train_s, "examples_per_sec":
          epochs * steps_per_epoch * bs / train_s, "top1": float(acc),
          "tensor_prep_s": load_s, "threads": torch.get_num_threads()}


def jax_distill_phase(epochs: int, data_dir, workdir: str):
  """kd_jax's trainer on the seed recipe's distillation phase (configs/mnist.py)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from configs import mnist as mnist_cfg  # pylint: disable=g-import-not-at-top
  from kd_jax import trainer as loop  # pylint: disable=g-import-not-at-top
  t = mnist_cfg.get_config("teacher")
  d = mnist_cfg.get_config("distill")
  for c in (t, d):
    c.data.data_dir = data_dir or ""
    c.data.mock = not data_dir
    c.data.mock_num_examples = 60000
    c.train.progress_bar = False
  # A 1-epoch teacher to distill from (its accuracy does not change speed).
  t.train.num_epochs = 1
  loop.train_and_evaluate(t, os.path.join(workdir, "teacher"))
  d.teacher.checkpoint = os.path.join(workdir, "teacher")
  d.teacher.evaluate = False
  d.train.num_epochs = epochs
  d.train.eval_every_epochs = epochs  # one evaluation, at the end
  d.checkpoint.enabled = False
  rep = loop.train_and_evaluate(d, os.path.join(workdir, "distill"))
  return rep


def part2(epochs: int, repeats: int, torch_threads: int = 0):
  (x, y, xt, yt), what = _mnist_arrays()
  data_dir = os.environ.get("TFDS_DATA_DIR") if what == "real MNIST" else None
  print(f"\n## MNIST seed recipe, distillation phase ({epochs} epochs, batch "
        f"64, {what}): kd_jax trainer vs PyTorch eager\n")
  tor, jx = [], []
  for r in range(repeats):
    tor.append(torch_distill_phase(x, y, xt, yt, epochs, seed=r,
                                   threads=torch_threads))
    with tempfile.TemporaryDirectory() as wd:
      from kd_jax import trainer as loop  # pylint: disable=g-import-not-at-top
      loop.clear_program_cache()  # count compilation every repeat
      jx.append(jax_distill_phase(epochs, data_dir, wd))
  t_eps = statistics.median(r["examples_per_sec"] for r in tor)
  j_eps = statistics.median(r["examples_per_sec"] for r in jx)
  j_steady = statistics.median(r["steady_examples_per_sec"] for r in jx)
  print("| implementation | examples/s | train s | test top-1 | notes |")
  print("|---|---|---|---|---|")
  print(f"| PyTorch {__import__('torch').__version__} eager | {t_eps:,.0f} | "
        f"{statistics.median(r['train_s'] for r in tor):.2f} | "
        f"{100 * tor[-1]['top1']:.2f} | {tor[-1]['threads']} threads, "
        "in-memory tensors, one Python step per batch |")
  print(f"| kd_jax trainer | {j_eps:,.0f} | "
        f"{statistics.median(r['train_s'] for r in jx):.2f} | "
        f"{100 * jx[-1]['last_top1']:.2f} | train loop incl. compilation; "
        "training split on device, per-chunk example indices from the host; "
        f"up to {jx[-1]['steps_per_call']} steps (one epoch) per scanned "
        "call |")
  print(f"| kd_jax trainer, steady state | {j_steady:,.0f} | | | after the "
        "first (compiling) call |")
  print("\nEvery repeat (examples/s; interleaved PyTorch, kd_jax): " + ", ".join(
      f"({t['examples_per_sec']:,.0f}, {j['examples_per_sec']:,.0f} / steady "
      f"{j['steady_examples_per_sec']:,.0f})" for t, j in zip(tor, jx)))
  print(f"\nkd_jax / PyTorch (medians): {j_eps / t_eps:.2f}x (incl. compilation), "
        f"{j_steady / t_eps:.2f}x (steady); target >= 3x.")
  return j_eps / t_eps


# ---------------------------------------------------------------------------
# --suite=accelerator: examples/s and MFU of the distillation step.

# name -> (teacher, student, num_classes, input shape, default batch)
ACCEL_PAIRS = {
    "cifar_r56_r20": ("resnet56", "resnet20", 100, (32, 32, 3), 256),
    "cifar_r32x4_r8x4": ("resnet32x4", "resnet8x4", 100, (32, 32, 3), 256),
    "imagenet_r34_r18": ("resnet34", "resnet18", 1000, (224, 224, 3), 256),
    # OFA's cross-architecture pair: ResNet-50 teacher, DeiT-Tiny student.
    "imagenet_r50_vit_tiny": ("resnet50", "vit_tiny_patch16_224", 1000,
                              (224, 224, 3), 256),
}

# Dense peak TFLOP/s per device kind (vendor data sheets), by compute dtype.
# float32 on NVIDIA: XLA's default matmul precision uses TF32 tensor cores.
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},   # SXM; H200 same chip
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "V100": {"bfloat16": 125.0, "float32": 15.7},     # fp16 tensor cores
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},
}


def device_peak_tflops(device, dtype: str, override: float = 0.0):
  """Peak TFLOP/s of `device` for `dtype` (None if unknown, e.g. CPUs)."""
  if override:
    return override
  kind = getattr(device, "device_kind", "")
  for key, peaks in PEAK_TFLOPS.items():
    if key.lower() in kind.lower():
      return peaks[dtype]
  return None


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _accel_cell(pair: str, dtype: str, batch: int, steps_n: int):
  """(seconds per step, XLA flops per step) of one distillation step."""
  tname, sname, k, shape, _ = ACCEL_PAIRS[pair]
  dt = jnp.dtype(dtype)
  teacher = models.create(tname, num_classes=k, dtype=dt)
  student = models.create(sname, num_classes=k, dtype=dt)
  x0 = jnp.zeros((1,) + shape)
  tv = jax.jit(lambda: teacher.init({"params": jax.random.key(1)}, x0,
                                    train=False))()
  sv = jax.jit(lambda: student.init({"params": jax.random.key(2)}, x0,
                                    train=False))()
  tx = optax.sgd(0.05, momentum=0.9)
  objective = objectives.Objective(ce_weight=0.1, terms=(
      objectives.Term("kd", 0.9, temperature=4.0),))
  step = jax.jit(steps.make_distill_step(student, teacher, objective, tx),
                 donate_argnums=0)
  state = state_lib.create_train_state(sv, tx, rng=jax.random.key(3))
  rng = np.random.default_rng(0)
  batch_ = {"image": jnp.asarray(rng.normal(size=(batch,) + shape),
                                 jnp.float32),
            "label": jnp.asarray(rng.integers(0, k, size=(batch,)),
                                 jnp.int32)}
  compiled = step.lower(state, tv, batch_).compile()
  flops = _xla_flops(compiled)
  for _ in range(2):
    state, _ = _block(compiled(state, tv, batch_))
  times = []
  for _ in range(steps_n):
    t0 = time.perf_counter()
    state, _ = _block(compiled(state, tv, batch_))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), flops


def accelerator_suite(pairs: List[str], dtypes: List[str], batch: int,
                      steps_n: int, peak_override: float):
  dev = jax.devices()[0]
  print(f"\n## Distillation step on {dev.platform} ({dev.device_kind}), "
        f"{len(jax.devices())} device(s); one device used; median of "
        f"{steps_n} steps after 2 warm-up steps; FLOPs from XLA's cost "
        "analysis of the compiled step (teacher forward + student forward "
        "and backward + update); MFU = FLOPs / time / peak.\n")
  print("| pair | dtype | batch | ms/step | examples/s | GFLOP/step | "
        "TFLOP/s | peak TFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|---|---|")
  for p in pairs:
    b = batch or ACCEL_PAIRS[p][4]
    for dtype in dtypes:
      sec, flops = _accel_cell(p, dtype, b, steps_n)
      peak = device_peak_tflops(dev, dtype, peak_override)
      achieved = flops / sec / 1e12
      mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
      print(f"| {p} | {dtype} | {b} | {sec * 1e3:.1f} | {b / sec:,.0f} | "
            f"{flops / 1e9:.1f} | {achieved:.2f} | "
            f"{peak if peak else 'unknown'} | {mfu} |", flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--pairs", default=DEFAULT_PAIRS,
                  help=f"comma-separated, from {', '.join(PAIRS)}")
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--scan", type=int, default=32,
                  help="steps per scanned call (0: no scan mode)")
  ap.add_argument("--conv-rounds", type=int, default=7,
                  help="rounds for pairs of conv nets (slow on CPU)")
  ap.add_argument("--scan-convs", action="store_true",
                  help="also time conv pairs in scan mode")
  ap.add_argument("--torch", action="store_true",
                  help="also run part 2 (MNIST phase vs PyTorch eager)")
  ap.add_argument("--epochs", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--torch-threads", type=int, default=0,
                  help="torch.set_num_threads (0: PyTorch's default). On a "
                       "machine shared with other jobs, PyTorch's default "
                       "intra-op threads can slow down by 10x or more.")
  ap.add_argument("--skip-steps", action="store_true",
                  help="skip part 1")
  ap.add_argument("--suite", default="cpu", choices=["cpu", "accelerator"],
                  help="accelerator: examples/s and MFU of the distill step "
                  "for --accel-pairs in float32 and bfloat16")
  ap.add_argument("--accel-pairs", default=",".join(ACCEL_PAIRS),
                  help=f"comma-separated, from {', '.join(ACCEL_PAIRS)}")
  ap.add_argument("--accel-dtypes", default="float32,bfloat16")
  ap.add_argument("--batch", type=int, default=0,
                  help="accelerator suite batch (0: per pair, 256)")
  ap.add_argument("--steps", type=int, default=20,
                  help="timed steps per accelerator cell")
  ap.add_argument("--peak-tflops", type=float, default=0.0,
                  help="device peak TFLOP/s for MFU (default: from a table "
                  "of known devices; CPUs have none)")
  args = ap.parse_args(argv)
  print(f"Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; JAX {jax.__version__} on "
        f"{jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (kd_jax added "
        f"{FLAGS_APPLIED['added']}).")
  if args.suite == "accelerator":
    pairs = [p for p in args.accel_pairs.split(",") if p]
    for p in pairs:
      if p not in ACCEL_PAIRS:
        ap.error(f"unknown pair {p!r}; choose from {', '.join(ACCEL_PAIRS)}")
    dtypes = [d for d in args.accel_dtypes.split(",") if d]
    for d in dtypes:
      if d not in ("float32", "bfloat16"):
        ap.error(f"--accel-dtypes: {d!r} is not float32 or bfloat16")
    accelerator_suite(pairs, dtypes, args.batch, args.steps, args.peak_tflops)
    return
  if not args.skip_steps:
    pairs = [p for p in args.pairs.split(",") if p]
    for p in pairs:
      if p not in PAIRS:
        ap.error(f"unknown pair {p!r}; choose from {', '.join(PAIRS)}")
    part1(pairs, args.rounds, args.scan, args.conv_rounds, args.scan_convs)
  if args.torch:
    part2(args.epochs, args.repeats, args.torch_threads)


if __name__ == "__main__":
  main()
