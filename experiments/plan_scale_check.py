"""`plan_scale --check`: compile-only numbers against a real run (8 devices).

For each small configuration the same distillation step is built twice:

1. *compile-only*, as `plan_scale` does at real size: `ShapeDtypeStruct`
   inputs with the rules' shardings; per-device state / teacher bytes from
   the shardings, ``memory_analysis()`` of the compiled step;
2. *real*: the student and teacher initialized (``model.init``), cast to
   bfloat16, the train state built by `create_train_state` and placed by
   the engine exactly as the LM trainer places it (`MeshParallel.
   shard_state` / `shard_teacher`), the step compiled from those arrays and
   run once. Its bytes are what the trainer's memory report gives
   (`kd_jax.train.sharding.memory_report`: the arrays' addressable shards
   plus the executable's ``memory_analysis()``), and the process's resident
   memory is sampled while the step runs.

The first two columns must agree exactly; the resident-memory growth of the
8 simulated devices (one host process) is a coarse, independent check of
XLA's ``8 x (temp + outputs - aliased)`` (the allocator may reuse memory
freed after compilation, so it can read low).
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import plan_scale_programs as P
from experiments.plan_scale_configs import PAIRS
from experiments.plan_scale_configs import mesh_spec
from kd_jax.train import create_train_state
from kd_jax.train import sharding as S

_PAGE = 4096


def _rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


def _trim():
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def _real_inputs(row, par):
  """Initialized, bf16-cast, trainer-placed state, teacher and batch."""
  teacher_name, student_name = PAIRS[row["pair"]]
  student = P.model(student_name, remat=row["remat"], scan=row["scan"])
  teacher = P.model(teacher_name, scan=row["scan"])
  tx = P.optimizer()
  sv = nn.unbox(student.init(jax.random.key(0), P.EXAMPLE))
  state = create_train_state(sv, tx, rng=jax.random.key(1))
  state = state.replace(params=jax.tree.map(
      lambda a: a.astype(jnp.bfloat16), state.params))
  tensor = par.mesh.shape["tensor"] > 1
  names = S.logical_axis_names(student, P.EXAMPLE) if tensor else None
  state = par.shard_state(state, logical_names=names)
  tv = jax.tree.map(lambda a: a.astype(jnp.bfloat16), nn.unbox(
      teacher.init(jax.random.key(2), P.EXAMPLE)))
  t_names = (S.logical_axis_names(teacher, P.EXAMPLE)
             if row["placement"] != "replicated" else None)
  tv = par.shard_teacher(tv, P.teacher_sharding_rules(row["placement"]),
                         logical_names=t_names)
  tokens = np.random.default_rng(0).integers(
      0, teacher.config.vocab_size, (row["batch"], row["seq"] + 1))
  return state, tv, par.shard_batch({"tokens": tokens.astype(np.int32)})


def _run_sampled(fn, args) -> int:
  """Peak resident-memory growth (bytes) while `fn(*args)` runs."""
  _trim()
  base, peak, stop = _rss(), [0], threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.0005)

  th = threading.Thread(target=sample)
  th.start()
  try:
    jax.block_until_ready(fn(*args))
  finally:
    stop.set()
    th.join()
  return max(peak[0], _rss()) - base


def check_row(row: dict, measured=None) -> dict:
  """Compile-only vs real for one distill row; `measured` (the row's
  `plan_scale_programs.measure` result) saves the compile-only compile."""
  spec = mesh_spec(row["mesh"], row["devices"], row["tensor"], row["data"])
  par = S.MeshParallel(spec)
  fn, args, meta = P.distill_program(row, par)
  if measured is None:
    abstract = P._memory(fn.lower(*args).compile())  # pylint: disable=protected-access
  else:
    abstract = dict(measured["memory"])
    meta = {k: measured[k] for k in ("state_bytes", "teacher_bytes")}
  state, tv, batch = _real_inputs(row, par)
  compiled = fn.lower(state, tv, batch).compile()
  rep = S.memory_report(state, tv, compiled)
  rss = _run_sampled(fn, (state, tv, batch))
  return {"row": row, "mesh": dict(par.mesh.shape),
          "abstract": dict(abstract, state=meta["state_bytes"],
                           teacher=meta["teacher_bytes"]),
          "real": {"state": rep["state_bytes_per_device"],
                   "teacher": rep["teacher_bytes_per_device"],
                   "argument": rep["step_argument_bytes"],
                   "output": rep["step_output_bytes"],
                   "alias": rep["step_alias_bytes"],
                   "temp": rep["step_temp_bytes"]},
          "rss_growth": rss}


def check_rows(pair: str, seq: int, batch: int, meshes, placements,
               remats) -> list:
  """The distill rows of the cross-check (8 devices, tensor 2, data 2)."""
  rows = []
  for mesh, remat, place in itertools.product(meshes, remats, placements):
    if place in ("tensor", "fsdp_tensor") and mesh != "fsdp_tensor":
      continue
    rows.append(dict(program="distill", pair=pair, devices=8, mesh=mesh,
                     placement=place, remat=remat, batch=batch, seq=seq,
                     scan=True, tensor=2, data=2))
  return rows


def check_table(results: list) -> str:
  """Markdown: compile-only vs real, KiB per device."""
  kib = lambda n: f"{n / 1024:,.0f}"  # noqa: E731
  lines = ["| mesh | teacher | remat | state (compile-only / real) | "
           "teacher | arguments | temp | outputs - aliased | "
           "8 x (temp + out - alias) | RSS growth during the step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    a, b, row = r["abstract"], r["real"], r["row"]
    mesh = "x".join(f"{k[0]}{v}" for k, v in r["mesh"].items() if v > 1)
    pair = lambda k: f"{kib(a[k])} / {kib(b[k])}"  # noqa: E731
    live = a["temp"] + a["output"] - a["alias"]
    lines.append(
        f"| {mesh} | {row['placement']} | {'on' if row['remat'] else 'off'}"
        f" | {pair('state')} | {pair('teacher')} | {pair('argument')} | "
        f"{pair('temp')} | {kib(a['output'] - a['alias'])} / "
        f"{kib(b['output'] - b['alias'])} | {kib(8 * live)} | "
        f"{kib(r['rss_growth'])} |")
  return "\n".join(lines)
