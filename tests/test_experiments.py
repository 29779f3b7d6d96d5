"""Tests of the experiments entry point, the trainer loop and the configs.

* every config of `configs/` is built in debug mode, validated, its data
  (TFDS mock data) loaded and its init / train / eval programs traced on a
  real batch (`dry_run`, no compilation); a representative subset actually
  runs 2 steps (all of them with `KD_JAX_SMOKE_ALL=1`, ~15 min on 2 cores);
* config validation errors name the config key and fire before compiling;
* a run killed with SIGKILL after a checkpoint and restarted with the same
  workdir ends bit-identical to an uninterrupted run;
* the optimizer / LR schedule and the augmentation keys against independent
  computations; the metrics writers and plots.
"""

import glob
import importlib
import json
import logging
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

from configs import recipes
from kd_jax import metrics_io
from kd_jax import trainer
from kd_jax.train import state as state_lib
from kd_jax.train import optim as optim_lib
from kd_jax.trainer import feeds as feeds_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_configs():
  specs = []
  for p in recipes.CIFAR100_PAIRS:
    specs += [("cifar100_kd", p), ("cifar100_dkd", p)]
  specs += [("cifar100_teacher", t) for t in recipes.CIFAR100_TEACHERS]
  specs += [("cifar100_student", s) for s in recipes.CIFAR100_STUDENTS]
  specs += [("imagenet_kd", "bs256"), ("imagenet_kd", "bs512"),
            ("imagenet_dkd", "bs256"), ("imagenet_teacher", "resnet34"),
            ("imagenet_teacher", "resnet18")]
  specs += [("mnist", p) for p in
            ("teacher", "cnn_teacher", "student", "distill", "distill_cnn")]
  # Feature / relation methods (configs/feature_methods.py), on the pair
  # with the cheapest networks to trace.
  specs += [(f"cifar100_{m}", "vgg13-vgg8") for m in _feature_methods()]
  # Logit methods with their own trainer hooks: MLKD (strong view), CTKD
  # (steps_per_epoch for its schedule), DOT (optimizer, split gradients).
  specs += [(f"cifar100_{m}", "vgg13-vgg8") for m in ("mlkd", "ctkd", "dot")]
  # Self-distillation (teacher-free terms in mode 'train'): BYOT (exits
  # evaluated), CS-KD (same-class pairs), Tf-KD_reg; Tf-KD's baseline and
  # Tf-KD_self (KD from a copy of the same network).
  specs += [("deepinversion_cifar100", t) for t in ("resnet56", "resnet110",
                                                    "resnet32x4")]
  specs += [("cifar100_byot", "resnet18_cifar"),
            ("cifar100_cskd", "resnet18_cifar"),
            ("cifar100_tfkd", "reg-shufflenetv2"),
            ("cifar100_tfkd", "base-shufflenetv2"),
            ("cifar100_tfkd", "self-shufflenetv2")]
  return specs


# Seed experiments: every phase of each is dry-run below
# (`test_seed_experiment_phases_dry_run`); the main job runs in debug mode
# (`test_seed_experiment_debug`), the MNIST TAKD chain in
# tests/test_self_distillation.py (slow).
SEED_EXPERIMENTS = ("mnist_seed", "mnist_takd", "cifar100_takd",
                    "cifar100_ban", "lopez_paz_mnist", "dafl_mnist",
                    "hinton2015", "deepinversion_mnist")


def _feature_methods():
  from configs import feature_methods
  return sorted(feature_methods.METHODS) + ["ofa"]


def _config(mod, arg=None):
  m = importlib.import_module("configs." + mod)
  return m.get_config(arg) if arg is not None else m.get_config()


def _debug(mod, arg=None, **overrides):
  c = _config(mod, arg)
  c.debug = True
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


