"""Shared inputs of the cross-tokenizer tests: real tokenizers, real text.

``tests/data/austen_excerpt.json.gz`` holds the first 150 k characters of
*Pride and Prejudice* (a train-split novel of the project's corpus) and the
first 12 k of *Persuasion* (its test split), read from the Debian package
``r-cran-janeaustenr`` with ``experiments/prepare_corpus.austen_novels``
(public-domain texts; the package is not available in CI). Three tokenizers
are trained on the excerpt with ``kd_jax.data.text.train_bpe_tokenizer``
(about 0.1 s each):

* ``bpe2k``: byte-level BPE, 2,048 ids (the project's tokenizer kind);
* ``meta4k``: metaspace (SentencePiece-style) BPE with byte fallback, 4,096;
* ``bytes``: byte-level without merges (258 ids: one token per byte).
"""

import functools
import gzip
import json
import os

import numpy as np

from kd_jax.data import text as text_lib

DATA = os.path.join(os.path.dirname(__file__), "data",
                    "austen_excerpt.json.gz")
TOKENIZERS = {"bpe2k": (2048, "byte_level"), "meta4k": (4096, "metaspace"),
              "bytes": (258, "byte_level")}
# Characters the corpus hardly has (it is ASCII but for one pound sign):
# multi-byte UTF-8, byte-fallback pieces, repeated spaces, newlines.
UNICODE_TEXT = ("Sir Walter paid \u00a35  for  it; na\u00efve "
                "\u201ccaf\u00e9\u201d \U0001F600 \u2014 done.\n\nNext line.")


@functools.lru_cache(maxsize=None)
def excerpt() -> dict:
  with gzip.open(DATA, "rt", encoding="utf-8") as fh:
    return json.load(fh)


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
  vocab_size, pre = TOKENIZERS[name]
  return text_lib.train_bpe_tokenizer([excerpt()["train"]],
                                      vocab_size=vocab_size,
                                      pre_tokenizer=pre)


def heldout_paragraphs(n: int = 6, max_chars: int = 600) -> list:
  paras = [p for p in excerpt()["heldout"].split("\n") if len(p) > 40]
  return [p[:max_chars] for p in paras[:n]]


def windows(name: str, length: int, count: int, *, seed: int = 0):
  """``[count, length]`` windows of the held-out token stream (EOT between
  paragraphs, as the corpus pipeline packs documents)."""
  tok = tokenizer(name)
  eos = text_lib.special_ids(tok)["eos_id"]
  docs = excerpt()["heldout"].split("\n") + [UNICODE_TEXT]
  stream = text_lib.encode_documents(tok, docs, eos_id=eos)
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(stream) - length, size=count)
  return np.stack([stream[s:s + length] for s in starts]).astype(np.int32)
