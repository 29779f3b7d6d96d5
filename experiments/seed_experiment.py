"""Multi-phase, multi-seed experiment: teacher(s), student alone, distillation.

`run(config, workdir)` for `config.mode == 'seed_experiment'` (see
`configs/mnist_seed.py`). For every seed it runs, each in its own workdir
`<workdir>/seed<k>/<phase>` with `kd_jax.trainer.train_and_evaluate`:

* every phase of `seed_experiment.phases` in order; a distillation phase
  named in `seed_experiment.distill_from` loads its teacher from that teacher
  phase's workdir (same seed, or the first seed's when the teacher phase is
  listed in `seed_experiment.shared_phases`, which are trained once).

Top-level `data`, `debug`, `checkpoint` and `train.progress_bar` /
`train.parallel` settings are copied into every phase, so
`--config.data.data_dir=...` applies to all of them. A finished phase is
reused only when its stored `config.json` equals the phase's current config
and the phases it depends on (its teacher) were reused too; otherwise it runs
again (its old workdir is moved aside to `<phase>.old-<time>`, nothing is
deleted) and the reason is printed. An interrupted phase with the current
config resumes from its own checkpoint.

Several processes (`experiments.main --coordinator_address/--num_processes/
--process_id`): every process runs every phase, data parallel over all
processes' devices -- a one-device `train.parallel` ('none', the default
of `configs/mnist_seed.py`) becomes 'jit' -- and process 0 alone decides
phase reuse (the decision is broadcast), moves stale workdirs aside, prints,
and writes the tables; the others wait for it at barriers.

Results: a table of last-epoch and best-epoch test accuracy (mean ± std over
seeds, population std) of the teacher, the student alone and the distilled
student, the gain of distillation (paired per seed), and wall time and
examples/s per phase -- printed, and saved as `results.md` and
`results.json` in the workdir.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List

import ml_collections
import numpy as np

from kd_jax import metrics_io
from kd_jax import trainer
from kd_jax.trainer import config as config_lib

_PROPAGATE = ("data", "checkpoint")
_PROPAGATE_TRAIN = ("progress_bar", "parallel", "num_devices")


def phase_config(config: ml_collections.ConfigDict, phase: str,
                 seed: int) -> ml_collections.ConfigDict:
  """The config of one phase for one seed (shared sections copied in)."""
  pc = ml_collections.ConfigDict(
      config.seed_experiment.phases[phase].to_dict())
  for sec in _PROPAGATE:
    if sec in config:
      pc[sec] = ml_collections.ConfigDict(config[sec].to_dict())
  for k in _PROPAGATE_TRAIN:
    if k in config.get("train", {}):
      pc.train[k] = config.train[k]
  pc.debug = bool(config.get("debug", False))
  pc.seed = int(seed)
  return pc


def phase_order(config) -> List[str]:
  """`seed_experiment.order` (default: the phases, teachers before students)."""
  se = config.seed_experiment
  order = list(se.get("order", ()) or ())
  if not order:
    names = list(se.phases.keys())
    order = [p for p in names if p not in se.distill_from]
    order += [p for p in names if p in se.distill_from]
  return order


def validate(config):
  se = config.get("seed_experiment", None)
  if se is None:
    raise trainer.ConfigError("seed_experiment", "mode 'seed_experiment' needs a "
                           "seed_experiment section (see configs/mnist_seed.py).")
  if not tuple(se.seeds):
    raise trainer.ConfigError("seed_experiment.seeds", "needs at least one seed.")
  phases = phase_order(config)
  for p in phases:
    if p not in se.phases:
      raise trainer.ConfigError("seed_experiment.order",
                             f"unknown phase {p!r}; phases: "
                             f"{sorted(se.phases.keys())}.")
  for d, t in se.distill_from.items():
    if d not in phases:
      raise trainer.ConfigError(f"seed_experiment.distill_from.{d}",
                             f"unknown phase {d!r}; phases: {phases}.")
    if t not in phases or phases.index(t) > phases.index(d):
      raise trainer.ConfigError(
          f"seed_experiment.distill_from.{d}",
          f"teacher phase {t!r} must be a phase listed before {d!r}.")
  for p in se.shared_phases:
    if p not in phases:
      raise trainer.ConfigError("seed_experiment.shared_phases",
                             f"unknown phase {p!r}; phases: {phases}.")
  # Validate every phase config (names, class counts, batch sizes, ...).
  for p in phases:
    pc = trainer.apply_debug(phase_config(config, p, tuple(se.seeds)[0]))
    try:
      trainer.parse(pc, check_paths=p not in se.distill_from)
    except trainer.ConfigError as e:
      raise trainer.ConfigError(f"seed_experiment.phases.{p}.{e.key}",
                             str(e).split(": ", 1)[1]) from None


def stored_config(wd: str):
  try:
    with open(os.path.join(wd, "config.json")) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def config_diff(old, new, prefix="") -> List[str]:
  """Dotted keys whose values differ between two config dicts."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_diff(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out


