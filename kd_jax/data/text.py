"""Text corpora for language modelling: tokenizer, packing, TFDS, grain.

The pipeline, for any text (a prepared corpus, plain ``.txt`` files or a
user's TFDS text dataset):

1. documents (`documents_from_files`, `documents_from_tfds`, or a list of
   strings) -> `train_bpe_tokenizer` on the training split only (byte-level
   BPE with the ``tokenizers`` package, saved as ``tokenizer.json``);
2. `encode_documents`: one int32 token stream per split, each document
   followed by the end-of-text id;
3. `pack_stream`: the stream cut into fixed-length ``[N, seq_len]``
   sequences (no padding; a sequence may span a document boundary, after an
   end-of-text token, as in GPT-2-style packing; the incomplete tail is
   dropped);
4. `write_tfds_tokens`: the packed splits as a TFDS ``array_record`` dataset
   (feature ``tokens``: int32 ``[seq_len]``), written with TFDS's own
   serializer and metadata, readable with ``tfds.data_source`` -- no
   TensorFlow needed, as the MNIST data;
5. `lm_dataset`: a grain ``MapDataset`` of ``{"tokens": int32 [batch,
   seq_len]}`` batches over a TFDS data source or an in-memory array,
   shuffled per epoch from a seed; ``dataset[step]`` is the batch of a global
   step (random access: exact resume from a step number).
6. offline teacher cache: `TopkCacheWriter` stores a teacher's top-k
   log-probabilities (bfloat16) and indices (int32) per token next to the
   dataset, `TopkCacheSource` reads them back, `ZipSource` pairs them with
   the token split so `lm_dataset` batches both.

A language model trains on ``tokens[:, :-1]`` to predict ``tokens[:, 1:]``.

References: Sennrich et al., "Neural Machine Translation of Rare Words with
Subword Units" (BPE), ACL 2016; Radford et al., "Language Models are
Unsupervised Multitask Learners" (byte-level BPE, packing), 2019.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

PAD_TOKEN = "<|pad|>"
EOT_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOT_TOKEN)  # ids 0 and 1
METADATA_FILE = "kd_jax_text.json"
TOKENIZER_FILE = "tokenizer.json"


def documents_from_files(paths: Sequence[str]) -> list:
  """One document per UTF-8 text file (errors name the file)."""
  docs = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"text file not found: {path}")
    with open(path, encoding="utf-8") as fh:
      docs.append(fh.read())
  return docs


def documents_from_tfds(name: str, split: str, *, data_dir=None,
                        key: str = "text") -> list:
  """The `key` feature (bytes or str) of every example of a TFDS split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tfds.data_source(name, split=split, data_dir=data_dir)
  docs = []
  for i in range(len(source)):
    value = source[i][key]
    docs.append(value.decode("utf-8") if isinstance(value, bytes) else
                str(value))
  return docs


PRE_TOKENIZERS = ("byte_level", "metaspace")
METASPACE = "\u2581"  # the SentencePiece word-boundary mark


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int,
                        min_frequency: int = 2,
                        pre_tokenizer: str = "byte_level"):
  """A BPE `tokenizers.Tokenizer` trained on `texts`.

  Special tokens ``<|pad|>`` (id 0) and ``<|endoftext|>`` (id 1) come
  first. `pre_tokenizer`:

  * ``"byte_level"`` (default; GPT-2 / Llama-3 / Qwen style): the text is
    split by GPT-2's regex and every byte is a symbol (ids 2..257 are the byte
    alphabet, so any text can be encoded). ``vocab_size=258`` learns no merge:
    a pure byte tokenizer.
  * ``"metaspace"`` (SentencePiece / Llama-2 style): spaces become ``▁``
    attached to the following word (one is prepended to the first word), the
    alphabet is characters, and characters outside the vocabulary fall back
    to byte tokens ``<0x00>``..``<0xFF>`` (ids 2..257, ordinary vocabulary
    entries, as in Llama-2's ``tokenizer.json``).
  """
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  # pylint: enable=g-import-not-at-top

  if pre_tokenizer not in PRE_TOKENIZERS:
    raise ValueError(f"pre_tokenizer must be one of {PRE_TOKENIZERS}, got "
                     f"{pre_tokenizer!r}")
  if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size {vocab_size} is below the 258 ids of the "
                     "byte alphabet + special tokens")
  if pre_tokenizer == "metaspace":
    return _train_metaspace_bpe(texts, vocab_size, min_frequency)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return tok


