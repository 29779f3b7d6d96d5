"""Llama-family decoder-only language models (Llama, Qwen2) in Flax.

* `Transformer` / `LMConfig`: the model (see `kd_jax.models.lm.model`).
* `generate`: compiled KV-cache sampling (greedy, temperature, top-k, top-p;
  MiniLLM's teacher-mixed sampling).
* `from_hf` / `load_hf_folder` / `load_tokenizer`: Hugging Face checkpoint
  and tokenizer import (safetensors + tokenizers, no torch).
* `save_hf_folder` / `to_hf` / `config_to_hf`: export to a Hugging Face
  folder that transformers loads unchanged.
* `head_kernel`: the head kernel ``[D, V]`` for fused head losses.
* `stack_layers` / `unstack_layers`: parameters of ``scan_layers=True`` <->
  one subtree per block.
"""

from kd_jax.models.lm.config import LMConfig
from kd_jax.models.lm.config import PRESETS
from kd_jax.models.lm.config import config_from_hf
from kd_jax.models.lm.config import preset_config
from kd_jax.models.lm.export import config_to_hf
from kd_jax.models.lm.export import save_hf_folder
from kd_jax.models.lm.export import to_hf
from kd_jax.models.lm.generate import check_token_ids
from kd_jax.models.lm.generate import filter_logits
from kd_jax.models.lm.generate import generate
from kd_jax.models.lm.generate import make_generate_fn
from kd_jax.models.lm.hf import check_tokenizer
from kd_jax.models.lm.hf import from_hf
from kd_jax.models.lm.hf import load_hf_folder
from kd_jax.models.lm.hf import load_tokenizer
from kd_jax.models.lm.hf import read_safetensors
from kd_jax.models.lm.layout import stack_layers
from kd_jax.models.lm.layout import unstack_layers
from kd_jax.models.lm.model import Transformer
from kd_jax.models.lm.model import cache_length
from kd_jax.models.lm.model import head_kernel
from kd_jax.models.lm.model import init_cache
from kd_jax.models.lm.model import rope_cos_sin
from kd_jax.models.lm.model import rope_inv_freq

__all__ = [
    "LMConfig", "PRESETS", "Transformer", "cache_length", "check_token_ids",
    "check_tokenizer", "config_from_hf", "config_to_hf", "filter_logits",
    "from_hf", "generate", "head_kernel",
    "init_cache", "load_hf_folder", "load_tokenizer", "make_generate_fn",
    "preset_config", "read_safetensors", "save_hf_folder", "to_hf",
    "rope_cos_sin", "rope_inv_freq", "stack_layers", "unstack_layers",
]
