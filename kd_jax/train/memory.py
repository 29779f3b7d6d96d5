"""Bytes per device of a placed state / teacher and of a compiled step:
the ``memory`` entry of every run's report (`memory_report`)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _nbytes(x) -> int:
  dtype = x.dtype
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return int(np.prod(x.shape)) * 8
  return int(np.prod(x.shape)) * np.dtype(dtype).itemsize


def tree_bytes(tree: PyTree) -> Tuple[int, int]:
  """`(total, per_device)` bytes of a tree of arrays.

  `total`: the arrays' global sizes; `per_device`: the largest sum, over
  this process's devices, of the bytes of the shards each device holds
  (`addressable_shards`; a replicated array counts fully on every device).
  """
  total, per = 0, {}
  for x in jax.tree.leaves(tree):
    total += _nbytes(x)
    if not isinstance(x, jax.Array):
      continue
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    for s in x.addressable_shards:
      per[s.device] = per.get(s.device, 0) + s.data.nbytes
  return total, max(per.values()) if per else 0


def step_memory(compiled) -> Dict[str, int]:
  """Per-device sizes from a compiled step's `memory_analysis()`."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {"step_temp_bytes": int(m.temp_size_in_bytes),
          "step_argument_bytes": int(m.argument_size_in_bytes),
          "step_output_bytes": int(m.output_size_in_bytes),
          "step_alias_bytes": int(m.alias_size_in_bytes)}


def memory_report(state: PyTree, teacher_variables: PyTree = None,
                  compiled=None) -> Dict[str, int]:
  """The `"memory"` entry of report.json.

  Keys: `state_bytes_total`, `state_bytes_per_device`,
  `teacher_bytes_total`, `teacher_bytes_per_device` (from the arrays'
  addressable shards) and, given the compiled step
  (`run.lower(*args).compile()`), `step_temp_bytes` (XLA's temporary
  buffers per device: activations, gathered FSDP weights, gradients) plus
  `step_argument_bytes` / `step_output_bytes` / `step_alias_bytes`.
  """
  st, sd = tree_bytes(state)
  tt, td = tree_bytes(teacher_variables)
  out = {"state_bytes_total": st, "state_bytes_per_device": sd,
         "teacher_bytes_total": tt, "teacher_bytes_per_device": td}
  if compiled is not None:
    out.update(step_memory(compiled))
  return out


def _fmt(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024.0
  return str(n)


def memory_summary(report: Mapping[str, int]) -> str:
  """One line: `memory/device: state 1.2 MiB (of 9.6 MiB), teacher ...`."""
  parts = [f"state {_fmt(report['state_bytes_per_device'])} "
           f"(of {_fmt(report['state_bytes_total'])})",
           f"teacher {_fmt(report['teacher_bytes_per_device'])} "
           f"(of {_fmt(report['teacher_bytes_total'])})"]
  if "step_temp_bytes" in report:
    parts.append(f"step temp {_fmt(report['step_temp_bytes'])}")
  return "memory/device: " + ", ".join(parts)
