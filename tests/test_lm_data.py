"""Tests of the text pipeline (`kd_jax.data.text`, experiments/prepare_corpus).

Everything runs on a tiny corpus written by the test (no network, no Debian
package): tokenizer training, encoding, packing, the TFDS array_record round
trip, the grain batches, and the corpus script on plain text files and on a
synthesized R lazy-load database / Debian package of the janeaustenr layout.
"""

import io
import json
import os
import struct
import sys
import tarfile
import zlib

import numpy as np
import pytest

from kd_jax.data import text

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "experiments"))
import prepare_corpus  # noqa: E402  pylint: disable=g-import-not-at-top

tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the a lady gentleman said walked house garden letter morning "
         "evening sister brother happy very much would could not her his "
         "was were and but").split()


def _corpus(n_docs=6, seed=0):
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(n_docs):
    sents = []
    for _ in range(30):
      words = rng.choice(WORDS, size=rng.integers(4, 12))
      sents.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    docs.append(f"Chapter {d}\n" + " ".join(sents) + " Caf\u00e9 \u2014 end.")
  return docs


@pytest.fixture(scope="module")
def tokenizer():
  return text.train_bpe_tokenizer(_corpus(), vocab_size=300)


def test_tokenizer_is_lossless_and_has_special_ids(tokenizer):
  assert tokenizer.get_vocab_size() <= 300
  assert text.special_ids(tokenizer) == {"pad_id": 0, "eos_id": 1}
  sample = "Unseen w\u00f6rds, digits 123 and \u2014 emoji \U0001F600!"
  ids = tokenizer.encode(sample).ids
  assert max(ids) < tokenizer.get_vocab_size()
  assert tokenizer.decode(ids) == sample
  # Merges were learned: the training text takes far fewer ids than bytes.
  doc = _corpus()[0]
  assert tokenizer.get_vocab_size() == 300
  assert len(tokenizer.encode(doc).ids) < 0.6 * len(doc.encode("utf-8"))


def test_encode_documents_and_pack(tokenizer):
  docs = _corpus(3, seed=1)
  stream = text.encode_documents(tokenizer, docs, eos_id=1)
  want = []
  for d in docs:
    want += tokenizer.encode(d).ids + [1]
  np.testing.assert_array_equal(stream, want)
  packed = text.pack_stream(stream, 16)
  n = len(want) // 16
  assert packed.shape == (n, 16) and packed.dtype == np.int32
  np.testing.assert_array_equal(packed.reshape(-1), want[:n * 16])
  with pytest.raises(ValueError, match="shorter than one sequence of 10000"):
    text.pack_stream(stream, 10000)
  with pytest.raises(ValueError, match="1-D int array"):
    text.pack_stream(np.zeros((2, 3)), 2)


def test_tfds_round_trip_and_grain_batches(tmp_path, tokenizer):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  splits = {"train": rng.integers(0, 300, (10, 8)).astype(np.int32),
            "validation": rng.integers(0, 300, (3, 8)).astype(np.int32)}
  folder = text.write_tfds_tokens(str(tmp_path), "toy_text", splits,
                                  tokenizer=tokenizer, metadata={"k": "v"})
  assert folder == str(tmp_path / "toy_text" / "1.0.0")
  # Readable by plain TFDS, as any TFDS dataset.
  src = tfds.data_source("toy_text", data_dir=str(tmp_path), split="train")
  np.testing.assert_array_equal(np.stack([src[i]["tokens"]
                                          for i in range(10)]),
                                splits["train"])
  val, meta = text.load_tfds_tokens(folder, "validation")
  assert meta["seq_len"] == 8 and meta["splits"] == {"train": 10,
                                                     "validation": 3}
  assert meta["k"] == "v" and meta["eos_id"] == 1
  np.testing.assert_array_equal(val[2]["tokens"], splits["validation"][2])
  tok2 = tokenizers.Tokenizer.from_file(os.path.join(folder,
                                                     "tokenizer.json"))
  assert tok2.encode("the lady said").ids == tokenizer.encode(
      "the lady said").ids
  with pytest.raises(ValueError, match="split 'test' not in"):
    text.load_tfds_tokens(folder, "test")

  # grain: each epoch of 10 rows in 5 batches of 2 is a permutation.
  train, _ = text.load_tfds_tokens(folder, "train")
  ds = text.lm_dataset(train, batch_size=2, seed=3)
  rows = [tuple(r) for k in range(10) for r in ds[k]["tokens"]]
  want = sorted(tuple(r) for r in splits["train"])
  assert sorted(rows[:10]) == want and sorted(rows[10:]) == want
  assert rows[:10] != rows[10:]  # reshuffled each epoch
  assert rows[:10] != [tuple(r) for r in splits["train"]]
  again = text.lm_dataset(splits["train"], batch_size=2, seed=3)
  np.testing.assert_array_equal(again[7]["tokens"], ds[7]["tokens"])
  ordered = text.lm_dataset(splits["train"], batch_size=4, shuffle=False,
                            num_epochs=1)
  assert len(ordered) == 2
  np.testing.assert_array_equal(ordered[1]["tokens"], splits["train"][4:8])
  assert ordered[0]["tokens"].dtype == np.int32
  with pytest.raises(ValueError, match="fewer than one batch of 64"):
    text.lm_dataset(splits["validation"], batch_size=64)


