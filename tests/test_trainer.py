"""The trainer's faults, reproduced as a user meets them (CLI or its main).

* corrupted checkpoints: fallback to the newest step that restores, warning
  with step + cause; none restores -> one error naming the path;
* resume: "resumed from step N of M";
* config errors: one line, exit status 2, closest key names, the config
  file checked before JAX is imported, a workdir that is a file / unwritable;
* a missing dataset: which dataset, which folder, how to prepare it;
* the seed experiment reuses a phase only when its config is unchanged;
* the seed reaches the initialization, the dropout masks and the data order;
* no alarming third-party warnings (Orbax metadata, OpenCV);
* the typed config and the one config -> Objective function.
"""

import glob
import logging
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import mnist
from configs import mnist_seed
from kd_jax import trainer
from kd_jax.data import sources
from kd_jax.trainer import config as config_lib
from kd_jax.trainer import classify as classify_lib
from kd_jax.trainer import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _teacher_config(**train):
  c = mnist.get_config("teacher")
  c.data.mock = True
  c.data.mock_num_examples = 64
  c.train.batch_size = 16
  c.train.eval_batch_size = 16
  c.train.steps_per_call = 2
  c.train.progress_bar = False
  c.checkpoint.async_save = False
  c.checkpoint.keep = 3
  c.checkpoint.keep_best = False
  for k, v in train.items():
    c.train[k] = v
  return c


def _cli(args, env_extra=None, timeout=300):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------
# Corrupted checkpoints (fallback) and the resume message.


