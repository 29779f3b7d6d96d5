"""Phases x seeds: teachers, the student alone, distillation -- any task.

`run(config, workdir)` for ``config.mode == 'seed_experiment'``
(`configs/mnist_seed.py`, `configs/lm_jane_austen.py`). The top-level
sections (``task``, ``data``, ``model``, ``teacher``, ``loss``,
``optimizer``, ``train``, ``checkpoint``, ...) are the base of every phase;
``seed_experiment.phases.<name>`` holds what a phase changes (its ``mode``
at least; a model's ``overrides``, the loss ``terms`` and a ``mesh`` are
replaced whole, everything else merged key by key), so ``--config.data.data_dir=...`` applies to every phase and
``--config.seed_experiment.phases.<name>.train.num_epochs=2`` to one. For
every seed each phase runs with `kd_jax.trainer.train_and_evaluate` in its
own workdir ``<workdir>/seed<k>/<phase>``:

* in ``seed_experiment.order`` (default: teachers first); a distillation
  phase named in ``seed_experiment.distill_from`` gets its teacher phase's
  workdir as ``teacher.checkpoint`` (same seed, or the first seed's when the
  teacher phase is in ``seed_experiment.shared_phases``, trained once);
* a phase named in ``seed_experiment.init_from`` starts its student from
  the final parameters of another phase (``model.init_checkpoint`` = that
  phase's workdir, same seed unless shared; language models: on-policy
  methods continue a supervised student, as their papers do);
* ``seed_experiment.scale`` (language models) multiplies every phase's
  model widths, steps and training sequences (`lm_config.scale`).

A finished phase is reused only when its stored ``config.json`` equals the
phase's current config and its teacher phase was reused too; otherwise it
runs again (its old workdir is moved aside to ``<phase>.old-<time>``,
nothing is deleted) and the reason is printed. An interrupted phase with
the current config resumes from its own checkpoint.

Several processes (`experiments.main --coordinator_address/--num_processes/
--process_id`): every process runs every phase, data parallel over all
processes' devices -- a one-device ``train.parallel`` becomes ``'jit'`` --
and process 0 alone decides phase reuse (the decision is broadcast), moves
stale workdirs aside, prints, and writes the tables.

Results: one row per phase -- the task's metrics (`Task.metrics`: top-1
accuracy, held-out perplexity per split) after the final evaluation and at
the best one, mean ± std over seeds -- with, for distillation phases, the
paired gain over ``seed_experiment.student_phase`` (same seed; > 0 =
distillation helps; ``seed_experiment.baselines.<phase>`` names another
baseline phase, e.g. the student continued for the same budget) and its
95% t-interval (none for a phase whose network is not the student phase's,
e.g. a TAKD assistant: "n/a (other network)"), the paired gains of the
phase (or ensemble) pairs in ``seed_experiment.comparisons`` (e.g. a method
against plain KD), and wall time and throughput per phase. The gains are
on the task's gain metric, or on ``seed_experiment.gain_metric`` (a metric
key, e.g. ``'test_bpb'``: bits per byte compares models with different
tokenizers). A phase's own
metrics (BYOT's exits) get columns too. Printed, and saved as
``results.md`` / ``results.json``.

``seed_experiment.ensembles = {name: (phase, ...)}`` (Born-Again
Networks' BANE): after each seed's phases, the ensemble of those phases'
last checkpoints (one architecture; mean of the softmax probabilities) is
evaluated on the test set (`kd_jax.trainer.evaluate_ensemble`, into
``<workdir>/seed<k>/<name>``; nothing is trained, so it always reruns) and
reported as a row (``mode`` 'ensemble', 'last' metrics only).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Tuple

import ml_collections
import numpy as np

from kd_jax import metrics_io
from kd_jax import trainer
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import loop
from kd_jax.trainer import workdir as workdir_lib

_KEYS = ("seeds", "phases", "order", "distill_from", "shared_phases",
         "shared_seed", "student_phase", "scale", "comparisons", "ensembles",
         "init_from", "baselines", "gain_metric")
_COSMETIC = (("train", "progress_bar"),)  # keys that do not change results


# ---------------------------------------------------------------------------
# Phases.


# Mappings a phase replaces whole (a model's `overrides`, the loss `terms`,
# a mesh): merging them key by key would mix two recipes.
_ATOMIC = ("overrides", "terms", "mesh")


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = (_merge(out[k], v) if isinstance(v, dict) and k not in _ATOMIC
              and isinstance(out.get(k), dict) else v)
  return out


def phase_config(config: ml_collections.ConfigDict, phase: str,
                 seed: int) -> ml_collections.ConfigDict:
  """The config of one phase for one seed: the top-level sections updated
  by the phase's own keys (then scaled; debug shrinking per phase)."""
  se = config.seed_experiment
  base = {k: v for k, v in config.to_dict().items()
          if k not in ("seed_experiment", "debug_applied", "mode")}
  d = _merge(base, se.phases[phase].to_dict())
  d["seed"], d["debug"] = int(seed), bool(config.get("debug", False))
  factor = float(se.get("scale", 1.0) or 1.0)
  if factor != 1:
    _, schema = config_lib.task_schema(config)
    if schema.scale is None:
      raise trainer.ConfigError("seed_experiment.scale", "task "
                                f"{d.get('task')!r} has no scaling.")
    d = schema.scale(d, factor)
  return trainer.apply_debug(ml_collections.ConfigDict(d))