def test_split_documents():
  docs = [f"d{i}" for i in range(10)]
  out = text.split_documents(docs, {"train": 0.8, "validation": 0.1,
                                    "test": 0.1}, seed=0)
  assert [len(v) for v in out.values()] == [8, 1, 1]
  assert sorted(sum(out.values(), [])) == sorted(docs)
  with pytest.raises(ValueError, match="sum to 1"):
    text.split_documents(docs, {"train": 0.5})


def test_prepare_corpus_on_plain_text_files(tmp_path):
  paths = {}
  for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
    paths[split] = []
    for i, doc in enumerate(_corpus(3 if split == "train" else 1, seed)):
      p = tmp_path / f"{split}{i}.txt"
      p.write_text(doc, encoding="utf-8")
      paths[split].append(str(p))
  out = tmp_path / "out"
  prepare_corpus.main(["--data_dir", str(out), "--name", "toy",
                       "--vocab_size", "300", "--seq_len", "32",
                       "--train_files", *paths["train"],
                       "--validation_files", *paths["validation"],
                       "--test_files", *paths["test"]])
  folder = out / "toy" / "1.0.0"
  meta = json.loads((folder / "kd_jax_text.json").read_text())
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  # Independent re-encoding of the validation text gives the stored rows.
  val_doc = open(paths["validation"][0], encoding="utf-8").read()
  want = tok.encode(val_doc).ids + [1]
  src, _ = text.load_tfds_tokens(str(folder), "validation")
  got = np.concatenate([src[i]["tokens"] for i in range(len(src))])
  assert len(src) == len(want) // 32 == meta["splits"]["validation"]
  np.testing.assert_array_equal(got, want[:len(got)])
  assert meta["stats"]["train"]["documents"] == 3


# --- the janeaustenr layout (synthesized: no Debian package in CI) ---------


def _r_strsxp(lines):
  """R XDR serialization (format 3) of a character vector."""
  out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500)
  out += struct.pack(">i", 5) + b"UTF-8"
  out += struct.pack(">ii", 16, len(lines))
  for line in lines:
    if line is None:
      out += struct.pack(">ii", 9, -1)
    else:
      b = line.encode("utf-8")
      out += struct.pack(">ii", 0x00040009, len(b)) + b
  return out


def _rdb(vectors):
  blob = b""
  for v in vectors:
    raw = _r_strsxp(v)
    blob += struct.pack(">I", len(raw)) + zlib.compress(raw)
  return blob


NOVELS = {t: [t.title() if t == "PERSUASION" else t, "", "by Jane Austen",
              "", "Chapter 1", "", f"It is a truth of {t.lower()},",
              "universally acknowledged.", None, "Second paragraph \u00e9."]
          for ts in prepare_corpus.AUSTEN_SPLITS.values() for t in ts}


def test_r_reader_and_paragraph_unwrapping():
  vectors = prepare_corpus.read_r_string_vectors(_rdb(NOVELS.values()))
  assert vectors == list(NOVELS.values())
  doc = prepare_corpus.lines_to_document(NOVELS["EMMA"])
  assert doc == ("EMMA\nby Jane Austen\nChapter 1\nIt is a truth of emma, "
                 "universally acknowledged.\nSecond paragraph \u00e9.")


