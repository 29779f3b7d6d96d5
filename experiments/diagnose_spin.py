r"""Who is on the CPU while a jitted JAX loss runs next to PyTorch (issue 23).

Prints, for total_variation's jitted fwd+bwd at `[1024, 1000]` float32:

1. how long PyTorch's OpenMP worker threads stay on a core after one PyTorch
   call while the main thread sleeps (libgomp's spin-wait);
2. the JAX call's median wall time and each thread's on-CPU time per wall
   time of the JAX calls (from `/proc/self/task/*/schedstat`), when every JAX
   call follows a PyTorch call ("call by call", the old benchmark harness) and
   when it follows >= 15 ms of JAX calls ("blocks", the harness now).

Threads are labelled by who created them: `torch-omp` for those that appear
at PyTorch's first parallel op, `xla:<name>` for the ones JAX started, `main`.
The fractions are approximate (the snapshots around a call take a little
longer than the call). Linux only.

Usage: python experiments/diagnose_spin.py [--calls 80]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses


def thread_ns() -> dict:
  """tid -> (name, on-CPU ns) of every thread of this process."""
  out = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/schedstat") as f:
        ns = int(f.read().split()[0])
      with open(f"/proc/self/task/{tid}/comm") as f:
        out[tid] = (f.read().strip(), ns)
    except OSError:
      continue
  return out


def profile(mode, jax_call, torch_call, label, calls):
  """Median JAX wall time and per-thread on-CPU share in one harness mode."""
  acc, wall = {}, []
  for _ in range(calls):
    t0 = time.perf_counter()
    torch_call()
    while mode == "blocks" and time.perf_counter() - t0 < 0.015:
      jax_call()
    a, w0 = thread_ns(), time.perf_counter()
    jax_call()
    wall.append(time.perf_counter() - w0)
    for tid, (name, ns) in thread_ns().items():
      key = label(tid, name)
      acc[key] = acc.get(key, 0) + ns - a.get(tid, (name, ns))[1]
  share = {k: v / 1e9 / sum(wall) for k, v in acc.items()}
  shown = ", ".join(f"{k} {v:.2f}" for k, v in
                    sorted(share.items(), key=lambda kv: -kv[1]) if v > 0.005)
  print(f"| {mode} | {statistics.median(wall) * 1e6:.0f} | {shown} |")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--calls", type=int, default=80)
  args = parser.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  s_np, t_np = (3 * rng.standard_normal((1024, 1000), dtype=np.float32)
                for _ in range(2))
  s, t = jnp.asarray(s_np), jnp.asarray(t_np)
  ts, tt = torch.from_numpy(s_np), torch.from_numpy(t_np)
  step = jax.jit(jax.value_and_grad(
      lambda s, t: jnp.mean(losses.total_variation(s, t))))
  jax_call = lambda: jax.block_until_ready(step(s, t))

  def torch_call():
    x = ts.detach().requires_grad_(True)
    loss = 0.5 * (F.softmax(tt, -1) - F.softmax(x, -1)).abs().sum(-1).mean()
    torch.autograd.grad(loss, x)

  for _ in range(5):
    jax_call()
  before = set(thread_ns())
  for _ in range(5):
    torch_call()
  omp = set(thread_ns()) - before
  me = str(os.getpid())
  label = lambda tid, name: ("main" if tid == me else "torch-omp"
                             if tid in omp else f"xla:{name}")
  print(f"# jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
  for sleep_ms in (5, 20, 50):
    spins = []
    for _ in range(5):
      torch_call()
      a = thread_ns()
      time.sleep(sleep_ms / 1e3)
      b = thread_ns()
      spins.append(sum(b[k][1] - a[k][1] for k in omp if k in a and k in b))
    print(f"# PyTorch's worker threads on a core during a {sleep_ms} ms sleep "
          f"after one call: {statistics.median(spins) / 1e6:.2f} ms")
  print("\n| harness | JAX TV fwd+bwd µs (median) | on-CPU time per wall time "
        "of the JAX calls |\n|---|---|---|")
  for mode in ("call by call", "blocks"):
    profile(mode, jax_call, torch_call, label, args.calls)


if __name__ == "__main__":
  main()
