"""Worker of `test_sharding_multiprocess.py`: one process of a 2-process,
8-device FSDP run (4 CPU devices per process, gloo collectives).

Run as `python sharding_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR`.
The problem (models, data, initial variables, optimizer) is the one of
`multiprocess_worker.py`. The student state is FSDP-sharded over all 8
devices of both processes (`{'fsdp': 8}`), the teacher FSDP-sharded over
`('data', 'fsdp')`. After the first chunk of steps the state is saved with
Orbax *without gathering* (each process writes the shards of its devices),
restored into a fresh sharded template, and training continues. Process 0
writes the final student variables and the losses to WORKDIR/result.npz.
"""

from __future__ import annotations

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import multiprocess_worker as mw  # noqa: E402


def main(argv):
  pid, nproc, port, workdir = (int(argv[1]), int(argv[2]), int(argv[3]),
                               argv[4])
  import jax
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=nproc, process_id=pid,
                             initialization_timeout=60,
                             heartbeat_timeout_seconds=20,
                             shutdown_timeout_seconds=20)
  import optax
  from kd_jax import train
  from kd_jax.train import checkpoints
  from kd_jax.train import sharding as S

  par = S.MeshParallel({"fsdp": 8}, state_rules=S.ShardingRules(
      fsdp_axes=("fsdp",), min_bytes=0))
  student, teacher = mw.make_models(None)
  sv, tv = mw.initial_variables()
  tx = optax.adam(1e-2)
  objective = train.Objective(
      ce_weight=0.5, terms=(train.Term("kd", 0.5, temperature=2.0),))
  step = train.make_distill_step(student, teacher, objective, tx)
  run = par.compile(train.make_multi_step(step), stacked=True)
  host_state = train.create_train_state(sv, tx, rng=jax.random.key(3))
  state = par.shard_state(host_state)
  tv = par.shard_teacher(tv, S.teacher_rules("fsdp", min_bytes=0))
  assert not state.params["Dense_0"]["kernel"].is_fully_addressable
  data = mw.make_data()
  per = mw.GLOBAL_BATCH // nproc
  losses = []
  mgr = checkpoints.CheckpointManager(os.path.join(workdir, "ckpt"),
                                      async_save=False)
  for start in range(0, mw.NUM_STEPS, mw.STEPS_PER_CALL):
    chunk = {k: v[start:start + mw.STEPS_PER_CALL, pid * per:(pid + 1) * per]
             for k, v in data.items()}
    state, metrics = run(state, tv, par.shard_batch(chunk, stacked=True))
    losses.append(par.fetch(metrics)["loss"])
    if start == 0:  # save sharded, restore into a fresh sharded template
      mgr.save(int(jax.device_get(state.step)), state, force=True)
      mgr.wait_until_finished()
      template = S.abstract_with_shardings(host_state,
                                           par.state_shardings(host_state))
      state = mgr.restore(template).state
  mgr.close()
  final = par.fetch(state)
  if pid == 0:
    out = {"losses": np.concatenate(losses)}
    out.update(mw.flat(final))
    np.savez(os.path.join(workdir, "result.npz"), **out)
  jax.distributed.shutdown()
  print(f"process {pid}: done, devices={jax.device_count()}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