def _deb(tmp_path, rdb):
  data = io.BytesIO()
  with tarfile.open(fileobj=data, mode="w:xz") as tar:
    info = tarfile.TarInfo("./" + prepare_corpus.RDB_IN_PACKAGE)
    info.size = len(rdb)
    tar.addfile(info, io.BytesIO(rdb))
  blob = b"!<arch>\n"
  for name, payload in (("debian-binary", b"2.0\n"),
                        ("data.tar.xz", data.getvalue())):
    blob += (f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}"
             "`\n").encode() + payload + (b"\n" if len(payload) % 2 else b"")
  path = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
  path.write_bytes(blob)
  return str(path)


def test_austen_from_deb_and_missing_source(tmp_path):
  deb = _deb(tmp_path, _rdb(NOVELS.values()))
  novels = prepare_corpus.austen_novels(deb)
  assert sorted(novels) == sorted(NOVELS)
  assert novels["PERSUASION"].startswith("Persuasion\nby Jane Austen")
  with pytest.raises(SystemExit, match="apt-get install --no-install-"
                     "recommends r-cran-janeaustenr"):
    prepare_corpus.main(["--data_dir", str(tmp_path),
                         "--source", str(tmp_path / "nope.rdb")])


def test_prepare_finds_the_deb_in_the_data_folder(tmp_path, capsys):
  """The documented command: the .deb downloaded into --data_dir, no
  --source; the dataset lands where the LM configs read it. Without the
  .deb the error gives the download command for that folder."""
  data = tmp_path / "lm_data"
  data.mkdir()
  if not os.path.exists(prepare_corpus.DEFAULT_SOURCE):  # not installed
    with pytest.raises(SystemExit, match=f"mkdir -p {data} && \\(cd {data} "
                       "&& apt-get download r-cran-janeaustenr\\)"):
      prepare_corpus.main(["--data_dir", str(data), "--name", "ja_v300_s16",
                           "--vocab_size", "300", "--seq_len", "16"])
  _deb(data, _rdb([v * 30 for v in NOVELS.values()]))
  prepare_corpus.main(["--data_dir", str(data), "--name", "ja_v300_s16",
                       "--vocab_size", "300", "--seq_len", "16"])
  meta = json.loads((data / "ja_v300_s16" / "1.0.0" /
                     text.METADATA_FILE).read_text())
  assert meta["seq_len"] == 16 and meta["vocab_size"] == 300
  assert "Debian r-cran-janeaustenr" in meta["source"]


def test_topk_cache_round_trip_and_zip(tmp_path):
  import ml_dtypes
  n, length, k = 6, 5, 4
  rng = np.random.default_rng(0)
  tokens = np.repeat(np.arange(n, dtype=np.int32)[:, None], length + 1, 1)
  logprobs = -rng.random((n, length, k)).astype(np.float32) * 5
  indices = (np.arange(n)[:, None, None] * 100
             + rng.integers(0, 50, (n, length, k))).astype(np.int32)
  w = text.TopkCacheWriter(str(tmp_path), "train", k,
                           metadata={"teacher": "toy"})
  w.write(logprobs[:4], indices[:4])
  w.write(logprobs[4:], indices[4:])
  path = w.close()
  assert os.path.getsize(path) >= n * length * text.topk_bytes_per_token(k)
  src = text.TopkCacheSource(str(tmp_path), "train", k)
  assert len(src) == n and src.metadata["teacher"] == "toy"
  assert src.metadata["bytes_per_token"] == 24
  for i in range(n):
    np.testing.assert_array_equal(src[i]["teacher_topk_indices"], indices[i])
    got = src[i]["teacher_topk_logprobs"]
    # bfloat16 keeps 8 significant bits: relative error <= 2^-8.
    assert np.all(np.abs(got - logprobs[i]) <= 2.0 ** -8 * np.abs(
        logprobs[i]))
    np.testing.assert_array_equal(
        got, logprobs[i].astype(ml_dtypes.bfloat16).astype(np.float32))
  # Shuffled batches keep each sequence with its own cache rows.
  ds = text.lm_dataset(text.ZipSource(tokens, src), batch_size=3, seed=1)
  for step in range(4):
    b = ds[step]
    assert b["teacher_topk_indices"].shape == (3, length, k)
    np.testing.assert_array_equal(b["teacher_topk_indices"] // 100,
                                  np.broadcast_to(b["tokens"][:, :1, None],
                                                  (3, length, k)))
  with pytest.raises(ValueError, match="different lengths"):
    text.ZipSource(tokens[:2], src)
  with pytest.raises(FileNotFoundError, match=r"no teacher top-k cache \(k=8\)"):
    text.TopkCacheSource(str(tmp_path), "train", 8)
  with pytest.raises(ValueError, match=r"must be \[N, T, 4\]"):
    text.TopkCacheWriter(str(tmp_path), "x", k).write(logprobs[..., :2],
                                                      indices[..., :2])