def _train_metaspace_bpe(texts, vocab_size, min_frequency):
  """Metaspace BPE with byte fallback (see `train_bpe_tokenizer`)."""
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  # pylint: enable=g-import-not-at-top

  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE,
                                               prepend_scheme="first")
  tok.decoder = decoders.Sequence([
      decoders.Replace(METASPACE, " "), decoders.ByteFallback(),
      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  # The byte tokens are reserved as "special" only so that the trainer gives
  # them ids 2..257; they are then made plain vocabulary entries (otherwise a
  # literal "<0x41>" in a text would be read as one token, and decoding would
  # skip them).
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS) + byte_tokens, show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"]
                          if t["content"] in SPECIAL_TOKENS]
  return tokenizers.Tokenizer.from_str(json.dumps(spec))


def special_ids(tokenizer) -> dict:
  """``{"pad_id", "eos_id"}`` of a tokenizer made by `train_bpe_tokenizer`."""
  ids = {"pad_id": tokenizer.token_to_id(PAD_TOKEN),
         "eos_id": tokenizer.token_to_id(EOT_TOKEN)}
  if None in ids.values():
    raise ValueError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
  return ids


def encode_documents(tokenizer, docs: Sequence[str], *,
                     eos_id: Optional[int]) -> np.ndarray:
  """int32 stream: each document's ids followed by `eos_id` (if not None)."""
  parts = []
  for enc in tokenizer.encode_batch(list(docs), add_special_tokens=False):
    parts.append(np.asarray(enc.ids, np.int32))
    if eos_id is not None:
      parts.append(np.asarray([eos_id], np.int32))
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def pack_stream(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """``[len(stream) // seq_len, seq_len]`` consecutive chunks (tail dropped)."""
  stream = np.asarray(stream)
  if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
    raise ValueError(f"token stream must be a 1-D int array, got "
                     f"{stream.dtype}{list(stream.shape)}")
  if seq_len < 2:
    raise ValueError(f"seq_len must be >= 2, got {seq_len}")
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f"token stream of {len(stream)} tokens is shorter than "
                     f"one sequence of {seq_len}")
  return stream[:n * seq_len].astype(np.int32).reshape(n, seq_len)


