"""Hinton, Vinyals & Dean (2015) through the one trainer: the config keys
(`data.normalization` / `jitter` / `omit_classes` / `keep_classes`,
`optimizer.max_norm`, the `evaluation` section) against independent NumPy
computations, their one-line errors, and `configs/hinton2015.py:debug` end
to end through `python -m experiments.main`."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import hinton2015
from kd_jax import trainer
from kd_jax.train import optim
from kd_jax.trainer import classify_config
from kd_jax.trainer import error_counts
from kd_jax.trainer import feeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _phase(**data):
  c = hinton2015.get_config()
  c.mode = "train"
  del c.seed_experiment
  c.debug = True
  c = trainer.apply_debug(c)
  for k, v in data.items():
    c.data[k] = v
  return c


def test_load_data_class_subsets_and_unit_scale():
  """Transfer sets lack (or keep only) the classes asked for; the test set
  stays whole; 'unit' scaling is mean 0 / std 1; jitter reaches the Data."""
  full = feeds.load_data(trainer.parse(_phase(train_subset=0)))
  omit = feeds.load_data(trainer.parse(_phase(omit_classes=(3,),
                                              train_subset=0, jitter=2)))
  keep = feeds.load_data(trainer.parse(_phase(keep_classes=(7, 8),
                                              train_subset=0)))
  y = np.asarray(full.train.labels)
  np.testing.assert_array_equal(np.asarray(omit.train.labels), y[y != 3])
  np.testing.assert_array_equal(np.asarray(keep.train.labels),
                                y[(y == 7) | (y == 8)])
  np.testing.assert_array_equal(np.asarray(omit.train.images),
                                np.asarray(full.train.images)[y != 3])
  ev = lambda d: np.concatenate([b["label"] for b in d.eval_batches()])  # noqa: E731
  np.testing.assert_array_equal(ev(keep), ev(full))
  assert full.mean == (0.0,) and full.std == (1.0,)
  assert omit.jitter == 2 and full.jitter is None
  base = ml_collections.ConfigDict(_phase().to_dict())
  base.data.normalization = "dataset"
  d = feeds.load_data(trainer.parse(base))
  assert d.mean != (0.0,) and d.jitter is None


def test_max_norm_optimizer_matches_numpy():
  """SGD + `optimizer.max_norm`: hidden kernels' columns are projected onto
  the ball after the update, the output layer is not (unless
  `max_norm_output`), biases never; NumPy float64 transcription."""
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"kernel": rng.normal(size=(5, 4)),
                        "bias": rng.normal(size=4)},
            "Dense_1": {"kernel": rng.normal(size=(4, 3)) * 3,
                        "bias": rng.normal(size=3)}}
  grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape) * 2,
                                 params)
  tree = lambda t: {"student": jax.tree_util.tree_map(  # noqa: E731
      lambda x: jnp.asarray(x, jnp.float32), t), "distiller": {}}
  for output in (False, True):
    spec = optim.OptimizerSpec(name="sgd", learning_rate=0.5, momentum=0.0,
                               max_norm=1.5, max_norm_output=output)
    tx, _ = optim.make_optimizer(spec, steps_per_epoch=1, total_steps=1)
    upd, _ = tx.update(tree(grads), tx.init(tree(params)), tree(params))
    new = optax.apply_updates(tree(params), upd)["student"]
    for layer in ("Dense_0", "Dense_1"):
      w = params[layer]["kernel"] - 0.5 * grads[layer]["kernel"]
      if layer == "Dense_0" or output:
        norms = np.sqrt((w ** 2).sum(0))
        w = w * np.minimum(1.0, 1.5 / norms)
        assert (norms > 1.5).any()  # the constraint was active
      np.testing.assert_allclose(new[layer]["kernel"], w, rtol=1e-5,
                                 atol=1e-5)
      np.testing.assert_allclose(
          new[layer]["bias"],
          params[layer]["bias"] - 0.5 * grads[layer]["bias"], rtol=1e-5,
          atol=1e-6)


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(4)(x.reshape((x.shape[0], -1))), {}


def test_error_counter_against_numpy():
  """Errors, errors on the shifted classes, the chosen shift (the grid's
  argmin, ties to the smallest |shift|) and the errors after it, from a
  float64 NumPy loop over the same logits."""
  model = _Linear()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 3, 3, 1)).astype(np.float32)
  y = rng.integers(0, 4, size=300)
  v = model.init(jax.random.key(0), jnp.asarray(x[:1]))
  z = np.asarray(model.apply(v, jnp.asarray(x))[0], np.float64)
  ev = classify_config.EvaluationConfig(
      error_counts=True, bias_shift_classes=(1, 2),
      bias_shift_grid=(-2.0, 3.0, 0.25))
  counter = error_counts.ErrorCounter(model, ev, lambda b: b)
  batches = [{"image": x[i:i + 64], "label": y[i:i + 64]}
             for i in range(0, 300, 64)]
  out = counter(v, batches)
  deltas = np.arange(-8, 13) * 0.25
  on = np.isin(y, (1, 2))

  def errs(d):
    zz = z.copy()
    zz[:, [1, 2]] += d
    wrong = zz.argmax(-1) != y
    return wrong.sum(), (wrong & on).sum()

  table = [errs(d) for d in deltas]
  best = min(range(len(deltas)),
             key=lambda i: (table[i][0], abs(deltas[i]), deltas[i]))
  assert out["errors"] == table[8][0] and out["errors_on"] == table[8][1]
  assert out["shift"] == pytest.approx(deltas[best])
  assert (out["errors_shifted"], out["errors_on_shifted"]) == table[best]
  assert out["errors_shifted"] <= out["errors"]
  np.testing.assert_allclose(error_counts.shift_grid((-2.0, 3.0, 0.25)),
                             deltas)


def _phase_val(size, **data):
  c = _phase(train_subset=0, **data)
  c.evaluation.bias_shift_classes = (3,)
  c.evaluation.validation_size = size
  return c


def test_validation_split_is_held_out_before_the_classes_go():
  """`evaluation.validation_size`: N examples of the full training split
  (3s included), the same on every load and for every seed, disjoint from
  the transfer set, which is the rest minus the 3s, in order; off (0) the
  data is what it was."""
  full = feeds.load_data(trainer.parse(_phase(train_subset=0)))
  assert full.val_pipe is None and full.val_batches() is None
  x, y = np.asarray(full.train.images), np.asarray(full.train.labels)
  rows = {r.tobytes(): i for i, r in enumerate(x)}
  assert len(rows) == len(x)  # (mock images are distinct: rows name them)

  def load(seed=0):
    c = _phase_val(40, omit_classes=(3,))
    c.seed = seed
    d = feeds.load_data(trainer.parse(c))
    vb = list(d.val_batches())
    vx = np.concatenate([b["image"] for b in vb])
    vy = np.concatenate([b["label"] for b in vb])
    return d, vx, vy

  d, vx, vy = load()
  val_idx = np.asarray([rows[r.tobytes()] for r in vx])
  assert len(val_idx) == 40 and len(set(val_idx)) == 40
  np.testing.assert_array_equal(vy, y[val_idx])
  assert (vy == 3).sum() == round(40 * (y == 3).mean())  # stratified, has 3s
  rest = np.setdiff1d(np.arange(len(y)), val_idx)
  rest = rest[y[rest] != 3]
  np.testing.assert_array_equal(np.asarray(d.train.images), x[rest])
  np.testing.assert_array_equal(np.asarray(d.train.labels), y[rest])
  for seed in (0, 5):  # deterministic, and not tied to the run's seed
    d2, vx2, vy2 = load(seed)
    np.testing.assert_array_equal(vx2, vx)
    np.testing.assert_array_equal(np.asarray(d2.train.labels), y[rest])
  with pytest.raises(trainer.ConfigError, match=r"evaluation\.validation_"
                     r"size: 256 leaves none of the 256 training"):
    feeds.load_data(trainer.parse(_phase_val(256)))


def test_validation_chosen_shift_against_numpy():
  """`shift_val`: the grid's argmin (ties to the smallest |shift|) of the
  errors on the validation logits; `errors_shifted_val` /
  `errors_on_shifted_val`: the TEST errors with it -- a float64 NumPy
  brute force over the same logits."""
  model = _Linear()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(500, 3, 3, 1)).astype(np.float32)
  y = rng.integers(0, 4, size=500)
  v = model.init(jax.random.key(3), jnp.asarray(x[:1]))
  z = np.asarray(model.apply(v, jnp.asarray(x))[0], np.float64)
  ev = classify_config.EvaluationConfig(
      bias_shift_classes=(2,), bias_shift_grid=(-3.0, 3.0, 0.5),
      validation_size=200)
  counter = error_counts.ErrorCounter(model, ev, lambda b: b)
  batches = lambda lo, hi: [  # noqa: E731
      {"image": x[i:min(i + 64, hi)], "label": y[i:min(i + 64, hi)]}
      for i in range(lo, hi, 64)]
  out = counter(v, batches(200, 500), batches(0, 200))
  assert "shift_val" not in counter(v, batches(200, 500))
  deltas = np.arange(-6, 7) * 0.5

  def errs(d, sl):
    zz = z[sl].copy()
    zz[:, 2] += d
    wrong = zz.argmax(-1) != y[sl]
    return wrong.sum(), (wrong & (y[sl] == 2)).sum()

  val, test = slice(0, 200), slice(200, 500)
  order = lambda tab: min(range(len(deltas)), key=lambda i: (  # noqa: E731
      tab[i][0], abs(deltas[i]), deltas[i]))
  bv = order([errs(d, val) for d in deltas])
  bt = order([errs(d, test) for d in deltas])
  assert deltas[bv] != deltas[bt]  # (the data tell the two choices apart)
  assert out["shift_val"] == pytest.approx(deltas[bv])
  assert (out["errors_shifted_val"], out["errors_on_shifted_val"]) == errs(
      deltas[bv], test)
  assert out["shift"] == pytest.approx(deltas[bt])
  assert out["errors_shifted_val"] >= out["errors_shifted"]
  names = [m.key for m in error_counts.metrics(ev)]
  assert names[-3:] == ["shift_val", "errors_shifted_val",
                        "errors_on_shifted_val"]


@pytest.mark.parametrize("key,value,pattern", [
    ("data.normalization", "none", r"data\.normalization: must be 'dataset' or"),
    ("data.jitter", -1, r"data\.jitter: must be an int >= 0"),
    ("data.omit_classes", (3, 10), r"data\.omit_classes: must be distinct "
     r"class ids in \[0, 10\)"),
    ("data.keep_classes", (7, 8), r"data\.keep_classes: give omit_classes or"),
    ("optimizer.max_norm", -1.0, r"optimizer\.max_norm"),
    ("evaluation.bias_shift_grid", (1.0, 2.0, 0.1),
     r"evaluation\.bias_shift_grid: must be \(lowest <= 0"),
    ("evaluation.bias_shift_classes", (11,),
     r"evaluation\.bias_shift_classes: must be distinct"),
    ("evaluation.validation_size", -5,
     r"evaluation\.validation_size: must be an int >= 0"),
    ("evaluation.validation_size", True,
     r"evaluation\.validation_size: must be an int >= 0"),
    ("evaluation.validation_size", 1.5,
     r"evaluation\.validation_size: must be an int >= 0"),
    ("evaluation.validation_size", 10,
     r"evaluation\.validation_size: needs evaluation\.bias_shift_classes"),
])
def test_bad_values_name_the_key(key, value, pattern):
  c = _phase(omit_classes=(3,))
  sec, leaf = key.split(".")
  c[sec][leaf] = value
  with pytest.raises(trainer.ConfigError, match=pattern):
    trainer.parse(c)


def test_debug_config_end_to_end(tmp_path):
  """`configs/hinton2015.py:debug` through `python -m experiments.main`
  (mock data, 2 steps per phase): every phase reports its error counts,
  the bias-shift phases their shift, which never adds errors."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  wd = tmp_path / "wd"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=configs/hinton2015.py:debug", f"--workdir={wd}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((wd / "results.json").read_text())
  phases = res["phases"]
  assert set(phases) == {"teacher", "student", "distill", "omit3", "keep78",
                         "student_w30", "w30_T3", "w800_T1"}
  for p, r in phases.items():
    assert all(0 <= e <= 16 for e in r["last_errors"]), p  # 16 test images
  for p in ("omit3", "keep78"):
    r = phases[p]
    assert np.all(np.asarray(r["last_errors_shifted"])
                  <= np.asarray(r["last_errors"]))
    # The shift chosen on the held-out split never beats the test-chosen
    # one on the test set.
    assert np.all(np.asarray(r["last_errors_shifted_val"])
                  >= np.asarray(r["last_errors_shifted"]))
  assert "w30_T3 vs student_w30" in (wd / "results.md").read_text()
  # The paper-vs-ours table reads the same phases' reports.
  from experiments import hinton2015_report
  ph = hinton2015_report.collect([str(wd)])
  assert set(ph) == set(phases)
  text = "\n".join(hinton2015_report.table(ph))
  assert "| distilled (T=20) vs student alone | 146 − 74 = 72 |" in text
  assert "| omit3 | bias shift of 3, chosen on validation |" in text
  assert "| keep78: shift chosen on test vs on validation |" in text
  d = phases["distill"]["last_errors"][0] - phases["student"]["last_errors"][0]
  assert f"| distill | {phases['distill']['last_errors'][0]:.1f} ± 0.0 |" in text
  assert f"{-d:+.1f} (n=1)" in text