def test_every_config_file_is_covered():
  files = {os.path.basename(f)[:-3]
           for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
  files -= {"__init__", "base", "recipes", "feature_methods", "chains",
            "lm_jane_austen",      # (LM: tests/test_lm_trainer.py,
            "lm_single",           #  tests/test_lm_onpolicy.py,
            "lm_cross_tokenizer"}  #  tests/test_lm_cross_tokenizer.py)
  files -= set(SEED_EXPERIMENTS)
  assert files == {m for m, _ in _all_configs()}


@pytest.mark.parametrize("mod,arg", _all_configs(),
                         ids=[f"{m}:{a}" for m, a in _all_configs()])
def test_config_dry_run(mod, arg, tmp_path):
  c = _debug(mod, arg)
  out = trainer.train_and_evaluate(c, str(tmp_path), dry_run=True)
  _check_dry_run(c, out)
  if not mod.startswith("mnist"):
    assert c.report.paper.source and c.report.paper.metric


# BYOT's exits on ResNet18 (4 stages): 3 shallow exits, its own classifier
# (exit 4) and their ensemble.
_BYOT_EXITS = {f"byot/top1_exit{i}" for i in (1, 2, 3, 4)} | {
    "byot/top1_ensemble"}


def _check_dry_run(c, out):
  if c.get("task", "classify") == "deepinversion":  # (tests/test_deepinv...)
    adi = {"competition"} if c.deepinversion.get("adi_weight", 0) else set()
    assert set(out["metrics"]) == {"ce", "bn", "tv_l2", "tv_l1", "l2",
                                   "teacher_top1", "loss", "nonfinite"} | adi
    assert out["images"][0] == 8  # (debug: batch 8)
    return
  assert out["dry_run"] and out["num_params"] > 0
  if c.get("task", "classify") == "dafl":  # (tests/test_datafree_trainer.py)
    assert set(out["metrics"]) == {"one_hot", "entropy", "activation",
                                   "generator_loss", "kd", "agreement",
                                   "nonfinite"}
    assert set(out["eval_metrics"]) == {"loss", "top1", "top5", "count"}
    return
  # (`nonfinite`: the step's NaN/inf flag, `train.on_nonfinite`.)
  expected = {"ce", "loss", "top1", "kd_factor", "nonfinite"} | set(
      c.loss.terms.keys())
  if any("distiller" in t for t in c.loss.terms.values()):
    assert out["num_distiller_params"] >= 0
  assert set(out["metrics"]) == expected
  eval_expected = {"loss", "top1", "top5", "count"}
  if "byot" in c.loss.terms and c.model.name == "resnet18_cifar":
    eval_expected |= _BYOT_EXITS
  assert set(out["eval_metrics"]) == eval_expected


def _seed_experiment_phases():
  from experiments import seed_experiment
  out = []
  for mod in SEED_EXPERIMENTS:
    c = _config(mod)
    seen = []
    for p in seed_experiment.phase_order(c):
      pc = seed_experiment.phase_config(c, p, 0).to_dict()
      pc.pop("report")
      if pc not in seen:  # (BAN's generations are one config)
        seen.append(pc)
        out.append((mod, p))
  return out


@pytest.mark.parametrize("mod,phase", _seed_experiment_phases(),
                         ids=[f"{m}:{p}" for m, p in _seed_experiment_phases()])
def test_seed_experiment_phases_dry_run(mod, phase, tmp_path):
  """Every distinct phase of every seed-experiment config, as the seed
  experiment builds it (debug: a random teacher stands in for the teacher
  phase's checkpoint)."""
  from experiments import seed_experiment
  c = _config(mod)
  c.debug = True
  seed_experiment.validate(trainer.apply_debug(c))
  pc = seed_experiment.phase_config(c, phase, 0)
  out = trainer.train_and_evaluate(pc, str(tmp_path), dry_run=True)
  _check_dry_run(pc, out)


def _real_run_specs():
  """What runs for real: all configs with KD_JAX_SMOKE_ALL=1 (slow), else one
  CIFAR-100 DKD config (BatchNorm, augmentation, warm-up, SGD + step LR,
  8-device jit sharding) and one feature-distiller config with an init stage
  (FT), their networks swapped for the smallest CIFAR ResNets to keep the
  compile short; the MNIST configs run in the tests below."""
  if os.environ.get("KD_JAX_SMOKE_ALL"):
    return [(m, a, {}) for m, a in _all_configs()]
  small = {"model.name": "resnet8", "teacher.name": "resnet14"}
  return [("cifar100_dkd", "resnet56-resnet20", small),
          # a feature distiller with an initialization stage (FT paraphraser)
          ("cifar100_ft", "resnet56-resnet20", small)]


@pytest.mark.parametrize("mod,arg,overrides", _real_run_specs(),
                         ids=[f"{m}:{a}" for m, a, _ in _real_run_specs()])
def test_config_debug_run(mod, arg, overrides, tmp_path, caplog):
  c = _debug(mod, arg, **overrides)
  caplog.set_level(logging.WARNING)
  rep = trainer.train_and_evaluate(c, str(tmp_path))
  # A debug run (mock data) logs no warnings but its own notice (not TFDS's
  # about the mock's missing metadata).
  assert not [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING
              and not r.getMessage().startswith("debug run: ")]
  assert rep["steps"] == 2 and 0.0 <= rep["last_top1"] <= 1.0
  recs = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  train = [r for r in recs if r["split"] == "train"]
  assert train and all(np.isfinite(r["loss"]) for r in train)
  assert (tmp_path / "curves.png").stat().st_size > 0
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert json.loads((tmp_path / "report.json").read_text())["steps"] == 2
  stage = getattr(getattr(c.loss.terms, "ft", None), "pretrain_epochs", 0)
  if stage:  # the init stage ran (1 step in debug) and was logged
    assert rep["pretrain"]["ft"]["steps"] == 1
    assert any(r["split"] == "pretrain" for r in recs)


def test_mnist_teacher_then_distill_loads_teacher(tmp_path):
  """Teacher run -> distill run reading it; outputs and report contents."""
  t_dir, d_dir = str(tmp_path / "t"), str(tmp_path / "d")
  t = _debug("mnist", "teacher")
  t_rep = trainer.train_and_evaluate(t, t_dir)
  cfg = trainer.apply_debug(_debug("mnist", "distill",
                                **{"teacher.checkpoint": t_dir}))
  cfg.teacher.evaluate = True  # (debug turns it off)
  d_rep = trainer.train_and_evaluate(cfg, d_dir)
  # The teacher evaluated inside the distill run is the trained teacher.
  assert d_rep["teacher_top1"] == pytest.approx(t_rep["last_top1"], abs=1e-6)
  assert d_rep["teacher"] == "mlp_teacher" and d_rep["mode"] == "distill"
  rec = [r for r in metrics_io.read_jsonl(os.path.join(d_dir, "metrics.jsonl"))
         if r["split"] == "train"]
  assert {"ce", "kd", "loss", "top1", "lr"} <= set(rec[0])
  # A teacher checkpoint of another architecture is refused, naming the key
  # and a mismatching parameter, before anything is compiled.
  bad = _debug("mnist", "distill_cnn", **{"teacher.checkpoint": t_dir})
  with pytest.raises(trainer.ConfigError, match=r"(?s)config\.teacher\.checkpoint"
                     r".*params/Conv_0/kernel: missing from the checkpoint "
                     r"\(model expects shape \(5, 5, 1, 32\)\)"):
    trainer.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_seed_experiment_debug(tmp_path):
  from experiments import seed_experiment
  c = _config("mnist_seed")
  c.debug = True
  res = seed_experiment.run(c, str(tmp_path))
  assert set(res["phases"]) == {"student", "teacher_mlp", "distill_mlp",
                                "teacher_cnn", "distill_cnn"}
  assert list(res["gains"]) == ["distill_mlp", "distill_cnn"]
  for p, g in res["gains"].items():
    d = res["phases"][p]["last_top1"]
    s = res["phases"]["student"]["last_top1"]
    np.testing.assert_allclose(g["last_top1"]["per_seed"], np.subtract(d, s))
  md = (tmp_path / "results.md").read_text()
  assert "gain top-1 % last" in md and "examples/s" in md
  assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [0]


# ---------------------------------------------------------------------------
# Validation.


def _mnist_distill(**overrides):
  c = _config("mnist", "distill")
  c.teacher.checkpoint = ROOT  # exists; never read (validation fails first)
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


@pytest.mark.parametrize("overrides,pattern", [
    ({"model.name": "resnet_9000"}, r"config\.model\.name: unknown model name "
     r"'resnet_9000'"),
    ({"teacher.name": "nope"}, r"config\.teacher\.name: unknown model name"),
    ({"teacher.num_classes": 100}, r"config\.teacher\.num_classes: teacher has "
     r"100 classes but the student .* has 10"),
    ({"model.num_classes": 100, "teacher.num_classes": 100},
     r"config\.model\.num_classes: 100 does not match dataset 'mnist' \(10"),
    ({"loss.terms": ml_collections.ConfigDict({"kd": {"name": "kdd"}})},
     r"config\.loss\.terms\.kd\.name: unknown loss name 'kdd'"),
    ({"loss.terms": ml_collections.ConfigDict(
        {"kd": {"temprature": 4.0}})},
     r"config\.loss\.terms\.kd: .*unknown hyperparameter 'temprature'"),
    ({"loss.terms": ml_collections.ConfigDict()},
     r"config\.loss\.terms: mode 'distill' needs at least one KD term"),
    ({"train.parallel": "jit", "train.batch_size": 12},
     r"config\.train\.batch_size: 12 is not divisible by the number of "
     r"devices 8"),
    ({"train.parallel": "pmap", "train.eval_batch_size": 1001},
     r"config\.train\.eval_batch_size: 1001 is not divisible"),
    ({"train.parallel": "tpu"}, r"config\.train\.parallel: must be one of"),
    ({"optimizer.name": "lamb"}, r"config\.optimizer\.name"),
    ({"data.name": "cifar1000"}, r"config\.data\.name: unknown dataset"),
    ({"mode": "distil"}, r"config\.mode: must be one of"),
    ({"teacher.checkpoint": "/nonexistent/teacher"},
     r"config\.teacher\.checkpoint: path '/nonexistent/teacher' does not"),
    ({"teacher.checkpoint": ""}, r"config\.teacher\.checkpoint: distillation "
     r"needs a trained teacher"),
    ({"data.augment": True, "data.name": "cifar100", "model.num_classes": 100,
      "teacher.num_classes": 100, "teacher.precompute": True},
     r"config\.teacher\.precompute: .*augment"),
])
def test_validation_errors_name_the_key(overrides, pattern, tmp_path):
  assert len(jax.devices()) == 8  # conftest: 8 simulated CPU devices
  c = _mnist_distill(**overrides)
  wd = tmp_path / "wd"
  with pytest.raises(trainer.ConfigError, match=pattern):
    trainer.train_and_evaluate(c, str(wd))
  assert not wd.exists()  # failed before writing (and compiling) anything


def test_validation_train_mode_rejects_kd_terms():
  c = _config("mnist", "student")
  c.loss.terms = _config("mnist", "distill").loss.terms
  with pytest.raises(trainer.ConfigError, match=r"config\.loss\.terms: mode "
                     r"'train' is supervised"):
    trainer.parse(c)


def test_one_device_parallel_with_several_processes(monkeypatch, capsys):
  """With >1 process, a plain run's train.parallel 'none' is rejected naming
  the flag to use; the seed experiment turns its phases' 'none' into 'jit'
  (one line) and leaves 'jit' / 'pmap' and 1-process runs alone."""
  from experiments import seed_experiment
  c = _config("mnist", "student")
  trainer.parse(c)  # 1 process: 'none' is fine
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(trainer.ConfigError, match=r"^config\.train\.parallel: "
                     r"'none' runs on one device of one process and cannot "
                     r"span 2 processes; use --config\.train\.parallel=jit\.$"):
    trainer.parse(c)
  c.train.parallel = "single"
  with pytest.raises(trainer.ConfigError, match="cannot span 2 processes"):
    trainer.parse(c)
  s = _config("mnist_seed")
  out = seed_experiment.span_processes(s)
  assert out.train.parallel == "jit" and s.train.parallel == "none"
  assert capsys.readouterr().out.count("every phase runs with "
                                       "train.parallel='jit'") == 1
  s.train.parallel = "pmap"
  assert seed_experiment.span_processes(s) is s
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  s.train.parallel = "none"
  assert seed_experiment.span_processes(s) is s


def test_seed_experiment_validation():
  from experiments import seed_experiment
  c = _config("mnist_seed")
  c.seed_experiment.phases.distill_mlp.model.name = "mlp_studnet"
  with pytest.raises(trainer.ConfigError, match=r"config\.seed_experiment\.phases"
                     r"\.distill_mlp\.model\.name: unknown model name"):
    seed_experiment.validate(c)
  c = _config("mnist_seed")
  c.seed_experiment.order = ("student", "distill_mlp", "teacher_mlp",
                             "teacher_cnn", "distill_cnn")
  with pytest.raises(trainer.ConfigError, match=r"distill_from\.distill_mlp: "
                     r"teacher phase 'teacher_mlp' must be a phase listed "
                     r"before"):
    seed_experiment.validate(c)


# ---------------------------------------------------------------------------
# Kill / resume: bit-identical to an uninterrupted run.


def _cli(workdir, extra=()):
  args = [sys.executable, "-m", "experiments.main",
          "--config=configs/mnist.py:teacher", f"--workdir={workdir}",
          "--config.data.mock=True", "--config.data.mock_num_examples=128",
          "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
          "--config.train.num_epochs=40", "--config.train.steps_per_call=4",
          "--config.train.progress_bar=False",
          "--config.checkpoint.every_epochs=1", "--config.checkpoint.keep=2",
          *extra]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, like a user's run
  return args, env


def _final_state(workdir):
  import orbax.checkpoint as ocp
  ck = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ck) if d.isdigit())
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(ck, str(step), "state"))
  return step, tree


