r"""Llama-architecture decoder-only transformer in Flax linen.

Pre-norm blocks :math:`h \leftarrow h + \mathrm{Attn}(\mathrm{RMSNorm}(h))`,
:math:`h \leftarrow h + \mathrm{SwiGLU}(\mathrm{RMSNorm}(h))`, a final RMSNorm
and a linear head (optionally the transposed token embedding).

* RMSNorm (Zhang & Sennrich, 2019): :math:`y = g \odot x /
  \sqrt{\mathrm{mean}(x^2) + \epsilon}`, statistics in float32.
* RoPE (Su et al., 2021) in the "rotate-half" layout of Hugging Face's
  ``LlamaRotaryEmbedding``: frequencies :math:`\theta^{-2i/d_h}`,
  :math:`i < d_h/2`, applied to the two halves of each head.
* Grouped-query attention (Ainslie et al., 2023): ``num_kv_heads`` key/value
  heads shared by ``num_heads / num_kv_heads`` query heads each; scores
  scaled by :math:`d_h^{-1/2}`, causal, softmax in float32.
* SwiGLU MLP (Shazeer, 2020): :math:`W_d(\mathrm{silu}(W_g x) \odot W_u x)`.
* Qwen2 variant: bias on the q/k/v projections.

``dtype`` is the compute dtype (bfloat16 by default); parameters are float32.
Every kernel carries logical axis names (``vocab``, ``embed``, ``heads``,
``kv``, ``mlp``) via ``nn.with_logical_partitioning``, so ``model.init``
returns ``nn.LogicallyPartitioned`` boxes that sharding rules map to a mesh
(``nn.logical_to_mesh_sharding``); ``model.apply`` takes boxed or plain
parameters.

Call contract (as the rest of the zoo)::

  logits, features = model.apply(variables, tokens, train=False)

with ``tokens`` int ``[B, T]``, ``logits`` ``[B, T, V]`` (``None`` with
``logits=False``: the head is skipped), ``features["hidden"]`` the final
normed hidden state ``[B, T, D]`` (the input of the head, what a fused
head loss needs) and ``features["stages"]`` the output of every block.
With ``cache=`` (see `init_cache`) the tokens are placed at cache slots
``cache["index"] + arange(T)``, attend to everything cached before them, and
``features["cache"]`` is the updated cache. ``attention_mask`` ``[B, T]``
(False = padding) hides padded keys and ``positions`` ``[B, T]`` overrides
the RoPE positions (left-padded prompts; see `generate`).

Example:

>>> import jax, jax.numpy as jnp
>>> from kd_jax.models import lm
>>> config = lm.LMConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
...                      num_layers=2, num_heads=4, num_kv_heads=2)
>>> model = lm.Transformer(config)
>>> tokens = jnp.zeros((2, 7), jnp.int32)
>>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
>>> logits, feats = jax.eval_shape(
...     lambda v: model.apply(v, tokens, train=False), variables)
>>> logits.shape, logits.dtype, feats["hidden"].shape
((2, 7, 100), dtype(bfloat16), (2, 7, 32))

References:
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
  2023 (meta-llama/llama); Qwen Team, "Qwen2 Technical Report", 2024;
  Hugging Face transformers ``modeling_llama.py`` / ``modeling_qwen2.py``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models.lm.config import LMConfig

Array = jax.Array
CAPTURE = ("hidden_states", "attention")


def _init(config: LMConfig, names):
  """Normal(0, initializer_range) kernel init with logical axis names."""
  return nn.with_logical_partitioning(
      nn.initializers.normal(config.initializer_range), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class RMSNorm(nn.Module):
  """RMSNorm with float32 statistics; output cast to ``dtype``."""
  eps: float
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ("embed",)),
        (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return scale.astype(self.dtype) * y


def rope_inv_freq(config: LMConfig) -> np.ndarray:
  r"""RoPE inverse frequencies ``[head_dim / 2]`` (float32 constant).

  Default :math:`\theta^{-2i/d_h}`; ``linear`` divides them by the factor;
  ``llama3`` divides the low-frequency band (wavelength above
  ``original_max / low_freq_factor``) by the factor, keeps the
  high-frequency band (below ``original_max / high_freq_factor``) and
  interpolates linearly in ``original_max / wavelength`` between
  (Llama 3.1, as Hugging Face's ``_compute_llama3_parameters``).
  """
  dh = config.head_dim
  inv = 1.0 / config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64)
                                    / dh)
  if config.rope_type == "linear":
    inv = inv / config.rope_factor
  elif config.rope_type == "llama3":
    factor, old = config.rope_factor, config.rope_original_max_position
    lo, hi = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    inv = np.where(mid, (1 - smooth) * scaled / factor + smooth * scaled,
                   scaled)
  return inv.astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq) -> tuple:
  """cos, sin of shape ``[..., head_dim]`` (float32) for integer positions."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotate-half RoPE on ``x`` ``[B, T, H, Dh]`` with cos/sin ``[B, T, Dh]``."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE and an optional KV cache.

  With `capture` the call also returns ``{"q", "k", "v"}`` (after the
  projections, q and k after RoPE; ``[B, T, H or KVH, Dh]``) for attention
  distillation, else None.
  """
  config: LMConfig
  dtype: Any = jnp.bfloat16
  capture: bool = False

  def _proj(self, heads, bias, name):
    c = self.config
    return nn.DenseGeneral(
        (heads, c.head_dim), use_bias=bias, dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=_init(c, ("embed", "heads", "kv")),
        bias_init=_zeros(("heads", "kv")), name=name)

  @nn.compact
  def __call__(self, x, ctx, layer_cache=None):
    """`ctx`: (RoPE positions [B,T], query slots [B,T], key mask [B,S] or
    None, cache index or None) -- see `Transformer._context`."""
    c = self.config
    positions, q_slots, key_mask, cache_index = ctx
    q = self._proj(c.num_heads, c.qkv_bias, "q_proj")(x)
    k = self._proj(c.num_kv_heads, c.qkv_bias, "k_proj")(x)
    v = self._proj(c.num_kv_heads, c.qkv_bias, "v_proj")(x)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(c))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    captured = {"q": q, "k": k, "v": v} if self.capture else None
    new_cache = None
    if layer_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(
          layer_cache["k"], k.astype(layer_cache["k"].dtype), cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(
          layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, 1)
      new_cache = {"k": k, "v": v}
    k_slots = jnp.arange(k.shape[1])
    out = _gqa(q, k.astype(self.dtype), v.astype(self.dtype), q_slots,
               k_slots, key_mask)
    out = nn.DenseGeneral(
        c.hidden_size, axis=(-2, -1), use_bias=c.o_bias, dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=_init(c, ("heads", "kv", "embed")),
        bias_init=_zeros(("embed",)), name="o_proj")(out)
    return out, new_cache, captured


def _gqa(q, k, v, q_slots, k_slots, key_mask):
  """Causal GQA: q ``[B,T,H,Dh]``, k/v ``[B,S,KVH,Dh]`` -> ``[B,T,H,Dh]``.

  The query at slot i sees the keys at slots j <= i whose `key_mask` is
  True.
  """
  b, t, h, dh = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  mask = k_slots[None, None, :] <= q_slots[:, :, None]  # [B, T, S]
  if key_mask is not None:
    mask = mask & key_mask[:, None, :]
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, dh)


class SwiGLU(nn.Module):
  config: LMConfig
  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    c = self.config

    def dense(features, names, name):
      return nn.Dense(features, use_bias=c.mlp_bias, dtype=self.dtype,
                      param_dtype=jnp.float32, kernel_init=_init(c, names),
                      bias_init=_zeros(names[-1:]), name=name)

    gate = dense(c.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
    up = dense(c.intermediate_size, ("embed", "mlp"), "up_proj")(x)
    return dense(c.hidden_size, ("mlp", "embed"), "down_proj")(
        nn.silu(gate) * up)


class DecoderBlock(nn.Module):
  config: LMConfig
  dtype: Any = jnp.bfloat16
  capture: bool = False

  @nn.compact
  def __call__(self, h, ctx, layer_cache=None):
    c = self.config
    a, new_cache, captured = Attention(c, self.dtype, self.capture,
                                       name="self_attn")(
        RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(h),
        ctx, layer_cache)
    h = h + a
    h = h + SwiGLU(c, self.dtype, name="mlp")(
        RMSNorm(c.rms_norm_eps, self.dtype,
                name="post_attention_layernorm")(h))
    return h, new_cache, captured


class _ScannedBlock(DecoderBlock):
  """`DecoderBlock` in ``nn.scan``'s form: carry ``h``, outputs ``(h, cache)``."""

  @nn.compact
  def __call__(self, h, ctx, layer_cache=None):
    h, new_cache, captured = DecoderBlock.__call__(self, h, ctx, layer_cache)
    return h, (h, new_cache, captured)


def scanned_blocks(config: LMConfig, dtype, remat: bool, h, ctx, cache,
                   name: str = "layers", capture: bool = False):
  """All blocks as one ``nn.scan`` (call inside a compact method).

  Parameters are stacked along a leading ``'layers'`` logical axis (path
  ``layers/self_attn/q_proj/kernel`` ``[L, D, H, Dh]``), the KV cache is
  ``{"k": [L, B, S, KVH, Dh], "v": ...}``. Returns ``(h, stages [L, B, T,
  D], new cache layers or None, captured q/k/v stacked [L, ...] or
  None)``.
  """
  block = nn.remat(_ScannedBlock, prevent_cse=False) if remat else \
      _ScannedBlock
  scan = nn.scan(block, variable_axes={"params": 0},
                 split_rngs={"params": True}, in_axes=(nn.broadcast, 0),
                 length=config.num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  h, (stages, new_layers, captured) = scan(config, dtype, capture,
                                           name=name)(h, ctx, cache)
  return h, stages, new_layers, captured


class Transformer(nn.Module):
  """Llama / Qwen2 decoder; see the module docstring for the contract.

  Attributes:
    config: the architecture.
    dtype: compute dtype (parameters are float32).
    remat: recompute each block's activations in the backward pass
      (``nn.remat``; same parameters and values, less activation memory).
    capture: extra features for intermediate-layer distillation:
      ``'hidden_states'`` (``features["hidden_states"]``: the embeddings and
      every block's output, ``num_layers + 1`` arrays ``[B, T, D]``, as
      Hugging Face's ``output_hidden_states`` before the final norm) and
      ``'attention'`` (``features["attention"]``: per block ``{"q", "k",
      "v"}``, see `Attention`).
    scan_layers: run the blocks as one ``nn.scan`` (`scanned_blocks`):
      one compiled block body instead of ``num_layers`` copies (compile
      time, memory planning at 32-80 layers), same values. Parameters are
      stacked (`kd_jax.models.lm.layout` converts between the layouts) and
      so is the KV cache (``init_cache(..., scan_layers=True)``).
  """
  config: LMConfig
  dtype: Any = jnp.bfloat16
  remat: bool = False
  capture: Tuple[str, ...] = ()
  scan_layers: bool = False

  def _check_tokens(self, tokens, cache):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an int array [batch, time], got "
                       f"{tokens.dtype}{list(tokens.shape)}")
    limit = self.config.max_position_embeddings
    length = tokens.shape[1] if cache is None else cache_length(cache)
    if length > limit:
      raise ValueError(f"sequence length {length} exceeds the model's "
                       f"max_position_embeddings {limit}")

  @staticmethod
  def _context(tokens, cache, positions, attention_mask):
    """(positions, query slots, key mask, cache index), new cache mask."""
    b, t = tokens.shape
    index = None if cache is None else cache["index"]
    start = 0 if cache is None else index
    slots = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    positions = slots if positions is None else positions
    key_mask = (None if attention_mask is None else
                attention_mask.astype(bool))
    new_mask = None
    if cache is not None:
      chunk = (jnp.ones((b, t), bool) if attention_mask is None else
               attention_mask.astype(bool))
      new_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], chunk,
                                                     index, 1)
      key_mask = new_mask
    return (positions, slots, key_mask, index), new_mask

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, logits: bool = True,
               cache: Optional[dict] = None, positions=None,
               attention_mask=None):
    """See the module docstring; `positions` ``[B, T]`` overrides the RoPE
    positions and `attention_mask` ``[B, T]`` (False = padding) hides those
    keys (left-padded prompts)."""
    del train  # no dropout: the same function in training and evaluation
    c = self.config
    self._check_tokens(tokens, cache)
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                     param_dtype=jnp.float32,
                     embedding_init=_init(c, ("vocab", "embed")),
                     name="embed_tokens")
    h = embed(tokens)
    ctx, new_mask = self._context(tokens, cache, positions, attention_mask)
    unknown = set(self.capture) - set(CAPTURE)
    if unknown:
      raise ValueError(f"capture: unknown features {sorted(unknown)}; valid: "
                       f"{CAPTURE}.")
    embedded, qkv = h, "attention" in self.capture
    if self.scan_layers:
      h, stacked, new_layers, captured = scanned_blocks(
          c, self.dtype, self.remat, h, ctx,
          None if cache is None else cache["layers"], capture=qkv)
      stages = [stacked[i] for i in range(c.num_layers)]
      attention = [None if captured is None else jax.tree.map(
          lambda x, i=i: x[i], captured) for i in range(c.num_layers)]
    else:
      stages, new_layers, attention = [], [], []
      block = nn.remat(DecoderBlock) if self.remat else DecoderBlock
      for i in range(c.num_layers):
        layer_cache = None if cache is None else cache["layers"][i]
        h, new, captured = block(c, self.dtype, qkv, name=f"layers_{i}")(
            h, ctx, layer_cache)
        stages.append(h)
        new_layers.append(new)
        attention.append(captured)
    h = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(h)
    features = {"hidden": h, "stages": stages}
    if "hidden_states" in self.capture:
      features["hidden_states"] = [embedded] + stages
    if "attention" in self.capture:
      features["attention"] = attention
    if cache is not None:
      features["cache"] = {"index": cache["index"] + tokens.shape[1],
                           "mask": new_mask, "layers": new_layers}
    if not logits:
      return None, features
    if c.tie_word_embeddings:
      out = embed.attend(h)
    else:
      out = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                     param_dtype=jnp.float32,
                     kernel_init=_init(c, ("embed", "vocab")),
                     name="lm_head")(h)
    return out, features