_COSMETIC = (("train", "progress_bar"),)  # keys that do not change results


def _comparable(cfg_json):
  d = json.loads(json.dumps(cfg_json))
  for sec, key in _COSMETIC:
    d.get(sec, {}).pop(key, None)
  return d


def reuse_decision(wd: str, pc, deps_reused: bool):
  """(reuse, why-not): a finished phase is reused only when its stored
  config equals the current one and the phases it depends on were reused.
  `why-not` is None for a fresh or an interrupted-but-current phase (which
  then runs / resumes from its checkpoint in place), else the reason its
  old workdir is stale."""
  if not os.path.isdir(wd):
    return False, None
  try:
    with open(os.path.join(wd, "report.json")) as f:
      finished = json.load(f).get("last_top1") is not None
  except (OSError, json.JSONDecodeError):
    finished = False
  stored = stored_config(wd)
  if stored is None:
    return False, ("its stored config.json is missing" if finished else None)
  current = json.loads(trainer.apply_debug(pc).to_json_best_effort())
  diff = config_diff(_comparable(stored), _comparable(current))
  if diff:
    return False, "its config changed (" + "; ".join(diff[:3]) + (
        "; ..." if len(diff) > 3 else "") + ")"
  if not deps_reused:
    return False, "its teacher phase was run again"
  return finished, None


def set_aside(wd: str) -> str:
  """Moves a stale phase workdir aside (nothing is deleted); in
  multi-process runs process 0 moves it and the others wait for it."""
  dest = f"{wd}.old-{time.strftime('%Y%m%d-%H%M%S')}"
  if is_main():
    os.replace(wd, dest)
  sync(f"set aside {wd}")
  return dest