# Mid-epoch checkpoints and train records: a resumed run must write the same
# records (same steps, same values) as an uninterrupted one.
_RESUME_FLAGS = ("--config.checkpoint.every_steps=6",
                 "--config.train.log_every_steps=6")


def test_kill_and_resume_is_bit_identical(tmp_path):
  ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
  args, env = _cli(ref, _RESUME_FLAGS)
  subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=300)
  # The same run, SIGKILLed as soon as its first checkpoint is finalized.
  args, env = _cli(run, _RESUME_FLAGS)
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ck = os.path.join(run, "checkpoints")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ck) and any(d.isdigit() for d in os.listdir(ck)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert not os.path.exists(os.path.join(run, "report.json"))  # unfinished
  out = subprocess.run(args, cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True, timeout=300)
  rep = json.loads(open(os.path.join(run, "report.json")).read())
  assert 0 < rep["resumed_from_step"] < rep["steps"], out.stdout
  assert (f"resumed from step {rep['resumed_from_step']} of {rep['steps']}"
          in out.stdout)
  s_ref, t_ref = _final_state(ref)
  s_run, t_run = _final_state(run)
  assert s_ref == s_run == rep["steps"]
  flat_ref = jax.tree_util.tree_leaves_with_path(t_ref)
  flat_run = jax.tree_util.tree_leaves_with_path(t_run)
  assert [p for p, _ in flat_ref] == [p for p, _ in flat_run]
  for (path, a), (_, b) in zip(flat_ref, flat_run):
    assert np.array_equal(np.asarray(a), np.asarray(b)), path
  # The metrics log of the resumed run equals the uninterrupted one: the
  # same eval and train records (steps and values).
  recs = lambda d: metrics_io.read_jsonl(  # noqa: E731
      os.path.join(d, "metrics.jsonl"))
  assert recs(ref) == recs(run)
  assert len([r for r in recs(ref) if r["split"] == "eval"]) == 40
  train_steps = [r["step"] for r in recs(ref) if r["split"] == "train"]
  assert 6 * 40 // 6 < len(train_steps) and 8 in train_steps


def test_cli_config_error_exit_code(tmp_path):
  args, env = _cli(str(tmp_path / "x"), ["--config.model.name=nope"])
  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  assert "config.model.name: unknown model name 'nope'" in out.stderr


# ---------------------------------------------------------------------------
# Optimizer, schedule, augmentation keys, writers.


def test_step_schedule_matches_mdistiller_rule():
  c = _config("cifar100_kd", "resnet56-resnet20")
  spe = 7
  _, sched = optim_lib.make_optimizer(c.optimizer, steps_per_epoch=spe,
                                 total_steps=240 * spe)
  for epoch in (1, 150, 151, 180, 181, 210, 211, 240):  # 1-based epochs
    lr = 0.05 * 0.1 ** sum(epoch > d for d in (150, 180, 210))
    for s in ((epoch - 1) * spe, epoch * spe - 1):
      assert float(sched(s)) == pytest.approx(lr, rel=1e-6), (epoch, s)


def test_sgd_coupled_weight_decay_matches_torch_formula():
  """optax chain == torch.optim.SGD(momentum, weight_decay) in float64 NumPy."""
  cfg = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False,
      weight_decay=5e-4, schedule="constant", decay_epochs=(),
      decay_factor=0.1, warmup_epochs=0))
  tx, _ = optim_lib.make_optimizer(cfg, steps_per_epoch=1, total_steps=3)
  rng = np.random.default_rng(0)
  p = rng.normal(size=5)
  grads = [rng.normal(size=5) for _ in range(3)]
  params = jnp.asarray(p, jnp.float32)
  st = tx.init(params)
  buf, pt = np.zeros(5), p.copy()
  for g in grads:
    upd, st = tx.update(jnp.asarray(g, jnp.float32), st, params)
    params = params + upd
    d = g + 5e-4 * pt                   # torch: d_p = grad + wd * p
    buf = 0.9 * buf + d if buf.any() else d
    pt = pt - 0.1 * buf
  np.testing.assert_allclose(np.asarray(params), pt, rtol=1e-5, atol=1e-6)


