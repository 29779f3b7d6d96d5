"""Export of a kd_jax LM to a Hugging Face checkpoint folder (no torch).

The inverse of `kd_jax.models.lm.hf`: a `Transformer`'s variables and its
`LMConfig` become a folder that ``transformers`` loads unchanged
(``AutoModelForCausalLM.from_pretrained`` -> ``LlamaForCausalLM`` or
``Qwen2ForCausalLM``, ``AutoTokenizer.from_pretrained``), e.g. to serve a
distilled student elsewhere:

* ``config.json``: the architecture (`config_to_hf`), RoPE as the
  ``rope_theta`` / ``rope_scaling`` keys every transformers version reads
  (4.x as they are; 5.x converts them to ``rope_parameters``);
* ``model.safetensors``: the parameters under their HF names (`to_hf`;
  Flax kernels ``[in, *out]`` become PyTorch ``Linear`` weights
  ``[out, in]``; a tied head writes no ``lm_head.weight``), float32 or
  bfloat16, with the ``{"format": "pt"}`` metadata transformers expects;
* with a tokenizer (a ``tokenizers.Tokenizer`` or a ``tokenizer.json``
  path, e.g. the dataset's from ``experiments/prepare_corpus.py``):
  ``tokenizer.json`` + ``tokenizer_config.json`` +
  ``special_tokens_map.json`` for ``PreTrainedTokenizerFast``; the EOS and
  pad tokens (kd_jax's ``<|endoftext|>`` / ``<|pad|>`` when present, or
  given) also go into ``config.json``.

`kd_jax.models.lm.load_hf_folder` reads the folder back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import numpy as np

from kd_jax.models.lm.config import LMConfig
from kd_jax.models.lm.hf import param_specs

MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# kd_jax's BPE tokenizers (`kd_jax.data.text`): looked up when not given.
_KD_EOS, _KD_PAD = "<|endoftext|>", "<|pad|>"


def _model_type(c: LMConfig, model_type: Optional[str]) -> str:
  """The HF family that holds `c`'s biases (Qwen2: q/k/v bias only)."""
  qwen2_ok = c.qkv_bias and not c.o_bias and not c.mlp_bias
  llama_ok = c.qkv_bias == c.o_bias  # Llama's attention_bias: all four
  if model_type is None:
    model_type = "qwen2" if qwen2_ok else "llama"
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got "
                     f"{model_type!r}")
  if model_type == "qwen2" and not qwen2_ok:
    raise ValueError("Qwen2 has a bias on q/k/v only: the config needs "
                     "qkv_bias=True, o_bias=False, mlp_bias=False")
  if model_type == "llama" and not llama_ok:
    raise ValueError("Llama's attention_bias covers q/k/v and o together: "
                     f"qkv_bias={c.qkv_bias} and o_bias={c.o_bias} differ")
  if c.hidden_size % c.num_heads:
    raise ValueError(f"transformers requires hidden_size ({c.hidden_size}) "
                     f"to be a multiple of num_heads ({c.num_heads})")
  return model_type


def _rope_scaling(c: LMConfig) -> Optional[Dict[str, Any]]:
  if c.rope_type == "default":
    return None
  out = {"rope_type": c.rope_type, "factor": c.rope_factor}
  if c.rope_type == "llama3":
    out.update(low_freq_factor=c.rope_low_freq_factor,
               high_freq_factor=c.rope_high_freq_factor,
               original_max_position_embeddings=c.rope_original_max_position)
  return out


def config_to_hf(config: LMConfig, *, model_type: Optional[str] = None,
                 bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None,
                 dtype: str = "float32") -> Dict[str, Any]:
  """The ``config.json`` dict of `config` (inverse of `config_from_hf`).

  `model_type` defaults to ``qwen2`` for a q/k/v-bias-only config and
  ``llama`` otherwise; a family that cannot hold the config's biases is an
  error.
  """
  c = config
  mt = _model_type(c, model_type)
  out = {
      "architectures": [MODEL_TYPES[mt]], "model_type": mt,
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": c.max_position_embeddings,
      "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
      "rope_scaling": _rope_scaling(c),
      "tie_word_embeddings": c.tie_word_embeddings,
      "initializer_range": c.initializer_range,
      "attention_dropout": 0.0, "use_cache": True, "torch_dtype": dtype,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
      "pad_token_id": pad_token_id,
  }
  if mt == "llama":
    out.update(attention_bias=c.o_bias, mlp_bias=c.mlp_bias)
  else:
    out.update(use_sliding_window=False, sliding_window=None,
               max_window_layers=c.num_layers)
  return out


def _is_linear(name: str) -> bool:
  return name.endswith("_proj.weight") or name == "lm_head.weight"


