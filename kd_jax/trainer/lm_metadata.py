"""A prepared text dataset's metadata (``kd_jax_text.json``) and the command
that prepares a missing one: what the LM schema (`lm_config`) and the
cross-tokenizer setup (`lm_cross`, the teacher's dataset) both read."""

from __future__ import annotations

import json
import os
import re

from kd_jax.trainer.errors import ConfigError


def prepare_command(data_dir: str, name: str) -> str:
  """The command that prepares dataset `name` in `data_dir`: Jane Austen
  (the .deb downloaded into the data folder) for ``jane_austen*`` names,
  the sizes read from a ``*_v<vocab>_s<seq_len>`` suffix."""
  m = re.search(r"_v(\d+)_s(\d+)$", name)
  sizes = (f" --vocab_size {m.group(1)} --seq_len {m.group(2)}" if m else
           " --vocab_size V --seq_len L")
  cmd = (f"python experiments/prepare_corpus.py --data_dir {data_dir} "
         f"--name {name}{sizes}")
  if name.startswith("jane_austen"):
    return (f"mkdir -p {data_dir} && (cd {data_dir} && apt-get download "
            f"r-cran-janeaustenr) && {cmd}")
  return cmd + " --text_files FILE ..."


def read_metadata(folder: str, key: str = "data", *,
                  data_dir: str = "", name: str = "") -> dict:
  """The prepared dataset's ``kd_jax_text.json`` (a `ConfigError` naming
  the folder and the command that prepares it when it is missing)."""
  from kd_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, text_lib.METADATA_FILE)
  how = ("prepare it with `" + prepare_command(data_dir, name)
         + "` (docs/lm.md)"
         if name else "prepare it with experiments/prepare_corpus.py "
         "(docs/lm.md)")
  if not os.path.isdir(folder):
    raise ConfigError(key, f"data folder {folder!r} not found; {how}.")
  if not os.path.isfile(path):
    raise ConfigError(key, f"{folder!r} is not a prepared text dataset (no "
                      f"{text_lib.METADATA_FILE}); {how}.")
  with open(path) as f:
    return json.load(f)
