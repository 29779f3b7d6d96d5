r"""Feature / relation loss benchmark (`benchmark_losses.py --features`).

Jitted fwd+bwd of kd_jax's feature and relation losses at CIFAR-ResNet-sized
shapes, next to PyTorch eager versions following RepDistiller with `--torch`.
Run it through `python experiments/benchmark_losses.py --features [--torch]`.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses

try:  # pylint: disable=g-import-not-at-top
  from experiments import bench_timing
except ImportError:  # run as a script without the repository on sys.path
  import bench_timing  # pytype: disable=import-error


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


def run_features(names: List[str], args, before=None) -> None:
  """Prints the feature / relation loss table (fwd and fwd+bwd, µs).

  `before`: an older checkout's `kd_jax.losses` module (`--before`), timed
  beside the current one.
  """
  jl = jax_feature_losses()
  jb = jax_feature_losses(before) if before is not None else None
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
    med = bench_timing.time_interleaved(cells, **timing)
    row = [name, "x".join(map(str, s_shape)), f"{med[0] * 1e6:.0f}",
           f"{med[1] * 1e6:.0f}"]
    if jb is not None:
      row += [f"{med[2] * 1e6:.0f}", f"{med[2] / med[1]:.2f}x"]
    if tl is not None:
      row += [f"{med[nj] * 1e6:.0f}", f"{med[nj + 1] * 1e6:.0f}",
              f"{med[nj] / med[0]:.2f}x", f"{med[nj + 1] / med[1]:.2f}x"]
    print("| " + " | ".join(row) + " |", flush=True)