def _corrupt_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"),
                                recursive=True)
           if os.path.isfile(f) and "/d/" in f]
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(max(os.path.getsize(f) // 3, 1))


def _corrupt_metadata(step_dir):
  with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as fh:
    fh.truncate(10)


@pytest.mark.parametrize("corrupt", [_corrupt_array_file, _corrupt_metadata],
                         ids=["array_file", "metadata"])
def test_corrupted_latest_checkpoint_falls_back(corrupt, tmp_path, caplog,
                                                capsys):
  wd = str(tmp_path / "run")
  trainer.train_and_evaluate(_teacher_config(num_epochs=2), wd)
  ck = os.path.join(wd, "checkpoints")
  assert sorted(int(d) for d in os.listdir(ck) if d.isdigit()) == [4, 8]
  corrupt(os.path.join(ck, "8"))
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    rep = trainer.train_and_evaluate(_teacher_config(num_epochs=3), wd)
  warned = [r.getMessage() for r in caplog.records
            if "cannot be restored" in r.getMessage()]
  assert len(warned) == 1 and "checkpoint step 8" in warned[0], warned
  if corrupt is _corrupt_metadata:  # the cause, not a model mismatch
    assert "_METADATA is unreadable" in warned[0], warned
  assert rep["resumed_from_step"] == 4
  assert "resumed from step 4 of 12" in capsys.readouterr().out
  assert os.path.isdir(os.path.join(ck, "8"))  # nothing deleted


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
  wd = str(tmp_path / "run")
  trainer.train_and_evaluate(_teacher_config(num_epochs=1), wd)
  ck = os.path.join(wd, "checkpoints")
  _corrupt_metadata(os.path.join(ck, "4"))
  out = _cli(["-m", "experiments.main", "--config=configs/mnist.py:teacher",
              f"--workdir={wd}", "--config.data.mock=True",
              "--config.data.mock_num_examples=64",
              "--config.train.batch_size=16",
              "--config.train.eval_batch_size=16",
              "--config.train.num_epochs=2",
              "--config.train.progress_bar=False"])
  assert out.returncode == 2, out.stderr[-2000:]
  err = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1 and ck in err[0] and "step 4" in err[0], out.stderr
  assert "Traceback" not in out.stderr
  assert os.path.isdir(os.path.join(ck, "4"))


# ---------------------------------------------------------------------------
# Config errors: one line, exit 2.


def _main(*args):
  return _cli(["-m", "experiments.main", *args], timeout=120)


def test_cli_unknown_key_suggests_the_closest(tmp_path):
  out = _main("--config=configs/mnist.py:teacher", f"--workdir={tmp_path}",
              "--config.train.batch_siz=32")
  assert out.returncode == 2
  assert out.stderr.strip() == ("error: config.train.batch_siz: unknown key; "
                                "did you mean 'batch_size'?"), out.stderr


def test_cli_missing_config_file_before_jax(tmp_path):
  out = _cli(["-X", "importtime", "-m", "experiments.main",
              "--config=configs/nope.py", f"--workdir={tmp_path}"])
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert lines[-1] == "error: --config: config file 'configs/nope.py' not found."
  imported = {l.rsplit("|", 1)[-1].strip() for l in lines
              if l.startswith("import time:")}
  assert "absl" in imported and "jax" not in imported


def test_cli_workdir_is_a_file(tmp_path):
  f = tmp_path / "afile"
  f.write_text("x")
  out = _main("--config=configs/mnist.py:teacher", f"--workdir={f}",
              "--config.data.mock=True")
  assert out.returncode == 2
  assert out.stderr.strip().endswith(f"error: config.workdir: {str(f)!r} is "
                                     "a file; give a directory."), out.stderr


def test_unwritable_workdir_is_a_config_error(tmp_path, monkeypatch):
  def deny(*a, **k):
    raise PermissionError(13, "Permission denied")
  monkeypatch.setattr(os, "makedirs", deny)
  with pytest.raises(trainer.ConfigError,
                     match=r"config\.workdir: cannot write to .*Permission"):
    workdir_lib.prepare(str(tmp_path / "ro"), "{}", main=True)


def test_unknown_config_key_in_a_section():
  c = mnist.get_config("teacher")
  c.train.unlock()
  c.train.log_evry_steps = 3
  with pytest.raises(trainer.ConfigError, match=r"config\.train\."
                     r"log_evry_steps: unknown key; did you mean "
                     r"'log_every_steps'\?"):
    trainer.parse(c)


# ---------------------------------------------------------------------------
# Missing data.


def _check_missing_dataset_message(empty):
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.load_arrays("mnist", "train", data_dir=str(empty),
                        use_cache=False)
  msg = str(e.value)
  assert f"dataset 'mnist' not found in folder {str(empty)!r}" in msg
  assert f"tfds build mnist --data_dir={empty}" in msg


def test_missing_dataset_message_when_download_fails(tmp_path, monkeypatch):
  # TFDS's download fails at once (as without network, but without waiting
  # for its retries); the real download attempt is the slow test below.
  import tensorflow_datasets as tfds
  def no_download(*args, **kwargs):
    raise OSError("download failed: network unreachable")
  monkeypatch.setattr(tfds, "data_source", no_download)
  empty = tmp_path / "tfds"
  empty.mkdir()
  _check_missing_dataset_message(empty)


@pytest.mark.slow  # TFDS really tries to download (minutes of retries offline)
def test_missing_dataset_names_dataset_folder_and_fix(tmp_path):
  empty = tmp_path / "tfds"
  empty.mkdir()
  _check_missing_dataset_message(empty)


# ---------------------------------------------------------------------------
# The seed experiment reuses only unchanged phases.


def test_seed_experiment_reuses_only_unchanged_phases(tmp_path, capsys):
  from experiments import seed_experiment
  c = mnist_seed.get_config()
  c.debug = True
  wd = str(tmp_path / "se")
  seed_experiment.run(c, wd)
  capsys.readouterr()
  seed_experiment.run(c, wd)
  out = capsys.readouterr().out
  assert out.count("done before with the same config") == 5, out
  c2 = mnist_seed.get_config()
  c2.debug = True
  before = c2.seed_experiment.phases.teacher_cnn.train.num_epochs
  c2.seed_experiment.phases.teacher_cnn.train.num_epochs = before + 1
  seed_experiment.run(c2, wd)
  out = capsys.readouterr().out
  assert ("teacher_cnn: running again: its config changed "
          f"(train.num_epochs: {before} -> {before + 1})") in out, out
  assert "distill_cnn: running again: its teacher phase was run again" in out
  assert out.count("done before with the same config") == 3, out
  assert glob.glob(os.path.join(wd, "seed0", "teacher_cnn.old-*"))


# ---------------------------------------------------------------------------
# The seed reaches init, dropout and data order.


def _seeded(seed):
  c = trainer.apply_debug(_teacher_config())  # mlp_teacher: dropout 0.5
  c.seed = seed
  rc = trainer.parse(c)
  task = trainer.make_task(rc, "unused")
  data = task.data
  state = task.init_state()
  task.close()
  # `kd_jax.train.steps` draws step s's dropout masks from
  # fold_in(state.rng, s): the state's key is the dropout stream.
  kernels = [x for x in jax.tree_util.tree_leaves(state.params) if x.ndim == 2]
  return (np.asarray(kernels[0]),
          np.asarray(jax.random.key_data(state.rng)),
          data.train.batch(0)["index"])


def test_seed_reaches_init_dropout_and_data_order():
  p0, k0, o0 = _seeded(0)
  p0b, k0b, o0b = _seeded(0)
  p1, k1, o1 = _seeded(1)
  np.testing.assert_array_equal(p0, p0b)
  np.testing.assert_array_equal(k0, k0b)
  np.testing.assert_array_equal(o0, o0b)
  assert not np.array_equal(p0, p1)    # init
  assert not np.array_equal(k0, k1)    # dropout stream
  assert not np.array_equal(o0, o1)    # data order
  # Same inputs through the same weights with the other seed's dropout key:
  # the masks differ (independently of the init).
  c = trainer.apply_debug(_teacher_config())
  rc = trainer.parse(c)
  student = classify_lib.create_models(rc)[0]
  v = student.init(jax.random.key(5), jnp.ones((1, 28, 28, 1)), train=False)
  x = jnp.ones((4, 28, 28, 1))
  outs = [np.asarray(student.apply(v, x, train=True, rngs={"dropout": k})[0])
          for k in (jax.random.fold_in(jax.random.key(s), 0) for s in (0, 1))]
  assert not np.array_equal(outs[0], outs[1])


# ---------------------------------------------------------------------------
# Warnings.


def test_teacher_load_prints_no_orbax_metadata_warning(tmp_path, caplog):
  t_dir = str(tmp_path / "t")
  trainer.train_and_evaluate(_teacher_config(num_steps=2), t_dir)
  c = mnist.get_config("distill")
  c.debug = True
  c.teacher.checkpoint = t_dir
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(c, str(tmp_path / "d"))
  assert not [r for r in caplog.records
              if "Metadata file does not exist" in r.getMessage()]


def test_first_decode_prints_no_opencv_warning(tmp_path):
  code = ("import tensorflow_datasets as tfds\n"
          "from absl import logging\n"
          "logging.set_verbosity(logging.WARNING)\n"
          "from kd_jax.data import sources\n"
          "with tfds.testing.mock_data(num_examples=4):\n"
          f"  x, _ = sources.load_arrays('cifar10', 'train', "
          f"cache_dir={str(tmp_path)!r})\n"
          "print(x.shape)\n")
  out = _cli(["-c", code])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "(4, 32, 32, 3)" in out.stdout
  assert "OpenCV" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------
# Typed config and the objective.


def test_parse_gives_frozen_typed_sections():
  rc = trainer.parse(mnist.get_config("student"))
  assert isinstance(rc.train, config_lib.TrainConfig) and rc.train.batch_size == 64
  with pytest.raises(Exception):
    rc.train.batch_size = 3  # frozen


def test_build_objective_from_a_mapping():
  obj = trainer.build_objective(
      {"ce_weight": 0.7, "warmup_epochs": 2,
       "terms": {"kd": {"weight": 0.3, "temperature": 5.0}}})
  assert obj.ce_weight == 0.7 and obj.warmup_epochs == 2.0
  assert obj.terms[0].label == "kd" and obj.terms[0].weight == 0.3
  assert obj.terms[0].hparams == {"temperature": 5.0}
  with pytest.raises(trainer.ConfigError, match=r"config\.loss\.ce: unknown "
                     r"key; did you mean 'ce_weight'\?"):
    trainer.build_objective({"ce": 1.0})
  with pytest.raises(trainer.ConfigError,
                     match=r"config\.loss\.terms\.kd\.name: unknown loss name"):
    trainer.build_objective(ml_collections.ConfigDict(
        {"terms": {"kd": {"name": "kdd"}}}))


# ---------------------------------------------------------------------------
# The seed experiment's paired gain interval.


def _t_cdf(x, df, n=4000):
  """Student-t CDF by Simpson's rule on the density (independent of the
  table under test)."""
  c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
  pdf = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
  h = x / n
  s = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h)
                            for i in range(1, n))
  return 0.5 + s * h / 3


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
def test_t_table_matches_the_t_distribution(df):
  from experiments import seed_experiment
  assert _t_cdf(seed_experiment.t975(df), df, n=20000 if df == 1 else 4000
                ) == pytest.approx(0.975, abs=2e-5)