def phase_order(config) -> List[str]:
  """`seed_experiment.order` (default: the phases, teachers first)."""
  se = config.seed_experiment
  order = list(se.get("order", ()) or ())
  if not order:
    names = list(se.phases.keys())
    order = [p for p in names if p not in se.distill_from]
    order += [p for p in names if p in se.distill_from]
  return order


def validate(config) -> None:
  """The experiment's structure and every phase's config (parsed once)."""
  se = config.get("seed_experiment", None)
  if se is None:
    raise trainer.ConfigError("seed_experiment", "mode 'seed_experiment' "
                              "needs a seed_experiment section (see "
                              "configs/mnist_seed.py).")
  config_lib.check_keys(se, _KEYS, prefix="seed_experiment.")
  if not tuple(se.seeds):
    raise trainer.ConfigError("seed_experiment.seeds",
                              "needs at least one seed.")
  phases = phase_order(config)
  for p in phases:
    if p not in se.phases:
      raise trainer.ConfigError("seed_experiment.order", f"unknown phase "
                                f"{p!r}; phases: {sorted(se.phases.keys())}.")
  for key in ("distill_from", "init_from", "baselines"):
    for d, t in (se.get(key, None) or {}).items():
      if d not in phases:
        raise trainer.ConfigError(f"seed_experiment.{key}.{d}",
                                  f"unknown phase {d!r}; phases: {phases}.")
      if t not in phases or phases.index(t) > phases.index(d):
        what = {"distill_from": "teacher", "init_from": "source",
                "baselines": "baseline"}[key]
        raise trainer.ConfigError(
            f"seed_experiment.{key}.{d}",
            f"{what} phase {t!r} must be a phase listed before {d!r}.")
  sseed = se.get("shared_seed", -1)
  if sseed is not None and (isinstance(sseed, bool)
                            or not isinstance(sseed, int)):
    raise trainer.ConfigError("seed_experiment.shared_seed",
                              f"must be an int (< 0: the first seed); got "
                              f"{sseed!r}.")
  for p in se.get("shared_phases", ()):
    if p not in phases:
      raise trainer.ConfigError("seed_experiment.shared_phases",
                                f"unknown phase {p!r}; phases: {phases}.")
  ensembles = dict(se.get("ensembles", None) or {})
  for name, members in ensembles.items():
    key = f"seed_experiment.ensembles.{name}"
    if name in phases:
      raise trainer.ConfigError(key, f"{name!r} is a phase's name too.")
    if not members or any(p not in phases for p in members):
      raise trainer.ConfigError(key, f"{tuple(members)!r}: expected phases "
                                f"of {phases}.")
  rows = phases + list(ensembles)
  for pair in se.get("comparisons", ()) or ():
    if len(pair) != 2 or any(p not in rows for p in pair):
      raise trainer.ConfigError("seed_experiment.comparisons",
                                f"{pair!r}: expected (phase, phase) of "
                                f"{rows}.")
  student = se.get("student_phase", "")
  if student and student not in phases:
    raise trainer.ConfigError("seed_experiment.student_phase",
                              f"unknown phase {student!r}; phases: {phases}.")
  rcs = {}
  if se.get("gain_metric", ""):
    _metrics(config)  # a known metric
  for p in phases:
    pc = phase_config(config, p, tuple(se.seeds)[0])
    try:
      rcs[p] = trainer.parse(pc, check_paths=p not in se.distill_from
                             and p not in _init_from(se))
    except trainer.ConfigError as e:
      raise trainer.ConfigError(f"seed_experiment.phases.{p}.{e.key}",
                                str(e).split(": ", 1)[1]) from None
  for name, members in ensembles.items():
    from kd_jax.trainer import ensemble  # pylint: disable=g-import-not-at-top
    ensemble.check_members([rcs[p] for p in members], members,
                           f"seed_experiment.ensembles.{name}")


