"""Runs that survive preemption, divergence, a shared workdir, a full disk
and damaged files -- each fault reproduced through `experiments.main` (or
the function a run calls, where noted) and met with one clear line, a
documented exit status and no lost work (`kd_jax/trainer/errors.py`)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multiprocess_launch as launch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The MNIST student on mock data, one step per call, a checkpoint every 20.
BASE = ["--config=configs/mnist.py:student", "--config.data.mock=True",
        "--config.data.mock_num_examples=64", "--config.train.batch_size=8",
        "--config.train.eval_batch_size=16", "--config.train.steps_per_call=1",
        "--config.train.num_epochs=0", "--config.train.progress_bar=False",
        "--config.train.log_every_steps=5",
        "--config.train.eval_every_steps=1000000",
        "--config.checkpoint.every_steps=20", "--config.checkpoint.keep=2",
        "--config.checkpoint.every_epochs=0",
        "--config.checkpoint.keep_best=False",
        "--config.checkpoint.async_save=False"]


def _cmd(workdir, *flags):
  return launch.main_command(*BASE, f"--workdir={workdir}", *flags)


def _run(workdir, *flags, timeout=300):
  return subprocess.run(_cmd(workdir, *flags), cwd=ROOT,
                        env=launch.child_env(), capture_output=True,
                        text=True, timeout=timeout)


def _errors(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error:")]


def _one_line(out, status, *words):
  assert out.returncode == status, (out.returncode, out.stderr[-3000:])
  errs = _errors(out.stderr)
  assert len(errs) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  for w in words:
    assert w in errs[0], errs[0]
  return errs[0]


def _steps(workdir):
  ck = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ck) if d.isdigit())


def _params(workdir, step):
  import jax
  import orbax.checkpoint as ocp
  from kd_jax.train import checkpoints as ckpt_lib
  item = os.path.join(workdir, "checkpoints", str(step), "state")
  meta = ckpt_lib._tree_metadata(item)  # pylint: disable=protected-access
  target = ckpt_lib.restore_target(jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta))
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(item, target)
  return [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


def _wait_for(path, timeout=240):
  t = time.time()
  while not os.path.exists(path):
    assert time.time() - t < timeout, f"{path} never appeared"
    time.sleep(0.2)


# ---------------------------------------------------------------------------
# Preemption.


# SIGINT goes through the same handler as SIGTERM; it is opt-in (`-m slow`)
# to keep CI within its budget (31 s).
@pytest.mark.parametrize("sig", [
    signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_preemption_saves_reports_and_resumes_exactly(tmp_path, sig):
  wd, ref = str(tmp_path / "wd"), str(tmp_path / "ref")
  p = subprocess.Popen(_cmd(wd, "--config.train.num_steps=100000"), cwd=ROOT,
                       env=launch.child_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  _wait_for(os.path.join(wd, "checkpoints", "20"))
  t = time.perf_counter()
  p.send_signal(sig)
  out, err = p.communicate(timeout=120)
  elapsed = time.perf_counter() - t
  errs = _errors(err)
  assert p.returncode == 75, err[-3000:]
  assert len(errs) == 1 and "preempted" in errs[0] and "rerun" in errs[0]
  rep = json.load(open(os.path.join(wd, "report.json")))
  step = rep["preempted"]["step"]
  assert rep["finished"] is False and step > 20 and step in _steps(wd)
  assert elapsed < 60, elapsed   # a compiled call + a save
  # Rerun (longer run: what a restart policy does): resumes at `step` and
  # ends where an uninterrupted run ends, bit for bit.
  n = step + 7
  res = _run(wd, f"--config.train.num_steps={n}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"resumed from step {step} of {n}" in res.stdout
  assert _run(ref, f"--config.train.num_steps={n}").returncode == 0
  for a, b in zip(_params(wd, n), _params(ref, n)):
    np.testing.assert_array_equal(a, b)


def test_two_processes_agree_on_the_preemption_step(tmp_path):
  """SIGTERM to one of two processes: JAX's preemption sync point makes both
  save the same step and stop with status 75."""
  wd = str(tmp_path / "wd")
  flags = ["--config.train.num_steps=100000", "--config.train.parallel=jit"]
  procs = [subprocess.Popen(_cmd(wd, *flags, *d), cwd=ROOT,
                            env=launch.child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for d in launch.distributed_flags(launch.free_port(), 2)]
  _wait_for(os.path.join(wd, "checkpoints", "20"))
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=180) for p in procs]
  assert [p.returncode for p in procs] == [75, 75], [o[1][-2000:]
                                                     for o in outs]
  rep = json.load(open(os.path.join(wd, "report.json")))
  assert rep["preempted"]["step"] in _steps(wd)


# ---------------------------------------------------------------------------
# Divergence.


def test_divergence_stops_keeps_the_good_checkpoint_and_never_saves_nan(
    tmp_path):
  wd = str(tmp_path / "wd")
  sgd = "--config.optimizer.name=sgd"
  assert _run(wd, "--config.train.num_steps=40", sgd,
              "--config.optimizer.learning_rate=0.01").returncode == 0
  assert _steps(wd) == [20, 40]
  bad = _run(wd, "--config.train.num_steps=80", sgd,
             "--config.optimizer.learning_rate=1e12")
  line = _one_line(bad, 4, "NaN / inf at step", "last good checkpoint is "
                   "step 40", "learning rate")
  assert _steps(wd) == [20, 40], line  # nothing non-finite was written
  rep = json.loads(open(os.path.join(wd, "report.json")).read())
  assert rep["finished"] is False and rep["nonfinite_step"] > 40
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    assert "NaN" not in f.read()
  good = _run(wd, "--config.train.num_steps=60", sgd,
              "--config.optimizer.learning_rate=0.01")
  assert good.returncode == 0 and "resumed from step 40" in good.stdout


def test_skip_update_stops_after_consecutive_skips(tmp_path):
  bad = _run(str(tmp_path / "wd"), "--config.train.num_steps=80",
             "--config.optimizer.name=sgd",
             "--config.optimizer.learning_rate=1e12",
             "--config.train.on_nonfinite=skip_update",
             "--config.train.max_consecutive_skips=3")
  _one_line(bad, 4, "3 consecutive updates were NaN / inf and skipped")


def test_resume_skips_a_nan_checkpoint_of_an_earlier_version(tmp_path):
  """A workdir whose newest checkpoint holds NaN (written before this
  check existed): resume falls back to the older, finite one."""
  import jax
  from kd_jax.train import checkpoints as ckpt_lib
  wd = str(tmp_path / "wd")
  assert _run(wd, "--config.train.num_steps=40").returncode == 0
  item = os.path.join(wd, "checkpoints", "40", "state")
  mgr = ckpt_lib.CheckpointManager(os.path.join(wd, "checkpoints"),
                                   keep_last=3, keep_best=0,
                                   async_save=False)
  meta = ckpt_lib._tree_metadata(item)  # pylint: disable=protected-access
  restored = mgr.restore(ckpt_lib.restore_target(jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)), step=40)
  tree = jax.tree.map(lambda x: x * np.nan if np.issubdtype(
      np.asarray(x).dtype, np.floating) else x, restored.state)
  mgr.save(60, tree, data_state={"epoch": 0, "step": 60}, force=True)
  mgr.close()
  out = _run(wd, "--config.train.num_steps=70")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from step 40" in out.stdout
  assert "NaN / inf values" in out.stderr  # the warning naming step 60


# ---------------------------------------------------------------------------
# One run per workdir.


def test_second_run_in_a_workdir_is_refused_and_stale_lock_taken_over(
    tmp_path):
  wd = str(tmp_path / "wd")
  first = subprocess.Popen(_cmd(wd, "--config.train.num_steps=100000"),
                           cwd=ROOT, env=launch.child_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  _wait_for(os.path.join(wd, "checkpoints", "20"))
  second = _run(wd, "--config.train.num_steps=30")
  _one_line(second, 2, "is in use by another run", f"pid {first.pid}")
  first.kill()  # SIGKILL: the lock stays behind, its pid dead
  first.communicate(timeout=60)
  assert os.path.exists(os.path.join(wd, ".kd_jax.lock"))
  third = _run(wd, "--config.train.num_steps=45")
  assert third.returncode == 0, third.stderr[-3000:]
  assert "taking over the stale lock" in third.stderr
  assert "resumed from step" in third.stdout
  assert not os.path.exists(os.path.join(wd, ".kd_jax.lock"))


# ---------------------------------------------------------------------------
# Full disk.


def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                      path], capture_output=True, text=True)
  return r.returncode == 0


def test_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path):
  mnt = str(tmp_path / "small")
  if not _mount_tmpfs(mnt, "3m"):
    pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); "
                "test_write_limit_is_one_line covers the message")
  try:
    wd = os.path.join(mnt, "wd")
    out = _run(wd, "--config.train.num_steps=400")
    line = _one_line(out, 3, "cannot write", "No space left on device",
                     "is intact")
    good = _steps(wd)[-1]
    assert f"step {good}" in line
    big = str(tmp_path / "big")
    subprocess.run(["cp", "-a", wd, big], check=True)
    os.remove(os.path.join(big, ".kd_jax.lock")) if os.path.exists(
        os.path.join(big, ".kd_jax.lock")) else None
    res = _run(big, "--config.train.num_steps=400")
    assert res.returncode == 0 and f"resumed from step {good}" in res.stdout
  finally:
    subprocess.run(["umount", mnt], check=False)


def test_write_limit_is_one_line(tmp_path):
  """A file-size limit (RLIMIT_FSIZE through `prlimit`, a fault any user
  can inject; SIGXFSZ ignored so the write fails with EFBIG): the
  checkpoint write fails -> one line, status 3."""
  import shutil
  if shutil.which("prlimit") is None:
    pytest.skip("util-linux's prlimit is not installed")
  cmd = " ".join(_cmd(str(tmp_path / "wd"), "--config.train.num_steps=30"))
  out = subprocess.run(["sh", "-c", f"trap '' XFSZ; exec prlimit "
                        f"--fsize=200000 {cmd}"], cwd=ROOT,
                       env=launch.child_env(), capture_output=True, text=True,
                       timeout=300)
  _one_line(out, 3, "cannot write", "File too large")


# ---------------------------------------------------------------------------
# Values, warnings, damaged files.


@pytest.mark.parametrize("flag,key", [
    ("--config.train.num_steps=-5", "config.train.num_steps"),
    ("--config.optimizer.learning_rate=-1", "config.optimizer.learning_rate"),
    ("--config.train.on_nonfinite=ignore", "config.train.on_nonfinite"),
])
def test_bad_values_are_one_line(tmp_path, flag, key):
  _one_line(_run(str(tmp_path / "wd"), flag), 2, key)
  assert not os.path.exists(tmp_path / "wd")


def test_zero_temperature_is_one_line(tmp_path):
  out = subprocess.run(launch.main_command(
      "--config=configs/mnist.py:distill", "--config.debug=True",
      "--config.loss.terms.kd.temperature=0", f"--workdir={tmp_path}/wd"),
                       cwd=ROOT, env=launch.child_env(), capture_output=True,
                       text=True, timeout=300)
  _one_line(out, 2, "config.loss.terms.kd", "temperature")


def test_resume_prints_no_warning(tmp_path):
  wd = str(tmp_path / "wd")
  assert _run(wd, "--config.train.num_steps=20").returncode == 0
  out = _run(wd, "--config.train.num_steps=30")
  assert out.returncode == 0 and "resumed from step 20" in out.stdout
  assert not [l for l in out.stderr.splitlines()
              if "WARNING" in l or l.startswith("W1")], out.stderr[-3000:]


def test_damaged_npz_cache_is_set_aside_and_rebuilt(tmp_path, caplog):
  import tensorflow_datasets as tfds
  from kd_jax.data import sources
  with tfds.testing.mock_data(num_examples=8):
    x, y = sources.load_arrays("mnist", "train", cache_dir=str(tmp_path))
    cache = glob.glob(str(tmp_path / "mnist" / "*.npz"))[0]
    with open(cache, "r+b") as f:
      f.truncate(os.path.getsize(cache) // 2)
    x2, y2 = sources.load_arrays("mnist", "train", cache_dir=str(tmp_path))
  np.testing.assert_array_equal(x2, x)
  np.testing.assert_array_equal(y2, y)
  assert glob.glob(cache + ".corrupt-*") and os.path.exists(cache)
  assert any(cache in r.getMessage() for r in caplog.records)


def test_damaged_tokenizer_and_weights_name_the_file(tmp_path):
  from kd_jax.models import lm
  tok = tmp_path / "tokenizer.json"
  tok.write_text('{"version": "1.0", "model": {"type": ')
  with pytest.raises(ValueError, match=f"tokenizer file {tok} cannot be "
                     "read"):
    lm.load_tokenizer(str(tok))
  w = tmp_path / "model.safetensors"
  w.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
  with pytest.raises(ValueError, match=f"weights file {w} cannot be read"):
    lm.read_safetensors(str(w))


def test_atomic_text_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
  from kd_jax import metrics_io
  path = str(tmp_path / "config.json")
  metrics_io.write_text(path, "old")

  def boom(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    metrics_io.write_text(path, "new, long " * 1000)
  monkeypatch.undo()
  assert open(path).read() == "old"
  assert not [f for f in os.listdir(tmp_path) if f.startswith("config.json.")]


# ---------------------------------------------------------------------------
# One failing process ends the others.


def test_a_failing_process_ends_the_other_in_bounded_time(tmp_path):
  """Process 1 is launched with a bad value (one line, status 2, it exits
  at once); process 0, which goes on and waits for it in the first
  collective, stops within the heartbeat timeout instead of hanging until
  JAX's default (100 s) or forever."""
  wd = str(tmp_path / "wd")
  flags = ["--config.train.num_steps=10", "--config.train.parallel=jit",
           "--heartbeat_timeout=10"]
  dist = launch.distributed_flags(launch.free_port(), 2)
  cmds = [_cmd(wd, *flags, *dist[0]),
          _cmd(wd, *flags, *dist[1], "--config.data.mock_num_examples=4")]
  t = time.perf_counter()
  procs = [subprocess.Popen(c, cwd=ROOT, env=launch.child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for c in cmds]
  outs = [p.communicate(timeout=240) for p in procs]
  elapsed = time.perf_counter() - t
  assert procs[1].returncode == 2, outs[1][1][-2000:]
  assert "exceeds the 4 training examples" in outs[1][1]
  assert procs[0].returncode != 0, outs[0][1][-2000:]
  assert elapsed < 150, elapsed


def test_closed_loop_reports_from_other_threads_are_dropped():
  """The hook behind test_write_limit_is_one_line's "no traceback" (every
  CheckpointManager installs it once): only "Event loop is closed" from a
  non-main thread is dropped."""
  import threading  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from kd_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  passed = []
  hook = checkpoints.closed_loop_filter(passed.append)

  def report(exc):
    hook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                               exc_traceback=None, err_msg=None, object=None))

  closed = RuntimeError("Event loop is closed")
  other = ValueError("something else")
  for exc in (closed, other, RuntimeError("another runtime error")):
    t = threading.Thread(target=report, args=(exc,))
    t.start()
    t.join()
  report(closed)  # the main thread's own report is kept
  assert [u.exc_value for u in passed] == [
      other, passed[1].exc_value, closed]
  assert str(passed[1].exc_value) == "another runtime error"
  before = sys.unraisablehook
  try:
    checkpoints.install_closed_loop_filter()
    installed = sys.unraisablehook
    checkpoints.install_closed_loop_filter()
    assert sys.unraisablehook is installed  # once, not stacked
    assert getattr(installed, "kd_jax_closed_loop_filter", False)
  finally:
    sys.unraisablehook = before