def to_hf(config: LMConfig, variables) -> Dict[str, np.ndarray]:
  """``{hf name: float32 array}`` of a model's variables (boxed or plain,
  on any devices; inverse of `from_hf`'s conversion)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  params = jax.device_get(nn.unbox(variables))["params"]
  out = {}
  for name, shape, path, _ in param_specs(config):
    node = params
    try:
      for key in path:
        node = node[key]
    except KeyError:
      raise ValueError(f"variables have no {'/'.join(path)} (needed for "
                       f"{name}); do they belong to this config?") from None
    w = np.asarray(node, np.float32)
    want = int(np.prod(shape))
    if w.size != want:
      raise ValueError(f"{'/'.join(path)} has shape {w.shape}, expected "
                       f"{want} values for {name} {shape}")
    if _is_linear(name):  # Flax [in, *out] -> torch Linear [out, in]
      w = w.reshape(shape[1], shape[0]).T
    out[name] = np.ascontiguousarray(w.reshape(shape))
  return out


def _load_tokenizer(tokenizer):
  if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
    return tokenizer
  from kd_jax.models.lm.hf import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(os.fspath(tokenizer))


def _special(tok, given, default_name, what):
  """(token string, id) of a special token: given string/id or default."""
  if given is None:
    if default_name is None or tok is None:
      return None, None
    tid = tok.token_to_id(default_name)
    return (default_name, tid) if tid is not None else (None, None)
  if isinstance(given, str):
    tid = None if tok is None else tok.token_to_id(given)
    if tid is None:
      raise ValueError(f"{what} {given!r} is not in the tokenizer")
    return given, tid
  return (None if tok is None else tok.id_to_token(int(given))), int(given)


def _write_tokenizer(path, tok, config, specials):
  tok.save(os.path.join(path, "tokenizer.json"))
  tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",
             "model_max_length": config.max_position_embeddings,
             "clean_up_tokenization_spaces": False}
  special_map = {f"{k}_token": s for k, (s, _) in specials.items()
                 if s is not None}
  tok_cfg.update(special_map)
  for name, obj in (("tokenizer_config.json", tok_cfg),
                    ("special_tokens_map.json", special_map)):
    with open(os.path.join(path, name), "w") as fh:
      json.dump(obj, fh, indent=2)


def save_hf_folder(path: str, config: LMConfig, variables, *,
                   tokenizer=None, model_type: Optional[str] = None,
                   dtype: str = "float32", eos_token=None, pad_token=None,
                   bos_token=None) -> str:
  """Writes `variables` of a `Transformer` with `config` as an HF folder.

  Args:
    path: the folder (created; existing files of the same names are
      replaced).
    config: the model's `LMConfig` (``model.config``).
    variables: its variables (boxed or plain).
    tokenizer: a ``tokenizers.Tokenizer``, a ``tokenizer.json`` path or a
      folder holding one; None writes no tokenizer. Its vocabulary must fit
      ``config.vocab_size``.
    model_type: ``"llama"`` or ``"qwen2"`` (default: see `config_to_hf`).
    dtype: ``"float32"`` or ``"bfloat16"`` (the stored weights).
    eos_token, pad_token, bos_token: a token string or id; default: kd_jax's
      ``<|endoftext|>`` (EOS) and ``<|pad|>`` (pad) when the tokenizer has
      them, no BOS.

  Returns:
    `path`.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  tok = _load_tokenizer(tokenizer)
  if tok is not None:
    from kd_jax.models.lm.hf import check_tokenizer  # pylint: disable=g-import-not-at-top
    check_tokenizer(tok, config.vocab_size)
  specials = {"eos": _special(tok, eos_token, _KD_EOS, "eos_token"),
              "pad": _special(tok, pad_token, _KD_PAD, "pad_token"),
              "bos": _special(tok, bos_token, None, "bos_token")}
  for k, (_, tid) in specials.items():
    if tid is not None and not 0 <= tid < config.vocab_size:
      raise ValueError(f"{k}_token id {tid} is outside the vocabulary "
                       f"[0, {config.vocab_size})")
  hf_config = config_to_hf(
      config, model_type=model_type, dtype=dtype,
      **{f"{k}_token_id": tid for k, (_, tid) in specials.items()})
  state = to_hf(config, variables)
  os.makedirs(path, exist_ok=True)
  weights = os.path.join(path, "model.safetensors")
  if dtype == "float32":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(state, weights, metadata={"format": "pt"})
  else:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: jnp.asarray(v, jnp.bfloat16) for k, v in state.items()},
              weights, metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(hf_config, fh, indent=2)
  if tok is not None:
    _write_tokenizer(path, tok, config, specials)
  return path