# ---------------------------------------------------------------------------
# Reuse.


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


def _comparable(cfg_json):
  d = json.loads(json.dumps(cfg_json))
  for sec, key in _COSMETIC:
    d.get(sec, {}).pop(key, None)
  return d


def reuse_decision(wd: str, pc, deps_reused):
  """(reuse, why-not): a finished phase is reused only when its stored
  config equals the current one and the phases it depends on were reused
  (`deps_reused`: True, or False / the name of the one that was not).
  `why-not` is None for a fresh or an interrupted-but-current phase (which
  then runs / resumes from its checkpoint in place), else the reason its
  old workdir is stale."""
  if not os.path.isdir(wd):
    return False, None
  finished = loop.read_report(wd) is not None
  stored = stored_config(wd)
  if stored is None:
    return False, ("its stored config.json is missing" if finished else None)
  current = json.loads(pc.to_json_best_effort())
  diff = config_diff(_comparable(stored), _comparable(current))
  if diff:
    return False, "its config changed (" + "; ".join(diff[:3]) + (
        "; ..." if len(diff) > 3 else "") + ")"
  if deps_reused is not True:
    return False, (deps_reused if isinstance(deps_reused, str) else
                   "its teacher phase") + " was run again"
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
  if jax.process_count() == 1 or par not in ("none", "single"):
    return config
  config = config.copy_and_resolve_references()
  config.train.parallel = "jit"
  say(f"train.parallel={par!r} runs on one device; with "
      f"{jax.process_count()} processes every phase runs with "
      "train.parallel='jit'.")
  return config


def sync(name: str) -> None:
  """A barrier of all processes (no-op with one process)."""
  loop.barrier(name)


def is_main() -> bool:
  return loop.is_main()


def say(msg: str) -> None:
  if is_main():
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# The run.


def shared_seed(se, seeds) -> int:
  """The seed whose run of a shared phase every seed uses:
  ``seed_experiment.shared_seed`` when set (>= 0; it need not be one of
  ``seeds``: then that run must be in the workdir already, e.g. one process
  per seed sharing the first one's teacher), else the first seed."""
  s = se.get("shared_seed", -1)
  return int(seeds[0]) if s is None or int(s) < 0 else int(s)


