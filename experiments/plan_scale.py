r"""Plan pods by compiling real-size distillation steps on simulated devices.

    python -m experiments.plan_scale                      # the docs/scaling.md matrix
    python -m experiments.plan_scale --tiny               # CI: tiny models, 8 devices
    python -m experiments.plan_scale --check              # compile-only vs a real run
    python -m experiments.plan_scale --pairs 8b-1b --devices 64 --meshes fsdp \
        --placements fsdp --remat on --programs distill   # one row

Nothing real-size is ever allocated or run: every input is a
`jax.ShapeDtypeStruct` carrying the sharding the engine's rules give
(`kd_jax.train.sharding`: `MeshParallel`, `state_rules`, `teacher_rules`,
`logical_axis_names`), and each program is lowered and compiled by XLA:CPU
for N simulated devices (``--xla_force_host_platform_device_count=N``; every
row runs in its own child process, which sets the flag before importing
JAX). From each compiled program it reads

* ``memory_analysis()`` per device: arguments, outputs, aliased (donated)
  bytes, temporaries, and the state / teacher bytes from the shardings;
* the optimized HLO: matmul FLOPs and collectives with loops multiplied out
  (`experiments.hlo_stats`), plus ``cost_analysis()`` for reference;
* the compile time on this machine;

and puts on paper a step-time lower bound and an MFU ceiling for TPU v5p,
v5e and H100 (`experiments.plan_scale_report`).

Programs:

* ``distill``: `kd_jax.train.lm_steps.make_lm_distill_step(fused=True)`
  (token KD, forward KL + 0.5 CE, the fused head loss run per device by
  `kd_jax.train.mesh_losses.shard_fused_loss`), AdamW with global-norm
  clipping as the LM trainer, bfloat16 parameters (teacher and student),
  AdamW moments in float32, sequence ``--seq`` (+1 target token), the state
  donated as in the trainer;
* ``generate``: on-policy GKD's student sampling,
  `kd_jax.models.lm.make_generate_fn` (prefill + KV-cache decode loop of
  ``--new_tokens``), with the student weights as the train state holds them
  (``state``) or gathered once before sampling (``gather``).

Pairs: Llama-3.1-8B -> Llama-3.2-1B and Llama-3.1-70B -> Llama-3.1-8B
(`HF_CONFIGS`, the published ``config.json`` fields). Meshes: ``fsdp``
``{fsdp: N}``, ``fsdp_tensor`` ``{fsdp: N/8, tensor: 8}``, ``data_fsdp``
``{data: 4, fsdp: N/4}``; teacher placements ``replicated``, ``fsdp``,
``tensor`` and ``fsdp_tensor`` (both), the last two on meshes with a
tensor axis. Models use ``scan_layers=True`` unless ``--scan off``.

Results are appended to ``--out`` (JSON lines, one per row; ``--resume``
skips rows already there) and rendered as markdown into ``--doc`` between
``<!-- plan_scale:begin -->`` and ``<!-- plan_scale:end -->``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

from experiments import plan_scale_report as report

from experiments.plan_scale_configs import (  # noqa: F401  (re-exported)
    CHECK_TAG, HF_CONFIGS, HLO_STATS_VERSION, MESHES, PAIRS, PLACEMENTS,
    RESULT_TAG, mesh_spec, row_key)


# ---------------------------------------------------------------------------
# The matrix.


def _placements(mesh: str, wanted):
  ok = PLACEMENTS if mesh == "fsdp_tensor" else ("replicated", "fsdp")
  return [p for p in ok if p in wanted]


def distill_rows(a) -> list:
  rows = []
  for pair, dev, mesh in itertools.product(a.pairs, a.devices, a.meshes):
    for place, remat in itertools.product(_placements(mesh, a.placements),
                                          a.remat):
      for batch in a.batch_for(dev):
        rows.append(dict(program="distill", pair=pair, devices=dev,
                         mesh=mesh, placement=place, remat=remat,
                         batch=batch, seq=a.seq, scan=a.scan,
                         tensor=a.tensor, data=a.data))
  return rows


def generate_rows(a) -> list:
  rows = []
  students = sorted({PAIRS[p][1] for p in a.pairs})
  for student, dev, mesh in itertools.product(students, a.devices, a.meshes):
    for place in a.gen_placements:
      rows.append(dict(program="generate", student=student, devices=dev,
                       mesh=mesh, placement=place, batch=a.batch_for(dev)[0],
                       prompt=a.seq - a.new_tokens, new_tokens=a.new_tokens,
                       scan=a.scan, tensor=a.tensor, data=a.data))
  return rows


def _batch_rows(a) -> list:
  """The batch sweep: fsdp mesh, FSDP teacher, remat on, every batch."""
  rows = []
  if "fsdp" not in a.meshes or "fsdp" not in a.placements or \
      True not in a.remat:
    return rows
  for pair, dev in itertools.product(a.pairs, a.devices):
    for batch in a.sweep:
      if batch % dev == 0 and batch not in a.batch_for(dev):
        rows.append(dict(program="distill", pair=pair, devices=dev,
                         mesh="fsdp", placement="fsdp", remat=True,
                         batch=batch, seq=a.seq, scan=a.scan,
                         tensor=a.tensor, data=a.data))
  return rows


def all_rows(a) -> list:
  rows = []
  if "distill" in a.programs:
    rows += distill_rows(a) + _batch_rows(a)
  if "generate" in a.programs:
    rows += generate_rows(a)
  if "distill" in a.programs and a.unscanned_rows:
    for pair in a.pairs:  # compile time without nn.scan, one row per pair
      rows.append(dict(program="distill", pair=pair, devices=a.devices[0],
                       mesh="fsdp", placement="fsdp", remat=True,
                       batch=a.batch_for(a.devices[0])[0], seq=a.seq,
                       scan=False, tensor=a.tensor, data=a.data))
  return rows


# ---------------------------------------------------------------------------
# Running rows in child processes (the device count is fixed per process).


def _child(args: list, devices: int, timeout: float):
  """(stdout, error or None) of ``plan_scale`` run with `args` under N
  simulated devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}"
                        ).strip())
  cmd = [sys.executable, "-m", "experiments.plan_scale"] + args
  try:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       timeout=timeout, check=False,
                       cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
  except subprocess.TimeoutExpired:
    return "", f"compile did not finish within {timeout:.0f} s"
  if p.returncode:
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return p.stdout, f"child exited {p.returncode}: {tail[:300]}"
  return p.stdout, None


