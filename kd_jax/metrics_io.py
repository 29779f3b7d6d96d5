"""Run outputs: JSON-lines + TensorBoard metric writers, curve plots, tables.

Every training run writes to its workdir

* `metrics.jsonl` -- one JSON object per logged point:
  `{"step": int, "epoch": float, "split": "train" | "eval", <metric>: float}`;
* TensorBoard event files (tensorboardX), scalars tagged `<split>/<metric>`;
* at the end `curves.png`: train loss / accuracy and eval accuracy vs epoch.

Resuming a run rewinds `metrics.jsonl` to the restored step
(`MetricsWriter(..., resume_step=s)` drops records with `step > s`), so the
file holds one record per point even after a preemption.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> w = MetricsWriter(d, tensorboard=False)
>>> w.write(10, {"loss": 0.5}, split="train", epoch=1.0)
>>> w.close()
>>> read_jsonl(os.path.join(d, "metrics.jsonl"))[0]["loss"]
0.5
>>> mean_std([1.0, 3.0])
(2.0, 1.0)
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def _to_float(v) -> float:
  return float(np.asarray(v, np.float64))


def read_jsonl(path: str) -> List[Dict[str, Any]]:
  """All records of a JSON-lines file (a truncated last line is skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut off by a kill; the rest of the file is valid.
  return out


class MetricsWriter:
  """Writes scalar metrics to `<workdir>/metrics.jsonl` and TensorBoard.

  Args:
    workdir: output directory (created).
    tensorboard: also write TensorBoard event files (tensorboardX).
    resume_step: when resuming from a checkpoint at this step, records with
      a larger step (written after that checkpoint by the killed run) are
      removed first.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               resume_step: Optional[int] = None):
    os.makedirs(workdir, exist_ok=True)
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    if resume_step is None:
      if os.path.exists(self.path):
        os.remove(self.path)
    else:
      kept = [r for r in read_jsonl(self.path)
              if int(r.get("step", 0)) <= int(resume_step)]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        for r in kept:
          f.write(json.dumps(r) + "\n")
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step)

  def write(self, step: int, metrics: Mapping[str, Any], *, split: str,
            epoch: Optional[float] = None):
    rec: Dict[str, Any] = {"step": int(step), "split": split}
    if epoch is not None:
      rec["epoch"] = float(epoch)
    for k, v in metrics.items():
      v = _to_float(v)
      rec[k] = v if math.isfinite(v) else None  # JSON has no NaN / inf
    self._file.write(json.dumps(rec) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in rec.items():
        if k in metrics and v is not None:
          self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def flush(self):
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def plot_curves(records: Sequence[Mapping[str, Any]], path: str, *,
                title: str = "") -> str:
  """Saves a PNG of train loss/top-1 and eval top-1 vs epoch; returns `path`.

  `records` are `metrics.jsonl` entries (see `read_jsonl`).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def series(split, key):
    pts = [(r.get("epoch", r["step"]), r[key]) for r in records
           if r.get("split") == split and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  x, y = series("train", "loss")
  axes[0].plot(x, y, label="train loss")
  for key in sorted({k for r in records if r.get("split") == "train"
                     for k in r} - {"loss", "top1", "step", "epoch", "split",
                                    "kd_factor", "lr", "examples_per_sec"}):
    xs, ys = series("train", key)
    axes[0].plot(xs, ys, label=f"train {key}", alpha=0.7)
  x, y = series("eval", "loss")
  if x:
    axes[0].plot(x, y, "o-", label="eval loss")
  axes[0].set_xlabel("epoch")
  axes[0].set_ylabel("loss")
  axes[0].legend(fontsize=8)
  x, y = series("train", "top1")
  if x:
    axes[1].plot(x, [100 * v for v in y], label="train top-1")
  x, y = series("eval", "top1")
  if x:
    axes[1].plot(x, [100 * v for v in y], "o-", label="eval top-1")
  x, y = series("eval", "top5")
  if x:
    axes[1].plot(x, [100 * v for v in y], "s--", label="eval top-5")
  axes[1].set_xlabel("epoch")
  axes[1].set_ylabel("accuracy (%)")
  if axes[1].get_legend_handles_labels()[0]:  # (MiniLLM: no accuracy)
    axes[1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def mean_std(values: Iterable[float]) -> Tuple[float, float]:
  """Mean and population std (ddof=0) of the values; std 0 for one value."""
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std())


def fmt_mean_std(values: Iterable[float], *, scale: float = 1.0,
                 digits: int = 2) -> str:
  """`'97.81 ± 0.12'` (std over seeds, ddof=0)."""
  m, s = mean_std([scale * x for x in values])
  if math.isnan(m):
    return "n/a"
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table."""
  lines = ["| " + " | ".join(str(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(lines)


def finite_json(obj: Any) -> Any:
  """`obj` with every NaN / inf float replaced by None (JSON has neither)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, (np.floating, np.integer)):
    return finite_json(obj.item())
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def write_json(path: str, obj: Any):
  """Atomically writes `obj` as indented JSON (NaN / inf as null)."""
  write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=True,
                              default=_json_default, allow_nan=False))


def set_aside(path: str) -> str:
  """Renames a damaged file / folder to `<path>.corrupt-<time>` (nothing is
  deleted); returns the new path."""
  import time  # pylint: disable=g-import-not-at-top
  dest = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
  n = 1
  while os.path.exists(dest):
    dest = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    n += 1
  os.replace(path, dest)
  return dest


def write_text(path: str, text: str):
  """Atomically writes `text` (a temp file in the same folder, renamed):
  readers see the old file or the new one, never a part."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  if hasattr(o, "to_dict"):
    return o.to_dict()
  return str(o)