def phase_inputs(config, workdir, p, seed, seeds, reused):
  """(workdir, config, teacher phase reused) of phase `p` for `seed`: a
  shared phase lives under the first seed; a distillation phase gets its
  teacher phase's workdir as `teacher.checkpoint`."""
  se = config.seed_experiment
  src_seed = shared_seed(se, seeds) if p in se.shared_phases else seed
  wd = os.path.join(workdir, f"seed{src_seed}", p)
  pc = phase_config(config, p, src_seed)
  deps_ok = True
  if p in se.distill_from:
    t = se.distill_from[p]
    t_seed = shared_seed(se, seeds) if t in se.shared_phases else seed
    pc.teacher.checkpoint = os.path.join(workdir, f"seed{t_seed}", t)
    deps_ok = reused.get((t, t_seed), False)
  if p in _init_from(se):
    s = _init_from(se)[p]
    s_seed = shared_seed(se, seeds) if s in se.shared_phases else seed
    pc.model.init_checkpoint = os.path.join(workdir, f"seed{s_seed}", s)
    if deps_ok and not reused.get((s, s_seed), False):
      deps_ok = f"the phase it starts from ({s})"
  return wd, pc, deps_ok


def _init_from(se) -> Dict[str, str]:
  return dict(se.get("init_from", None) or {})


def _baselines(se) -> Dict[str, str]:
  return dict(se.get("baselines", None) or {})


def _headline(rep: Dict[str, Any], metrics) -> str:
  parts = []
  for m in metrics:
    if not m.table or rep.get(f"last_{m.key}") is None:
      continue
    last, best = rep[f"last_{m.key}"], rep.get(f"best_{m.key}")
    parts.append(f"{m.label} last {m.scale * last:.{m.digits}f}" + (
        f", best {m.scale * best:.{m.digits}f}" if best is not None else ""))
  return "; ".join(parts) + f", {rep['wall_s']:.1f} s"


def _run_phase(config, workdir, p, seed, seeds, reused):
  """Runs (or reuses) phase `p` of `seed`; returns (report, reused)."""
  wd, pc, deps_ok = phase_inputs(config, workdir, p, seed, seeds, reused)
  se = config.seed_experiment
  key = (p, shared_seed(se, seeds) if p in se.shared_phases else seed)
  if key in reused:  # a shared phase, done for an earlier seed
    return loop.read_report(wd), reused[key]
  ok, why = agreed(*(reuse_decision(wd, pc, deps_ok) if is_main()
                     else (False, None)))
  if ok:
    say(f"[seed {seed}] {p}: done before with the same config, reusing "
        f"{wd}")
    return loop.read_report(wd), True
  if why is not None:
    say(f"[seed {seed}] {p}: running again: {why}; previous run moved to "
        f"{set_aside(wd)}")
  rc = trainer.parse(pc)
  metrics = loop.TASKS[rc.task].metrics(rc)
  say(f"[seed {seed}] {p}: {pc.mode} {_model_name(pc)}" + (
      f" <- {_model_name(pc.teacher)}" if pc.mode == "distill" else ""))
  rep = trainer.train_and_evaluate(pc, wd)
  rep.pop("_final_state", None)
  say(f"[seed {seed}] {p}: " + _headline(rep, metrics))
  return rep, False


def _run_ensemble(config, workdir, name, seed, seeds):
  """Evaluates ensemble `name` of `seed` (its members' last checkpoints)
  into `<workdir>/seed<k>/<name>`; returns its report."""
  se = config.seed_experiment
  members = tuple(se.ensembles[name])
  cfgs, wds = [], []
  for p in members:
    src = shared_seed(se, seeds) if p in se.shared_phases else seed
    wds.append(os.path.join(workdir, f"seed{src}", p))
    cfgs.append(phase_config(config, p, src))
  say(f"[seed {seed}] {name}: ensemble of {', '.join(members)}")
  rep = trainer.evaluate_ensemble(cfgs, wds, os.path.join(
      workdir, f"seed{seed}", name), key=f"seed_experiment.ensembles.{name}")
  rep["members"] = list(members)
  say(f"[seed {seed}] {name}: " + _headline(rep, _metrics(config)))
  return rep


