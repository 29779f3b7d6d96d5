"""Language-model seed experiment: teacher, student alone, distillation modes.

`run(config, workdir)` for a config with ``task = "lm"`` and ``mode =
"seed_experiment"`` (`configs/lm_jane_austen.py`). The LM sibling of
`experiments.seed_experiment` (whose reuse rules and paired t-intervals it
reuses): every phase of ``seed_experiment.phases`` runs for every seed in
``<workdir>/seed<k>/<phase>`` with `kd_jax.trainer.lm.train_and_evaluate`;
phases in ``seed_experiment.shared_phases`` (the teacher) run once, with the
first seed. A phase config is the top-level sections (``data``, ``train``,
``optimizer``, ``checkpoint``, ``kd``, ``gkd``, ``topk``) updated by the
phase's own keys; its model is ``student_model`` (``teacher_model`` for a
phase in ``seed_experiment.teacher_phases``), and a phase of
``seed_experiment.distill_from`` gets ``teacher_model`` with that teacher
phase's workdir as checkpoint.

``scale`` (default 1) multiplies both models' ``hidden_size`` and
``intermediate_size`` (kept a multiple of ``2 * num_heads``), every phase's
``train.steps`` and ``data.train_sequences``: ``--config.scale=8`` makes the
CPU-sized job a real one on an accelerator.

A finished phase is reused only when its stored ``config.json`` equals the
current one and its teacher was reused; otherwise it runs again (its old
workdir is moved aside). Results: held-out perplexity per split (mean ± std
over seeds, last = after the final step, best = at the step of the best
first eval split, e.g. validation), the paired gain (student alone minus
distilled perplexity of the same seed, > 0 = distillation helps, with its
95% t-interval), wall time and tokens/s per phase -- printed and saved as
``results.md`` / ``results.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List

import ml_collections
import numpy as np

from experiments import seed_experiment as se_lib
from kd_jax import metrics_io
from kd_jax.trainer import ConfigError
from kd_jax.trainer import lm as lm_trainer

_SECTIONS = ("data", "train", "optimizer", "checkpoint", "kd", "gkd", "topk")


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for k, v in over.items():
    out[k] = (_merge(out[k], v) if isinstance(v, dict)
              and isinstance(out.get(k), dict) else v)
  return out


def scaled_model(model: dict, scale: float) -> dict:
  """A model section with widths multiplied by `scale` (preset + overrides;
  widths stay multiples of ``2 * num_heads`` so head_dim stays even)."""
  if scale == 1 or model.get("hf_dir"):
    return model
  from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
  base = dict(lm.PRESETS[model["preset"]], **model.get("overrides", {}))
  q = 2 * base["num_heads"]
  ov = dict(model.get("overrides", {}))
  for k in ("hidden_size", "intermediate_size"):
    ov[k] = max(q, int(round(base[k] * scale / q)) * q)
  return dict(model, overrides=ov)


def phase_config(config, phase: str, seed: int) -> ml_collections.ConfigDict:
  """The config of one phase for one seed."""
  se = config.seed_experiment
  scale = float(config.get("scale", 1.0))
  base = {s: config[s].to_dict() for s in _SECTIONS if s in config}
  d = _merge(base, se.phases[phase].to_dict())
  d["task"], d["seed"] = "lm", int(seed)
  is_teacher = phase in tuple(se.get("teacher_phases", ()))
  d["student"] = scaled_model(
      (config.teacher_model if is_teacher else config.student_model
       ).to_dict(), scale)
  if phase in se.distill_from:
    d["teacher"] = scaled_model(config.teacher_model.to_dict(), scale)
  d["train"]["steps"] = max(1, int(round(d["train"]["steps"] * scale)))
  for k in ("eval_every", "log_every"):
    if d["train"].get(k):
      d["train"][k] = max(1, int(round(d["train"][k] * scale)))
  if d["data"].get("train_sequences"):
    d["data"]["train_sequences"] = int(round(d["data"]["train_sequences"]
                                             * scale))
  return ml_collections.ConfigDict(d)


def phase_order(config) -> List[str]:
  """`seed_experiment.order`, else teachers first, then the rest (a
  `ConfigDict` does not keep insertion order)."""
  se = config.seed_experiment
  order = list(se.get("order", ()) or ())
  if order:
    return order
  names = sorted(se.phases.keys())
  return ([p for p in names if p not in se.distill_from]
          + [p for p in names if p in se.distill_from])


def validate(config):
  se = config.get("seed_experiment", None)
  if se is None or not tuple(se.seeds):
    raise ConfigError("seed_experiment", "an LM seed experiment needs "
                      "seed_experiment.phases and seeds.")
  names = phase_order(config)
  for p in names:
    if p not in se.phases:
      raise ConfigError("seed_experiment.order", f"unknown phase {p!r}; "
                        f"phases: {sorted(se.phases.keys())}.")
  for d, t in se.distill_from.items():
    if d not in names or t not in names or names.index(t) > names.index(d):
      raise ConfigError(f"seed_experiment.distill_from.{d}",
                        f"phase {d!r} must come after its teacher {t!r}; "
                        f"phases: {names}.")
  for p in names:  # parse every phase once (data folder, keys, ranges)
    pc = phase_config(config, p, tuple(se.seeds)[0])
    if p in se.distill_from:
      pc.teacher.checkpoint = "(set at run time)"
    try:
      lm_trainer.parse(pc)
    except ConfigError as e:
      raise ConfigError(f"seed_experiment.phases.{p}.{e.key}",
                        str(e).split(": ", 1)[1]) from None


def _finished(wd: str):
  try:
    with open(os.path.join(wd, "report.json")) as f:
      rep = json.load(f)
    return rep if rep.get("finished") else None
  except (OSError, json.JSONDecodeError):
    return None


def _reuse(wd, pc, deps_ok):
  """(report or None, why-not) as `seed_experiment.reuse_decision`."""
  if not os.path.isdir(wd):
    return None, None
  rep, stored = _finished(wd), se_lib.stored_config(wd)
  if stored is None:
    return None, ("its stored config.json is missing" if rep else None)
  diff = se_lib.config_diff(stored, json.loads(pc.to_json_best_effort()))
  if diff:
    return None, "its config changed (" + "; ".join(diff[:3]) + ")"
  if not deps_ok:
    return None, "its teacher phase was run again"
  return rep, None


def _run_phase(config, workdir, p, seed, seeds, reused):
  wd, pc, deps_ok = se_lib.phase_inputs(config, workdir, p, seed, seeds,
                                        reused, make_config=phase_config)
  src = seeds[0] if p in config.seed_experiment.shared_phases else seed
  if (p, src) in reused:
    return _finished(wd), reused[(p, src)]
  se_lib.sync(f"decide {wd}")
  rep, why = _reuse(wd, pc, deps_ok)
  # (before anything is moved)
  se_lib.sync(f"decided {wd}")
  if rep is not None:
    _say(f"[seed {seed}] {p}: done before with the same config, reusing "
         f"{wd}")
    return rep, True
  if why is not None:
    dest = se_lib.set_aside(wd)
    _say(f"[seed {seed}] {p}: running again: {why}; previous run moved to "
         f"{dest}")
  _say(f"[seed {seed}] {p}: {pc.mode}")
  rep = lm_trainer.train_and_evaluate(pc, wd)
  _say(f"[seed {seed}] {p}: " + ", ".join(
      f"{k} {v:.2f}" for k, v in rep.items()
      if k.startswith("last_") and v is not None)
       + f", {rep['wall_s']:.1f} s")
  return rep, False


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs every phase for every seed; returns and saves the results.

  With several processes (`experiments.main --num_processes`) every process
  runs every phase; the reuse decisions are taken by all after a barrier,
  process 0 alone moves stale phases aside, writes the phases' files and
  the tables, and prints.
  """
  validate(config)
  se = config.seed_experiment
  seeds = [int(s) for s in se.seeds]
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  order = phase_order(config)
  reports: Dict[str, List[Dict[str, Any]]] = {p: [] for p in order}
  reused: Dict[Any, bool] = {}
  for seed in seeds:
    for p in order:
      rep, was = _run_phase(config, workdir, p, seed, seeds, reused)
      reused[(p, seeds[0] if p in se.shared_phases else seed)] = was
      reports[p].append(rep)
  results = summarize(config, reports)
  results["total_wall_s"] = time.perf_counter() - t0
  md = format_markdown(config, results)
  if se_lib.is_main():
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(md + "\n")
    metrics_io.write_json(os.path.join(workdir, "results.json"), results)
    print(md, flush=True)
  return results