def _toy_data(pad=4, flip=True):
  from kd_jax.data import pipeline as pl
  imgs = np.arange(6 * 8 * 8 * 3, dtype=np.uint8).reshape(6, 8, 8, 3)
  p = pl.InMemoryPipeline(imgs, np.arange(6), global_batch_size=2,
                          with_index=True, mean=(0.5,) * 3, std=(0.25,) * 3)
  return feeds_lib.Data(info=None, train=p, eval_pipe=p, image_shape=(8, 8, 3),
                    mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=pad,
                    flip=flip), imgs


def test_augmentation_is_per_example_and_per_epoch():
  data, imgs = _toy_data()
  pre = feeds_lib.make_train_preprocess(data, steps_per_epoch=3)
  st = lambda step: state_lib.TrainState(  # noqa: E731
      step=jnp.int32(step), params={}, batch_stats={}, opt_state=(),
      distiller_params={}, distiller_state={}, rng=jax.random.key(0))
  a = pre(st(0), {"image": imgs[[1, 4]], "index": np.array([1, 4]),
                  "label": np.zeros(2, np.int32)})["image"]
  b = pre(st(1), {"image": imgs[[4, 2]], "index": np.array([4, 2]),
                  "label": np.zeros(2, np.int32)})["image"]
  # Example 4 gets the same view in another batch of the same epoch ...
  np.testing.assert_array_equal(a[1], b[0])
  # ... a different one in another epoch (some of 6 examples must differ) ...
  c = pre(st(3), {"image": imgs, "index": np.arange(6),
                  "label": np.zeros(6, np.int32)})["image"]
  d = pre(st(0), {"image": imgs, "index": np.arange(6),
                  "label": np.zeros(6, np.int32)})["image"]
  assert not np.array_equal(np.asarray(c), np.asarray(d))
  # ... and every view is a shifted/flipped crop of the normalized image.
  norm = (imgs.astype(np.float64) / 255 - 0.5) / 0.25
  zero = (0 - 0.5) / 0.25
  for i in range(6):
    padded = np.pad(norm[i], ((4, 4), (4, 4), (0, 0)), constant_values=zero)
    views = [padded[y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
    views += [v[:, ::-1] for v in views]
    assert any(np.allclose(np.asarray(d[i]), v, atol=1e-5) for v in views)


def test_metrics_writer_resume_plot_and_stats(tmp_path):
  w = metrics_io.MetricsWriter(str(tmp_path), tensorboard=True)
  for s in (10, 20, 30):
    w.write(s, {"loss": s / 10, "top1": 0.5}, split="train", epoch=s / 10)
  w.write(30, {"loss": 1.0, "top1": 0.7, "top5": 0.9}, split="eval", epoch=3)
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "spl')  # a line cut off by a kill
  recs = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [10, 20, 30, 30]
  w = metrics_io.MetricsWriter(str(tmp_path), tensorboard=False,
                               resume_step=20)
  w.close()
  assert [r["step"] for r in metrics_io.read_jsonl(
      str(tmp_path / "metrics.jsonl"))] == [10, 20]
  png = metrics_io.plot_curves(recs, str(tmp_path / "c.png"), title="t")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  vals = [0.9, 0.7, 0.8]
  m, s = metrics_io.mean_std(vals)
  assert m == pytest.approx(sum(vals) / 3)
  assert s == pytest.approx((sum((v - m) ** 2 for v in vals) / 3) ** 0.5)
  assert metrics_io.fmt_mean_std(vals, scale=100) == f"{100 * m:.2f} ± {100 * s:.2f}"


def test_parallel_modes_agree(tmp_path):
  """The trainer in 'none', 'jit' (8-device sharding) and 'pmap' modes ends
  with the same student (no dropout, so the runs are comparable)."""
  finals = {}
  for mode in ("none", "jit", "pmap"):
    c = _debug("mnist", "student", **{"train.parallel": mode})
    rep = trainer.train_and_evaluate(c, str(tmp_path / mode))
    assert rep["num_devices"] == (1 if mode == "none" else 8)
    finals[mode] = rep["_final_state"].params
  for mode in ("jit", "pmap"):
    for a, b in zip(jax.tree_util.tree_leaves(finals["none"]),
                    jax.tree_util.tree_leaves(finals[mode])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-6)
