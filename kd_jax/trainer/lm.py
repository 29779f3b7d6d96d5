"""Language-model runs: train a teacher / student, or distill one (5 modes).

    from kd_jax.trainer import lm
    report = lm.train_and_evaluate(config, workdir)   # config.task == "lm"

The config is parsed once (`kd_jax.trainer.lm_config.parse`); the data is a
prepared text dataset (`experiments/prepare_corpus.py`) read through grain
(`kd_jax.data.text.lm_dataset`, batch ``step`` = ``ds[step]``, so a resumed
run sees the same batches); the compiled steps are the engine's
(`kd_jax.train.lm_steps`); checkpoints go through the trainer's
`checkpointing` (resume from the newest restorable step); metrics through
`kd_jax.metrics_io` (``metrics.jsonl`` + TensorBoard). Held-out perplexity
:math:`\\exp(\\sum \\mathrm{nll} / \\sum n)` of every ``data.eval_splits``
split is evaluated every ``train.eval_every`` steps and at the end.

``train.mesh`` (+ ``train.sharding_rules``, ``teacher.sharding``) runs
the phase on a device mesh through the CNN trainer's
`kd_jax.trainer.mesh.TrainerMesh` (FSDP x tensor parallel by the models'
logical axis names; `Placement`). With several processes
(``jax.distributed``) every process runs the phase and feeds its rows of
each batch; process 0 alone writes, with barriers before the others read.

``mode = "topk"`` first writes the teacher's top-k cache
(`kd_jax.data.text.TopkCacheWriter`, bf16 log-probs + int32 indices) of the
train sequences it will use, unless a matching cache is there, and reads it
back through grain zipped with the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kd_jax import metrics_io
from kd_jax.data import text as text_lib
from kd_jax.models import lm as lm_models
from kd_jax.train import checkpoints as ckpt_lib
from kd_jax.train import create_train_state
from kd_jax.train import lm_steps
from kd_jax.train import sharding as sharding_lib
from kd_jax.trainer import checkpointing
from kd_jax.trainer import mesh as mesh_lib
from kd_jax.trainer.config import ConfigError
from kd_jax.trainer.lm_config import LMModel
from kd_jax.trainer.lm_config import LMRunConfig
from kd_jax.trainer.lm_config import mesh_spec
from kd_jax.trainer.lm_config import parse
from kd_jax.trainer.run import NullWriter
from kd_jax.trainer.run import prepare_workdir


class _Prefix:
  """The first `n` items of a random-access source."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source)) if n else len(source)

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


def build_model(spec: LMModel, rc: LMRunConfig, key: str):
  """(module, variables or None): a preset (initialized later) or a Hugging
  Face folder; checks the dataset's tokenizer and sequence length fit."""
  dtype = jnp.dtype(spec.dtype)
  variables = None
  if spec.hf_dir:
    try:
      model, variables, _ = lm_models.load_hf_folder(spec.hf_dir, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"{key}.hf_dir", str(e)) from None
  else:
    kw = dict(vocab_size=rc.data.vocab_size,
              max_position_embeddings=rc.data.seq_len)
    kw.update(spec.overrides)
    try:
      cfg = lm_models.preset_config(spec.preset, **kw)
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{key}.overrides", str(e)) from None
    model = lm_models.Transformer(cfg, dtype=dtype, remat=spec.remat)
  try:
    lm_models.load_tokenizer(rc.data.folder,
                             vocab_size=model.config.vocab_size)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(key, f"the dataset's {e}.") from None
  limit = model.config.max_position_embeddings
  if rc.data.seq_len > limit:
    raise ConfigError(key, f"the dataset's sequences ({rc.data.seq_len} "
                      f"tokens) are longer than the model's context "
                      f"(max_position_embeddings {limit}).")
  return model, variables


def _init_variables(model, seed: int):
  x = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(model.init(jax.random.key(seed), x))


def teacher_variables(rc: LMRunConfig, model, variables, place=None):
  """The frozen teacher's variables (HF folder, or an LM run's workdir); on
  a mesh (`place`) restored straight into their shardings
  (``teacher.sharding``)."""
  place = place or Placement(None)
  if variables is not None:
    return place.teacher(variables)
  path = rc.teacher.checkpoint
  sub = os.path.join(path, "checkpoints")
  expected = jax.eval_shape(lambda: _init_variables(model, 0))
  target = place.teacher_target(expected)
  try:
    return ckpt_lib.load_teacher_variables(
        sub if os.path.isdir(sub) else path, expected, sharding=target)
  except (FileNotFoundError, ckpt_lib.CheckpointError) as e:
    raise ConfigError("teacher.checkpoint", str(e)) from None