def _say(msg: str) -> None:
  se_lib.say(msg)  # process 0 prints


def summarize(config, reports) -> Dict[str, Any]:
  se = config.seed_experiment
  splits = list(config.data.get("eval_splits", ("validation", "test")))
  out: Dict[str, Any] = {"seeds": [int(s) for s in se.seeds],
                         "splits": splits, "phases": {}}
  keys = [f"{w}_{s}_ppl" for s in splits for w in ("last", "best")]
  for p, reps in reports.items():
    uniq = reps[:1] if p in se.shared_phases else reps
    ph = {k: [r[k] for r in uniq] for k in keys + [
        "wall_s", "train_s", "tokens_per_sec", "steady_tokens_per_sec",
        "cache_s"] if k in uniq[0]}
    ph.update(mode=uniq[0]["mode"], model=uniq[0]["model"],
              model_params=uniq[0]["model_params"], steps=uniq[0]["steps"],
              shared_across_seeds=p in se.shared_phases)
    out["phases"][p] = ph
  student = se.student_phase
  out["gains"] = {}
  for p in [q for q in reports if q in se.distill_from]:
    out["gains"][p] = {}
    for k in keys:
      diff = (np.asarray(out["phases"][student][k])
              - np.asarray(out["phases"][p][k]))
      out["gains"][p][k] = dict(se_lib.paired_interval(diff),
                                per_seed=diff.tolist())
  return out