def _features(seq_len: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict(
      {"tokens": tfds.features.Tensor(shape=(seq_len,), dtype=np.int32)})


def write_tfds_tokens(data_dir: str, name: str,
                      splits: Mapping[str, np.ndarray], *,
                      description: str = "", version: str = "1.0.0",
                      metadata: Optional[dict] = None,
                      tokenizer=None) -> str:
  """Writes packed ``{split: [N, L] int32}`` as a TFDS array_record dataset.

  Files go to ``data_dir/name/version/`` (one shard per split) with TFDS's
  ``dataset_info.json`` / ``features.json``, plus ``tokenizer.json`` and
  ``kd_jax_text.json`` (`metadata` + seq_len, vocab and special ids).
  Returns that folder.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  lengths = {np.shape(v)[1] for v in splits.values()}
  if len(lengths) != 1:
    raise ValueError(f"all splits must have one sequence length, got "
                     f"{sorted(lengths)}")
  seq_len = lengths.pop()
  folder = os.path.join(data_dir, name, version)
  os.makedirs(folder, exist_ok=True)
  features = _features(seq_len)
  template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  infos = []
  for split, arr in splits.items():
    ft = tfds.core.ShardedFileTemplate(
        data_dir=folder, template=template, dataset_name=name, split=split,
        filetype_suffix="array_record")
    shard = str(ft.sharded_filepath(shard_index=0, num_shards=1))
    writer = array_record_module.ArrayRecordWriter(shard, "group_size:1")
    num_bytes = 0
    for row in np.asarray(arr, np.int32):
      record = features.serialize_example({"tokens": row})
      num_bytes += len(record)
      writer.write(record)
    writer.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(arr)],
                                     num_bytes=num_bytes,
                                     filename_template=ft))
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=features, split_infos=infos,
      filename_template=template, description=description, check_data=False)
  meta = dict(metadata or {}, seq_len=int(seq_len),
              splits={k: int(len(v)) for k, v in splits.items()})
  if tokenizer is not None:
    tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
    meta.update(vocab_size=tokenizer.get_vocab_size(), **special_ids(
        tokenizer))
  with open(os.path.join(folder, METADATA_FILE), "w") as fh:
    json.dump(meta, fh, indent=2, sort_keys=True)
  return folder


def load_tfds_tokens(folder: str, split: str):
  """``(data source, metadata dict)`` of a dataset `write_tfds_tokens` wrote.

  `folder` is ``data_dir/name/version``; the source's items are
  ``{"tokens": int32 [seq_len]}``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  meta_path = os.path.join(folder, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{folder} is not a prepared text dataset (no "
                            f"{METADATA_FILE})")
  with open(meta_path) as fh:
    meta = json.load(fh)
  if split not in meta["splits"]:
    raise ValueError(f"split {split!r} not in {sorted(meta['splits'])}")
  builder = tfds.builder_from_directory(folder)
  return builder.as_data_source(split=split), meta


def _as_example(item) -> dict:
  if isinstance(item, Mapping):
    return {k: np.asarray(v) for k, v in item.items()}
  return {"tokens": np.asarray(item, np.int32)}


def _stack(rows) -> dict:
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  out["tokens"] = out["tokens"].astype(np.int32)
  return out


def lm_dataset(source, *, batch_size: int, seed: int = 0,
               shuffle: bool = True, num_epochs: Optional[int] = None,
               drop_remainder: bool = True):
  """grain ``MapDataset`` of batches ``{"tokens": int32 [B, seq_len], ...}``.

  Args:
    source: a random-access source of sequences: a ``[N, L]`` array, a TFDS
      data source whose items are ``{"tokens": [L]}``, or a `ZipSource`
      (tokens + a teacher cache); every field of an item is batched.
    batch_size: sequences per batch.
    seed: shuffle seed (a new permutation each epoch).
    shuffle: False keeps the stored order (evaluation).
    num_epochs: None repeats forever (index by global step).
    drop_remainder: drop a last incomplete batch of each pass.
  """
  import grain  # pylint: disable=g-import-not-at-top

  if len(source) < batch_size and drop_remainder:
    raise ValueError(f"{len(source)} sequences are fewer than one batch of "
                     f"{batch_size}")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.map(_as_example)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack)


class ZipSource:
  """Random-access source merging the dict items of equally long sources
  (e.g. a TFDS token split and its `TopkCacheSource`)."""

  def __init__(self, *sources):
    lengths = {len(s) for s in sources}
    if len(lengths) != 1:
      raise ValueError(f"sources to zip have different lengths "
                       f"{[len(s) for s in sources]}")
    self._sources = sources

  def __len__(self):
    return len(self._sources[0])

  def __getitem__(self, i):
    out = {}
    for s in self._sources:
      out.update(_as_example(s[i]))
    return out


# ---------------------------------------------------------------------------
# Offline teacher cache: top-k log-probabilities (bfloat16) + indices (int32).
# ---------------------------------------------------------------------------


def topk_cache_path(folder: str, split: str, k: int) -> str:
  return os.path.join(folder, f"teacher_topk_k{k}-{split}.array_record")


def topk_bytes_per_token(k: int) -> int:
  """Cache bytes per token: k bfloat16 log-probs + k int32 indices."""
  return 6 * k


class TopkCacheWriter:
  """Writes one record per sequence: ``[T, k]`` bfloat16 log-probs then
  ``[T, k]`` int32 indices (raw little-endian bytes, array_record), in the
  order of the token split it belongs to; `close` writes the json metadata
  ``teacher_topk_k{k}-{split}.json``."""

  def __init__(self, folder: str, split: str, k: int, *,
               metadata: Optional[dict] = None):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._path = topk_cache_path(folder, split, k)
    self._writer = array_record_module.ArrayRecordWriter(self._path,
                                                         "group_size:1")
    self._k, self._count, self._length = k, 0, None
    self._metadata = dict(metadata or {})

  def write(self, logprobs, indices) -> None:
    """Appends ``[N, T, k]`` log-probs and indices (N sequences)."""
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    logprobs, indices = np.asarray(logprobs), np.asarray(indices)
    if (logprobs.ndim != 3 or logprobs.shape != indices.shape
        or logprobs.shape[-1] != self._k):
      raise ValueError(f"top-k cache rows must be [N, T, {self._k}] (both "
                       f"arrays); got {list(logprobs.shape)} and "
                       f"{list(indices.shape)}")
    if self._length not in (None, logprobs.shape[1]):
      raise ValueError(f"sequence length changed from {self._length} to "
                       f"{logprobs.shape[1]}")
    self._length = logprobs.shape[1]
    lp = logprobs.astype(ml_dtypes.bfloat16).view(np.uint16).astype("<u2")
    idx = indices.astype("<i4")
    for a, b in zip(lp, idx):
      self._writer.write(a.tobytes() + b.tobytes())
    self._count += len(lp)

  def close(self) -> str:
    self._writer.close()
    meta = dict(self._metadata, k=self._k, length=self._length,
                num_sequences=self._count,
                bytes_per_token=topk_bytes_per_token(self._k))
    from kd_jax import metrics_io  # pylint: disable=g-import-not-at-top
    metrics_io.write_json(self._path[:-len(".array_record")] + ".json", meta)
    return self._path


class TopkCacheSource:
  """Random-access reader of a `TopkCacheWriter` file: items
  ``{"teacher_topk_logprobs": float32 [T, k], "teacher_topk_indices": int32
  [T, k]}``."""

  def __init__(self, folder: str, split: str, k: int):
    import grain  # pylint: disable=g-import-not-at-top
    path = topk_cache_path(folder, split, k)
    meta_path = path[:-len(".array_record")] + ".json"
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"no teacher top-k cache (k={k}) for split "
                              f"{split!r} in {folder}")
    with open(meta_path) as fh:
      self.metadata = json.load(fh)
    self._source = grain.sources.ArrayRecordDataSource([path])
    self._shape = (self.metadata["length"], k)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    raw = self._source[i]
    n = int(np.prod(self._shape))
    lp = np.frombuffer(raw, "<u2", count=n).view(ml_dtypes.bfloat16)
    idx = np.frombuffer(raw, "<i4", count=n, offset=2 * n)
    return {"teacher_topk_logprobs": lp.astype(np.float32).reshape(
                self._shape),
            "teacher_topk_indices": idx.astype(np.int32).reshape(
                self._shape)}


def split_documents(docs: Sequence[str], fractions: Mapping[str, float], *,
                    seed: int = 0) -> dict:
  """Assigns whole documents to splits by a seeded permutation.

  `fractions` maps split name -> share of the documents (summing to 1);
  every split gets at least one document.
  """
  if abs(sum(fractions.values()) - 1.0) > 1e-6:
    raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
  if len(docs) < len(fractions):
    raise ValueError(f"{len(docs)} documents cannot fill {len(fractions)} "
                     "splits")
  order = np.random.default_rng(seed).permutation(len(docs))
  out, start = {}, 0
  names = list(fractions)
  for i, name in enumerate(names):
    left = len(names) - i - 1
    n = (len(docs) - start - 0 if i == len(names) - 1 else
         max(1, min(int(round(fractions[name] * len(docs))),
                    len(docs) - start - left)))
    out[name] = [docs[j] for j in order[start:start + n]]
    start += n
  return out
