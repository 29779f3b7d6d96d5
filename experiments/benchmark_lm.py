"""Throughput of the LM steps: tokens/s per phase, to size LM experiments.

Rows (synthetic tokens: speed does not depend on the text):
* ``train``: next-token NLL step of the teacher (`make_lm_train_step`);
* ``token_kd``: teacher-forced token KD (`make_lm_distill_step`, forward KL);
* ``topk``: offline KD from a cached top-k teacher (needs
  ``kd_jax.losses.topk_kd_loss``; skipped otherwise);
* ``gkd``: on-policy GKD with ``lmbda=1`` (student sampling
  ``--new_tokens`` tokens inside the step, then JSD on them);
* ``generate``: `kd_jax.models.lm.generate` alone (new tokens/s).

Each row: compile once, then ``--repeats`` timed calls (``block_until_ready``);
tokens/s counts trained (or generated) tokens.

Usage:
  python experiments/benchmark_lm.py [--teacher llama_5m] [--student llama_1m]
      [--vocab_size 4096] [--batch_size 32] [--seq_len 128] [--new_tokens 32]
      [--repeats 5] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax.models import lm
from kd_jax.train import create_train_state
from kd_jax.train import lm_steps


def _time(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm-up
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher", default="llama_5m")
  p.add_argument("--student", default="llama_1m")
  p.add_argument("--vocab_size", type=int, default=4096)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--dtype", default="bfloat16",
                 choices=["bfloat16", "float32"])
  args = p.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  b, length = args.batch_size, args.seq_len
  mk = lambda name: lm.Transformer(lm.preset_config(  # noqa: E731
      name, vocab_size=args.vocab_size, max_position_embeddings=length),
                                   dtype=dtype)
  teacher, student = mk(args.teacher), mk(args.student)
  x = jnp.zeros((1, 8), jnp.int32)
  tv = nn.unbox(teacher.init(jax.random.key(0), x))
  sv = nn.unbox(student.init(jax.random.key(1), x))
  tx = optax.adamw(1e-3)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      2, args.vocab_size, (b, length)), jnp.int32)
  batch = {"tokens": tokens}
  trained = b * (length - 1)
  prompt_len = length - args.new_tokens
  rows = []

  t_state = create_train_state(tv, tx, rng=jax.random.key(2))
  s_state = create_train_state(sv, tx, rng=jax.random.key(3))
  train = jax.jit(lm_steps.make_lm_train_step(teacher, tx))
  rows.append(("train (teacher NLL)", trained,
               _time(lambda: train(t_state, batch), args.repeats)))
  kd = jax.jit(lm_steps.make_lm_distill_step(student, teacher, tx))
  rows.append(("token_kd (forward KL)", trained,
               _time(lambda: kd(s_state, tv, batch), args.repeats)))
  try:
    topk = jax.jit(lm_steps.make_lm_topk_step(student, tx))
    lp, idx = jax.jit(lm_steps.make_teacher_topk_fn(teacher, k=32))(
        tv, tokens)
    tb = dict(batch, teacher_topk_logprobs=lp.astype(jnp.bfloat16),
              teacher_topk_indices=idx)
    rows.append(("topk (k=32, cached teacher)", trained,
                 _time(lambda: topk(s_state, tb), args.repeats)))
  except ValueError as e:
    print(f"topk row skipped: {e}")
  gen = lm.make_generate_fn(student, max_new_tokens=args.new_tokens,
                            temperature=0.9)
  gkd = jax.jit(lm_steps.make_gkd_step(
      student, teacher, tx, student_generate=gen, prompt_len=prompt_len,
      lmbda=1.0))
  rows.append((f"gkd (lmbda=1, {args.new_tokens} sampled tokens)",
               b * args.new_tokens,
               _time(lambda: gkd(s_state, tv, batch), args.repeats)))
  for name, model, v in (("student", student, sv), ("teacher", teacher, tv)):
    g = jax.jit(lm.make_generate_fn(model, max_new_tokens=args.new_tokens,
                                    temperature=0.9))
    prompts = tokens[:, :prompt_len]
    rows.append((f"generate ({name}, {args.new_tokens} new tokens)",
                 b * args.new_tokens,
                 _time(lambda g=g, v=v: g(v, prompts, jax.random.key(4)),
                       args.repeats)))

  print(f"\nteacher {args.teacher} ({teacher.config.num_params / 1e6:.2f}M), "
        f"student {args.student} ({student.config.num_params / 1e6:.2f}M), "
        f"V={args.vocab_size}, batch {b} x {length}, {args.dtype}, "
        f"{jax.devices()[0].platform}\n")
  print("| phase | s/step | tokens/s |")
  print("|---|---:|---:|")
  for name, n, sec in rows:
    print(f"| {name} | {sec:.3f} | {n / sec:,.0f} |")


if __name__ == "__main__":
  main()
