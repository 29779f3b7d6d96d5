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
import statistics
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses

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


# ---------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------


CLOCK = time.perf_counter
"""Per-call clock: wall time, or `time.process_time` with `--clock cpu`."""
CPU_PER_WALL: List[float] = []  # last time_interleaved: median CPU/wall per fn
SETTLE_S = 0.015
"""Untimed calls of a cell, for at least this long, before its timed block.

PyTorch's OpenMP worker threads busy-wait after every parallel region
(libgomp's default spin: ~5 ms of one core on the 2-core VM of
docs/performance.md, longer in wall time when it shares the core), and a
jitted JAX call that starts inside that window runs its two-thread kernels on
one free core (1.5-2x slower). Keeping the machine busy with the next cell's
own untimed calls until the spin is over gives each side the machine as it
would have it in a process of its own. (Idling instead is worse: on this VM
the first ~20 ms of work after an idle gap of >= 20 ms run up to 2x slower.)
"""
BLOCK = 3
"""Timed calls per block (`--block`), after the untimed `SETTLE_S`."""


def torch_only_row(name: str, shape: str, med: List[float]) -> Dict:
  """Prints the table row of a `--torch-only` cell; returns its record."""
  row = [name, shape, "-", "-", "-", "-", f"{med[0] * 1e6:.0f}",
         f"{med[1] * 1e6:.0f}", "-", "-"]
  print("| " + " | ".join(row) + " |", flush=True)
  return {"loss": name, "shape": shape, "torch_fwd": med[0],
          "torch_fwd_bwd": med[1]}


def protocol() -> str:
  """The timing protocol in words, for the table headers."""
  if SETTLE_S <= 0:
    return "cells interleaved call by call"
  return (f"cells interleaved in blocks (>= {SETTLE_S * 1e3:.0f} ms of "
          f"untimed calls, then {BLOCK} timed calls)")


def time_interleaved(fns: List[Callable[[], None]], *, warmup: int,
                     min_runs: int, max_runs: int, budget_s: float,
                     max_cell_s: float) -> List[float]:
  """Median seconds per call of each `fn` (each must block until done).

  The functions are timed in rounds, each visiting every function once in a
  new random order (no cell always follows the same one), so a change in
  background load affects all of them alike: on a shared machine the
  *ratios* stay meaningful even when absolute times drift. A visit is a
  block: untimed calls for at least `SETTLE_S` (the previous block's runtime
  parks its spinning threads, this one's wake up), then `BLOCK` timed calls
  back to back, as in a process that runs only this function. Runs at least `min_runs` rounds and `budget_s` seconds, except
  that slow cells (large token-level sizes) stop after 3 rounds once
  `max_cell_s` has passed.
  """
  for fn in fns:
    for i in range(warmup):
      t0 = time.perf_counter()
      fn()
      if i >= 1 and time.perf_counter() - t0 > 0.5:
        break  # slow cell: compiled and warm after 2 calls
  times: List[List[float]] = [[] for _ in fns]
  ratios: List[List[float]] = [[] for _ in fns]
  start = time.perf_counter()
  rounds = 0
  order = list(range(len(fns)))
  shuffle = random.Random(0).shuffle
  while rounds < max_runs:
    elapsed = time.perf_counter() - start
    if rounds >= min_runs and elapsed >= budget_s:
      break
    if rounds >= 3 and elapsed >= max_cell_s:
      break
    shuffle(order)
    for i in order:
      if SETTLE_S > 0:
        t0 = time.perf_counter()
        fns[i]()
        while time.perf_counter() - t0 < SETTLE_S:
          fns[i]()
      for _ in range(max(1, BLOCK)):
        w0, c0 = time.perf_counter(), time.process_time()
        fns[i]()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        times[i].append(c if CLOCK is time.process_time else w)
        ratios[i].append(c / max(w, 1e-9))
    rounds += 1
  CPU_PER_WALL[:] = [statistics.median(r) for r in ratios]
  return [statistics.median(ts) for ts in times]


