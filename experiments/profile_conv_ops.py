r"""Per-op CPU profile of the CIFAR ResNet convolutions: XLA vs PyTorch.

    python experiments/profile_conv_ops.py [--batch 64] [--reps 20]
        [--shapes r20|r8x4] [--torch-threads 1] [--formulations ...]

For each convolution shape of ResNet-20 (16/32/64 channels at 32/16/8
pixels) or ResNet-8x4, times the forward, the input gradient and the weight
gradient separately, each as its own jitted function (median of `--reps`
calls after a warm-up):

* `xla` -- `lax.conv_general_dilated` and its JAX transpose rules;
* `canon` -- kd_jax's canonical-layout VJP (`_canonical_conv`);
* `patches` -- the weight gradient as one matmul of im2col patches,
  `[N*Ho*Wo, kh*kw*C]^T @ [N*Ho*Wo, O]`;
* `torch` -- `F.conv2d` and `torch.nn.grad.conv2d_input / conv2d_weight`
  (oneDNN), NCHW.

XLA reads `XLA_FLAGS` once per process, so run the script once with the
default flags and once with `--xla-flags=...` (set before JAX starts) to
compare XLA:CPU's YNNPACK and Eigen convolution paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

R20 = [  # (cin, cout, hw, k, stride, pad, count in resnet20)
    (3, 16, 32, 3, 1, 1, 1), (16, 16, 32, 3, 1, 1, 6),
    (16, 32, 32, 3, 2, 1, 1), (16, 32, 32, 1, 2, 0, 1),
    (32, 32, 16, 3, 1, 1, 5), (32, 64, 16, 3, 2, 1, 1),
    (32, 64, 16, 1, 2, 0, 1), (64, 64, 8, 3, 1, 1, 5)]
R8X4 = [
    (3, 32, 32, 3, 1, 1, 1), (32, 64, 32, 3, 1, 1, 1),
    (64, 64, 32, 3, 1, 1, 1), (32, 64, 32, 1, 1, 0, 1),
    (64, 128, 32, 3, 2, 1, 1), (128, 128, 16, 3, 1, 1, 1),
    (64, 128, 32, 1, 2, 0, 1), (128, 256, 16, 3, 2, 1, 1),
    (256, 256, 8, 3, 1, 1, 1), (128, 256, 16, 1, 2, 0, 1)]


def _median_ms(fn, reps):
  fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(ts)


def _kernel_grad_patches(x, g, k, s, pads):
  """Weight gradient as one im2col matmul: [N Ho Wo, k k C]^T @ [N Ho Wo, O]."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, ho, wo, o = g.shape
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  cols = [xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
          for i in range(k) for j in range(k)]
  p = jnp.concatenate(cols, axis=-1).reshape(n * ho * wo, -1)
  return (p.T @ g.reshape(n * ho * wo, o)).reshape(k, k, x.shape[-1], o)


def _jax_times(shape, batch, reps):
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kd_jax.models import _canonical_conv as cc  # pylint: disable=g-import-not-at-top
  cin, cout, hw, k, s, p, _ = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
  pads = ((p, p), (p, p))
  dn = ("NHWC", "HWIO", "NHWC")

  def conv_lax(a, b):
    return lax.conv_general_dilated(a, b, (s, s), pads,
                                    dimension_numbers=dn)

  def conv_canon(a, b):
    return cc.conv_general_dilated(a, b, (s, s), pads, dimension_numbers=dn)

  y = conv_lax(x, w)
  g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  out = {}
  for name, f in (("xla", conv_lax), ("canon", conv_canon)):
    fwd = jax.jit(f)
    dx = jax.jit(lambda a, b, gg, f=f: jax.vjp(lambda u: f(u, b), a)[1](gg)[0])
    dw = jax.jit(lambda a, b, gg, f=f: jax.vjp(lambda v: f(a, v), b)[1](gg)[0])
    out[name] = (
        _median_ms(lambda: fwd(x, w).block_until_ready(), reps),
        _median_ms(lambda: dx(x, w, g).block_until_ready(), reps),
        _median_ms(lambda: dw(x, w, g).block_until_ready(), reps))
  dwp = jax.jit(lambda a, gg: _kernel_grad_patches(a, gg, k, s, pads))
  out["patches"] = (float("nan"), float("nan"),
                    _median_ms(lambda: dwp(x, g).block_until_ready(), reps))
  return out


def _torch_times(shape, batch, reps):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  cin, cout, hw, k, s, p, _ = shape
  x = torch.randn(batch, cin, hw, hw)
  w = torch.randn(cout, cin, k, k)
  y = F.conv2d(x, w, stride=s, padding=p)
  g = torch.randn_like(y)
  with torch.no_grad():
    return {"torch": (
        _median_ms(lambda: F.conv2d(x, w, stride=s, padding=p), reps),
        _median_ms(lambda: torch.nn.grad.conv2d_input(
            x.shape, w, g, stride=s, padding=p), reps),
        _median_ms(lambda: torch.nn.grad.conv2d_weight(
            x, w.shape, g, stride=s, padding=p), reps))}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--shapes", default="r20", choices=("r20", "r8x4"))
  ap.add_argument("--torch-threads", type=int, default=0,
                  help="0: PyTorch's default; -1: skip PyTorch")
  ap.add_argument("--xla-flags", default=None,
                  help="XLA_FLAGS for this process (default: inherited)")
  ap.add_argument("--no-jax", action="store_true")
  args = ap.parse_args(argv)
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags
  shapes = R20 if args.shapes == "r20" else R8X4
  if args.torch_threads > 0:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.torch_threads)
  print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
  print("| cin->cout | hw | k/s | n | impl | fwd ms | dx ms | dw ms |")
  print("|---|---|---|---|---|---|---|---|")
  totals = {}
  for shape in shapes:
    res = {}
    if not args.no_jax:
      res.update(_jax_times(shape, args.batch, args.reps))
    if args.torch_threads >= 0:
      res.update(_torch_times(shape, args.batch, args.reps))
    cin, cout, hw, k, s, _, n = shape
    for impl, (f, dx, dw) in res.items():
      print(f"| {cin}->{cout} | {hw} | {k}/{s} | {n} | {impl} | {f:.2f} | "
            f"{dx:.2f} | {dw:.2f} |", flush=True)
      t = totals.setdefault(impl, [0.0, 0.0, 0.0])
      for i, v in enumerate((f, dx, dw)):
        t[i] += n * v
  for impl, (f, dx, dw) in totals.items():
    print(f"| total x count | | | | {impl} | {f:.1f} | {dx:.1f} | {dw:.1f} |")


if __name__ == "__main__":
  main()