def _model_name(section) -> str:
  m = section.get("model", section)
  return str(m.get("name", "") or m.get("preset", "") or m.get("hf_dir", ""))


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs every phase for every seed; returns and saves the results table.

  In multi-process runs every process runs every phase; only process 0
  prints and writes the tables, the others return what it wrote
  (`results.json`).
  """
  config = span_processes(trainer.apply_debug(config))
  validate(config)
  with workdir_lib.locked(workdir, main=is_main()):
    return _run(config, workdir)


def _run(config, workdir: str) -> Dict[str, Any]:
  se = config.seed_experiment
  seeds = [int(s) for s in se.seeds]
  phases = phase_order(config)
  t0 = time.perf_counter()
  ensembles = list(dict(se.get("ensembles", None) or {}))
  reports: Dict[str, List[Dict[str, Any]]] = {p: [] for p in
                                              phases + ensembles}
  reused: Dict[Any, bool] = {}
  for seed in seeds:
    for p in phases:
      rep, was_reused = _run_phase(config, workdir, p, seed, seeds, reused)
      src_seed = shared_seed(se, seeds) if p in se.shared_phases else seed
      reused[(p, src_seed)] = was_reused
      reports[p].append(rep)
    for name in ensembles:
      reports[name].append(_run_ensemble(config, workdir, name, seed, seeds))
  path = os.path.join(workdir, "results.json")
  if is_main():
    results = summarize(config, reports)
    results["total_wall_s"] = time.perf_counter() - t0
    md = format_markdown(config, results)
    metrics_io.write_text(os.path.join(workdir, "results.md"), md + "\n")
    metrics_io.write_json(path, results)
    print(md, flush=True)
  sync(f"results {workdir}")
  if not is_main():
    with open(path) as f:
      results = json.load(f)
  return results


# ---------------------------------------------------------------------------
# Results.


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
  same seed's distilled minus student-alone result). `ci95` is None for
  one seed.
  """
  d = np.asarray(list(diffs), np.float64)
  n = d.size
  mean = float(d.mean()) if n else math.nan
  if n < 2:
    return {"mean": mean, "ci95": None, "n": int(n)}
  half = t975(n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(n)}


def _metrics(config) -> Tuple[loop.Metric, ...]:
  """The task's metrics: those of every phase (the first phase's first; a
  phase may add its own, e.g. BYOT's exits); the gain on
  ``seed_experiment.gain_metric`` when given."""
  out: Dict[str, loop.Metric] = {}
  seed = tuple(config.seed_experiment.seeds)[0]
  for p in phase_order(config):
    rc = trainer.parse(phase_config(config, p, seed), check_paths=False)
    for m in loop.TASKS[rc.task].metrics(rc):
      out.setdefault(m.key, m)
  metrics = tuple(out.values())
  key = config.seed_experiment.get("gain_metric", "") or ""
  if not key:
    return metrics
  if key not in out:
    raise trainer.ConfigError("seed_experiment.gain_metric", f"unknown "
                              f"metric {key!r}; the task's: {list(out)}.")
  return tuple(dataclasses.replace(m, gain=m.key == key) for m in metrics)


def _rates(reps) -> Dict[str, List[Any]]:
  return {k: [r.get(k) for r in reps] for k in reps[0]
          if k.endswith("_per_sec")}