def test_paired_interval_against_float64_formula():
  from experiments import seed_experiment
  d = [0.0012, -0.0004, 0.0021, 0.0007, -0.0010]
  g = seed_experiment.paired_interval(d)
  m = sum(d) / 5
  s = math.sqrt(sum((x - m) ** 2 for x in d) / 4)
  assert g["mean"] == pytest.approx(m)
  assert g["ci95"] == pytest.approx([m - 2.776 * s / math.sqrt(5),
                                     m + 2.776 * s / math.sqrt(5)])
  assert seed_experiment.paired_interval([0.01])["ci95"] is None
  assert mnist_seed.get_config().seed_experiment.seeds == (0, 1, 2, 3, 4)


# ---------------------------------------------------------------------------
# Views a method asks for.


def test_strong_view_is_added_per_example():
  from kd_jax.data import augment
  imgs = np.arange(3 * 4 * 4 * 1, dtype=np.uint8).reshape(3, 4, 4, 1)
  def strong(key, x):  # a deterministic "strong" view: a mirror
    del key
    return x[:, :, ::-1]

  out = augment.augment_batch(
      jax.random.key(0), {"image": imgs, "index": np.array([5, 1, 7])},
      mean=(0.5,), std=(0.25,), strong_augment=strong)
  ref = (imgs[:, :, ::-1].astype(np.float64) / 255 - 0.5) / 0.25
  np.testing.assert_allclose(np.asarray(out["image_strong"]), ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["image"]),
                             (imgs / 255 - 0.5) / 0.25, atol=1e-6)


def test_views_of_an_objective():
  from kd_jax.trainer import programs

  class _D:
    views = ("strong",)

  class _T:
    label, distiller = "mlkd", _D()

  class _O:
    distiller_terms = (_T(),)

  assert programs.views(_O()) == {"strong": "mlkd"}
