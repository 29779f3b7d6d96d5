"""The ensemble of finished image-classification runs, evaluated on the test set.

`evaluate_ensemble(configs, workdirs, out_dir)`: the final checkpoints of
runs of one architecture (Born-Again generations: BANE, Furlanello et al.,
ICML 2018) restored from their workdirs, the mean of their softmax
probabilities evaluated by `kd_jax.distillers.ban.make_ensemble_eval_step`
over the run's test set (`loss`: CE of the mean probabilities, `top1`,
`top5`), placed like a run (`train.parallel`, the seed experiment's
several processes). The seed experiment's ``seed_experiment.ensembles``
calls it after each seed's phases; its report (``report.json``, ``mode:
'ensemble'``, ``last_*`` metrics: the members' last checkpoints) lands in
``out_dir``. Nothing is trained: it reruns in seconds, so it is never
reused.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Dict, Sequence

import jax
import jax.numpy as jnp

from kd_jax import metrics_io
from kd_jax.data import sources as sources_lib
from kd_jax.distillers import ban
from kd_jax.trainer import classify
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import feeds as feeds_lib
from kd_jax.trainer import loop
from kd_jax.trainer import placement as placement_lib
from kd_jax.trainer import programs as programs_lib
from kd_jax.trainer import teachers as teachers_lib
from kd_jax.trainer.errors import ConfigError


def check_members(rcs: Sequence[Any], names: Sequence[str], key: str) -> None:
  """One architecture and one dataset (a `ConfigError` naming `key`)."""
  if any(rc.task != "classify" for rc in rcs):
    raise ConfigError(key, "ensembles are evaluated for task 'classify' "
                      "only.")
  models = {(rc.model.name, rc.model.num_classes) for rc in rcs}
  data = {rc.data.name for rc in rcs}
  if len(models) > 1 or len(data) > 1:
    raise ConfigError(key, f"the members {list(names)} must share one "
                      f"architecture and dataset; got models "
                      f"{sorted(models)} on {sorted(data)}.")


def _evaluate(rc, workdirs, key):
  """Per-batch ensemble metrics over the test set."""
  data = feeds_lib.load_data(rc)
  try:
    student, _ = classify.create_models(rc)
    example = jnp.zeros((1,) + tuple(data.image_shape), jnp.float32)
    placement = placement_lib.make_placement(rc, student, [], example)
    abstract = jax.eval_shape(lambda r: programs_lib.init_variables(
        student, r, data.image_shape), jax.random.key(0))
    members = [teachers_lib.restore(wd, abstract, placement, key)
               for wd in workdirs]
    fn = placement.compile(ban.make_ensemble_eval_step(
        student, axis_name=placement.axis_name,
        preprocess=feeds_lib.eval_preprocess(data)),
                           stacked=False, donate_state=False)
    return [placement.fetch(fn(members, placement.shard_batch(b)))
            for b in data.eval_batches()]
  finally:
    data.close()


def evaluate_ensemble(configs: Sequence[Any], workdirs: Sequence[str],
                      out_dir: str, *, key: str = "ensemble"
                      ) -> Dict[str, Any]:
  """Evaluates the ensemble of the runs in `workdirs` (their phase configs
  `configs`, `ConfigDict`s); returns (and writes to `out_dir`) its report.
  Errors (members of different networks, a missing or mismatched
  checkpoint) are `ConfigError`s naming `key`."""
  t0 = time.perf_counter()
  rcs = [config_lib.parse(c, check_paths=False) for c in configs]
  check_members(rcs, [os.path.basename(w) for w in workdirs], key)
  rc = rcs[0]
  with contextlib.ExitStack() as stack:
    if rc.data.mock and not sources_lib.dataset_info(rc.data.name).in_memory:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      stack.enter_context(tfds.testing.mock_data(
          num_examples=int(rc.data.mock_num_examples)))
    outs = _evaluate(rc, workdirs, key)
  ev = classify._weighted_eval(outs)  # pylint: disable=protected-access
  report = {"task": rc.task, "mode": "ensemble", "model": rc.model.name,
            "teacher": None, "members": [str(w) for w in workdirs],
            "dataset": rc.data.name, "seed": int(rc.seed), "steps": 0,
            "epochs": 0.0, "num_examples": ev["count"],
            **{f"last_{k}": ev[k] for k in ("top1", "top5", "loss")},
            **{f"best_{k}": None for k in ("top1", "top5", "loss")},
            "convention": "last_*: the ensemble of the members' last "
                          "checkpoints (mean of softmax probabilities); no "
                          "best (nothing is trained)",
            "wall_s": time.perf_counter() - t0, "train_s": 0.0,
            "finished": True}
  if loop.is_main():
    os.makedirs(out_dir, exist_ok=True)
    metrics_io.write_json(os.path.join(out_dir, "report.json"), report)
  loop.barrier(f"ensemble {out_dir}")
  return report
