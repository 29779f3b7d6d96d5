"""Compiled, data-parallel distillation engine.

API summary (details in each module's docstring and `docs/engine.md`)::

  from kd_jax import train

  # Loss specification: w_ce * CE + min(epoch / warmup_epochs, 1) * sum_k w_k L_k
  objective = train.Objective(
      ce_weight=0.7, terms=(train.Term("kd", 0.3, temperature=5.0),),
      warmup_epochs=0)   # from a config: kd_jax.trainer.build_objective(...)

  # State: step, params, batch_stats, opt_state, distiller_params,
  # distiller_state, rng. The optimizer sees {'student': params,
  # 'distiller': distiller_params}.
  state = train.create_train_state(student.init(key, x), tx, rng=key)

  # Steps (pure functions; apply fns return (logits, features); Linen
  # modules are accepted directly):
  step = train.make_distill_step(student, teacher, objective, tx,
                                 axis_name=dp.axis_name, steps_per_epoch=...)
  state, metrics = step(state, teacher_variables, batch)  # batch: {'image','label'}
  train.make_train_step(model, tx)            # (state, batch) supervised
  train.make_eval_step(model)                 # (variables|state, batch) -> loss/top1/top5/count
  train.make_dml_step([s1, s2], objective, tx)  # (states, batch) mutual learning
  train.make_distill_step(student, None, ...) # batch['teacher_logits'] precomputed
  train.make_distill_step(student, [t1, t2], ..., multi_teacher="mean_logits")
  multi = train.make_multi_step(step)         # lax.scan over [num_steps, B, ...]

  # Language models: one step builder; Seq-KD / GKD / top-k / fused head
  # are its options (kd_jax.train.lm_steps):
  train.make_lm_step(student, teacher, objective, tx, generation=...)

  # Optimizers by name (methods register theirs) and placement:
  tx, sched = train.make_optimizer(train.OptimizerSpec(name="adamw", ...),
                                   steps_per_epoch=..., total_steps=...)
  placement = train.make_placement("jit", mesh={"fsdp": 8})

  # Parallelism, same step code ('single' | 'pmap' | 'jit'):
  dp = train.DataParallel("jit")
  fn = dp.compile(multi, stacked=True)
  state, tv = dp.replicate(state), dp.replicate(teacher_variables)
  state, metrics = fn(state, tv, dp.shard_batch(local_chunk, stacked=True))
  dp.fetch(metrics)

  # N-D mesh ('data', 'fsdp', 'tensor'), FSDP / tensor rules, sharded
  # teacher, memory report (docs/parallelism.md):
  par = train.MeshParallel({"data": 2, "fsdp": 4})
  state, tv = par.shard_state(state), par.shard_teacher(tv, "fsdp")
  run = par.compile(multi, stacked=True)
  report = train.memory_report(state, tv, run.lower(state, tv, b).compile())

Metrics of train/distill steps: `ce`, one per KD term label, `loss`, `top1`,
`kd_factor` (float32 scalars; `pmean`-ed under pmap).
"""

from kd_jax.train.lm_steps import make_lm_step
from kd_jax.train.objectives import Objective
from kd_jax.train.objectives import SparseTeacher
from kd_jax.train.objectives import Term
from kd_jax.train.objectives import TermInputs
from kd_jax.train.objectives import available_losses
from kd_jax.train.objectives import resolve_loss
from kd_jax.train.optim import OptimizerSpec
from kd_jax.train.optim import make_optimizer
from kd_jax.train.optim import register_optimizer
from kd_jax.train.parallel import DataParallel
from kd_jax.train.placement import make_placement
from kd_jax.train.sharding import MeshParallel
from kd_jax.train.sharding import ShardingRules
from kd_jax.train.sharding import logical_axis_names
from kd_jax.train.sharding import make_mesh
from kd_jax.train.sharding import memory_report
from kd_jax.train.sharding import memory_summary
from kd_jax.train.sharding import teacher_rules
from kd_jax.train.state import TrainState
from kd_jax.train.state import create_train_state
from kd_jax.train.state import student_variables
from kd_jax.train.step_utils import as_student_apply
from kd_jax.train.step_utils import as_teacher_apply
from kd_jax.train.step_utils import linen_student_apply
from kd_jax.train.step_utils import linen_teacher_apply
from kd_jax.train.steps import make_distill_step
from kd_jax.train.steps import make_dml_step
from kd_jax.train.steps import make_eval_step
from kd_jax.train.steps import make_multi_step
from kd_jax.train.steps import make_train_step
from kd_jax.train.steps import precompute_teacher_logits
from kd_jax.train.steps import teacher_forward