def _check_vocab(rc, student, teacher):
  vs, vt = student.config.vocab_size, teacher.config.vocab_size
  if vs != vt and rc.kd.vocab_size is None and rc.mode != "topk":
    raise ConfigError("kd.vocab_size", f"teacher vocabulary {vt} != student "
                      f"vocabulary {vs}; set kd.vocab_size to the shared "
                      "prefix (e.g. the tokenizer's size).")


class Placement:
  """Where an LM run's arrays live: one device (``dp`` None: plain
  ``jax.jit``, host NumPy checkpoints) or a device mesh (``dp`` a
  `kd_jax.trainer.mesh.TrainerMesh`: the state and the teacher sharded by
  the rules, batches over ``('data', 'fsdp')``, sharded checkpoints)."""

  def __init__(self, dp: Optional[mesh_lib.TrainerMesh]):
    self.dp = dp

  def compile(self, fn, donate: bool = True):
    if self.dp is None:
      return jax.jit(fn, donate_argnums=0 if donate else ())
    return self.dp.compile(fn, donate_state=donate)

  def batch(self, host_batch):
    """A global host batch -> the step's input (this process's rows)."""
    if self.dp is None:
      return host_batch
    return self.dp.shard_batch(self.dp.local_rows(host_batch))

  def fetch(self, tree):
    return jax.device_get(tree) if self.dp is None else self.dp.fetch(tree)

  def state(self, state):
    return state if self.dp is None else self.dp.place_state(state)

  def teacher(self, variables):
    return variables if self.dp is None else self.dp.place_teacher(variables)

  def teacher_target(self, abstract):
    return None if self.dp is None else self.dp.teacher_target(abstract)

  def checkpoint_tree(self, state):
    """The saved tree (on a mesh each process writes its shards)."""
    return (_host_tree(state) if self.dp is None
            else mesh_lib.state_tree(state))

  def restore_template(self, state):
    return (_host_tree(state) if self.dp is None
            else mesh_lib.restore_template(self.dp, state))

  def memory(self, state, tv) -> Optional[Dict[str, int]]:
    """Bytes of the state and the teacher per device (mesh runs)."""
    if self.dp is None:
      return None
    rep = sharding_lib.memory_report(state, tv)
    if jax.process_index() == 0:
      print(sharding_lib.memory_summary(rep), flush=True)
    return rep


def make_placement(rc: LMRunConfig, student, teacher) -> Placement:
  """`train.mesh` (+ `train.sharding_rules`, `teacher.sharding`), as the
  CNN trainer's; with several processes and no mesh, ``{'data': all}``."""
  mesh = mesh_spec(rc.mesh)
  if not mesh:
    return Placement(None)
  x = jnp.zeros((1, min(8, rc.data.seq_len)), jnp.int32)
  spec = rc.teacher.sharding if rc.teacher is not None else "replicated"
  return Placement(mesh_lib.TrainerMesh(mesh, rc.sharding_rules, student,
                                        teacher, x, spec))


def make_optimizer(rc: LMRunConfig):
  o = rc.optim
  warmup = max(1, min(o.warmup_steps, rc.steps // 2))
  sched = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, warmup, max(rc.steps, warmup + 1))
  tx = optax.adamw(sched, weight_decay=o.weight_decay)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) \
      if o.grad_clip > 0 else tx


def _generate_fn(rc, model):
  g = rc.gkd
  return lm_models.make_generate_fn(
      model, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
      top_k=g.top_k, top_p=g.top_p, eos_id=rc.data.eos_id)