def summarize(config, reports) -> Dict[str, Any]:
  se = config.seed_experiment
  metrics = _metrics(config)
  out: Dict[str, Any] = {"seeds": [int(s) for s in se.seeds],
                         "metrics": [dataclasses.asdict(m) for m in metrics],
                         "phases": {}, "gains": {}}
  for p, reps in reports.items():
    shared = p in se.shared_phases
    uniq = reps[:1] if shared else reps
    ph = {f"{w}_{m.key}": [r.get(f"{w}_{m.key}") for r in uniq]
          for m in metrics for w in ("last", "best")}
    ph.update(_rates(uniq))
    if "members" in uniq[0]:  # an ensemble
      ph["members"] = uniq[0]["members"]
    ph.update(mode=uniq[0]["mode"], model=uniq[0]["model"],
              teacher=uniq[0].get("teacher"),
              model_params=uniq[0].get("model_params"),
              steps=uniq[0]["steps"], epochs=uniq[0]["epochs"],
              shared_across_seeds=shared,
              wall_s=[r["wall_s"] for r in uniq],
              train_s=[r["train_s"] for r in uniq],
              cache_s=[r.get("cache_s", 0.0) or 0.0 for r in uniq])
    for k in _BUDGET:  # language models: what each phase trained on
      if uniq[0].get(k) is not None:
        ph[k] = uniq[0][k]
    if p in _init_from(se):
      ph["init_from"] = _init_from(se)[p]
    out["phases"][p] = ph
  student = se.get("student_phase", "")
  for p in reports:
    base = _baselines(se).get(p, student if p in se.distill_from else "")
    if base in out["phases"]:
      if p not in _baselines(se) and (
          out["phases"][p]["model"] != out["phases"][base]["model"]):
        continue  # another network (a TAKD assistant): no gain
      out["gains"][p] = _gains(out["phases"][p], out["phases"][base],
                               metrics)
      if p in _baselines(se):
        out["gains"][p]["vs"] = base
  out["comparisons"] = {
      f"{a} vs {b}": _gains(out["phases"][a], out["phases"][b], metrics)
      for a, b in (se.get("comparisons", ()) or ())}
  return out


_BUDGET = ("loss_tokens", "teacher_tokens", "generated_tokens")
_BUDGET_NOTE = (" Budget columns (language models): loss tokens = the "
                "target positions the loss sees over the phase (the tokens "
                "of tokens/s); teacher tokens = tokens the teacher processes "
                "(forward passes and its share of sampling; expected under "
                "GKD's coin); sampled tokens = generated tokens; 'starts "
                "from' = the phase whose final student it continues.")


def _gains(ph_a, ph_b, metrics) -> Dict[str, Any]:
  """Paired gains of phase a over phase b (same seeds; > 0: a is better)
  on the gain metric, last and best."""
  out = {}
  for m in metrics:
    if not m.gain:
      continue
    for w in ("last", "best"):
      a, b = ph_a.get(f"{w}_{m.key}"), ph_b.get(f"{w}_{m.key}")
      if a is None or b is None or None in a or None in b:
        continue  # (an ensemble has no 'best')
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      diff = (a - b) if m.higher else (b - a)
      out[f"{w}_{m.key}"] = dict(paired_interval(m.scale * diff),
                                 per_seed=diff.tolist())
  return out


def _fmt_gain(g, digits: int = 2) -> str:
  if g is None:
    return ""
  f = lambda x: f"{x:+.{digits}f}"  # noqa: E731
  if g["ci95"] is None:
    return f(g["mean"])
  return f"{f(g['mean'])} [{f(g['ci95'][0])}, {f(g['ci95'][1])}]"


def _fmt_values(values, scale: float, digits: int = 2) -> str:
  """mean ± std over seeds; 'n/a' when a run has no such value."""
  values = list(values or [])
  if not values or any(v is None for v in values):
    return "n/a"
  return metrics_io.fmt_mean_std(values, scale=scale, digits=digits)


def _fmt_rate(v) -> str:
  v = [x for x in v if x is not None]
  return f"{np.mean(v):,.0f}" if v else "n/a"


