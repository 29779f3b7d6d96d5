"""Configuration of the Llama-family decoder and its parsing from HF configs.

`LMConfig` holds the architecture; `config_from_hf` reads a Hugging Face
``config.json`` dictionary (``model_type`` ``llama`` or ``qwen2``) as written by
old and new ``transformers`` (``rope_theta`` at the top level, or under
``rope_parameters`` since transformers 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Architecture of a Llama-style decoder-only transformer.

  Attributes:
    vocab_size: rows of the token embedding (= columns of the head).
    hidden_size: model width D.
    intermediate_size: SwiGLU hidden width F.
    num_layers: number of decoder blocks.
    num_heads: query heads H.
    num_kv_heads: key/value heads (grouped-query attention; H % KVH == 0).
    head_dim: per-head width (default D // H).
    rope_theta: RoPE base.
    rope_type: ``"default"``, ``"linear"`` (frequencies / ``rope_factor``)
      or ``"llama3"`` (Llama 3.1's frequency-band scaling with
      ``rope_factor``, ``rope_low_freq_factor``, ``rope_high_freq_factor``,
      ``rope_original_max_position``).
    rms_norm_eps: RMSNorm epsilon.
    max_position_embeddings: longest supported context (positions).
    tie_word_embeddings: the head is the transposed token embedding.
    qkv_bias: bias on q/k/v projections (Qwen2; Llama's ``attention_bias``).
    o_bias: bias on the output projection (Llama's ``attention_bias``).
    mlp_bias: bias on the SwiGLU projections (Llama's ``mlp_bias``).
    initializer_range: std of the normal init of kernels and embeddings.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"LMConfig.{name} must be a positive int, got "
                         f"{value!r}")
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(
            f"LMConfig: hidden_size {self.hidden_size} is not divisible by "
            f"num_heads {self.num_heads}; give head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"LMConfig: num_heads {self.num_heads} is not a multiple of "
          f"num_kv_heads {self.num_kv_heads}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"LMConfig: rope_type {self.rope_type!r} is not "
                       f"supported (expected one of {ROPE_TYPES})")
    if self.head_dim % 2:
      raise ValueError(f"LMConfig: head_dim must be even for RoPE, got "
                       f"{self.head_dim}")

  @property
  def num_params(self) -> int:
    """Number of parameters (embedding and head counted once when tied)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    hd, h, kvh = self.head_dim, self.num_heads, self.num_kv_heads
    attn = d * hd * (2 * h + 2 * kvh)
    attn += (h + 2 * kvh) * hd * self.qkv_bias + d * self.o_bias
    mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
    per_layer = attn + mlp + 2 * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + self.num_layers * per_layer + d + head


def _rope_fields(hf: Mapping[str, Any]) -> dict:
  """RoPE fields of `LMConfig` from ``rope_parameters`` (transformers >= 5)
  or the top-level ``rope_theta`` + ``rope_scaling`` (older versions)."""
  params = dict(hf.get("rope_scaling") or {})
  params.update(hf.get("rope_parameters") or {})
  rope_type = params.get("rope_type") or params.get("type") or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"HF config: rope type {rope_type!r} is not supported "
                     f"(expected one of {ROPE_TYPES})")
  out = {"rope_type": rope_type,
         "rope_theta": float(params.get("rope_theta",
                                        hf.get("rope_theta", 10000.0)))}
  if rope_type != "default":
    out["rope_factor"] = float(params["factor"])
  if rope_type == "llama3":
    out.update(
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_position=int(params.get(
            "original_max_position_embeddings",
            hf.get("max_position_embeddings", 8192))))
  return out


def config_from_hf(hf: Mapping[str, Any]) -> LMConfig:
  """`LMConfig` from a Hugging Face Llama / Qwen2 ``config.json`` dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"HF config: model_type {model_type!r} is not supported "
                     f"(expected one of {SUPPORTED_MODEL_TYPES})")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"HF config: hidden_act {act!r} is not supported "
                     "(SwiGLU needs 'silu')")
  if model_type == "qwen2" and hf.get("use_sliding_window", False):
    raise ValueError("HF config: Qwen2 sliding-window attention is not "
                     "supported")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads")
             if k not in hf]
  if missing:
    raise ValueError(f"HF config: missing keys {missing}")
  attention_bias = bool(hf.get("attention_bias", False))
  return LMConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf.get("num_key_value_heads")
                       or hf["num_attention_heads"]),
      head_dim=(int(hf["head_dim"]) if hf.get("head_dim") else None),
      **_rope_fields(hf),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=(model_type == "qwen2") or attention_bias,
      o_bias=attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
  )


# Small Llama-style sizes for CPU-scale experiments (vocabulary and context
# come from the data). Parameters at vocab 4096 (untied head):
# tiny ~0.07M + embeddings; llama_1m ~1.4M; llama_5m ~5.0M.
PRESETS = {
    "llama_tiny": dict(hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1),
    "llama_1m": dict(hidden_size=128, intermediate_size=344, num_layers=2,
                     num_heads=4, num_kv_heads=2),
    "llama_5m": dict(hidden_size=256, intermediate_size=688, num_layers=4,
                     num_heads=4, num_kv_heads=2),
}


def preset_config(name: str, *, vocab_size: int,
                  max_position_embeddings: int = 2048,
                  **overrides) -> LMConfig:
  """`LMConfig` of a `PRESETS` entry for a given vocabulary and context."""
  if name not in PRESETS:
    raise ValueError(f"unknown LM preset {name!r}; available: "
                     f"{sorted(PRESETS)}")
  kw = dict(PRESETS[name], vocab_size=vocab_size,
            max_position_embeddings=max_position_embeddings)
  kw.update(overrides)
  return LMConfig(**kw)
