"""Runs a teacher once over a prepared text dataset and caches its top-k.

For every sequence of each split of a dataset written by
``experiments/prepare_corpus.py`` (``data_dir/name/version``), the teacher's
k largest log-probabilities per predicted token (``log_softmax(z / T)``,
stored as bfloat16) and their indices (int32) are written next to the data
(``teacher_topk_k{k}-{split}.array_record`` + ``.json``), in the split's
order; training reads them with ``kd_jax.data.text.TopkCacheSource`` zipped
with the token split and ``kd_jax.train.lm_steps.make_lm_topk_step``.

Prints the cache size per token for each k against storing the full
vocabulary (bfloat16 / float32 logits).

The teacher is a Hugging Face Llama/Qwen2 folder (``--hf_dir``) or a
kd_jax LM run directory (``--run_dir``: a run of the LM trainer, e.g. the
seed experiment's ``WORKDIR/seed0/teacher``; its newest checkpoint, read as
`experiments/export_hf.py` does). The dataset's token ids must fit the
teacher's vocabulary (a run's dataset must use the same tokenizer), else one
line says why and nothing is written. Any other teacher goes through
`cache_split` from Python.

Usage:
  python experiments/cache_teacher.py --dataset DIR/jane_austen/1.0.0 \
      (--hf_dir TEACHER_DIR | --run_dir RUN_DIR) [--k 8 32 128] \
      [--splits train] [--temperature 1.0] [--batch_size 32]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import time

import jax
import numpy as np

from kd_jax.data import text as text_lib
from kd_jax.train import lm_steps

try:  # run as a module (python -m experiments.cache_teacher) or a script
  from experiments import export_hf
except ImportError:  # pragma: no cover
  import export_hf  # type: ignore


def cache_split(topk_fn, variables, folder: str, split: str, k: int, *,
                batch_size: int = 32, metadata=None,
                vocab_size=None) -> dict:
  """Writes the top-k cache of one split; returns size / speed figures.

  `topk_fn(variables, tokens [B, L]) -> (logprobs, indices)` ``[B, L-1,
  k]`` (`lm_steps.make_teacher_topk_fn`); it is jitted here. With
  `vocab_size` (the teacher's), every batch's ids are checked on the host
  before it is sent (an out-of-range id is a ValueError naming it).
  """
  source, meta = text_lib.load_tfds_tokens(folder, split)
  if vocab_size is not None:
    check_vocabulary(folder, meta, vocab_size)
  fn = jax.jit(topk_fn)
  writer = text_lib.TopkCacheWriter(folder, split, k, metadata=dict(
      metadata or {}, split=split, seq_len=meta["seq_len"]))
  n, start = len(source), time.perf_counter()
  for lo in range(0, n, batch_size):
    rows = [source[i]["tokens"] for i in range(lo, min(lo + batch_size, n))]
    tokens = np.stack(rows).astype(np.int32)
    if vocab_size is not None and (tokens.min() < 0
                                   or tokens.max() >= vocab_size):
      bad = int(tokens.max() if tokens.max() >= vocab_size else tokens.min())
      raise ValueError(f"{folder} split {split!r} holds token id {bad}, "
                       f"outside the teacher's vocabulary [0, {vocab_size})")
    pad = batch_size - len(rows)  # one compiled shape: pad the last batch
    if pad:
      tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
    lp, idx = jax.device_get(fn(variables, tokens))
    writer.write(lp[:len(rows)], idx[:len(rows)])
  path = writer.close()
  seconds = time.perf_counter() - start
  tokens_cached = n * (meta["seq_len"] - 1)
  return {"split": split, "k": k, "path": path, "sequences": n,
          "tokens": tokens_cached, "seconds": seconds,
          "bytes_per_token": text_lib.topk_bytes_per_token(k)}


def check_vocabulary(folder: str, meta: dict, vocab_size: int) -> None:
  """Error if the dataset's vocabulary (its ``kd_jax_text.json`` size, or
  its ``tokenizer.json``) is larger than the teacher's `vocab_size`."""
  n = meta.get("vocab_size")
  tok = os.path.join(folder, text_lib.TOKENIZER_FILE)
  if n is None and os.path.isfile(tok):
    from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
    n = lm.load_tokenizer(tok).get_vocab_size(with_added_tokens=True)
  if n is not None and n > vocab_size:
    raise ValueError(f"dataset {folder} has a {n}-token vocabulary but the "
                     f"teacher's vocab_size is {vocab_size}; cache with a "
                     "teacher trained on this dataset's tokenizer")


def load_teacher(args):
  """``(model, variables, description)`` of ``--hf_dir`` / ``--run_dir``."""
  from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
  if args.hf_dir:
    model, variables, _ = lm.load_hf_folder(args.hf_dir)
    return model, variables, args.hf_dir
  model, variables, folder = export_hf.load_lm_run(args.run_dir)
  mine = os.path.join(folder, text_lib.TOKENIZER_FILE)
  theirs = os.path.join(args.dataset, text_lib.TOKENIZER_FILE)
  if (os.path.isfile(mine) and os.path.isfile(theirs)
      and not filecmp.cmp(mine, theirs, shallow=False)):
    raise ValueError(f"the teacher run {args.run_dir} was trained on {folder}"
                     f", whose tokenizer differs from {args.dataset}'s")
  return model, variables, args.run_dir


def size_table(ks, vocab_size: int) -> str:
  """Markdown table: bytes per token of each k vs the full vocabulary."""
  lines = ["| stored per token | bytes/token | vs full bf16 |",
           "|---|---:|---:|"]
  full = 2 * vocab_size
  for k in ks:
    b = text_lib.topk_bytes_per_token(k)
    lines.append(f"| top-{k} (bf16 log-prob + int32 index) | {b} | "
                 f"{b / full:.4f} |")
  lines.append(f"| full vocabulary V={vocab_size}, bf16 | {full} | 1 |")
  lines.append(f"| full vocabulary V={vocab_size}, float32 | "
               f"{4 * vocab_size} | 2 |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True,
                 help="data_dir/name/version of a prepared text dataset")
  who = p.add_mutually_exclusive_group(required=True)
  who.add_argument("--hf_dir", help="teacher: a Hugging Face folder")
  who.add_argument("--run_dir", help="teacher: a kd_jax LM run directory")
  p.add_argument("--k", type=int, nargs="+", default=[8, 32, 128])
  p.add_argument("--splits", nargs="+", default=["train"])
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--batch_size", type=int, default=32)
  args = p.parse_args(argv)
  try:
    model, variables, teacher = load_teacher(args)
    for split in args.splits:
      for k in args.k:
        fn = lm_steps.make_teacher_topk_fn(model, k=k,
                                           temperature=args.temperature)
        r = cache_split(fn, variables, args.dataset, split, k,
                        batch_size=args.batch_size,
                        metadata={"teacher": teacher,
                                  "temperature": args.temperature},
                        vocab_size=model.config.vocab_size)
        print(f"{split} k={k}: {r['tokens']} tokens in {r['seconds']:.1f}s "
              f"({r['tokens'] / r['seconds']:.0f} tokens/s) -> {r['path']}")
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"cache_teacher: {e}")
  print(size_table(args.k, model.config.vocab_size))


if __name__ == "__main__":
  main()
