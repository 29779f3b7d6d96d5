"""DeepInversion as a task of the one loop (``task='deepinversion'``).

* `configs/deepinversion_mnist.py:debug` runs end to end through
  `python -m experiments.main` (teacher, ADI competitor, DeepInversion and
  Adaptive DeepInversion phases; PNG grids, report metrics);
* the loop's state after N steps (scanned calls) equals N calls of the
  method's own `make_inversion_step` by hand, and the evaluation's
  `synth_top1` equals the teacher's accuracy on the images computed here;
* a run SIGKILLed after a checkpoint and restarted ends bit-identical to an
  uninterrupted one (images, Adam state, best batch, metrics log);
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
from kd_jax.distillers import deepinversion as di

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_config_cli_debug_run(tmp_path):
  wd = str(tmp_path / "wd")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=configs/deepinversion_mnist.py:debug", f"--workdir={wd}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(open(os.path.join(wd, "results.json")).read())
  assert set(res["phases"]) == {"teacher", "student", "deepinversion",
                                "deepinversion_adi"}
  for p, adi in (("deepinversion", False), ("deepinversion_adi", True)):
    d = os.path.join(wd, "seed0", p)
    rep = json.loads(open(os.path.join(d, "report.json")).read())
    assert rep["task"] == "deepinversion" and rep["finished"]
    assert rep["steps"] == 2
    assert 0.0 <= rep["last_synth_top1"] <= 1.0
    assert ("last_student_synth_top1" in rep) == adi
    for f in ("synthesized.png", "best.png", os.path.join("images",
                                                          "step_2.png")):
      assert os.path.getsize(os.path.join(d, f)) > 0, f
    assert np.load(os.path.join(d, "best_images.npy")).shape == (8, 28, 28,
                                                                  1)
    recs = metrics_io.read_jsonl(os.path.join(d, "metrics.jsonl"))
    train = [r for r in recs if r["split"] == "train"]
    ev = [r for r in recs if r["split"] == "eval"]
    assert train and all(np.isfinite(r["loss"]) for r in train)
    assert {"ce", "bn", "tv_l2", "tv_l1", "l2", "teacher_top1"} <= set(
        train[0])
    assert ("competition" in train[0]) == adi
    assert ev and {"synth_top1", "inversion_loss", "bn", "ce"} <= set(ev[-1])
  # the ADI phase competes with the trained student phase's MLP
  cfg = json.loads(open(os.path.join(wd, "seed0", "deepinversion_adi",
                                     "config.json")).read())
  assert cfg["model"]["init_checkpoint"].endswith(
      os.path.join("seed0", "student"))


def di_config(steps=8, **section) -> ml_collections.ConfigDict:
  """A tiny DeepInversion run: a random `cnn_bn` teacher (debug only),
  batch 4 at 28x28, checkpoints every 2 steps."""
  c = base.base_config()
  c.task, c.mode, c.debug, c.debug_applied = ("deepinversion", "distill",
                                              True, True)
  c.data.name = "mnist"
  c.model.name, c.teacher.name, c.teacher.evaluate = ("mlp_student",
                                                      "cnn_bn", False)
  c.optimizer.name, c.optimizer.learning_rate = "adam", 0.05
  c.optimizer.schedule = "constant"
  c.train.update(batch_size=4, num_epochs=0, num_steps=steps,
                 steps_per_call=2, log_every_steps=2, eval_every_steps=4,
                 progress_bar=False)
  c.checkpoint.update(every_steps=2, async_save=False, keep=2)
  c.deepinversion = ml_collections.ConfigDict(dict(section))
  return c


def test_loop_steps_are_the_methods_steps(tmp_path):
  """4 loop steps (2 scanned calls) == 4 `make_inversion_step` calls; the
  reported `synth_top1` == the teacher's accuracy on the images by hand."""
  c = di_config(steps=4, adi_weight=0.5)
  rep = trainer.train_and_evaluate(c, str(tmp_path))
  rc = trainer.parse(trainer.apply_debug(c))
  task = trainer.make_task(rc, str(tmp_path / "x"))
  teacher = models_lib.create("cnn_bn", num_classes=10)
  student = models_lib.create("mlp_student", num_classes=10)
  cfg = di.DeepInversionConfig(adi_weight=0.5)
  step = jax.jit(di.make_inversion_step(teacher, cfg, task.tx,
                                        student_apply=student))
  st = task.init_state()
  targets = jnp.arange(4) % 10
  for _ in range(4):
    st, _ = step(st, targets, task.teacher_vars, task.student_vars)
  final = rep["_final_state"]
  for f in ("images", "best_images", "best_loss", "step"):
    np.testing.assert_allclose(np.asarray(getattr(final, f)),
                               np.asarray(getattr(st, f)), rtol=1e-5,
                               atol=1e-6, err_msg=f)
  logits = teacher.apply(task.teacher_vars, np.asarray(final.images),
                         train=False)
  logits = logits[0] if isinstance(logits, tuple) else logits
  want = float(np.mean(np.argmax(np.asarray(logits), -1) == np.arange(4)))
  assert rep["last_synth_top1"] == pytest.approx(want)


