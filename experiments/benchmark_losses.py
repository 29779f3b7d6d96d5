r"""Benchmark of kd_jax's response-based losses (forward and forward+backward).

For every loss and size, times the jitted forward (`mean(loss)`) and the
jitted forward+backward (`value_and_grad` w.r.t. the student logits) as the
median of many calls after warm-up, each ended by `block_until_ready`, and
prints µs/call and the effective bandwidth: bytes of both logits read once
divided by the time.

With `--torch` it also times a straightforward PyTorch eager implementation
of the same math (written below, following the authors' published code;
`loss.backward()`-style autograd for the backward), side by side in the same
run, and prints the ratio `torch time / jax time` (> 1 means kd_jax is
faster). PyTorch is only needed for this flag (`pip install -e .[bench]`);
kd_jax itself never imports torch.

Usage:
  python experiments/benchmark_losses.py                      # all sizes
  python experiments/benchmark_losses.py --torch --sizes 1024x1000
  python experiments/benchmark_losses.py --tokens --torch --min-runs 3
      # fused LM-head forward_kl + CE vs materialized, N x V x D = 2048x32768x256
  python experiments/benchmark_losses.py --features --torch   # feature losses
  python experiments/benchmark_losses.py --torch --before /path/to/old/checkout
      # adds the old checkout's fwd+bwd, interleaved in the same run
  python experiments/benchmark_losses.py --torch --sizes 1024x1000 --processes 10
      # 10 fresh processes, the spread across them (see benchmark_spread.py)

The token-level size `[8, 512, 32000]` needs a few GB; sizes whose estimated
working set does not fit in the available memory are skipped (reported).
`dist` is a batch-level loss of `[B, K]` logits: token-shaped inputs are
flattened to `[B*T, V]` (every token is a row, as in DIST's segmentation
variant).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses

try:  # pylint: disable=g-import-not-at-top
  from experiments import bench_timing
  from experiments import benchmark_features as features_bench
except ImportError:  # run as a script without the repository on sys.path
  import bench_timing  # pytype: disable=import-error
  import benchmark_features as features_bench  # pytype: disable=import-error

DEFAULT_SIZES = "256x100,1024x1000,8x512x32000"
ALL_LOSSES = ("kd", "kd_std", "dkd", "dist", "ofa", "forward_kl",
              "reverse_kl", "jsd", "tv")

# Hyperparameters used for every size (the references' defaults).
KD_T = 4.0
DKD = dict(alpha=1.0, beta=8.0, temperature=4.0)
DIST = dict(beta=1.0, gamma=1.0, temperature=4.0)
OFA = dict(eps=1.5, temperature=1.0)
JSD_BETA = 0.5


# ---------------------------------------------------------------------------
# JAX side.
# ---------------------------------------------------------------------------


def jax_losses(losses=losses) -> Dict[str, Callable]:  # pylint: disable=redefined-outer-name
  """name -> f(student, teacher, labels) -> scalar (the batch mean).

  `losses` is the module to take the functions from (`--before` passes an
  older checkout's copy).
  """
  flat = lambda x: x.reshape(-1, x.shape[-1])
  return {
      "kd": lambda s, t, y: jnp.mean(losses.kd_loss(s, t, temperature=KD_T)),
      "kd_std": lambda s, t, y: jnp.mean(losses.kd_loss(
          s, t, temperature=2.0, standardize=True)),
      "dkd": lambda s, t, y: jnp.mean(losses.dkd_loss(s, t, y, **DKD)),
      "dist": lambda s, t, y: losses.dist_loss(flat(s), flat(t), **DIST),
      "ofa": lambda s, t, y: jnp.mean(losses.ofa_loss(s, t, y, **OFA)),
      "forward_kl": lambda s, t, y: jnp.mean(losses.forward_kl(s, t)),
      "reverse_kl": lambda s, t, y: jnp.mean(losses.reverse_kl(s, t)),
      "jsd": lambda s, t, y: jnp.mean(losses.js_divergence(
          s, t, beta=JSD_BETA)),
      "tv": lambda s, t, y: jnp.mean(losses.total_variation(s, t)),
  }


def load_before_losses(checkout: str):
  """Imports `<checkout>/kd_jax/losses` as a separate module (`--before`).

  The package's files are copied to a temporary directory under the name
  `kd_jax_losses_before`, with its `kd_jax.losses` imports rewritten, so the
  old and the current losses run side by side in one process (interleaved
  timing, same load). Only `kd_jax.losses` is copied: an old checkout whose
  losses import other kd_jax modules gets the current ones.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  src = os.path.join(checkout, "kd_jax", "losses")
  if not os.path.isfile(os.path.join(src, "__init__.py")):
    raise SystemExit(f"--before: no kd_jax/losses package under {checkout!r}")
  root = tempfile.mkdtemp(prefix="kd_jax_before_")
  dst = os.path.join(root, "kd_jax_losses_before")
  os.makedirs(dst)
  for name in os.listdir(src):
    if name.endswith(".py"):
      with open(os.path.join(src, name)) as f:
        text = f.read()
      text = re.sub(r"\bfrom kd_jax\.losses import", "from kd_jax_losses_before import",
                    text)
      text = re.sub(r"\bkd_jax\.losses\b", "kd_jax_losses_before", text)
      with open(os.path.join(dst, name), "w") as f:
        f.write(text)
  sys.path.insert(0, root)
  return importlib.import_module("kd_jax_losses_before")


# ---------------------------------------------------------------------------
# PyTorch side: straightforward eager implementations of the same math.
# ---------------------------------------------------------------------------


def torch_losses() -> Dict[str, Callable]:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def kd(s, t, y, temperature=KD_T, standardize=False):
    # mdistiller kd_loss (+ logit-standardization variant).
    if standardize:
      z = lambda x: (x - x.mean(-1, keepdim=True)) / (
          1e-7 + x.std(-1, keepdim=True))
      s, t = z(s), z(t)
    log_q = F.log_softmax(s / temperature, dim=-1)
    p = F.softmax(t / temperature, dim=-1)
    return (F.kl_div(log_q, p, reduction="none").sum(-1).mean()
            * temperature**2)

  def dkd(s, t, y, alpha=DKD["alpha"], beta=DKD["beta"],
          temperature=DKD["temperature"]):
    # mdistiller dkd_loss, per token for [B, T, V] inputs.
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    y = y.reshape(-1)
    gt_mask = torch.zeros_like(s).scatter_(1, y.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(s).scatter_(1, y.unsqueeze(1), 0).bool()
    ps = F.softmax(s / temperature, dim=1)
    pt = F.softmax(t / temperature, dim=1)

    def cat_mask(p):
      return torch.cat([(p * gt_mask).sum(1, keepdim=True),
                        (p * other_mask).sum(1, keepdim=True)], dim=1)

    ps, pt = cat_mask(ps), cat_mask(pt)
    n = s.shape[0]
    tckd = (F.kl_div(torch.log(ps), pt, reduction="sum") * temperature**2 / n)
    pt2 = F.softmax(t / temperature - 1000.0 * gt_mask, dim=1)
    log_ps2 = F.log_softmax(s / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (F.kl_div(log_ps2, pt2, reduction="sum") * temperature**2 / n)
    return alpha * tckd + beta * nckd

  def dist(s, t, y, beta=DIST["beta"], gamma=DIST["gamma"],
           tau=DIST["temperature"]):
    # image_classification_sota DIST.
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])

    def pearson(a, b, eps=1e-8):
      a = a - a.mean(1, keepdim=True)
      b = b - b.mean(1, keepdim=True)
      return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    ys = (s / tau).softmax(dim=1)
    yt = (t / tau).softmax(dim=1)
    inter = tau**2 * (1 - pearson(ys, yt).mean())
    intra = tau**2 * (1 - pearson(ys.transpose(0, 1),
                                  yt.transpose(0, 1)).mean())
    return beta * inter + gamma * intra

  def ofa(s, t, y, eps=OFA["eps"], temperature=OFA["temperature"]):
    # OFAKD ofa_loss.
    ps = F.softmax(s / temperature, dim=-1)
    pt = F.softmax(t / temperature, dim=-1)
    onehot = F.one_hot(y, s.shape[-1]).to(s.dtype)
    w = (pt + onehot).pow(eps) - onehot
    return (-w * torch.log(ps)).sum(-1).mean()

  def forward_kl(s, t, y):
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1),
                    reduction="none", log_target=True).sum(-1).mean()

  def reverse_kl(s, t, y):
    return F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1),
                    reduction="none", log_target=True).sum(-1).mean()

  def jsd(s, t, y, beta=JSD_BETA):
    # TRL GKDTrainer.generalized_jsd_loss (per token, then mean).
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    beta = torch.tensor(beta, dtype=s.dtype)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - beta),
                                         log_p + torch.log(beta)]), dim=0)
    kl_t = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_s = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s).sum(-1).mean()

  def tv(s, t, y):
    return 0.5 * (F.softmax(t, -1) - F.softmax(s, -1)).abs().sum(-1).mean()

  return {
      "kd": kd,
      "kd_std": lambda s, t, y: kd(s, t, y, temperature=2.0, standardize=True),
      "dkd": dkd, "dist": dist, "ofa": ofa, "forward_kl": forward_kl,
      "reverse_kl": reverse_kl, "jsd": jsd, "tv": tv,
  }


