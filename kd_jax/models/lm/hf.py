"""Import of Hugging Face Llama / Qwen2 checkpoints (no torch needed).

* `from_hf(hf_config, state_dict)`: a ``config.json`` dict and a
  ``{name: numpy array}`` state dict (``LlamaForCausalLM`` /
  ``Qwen2ForCausalLM`` names, with or without the ``model.`` prefix) ->
  ``(Transformer, variables)``. PyTorch ``Linear`` weights ``[out, in]``
  become Flax kernels ``[in, out]`` (reshaped per head for q/k/v/o).
  Tied checkpoints (``tie_word_embeddings``) need no ``lm_head.weight``.
* `load_hf_folder(path)`: the same from a checkpoint folder
  (``config.json`` + ``*.safetensors`` read with ``safetensors.numpy``),
  plus its ``tokenizer.json`` when present (`load_tokenizer`).

All key problems (missing, unexpected, wrong shape) are reported in one
error.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from kd_jax.models.lm.config import LMConfig
from kd_jax.models.lm.config import config_from_hf
from kd_jax.models.lm.layout import stack_layers
from kd_jax.models.lm.model import Transformer

# Buffers older checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _linear(w, shape):
  """torch Linear weight [out, in] -> Flax kernel [in, *out_shape]."""
  return np.ascontiguousarray(w.T).reshape(shape)


def _layer_specs(c: LMConfig, i: int):
  """(hf name, hf shape, flax path, converter) for one decoder block."""
  d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
  h, kvh = c.num_heads, c.num_kv_heads
  p = f"model.layers.{i}."
  fp = (f"layers_{i}",)
  specs = []
  for name, heads in (("q_proj", h), ("k_proj", kvh), ("v_proj", kvh)):
    specs.append((p + f"self_attn.{name}.weight", (heads * hd, d),
                  fp + ("self_attn", name, "kernel"),
                  lambda w, heads=heads: _linear(w, (d, heads, hd))))
    if c.qkv_bias:
      specs.append((p + f"self_attn.{name}.bias", (heads * hd,),
                    fp + ("self_attn", name, "bias"),
                    lambda w, heads=heads: w.reshape(heads, hd)))
  specs.append((p + "self_attn.o_proj.weight", (d, h * hd),
                fp + ("self_attn", "o_proj", "kernel"),
                lambda w: _linear(w, (h, hd, d))))
  if c.o_bias:
    specs.append((p + "self_attn.o_proj.bias", (d,),
                  fp + ("self_attn", "o_proj", "bias"), lambda w: w))
  for name, out_dim, in_dim in (("gate_proj", f, d), ("up_proj", f, d),
                                ("down_proj", d, f)):
    specs.append((p + f"mlp.{name}.weight", (out_dim, in_dim),
                  fp + ("mlp", name, "kernel"), lambda w: np.ascontiguousarray(
                      w.T)))
    if c.mlp_bias:
      specs.append((p + f"mlp.{name}.bias", (out_dim,),
                    fp + ("mlp", name, "bias"), lambda w: w))
  for name in ("input_layernorm", "post_attention_layernorm"):
    specs.append((p + f"{name}.weight", (d,), fp + (name, "scale"),
                  lambda w: w))
  return specs


def param_specs(c: LMConfig):
  """All (hf name, hf shape, flax path, converter) of a checkpoint."""
  specs = [("model.embed_tokens.weight", (c.vocab_size, c.hidden_size),
            ("embed_tokens", "embedding"), lambda w: w)]
  for i in range(c.num_layers):
    specs += _layer_specs(c, i)
  specs.append(("model.norm.weight", (c.hidden_size,), ("norm", "scale"),
                lambda w: w))
  if not c.tie_word_embeddings:
    specs.append(("lm_head.weight", (c.vocab_size, c.hidden_size),
                  ("lm_head", "kernel"), lambda w: np.ascontiguousarray(w.T)))
  return specs


def _normalize_keys(state_dict: Mapping[str, Any]) -> dict:
  """Adds the ``model.`` prefix when the checkpoint is a bare base model."""
  if any(k.startswith("model.") for k in state_dict):
    return dict(state_dict)
  return {(k if k == "lm_head.weight" else "model." + k): v
          for k, v in state_dict.items()}


def _check_keys(c: LMConfig, state: dict, specs) -> None:
  expected = {name: shape for name, shape, _, _ in specs}
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(
      k for k in state if k not in expected
      and not k.endswith(_IGNORED_SUFFIXES)
      and not (c.tie_word_embeddings and k == "lm_head.weight"))
  shapes = [f"{k}: {tuple(np.shape(state[k]))} (expected {expected[k]})"
            for k in sorted(set(expected) & set(state))
            if tuple(np.shape(state[k])) != expected[k]]
  if c.tie_word_embeddings and "lm_head.weight" in state and not shapes:
    if not np.array_equal(np.asarray(state["lm_head.weight"]),
                          np.asarray(state["model.embed_tokens.weight"])):
      shapes.append("lm_head.weight differs from model.embed_tokens.weight "
                    "but the config has tie_word_embeddings=True")
  problems = []
  for what, items in (("missing", missing), ("unexpected", unexpected),
                      ("mis-shaped", shapes)):
    if items:
      shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)"
                                      if len(items) > 8 else "")
      problems.append(f"{what} keys: {shown}")
  if problems:
    raise ValueError("HF checkpoint does not match its config: "
                     + "; ".join(problems))


def from_hf(hf_config: Mapping[str, Any], state_dict: Mapping[str, Any], *,
            dtype=jnp.bfloat16, scan_layers: bool = False):
  """``(Transformer, variables)`` from an HF config dict and a state dict.

  Args:
    hf_config: the ``config.json`` dictionary (Llama or Qwen2).
    state_dict: ``{name: numpy array}`` (any float dtype; stored as float32).
    dtype: the compute dtype of the returned model.
    scan_layers: return a ``Transformer(scan_layers=True)`` with its
      blocks' parameters stacked (`kd_jax.models.lm.layout.stack_layers`).
  """
  config = config_from_hf(hf_config)
  state = _normalize_keys(state_dict)
  specs = param_specs(config)
  _check_keys(config, state, specs)
  params: dict = {}
  for name, _, path, convert in specs:
    value = convert(np.asarray(state[name], dtype=np.float32))
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value, jnp.float32)
  if scan_layers:
    params = stack_layers(params, config.num_layers)
  return (Transformer(config, dtype=dtype, scan_layers=scan_layers),
          {"params": params})


def load_tokenizer(path: str, *, vocab_size: Optional[int] = None):
  """A `tokenizers.Tokenizer` from ``tokenizer.json`` (or its folder).

  With `vocab_size` (the model's), a tokenizer that can emit ids the
  model's embedding does not have is an error. (A model vocabulary larger
  than the tokenizer's is fine: checkpoints often pad it.)
  """
  import tokenizers  # pylint: disable=g-import-not-at-top

  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer file at {path}")
  try:
    tok = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  (tokenizers' errors)
    raise ValueError(f"tokenizer file {path} cannot be read "
                     f"({_first_line(e)}): truncated or not a tokenizer"
                     ) from None
  if vocab_size is not None:
    check_tokenizer(tok, vocab_size)
  return tok


def check_tokenizer(tokenizer, vocab_size: int) -> None:
  """Error if `tokenizer` has ids >= the model's `vocab_size`."""
  n = tokenizer.get_vocab_size(with_added_tokens=True)
  if n > vocab_size:
    raise ValueError(f"tokenizer vocabulary ({n} tokens) does not fit the "
                     f"model's vocab_size {vocab_size}")


def read_safetensors(path: str) -> dict:
  """``{name: numpy array}`` of a ``.safetensors`` file.

  Uses ``safetensors``' NumPy API; bfloat16 tensors (which NumPy cannot
  hold) are read through its Flax API and cast to float32.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  out = {}
  try:
    with safe_open(path, framework="numpy") as fh:
      for name in fh.keys():
        try:
          out[name] = fh.get_tensor(name)
        except TypeError:  # bfloat16
          with safe_open(path, framework="flax") as fj:
            out[name] = np.asarray(fj.get_tensor(name).astype(jnp.float32))
  except (OSError, ValueError) as e:
    raise ValueError(f"weights file {path} cannot be read "
                     f"({_first_line(e)}): truncated or damaged") from None
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError)
    if type(e).__name__ != "SafetensorError":
      raise
    raise ValueError(f"weights file {path} cannot be read "
                     f"({_first_line(e)}): truncated or damaged") from None
  return out


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_hf_folder(path: str, *, dtype=jnp.bfloat16,
                   scan_layers: bool = False):
  """``(model, variables, tokenizer or None)`` from a checkpoint folder."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"checkpoint folder {path} has no config.json")
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"checkpoint folder {path} has no *.safetensors "
                            "weights")
  with open(cfg_path) as fh:
    hf_config = json.load(fh)
  state: dict = {}
  for f in files:
    state.update(read_safetensors(f))
  model, variables = from_hf(hf_config, state, dtype=dtype,
                             scan_layers=scan_layers)
  tok_path = os.path.join(path, "tokenizer.json")
  tokenizer = None
  if os.path.isfile(tok_path):
    tokenizer = load_tokenizer(tok_path,
                               vocab_size=model.config.vocab_size)
  return model, variables, tokenizer
