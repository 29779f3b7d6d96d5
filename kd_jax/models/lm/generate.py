r"""Compiled autoregressive sampling with a KV cache.

`generate` runs the prompt through the model once (prefill, filling the KV
cache), then decodes one token per iteration of a ``lax.while_loop`` -- the
whole thing is one compiled program (no host loop per token) and can be
called inside a jitted train step (on-policy distillation).

Sampling from the last position's logits :math:`z`:

* ``temperature == 0``: greedy, :math:`\arg\max_v z_v` (first index on ties,
  as ``torch.argmax``).
* otherwise :math:`z / \tau`, then top-k (keep the k largest logits) and
  top-p / nucleus (keep the smallest set of most probable tokens whose mass
  reaches p, always at least one; Holtzman et al., ICLR 2020), then a
  categorical draw -- the order of Hugging Face's logits warpers.

After a sequence emits ``eos_id`` every later token is ``pad_id`` (default
``eos_id``); the loop stops early once every sequence has finished.
Prompts of different lengths are left-padded to one length ``T`` with a
``prompt_mask`` (False on padding): padding is hidden from attention and
RoPE positions count real tokens only (as Hugging Face ``generate`` with an
``attention_mask``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kd_jax.models.lm.model import head_kernel
from kd_jax.models.lm.model import init_cache

Array = jax.Array


def filter_logits(logits: Array, *, temperature: float, top_k=None,
                  top_p=None) -> Array:
  """Temperature, top-k and top-p warping of ``[B, V]`` logits (float32).

  Removed entries become ``-inf``.
  """
  z = logits.astype(jnp.float32) / temperature
  neg = jnp.asarray(-jnp.inf, z.dtype)
  if top_k is not None and top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z < kth, neg, z)
  if top_p is not None and top_p < 1.0:
    sorted_z = jnp.sort(z, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_z, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_z, jnp.inf), axis=-1,
                        keepdims=True)
    z = jnp.where(z < threshold, neg, z)
  return z


def _next_token(logits, rng, step, temperature, top_k, top_p):
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = filter_logits(logits, temperature=temperature, top_k=top_k,
                    top_p=top_p)
  return jax.random.categorical(jax.random.fold_in(rng, step), z,
                                axis=-1).astype(jnp.int32)


def _check_args(model, prompt_tokens, max_new_tokens, temperature, top_k,
                top_p, rng):
  if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype,
                                                   jnp.integer):
    raise ValueError(f"prompt_tokens must be an int array [batch, time], got "
                     f"{prompt_tokens.dtype}{list(prompt_tokens.shape)}")
  if prompt_tokens.shape[1] < 1:
    raise ValueError("prompt_tokens must hold at least one token")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got "
                     f"{max_new_tokens!r}")
  total = prompt_tokens.shape[1] + max_new_tokens
  limit = model.config.max_position_embeddings
  if total > limit:
    raise ValueError(f"prompt length {prompt_tokens.shape[1]} + "
                     f"max_new_tokens {max_new_tokens} = {total} exceeds the "
                     f"model's max_position_embeddings {limit}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")


def generate(model, variables, prompt_tokens, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None,
             rng=None, pad_id: Optional[int] = None,
             prompt_mask=None) -> Array:
  """Samples continuations: int32 tokens ``[B, T + max_new_tokens]``.

  Args:
    model: a `Transformer` (its ``config`` and ``dtype`` are used).
    variables: its variables (boxed or plain).
    prompt_tokens: int ``[B, T]`` prompts, all of length T.
    max_new_tokens: tokens to append.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: keep only the k most likely tokens (sampling only).
    top_p: nucleus sampling mass (sampling only).
    eos_id: end-of-sequence id; tokens after it are ``pad_id``.
    rng: a PRNG key (needed when ``temperature > 0``).
    pad_id: filler after EOS (default ``eos_id``).
    prompt_mask: optional bool ``[B, T]``, False on left padding (the last
      prompt token of every row must be real).
  """
  _check_args(model, prompt_tokens, max_new_tokens, float(temperature), top_k,
              top_p, rng)
  if rng is None:
    rng = jax.random.key(0)
  if prompt_mask is None:
    prompt_mask = jnp.ones(prompt_tokens.shape, bool)
  elif prompt_mask.shape != prompt_tokens.shape:
    raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != "
                     f"prompt_tokens shape {tuple(prompt_tokens.shape)}")
  elif not isinstance(prompt_mask, jax.core.Tracer) and not bool(
      jnp.all(prompt_mask[:, -1])):
    raise ValueError("prompt_mask: prompts must be left-padded (the last "
                     "token of every row must be real)")
  pad = eos_id if pad_id is None else pad_id
  return _generate(model, float(temperature), top_k,
                   None if top_p is None else float(top_p), max_new_tokens,
                   eos_id, 0 if pad is None else int(pad), variables,
                   prompt_tokens.astype(jnp.int32), rng,
                   prompt_mask.astype(bool))


def make_generate_fn(model, *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: Optional[int] = None,
                     top_p: Optional[float] = None,
                     eos_id: Optional[int] = None,
                     pad_id: Optional[int] = None):
  """``fn(variables, prompts, rng) -> tokens``: `generate` with fixed
  settings, the form `kd_jax.train.lm_steps` takes (traceable: it can run
  inside a jitted train step)."""

  def fn(variables, prompts, rng):
    return generate(model, variables, prompts, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_k=top_k, top_p=top_p,
                    eos_id=eos_id, rng=rng, pad_id=pad_id)

  return fn


def _head(model, variables, hidden):
  """The model's head on ``hidden`` ``[B, D]``: the same product as its
  ``lm_head`` Dense / tied ``embed.attend`` (both operands in the compute
  dtype)."""
  kernel = head_kernel(variables, model.config)
  return jnp.dot(hidden.astype(model.dtype), kernel.astype(model.dtype))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _generate(model, temperature, top_k, top_p, max_new_tokens, eos_id, pad,
              variables, prompt, rng, prompt_mask):
  b, t = prompt.shape
  total = t + max_new_tokens
  cache = init_cache(model.config, b, total, model.dtype,
                     getattr(model, "scan_layers", False))
  lengths = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # real tokens
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  # prefill without the head: only the last position's logits are needed
  # (the head over all T positions would be a [B, T, V] array)
  _, feats = model.apply(variables, prompt, train=False, cache=cache,
                         positions=positions, attention_mask=prompt_mask,
                         logits=False)
  pick = functools.partial(_next_token, temperature=temperature, top_k=top_k,
                           top_p=top_p)
  tok = pick(_head(model, variables, feats["hidden"][:, -1]), rng, 0)
  out = jnp.concatenate(
      [prompt, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
  out = out.at[:, t].set(tok)
  done = (tok == eos_id) if eos_id is not None else jnp.zeros((b,), bool)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, cache, tok, done = carry
    logits, feats = model.apply(variables, tok[:, None], train=False,
                                cache=cache,
                                positions=(lengths + i - 1)[:, None])
    nxt = pick(logits[:, -1], rng, i)
    nxt = jnp.where(done, pad, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t + i, 1)
    if eos_id is not None:
      done = done | (nxt == eos_id)
    return i + 1, out, feats["cache"], nxt, done

  carry = (jnp.int32(1), out, feats["cache"], tok, done)
  return jax.lax.while_loop(cond, body, carry)[1]