def torch_only_row(name: str, shape: str, med: List[float]) -> Dict:
  """Prints the table row of a `--torch-only` cell; returns its record."""
  row = [name, shape, "-", "-", "-", "-", f"{med[0] * 1e6:.0f}",
         f"{med[1] * 1e6:.0f}", "-", "-"]
  print("| " + " | ".join(row) + " |", flush=True)
  return {"loss": name, "shape": shape, "torch_fwd": med[0],
          "torch_fwd_bwd": med[1]}


def mem_available_bytes() -> Optional[int]:
  try:
    with open("/proc/meminfo") as f:
      lines = [l for l in f if l.startswith("MemAvailable:")]
    return int(lines[0].split()[1]) * 1024 if lines else None
  except OSError:
    return None


def parse_sizes(text: str):
  return [tuple(int(d) for d in item.strip().lower().split("x"))
          for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
  """The command line of this script (see the module docstring)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=DEFAULT_SIZES,
                      help="comma-separated logits shapes like 1024x1000 or "
                      "8x512x32000 (default: %(default)s)")
  parser.add_argument("--losses", default=",".join(ALL_LOSSES),
                      help="comma-separated subset of " + ",".join(ALL_LOSSES))
  parser.add_argument("--torch", action="store_true",
                      help="also time straightforward PyTorch eager versions")
  parser.add_argument("--torch-only", action="store_true",
                      help="time only the PyTorch side (implies --torch; "
                      "--processes --separate pairs such processes with "
                      "JAX-only ones)")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="torch.set_num_threads (default: torch's choice)")
  parser.add_argument("--before", default=None, metavar="CHECKOUT",
                      help="also time the fwd+bwd of the losses of another "
                      "kd_jax checkout (its kd_jax/losses, imported as a "
                      "separate module), interleaved in the same run")
  parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                      help="per-call time: wall clock, or this process's CPU "
                      "time (all its threads). `cpu` is robust to other jobs "
                      "on a shared machine when everything runs on one core: "
                      "`taskset -c 1 ... --torch-threads 1 --clock cpu`")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--min-runs", type=int, default=20)
  parser.add_argument("--max-runs", type=int, default=500)
  parser.add_argument("--settle-ms", type=float, default=15.0,
                      help="ms of untimed calls before each block of timed "
                      "calls, longer than PyTorch's OpenMP spin-wait (0: "
                      "per-call interleaving, the old protocol)")
  parser.add_argument("--block", type=int, default=3,
                      help="timed calls per block (after one untimed call)")
  parser.add_argument("--budget", type=float, default=1.0,
                      help="seconds of timed calls per cell beyond min-runs")
  parser.add_argument("--max-cell-seconds", type=float, default=30.0,
                      help="stop a slow cell after 3 rounds and this long")
  parser.add_argument("--mem-factor", type=float, default=10.0,
                      help="skip a size if mem-factor x (bytes of one logits "
                      "array) exceeds MemAvailable")
  parser.add_argument("--tokens", action="store_true",
                      help="run the token section instead: fused LM-head "
                      "divergence vs materialized logits (and torch/Liger "
                      "with --torch)")
  parser.add_argument("--token-sizes", default=TOKEN_SIZES,
                      help="NxVxD sizes for --tokens (default: %(default)s)")
  parser.add_argument("--chunk-size", type=int, default=1024,
                      help="chunk size of the fused losses (--tokens)")
  parser.add_argument("--ce-weight", type=float, default=0.5,
                      help="--tokens loss: (1-w) forward_kl + w CE; 0 = no "
                      "labels (default: %(default)s)")
  parser.add_argument("--processes", type=int, default=0, metavar="N",
                      help="the logit table in N fresh processes and the "
                      "spread across them")
  parser.add_argument("--sync-dispatch", action="store_true",
                      help="run each JAX call on the calling thread "
                      "(jax_cpu_enable_async_dispatch=False): without the "
                      "hand-off to XLA's client thread, ~75 µs per call on "
                      "the 2-core VM of docs/performance.md, which dominates "
                      "small shapes")
  parser.add_argument("--separate", action="store_true",
                      help="--processes with --torch: each of the N is a pair "
                      "of fresh processes, one timing only kd_jax and one "
                      "only PyTorch (neither runtime's threads beside the "
                      "other's)")
  parser.add_argument("--order", choices=["shuffled", "fixed"],
                      default="shuffled", help="--processes: loss order")
  parser.add_argument("--shuffle-losses", type=int, metavar="SEED",
                      help=argparse.SUPPRESS)
  parser.add_argument("--json", metavar="PATH", help="also write the cells")
  parser.add_argument("--features", nargs="?", const=",".join(features_bench.FEATURE_SHAPES),
                      default=None, help="only the feature / relation loss "
                      "table (optionally a comma-separated subset of "
                      + ",".join(features_bench.FEATURE_SHAPES) + ")")
  return parser


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  args.torch = args.torch or args.torch_only
  if args.sync_dispatch:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  bench_timing.configure(args.clock, args.settle_ms, args.block)
  if args.torch_only and (args.tokens or args.features is not None
                          or args.before):
    parser.error("--torch-only applies to the logit table only (not with "
                 "--tokens, --features or --before)")
  if args.separate and not (args.processes and args.torch):
    parser.error("--separate needs --processes N and --torch")
  if args.tokens:
    return run_token_benchmark(args)
  if args.features is not None:
    return main_features(parser, args)

  names = [n.strip() for n in args.losses.split(",") if n.strip()]
  unknown = sorted(set(names) - set(ALL_LOSSES))
  if unknown:
    parser.error(f"unknown --losses {unknown}; choose from {ALL_LOSSES}")
  if args.processes:
    try:  # pylint: disable=g-import-not-at-top
      from experiments import benchmark_spread
    except ImportError:  # run as a script without the repository on sys.path
      import benchmark_spread  # pytype: disable=import-error
    benchmark_spread.run(argv, args.processes, shuffle=args.order == "shuffled",
                         separate=args.separate)
    return
  if args.shuffle_losses is not None:
    random.Random(args.shuffle_losses).shuffle(names)
  records = run_logits(names, args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"order": names, "records": records}, f)


def main_features(parser: argparse.ArgumentParser, args) -> None:
  """`--features`: the feature / relation loss table."""
  feats = [n.strip() for n in args.features.split(",") if n.strip()]
  if bad := sorted(set(feats) - set(features_bench.FEATURE_SHAPES)):
    parser.error(f"unknown --features {bad}; choose from "
                 f"{tuple(features_bench.FEATURE_SHAPES)}")
  if args.torch and args.torch_threads:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads)
  features_bench.run_features(
      feats, args, load_before_losses(args.before) if args.before else None)


def print_logits_header(args, with_before: bool) -> None:
  """The run's header lines and the table's column names."""
  torch = None
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
  print(f"# kd_jax loss benchmark | jax {jax.__version__} "
        f"backend={jax.default_backend()} devices={jax.devices()} | "
        f"{platform.processor() or platform.machine()} "
        f"cpus={os.cpu_count()} (this process: {len(os.sched_getaffinity(0))})"
        f" | dtype={args.dtype} | clock={args.clock} | dispatch="
        f"{'sync' if args.sync_dispatch else 'async'} | load avg "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        + (f" | torch {torch.__version__} threads={torch.get_num_threads()}"
           if torch is not None else ""))
  print("# median of >= %d rounds (>= 3 for cells slower than %.0f s) after "
        "%d warm-up calls; %s; GB/s = bytes of both logits / time; "
        "ratio = torch time / jax time"
        % (args.min_runs, args.max_cell_seconds, args.warmup,
           bench_timing.protocol()))
  cols = ["loss", "shape", "jax fwd µs", "GB/s", "jax fwd+bwd µs", "GB/s"]
  if with_before:
    cols += ["before fwd+bwd µs", "after speed-up"]
  if args.torch:
    cols += ["torch fwd µs", "torch fwd+bwd µs", "fwd ratio", "fwd+bwd ratio"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join(["---"] * len(cols)) + "|")


def logit_cells(f, fb, g, jax_args, torch_args, jax_side: bool) -> List:
  """The timed cells of one loss: kd_jax fwd and fwd+bwd (if `jax_side`),
  the `--before` executables (if `fb`), PyTorch fwd and fwd+bwd (if `g`)."""
  cells = []
  fwd_bwd = jax.jit(jax.value_and_grad(f))
  if jax_side:
    fwd = jax.jit(f)
    cells += [lambda: fwd(*jax_args).block_until_ready(),
              lambda: jax.block_until_ready(fwd_bwd(*jax_args))]
  if fb is not None:
    # Two executables of each side, compiled in the orders before/after
    # and after/before (geometric means reported): on this VM the
    # executable compiled second ran up to 1.3x faster for identical code.
    before_1 = jax.jit(jax.value_and_grad(lambda *a: fb(*a)))
    after_2 = jax.jit(jax.value_and_grad(lambda *a: f(*a)))
    before_2 = jax.jit(jax.value_and_grad(lambda *a: fb(*a)))
    for exe in (before_1, fwd_bwd, after_2, before_2):
      jax.block_until_ready(exe(*jax_args))
    cells += [lambda e=e: jax.block_until_ready(e(*jax_args))
              for e in (after_2, before_1, before_2)]
  if g is not None:
    import torch  # pylint: disable=g-import-not-at-top
    ts, tt, ty = torch_args

    def torch_fwd():
      with torch.no_grad():
        g(ts, tt, ty)

    def torch_fwd_bwd():
      x = ts.detach().requires_grad_(True)
      torch.autograd.grad(g(x, tt, ty), x)

    cells += [torch_fwd, torch_fwd_bwd]
  return cells


def logit_record(name: str, shape: str, med: List[float], gbytes: float,
                 with_before: bool, with_torch: bool) -> Dict:
  """Prints one row of the logit table; returns its record (seconds)."""
  t_fwd, t_bwd = med[0], med[1]
  row = [name, shape, f"{t_fwd * 1e6:.0f}", f"{gbytes / t_fwd:.2f}",
         f"{t_bwd * 1e6:.0f}", f"{gbytes / t_bwd:.2f}"]
  nj = 5 if with_before else 2
  if with_before:
    t_after = (med[1] * med[2]) ** 0.5
    t_before = (med[3] * med[4]) ** 0.5
    row[4:6] = [f"{t_after * 1e6:.0f}", f"{gbytes / t_after:.2f}"]
    row += [f"{t_before * 1e6:.0f}", f"{t_before / t_after:.2f}x"]
    t_bwd = t_after
  record = {"loss": name, "shape": shape, "jax_fwd": t_fwd,
            "jax_fwd_bwd": t_bwd, "jax_cpu_wall": bench_timing.CPU_PER_WALL[1]}
  if with_torch:
    tt_fwd, tt_bwd = med[nj], med[nj + 1]
    row += [f"{tt_fwd * 1e6:.0f}", f"{tt_bwd * 1e6:.0f}",
            f"{tt_fwd / t_fwd:.2f}x", f"{tt_bwd / t_bwd:.2f}x"]
    record.update(torch_fwd=tt_fwd, torch_fwd_bwd=tt_bwd)
  print("| " + " | ".join(row) + " |", flush=True)
  return record


def run_logits(names: List[str], args) -> List[dict]:
  """Prints the logit-loss table; returns its cells as dicts (seconds)."""
  jdtype = jnp.dtype(args.dtype)
  jl = jax_losses()
  jb = jax_losses(load_before_losses(args.before)) if args.before else None
  tl = torch_losses() if args.torch else None
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
  print_logits_header(args, jb is not None)
  timing = dict(warmup=args.warmup, min_runs=args.min_runs,
                max_runs=args.max_runs, budget_s=args.budget,
                max_cell_s=args.max_cell_seconds)
  records = []
  rng = np.random.default_rng(0)
  for shape in parse_sizes(args.sizes):
    nbytes_one = int(np.prod(shape)) * 4
    avail = mem_available_bytes()
    if avail is not None and args.mem_factor * nbytes_one > avail:
      print(f"| (skipped {'x'.join(map(str, shape))}: needs ~"
            f"{args.mem_factor * nbytes_one / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB available) |")
      continue
    s_np = (3.0 * rng.standard_normal(shape, dtype=np.float32))
    t_np = (3.0 * rng.standard_normal(shape, dtype=np.float32))
    y_np = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    jax_args = (jnp.asarray(s_np, jdtype), jnp.asarray(t_np, jdtype),
                jnp.asarray(y_np))
    torch_args = None
    if tl is not None:
      torch_args = (torch.from_numpy(s_np).to(getattr(torch, args.dtype)),
                    torch.from_numpy(t_np).to(getattr(torch, args.dtype)),
                    torch.from_numpy(y_np.astype(np.int64)))
    gbytes = 2 * int(np.prod(shape)) * jdtype.itemsize / 1e9
    shape_str = "x".join(map(str, shape))
    for name in names:
      cells = logit_cells(jl[name], jb[name] if jb else None,
                          tl[name] if tl else None, jax_args, torch_args,
                          jax_side=not args.torch_only)
      med = bench_timing.time_interleaved(cells, **timing)
      if args.torch_only:
        records.append(torch_only_row(name, shape_str, med))
      else:
        records.append(logit_record(name, shape_str, med, gbytes,
                                    jb is not None, tl is not None))
    del jax_args, torch_args
  return records


# ---------------------------------------------------------------------------
# Token section (--tokens): fused LM-head divergence vs materialized logits.
# ---------------------------------------------------------------------------

TOKEN_SIZES = "2048x32768x256"


def token_jax_fns(chunk_size: int, w: float):
  """name -> f(hs, ws, ht, wt, y) -> scalar; value_and_grad w.r.t. hs, ws.

  The loss is `mean((1 - w) forward_kl + w CE)`; `w = 0` skips the labels.
  """

  def fused(hs, ws, ht, wt, y):
    if w == 0:
      return jnp.mean(losses.fused_head_divergence(hs, ws, ht, wt,
                                                   chunk_size=chunk_size))
    div, ce = losses.fused_head_divergence(hs, ws, ht, wt, labels=y,
                                           chunk_size=chunk_size)
    return jnp.mean((1 - w) * div + w * ce)

  def materialized(hs, ws, ht, wt, y):
    s = hs @ ws
    div = losses.forward_kl(s, ht @ wt)
    ce = jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, y[:, None], -1)[:, 0]
    return jnp.mean((1 - w) * div + w * ce)

  return {"kd_jax fused": fused, "kd_jax materialized": materialized}


def token_torch_fns(chunk_size: int, w: float):
  """Same loss in PyTorch eager (materialized), and Liger's chunked loss."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def eager(hs, ws, ht, wt, y):
    s = hs @ ws
    with torch.no_grad():
      t = ht @ wt
    div = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1),
                   reduction="none", log_target=True).sum(-1)
    if w == 0:
      return div.mean()
    return ((1 - w) * div).mean() + w * F.cross_entropy(s, y)

  fns = {"torch eager materialized": eager}
  try:
    # pylint: disable-next=g-import-not-at-top
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
  except ImportError as e:
    print(f"# Liger-Kernel not importable here ({e}); skipped")
    return fns
  # beta=0 is forward KL in Liger's generalized JSD (TRL convention); its
  # weights are [V, D] (torch Linear); eager chunks (compiled=False).
  liger = LigerFusedLinearJSDLoss(weight_hard_loss=w, weight_soft_loss=1 - w,
                                  beta=0.0, compiled=False,
                                  chunk_size=chunk_size)
  fns["liger chunked (eager)"] = lambda hs, ws, ht, wt, y: liger(
      hs, ws.T.contiguous(), ht, wt.T.contiguous(), y)
  return fns


