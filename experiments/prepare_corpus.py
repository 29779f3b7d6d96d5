"""Prepares a text corpus once: splits, BPE tokenizer, packed TFDS dataset.

Default corpus: Jane Austen's six completed novels as shipped by the Debian
package ``r-cran-janeaustenr`` (Julia Silge's CRAN package ``janeaustenr``;
the texts are public domain, from Project Gutenberg; the package is MIT
licensed). About 4.0 M characters, 6 novels. Install it with either

  apt-get install --no-install-recommends r-cran-janeaustenr
      # -> /usr/lib/R/site-library/janeaustenr/data/Rdata.rdb (pulls in R)
  (cd DATA_DIR && apt-get download r-cran-janeaustenr)
      # -> DATA_DIR/r-cran-janeaustenr_*.deb; this script finds it in
      #    --data_dir and reads the .deb directly, no R needed

Splits are whole novels (held-out text is a book the model never saw):
train = Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility;
validation = Northanger Abbey; test = Persuasion.

Any plain-text files work through the same pipeline (``--text_files``:
whole files are assigned to splits by a seeded permutation, or give
``--train_files/--validation_files/--test_files``), and so does a TFDS text
dataset (``--tfds_name NAME --tfds_key text``, one document per example).

Output: ``<data_dir>/<name>/1.0.0/`` -- a TFDS ``array_record`` dataset
(feature ``tokens``: int32 ``[seq_len]``; read with ``tfds.data_source`` or
``kd_jax.data.text.load_tfds_tokens``) + ``tokenizer.json`` (byte-level BPE
trained on the train split) + ``kd_jax_text.json`` (metadata).

Usage (the LM main job's dataset, configs/lm_jane_austen.py)::

  mkdir -p workdirs/lm_data && (cd workdirs/lm_data && apt-get download r-cran-janeaustenr)
  python experiments/prepare_corpus.py --data_dir workdirs/lm_data \
      --name jane_austen_v2048_s64 --vocab_size 2048 --seq_len 64

(``--source``: the package directory, its ``Rdata.rdb`` or the ``.deb``;
default: the ``.deb`` in ``--data_dir``, else the installed package;
``--pre_tokenizer metaspace`` for a SentencePiece-style tokenizer).
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import sys
import tarfile
import zlib


from kd_jax.data import text as text_lib

RDB_IN_PACKAGE = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
DEFAULT_SOURCE = "/" + RDB_IN_PACKAGE
AUSTEN_SPLITS = {
    "train": ("EMMA", "MANSFIELD PARK", "PRIDE AND PREJUDICE",
              "SENSE AND SENSIBILITY"),
    "validation": ("NORTHANGER ABBEY",),
    "test": ("PERSUASION",),
}
LICENSE = ("Texts: public domain (Project Gutenberg). Package janeaustenr "
           "(Julia Silge, CRAN; Debian r-cran-janeaustenr): MIT.")


# ---------------------------------------------------------------------------
# Reading the R lazy-load database of r-cran-janeaustenr.
# ---------------------------------------------------------------------------


def _deb_member(deb_path: str, member: str) -> bytes:
  """A file of a Debian package (an `ar` archive holding data.tar.*)."""
  with open(deb_path, "rb") as fh:
    blob = fh.read()
  if not blob.startswith(b"!<arch>\n"):
    raise ValueError(f"{deb_path} is not a Debian package")
  pos = 8
  while pos + 60 <= len(blob):
    name = blob[pos:pos + 16].decode().strip().rstrip("/")
    size = int(blob[pos + 48:pos + 58].decode().strip())
    data = blob[pos + 60:pos + 60 + size]
    pos += 60 + size + (size % 2)
    if name.startswith("data.tar"):
      with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
          if info.name.lstrip("./") == member:
            return tar.extractfile(info).read()
  raise ValueError(f"{deb_path} has no {member}")


def read_r_string_vectors(rdb: bytes) -> list:
  """All character vectors of an R lazy-load ``.rdb`` file.

  The file is a sequence of objects, each a 4-byte big-endian length + a
  zlib stream of R's XDR serialization (format version 2 or 3). Only
  top-level character vectors (STRSXP of CHARSXP) are decoded, NA as None.
  """
  out, pos = [], 0
  while pos < len(rdb):
    d = zlib.decompressobj()
    obj = d.decompress(rdb[pos + 4:])
    pos = len(rdb) - len(d.unused_data)
    if obj[:2] != b"X\n":
      raise ValueError("not an R XDR serialization")
    version = struct.unpack(">i", obj[2:6])[0]
    i = 14
    if version == 3:  # native encoding name
      i += 4 + struct.unpack(">i", obj[i:i + 4])[0]
    flags, n = struct.unpack(">ii", obj[i:i + 8])
    i += 8
    if flags & 0xFF != 16:  # not a STRSXP
      continue
    strings = []
    for _ in range(n):
      _, length = struct.unpack(">ii", obj[i:i + 8])
      i += 8
      if length < 0:
        strings.append(None)
        continue
      strings.append(obj[i:i + length].decode("utf-8"))
      i += length
    out.append(strings)
  return out


def lines_to_document(lines) -> str:
  """Unwraps hard-wrapped lines: paragraphs (blank-line separated) joined by
  single spaces inside, newlines between."""
  paragraphs, current = [], []
  for line in lines:
    line = (line or "").strip()
    if line:
      current.append(line)
    elif current:
      paragraphs.append(" ".join(current))
      current = []
  if current:
    paragraphs.append(" ".join(current))
  return "\n".join(paragraphs)


DEB_PATTERN = "r-cran-janeaustenr_*.deb"


def find_source(data_dir: str) -> str:
  """The package to read: the newest ``r-cran-janeaustenr_*.deb`` in
  `data_dir` (where the documented ``apt-get download`` puts it), else the
  installed package's directory."""
  import glob  # pylint: disable=g-import-not-at-top
  debs = sorted(glob.glob(os.path.join(data_dir, DEB_PATTERN)))
  return debs[-1] if debs else DEFAULT_SOURCE