def test_cache_teacher_against_hf_logits(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import cache_teacher  # experiments/
  import jax.numpy as jnp
  from kd_jax.models import lm
  from kd_jax.train import lm_steps
  cfg = transformers.LlamaConfig(
      vocab_size=50, hidden_size=16, intermediate_size=32,
      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
      max_position_embeddings=32)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(str(tmp_path / "teacher"))
  rng = np.random.default_rng(0)
  splits = {"train": rng.integers(0, 50, (5, 9)).astype(np.int32),
            "validation": rng.integers(0, 50, (2, 9)).astype(np.int32)}
  folder = text.write_tfds_tokens(str(tmp_path), "toy", splits)
  model, variables, _ = lm.load_hf_folder(str(tmp_path / "teacher"),
                                          dtype=jnp.float32)
  fn = lm_steps.make_teacher_topk_fn(model, k=5, temperature=2.0)
  info = cache_teacher.cache_split(fn, variables, folder, "train", 5,
                                   batch_size=2)
  assert info["tokens"] == 5 * 8 and info["bytes_per_token"] == 30
  with torch.no_grad():
    logits = hf(torch.as_tensor(splits["train"][:, :-1])).logits.numpy()
  z = logits.astype(np.float64) / 2.0
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want_idx = np.argsort(-logp, -1)[..., :5]
  src = text.TopkCacheSource(folder, "train", 5)
  for i in range(5):
    np.testing.assert_array_equal(src[i]["teacher_topk_indices"],
                                  want_idx[i])
    want = np.take_along_axis(logp[i], want_idx[i], -1)
    np.testing.assert_allclose(src[i]["teacher_topk_logprobs"], want,
                               rtol=2.0 ** -8, atol=1e-5)
  # The command line, bfloat16 teacher, two k values, another split.
  cache_teacher.main(["--dataset", folder, "--hf_dir",
                      str(tmp_path / "teacher"), "--k", "2", "8",
                      "--splits", "validation", "--batch_size", "4"])
  out = capsys.readouterr().out
  assert "| top-8 (bf16 log-prob + int32 index) | 48 | 0.4800 |" in out
  assert len(text.TopkCacheSource(folder, "validation", 2)) == 2


def test_prepare_corpus_from_a_tfds_text_dataset(tmp_path):
  """A user's TFDS text dataset (one document per example) as the source."""
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  feats = tfds.features.FeaturesDict({"text": tfds.features.Text()})
  folder = tmp_path / "tfds" / "toy_docs" / "1.0.0"
  folder.mkdir(parents=True)
  template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  docs = {"train": _corpus(3, 0), "validation": _corpus(1, 1),
          "test": _corpus(1, 2)}
  infos = []
  for split, items in docs.items():
    ft = tfds.core.ShardedFileTemplate(
        data_dir=str(folder), template=template, dataset_name="toy_docs",
        split=split, filetype_suffix="array_record")
    w = ArrayRecordWriter(str(ft.sharded_filepath(shard_index=0,
                                                  num_shards=1)),
                          "group_size:1")
    for d in items:
      w.write(feats.serialize_example({"text": d}))
    w.close()
    infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(items)],
                                     num_bytes=0, filename_template=ft))
  tfds.folder_dataset.write_metadata(data_dir=str(folder), features=feats,
                                     split_infos=infos,
                                     filename_template=template,
                                     check_data=False)
  assert text.documents_from_tfds("toy_docs", "validation",
                                  data_dir=str(tmp_path / "tfds")) == docs[
                                      "validation"]
  prepare_corpus.main(["--data_dir", str(tmp_path / "out"), "--name", "t",
                       "--tfds_name", "toy_docs", "--tfds_dir",
                       str(tmp_path / "tfds"), "--vocab_size", "300",
                       "--seq_len", "16"])
  meta = json.loads((tmp_path / "out" / "t" / "1.0.0" /
                     "kd_jax_text.json").read_text())
  assert meta["stats"]["train"]["documents"] == 3
  assert meta["source"] == "tfds:toy_docs"