# ---------------------------------------------------------------------------
# Feature / relation losses (`--features`): CIFAR-ResNet-sized features at
# batch 64 (a [64, 16, 16, 128] / [64, 8, 8, 256] stage, [64, 256]
# embeddings); torch versions follow RepDistiller (`distiller_zoo/*.py`) on
# NCHW copies of the same arrays.
# ---------------------------------------------------------------------------

FEATURE_SHAPES = {  # name -> (student shape, teacher shape), NHWC / [B, D]
    "fitnet": ((64, 8, 8, 256), (64, 8, 8, 256)),
    "at": ((64, 16, 16, 128), (64, 16, 16, 128)),
    "nst": ((64, 8, 8, 256), (64, 8, 8, 256)),
    "ft": ((64, 8, 8, 256), (64, 8, 8, 256)),
    "vid": ((64, 8, 8, 256), (64, 8, 8, 256)),
    "hcl": ((64, 8, 8, 256), (64, 8, 8, 256)),
    "sp": ((64, 8, 8, 256), (64, 8, 8, 256)),
    "pkt": ((64, 256), (64, 256)),
    "rkd": ((64, 256), (64, 256)),
    "cc": ((64, 256), (64, 256)),
}


def jax_feature_losses(losses=losses) -> Dict[str, Callable]:  # pylint: disable=redefined-outer-name
  """name -> f(student, teacher, log_scale) -> scalar (`losses`: as above)."""
  return {
      "fitnet": lambda s, t, ls: losses.fitnet_loss(s, t),
      "at": lambda s, t, ls: losses.at_loss(s, t),
      "nst": lambda s, t, ls: losses.nst_loss(s, t),
      "ft": lambda s, t, ls: losses.ft_loss(s, t),
      "vid": lambda s, t, ls: losses.vid_loss(s, t, ls),
      "hcl": lambda s, t, ls: losses.hcl_loss([s], [t]),
      "sp": lambda s, t, ls: losses.sp_loss(s, t),
      "pkt": lambda s, t, ls: losses.pkt_loss(s, t),
      "rkd": lambda s, t, ls: losses.rkd_loss(s, t),
      "cc": lambda s, t, ls: losses.cc_loss(s, t),
  }