def test_shared_seed_points_every_seed_at_one_teacher(tmp_path):
  """`seed_experiment.shared_seed`: a one-seed process of seed 1 reads the
  shared teacher phase of seed 0 (the distillation phases get its workdir);
  without it the first seed is the shared one; a bad value names the key."""
  from experiments import seed_experiment
  c = hinton2015.get_config()
  c.seed_experiment.seeds = (1,)
  wd, pc, _ = seed_experiment.phase_inputs(c, str(tmp_path), "distill", 1,
                                           [1], {})
  assert wd == str(tmp_path / "seed1" / "distill")
  assert pc.teacher.checkpoint == str(tmp_path / "seed0" / "teacher")
  wd, _, _ = seed_experiment.phase_inputs(c, str(tmp_path), "teacher", 1,
                                          [1], {})
  assert wd == str(tmp_path / "seed0" / "teacher")
  c.seed_experiment.shared_seed = -1
  _, pc, _ = seed_experiment.phase_inputs(c, str(tmp_path), "distill", 1,
                                          [1], {})
  assert pc.teacher.checkpoint == str(tmp_path / "seed1" / "teacher")
  del c.seed_experiment["shared_seed"]
  c.seed_experiment.shared_seed = "0"
  with pytest.raises(trainer.ConfigError,
                     match=r"seed_experiment\.shared_seed: must be an int"):
    seed_experiment.validate(c)
