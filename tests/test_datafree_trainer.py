"""The data-free / privileged-information pieces of the trainer.

* `configs/dafl_mnist.py` and `configs/lopez_paz_mnist.py` run end to end
  through `python -m experiments.main` (debug: mock data, 2 steps a phase);
* a DAFL run (task 'dafl') SIGKILLed after a checkpoint and restarted ends
  bit-identical to an uninterrupted one (generator + student states, the
  metrics log);
* per-model views in the classification feed: the student's batch is its
  view, the teacher's logits come from the teacher's view (checked against
  the teacher applied by hand), eval batches are the student's view;
* `data.subset='random'`, `data.normalization='unit'`, the `rmsprop`
  optimizer against a float64 NumPy transcription of Keras 0.x RMSprop;
* bad values are one `ConfigError` line naming the key.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from kd_jax import metrics_io
from kd_jax import models as models_lib
from kd_jax import trainer
from kd_jax.train import optim as optim_lib
from kd_jax.trainer import feeds as feeds_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


@pytest.mark.parametrize("spec,phases", [
    ("lopez_paz_mnist.py:debug", ("teacher", "student", "distill_t20_l05",
                                  "distill_t10_l10")),
    ("dafl_mnist.py:debug", ("teacher", "student", "dafl"))])
def test_config_cli_debug_run(spec, phases, tmp_path):
  wd = str(tmp_path / "wd")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main", f"--config=configs/{spec}",
       f"--workdir={wd}"], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(open(os.path.join(wd, "results.json")).read())
  text = json.dumps(res)
  for p in phases:
    assert p in text
    rep = json.loads(open(os.path.join(wd, "seed0", p, "report.json")).read())
    assert rep["finished"] and rep["steps"] == 2
    assert 0.0 <= rep["last_top1"] <= 1.0
  if "dafl" in phases:
    d = os.path.join(wd, "seed0", "dafl")
    rep = json.loads(open(os.path.join(d, "report.json")).read())
    assert rep["task"] == "dafl"
    assert os.path.getsize(os.path.join(d, "generated.png")) > 0
    train = [r for r in metrics_io.read_jsonl(os.path.join(d, "metrics.jsonl"))
             if r["split"] == "train"]
    assert train and all(np.isfinite(r["generator_loss"]) for r in train)
    assert {"one_hot", "entropy", "activation", "kd", "agreement"} <= set(
        train[0])


# A DAFL run on tiny MLPs (any input size) at 28x28, 8 steps of batch 8,
# checkpoints every 2 steps; `debug_applied` keeps these sizes (debug only
# for the random teacher).
_DAFL_RUN = """
import sys
from kd_jax import trainer
from tests.test_datafree_trainer import dafl_config
trainer.train_and_evaluate(dafl_config(), sys.argv[1])
"""


def dafl_config() -> ml_collections.ConfigDict:
  c = base.base_config()
  c.task, c.mode, c.debug, c.debug_applied = "dafl", "distill", True, True
  c.data.mock, c.data.mock_num_examples, c.data.eval_subset = True, 32, 16
  c.data.augment = False
  c.model.name, c.teacher.name, c.teacher.evaluate = ("mlp_student",
                                                      "mlp_teacher", False)
  c.optimizer.name, c.optimizer.learning_rate = "adam", 2e-3
  c.train.update(batch_size=8, eval_batch_size=8, num_epochs=0, num_steps=8,
                 steps_per_call=2, log_every_steps=2, progress_bar=False)
  c.checkpoint.update(every_steps=2, async_save=False, keep=2)
  c.dafl = ml_collections.ConfigDict({
      "img_size": 28, "latent_dim": 8, "iters_per_epoch": 4,
      "grid_images": 4})
  return c


def _final_tree(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ck = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ck) if d.isdigit())
  with ocp.StandardCheckpointer() as c:
    return step, c.restore(os.path.join(ck, str(step), "state"))


@pytest.mark.slow  # (~60 s idle; 236 s at load 18-20)
def test_dafl_kill_and_resume_is_bit_identical(tmp_path):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  args = lambda wd: [sys.executable, "-c", _DAFL_RUN, wd]  # noqa: E731
  subprocess.run(args(ref), cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=300)
  proc = subprocess.Popen(args(run), cwd=ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ck = os.path.join(run, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ck) and any(d.isdigit() for d in os.listdir(ck)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert not os.path.exists(os.path.join(run, "report.json"))
  out = subprocess.run(args(run), cwd=ROOT, env=_env(), check=True,
                       capture_output=True, text=True, timeout=300)
  rep = json.loads(open(os.path.join(run, "report.json")).read())
  assert 0 < rep["resumed_from_step"] < rep["steps"] == 8, out.stdout
  s_ref, t_ref = _final_tree(ref)
  s_run, t_run = _final_tree(run)
  assert s_ref == s_run == 8
  assert set(t_ref) == {"generator", "student"}
  flat_ref = jax.tree_util.tree_leaves_with_path(t_ref)
  flat_run = jax.tree_util.tree_leaves_with_path(t_run)
  assert [p for p, _ in flat_ref] == [p for p, _ in flat_run]
  for (path, a), (_, b) in zip(flat_ref, flat_run):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path
  # both networks moved, and the generator's step counter went with them
  assert int(np.asarray(t_ref["generator"]["step"])) == 8
  recs = lambda d: metrics_io.read_jsonl(  # noqa: E731
      os.path.join(d, "metrics.jsonl"))
  assert recs(ref) == recs(run)
  assert len([r for r in recs(ref) if r["split"] == "eval"]) == 2


# ---------------------------------------------------------------------------
# Views, subsets, normalization in the classification feed.


def _lp_config(**data):
  c = base.base_config()
  c.mode, c.debug, c.debug_applied = "distill", True, True
  c.data.update(mock=True, mock_num_examples=40, augment=False,
                normalization="unit", train_subset=16, eval_subset=8, **data)
  c.model.name, c.teacher.name = "lopez_paz_mlp_7x7", "lopez_paz_mlp"
  c.data.views.student = {"name": "downscale", "size": 7}
  c.loss.ce_weight = 0.5
  c.loss.terms = ml_collections.ConfigDict({"generalized_distillation": {
      "weight": 0.5, "temperature": 20.0}})
  c.train.update(batch_size=8, eval_batch_size=8, num_steps=2)
  return c


def test_views_in_the_distill_feed():
  from kd_jax.trainer import classify  # pylint: disable=g-import-not-at-top
  rc = trainer.parse(_lp_config())
  task = classify.ClassifyTask(rc, "/nonexistent", dry_run=True)
  try:
    data = task.data
    assert data.image_shape == (7, 7, 1) and data.teacher_shape == (28, 28, 1)
    teacher = models_lib.create("lopez_paz_mlp", num_classes=10)
    tv = teacher.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    step_batch = feeds_lib.make_step_batch(
        data, steps_per_epoch=2, teacher_apply=teacher,
        precomputed_logits=False, separate_teacher_view=True)
    state = task.init_state()
    raw = data.train.batch(0)
    batch, rest = step_batch(state, {"teacher": tv}, dict(raw))
    assert rest is None and "teacher_image" not in batch
    x = np.asarray(raw["image"], np.float64) / 255.0  # unit normalization
    assert batch["image"].shape == (8, 7, 7, 1)
    # the student's view: PIL-style bilinear (antialiased) 28 -> 7
    want = jax.image.resize(jnp.asarray(x, jnp.float32), (8, 7, 7, 1),
                            "linear", antialias=True)
    np.testing.assert_allclose(batch["image"], want, atol=1e-6)
    # the teacher's logits: the teacher on the unscaled 28x28 images
    t_logits = teacher.apply(tv, jnp.asarray(x, jnp.float32), train=False)
    t_logits = t_logits[0] if isinstance(t_logits, tuple) else t_logits
    np.testing.assert_allclose(batch["teacher_logits"], t_logits, atol=1e-5)
    # eval: the student's view; the teacher's eval: its own
    ev = next(iter(data.eval_batches()))
    s_ev = feeds_lib.eval_preprocess(data)(ev)
    t_ev = feeds_lib.eval_preprocess(data, "teacher")(ev)
    assert s_ev["image"].shape[1:] == (7, 7, 1)
    np.testing.assert_allclose(t_ev["image"],
                               np.asarray(ev["image"], np.float32) / 255.0,
                               atol=1e-7)
    out = task.dry_run_report()
    assert "generalized_distillation" in out["metrics"]
  finally:
    task.close()


def test_random_subset_depends_on_the_seed_only():
  def labels(seed, subset):
    c = _lp_config(subset=subset)
    c.seed = seed
    rc = trainer.parse(c)
    d = feeds_lib.load_data(rc)
    return np.asarray(d.train.images).reshape(16, -1)
  first = labels(0, "first")
  np.testing.assert_array_equal(first, labels(3, "first"))
  a, b, a2 = labels(0, "random"), labels(1, "random"), labels(0, "random")
  np.testing.assert_array_equal(a, a2)
  assert not np.array_equal(a, b) and not np.array_equal(a, first)


def test_rmsprop_is_keras_rmsprop():
  """optimizer.name='rmsprop' == Keras 0.x RMSprop (float64 transcription:
  a <- rho a + (1 - rho) g^2; p <- p - lr g / sqrt(a + eps))."""
  spec = optim_lib.OptimizerSpec(name="rmsprop", learning_rate=1e-3,
                                 schedule="constant")
  tx, _ = optim_lib.make_optimizer(spec, steps_per_epoch=1, total_steps=5)
  rng = np.random.RandomState(0)
  p = rng.randn(5)
  grads = [rng.randn(5) * 10 ** k for k in (-4, 0, 2)]
  params, st = jnp.asarray(p, jnp.float32), None
  st = tx.init(params)
  a, want = np.zeros(5), p.copy()
  for g in grads:
    a = 0.9 * a + 0.1 * g * g
    want = want - 1e-3 * g / np.sqrt(a + 1e-6)
    upd, st = tx.update(jnp.asarray(g, jnp.float32), st, params)
    params = params + upd
  np.testing.assert_allclose(np.asarray(params), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key,value,msg", [
    ("data.views.student", "nope", "data.views.student: unknown view 'nope'"),
    ("data.views.student", {"name": "downscale", "sise": 7},
     "data.views.student: view 'downscale': bad arguments"),
    ("data.subset", "last", "data.subset: must be 'first' or 'random'"),
    ("data.normalization", "z", "data.normalization: must be 'dataset' or"),
])
def test_bad_view_values_are_one_line(key, value, msg):
  c = _lp_config()
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(trainer.ConfigError) as e:
    trainer.parse(c)
  assert str(e.value).startswith("config." + msg), str(e.value)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,msg", [
    ("dafl.entropy_weight", -1.0, "dafl: DAFLConfig.entropy_weight must be"),
    ("dafl.iters_per_epoch", 0, "dafl.iters_per_epoch: must be an int >= 1"),
    ("dafl.generator_optimizer", "lamb", "dafl.generator_optimizer: must be"),
    ("dafl.img_size", 32, "data.views.student: the test images reach the "
     "student as (28, 28, 1), the generator makes (32, 32, 1)"),
    ("mode", "train", "mode: task 'dafl' distils"),
    ("dafl.latnet_dim", 3, "dafl.latnet_dim: unknown key; did you mean "
     "'latent_dim'?"),
])
def test_bad_dafl_values_are_one_line(key, value, msg):
  c = dafl_config()
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(trainer.ConfigError) as e:
    trainer.parse(c)
  assert str(e.value).startswith("config." + msg), str(e.value)
  assert "\n" not in str(e.value)


def test_cli_bad_view_exits_with_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=configs/lopez_paz_mnist.py:debug",
       f"--workdir={tmp_path / 'x'}",
       "--config.seed_experiment.phases.student.data.views.student.name=nope"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "data.views.student: unknown view 'nope'" in (
      lines[0]), out.stderr