def agreed(reuse: bool, why):
  """Process 0's `(reuse, why-not)` on every process (a collective, so also a
  barrier: process 0 has read the old workdir before anything moves it).
  Other processes get a placeholder reason; only process 0 prints it."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return reuse, why
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  code = int(multihost_utils.broadcast_one_to_all(
      np.int32(2 * bool(reuse) + (why is not None))))
  if not is_main():
    why = "(process 0 decided)" if code & 1 else None
  return bool(code & 2), why


def span_processes(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """With several processes, a one-device `train.parallel` ('none' /
  'single') becomes 'jit' (data parallel over every process's devices), said
  once; otherwise `config` is returned unchanged."""
  import jax  # pylint: disable=g-import-not-at-top
  par = config.get("train", {}).get("parallel", "none")
  if jax.process_count() == 1 or config_lib.PARALLEL.get(par) != "single":
    return config
  config = config.copy_and_resolve_references()
  config.train.parallel = "jit"
  say(f"train.parallel={par!r} runs on one device; with "
       f"{jax.process_count()} processes every phase runs with "
       "train.parallel='jit'.")
  return config


def sync(name: str) -> None:
  """A barrier of all processes (no-op with one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def say(msg: str) -> None:
  if is_main():
    print(msg, flush=True)


def phase_inputs(config, workdir, p, seed, seeds, reused,
                 make_config=phase_config):
  """(workdir, config, teacher phase reused) of phase `p` for `seed`: a shared
  phase lives under the first seed; a distillation phase gets its teacher
  phase's workdir as `teacher.checkpoint`. `make_config(config, p, seed)`
  builds the phase's config (the LM experiment passes its own)."""
  se = config.seed_experiment
  src_seed = seeds[0] if p in se.shared_phases else seed
  wd = os.path.join(workdir, f"seed{src_seed}", p)
  pc = make_config(config, p, src_seed)
  deps_ok = True
  if p in se.distill_from:
    t = se.distill_from[p]
    t_seed = seeds[0] if t in se.shared_phases else seed
    pc.teacher.checkpoint = os.path.join(workdir, f"seed{t_seed}", t)
    deps_ok = reused.get((t, t_seed), False)
  return wd, pc, deps_ok


def _run_phase(config, workdir, p, seed, seeds, reused):
  """Runs (or reuses) phase `p` of `seed`; returns (report, reused)."""
  wd, pc, deps_ok = phase_inputs(config, workdir, p, seed, seeds, reused)
  key = (p, seeds[0] if p in config.seed_experiment.shared_phases else seed)
  if key in reused:  # a shared phase, done for an earlier seed
    with open(os.path.join(wd, "report.json")) as f:
      return json.load(f), reused[key]
  ok, why = agreed(*(reuse_decision(wd, pc, deps_ok) if is_main()
                      else (False, None)))
  if ok:
    say(f"[seed {seed}] {p}: done before with the same config, reusing "
         f"{wd}")
    with open(os.path.join(wd, "report.json")) as f:
      return json.load(f), True
  if why is not None:
    say(f"[seed {seed}] {p}: running again: {why}; previous run moved to "
         f"{set_aside(wd)}")
  say(f"[seed {seed}] {p}: {pc.mode} {pc.model.name}"
       + (f" <- {pc.teacher.name}" if pc.mode == "distill" else ""))
  rep = trainer.train_and_evaluate(pc, wd)
  rep.pop("_final_state", None)
  say(f"[seed {seed}] {p}: last top-1 {100 * rep['last_top1']:.2f}%, "
       f"best {100 * rep['best_top1']:.2f}%, {rep['wall_s']:.1f} s, "
       f"{_fmt_eps(rep.get('steady_examples_per_sec'))} ex/s")
  return rep, False


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs every phase for every seed; returns and saves the results table.

  In multi-process runs every process runs every phase; only process 0
  prints and writes the tables, the others return what it wrote
  (`results.json`).
  """
  config = span_processes(trainer.apply_debug(config))
  validate(config)
  se = config.seed_experiment
  seeds = [int(s) for s in se.seeds]
  phases = phase_order(config)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  reports: Dict[str, List[Dict[str, Any]]] = {p: [] for p in phases}
  reused: Dict[Any, bool] = {}
  for seed in seeds:
    for p in phases:
      rep, was_reused = _run_phase(config, workdir, p, seed, seeds, reused)
      src_seed = seeds[0] if p in se.shared_phases else seed
      reused[(p, src_seed)] = was_reused
      reports[p].append(rep)
  path = os.path.join(workdir, "results.json")
  if is_main():
    results = summarize(config, reports)
    results["total_wall_s"] = time.perf_counter() - t0
    md = format_markdown(config, results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(md + "\n")
    metrics_io.write_json(path, results)
    print(md, flush=True)
  sync(f"results {workdir}")
  if not is_main():
    with open(path) as f:
      results = json.load(f)
  return results


def is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def _fmt_eps(v):
  return "n/a" if v is None else f"{v:,.0f}"


# Two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30
# (scipy.stats.t.ppf(0.975, df), rounded to 3 decimals).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262,
         2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101,
         2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052,
         2.048, 2.045, 2.042)


def t975(df: int) -> float:
  """t_{0.975, df} (df > 30: the df=30 value, slightly conservative)."""
  if df < 1:
    raise ValueError(f"`df` must be >= 1; got {df}.")
  return _T975[min(df, len(_T975)) - 1]


def paired_interval(diffs) -> Dict[str, Any]:
  r"""Mean of paired differences with its 95% t-interval.

  $\bar d \pm t_{0.975,\,n-1}\, s_d / \sqrt{n}$ with $s_d$ the sample
  standard deviation (ddof=1) of the $n$ per-seed differences $d_i$ (the
  same seed's distilled minus student-alone accuracy). `ci95` is None for
  one seed.
  """
  d = np.asarray(list(diffs), np.float64)
  n = d.size
  mean = float(d.mean()) if n else math.nan
  if n < 2:
    return {"mean": mean, "ci95": None, "n": int(n)}
  half = t975(n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(n)}


def _fmt_gain(diffs) -> str:
  if not len(diffs):
    return "n/a"
  g = paired_interval(100.0 * np.asarray(diffs))
  if g["ci95"] is None:
    return f"{g['mean']:+.2f}"
  lo, hi = g["ci95"]
  return f"{g['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def summarize(config, reports) -> Dict[str, Any]:
  se = config.seed_experiment
  out: Dict[str, Any] = {"seeds": [int(s) for s in se.seeds], "phases": {},
                         "rows": []}
  for p, reps in reports.items():
    shared = p in se.shared_phases
    uniq = reps[:1] if shared else reps
    out["phases"][p] = {
        "mode": uniq[0]["mode"], "model": uniq[0]["model"],
        "teacher": uniq[0].get("teacher"), "shared_across_seeds": shared,
        "epochs": uniq[0]["epochs"],
        "last_top1": [r["last_top1"] for r in uniq],
        "best_top1": [r["best_top1"] for r in uniq],
        "wall_s": [r["wall_s"] for r in uniq],
        "train_s": [r["train_s"] for r in uniq],
        "examples_per_sec": [r["examples_per_sec"] for r in uniq],
        "steady_examples_per_sec": [r["steady_examples_per_sec"]
                                    for r in uniq],
    }
  student = se.get("student_phase", "")
  for d in [p for p in phase_order(config) if p in se.distill_from]:
    t = se.distill_from[d]
    row = {"distill_phase": d, "teacher_phase": t, "student_phase": student}
    dl = np.asarray(out["phases"][d]["last_top1"])
    db = np.asarray(out["phases"][d]["best_top1"])
    if student in out["phases"]:
      sl = np.asarray(out["phases"][student]["last_top1"])
      sb = np.asarray(out["phases"][student]["best_top1"])
      row["gain_last"] = (dl - sl).tolist()
      row["gain_best"] = (db - sb).tolist()
      row["gain_last_ci95"] = paired_interval(dl - sl)["ci95"]
      row["gain_best_ci95"] = paired_interval(db - sb)["ci95"]
    out["rows"].append(row)
  return out


def format_markdown(config, results) -> str:
  se = config.seed_experiment
  ph = results["phases"]
  pct = lambda v: metrics_io.fmt_mean_std(v, scale=100.0)  # noqa: E731
  lines = [f"Seeds: {results['seeds']} (mean ± std over seeds, std with "
           "ddof=0; accuracy = test-set top-1 %, 'last' = after the final "
           "epoch, 'best' = best evaluated epoch; gain = distilled minus "
           "student alone of the same seed, mean [95% t-interval])", ""]
  header = ["teacher", "teacher last", "teacher best", "student alone last",
            "student alone best", "distilled last", "distilled best",
            "gain last (paired, 95% CI)", "gain best (paired, 95% CI)"]
  rows = []
  student = se.get("student_phase", "")
  for row in results["rows"]:
    t, d = ph[row["teacher_phase"]], ph[row["distill_phase"]]
    s = ph.get(student)
    shared = " (1 run, shared)" if t["shared_across_seeds"] else ""
    rows.append([
        f"{t['model']}{shared}", pct(t["last_top1"]), pct(t["best_top1"]),
        pct(s["last_top1"]) if s else "n/a",
        pct(s["best_top1"]) if s else "n/a",
        pct(d["last_top1"]), pct(d["best_top1"]),
        _fmt_gain(row.get("gain_last", [])),
        _fmt_gain(row.get("gain_best", []))])
  lines.append(metrics_io.markdown_table(header, rows))
  lines += ["", "Per phase (mean over runs): wall time includes data "
            "loading, compilation, evaluation and checkpoints; examples/s "
            "= train examples / train-loop time (incl. compilation) and "
            "steady-state (after the first compiled call).", ""]
  prow = []
  for p, v in ph.items():
    prow.append([
        p, v["mode"], v["model"] + (f" <- {v['teacher']}" if v["teacher"]
                                    else ""),
        f"{v['epochs']:g}", len(v["wall_s"]),
        f"{np.mean(v['wall_s']):.1f}",
        _fmt_eps(float(np.mean(v["examples_per_sec"]))),
        _fmt_eps(float(np.mean([x for x in v["steady_examples_per_sec"]
                                if x is not None]))
                 if any(x is not None for x in v["steady_examples_per_sec"])
                 else None)])
  lines.append(metrics_io.markdown_table(
      ["phase", "mode", "model", "epochs", "runs", "wall s", "examples/s",
       "steady examples/s"], prow))
  if "total_wall_s" in results:
    lines += ["", f"Total wall time: {results['total_wall_s']:.1f} s"]
  return "\n".join(lines)
