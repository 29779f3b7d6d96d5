"""Exports the model of a kd_jax LM run as a Hugging Face checkpoint folder.

A run directory of the LM trainer (``config.json`` with ``task = "lm"`` +
``checkpoints/``; e.g. a distilled student, or one phase of the LM seed
experiment such as ``WORKDIR/seed0/teacher``) holds the trained model
(its ``student`` section: preset + overrides, or an HF folder it started
from) and names its dataset, whose ``tokenizer.json`` the model was trained
with. `load_lm_run` rebuilds ``(model, variables)`` from the newest
checkpoint; the command line writes them with
`kd_jax.models.lm.save_hf_folder` (``config.json``, ``model.safetensors``,
the dataset's tokenizer), a folder that ``transformers`` loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` unchanged.

Usage:
  python experiments/export_hf.py --run_dir WORKDIR/seed0/distill \
      --out exported/ [--model_type llama|qwen2] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Tuple

RUN_CONFIG = "config.json"


def _read_json(path: str, what: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: {path} does not exist")
  with open(path) as fh:
    return json.load(fh)


def run_dataset(run_dir: str) -> Tuple[Dict[str, Any], str]:
  """``(the run's config dict, its dataset folder)``."""
  cfg = _read_json(os.path.join(run_dir, RUN_CONFIG),
                   f"{run_dir} is not a kd_jax run directory")
  if cfg.get("task") != "lm":
    raise ValueError(f"{run_dir} is not a language-model run (config.json "
                     f"task={cfg.get('task')!r}, expected 'lm')")
  if cfg.get("mode") == "seed_experiment":
    raise ValueError(f"{run_dir} is a seed experiment; pass one phase's run "
                     f"directory, e.g. {os.path.join(run_dir, 'seed0', 'teacher')}")
  data = cfg.get("data") or {}
  try:
    folder = os.path.join(data["data_dir"], data["name"],
                          data.get("version", "1.0.0"))
  except KeyError as e:
    raise ValueError(f"{run_dir}/config.json: data section lacks {e}") from None
  return cfg, folder


def load_lm_run(run_dir: str):
  """``(model, variables, dataset folder)`` of an LM run's trained model.

  The architecture comes from the run's ``student`` section and the
  dataset's ``kd_jax_text.json`` (vocabulary, sequence length), exactly as
  the trainer builds it; the variables from the newest checkpoint under
  ``run_dir/checkpoints`` (shapes checked against the architecture).
  """
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from kd_jax.models import lm
  from kd_jax.train import checkpoints as ckpt_lib
  # pylint: enable=g-import-not-at-top

  cfg, folder = run_dataset(run_dir)
  meta = _read_json(os.path.join(folder, "kd_jax_text.json"),
                    f"the dataset of run {run_dir}")
  spec = cfg.get("model") or cfg.get("student") or {}  # (earlier runs)
  if spec.get("hf_dir"):
    config = lm.config_from_hf(_read_json(
        os.path.join(spec["hf_dir"], "config.json"), "the run's student.hf_dir"))
  else:
    config = lm.preset_config(
        spec.get("preset", ""), vocab_size=int(meta["vocab_size"]),
        max_position_embeddings=int(meta["seq_len"]),
        **dict(spec.get("overrides") or {}))
  model = lm.Transformer(config, dtype=jnp.dtype(spec.get("dtype",
                                                          "float32")))
  expected = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))
  ckdir = os.path.join(run_dir, "checkpoints")
  try:
    variables = ckpt_lib.load_teacher_variables(ckdir, expected)
  except ckpt_lib.CheckpointError as e:
    raise ValueError(f"run {run_dir}: {e}") from None
  return model, variables, folder


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run_dir", required=True, help="an LM run's workdir")
  p.add_argument("--out", required=True, help="folder to write")
  p.add_argument("--model_type", choices=("llama", "qwen2"), default=None)
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32")
  args = p.parse_args(argv)
  try:
    from kd_jax.models import lm  # pylint: disable=g-import-not-at-top
    model, variables, folder = load_lm_run(args.run_dir)
    tok = os.path.join(folder, "tokenizer.json")
    lm.save_hf_folder(args.out, model.config, variables,
                      tokenizer=tok if os.path.isfile(tok) else None,
                      model_type=args.model_type, dtype=args.dtype)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"export_hf: {e}")
  print(f"wrote {args.out} ({model.config.num_params:,} parameters, "
        f"{args.dtype})")


if __name__ == "__main__":
  main()
