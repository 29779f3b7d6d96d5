"""Worker of `test_sharding.py::test_sigkill_resume_on_a_sharded_mesh`.

`python sharding_resume_worker.py WORKDIR TOTAL_STEPS OUT` trains the MLP pair
of `multiprocess_worker.py` on the mesh `{'data': 2, 'fsdp': 4}` (8 CPU
devices; state FSDP-sharded, teacher FSDP over all 8), saving a sharded
checkpoint after every step and resuming from the latest one when WORKDIR
has one. Prints `saved <step>` after each save; writes the final student
variables to OUT (.npz).
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import multiprocess_worker as mw  # noqa: E402


def batch(step):
  rs = np.random.RandomState(100 + step)
  return {"image": rs.randn(mw.GLOBAL_BATCH, mw.IN_DIM).astype(np.float32),
          "label": rs.randint(0, mw.CLASSES, mw.GLOBAL_BATCH).astype(np.int32)}


def main(workdir, total, out):
  import jax
  import optax
  from kd_jax import train
  from kd_jax.train import checkpoints
  from kd_jax.train import sharding as S

  par = S.MeshParallel({"data": 2, "fsdp": 4}, state_rules=S.ShardingRules(
      fsdp_axes=("fsdp",), min_bytes=0))
  student, teacher = mw.make_models(None)
  sv, tv = mw.initial_variables()
  tx = optax.adam(1e-2)
  obj = train.Objective(ce_weight=0.5,
                        terms=(train.Term("kd", 0.5, temperature=2.0),))
  run = par.compile(train.make_distill_step(student, teacher, obj, tx))
  host = train.create_train_state(sv, tx, rng=jax.random.key(3))
  shardings = par.state_shardings(host)
  tv = par.shard_teacher(tv, S.teacher_rules("fsdp", min_bytes=0))
  with checkpoints.CheckpointManager(workdir, save_every_steps=1,
                                     async_save=False) as mgr:
    restored = mgr.restore(S.abstract_with_shardings(host, shardings))
    state = restored.state if restored else S.put(host, shardings)
    for step in range(int(jax.device_get(state.step)), total):
      state, _ = run(state, tv, par.shard_batch(batch(step)))
      mgr.save(step + 1, state)
      mgr.wait_until_finished()
      print(f"saved {step + 1}", flush=True)
  np.savez(out, **mw.flat(par.fetch(state)))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
