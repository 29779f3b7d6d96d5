"""Tests for kd_jax.train.checkpoints (Orbax save/resume, teacher loading)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import models
from kd_jax.train import checkpoints as ckpt
from kd_jax.train.state import TrainState


def _random_like(tree, seed):
  """Independent random values (NumPy) with the shapes/dtypes of `tree`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)), tree)


def _state(seed=0, width=3):
  """A TrainState whose every leaf is non-trivial (optax state after updates)."""
  params = {"dense": {"kernel": jnp.arange(width * 2, dtype=jnp.float32)
                      .reshape(width, 2) / 7.0 + seed,
                      "bias": jnp.full((2,), 0.5 + seed, jnp.float32)}}
  bstats = {"bn": {"mean": jnp.linspace(-1, 1, 2, dtype=jnp.float32),
                   "var": jnp.ones((2,), jnp.float32) * 1.5}}
  dparams = {"proj": {"kernel": jnp.full((2, 2), 0.25, jnp.float32)}}
  dstate = {"queue": jnp.arange(8, dtype=jnp.float32).reshape(4, 2),
            "ptr": jnp.array(3, jnp.int32)}
  tx = optax.chain(optax.add_decayed_weights(5e-4),
                   optax.sgd(optax.piecewise_constant_schedule(0.1, {3: 0.1}),
                             momentum=0.9),
                   optax.scale_by_adam())
  trainable = {"student": params, "distiller": dparams}
  opt_state = tx.init(trainable)
  for i in range(3):  # non-zero momentum / moments / counts
    g = jax.tree.map(lambda p: jnp.sin(p + i), trainable)
    _, opt_state = tx.update(g, opt_state, trainable)
  return TrainState(step=jnp.array(17, jnp.int32), params=params,
                    batch_stats=bstats, opt_state=opt_state,
                    distiller_params=dparams, distiller_state=dstate,
                    rng=jax.random.fold_in(jax.random.key(seed), 5))


def _assert_bit_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_round_trip_bit_exact(tmp_path):
  state = _state(seed=1)
  with ckpt.CheckpointManager(tmp_path, save_every_steps=17) as mgr:
    assert mgr.restore(state) is None  # fresh run
    assert mgr.save(17, state, data_state={"epoch": 2, "step": 5})
  # A new manager (as after a restart) sees it; the template has other values.
  with ckpt.CheckpointManager(tmp_path, save_every_steps=17) as mgr:
    template = _state(seed=9)
    r = mgr.restore(template)
    assert r.step == 17 and r.data_state == {"epoch": 2, "step": 5}
    _assert_bit_equal(r.state, state)
    assert isinstance(r.state, TrainState)
    assert type(r.state.opt_state) is type(state.opt_state)
    # Abstract template (jax.eval_shape) works too.
    r2 = mgr.restore(jax.eval_shape(lambda: template))
    _assert_bit_equal(r2.state, state)


def test_save_every_and_no_overwrite(tmp_path):
  state = _state()
  with ckpt.CheckpointManager(tmp_path, save_every_steps=3,
                              async_save=False) as mgr:
    saved = [s for s in range(1, 8) if mgr.save(s, state)]
    assert saved == [3, 6]
    assert mgr.save(7, state, force=True)
    assert not mgr.save(7, state, force=True)  # never overwrites
    assert mgr.all_steps() == [3, 6, 7]


def test_keep_last_k_and_best(tmp_path):
  state = _state()
  acc = {2: 0.30, 4: 0.90, 6: 0.50, 8: 0.60}  # best is the old step 4
  with ckpt.CheckpointManager(tmp_path, save_every_steps=1, keep_last=2,
                              keep_best=1) as mgr:
    for s in range(1, 10):
      m = {"accuracy": acc[s], "loss": 1.0} if s in acc else None
      assert mgr.save(s, jax.tree.map(lambda x: x, state), metrics=m,
                      data_state={"epoch": 0, "step": s})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [4, 8, 9]
    assert mgr.latest_step() == 9
    assert mgr.best_step() == 4
    r = mgr.restore(state, step=4)
    assert r.metrics["accuracy"] == pytest.approx(0.90)
    assert r.data_state == {"epoch": 0, "step": 4}
    with pytest.raises(ckpt.CheckpointError, match="no finalized checkpoint for step 5"):
      mgr.restore(state, step=5)