def austen_novels(source: str, data_dir: str = "DATA_DIR") -> dict:
  """``{TITLE: text}`` of the six novels from the package (dir/.rdb/.deb;
  a directory without ``data/Rdata.rdb`` is searched for the .deb)."""
  if os.path.isdir(source):
    rdb = os.path.join(source, "data", "Rdata.rdb")
    source = rdb if os.path.exists(rdb) else find_source(source)
  if not os.path.exists(source):
    raise FileNotFoundError(
        f"{source} not found: download the corpus into the data folder "
        f"with `mkdir -p {data_dir} && (cd {data_dir} && apt-get download "
        "r-cran-janeaustenr)` (or `apt-get install --no-install-recommends "
        "r-cran-janeaustenr`, which pulls in R), or pass --source FILE.deb")
  if source.endswith(".deb"):
    rdb = _deb_member(source, RDB_IN_PACKAGE)
  else:
    with open(source, "rb") as fh:
      rdb = fh.read()
  novels = {}
  for lines in read_r_string_vectors(rdb):
    title = next(l for l in lines if l and l.strip()).strip().upper()
    novels[title] = lines_to_document(lines)
  want = {t for ts in AUSTEN_SPLITS.values() for t in ts}
  if set(novels) != want:
    raise ValueError(f"unexpected novels in {source}: {sorted(novels)}")
  return novels


# ---------------------------------------------------------------------------
# Preparation.
# ---------------------------------------------------------------------------


