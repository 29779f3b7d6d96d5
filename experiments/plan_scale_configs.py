"""The models, pairs and meshes of the pod-scale plan (`plan_scale`), in
their own module so that the plan's program and check modules read them
without importing the CLI."""

from __future__ import annotations

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA = {"model_type": "llama", "vocab_size": 128256, "hidden_act": "silu",
          "num_key_value_heads": 8, "max_position_embeddings": 131072,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
          "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": False}
# The published config.json fields (huggingface.co/meta-llama/<name>).
HF_CONFIGS = {
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32,
                         head_dim=64, tie_word_embeddings=True,
                         rope_scaling=dict(_LLAMA3_ROPE, factor=32.0)),
    "llama-3.1-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32),
    "llama-3.1-70b": dict(_LLAMA, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64),
    # CI / cross-check sizes (not published models)
    "tiny-teacher": dict(_LLAMA, vocab_size=512, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256),
    "tiny-student": dict(_LLAMA, vocab_size=512, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256,
                         tie_word_embeddings=True),
    "small-teacher": dict(_LLAMA, vocab_size=8192, hidden_size=512,
                          intermediate_size=1408, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=1024),
    "small-student": dict(_LLAMA, vocab_size=8192, hidden_size=256,
                          intermediate_size=704, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024,
                          tie_word_embeddings=True),
}
PAIRS = {"8b-1b": ("llama-3.1-8b", "llama-3.2-1b"),
         "70b-8b": ("llama-3.1-70b", "llama-3.1-8b"),
         "tiny": ("tiny-teacher", "tiny-student"),
         "small": ("small-teacher", "small-student")}
MESHES = ("fsdp", "fsdp_tensor", "data_fsdp")
PLACEMENTS = ("replicated", "fsdp", "tensor", "fsdp_tensor")
RESULT_TAG = "PLAN_RESULT "
CHECK_TAG = "PLAN_CHECK "
HLO_STATS_VERSION = 2  # results of older versions are recomputed (--resume)


def mesh_spec(name: str, devices: int, tensor: int, data: int) -> dict:
  if name == "fsdp":
    return {"fsdp": devices}
  if name == "fsdp_tensor":
    return {"fsdp": devices // tensor, "tensor": tensor}
  if name == "data_fsdp":
    return {"data": data, "fsdp": devices // data}
  raise ValueError(f"unknown mesh {name!r}; expected one of {MESHES}")


def row_key(row: dict) -> str:
  return "|".join(f"{k}={row[k]}" for k in sorted(row))