def test_keep_best_min_mode(tmp_path):
  state = _state()
  with ckpt.CheckpointManager(tmp_path, keep_last=1, keep_best=1,
                              best_metric="loss", best_mode="min",
                              async_save=False) as mgr:
    for s, loss in [(1, 0.5), (2, 0.2), (3, 0.9), (4, 0.7)]:
      mgr.save(s, state, metrics={"loss": loss})
    assert mgr.all_steps() == [2, 4]
    assert mgr.best_step() == 2
    with pytest.raises(ValueError, match="must contain 'loss'"):
      mgr.save(5, state, metrics={"accuracy": 1.0})


def test_unfinalized_checkpoint_is_never_loaded(tmp_path):
  state1, state2 = _state(seed=1), _state(seed=2)
  with ckpt.CheckpointManager(tmp_path, save_every_steps=1) as mgr:
    mgr.save(1, state1, data_state={"epoch": 0, "step": 1})
    mgr.save(2, state2, data_state={"epoch": 0, "step": 2})
  # Simulate a process killed while writing step 3: Orbax writes into
  # `<step>.orbax-checkpoint-tmp-<timestamp>` and renames only when complete.
  # Copy step 2's files there and truncate them all (a half-written save).
  tmp_dir = os.path.join(tmp_path, "3.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(os.path.join(tmp_path, "2"), tmp_dir)
  for root, _, files in os.walk(tmp_dir):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(3)
  with ckpt.CheckpointManager(tmp_path, save_every_steps=1) as mgr:
    assert mgr.all_steps() == [1, 2]
    r = mgr.restore(_state(seed=0))
    assert r.step == 2 and r.data_state == {"epoch": 0, "step": 2}
    _assert_bit_equal(r.state, state2)
    # The next save of step 3 succeeds despite the leftover.
    assert mgr.save(3, state1, force=True)
    mgr.wait_until_finished()
    assert mgr.latest_step() == 3


def test_restore_mismatch_names_paths(tmp_path):
  with ckpt.CheckpointManager(tmp_path, async_save=False) as mgr:
    mgr.save(1, _state(width=3), force=True)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"params/dense/kernel: checkpoint has shape "
                             r"\(3, 2\), model expects \(4, 2\)"):
      mgr.restore(_state(width=4))


# --- teacher loading ---------------------------------------------------------

def _teacher_shapes(name, num_classes=10, hw=32, c=3):
  model = models.create(name, num_classes=num_classes)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, hw, hw, c)),
                         train=False))


def test_teacher_from_converted_dir(tmp_path):
  expected = _teacher_shapes("resnet8")
  assert set(expected) == {"params", "batch_stats"}
  variables = _random_like(expected, seed=3)
  path = os.path.join(tmp_path, "resnet8_orbax")
  ckpt.save_variables(path, variables)
  got = ckpt.load_teacher_variables(path, expected)
  _assert_bit_equal(got, variables)


def test_teacher_from_training_run_dir(tmp_path):
  expected = _teacher_shapes("resnet8")
  variables = _random_like(expected, seed=4)
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState(step=jnp.array(5), params=variables["params"],
                     batch_stats=variables["batch_stats"],
                     opt_state=tx.init({"student": variables["params"],
                                        "distiller": {}}),
                     distiller_params={}, distiller_state={},
                     rng=jax.random.key(0))
  with ckpt.CheckpointManager(tmp_path, async_save=False) as mgr:
    mgr.save(5, state, force=True)
    mgr.save(6, jax.tree.map(lambda x: x, state).replace(step=jnp.array(6)),
             force=True)
  # Run dir (latest step), explicit step, and a step dir all work; only the
  # variables are returned (no optimizer state).
  for kwargs in ({"path": str(tmp_path)},
                 {"path": str(tmp_path), "step": 5},
                 {"path": os.path.join(tmp_path, "6")}):
    got = ckpt.load_teacher_variables(expected_variables=expected, **kwargs)
    assert set(got) == {"params", "batch_stats"}
    _assert_bit_equal(got, variables)
  with pytest.raises(ckpt.CheckpointError, match=r"has no step 7; finalized steps: \[5, 6\]"):
    ckpt.load_teacher_variables(str(tmp_path), expected, step=7)