def make_step(rc: LMRunConfig, student, teacher, tx):
  """``step(state, teacher_variables, batch)`` of the configured mode."""
  k, mode = rc.kd, rc.mode
  prompt_len = rc.data.seq_len - rc.gkd.max_new_tokens
  if mode == "train":
    inner = lm_steps.make_lm_train_step(student, tx)
    return lambda state, tv, batch: inner(state, batch)
  if mode == "topk":
    inner = lm_steps.make_lm_topk_step(
        student, tx, temperature=rc.topk.temperature, tail=rc.topk.tail,
        ce_weight=k.ce_weight, kd_weight=k.kd_weight)
    return lambda state, tv, batch: inner(state, batch)
  if mode == "token_kd":
    heads = {}
    if k.fused:
      heads = dict(student_head=functools.partial(
          lm_models.head_kernel, config=student.config),
                   teacher_head=functools.partial(
                       lm_models.head_kernel, config=teacher.config),
                   chunk_size=k.chunk_size)
    return lm_steps.make_lm_distill_step(
        student, teacher, tx, divergence=k.divergence,
        temperature=k.temperature, beta=k.beta, ce_weight=k.ce_weight,
        kd_weight=k.kd_weight, fused=k.fused, vocab_size=k.vocab_size,
        **heads)
  if mode == "seq_kd":
    return lm_steps.make_seqkd_step(
        student, _generate_fn(rc, teacher), tx, prompt_len=prompt_len,
        eos_id=rc.data.eos_id, teacher_apply=teacher,
        divergence=k.divergence, temperature=k.temperature, beta=k.beta,
        ce_weight=k.ce_weight, kd_weight=k.kd_weight,
        vocab_size=k.vocab_size)
  g = rc.gkd
  return lm_steps.make_gkd_step(
      student, teacher, tx, student_generate=_generate_fn(rc, student),
      teacher_generate=_generate_fn(rc, teacher), prompt_len=prompt_len,
      lmbda=g.lmbda, beta=g.beta, temperature=g.temperature, seq_kd=g.seq_kd,
      eos_id=rc.data.eos_id, vocab_size=k.vocab_size)


# ---------------------------------------------------------------------------
# Data.


def _source(rc: LMRunConfig, split: str, n: int):
  src, _ = text_lib.load_tfds_tokens(rc.data.folder, split)
  return _Prefix(src, n)


def cache_dir(rc: LMRunConfig) -> str:
  t = rc.teacher
  return rc.topk.cache_dir or os.path.join(t.checkpoint or t.hf_dir,
                                           "topk_cache")


def ensure_topk_cache(rc: LMRunConfig, teacher, tv, tokens,
                      place: Optional[Placement] = None) -> Dict[str, Any]:
  """Writes the teacher's top-k cache of `tokens` (a source) unless a cache
  with the same k, temperature and sequences is there; returns its figures
  (``cache_s`` 0 when reused). With several processes all of them run the
  (sharded) teacher, process 0 writes the files."""
  place = place or Placement(None)
  folder, k = cache_dir(rc), rc.topk.k
  want = {"num_sequences": len(tokens), "temperature": rc.topk.temperature,
          "length": rc.data.seq_len - 1}
  try:
    meta = text_lib.TopkCacheSource(folder, "train", k).metadata
    reuse = all(meta.get(a) == b for a, b in want.items())
  except FileNotFoundError:
    reuse = False
  mesh_lib.barrier(f"topk cache checked {folder}")  # before it is rewritten
  if reuse:
    return {"cache_s": 0.0, "cache_reused": True, "cache_dir": folder}
  main = jax.process_index() == 0
  start = time.perf_counter()
  fn = place.compile(lm_steps.make_teacher_topk_fn(
      teacher, k=k, temperature=rc.topk.temperature), donate=False)
  writer = None
  if main:
    os.makedirs(folder, exist_ok=True)
    writer = text_lib.TopkCacheWriter(folder, "train", k, metadata={
        "temperature": rc.topk.temperature, "teacher": rc.teacher.checkpoint
        or rc.teacher.hf_dir})
  b, n = rc.data.eval_batch_size, len(tokens)
  for lo in range(0, n, b):
    rows = np.stack([tokens[i]["tokens"] for i in range(lo, min(lo + b, n))])
    pad = b - len(rows)  # one compiled shape
    x = np.concatenate([rows, np.repeat(rows[-1:], pad, 0)]) if pad else rows
    lp, idx = place.fetch(fn(tv, place.batch(x.astype(np.int32))))
    if writer is not None:
      writer.write(lp[:len(rows)], idx[:len(rows)])
  if writer is not None:
    writer.close()
  mesh_lib.barrier(f"topk cache written {folder}")  # the others read it next
  return {"cache_s": time.perf_counter() - start, "cache_reused": False,
          "cache_dir": folder,
          "cache_bytes_per_token": text_lib.topk_bytes_per_token(k)}


def train_dataset(rc: LMRunConfig, teacher=None, tv=None, place=None):
  """(grain dataset: ``ds[step]`` is the step's batch, cache figures)."""
  tokens = _source(rc, "train", rc.data.train_sequences)
  info: Dict[str, Any] = {}
  source = tokens
  if rc.mode == "topk":
    info = ensure_topk_cache(rc, teacher, tv, tokens, place)
    source = text_lib.ZipSource(tokens, text_lib.TopkCacheSource(
        cache_dir(rc), "train", rc.topk.k))
  try:
    ds = text_lib.lm_dataset(source, batch_size=rc.data.batch_size,
                             seed=rc.seed)
  except ValueError as e:
    raise ConfigError("data.batch_size", str(e)) from None
  return ds, info


