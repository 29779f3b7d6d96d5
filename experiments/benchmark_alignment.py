"""Cross-tokenizer alignment on the corpus: statistics, host cost, loss cost.

For a student tokenizer (by default the prepared Jane Austen dataset's
byte-level BPE) and teacher tokenizers trained on the same train split
(metaspace BPE, byte-level BPE of another size, bytes), the held-out split
is packed into student windows as the LM trainer reads them, and every
window is re-tokenized for each teacher (`kd_jax.data.align`). Prints:

1. alignment statistics per teacher: teacher tokens per window (mean / 99th
   percentile / max: choose ``teacher_len``), scored groups per window, the
   share of one-to-one groups and of groups with several student / teacher
   tokens, bits-per-byte denominators;
2. host CPU time of `Aligner.align_batch` per batch (what an on-policy step
   adds on the host);
3. the jitted cost of the losses per batch (value + gradient w.r.t. the
   student logits): `forward_kl` on one vocabulary as the baseline,
   `uld_loss`, `extended_uld_loss` and its hybrid, CPU time per call.

Usage:
  python experiments/benchmark_alignment.py \
      [--data /work/baseline/lm_data/jane_austen_v2048_s64/1.0.0] \
      [--source r-cran-janeaustenr_1.0.0-1_all.deb] [--batch 64] [--windows 512]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _teachers(train_docs, specs):
  from kd_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for spec in specs:
    pre, size = spec.split(":")
    out[spec] = text_lib.train_bpe_tokenizer(train_docs, vocab_size=int(size),
                                             pre_tokenizer=pre)
  return out


def _stats(aligner, windows, batch):
  from kd_jax.data import align  # pylint: disable=g-import-not-at-top
  n_t, scored, one, s_multi, t_multi = [], [], 0, 0, 0
  for row in windows:
    al = aligner.align(row)
    n_t.append(len(al.teacher_ids))
    ok = [(len(s), len(t)) for s, t, trained in al.groups if trained]
    scored.append(len(ok))
    one += sum(1 for s, t in ok if s == t == 1)
    s_multi += sum(1 for s, _ in ok if s > 1)
    t_multi += sum(1 for _, t in ok if t > 1)
  total = max(1, sum(scored))
  t_len = align.teacher_length_for(aligner, windows[:batch], quantile=1.0)
  cpu = time.process_time()
  wall = time.perf_counter()
  reps = max(1, len(windows) // batch)
  for i in range(reps):
    aligner.align_batch(windows[i * batch:(i + 1) * batch],
                        teacher_len=int(np.max(n_t)) + 1)
  cpu = (time.process_time() - cpu) / reps
  wall = (time.perf_counter() - wall) / reps
  return {"teacher tokens mean": np.mean(n_t),
          "p99": np.percentile(n_t, 99), "max": np.max(n_t),
          "scored groups / window": np.mean(scored),
          "1:1 groups %": 100 * one / total,
          ">1 student tok %": 100 * s_multi / total,
          ">1 teacher tok %": 100 * t_multi / total,
          "align_batch CPU ms": 1e3 * cpu, "wall ms": 1e3 * wall,
          "t_len(batch 0)": t_len}


def _loss_timings(aligner, windows, by_bytes, reps=5):
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from kd_jax import losses
  from kd_jax.data import align
  # pylint: enable=g-import-not-at-top
  t_len = int(max(len(aligner.align(r).teacher_ids) for r in windows)) + 1
  out = aligner.align_batch(windows, teacher_len=t_len)
  rng = np.random.default_rng(0)
  b, ls = windows.shape
  vs, vt = aligner.student.vocab_size, aligner.teacher.vocab_size
  s = jnp.asarray(rng.standard_normal((b, ls - 1, vs)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((b, t_len - 1, vt)), jnp.float32)
  same = jnp.asarray(rng.standard_normal((b, ls - 1, vs)), jnp.float32)
  al = losses.TokenAlignment.from_batch(out)
  ids = align.vocab_mapping(aligner.student_tokenizer,
                            aligner.teacher_tokenizer, by=by_bytes)
  ids = tuple(jnp.asarray(x) for x in ids)
  st, tt = jnp.asarray(windows[:, 1:]), jnp.asarray(out["teacher_tokens"][:,
                                                                           1:])
  n = min(ls, t_len) - 1  # positional: the first n rows of both
  fns = {
      "forward_kl (same vocab)": lambda x, y: losses.forward_kl(x, y),
      "uld_loss (positional)": lambda x, y: losses.uld_loss(
          x[:, :n], y[:, :n]),
      "extended_uld_loss": lambda x, y: losses.extended_uld_loss(
          x, y, st, tt, al),
      f"extended hybrid (by {by_bytes})": lambda x, y: losses.extended_uld_loss(
          x, y, st, tt, al, matched_ids=ids),
  }
  rows = {}
  for name, fn in fns.items():
    y = same if name.startswith("forward_kl") else t
    g = jax.jit(jax.value_and_grad(lambda x, y, fn=fn: jnp.sum(fn(x, y))))
    jax.block_until_ready(g(s, y))
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(reps):
      jax.block_until_ready(g(s, y))
    rows[name] = (1e3 * (time.process_time() - cpu) / reps,
                  1e3 * (time.perf_counter() - wall) / reps)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data",
                 default="/work/baseline/lm_data/jane_austen_v2048_s64/1.0.0")
  p.add_argument("--source", default=None, help="the janeaustenr .deb / dir "
                 "(train split for the teachers' tokenizers)")
  p.add_argument("--teachers", nargs="*",
                 default=["metaspace:4096", "byte_level:4096",
                          "byte_level:258"])
  p.add_argument("--windows", type=int, default=512)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--loss_batch", type=int, default=8)
  args = p.parse_args(argv)
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from experiments import prepare_corpus
  from kd_jax.data import align
  from kd_jax.data import text as text_lib
  # pylint: enable=g-import-not-at-top
  student = tokenizers.Tokenizer.from_file(os.path.join(args.data,
                                                        "tokenizer.json"))
  with open(os.path.join(args.data, text_lib.METADATA_FILE)) as fh:
    meta = json.load(fh)
  novels = prepare_corpus.austen_novels(args.source or
                                        prepare_corpus.DEFAULT_SOURCE)
  train = [novels[t] for t in prepare_corpus.AUSTEN_SPLITS["train"]]
  src, _ = text_lib.load_tfds_tokens(args.data, "validation")
  n = min(args.windows, len(src))
  windows = np.stack([src[i]["tokens"] for i in range(n)]).astype(np.int32)
  print(f"student: {args.data} (vocab {meta['vocab_size']}, windows of "
        f"{windows.shape[1]} tokens), {n} validation windows; load "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
  teachers = _teachers(train, args.teachers)
  table = {}
  for name, tok in teachers.items():
    aligner = align.Aligner(student, tok)
    aligner.student_tokenizer, aligner.teacher_tokenizer = student, tok
    table[name] = (_stats(aligner, windows, args.batch),
                   _loss_timings(aligner, windows[:args.loss_batch],
                                 "bytes"))
  keys = list(next(iter(table.values()))[0])
  print("\n| teacher | " + " | ".join(keys) + " |")
  print("|---" * (len(keys) + 1) + "|")
  for name, (st, _) in table.items():
    print(f"| {name} | " + " | ".join(
        f"{st[k]:.1f}" if isinstance(st[k], float) else str(st[k])
        for k in keys) + " |")
  print(f"\nloss value+grad per call, batch {args.loss_batch} x "
        f"{windows.shape[1] - 1} student rows (CPU ms / wall ms):")
  print("| teacher | " + " | ".join(next(iter(table.values()))[1]) + " |")
  print("|---" * (len(next(iter(table.values()))[1]) + 1) + "|")
  for name, (_, lt) in table.items():
    print(f"| {name} | " + " | ".join(f"{c:.1f} / {w:.1f}"
                                      for c, w in lt.values()) + " |")
  print(f"\nload at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