def format_markdown(config, results) -> str:
  se = config.seed_experiment
  metrics = [loop.Metric(**m) for m in results["metrics"]]
  shown = [m for m in metrics if m.table]
  gain = (next((m for m in metrics if m.gain), None)
          if se.get("student_phase", "") else None)  # (no baseline: no gain)
  ph = results["phases"]
  lines = [f"Seeds {results['seeds']}: mean ± std over seeds (ddof=0); "
           "'last' = after the final evaluation, 'best' = at the evaluation "
           f"with the best {metrics[0].label}."
           + (f" Gain = distilled vs '{se.student_phase}' of the same seed "
              f"({gain.label}, > 0: distillation helps), mean [95% "
              "t-interval]." if gain else ""), ""]
  header = ["phase", "mode", "model"]
  for m in shown:
    header += [f"{m.label} last", f"{m.label} best"]
  if gain:
    header += [f"gain {gain.label} last", f"gain {gain.label} best"]
  vs = bool(_baselines(se)) and gain
  if vs:
    header.append("gain vs")
  rows = []
  for p, v in ph.items():
    shared = " (1 run, shared)" if v["shared_across_seeds"] else ""
    model = v["model"] + (f" ({v['model_params'] / 1e6:.2f}M)"
                          if v.get("model_params") else "")
    model += f" <- {v['teacher']}" if v.get("teacher") else ""
    model += (f" x{len(v['members'])} ({', '.join(v['members'])})"
              if v.get("members") else "")
    row = [p + shared, v["mode"], model]
    for m in shown:
      row += [_fmt_values(v.get(f"{w}_{m.key}"), m.scale, m.digits)
              for w in ("last", "best")]
    g = results["gains"].get(p, {})
    student = ph.get(se.get("student_phase", ""))
    if gain and p in se.distill_from and student and (
        v["model"] != student["model"]):
      row += ["n/a (other network)"] * 2
    elif gain:
      row += [_fmt_gain(g.get(f"{w}_{gain.key}"), gain.digits)
              for w in ("last", "best")]
    if vs:
      row.append(g.get("vs", se.get("student_phase", "")) if g else "")
    rows.append(row)
  lines.append(metrics_io.markdown_table(header, rows))
  if results.get("comparisons") and gain:
    lines += ["", f"Comparisons (paired over seeds, {gain.label}; > 0: the "
              "first phase is better):", ""]
    lines.append(metrics_io.markdown_table(
        ["phases", "gain last", "gain best"],
        [[k, _fmt_gain(g.get(f"last_{gain.key}"), gain.digits),
          _fmt_gain(g.get(f"best_{gain.key}"), gain.digits)]
         for k, g in results["comparisons"].items()]))
  unit = "tokens" if any("tokens_per_sec" in v for v in ph.values()) else (
      "examples")
  budget = any("loss_tokens" in v for v in ph.values())
  lines += ["", f"Per phase (mean over runs): wall time includes data "
            "loading, compilation, evaluation, checkpoints (and a teacher's "
            f"top-k cache); {unit}/s = trained {unit} / train-loop time "
            "(incl. compilation) and steady-state (after the first compiled "
            "call)." + (_BUDGET_NOTE if budget else ""), ""]
  prow = [[p, v["mode"], f"{v['epochs']:.3g}", v["steps"], len(v["wall_s"]),
           f"{np.mean(v['wall_s']):.1f}", f"{np.mean(v['cache_s']):.1f}",
           _fmt_rate(v.get(f"{unit}_per_sec", [])),
           _fmt_rate(v.get(f"steady_{unit}_per_sec", []))]
          + ([v.get("init_from", "")] + [_fmt_rate([v.get(k)])
                                         for k in _BUDGET] if budget else [])
          for p, v in ph.items()]
  lines.append(metrics_io.markdown_table(
      ["phase", "mode", "epochs", "steps", "runs", "wall s", "cache s",
       f"{unit}/s", f"steady {unit}/s"]
      + (["starts from", "loss tokens", "teacher tokens", "sampled tokens"]
         if budget else []), prow))
  if "total_wall_s" in results:
    lines += ["", f"Total wall time: {results['total_wall_s']:.1f} s"]
  return "\n".join(lines)
