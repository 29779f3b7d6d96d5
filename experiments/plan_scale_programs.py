"""The programs `plan_scale` compiles, built from abstract sharded inputs.

Runs inside a child process whose ``XLA_FLAGS`` already fixed the number of
simulated devices (see `experiments.plan_scale`). Everything here is
``jax.eval_shape`` + ``lower`` + ``compile``: no real-size array exists.
"""

from __future__ import annotations

import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import hlo_stats as hlo_lib
from experiments.plan_scale_configs import HF_CONFIGS
from experiments.plan_scale_configs import HLO_STATS_VERSION
from experiments.plan_scale_configs import PAIRS
from experiments.plan_scale_configs import mesh_spec
from experiments.plan_scale_configs import row_key
from kd_jax.models import lm
from kd_jax.train import create_train_state
from kd_jax.train import lm_steps
from kd_jax.train import sharding as S
from kd_jax.train.mesh_losses import shard_fused_loss

EXAMPLE = np.zeros((1, 8), np.int32)
CHUNK = 1024


def model(name: str, *, remat: bool = False, scan: bool = True):
  cfg = lm.config_from_hf(HF_CONFIGS[name])
  return lm.Transformer(cfg, jnp.bfloat16, remat=remat, scan_layers=scan)


def optimizer():
  """The LM trainer's optimizer: global-norm clipping + AdamW (cosine)."""
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-4, 100, 10000)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, weight_decay=0.01))