def _fmt_gain(g) -> str:
  if g["ci95"] is None:
    return f"{g['mean']:+.2f}"
  return f"{g['mean']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"


def format_markdown(config, results) -> str:
  se = config.seed_experiment
  splits, ph = results["splits"], results["phases"]
  ms = lambda v: metrics_io.fmt_mean_std(v)  # noqa: E731
  last = splits[-1]
  lines = [f"Held-out perplexity (lower is better), seeds {results['seeds']}:"
           f" mean ± std over seeds (ddof=0); 'last' = after the final step, "
           f"'best' = at the step with the best {splits[0]} perplexity. Gain "
           f"= student alone minus distilled {last} perplexity of the same "
           "seed (> 0: distillation helps), mean [95% t-interval].", ""]
  header = ["phase", "mode", "model"]
  for s in splits:
    header += [f"{s} last", f"{s} best"]
  header += [f"gain {last} last", f"gain {last} best"]
  rows = []
  for p, v in ph.items():
    shared = " (1 run, shared)" if v["shared_across_seeds"] else ""
    row = [p + shared, v["mode"],
           f"{v['model']} ({v['model_params'] / 1e6:.2f}M)"]
    for s in splits:
      row += [ms(v[f"last_{s}_ppl"]), ms(v[f"best_{s}_ppl"])]
    g = results["gains"].get(p)
    row += ([_fmt_gain(g[f"last_{last}_ppl"]), _fmt_gain(g[f"best_{last}_ppl"])]
            if g else ["", ""])
    rows.append(row)
  lines.append(metrics_io.markdown_table(header, rows))
  lines += ["", "Per phase (mean over runs): wall time includes model "
            "building, compilation, evaluation, checkpoints and (top-k) the "
            "teacher cache; tokens/s = trained tokens (batch x (seq_len - 1) "
            "per step) / train-loop time incl. compilation, steady = after "
            "the first call.", ""]
  prow = []
  for p, v in ph.items():
    steady = [x for x in v.get("steady_tokens_per_sec", []) if x]
    prow.append([p, v["steps"], len(v["wall_s"]),
                 f"{np.mean(v['wall_s']):.1f}",
                 f"{np.mean(v.get('cache_s') or [0.0]):.1f}",
                 f"{np.mean(v['tokens_per_sec']):,.0f}",
                 f"{np.mean(steady):,.0f}" if steady else "n/a"])
  lines.append(metrics_io.markdown_table(
      ["phase", "steps", "runs", "wall s", "cache s", "tokens/s",
       "steady tokens/s"], prow))
  if "total_wall_s" in results:
    lines += ["", f"Total wall time: {results['total_wall_s']:.1f} s"]
  return "\n".join(lines)