def test_teacher_architecture_mismatch(tmp_path):
  path = os.path.join(tmp_path, "t")
  ckpt.save_variables(path, _random_like(_teacher_shapes("resnet8"), 0))
  # Same architecture, different head: the message names the path and shapes.
  with pytest.raises(ckpt.CheckpointError,
                     match=r"(?s)does not match.*kernel: checkpoint has shape "
                           r"\(\d+, 10\), model expects \(\d+, 100\)"):
    ckpt.load_teacher_variables(path, _teacher_shapes("resnet8", 100))
  # A different architecture: missing / unexpected parameters are listed.
  with pytest.raises(ckpt.CheckpointError, match=r"(?s)missing from the checkpoint"
                                                 r".*but not in the model"):
    ckpt.load_teacher_variables(path, {"params": _teacher_shapes("mlp_student", hw=28, c=1)["params"]})
  # A deeper variant of the architecture: only the extra layers are missing.
  with pytest.raises(ckpt.CheckpointError,
                     match=r"\(30 missing from the checkpoint\):\n  batch_stats/layer1_1"):
    ckpt.load_teacher_variables(path, _teacher_shapes("resnet14"))
  # A model without batch stats expected vs a checkpoint with them is fine
  # only if params match; a missing collection is named.
  with pytest.raises(ckpt.CheckpointError, match=r"no \['batch_stats'\] collection"):
    p2 = os.path.join(tmp_path, "mlp")
    ckpt.save_variables(p2, _random_like(
        _teacher_shapes("mlp_teacher", hw=28, c=1), 0))
    ckpt.load_teacher_variables(p2, {**_teacher_shapes("mlp_teacher", hw=28, c=1),
                                     "batch_stats": {}})


def test_teacher_missing_or_unreadable_path(tmp_path):
  expected = _teacher_shapes("mlp_student", hw=28, c=1)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.load_teacher_variables(os.path.join(tmp_path, "nope"), expected)
  junk = os.path.join(tmp_path, "junk")
  os.makedirs(junk)
  with open(os.path.join(junk, "weights.pt"), "w") as f:
    f.write("not orbax")
  with pytest.raises(ckpt.CheckpointError, match="not a readable teacher checkpoint"):
    ckpt.load_teacher_variables(junk, expected)
  with pytest.raises(ckpt.CheckpointError, match="is a file"):
    ckpt.load_teacher_variables(os.path.join(junk, "weights.pt"), expected)
  corrupt = os.path.join(tmp_path, "corrupt")
  os.makedirs(corrupt)
  with open(os.path.join(corrupt, "_METADATA"), "w") as f:
    f.write("{garbage")
  with pytest.raises(ckpt.CheckpointError, match="cannot read Orbax metadata"):
    ckpt.load_teacher_variables(corrupt, expected)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="`keep_last` must be an int >= 1"):
    ckpt.CheckpointManager(tmp_path, keep_last=0)
  with pytest.raises(ValueError, match="`best_mode` must be 'max' or 'min'"):
    ckpt.CheckpointManager(tmp_path, best_mode="best")
  with pytest.raises(ValueError, match="`save_every_steps` must be a positive int"):
    ckpt.CheckpointManager(tmp_path, save_every_steps=0)


_KILL_CHILD = r"""
import sys, time
import numpy as np
import jax.numpy as jnp
from kd_jax.train import checkpoints as ckpt
d, n = sys.argv[1], int(sys.argv[2])
mgr = ckpt.CheckpointManager(d, async_save=True)
mgr.save(1, {"w": jnp.full((n,), 1.0, jnp.float32)}, force=True)
mgr.wait_until_finished()
print("saved1", flush=True)
mgr.save(2, {"w": jnp.full((n,), 2.0, jnp.float32)}, force=True)
print("saving2", flush=True)
time.sleep(120)
"""


def test_sigkill_while_saving_falls_back_to_previous(tmp_path):
  """A real process SIGKILLed while its async save is in flight."""
  import signal
  import subprocess
  import sys
  import time
  n = 16 * 2 ** 20  # 64 MB of float32: the write takes a noticeable time
  proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(tmp_path), str(n)],
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert proc.stdout.readline().strip() == "saved1"
    t0, killed_mid_save = time.time(), False
    while time.time() - t0 < 60:
      names = os.listdir(tmp_path)
      if "2" in names:  # finished before we could kill it
        break
      if any(x.startswith("2.orbax-checkpoint-tmp") for x in names):
        proc.send_signal(signal.SIGKILL)
        killed_mid_save = "2" not in os.listdir(tmp_path)
        break
      time.sleep(0.001)
  finally:
    proc.kill()
    proc.wait()
  with ckpt.CheckpointManager(tmp_path) as mgr:
    r = mgr.restore({"w": jnp.zeros((n,), jnp.float32)})
    if killed_mid_save:
      assert mgr.all_steps() == [1] and r.step == 1
    assert r.step in (1, 2)
    # Whatever is loaded is a complete checkpoint of that step.
    np.testing.assert_array_equal(np.asarray(r.state["w"][::4096]), float(r.step))