def bf16(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def abstract_variables(m):
  return jax.eval_shape(lambda: nn.unbox(m.init(jax.random.key(0),
                                                EXAMPLE)))


def shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding else x.shape
    size = 8 if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else \
        np.dtype(x.dtype).itemsize
    total += math.prod(shape) * size
  return total


def teacher_sharding_rules(placement: str):
  """``fsdp_tensor``: the teacher's logical names on 'tensor' *and* FSDP
  over ('data', 'fsdp') (a `ShardingRules` for `teacher_rules`)."""
  if placement == "fsdp_tensor":
    return S.ShardingRules(fsdp_axes=S.BATCH_AXES,
                           logical_rules=S.DEFAULT_LOGICAL_RULES,
                           require_logical_names=True)
  return placement


def state_inputs(student, tx, par):
  """The train state: bf16 params, f32 AdamW moments, sharded by the rules."""
  tensor = par.mesh.shape["tensor"] > 1
  names = S.logical_axis_names(student, EXAMPLE) if tensor else None
  state = jax.eval_shape(lambda v: create_train_state(
      v, tx, rng=jax.random.key(1)), abstract_variables(student))
  state = state.replace(params=bf16(state.params))
  return S.abstract_with_shardings(
      state, par.state_shardings(state, logical_names=names))


def teacher_inputs(teacher, par, placement: str):
  names = (S.logical_axis_names(teacher, EXAMPLE)
           if placement != "replicated" else None)
  tv = bf16(abstract_variables(teacher))
  return S.abstract_with_shardings(tv, par.teacher_shardings(
      tv, teacher_sharding_rules(placement), logical_names=names))


def matmul_params(c) -> int:
  """Parameters that multiply a token's activations (head included, the
  embedding lookup not)."""
  per_layer = c.hidden_size * c.head_dim * (2 * c.num_heads +
                                            2 * c.num_kv_heads)
  per_layer += 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * per_layer + c.hidden_size * c.vocab_size


def token_flops(c, context: int, train: bool) -> float:
  """Model FLOPs per token: 6N (train) or 2N, plus attention over
  `context` keys, 12 L H dh T or 4 L H dh T (PaLM, App. B)."""
  attn = c.num_layers * c.num_heads * c.head_dim * context
  return (6 * matmul_params(c) + 12 * attn) if train else \
      (2 * matmul_params(c) + 4 * attn)


def _chunk(row: dict, par) -> int:
  """`CHUNK` tokens, or all of a device's tokens when it has fewer."""
  local = (row["batch"] // par.batch_divisor) * row["seq"]
  tensor = par.mesh.shape["tensor"]
  local //= tensor if row["seq"] % tensor == 0 else 1
  return max(1, min(CHUNK, local))


def distill_program(row: dict, par):
  teacher_name, student_name = PAIRS[row["pair"]]
  student = model(student_name, remat=row["remat"], scan=row["scan"])
  teacher = model(teacher_name, scan=row["scan"])
  tx = optimizer()
  state = state_inputs(student, tx, par)
  tv = teacher_inputs(teacher, par, row["placement"])
  batch = {"tokens": jax.ShapeDtypeStruct(
      (row["batch"], row["seq"] + 1), jnp.int32,
      sharding=par.batch_sharding())}
  step = lm_steps.make_lm_distill_step(
      student, teacher, tx, divergence="forward_kl", ce_weight=0.5,
      kd_weight=0.5, fused=True, chunk_size=_chunk(row, par),
      student_head=functools.partial(lm.head_kernel, config=student.config),
      teacher_head=functools.partial(lm.head_kernel, config=teacher.config),
      fused_loss=shard_fused_loss(par.mesh))
  tokens = row["batch"] * row["seq"]
  flops = tokens * (token_flops(student.config, row["seq"], True) +
                    token_flops(teacher.config, row["seq"], False))
  meta = {"state_bytes": shard_bytes(state), "teacher_bytes": shard_bytes(tv),
          "batch_bytes": shard_bytes(batch), "model_flops": flops}
  return par.compile(step), (state, tv, batch), meta


def _param_shardings(par, params, names, gathered: bool):
  """The student's weights as the train state holds them, or (`gathered`)
  as the compute needs them: whole, except for tensor parallelism."""
  rules = par.rules
  if gathered:
    rules = S.ShardingRules(logical_rules=S.DEFAULT_LOGICAL_RULES
                            if par.mesh.shape["tensor"] > 1 else None)
  return S.named_shardings({"params": params}, par.mesh, rules,
                           logical_names=names)


def generate_program(row: dict, par):
  student = model(row["student"], scan=row["scan"])
  gen = lm.make_generate_fn(student, max_new_tokens=row["new_tokens"],
                            temperature=0.9)
  params = bf16(abstract_variables(student))["params"]
  names = (S.logical_axis_names(student, EXAMPLE)
           if par.mesh.shape["tensor"] > 1 else None)
  state_sh = _param_shardings(par, params, names, False)
  need_sh = _param_shardings(par, params, names, True)
  variables = S.abstract_with_shardings({"params": params}, state_sh)
  bsh = par.batch_sharding()
  prompts = jax.ShapeDtypeStruct((row["batch"], row["prompt"]), jnp.int32,
                                 sharding=bsh)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=par.replicated)

  def fn(v, p, key):
    if row["placement"] == "gather":  # one all-gather before sampling
      v = jax.lax.with_sharding_constraint(v, need_sh)
    return gen(v, p, key)

  c = student.config
  total = row["prompt"] + row["new_tokens"]
  head = 2 * c.hidden_size * c.vocab_size  # the prefill needs it once
  flops = row["batch"] * (total * token_flops(c, total, False)
                          - (row["prompt"] - 1) * head)
  kv = (c.num_layers * row["batch"] * total * c.num_kv_heads * c.head_dim
        * 2 * 2)
  tensor = min(par.mesh.shape["tensor"], c.num_kv_heads)
  meta = {"state_bytes": shard_bytes(variables), "teacher_bytes": 0,
          "batch_bytes": shard_bytes(prompts), "model_flops": flops,
          "kv_cache_bytes": kv // par.batch_divisor // tensor,
          "weights_read_per_token": 2 * c.num_params // tensor}
  jitted = jax.jit(fn, in_shardings=(state_sh, bsh, par.replicated),
                   out_shardings=bsh)
  return jitted, (variables, prompts, rng), meta


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  return {"argument": int(m.argument_size_in_bytes),
          "output": int(m.output_size_in_bytes),
          "alias": int(m.alias_size_in_bytes),
          "temp": int(m.temp_size_in_bytes),
          "code": int(m.generated_code_size_in_bytes)}


def _cost_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("flops", 0.0))


def measure(row: dict) -> dict:
  """Compiles one row; the numbers `plan_scale_report` tabulates."""
  spec = mesh_spec(row["mesh"], row["devices"], row["tensor"], row["data"])
  par = S.MeshParallel(spec)
  build = distill_program if row["program"] == "distill" else \
      generate_program
  t0 = time.perf_counter()
  fn, args, meta = build(row, par)
  lowered = fn.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  text = compiled.as_text()
  trips = row.get("new_tokens", 1) - 1 or 1
  stats = hlo_lib.hlo_stats(text, row["devices"], unknown_trip_count=trips)
  mem = _memory(compiled)
  gathered = stats["collectives"]["all-gather"]["src_bytes"]
  hbm = mem["argument"] + mem["output"] + 2 * gathered
  if row["program"] == "generate":  # every decode step reads weights + cache
    hbm += row["new_tokens"] * (meta["weights_read_per_token"] +
                                meta["kv_cache_bytes"])
  return dict(row=row, key=row_key(row), mesh=dict(par.mesh.shape),
              hlo_stats_version=HLO_STATS_VERSION,
              lower_s=t1 - t0, compile_s=t2 - t1, memory=mem, hlo=stats,
              cost_analysis_flops=_cost_flops(compiled), hbm_bytes=hbm,
              model_flops_per_device=meta["model_flops"] / row["devices"],
              f32_copies=hlo_lib.f32_copies_of_bf16(text),
              **{k: v for k, v in meta.items() if k != "model_flops"})