def init_cache(config: LMConfig, batch_size: int, max_length: int,
               dtype=jnp.bfloat16, scan_layers: bool = False) -> dict:
  """An empty KV cache for `max_length` positions (index 0).

  Layout: ``{"index": int32 scalar, "mask": bool [B, S] (slots holding a
  real token), "layers": [{"k": [B, S, KVH, Dh], "v": ...}] * num_layers}``;
  with `scan_layers` (a ``Transformer(scan_layers=True)``) ``"layers"`` is
  one ``{"k": [L, B, S, KVH, Dh], "v": ...}``.
  """
  if max_length > config.max_position_embeddings:
    raise ValueError(f"sequence length {max_length} exceeds the model's "
                     f"max_position_embeddings "
                     f"{config.max_position_embeddings}")
  shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
  if scan_layers:
    shape = (config.num_layers,) + shape
    layers = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  else:
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
              for _ in range(config.num_layers)]
  return {"index": jnp.zeros((), jnp.int32),
          "mask": jnp.zeros((batch_size, max_length), bool),
          "layers": layers}


def cache_length(cache: dict) -> int:
  """Number of positions a cache holds (static)."""
  layers = cache["layers"]
  if isinstance(layers, dict):  # stacked (scan_layers)
    return int(np.shape(layers["k"])[2])
  return int(np.shape(layers[0]["k"])[1]) if layers else 0


def head_kernel(variables, config: LMConfig) -> Array:
  """The head kernel ``[D, V]`` (the transposed embedding when tied)."""
  params = nn.unbox(variables)["params"]
  if config.tie_word_embeddings:
    return params["embed_tokens"]["embedding"].T
  return params["lm_head"]["kernel"]