def eval_batches(rc: LMRunConfig, split: str) -> List[Dict[str, np.ndarray]]:
  """Fixed-shape batches of a held-out split (the last one padded with
  masked rows)."""
  src = _source(rc, split, rc.data.eval_sequences)
  b, out = rc.data.eval_batch_size, []
  for lo in range(0, len(src), b):
    rows = np.stack([np.asarray(src[i]["tokens"], np.int32)
                     for i in range(lo, min(lo + b, len(src)))])
    mask = np.ones(rows.shape, bool)
    pad = b - len(rows)
    if pad:
      rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.int32)])
      mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    out.append({"tokens": rows, "mask": mask})
  return out


def evaluate(eval_fn, variables, batches, fetch=jax.device_get
             ) -> Dict[str, Dict[str, float]]:
  """Perplexity per split (`batches`: the step inputs of each split)."""
  return {s: lm_steps.perplexity(fetch([eval_fn(variables, b) for b in bs]))
          for s, bs in batches.items()}


# ---------------------------------------------------------------------------
# The loop.


def _host_tree(state):
  """The checkpointed tree of a train state (PRNG keys as key data)."""
  def get(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                   jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return checkpointing.state_to_tree(jax.tree.map(get, state))


def _resume(mgr, state, workdir: str, place: Placement):
  if mgr is None:
    return state, 0
  impl = jax.random.key_impl(state.rng)
  restored = checkpointing.restore_newest(mgr, place.restore_template(state))
  if restored is None:
    return state, 0
  if jax.process_index() == 0:
    print(f"resumed from step {restored.step} ({workdir})", flush=True)
  tree = (jax.device_get(restored.state) if place.dp is None
          else restored.state)  # a mesh restores into the shards
  return checkpointing.tree_to_state(tree, impl), int(restored.step)


def _eval_record(res) -> Dict[str, float]:
  rec = {}
  for split, r in res.items():
    rec[f"{split}_ppl"], rec[f"{split}_nll"] = r["perplexity"], r["nll"]
    rec[f"{split}_token_acc"] = r["token_acc"]
  return rec


class _Timer:
  """Train-loop time (step calls only, not evaluation or checkpoints):
  total, and the first call (compilation) timed on its own."""

  def __init__(self):
    self.total = self.first = 0.0
    self.calls = 0

  def add(self, seconds: float, calls: int):
    if self.calls == 0 and calls:
      self.first = seconds
    self.total += seconds
    self.calls += calls


def _loop(rc, run, state, tv, start, writer, mgr):
  """Steps ``start..rc.steps``: train records every ``log_every``, held-out
  perplexity and a checkpoint every ``eval_every`` steps."""
  place, evals, timer = run.place, [], _Timer()
  group: List[Dict[str, Any]] = []
  t = time.perf_counter()
  n_since = 0
  for step in range(start, rc.steps):
    state, m = run.step(state, tv, place.batch(run.ds[step]))
    group.append(m)
    n_since += 1
    done = step + 1
    if timer.calls == 0:  # the compiling call, timed alone
      jax.block_until_ready(m)
      timer.add(time.perf_counter() - t, 1)
      n_since, t = 0, time.perf_counter()
    if done % rc.log_every == 0 or done % rc.eval_every == 0 or \
        done == rc.steps:
      group = place.fetch(group)
      if n_since:
        timer.add(time.perf_counter() - t, n_since)
      n_since = 0
      rec = {k: float(np.mean([g[k] for g in group])) for k in group[0]}
      writer.write(done, rec, split="train")
      group = []
      if done % rc.eval_every == 0 or done == rc.steps:
        rec = _eval_record(evaluate(run.eval, state.variables,
                                    run.eval_batches, place.fetch))
        writer.write(done, rec, split="eval")
        evals.append(dict(rec, step=done))
        if jax.process_index() == 0:
          print(f"  step {done}/{rc.steps}: " + ", ".join(
              f"{k} {v:.2f}" for k, v in rec.items() if k.endswith("_ppl")),
                flush=True)
        if mgr is not None:
          mgr.save(done, place.checkpoint_tree(state),
                   data_state={"step": done}, force=True)
      t = time.perf_counter()
  return state, evals, timer


@dataclasses.dataclass
class _Run:
  """What the loop of one phase uses."""
  place: Placement
  student: Any
  teacher: Any
  step: Any                     # step(state, teacher_variables, batch)
  eval: Any                     # eval_step(variables, batch)
  ds: Any = None                # ds[step]: the global host batch
  eval_batches: Any = None      # {split: [step inputs]}


def _prepare(rc: LMRunConfig):
  """Models, placement, teacher variables (placed), the initial host state
  and the compiled train / eval steps."""
  student, s_vars = build_model(rc.student, rc, "student")
  teacher = t_vars = tv = None
  if rc.teacher is not None:
    teacher, t_vars = build_model(rc.teacher, rc, "teacher")
    _check_vocab(rc, student, teacher)
  place = make_placement(rc, student, teacher)
  if teacher is not None:
    tv = teacher_variables(rc, teacher, t_vars, place)
  if s_vars is None:
    s_vars = _init_variables(student, rc.seed)
  tx = make_optimizer(rc)
  state = create_train_state(s_vars, tx, rng=jax.random.key(rc.seed + 1))
  run = _Run(place=place, student=student, teacher=teacher,
             step=place.compile(make_step(rc, student, teacher, tx)),
             eval=place.compile(lm_steps.make_lm_eval_step(student),
                                donate=False))
  return run, state, tv


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> Dict[str, Any]:
  """Runs one LM phase; returns (and writes ``report.json``) its report.

  With several processes every process runs it (each feeds its rows of
  every batch); only process 0 writes ``config.json``, metrics, the top-k
  cache and the report (checkpoints: each process its shards).
  """
  t0 = time.perf_counter()
  rc = parse(config)
  main = jax.process_index() == 0
  prepare_workdir(workdir, rc.config_json if main else None)
  run, state, tv = _prepare(rc)
  place = run.place
  run.ds, cache_info = train_dataset(rc, run.teacher, tv, place)
  run.eval_batches = {s: [place.batch(b) for b in eval_batches(rc, s)]
                      for s in rc.data.eval_splits}
  mgr = (ckpt_lib.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      keep_last=max(rc.checkpoint_keep, 1), keep_best=0, async_save=False)
         if rc.checkpoint_enabled else None)
  try:
    state, start = _resume(mgr, state, workdir, place)
    state = place.state(state)
    memory = place.memory(state, tv)
    writer = (metrics_io.MetricsWriter(workdir, tensorboard=True,
                                       resume_step=start if start else None)
              if main else NullWriter())
    old = [r for r in metrics_io.read_jsonl(writer.path)
           if r.get("split") == "eval"] if main else []
    t_train = time.perf_counter()
    state, evals, timer = _loop(rc, run, state, tv, start, writer, mgr)
    train_s = time.perf_counter() - t_train
    writer.close()
  finally:
    if mgr is not None:
      mgr.close()
  evals = [dict(r) for r in old] + evals
  report = _report(rc, run.student, run.teacher, evals, timer, start,
                   dict(cache_info, train_s=train_s,
                        wall_s=time.perf_counter() - t0,
                        mesh=dict(mesh_spec(rc.mesh)) or None, memory=memory,
                        num_processes=jax.process_count(),
                        num_devices=(place.dp.num_devices if place.dp
                                     else 1)))
  if main:
    metrics_io.write_json(os.path.join(workdir, "report.json"), report)
  mesh_lib.barrier(f"lm phase done {workdir}")  # its files are there
  return report