def prepare(split_docs: dict, *, data_dir: str, name: str, vocab_size: int,
            seq_len: int, description: str, metadata: dict,
            pre_tokenizer: str = "byte_level") -> str:
  """Tokenizer on train, encode + pack every split, write TFDS. -> folder.

  The stats record each split's characters, UTF-8 bytes and tokens (bits
  per byte / character of a whole split: summed NLL over them).
  """
  tokenizer = text_lib.train_bpe_tokenizer(split_docs["train"],
                                           vocab_size=vocab_size,
                                           pre_tokenizer=pre_tokenizer)
  eos = text_lib.special_ids(tokenizer)["eos_id"]
  packed, stats = {}, {}
  for split, docs in split_docs.items():
    stream = text_lib.encode_documents(tokenizer, docs, eos_id=eos)
    packed[split] = text_lib.pack_stream(stream, seq_len)
    stats[split] = {"documents": len(docs), "characters":
                    int(sum(len(d) for d in docs)), "bytes":
                    int(sum(len(d.encode("utf-8")) for d in docs)),
                    "tokens": int(len(stream))}
  metadata = dict(metadata, stats=stats, pre_tokenizer=pre_tokenizer)
  return text_lib.write_tfds_tokens(data_dir, name, packed,
                                    description=description,
                                    metadata=metadata, tokenizer=tokenizer)


def _split_docs(args) -> tuple:
  if args.tfds_name:
    splits = {s: text_lib.documents_from_tfds(args.tfds_name, src,
                                              data_dir=args.tfds_dir,
                                              key=args.tfds_key)
              for s, src in (("train", args.tfds_train_split),
                             ("validation", args.tfds_validation_split),
                             ("test", args.tfds_test_split))}
    return splits, f"TFDS {args.tfds_name}", {"source": f"tfds:"
                                               f"{args.tfds_name}"}
  if args.train_files:
    splits = {"train": text_lib.documents_from_files(args.train_files),
              "validation": text_lib.documents_from_files(
                  args.validation_files),
              "test": text_lib.documents_from_files(args.test_files)}
    return splits, "plain text files", {"source": "plain text files"}
  if args.text_files:
    docs = text_lib.documents_from_files(args.text_files)
    splits = text_lib.split_documents(
        docs, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=args.seed)
    return splits, "plain text files", {"source": "plain text files"}
  novels = austen_novels(args.source or find_source(args.data_dir),
                         args.data_dir)
  splits = {s: [novels[t] for t in titles]
            for s, titles in AUSTEN_SPLITS.items()}
  meta = {"source": "Debian r-cran-janeaustenr (CRAN janeaustenr)",
          "license": LICENSE,
          "split_titles": {k: list(v) for k, v in AUSTEN_SPLITS.items()}}
  return splits, "Jane Austen's six novels. " + LICENSE, meta


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", required=True)
  p.add_argument("--name", default="jane_austen")
  p.add_argument("--source", default=None,
                 help="janeaustenr package dir, its Rdata.rdb or the .deb "
                 "(default: the .deb in --data_dir, else "
                 f"{DEFAULT_SOURCE})")
  p.add_argument("--text_files", nargs="*", default=None)
  p.add_argument("--train_files", nargs="*", default=None)
  p.add_argument("--validation_files", nargs="*", default=None)
  p.add_argument("--test_files", nargs="*", default=None)
  p.add_argument("--tfds_name", default=None,
                 help="a TFDS text dataset instead (feature --tfds_key)")
  p.add_argument("--tfds_dir", default=None)
  p.add_argument("--tfds_key", default="text")
  p.add_argument("--tfds_train_split", default="train")
  p.add_argument("--tfds_validation_split", default="validation")
  p.add_argument("--tfds_test_split", default="test")
  p.add_argument("--vocab_size", type=int, default=4096)
  p.add_argument("--pre_tokenizer", default="byte_level",
                 choices=text_lib.PRE_TOKENIZERS,
                 help="byte_level (GPT-2 style) or metaspace (SentencePiece "
                 "style, byte fallback): e.g. a teacher with its own "
                 "tokenizer for cross-tokenizer distillation")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    split_docs, description, meta = _split_docs(args)
    folder = prepare(split_docs, data_dir=os.path.expanduser(args.data_dir),
                     name=args.name, vocab_size=args.vocab_size,
                     seq_len=args.seq_len, description=description,
                     metadata=meta, pre_tokenizer=args.pre_tokenizer)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"prepare_corpus: {e}")
  print(f"wrote {folder}")
  with open(os.path.join(folder, text_lib.METADATA_FILE)) as fh:
    print(fh.read())


if __name__ == "__main__":
  main()
