"""A language-model run's data: the packed training sequences (grain, batch
``step`` = ``ds[step]``, so a resumed run sees the same batches), held-out
batches for perplexity, and the teacher's top-k cache.

The cache (`ensure_topk_cache`): the teacher's top-k log-probabilities of
the training sequences it will see (bf16 log-probs + int32 indices,
`kd_jax.data.text.TopkCacheWriter`), written once -- unless a cache with the
same k, temperature and sequences is there -- and read back through grain
zipped with the tokens. With several processes all of them run the
(sharded) teacher and process 0 writes the files.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List

import jax
import numpy as np

from kd_jax import metrics_io
from kd_jax.data import text as text_lib
from kd_jax.train import lm_steps
from kd_jax.trainer import loop
from kd_jax.trainer.errors import ConfigError


class Prefix:
  """The first `n` items of a random-access source (all when `n` is 0)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source)) if n else len(source)

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


def source(rc, split: str, n: int) -> Prefix:
  src, _ = text_lib.load_tfds_tokens(rc.data.folder, split)
  return Prefix(src, n)


def cache_dir(rc) -> str:
  t = rc.teacher
  return t.cache_dir or os.path.join(t.checkpoint or t.hf_dir, "topk_cache")


def cache_temperature(rc) -> float:
  """The temperature of the cached log-softmax: the top-k term's."""
  spec = next(s for s in rc.loss.terms if s.kind == "loss")
  return float(dict(spec.hparams).get("temperature", 1.0))


def _usable_cache(folder: str, k: int, want: Dict[str, Any], n: int) -> bool:
  """Whether a matching cache is there; a damaged one (unreadable metadata
  or records) is set aside with one warning (then rebuilt)."""
  try:
    src = text_lib.TopkCacheSource(folder, "train", k)
    meta = src.metadata
    if len(src) == n:
      src[0], src[n - 1]  # pylint: disable=pointless-statement
  except FileNotFoundError:
    return False
  except Exception as e:  # pylint: disable=broad-except
    if loop.is_main():
      moved = metrics_io.set_aside(folder)
      logging.warning("teacher top-k cache %s is damaged (%s); moved to %s and "
                      "rebuilt.", folder, type(e).__name__, moved)
    return False
  return all(meta.get(a) == b for a, b in want.items())


def ensure_topk_cache(rc, teacher, tv, tokens, placement) -> Dict[str, Any]:
  """Writes the teacher's top-k cache of `tokens` (a source) unless a
  matching one is there; returns its figures (``cache_s`` 0 when reused)."""
  folder, k, temp = cache_dir(rc), rc.teacher.topk, cache_temperature(rc)
  want = {"num_sequences": len(tokens), "temperature": temp,
          "length": rc.data.seq_len - 1}
  reuse = _usable_cache(folder, k, want, len(tokens))
  loop.barrier(f"topk cache checked {folder}")  # before it is rewritten
  if reuse:
    return {"cache_s": 0.0, "cache_reused": True, "cache_dir": folder}
  start = time.perf_counter()
  fn = placement.compile(lm_steps.make_teacher_topk_fn(
      teacher, k=k, temperature=temp), donate_state=False)
  writer = None
  if loop.is_main():
    os.makedirs(folder, exist_ok=True)
    writer = text_lib.TopkCacheWriter(folder, "train", k, metadata={
        "temperature": temp,
        "teacher": rc.teacher.checkpoint or rc.teacher.hf_dir})
  b, n = rc.train.eval_batch_size, len(tokens)
  for lo in range(0, n, b):
    rows = np.stack([tokens[i]["tokens"] for i in range(lo, min(lo + b, n))])
    pad = b - len(rows)  # one compiled shape
    x = np.concatenate([rows, np.repeat(rows[-1:], pad, 0)]) if pad else rows
    lp, idx = placement.fetch(fn(tv, shard(placement, x.astype(np.int32))))
    if writer is not None:
      writer.write(lp[:len(rows)], idx[:len(rows)])
  if writer is not None:
    writer.close()
  loop.barrier(f"topk cache written {folder}")  # the others read it next
  return {"cache_s": time.perf_counter() - start, "cache_reused": False,
          "cache_dir": folder,
          "cache_bytes_per_token": text_lib.topk_bytes_per_token(k)}


def shard(placement, host_batch, stacked: bool = False):
  """A global host batch -> the step's input (this process's rows)."""
  if stacked:
    rows = jax.tree.map(lambda x: np.swapaxes(x, 0, 1), host_batch)
    rows = placement.local_rows(rows)
    local = jax.tree.map(lambda x: np.swapaxes(x, 0, 1), rows)
  else:
    local = placement.local_rows(host_batch)
  return placement.shard_batch(local, stacked=stacked)


def train_dataset(rc, teacher=None, tv=None, placement=None):
  """(grain dataset: ``ds[step]`` is the step's global batch, cache
  figures)."""
  tokens = source(rc, "train", rc.data.train_sequences)
  info: Dict[str, Any] = {}
  src = tokens
  if rc.teacher is not None and rc.teacher.precompute:
    info = ensure_topk_cache(rc, teacher, tv, tokens, placement)
    src = text_lib.ZipSource(tokens, text_lib.TopkCacheSource(
        cache_dir(rc), "train", rc.teacher.topk))
  try:
    ds = text_lib.lm_dataset(src, batch_size=rc.train.batch_size,
                             seed=rc.seed)
  except ValueError as e:
    raise ConfigError("train.batch_size", str(e)) from None
  return ds, info


def eval_batches(rc, split: str) -> List[Dict[str, np.ndarray]]:
  """Fixed-shape batches of a held-out split (the last one padded with
  masked rows)."""
  src = source(rc, split, rc.data.eval_sequences)
  b, out = rc.train.eval_batch_size, []
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