def _report(rc, student, teacher, evals, timer, start, extra):
  tok = rc.data.batch_size * (rc.data.seq_len - 1)
  first = rc.data.eval_splits[0]
  best = min(evals, key=lambda r: r[f"{first}_ppl"]) if evals else {}
  last = evals[-1] if evals else {}
  steady = ((timer.calls - 1) * tok / (timer.total - timer.first)
            if timer.calls > 1 and timer.total > timer.first else None)
  rep = {"task": "lm", "mode": rc.mode, "finished": True, "steps": rc.steps,
         "resumed_from": start,
         "model": rc.student.preset or rc.student.hf_dir,
         "model_params": student.config.num_params,
         "teacher": (rc.teacher.preset or rc.teacher.hf_dir)
         if rc.teacher else None,
         "teacher_params": teacher.config.num_params if teacher else None,
         "batch_size": rc.data.batch_size, "seq_len": rc.data.seq_len,
         "tokens_per_step": tok, "best_step": best.get("step"),
         "tokens_per_sec": (timer.calls * tok / timer.total
                            if timer.total else None),
         "steady_tokens_per_sec": steady}
  for s in rc.data.eval_splits:
    rep[f"last_{s}_ppl"] = last.get(f"{s}_ppl")
    rep[f"best_{s}_ppl"] = best.get(f"{s}_ppl")
  rep.update(extra)
  return rep