def _records(stdout: str, tag: str) -> list:
  return [json.loads(line[len(tag):]) for line in stdout.splitlines()
          if line.startswith(tag)]


def run_child(args: list, devices: int, timeout: float,
              tag: str = RESULT_TAG) -> list:
  """The records a child prints after `tag`, or one error record."""
  stdout, error = _child(args, devices, timeout)
  out = _records(stdout, tag)
  return out if out or not error else [{"error": error}]


def _read(path: str) -> list:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_rows(rows: list, a) -> list:
  """Every row in its own child (or all of one device count in one child
  with ``--one_process``), appended to ``a.out`` as they finish."""
  done = {r["key"]: r for r in _read(a.out)
          if "error" in r or r.get("hlo_stats_version") == HLO_STATS_VERSION
          } if a.resume else {}
  results = []
  todo = [r for r in rows if row_key(r) not in done]
  results += [done[row_key(r)] for r in rows if row_key(r) in done]
  groups = ([[r] for r in todo] if not a.one_process else
            [[r for r in todo if r["devices"] == d]
             for d in sorted({r["devices"] for r in todo})])
  for group in groups:
    if not group:
      continue
    t0 = time.perf_counter()
    got = run_child(["--_rows", json.dumps({"rows": group})],
                    group[0]["devices"], a.timeout * len(group))
    if len(got) != len(group):  # a crash: attribute the error to the rest
      err = got[-1].get("error", "no result") if got else "no result"
      got = got[:-1] if got and "error" in got[-1] else got
      got += [{"row": r, "key": row_key(r), "error": err}
              for r in group[len(got):]]
    for r in got:
      results.append(r)
      if a.out:
        with open(a.out, "a") as f:
          f.write(json.dumps(r) + "\n")
      print(f"[{time.perf_counter() - t0:6.1f}s] {r['key']}: "
            f"{r.get('error') or _summary(r)}", flush=True)
  return results