def run_token_benchmark(args) -> None:
  """Prints fwd+bwd time and peak-memory proxies of the token losses."""
  sizes = parse_sizes(args.token_sizes)
  print(f"# kd_jax token-loss benchmark | jax {jax.__version__} "
        f"backend={jax.default_backend()} | "
        f"{platform.processor() or platform.machine()} cpus={os.cpu_count()}"
        f" | chunk_size={args.chunk_size} | loss = mean({1 - args.ce_weight:g}"
        f" forward_kl + {args.ce_weight:g} CE), value_and_grad w.r.t. student"
        " hidden and kernel")
  print("# median of >= %d interleaved rounds; ratio = time / kd_jax "
        "materialized" % args.min_runs)
  print("| implementation | N x V x D | fwd+bwd ms | ratio | loss |")
  print("|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for n, v, d in sizes:
    hs = rng.standard_normal((n, d), dtype=np.float32)
    ht = rng.standard_normal((n, d), dtype=np.float32)
    ws = (2 / np.sqrt(d) * rng.standard_normal((d, v))).astype(np.float32)
    wt = (2 / np.sqrt(d) * rng.standard_normal((d, v))).astype(np.float32)
    y = rng.integers(0, v, n)
    names, cells, values = [], [], []
    jargs = [jnp.asarray(a) for a in (hs, ws, ht, wt)] + [
        jnp.asarray(y, jnp.int32)]
    for name, f in token_jax_fns(args.chunk_size, args.ce_weight).items():
      step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
      names.append(name)
      cells.append(lambda step=step: jax.block_until_ready(step(*jargs)))
      values.append(lambda step=step: float(step(*jargs)[0]))
    if args.torch:
      import torch  # pylint: disable=g-import-not-at-top
      if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
      targs = [torch.from_numpy(np.ascontiguousarray(a))
               for a in (hs, ws, ht, wt)] + [torch.from_numpy(y)]
      for name, g in token_torch_fns(args.chunk_size, args.ce_weight).items():
        def cell(g=g):
          h = targs[0].detach().requires_grad_(True)
          k = targs[1].detach().requires_grad_(True)
          loss = g(h, k, *targs[2:])
          torch.autograd.grad(loss, (h, k))
          return float(loss.detach())
        names.append(name)
        cells.append(cell)
        values.append(cell)
    med = bench_timing.time_interleaved(cells, warmup=2, min_runs=args.min_runs,
                           max_runs=args.max_runs, budget_s=args.budget,
                           max_cell_s=args.max_cell_seconds)
    base = med[names.index("kd_jax materialized")]
    for name, t, val in zip(names, med, values):
      print(f"| {name} | {n}x{v}x{d} | {t * 1e3:.0f} | {t / base:.2f} | "
            f"{val():.6f} |", flush=True)


if __name__ == "__main__":
  main()