_RUN = """
import sys
from kd_jax import trainer
from tests.test_deepinversion_trainer import di_config
trainer.train_and_evaluate(di_config(), sys.argv[1])
"""


def _final_tree(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ck = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ck) if d.isdigit())
  with ocp.StandardCheckpointer() as c:
    return step, c.restore(os.path.join(ck, str(step), "state"))


@pytest.mark.slow  # (27-52 s at load 8-12: three processes compiling)
def test_kill_and_resume_is_bit_identical(tmp_path):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  args = lambda wd: [sys.executable, "-c", _RUN, wd]  # noqa: E731
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
  assert {"images", "opt_state", "step", "rng", "best_images",
          "best_loss"} == set(t_ref)
  flat_ref = jax.tree_util.tree_leaves_with_path(t_ref)
  flat_run = jax.tree_util.tree_leaves_with_path(t_run)
  assert [p for p, _ in flat_ref] == [p for p, _ in flat_run]
  for (path, a), (_, b) in zip(flat_ref, flat_run):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path
  assert int(np.asarray(t_ref["step"])) == 8
  recs = lambda d: metrics_io.read_jsonl(  # noqa: E731
      os.path.join(d, "metrics.jsonl"))
  assert recs(ref) == recs(run)
  assert len([r for r in recs(ref) if r["split"] == "eval"]) == 2
  assert os.path.getsize(os.path.join(run, "best.png")) > 0


@pytest.mark.parametrize("key,value,msg", [
    ("deepinversion.bn_weight", -1.0, "deepinversion.bn_weight: must be"),
    ("deepinversion.jitter", -2, "deepinversion.jitter: must be an int"),
    ("deepinversion.adi_temperature", 0.0,
     "deepinversion.adi_temperature: must be"),
    ("deepinversion.bn_wieght", 1.0, "deepinversion.bn_wieght: unknown key"),
    ("optimizer.name", "lamb", "optimizer.name: "),
    ("mode", "train", "mode: task 'deepinversion' inverts"),
    ("data.views", {"teacher": {"name": "resize", "size": 32}},
     "data.views: task 'deepinversion'"),
])
def test_bad_values_are_one_line(key, value, msg):
  c = di_config()
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(trainer.ConfigError) as e:
    trainer.parse(c)
  assert str(e.value).startswith("config." + msg), str(e.value)
  assert "\n" not in str(e.value)


def test_epochs_instead_of_steps_is_one_line():
  c = di_config()
  c.train.update(num_steps=0, num_epochs=3)
  with pytest.raises(trainer.ConfigError, match=r"^config\.train\.num_steps: "
                     r"task 'deepinversion' runs train\.num_steps"):
    trainer.parse(c)


def test_adi_needs_a_trained_student_outside_debug():
  c = di_config(adi_weight=0.2)
  c.debug = False
  with pytest.raises(trainer.ConfigError, match=r"^config\.model\."
                     r"init_checkpoint: deepinversion\.adi_weight > 0"):
    trainer.parse(c)


def test_cli_bad_value_exits_with_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=configs/deepinversion_mnist.py:debug",
       f"--workdir={tmp_path / 'x'}",
       "--config.seed_experiment.phases.deepinversion.deepinversion."
       "jitter=-1"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "deepinversion.jitter: must be an int" in (
      lines[0]), out.stderr


def test_section_to_method_config():
  """The section's keys reach `DeepInversionConfig`; `clip` = the [0, 1]
  pixel range in MNIST's normalized units ((x - 0.1307) / 0.3081)."""
  from kd_jax.trainer import inversion  # pylint: disable=g-import-not-at-top
  c = di_config(clip=True, flip=True, jitter=3, first_bn_multiplier=10.0,
                adi_weight=0.5)
  cfg = inversion.inversion_config(trainer.parse(c))
  assert (cfg.flip, cfg.jitter, cfg.first_bn_multiplier, cfg.adi_weight) == (
      True, 3, 10.0, 0.5)
  (lo,), (hi,) = cfg.clip_range
  assert lo == pytest.approx(-0.1307 / 0.3081)
  assert hi == pytest.approx((1 - 0.1307) / 0.3081)
  c.data.normalization = "unit"
  (lo,), (hi,) = inversion.inversion_config(trainer.parse(c)).clip_range
  assert (lo, hi) == (0.0, 1.0)