def _summary(r: dict) -> str:
  return (f"peak {report.peak_bytes(r) / report.GIB:.2f} GiB/device, "
          f"compile {r['compile_s']:.1f} s")


# ---------------------------------------------------------------------------
# Command line.


def _ints(s: str) -> list:
  return [int(x) for x in s.split(",") if x]


def _names(s: str) -> list:
  return [x for x in s.split(",") if x]


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", type=_names, default=["8b-1b", "70b-8b"])
  p.add_argument("--devices", type=_ints, default=[64, 256])
  p.add_argument("--meshes", type=_names, default=list(MESHES))
  p.add_argument("--placements", type=_names, default=list(PLACEMENTS))
  p.add_argument("--remat", type=_names, default=["on", "off"])
  p.add_argument("--batch", type=int, default=0,
                 help="global batch (sequences); 0: as many as devices")
  p.add_argument("--sweep", type=_ints, default=[64, 128, 256, 512],
                 help="extra batches for the fsdp / fsdp / remat row")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--new_tokens", type=int, default=1024,
                 help="generate: tokens sampled after a seq - new prompt")
  p.add_argument("--programs", type=_names, default=["distill", "generate"])
  p.add_argument("--gen_placements", type=_names,
                 default=["state", "gather"])
  p.add_argument("--tensor", type=int, default=8)
  p.add_argument("--data", type=int, default=4)
  p.add_argument("--scan", choices=("on", "off"), default="on")
  p.add_argument("--unscanned_rows", choices=("on", "off"), default="on",
                 help="one unscanned row per pair (compile time)")
  p.add_argument("--timeout", type=float, default=1800.0,
                 help="seconds per compiled row")
  p.add_argument("--out", default="", help="results (JSON lines)")
  p.add_argument("--doc", default="", help="markdown file to update")
  p.add_argument("--resume", action="store_true")
  p.add_argument("--one_process", action="store_true",
                 help="all rows of a device count in one child")
  p.add_argument("--check", action="store_true",
                 help="only the compile-only vs real-run cross-check")
  p.add_argument("--tiny", action="store_true",
                 help="CI: tiny models on 8 devices, all rows + the check")
  p.add_argument("--_rows", default="", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.tiny:  # one distill row, one generate row, one cross-check row
    a.pairs, a.devices, a.seq, a.new_tokens = ["tiny"], [8], 64, 16
    a.tensor, a.data, a.sweep, a.one_process = 2, 2, [], True
    a.meshes, a.placements, a.remat = ["fsdp_tensor"], ["fsdp_tensor"], ["off"]
    a.gen_placements, a.unscanned_rows = ["gather"], "off"
    a.timeout = min(a.timeout, 600.0)
  a.remat = [r == "on" for r in a.remat]
  a.scan = a.scan == "on"
  a.unscanned_rows = a.unscanned_rows == "on" and a.scan
  a.batch_for = lambda dev: [a.batch or dev]
  for pair in a.pairs:
    if pair not in PAIRS:
      p.error(f"unknown pair {pair!r}; expected one of {sorted(PAIRS)}")
  for mesh in a.meshes:
    if mesh not in MESHES:
      p.error(f"unknown mesh {mesh!r}; expected one of {MESHES}")
  return a


def _child_main(a) -> None:
  """Inside a child: compile ``{"rows": [...], "check": [...]}`` and print
  one record per row (the cross-check of a row also compiled as a row
  reuses its compile-only numbers)."""
  from experiments import plan_scale_programs as programs  # pylint: disable=g-import-not-at-top
  spec = json.loads(a._rows)  # pylint: disable=protected-access
  measured = {}
  for row in spec.get("rows", []):
    try:
      out = programs.measure(row)
    except Exception as e:  # pylint: disable=broad-except
      out = {"row": row, "key": row_key(row),
             "error": f"{type(e).__name__}: {str(e)[:400]}"}
    measured[row_key(row)] = out
    print(RESULT_TAG + json.dumps(out), flush=True)
  if spec.get("check"):
    from experiments import plan_scale_check as check  # pylint: disable=g-import-not-at-top
    for row in spec["check"]:
      got = measured.get(row_key(row))
      out = check.check_row(row, got if got and "error" not in got else None)
      print(CHECK_TAG + json.dumps(out), flush=True)


def _update_doc(path: str, text: str, tag: str) -> None:
  begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
  with open(path) as f:
    doc = f.read()
  if begin not in doc or end not in doc:
    raise SystemExit(f"{path} has no {begin} ... {end} markers")
  head, rest = doc.split(begin, 1)
  with open(path, "w") as f:
    f.write(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def _check_rows(a) -> list:
  from experiments.plan_scale_check import check_rows  # pylint: disable=g-import-not-at-top
  if a.tiny:  # the tiny distill row itself
    return check_rows("tiny", a.seq, a.batch_for(8)[0], a.meshes,
                      a.placements, a.remat)
  return check_rows("small", 512, 16, list(MESHES), list(PLACEMENTS),
                    [True, False])


def run_check(a, got=None) -> str:
  """The cross-check table: computed in a child (or `got`, already
  computed; with ``--resume``, read back from ``<out>.check``)."""
  from experiments.plan_scale_check import check_table  # pylint: disable=g-import-not-at-top
  rows = _check_rows(a)
  saved = a.out + ".check" if a.out else ""
  if got is None and a.resume and saved and os.path.exists(saved):
    return check_table([g for g in _read(saved) if g["row"] in rows])
  if got is None:
    got = run_child(["--_rows", json.dumps({"check": rows})], 8,
                    a.timeout * len(rows), tag=CHECK_TAG)
  bad = [g for g in got if "error" in g]
  if bad or not got:
    raise SystemExit(f"cross-check failed: "
                     f"{bad[0]['error'] if bad else 'no result'}")
  if saved:
    with open(saved, "w") as f:
      f.write("\n".join(json.dumps(g) for g in got) + "\n")
  return check_table(got)


def run_tiny(a):
  """CI: the tiny rows and the cross-check of the distill row, in one child
  process (8 devices). Returns (results, checks)."""
  spec = {"rows": all_rows(a), "check": _check_rows(a)}
  stdout, error = _child(["--_rows", json.dumps(spec)], 8, a.timeout)
  if error:
    raise SystemExit(f"plan_scale --tiny failed: {error}")
  results = _records(stdout, RESULT_TAG)
  if a.out:
    with open(a.out, "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in results))
  return results, _records(stdout, CHECK_TAG)


def main(argv=None) -> None:
  a = parse(argv)
  if a._rows:  # pylint: disable=protected-access
    _child_main(a)
    return
  if a.tiny:
    results, checks = run_tiny(a)
    table = run_check(a, checks)
  elif a.check:
    table = run_check(a)
  if a.check or a.tiny:
    print(table + "\n")
    if a.doc:
      _update_doc(a.doc, table, "plan_scale_check")
    if a.check:
      return
  else:
    results = run_rows(all_rows(a), a)
  md = report.tables(results)
  print(md)
  if a.doc:
    _update_doc(a.doc, md, "plan_scale")


if __name__ == "__main__":
  main()
