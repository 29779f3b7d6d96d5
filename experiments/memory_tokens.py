r"""Compile-only memory table: fused LM-head divergence vs materialized logits.

For each `N x V x D` (tokens, vocabulary, hidden size; student and teacher
both `D`), compiles — without running — the jitted forward+backward
(`value_and_grad` w.r.t. the student hidden states and kernel) of

* fused:        `mean(fused_head_divergence(hs, ws, ht, wt, chunk_size=C))`
* materialized: `mean(forward_kl(hs @ ws, ht @ wt))`

and prints XLA's `memory_analysis()`: the temporary bytes (everything but the
arguments and outputs) of both, and the fused one in units of one chunk of
float32 logits, `C · V · 4` bytes. Nothing is allocated, so sizes far beyond
this machine's memory can be listed. With `--labels` the cross-entropy is
computed in the same pass (`labels=`) and added to the loss.

Usage:
  python experiments/memory_tokens.py
  python experiments/memory_tokens.py --sizes 8192x131072x256 --chunk-sizes 256,1024
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from kd_jax import losses

DEFAULT_SIZES = ("2048x32768x256,8192x32768x256,8192x131072x256,"
                 "8192x152064x256,32768x131072x256")


def _loss(hs, ws, ht, wt, y, *, fused, chunk_size, divergence, labels):
  if fused:
    out = losses.fused_head_divergence(
        hs, ws, ht, wt, divergence=divergence, chunk_size=chunk_size,
        labels=y if labels else None)
    return jnp.mean(out[0] + out[1]) if labels else jnp.mean(out)
  fn = {"forward_kl": losses.forward_kl, "reverse_kl": losses.reverse_kl,
        "jsd": losses.js_divergence, "tvd": losses.total_variation}[divergence]
  s = hs @ ws
  div = fn(s, ht @ wt)
  if labels:
    ce = jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, y[:, None], -1)[:, 0]
    div = div + ce
  return jnp.mean(div)


def temp_bytes(n, v, d, *, fused, chunk_size, divergence, labels,
               dtype=jnp.float32) -> int:
  """Temporary bytes of the compiled fwd+bwd (compile only, no run)."""
  f = jax.jit(jax.value_and_grad(functools.partial(
      _loss, fused=fused, chunk_size=chunk_size, divergence=divergence,
      labels=labels), argnums=(0, 1)))
  spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  compiled = f.lower(spec(n, d), spec(d, v), spec(n, d), spec(d, v),
                     jax.ShapeDtypeStruct((n,), jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _gib(b):
  return f"{b / 2**30:.2f}"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=DEFAULT_SIZES,
                      help="comma-separated NxVxD (default: %(default)s)")
  parser.add_argument("--chunk-sizes", default="1024")
  parser.add_argument("--divergence", default="forward_kl",
                      choices=["forward_kl", "reverse_kl", "jsd", "tvd"])
  parser.add_argument("--labels", action="store_true",
                      help="add the cross-entropy (fused: same pass)")
  parser.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  print(f"# compile-only memory_analysis(), jax {jax.__version__} "
        f"backend={jax.default_backend()} | fwd+bwd of mean("
        f"{args.divergence}{' + CE' if args.labels else ''}) w.r.t. student "
        f"hidden + kernel | inputs {args.dtype}")
  print("| N x V x D | chunk C | fused temp GiB | materialized temp GiB "
        "| materialized / fused | fused / (C·V·4) |")
  print("|---|---|---|---|---|---|")
  for item in args.sizes.split(","):
    n, v, d = (int(x) for x in item.lower().split("x"))
    kw = dict(divergence=args.divergence, labels=args.labels, dtype=dtype)
    mat = temp_bytes(n, v, d, fused=False, chunk_size=0, **kw)
    for c in (int(x) for x in args.chunk_sizes.split(",")):
      fused = temp_bytes(n, v, d, fused=True, chunk_size=c, **kw)
      print(f"| {n}x{v}x{d} | {c} | {_gib(fused)} | {_gib(mat)} | "
            f"{mat / fused:.0f}x | {fused / (min(c, n) * v * 4):.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
