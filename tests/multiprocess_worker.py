"""Worker of `tests/test_multiprocess.py`: one process of a 2-process run.

Run as `python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT MODES OUT`
(MODES: comma-separated `DataParallel` modes, e.g. `jit,pmap`).
Each process owns 2 CPU devices, joins a local coordinator on 127.0.0.1
with `jax.distributed.initialize`, feeds *its half* of every global batch
and runs the same distillation loop as `run_reference` (1 device). Process
0 writes the final student variables and per-step losses to OUT (.npz).
Importing this module has no side effects (the test imports the problem
definition from it).
"""

from __future__ import annotations

import sys

import numpy as np

GLOBAL_BATCH = 16
NUM_STEPS = 4
STEPS_PER_CALL = 2
IN_DIM, HIDDEN, CLASSES = 12, 16, 5


def make_models(axis_name):
  import flax.linen as nn

  class Student(nn.Module):

    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.Dense(HIDDEN, use_bias=False)(x)  # BN follows
      h = nn.BatchNorm(use_running_average=not train, momentum=0.8,
                       axis_name=axis_name)(h)
      h = nn.relu(h)
      return nn.Dense(CLASSES)(h), {"pooled": h}

  class Teacher(nn.Module):

    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.relu(nn.Dense(2 * HIDDEN)(x))
      return nn.Dense(CLASSES)(h), {"pooled": h}

  return Student(), Teacher()


def make_data():
  rs = np.random.RandomState(0)
  x = rs.randn(NUM_STEPS, GLOBAL_BATCH, IN_DIM).astype(np.float32)
  y = rs.randint(0, CLASSES, (NUM_STEPS, GLOBAL_BATCH)).astype(np.int32)
  return {"image": x, "label": y}


def initial_variables():
  """Student/teacher variables, identical in every process.

  Filled with NumPy from the abstract structure (`jax.eval_shape`), so no
  JAX program runs before the training loop.
  """
  import jax
  import jax.numpy as jnp
  student, teacher = make_models(None)
  x = jax.ShapeDtypeStruct((2, IN_DIM), jnp.float32)
  rs = np.random.RandomState(1)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return (rs.randn(*leaf.shape) / np.sqrt(leaf.shape[0])).astype(np.float32)
    if "scale" in name or "var" in name:
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)

  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  sv = jax.eval_shape(student.init, key, x)
  tv = jax.eval_shape(teacher.init, key, x)
  return (jax.tree_util.tree_map_with_path(fill, sv),
          jax.tree_util.tree_map_with_path(fill, tv))


def run(mode, local_slice=None):
  """Runs the loop in `DataParallel(mode)`; returns (state, losses) on host.

  `local_slice(x)` selects this process's part of a global batch (axis 1 of
  the stacked chunk); None: the whole batch.
  """
  import jax
  import optax
  from kd_jax import train

  dp = train.DataParallel(mode)
  student, teacher = make_models(dp.axis_name)
  sv, tv = initial_variables()
  tx = optax.adam(1e-2)
  objective = train.Objective(
      ce_weight=0.5, terms=(train.Term("kd", 0.5, temperature=2.0),))
  step = train.make_distill_step(student, teacher, objective, tx,
                                 axis_name=dp.axis_name)
  fn = dp.compile(train.make_multi_step(step), stacked=True)
  state = dp.replicate(
      train.create_train_state(sv, tx, rng=jax.random.key(3)))
  tv = dp.replicate(tv)
  data = make_data()
  losses = []
  for start in range(0, NUM_STEPS, STEPS_PER_CALL):
    chunk = {k: v[start:start + STEPS_PER_CALL] for k, v in data.items()}
    if local_slice is not None:
      chunk = {k: local_slice(v) for k, v in chunk.items()}
    state, metrics = fn(state, tv, dp.shard_batch(chunk, stacked=True))
    losses.append(dp.fetch(metrics)["loss"])
  return dp.fetch(state), np.concatenate(losses)


def flat(state):
  import jax
  out = {}
  for prefix, tree in (("params", state.params),
                       ("batch_stats", state.batch_stats)):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def main(argv):
  pid, nproc, port, mode, out = (int(argv[1]), int(argv[2]), int(argv[3]),
                                 argv[4], argv[5])
  import jax
  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=60,
                             heartbeat_timeout_seconds=20,
                             shutdown_timeout_seconds=20)
  assert jax.process_count() == nproc, jax.process_count()
  assert jax.device_count() == 2 * nproc, jax.devices()
  per = GLOBAL_BATCH // nproc
  results = {}
  for m in mode.split(","):
    state, losses = run(m, lambda v: v[:, pid * per:(pid + 1) * per])
    results[f"{m}/losses"] = losses
    results.update({f"{m}/{k}": v for k, v in flat(state).items()})
  if pid == 0:
    np.savez(out, **results)
  jax.distributed.shutdown()
  print(f"process {pid}: done, devices={jax.device_count()}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