def torch_feature_losses() -> Dict[str, Callable]:
  """The same losses in PyTorch eager, NCHW inputs (RepDistiller code)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def at(f, p=2):
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

  def nst(s, t):
    s = F.normalize(s.view(s.shape[0], s.shape[1], -1), dim=2)
    t = F.normalize(t.view(t.shape[0], t.shape[1], -1), dim=2)
    k = lambda a, b: torch.bmm(a, b.transpose(1, 2)).pow(2).mean()
    return k(t, t) + k(s, s) - 2 * k(s, t)

  def vid(s, t, ls, eps=1e-5):
    var = F.softplus(ls) + eps
    var = var.view(1, -1, 1, 1)
    return torch.mean(0.5 * ((s - t) ** 2 / var + torch.log(var)))

  def hcl(s, t):
    loss = F.mse_loss(s, t, reduction="mean")
    cnt, tot = 1.0, 1.0
    for l in (4, 2, 1):
      if l >= s.shape[2]:
        continue
      cnt /= 2.0
      loss = loss + F.mse_loss(F.adaptive_avg_pool2d(s, (l, l)),
                               F.adaptive_avg_pool2d(t, (l, l))) * cnt
      tot += cnt
    return loss / tot

  def sp(s, t):
    b = s.shape[0]
    gs = F.normalize(torch.mm(s.view(b, -1), s.view(b, -1).t()))
    gt = F.normalize(torch.mm(t.view(b, -1), t.view(b, -1).t()))
    return ((gt - gs) ** 2).view(-1, 1).sum(0)[0] / (b * b)

  def pkt(s, t, eps=1e-7):
    def probs(f):
      f = f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)
      f[f != f] = 0
      m = (torch.mm(f, f.transpose(0, 1)) + 1.0) / 2.0
      return m / torch.sum(m, dim=1, keepdim=True)
    ps, pt = probs(s), probs(t)
    return torch.mean(pt * torch.log((pt + eps) / (ps + eps)))

  def rkd(s, t, wd=25.0, wa=50.0):
    def pdist(e, eps=1e-12):
      sq = e.pow(2).sum(dim=1)
      prod = e @ e.t()
      res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * prod).clamp(min=eps)
      res = res.sqrt().clone()
      res[range(len(e)), range(len(e))] = 0
      return res

    def angle(e):
      d = e.unsqueeze(0) - e.unsqueeze(1)
      n = F.normalize(d, p=2, dim=2)
      return torch.bmm(n, n.transpose(1, 2)).view(-1)

    with torch.no_grad():
      td = pdist(t)
      td = td / td[td > 0].mean()
      ta = angle(t)
    d = pdist(s)
    d = d / d[d > 0].mean()
    return (wd * F.smooth_l1_loss(d, td)
            + wa * F.smooth_l1_loss(angle(s), ta))

  def cc(s, t):
    delta = torch.abs(s - t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))

  return {
      "fitnet": lambda s, t, ls: F.mse_loss(s, t),
      "at": lambda s, t, ls: (at(s) - at(t)).pow(2).mean(),
      "nst": lambda s, t, ls: nst(s, t),
      "ft": lambda s, t, ls: (at(s) - at(t)).abs().mean(),
      "vid": vid,
      "hcl": lambda s, t, ls: hcl(s, t),
      "sp": lambda s, t, ls: sp(s, t),
      "pkt": lambda s, t, ls: pkt(s, t),
      "rkd": lambda s, t, ls: rkd(s, t),
      "cc": lambda s, t, ls: cc(s, t),
  }


def run_features(names: List[str], args) -> None:
  """Prints the feature / relation loss table (fwd and fwd+bwd, µs)."""
  jl = jax_feature_losses()
  jb = jax_feature_losses(load_before_losses(args.before)) if args.before else None
  tl = torch_feature_losses() if args.torch else None
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
  print("\n## feature / relation losses (float32; gradient w.r.t. the "
        "student input; ratio = torch time / jax time)\n")
  cols = ["loss", "student shape", "jax fwd µs", "jax fwd+bwd µs"]
  if jb is not None:
    cols += ["before fwd+bwd µs", "after speed-up"]
  if tl is not None:
    cols += ["torch fwd µs", "torch fwd+bwd µs", "fwd ratio",
             "fwd+bwd ratio"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join(["---"] * len(cols)) + "|")
  rng = np.random.default_rng(0)
  timing = dict(warmup=args.warmup, min_runs=args.min_runs,
                max_runs=args.max_runs, budget_s=args.budget,
                max_cell_s=args.max_cell_seconds)
  for name in names:
    s_shape, t_shape = FEATURE_SHAPES[name]
    s_np = rng.standard_normal(s_shape, dtype=np.float32)
    t_np = rng.standard_normal(t_shape, dtype=np.float32)
    ls_np = rng.standard_normal((s_shape[-1],), dtype=np.float32)
    s, t, ls = jnp.asarray(s_np), jnp.asarray(t_np), jnp.asarray(ls_np)
    f = jl[name]
    fwd = jax.jit(f)
    fwd_bwd = jax.jit(jax.value_and_grad(f))
    cells = [lambda: fwd(s, t, ls).block_until_ready(),
             lambda: jax.block_until_ready(fwd_bwd(s, t, ls))]
    if jb is not None:
      before_bwd = jax.jit(jax.value_and_grad(jb[name]))
      cells.append(lambda: jax.block_until_ready(before_bwd(s, t, ls)))
    nj = len(cells)
    if tl is not None:
      nchw = lambda a: (torch.from_numpy(np.ascontiguousarray(
          a.transpose(0, 3, 1, 2))) if a.ndim == 4 else torch.from_numpy(a))
      ts_, tt_, tls = nchw(s_np), nchw(t_np), torch.from_numpy(ls_np)
      g = tl[name]

      def torch_fwd(g=g):
        with torch.no_grad():
          g(ts_, tt_, tls)

      def torch_fwd_bwd(g=g):
        x = ts_.detach().requires_grad_(True)
        torch.autograd.grad(g(x, tt_, tls), x)

      cells += [torch_fwd, torch_fwd_bwd]
    med = time_interleaved(cells, **timing)
    row = [name, "x".join(map(str, s_shape)), f"{med[0] * 1e6:.0f}",
           f"{med[1] * 1e6:.0f}"]
    if jb is not None:
      row += [f"{med[2] * 1e6:.0f}", f"{med[2] / med[1]:.2f}x"]
    if tl is not None:
      row += [f"{med[nj] * 1e6:.0f}", f"{med[nj + 1] * 1e6:.0f}",
              f"{med[nj] / med[0]:.2f}x", f"{med[nj + 1] / med[1]:.2f}x"]
    print("| " + " | ".join(row) + " |", flush=True)


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


def main(argv=None):
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
  parser.add_argument("--features", nargs="?", const=",".join(FEATURE_SHAPES),
                      default=None, help="only the feature / relation loss "
                      "table (optionally a comma-separated subset of "
                      + ",".join(FEATURE_SHAPES) + ")")
  args = parser.parse_args(argv)
  global CLOCK  # pylint: disable=global-statement
  CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
  args.torch = args.torch or args.torch_only
  if args.sync_dispatch:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  global SETTLE_S, BLOCK  # pylint: disable=global-statement
  SETTLE_S, BLOCK = max(0.0, args.settle_ms) / 1e3, max(1, args.block)
  if args.settle_ms <= 0:
    BLOCK = 1
  if args.torch_only and (args.tokens or args.features is not None
                          or args.before):
    parser.error("--torch-only applies to the logit table only (not with "
                 "--tokens, --features or --before)")
  if args.separate and not (args.processes and args.torch):
    parser.error("--separate needs --processes N and --torch")
  if args.tokens:
    return run_token_benchmark(args)
  if args.features is not None:
    feats = [n.strip() for n in args.features.split(",") if n.strip()]
    if bad := sorted(set(feats) - set(FEATURE_SHAPES)):
      parser.error(f"unknown --features {bad}; choose from "
                   f"{tuple(FEATURE_SHAPES)}")
    if args.torch and args.torch_threads:
      import torch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(args.torch_threads)
    run_features(feats, args)
    return

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


def run_logits(names: List[str], args) -> List[dict]:
  """Prints the logit-loss table; returns its cells as dicts (seconds)."""
  sizes = parse_sizes(args.sizes)
  jdtype = jnp.dtype(args.dtype)
  itemsize = jdtype.itemsize

  jl = jax_losses()
  jb = jax_losses(load_before_losses(args.before)) if args.before else None
  tl = None
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    tl = torch_losses()
    tdtype = getattr(torch, args.dtype)
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)

  print(f"# kd_jax loss benchmark | jax {jax.__version__} "
        f"backend={jax.default_backend()} devices={jax.devices()} | "
        f"{platform.processor() or platform.machine()} "
        f"cpus={os.cpu_count()} (this process: {len(os.sched_getaffinity(0))})"
        f" | dtype={args.dtype} | clock={args.clock} | dispatch="
        f"{'sync' if args.sync_dispatch else 'async'} | load avg "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        + (f" | torch {torch.__version__} threads={torch.get_num_threads()}"
           if args.torch else ""))
  print("# median of >= %d rounds (>= 3 for cells slower than %.0f s) after "
        "%d warm-up calls; %s; GB/s = bytes of both logits / time; "
        "ratio = torch time / jax time"
        % (args.min_runs, args.max_cell_seconds, args.warmup, protocol()))
  cols = ["loss", "shape", "jax fwd µs", "GB/s", "jax fwd+bwd µs", "GB/s"]
  if jb is not None:
    cols += ["before fwd+bwd µs", "after speed-up"]
  if args.torch:
    cols += ["torch fwd µs", "torch fwd+bwd µs", "fwd ratio", "fwd+bwd ratio"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join(["---"] * len(cols)) + "|")

  records = []
  rng = np.random.default_rng(0)
  for shape in sizes:
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
    s = jnp.asarray(s_np, jdtype)
    t = jnp.asarray(t_np, jdtype)
    y = jnp.asarray(y_np)
    gbytes = 2 * int(np.prod(shape)) * itemsize / 1e9
    shape_str = "x".join(map(str, shape))
    if tl is not None:
      ts = torch.from_numpy(s_np).to(tdtype)
      tt = torch.from_numpy(t_np).to(tdtype)
      ty = torch.from_numpy(y_np.astype(np.int64))

    for name in names:
      f = jl[name]
      fwd = jax.jit(f)
      fwd_bwd = jax.jit(jax.value_and_grad(f))
      timing = dict(warmup=args.warmup, min_runs=args.min_runs,
                    max_runs=args.max_runs, budget_s=args.budget,
                    max_cell_s=args.max_cell_seconds)
      cells = [lambda: fwd(s, t, y).block_until_ready(),
               lambda: jax.block_until_ready(fwd_bwd(s, t, y))]
      if args.torch_only:
        cells = []
      if jb is not None:
        # Two executables of each side, compiled in the orders before/after
        # and after/before (geometric means reported): on this VM the
        # executable compiled second ran up to 1.3x faster for identical code.
        fb = jb[name]
        before_1 = jax.jit(jax.value_and_grad(lambda *a, fb=fb: fb(*a)))
        after_2 = jax.jit(jax.value_and_grad(lambda *a, f=f: f(*a)))
        before_2 = jax.jit(jax.value_and_grad(lambda *a, fb=fb: fb(*a)))
        for exe in (before_1, fwd_bwd, after_2, before_2):
          jax.block_until_ready(exe(s, t, y))
        cells += [lambda e=e: jax.block_until_ready(e(s, t, y))
                  for e in (after_2, before_1, before_2)]
      nj = len(cells)
      if tl is not None:
        g = tl[name]

        def torch_fwd(g=g):
          with torch.no_grad():
            g(ts, tt, ty)

        def torch_fwd_bwd(g=g):
          x = ts.detach().requires_grad_(True)
          loss = g(x, tt, ty)
          torch.autograd.grad(loss, x)

        cells += [torch_fwd, torch_fwd_bwd]
      med = time_interleaved(cells, **timing)
      if args.torch_only:
        records.append(torch_only_row(name, shape_str, med))
        continue
      t_fwd, t_bwd = med[0], med[1]
      row = [name, shape_str, f"{t_fwd * 1e6:.0f}", f"{gbytes / t_fwd:.2f}",
             f"{t_bwd * 1e6:.0f}", f"{gbytes / t_bwd:.2f}"]
      if jb is not None:
        t_after = (med[1] * med[2]) ** 0.5
        t_before = (med[3] * med[4]) ** 0.5
        row[4:6] = [f"{t_after * 1e6:.0f}", f"{gbytes / t_after:.2f}"]
        row += [f"{t_before * 1e6:.0f}", f"{t_before / t_after:.2f}x"]
        t_bwd = t_after
      if tl is not None:
        tt_fwd, tt_bwd = med[nj], med[nj + 1]
        row += [f"{tt_fwd * 1e6:.0f}", f"{tt_bwd * 1e6:.0f}",
                f"{tt_fwd / t_fwd:.2f}x", f"{tt_bwd / t_bwd:.2f}x"]
      print("| " + " | ".join(row) + " |", flush=True)
      records.append({"loss": name, "shape": shape_str, "jax_fwd": t_fwd,
                      "jax_fwd_bwd": t_bwd, "jax_cpu_wall": CPU_PER_WALL[1]})
      if tl is not None:
        records[-1].update(torch_fwd=tt_fwd, torch_fwd_bwd=tt_bwd)
    del s, t, y
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
    med = time_interleaved(cells, warmup=2, min_runs=args.min_runs,
                           max_runs=args.max_runs, budget_s=args.budget,
                           max_cell_s=args.max_cell_seconds)
    base = med[names.index("kd_jax materialized")]
    for name, t, val in zip(names, med, values):
      print(f"| {name} | {n}x{v}x{d} | {t * 1e3:.0f} | {t / base:.2f} | "
            f"{val():.6f} |", flush=True)


if __name__ == "__main__":
  main()
