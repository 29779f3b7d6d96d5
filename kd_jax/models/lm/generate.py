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

Teacher-mixed sampling (MiniLLM, Gu et al., ICLR 2024): with
``mix_in_model`` / ``mix_in_variables`` / ``mix_in_alpha`` a second model
(the teacher) runs alongside with its own KV cache and every token is drawn
from :math:`(1-\alpha)\,\mathrm{softmax}(\tilde z^s) + \alpha\,
\mathrm{softmax}(\tilde z^t)`, both logits warped by the same temperature /
top-k / top-p (greedy decoding takes the argmax of that mixture of
temperature-1 softmaxes) -- the authors' ``mix_in_model`` / ``mix_in_alpha``
of their transformers fork (github.com/t1101675/transformers, branch
``minillm``, ``GenerationMixin._sample``).

Prompt token ids are checked against the vocabulary on the host when the
prompts are concrete (one line naming the id); traced prompts (inside a
jitted step) are not checked -- their range is the data pipeline's to
guarantee.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

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


def _mixture_log_probs(z, mix_z, alpha):
  """``log((1 - alpha) softmax(z) + alpha softmax(mix_z))`` (log space)."""
  a = jnp.asarray(alpha, jnp.float32)
  return jnp.logaddexp(jnp.log1p(-a) + jax.nn.log_softmax(z, axis=-1),
                       jnp.log(a) + jax.nn.log_softmax(mix_z, axis=-1))


def _next_token(logits, rng, step, temperature, top_k, top_p, mix_logits=None,
                mix_alpha=None):
  logits = logits.astype(jnp.float32)
  if mix_logits is not None:
    mix_logits = mix_logits.astype(jnp.float32)
  if temperature == 0.0:
    if mix_logits is not None:
      logits = _mixture_log_probs(logits, mix_logits, mix_alpha)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  warp = functools.partial(filter_logits, temperature=temperature,
                           top_k=top_k, top_p=top_p)
  z = warp(logits)
  if mix_logits is not None:
    z = _mixture_log_probs(z, warp(mix_logits), mix_alpha)
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
  check_token_ids(prompt_tokens, model.config.vocab_size, "prompt_tokens")


def check_token_ids(tokens, vocab_size: int, name: str = "tokens") -> None:
  """Error if a concrete `tokens` array holds an id outside
  ``[0, vocab_size)`` (an embedding lookup would silently give NaN).

  Traced arrays are not checked (no host round trip inside a compiled
  program).
  """
  if isinstance(tokens, jax.core.Tracer):
    return
  lo, hi = (int(v) for v in jax.device_get(
      (jnp.min(tokens), jnp.max(tokens)))) if np.size(tokens) else (0, 0)
  if lo < 0 or hi >= vocab_size:
    bad = hi if hi >= vocab_size else lo
    raise ValueError(f"{name}: token id {bad} is outside the model's "
                     f"vocabulary [0, {vocab_size})")


def _check_mix(model, mix_in_model, mix_in_variables, mix_in_alpha, total):
  given = [x is not None for x in (mix_in_model, mix_in_variables,
                                   mix_in_alpha)]
  if not any(given):
    return
  if not all(given):
    raise ValueError("teacher-mixed sampling needs mix_in_model, "
                     "mix_in_variables and mix_in_alpha together")
  if (not isinstance(mix_in_alpha, jax.core.Tracer)
      and not 0.0 <= float(mix_in_alpha) <= 1.0):
    raise ValueError(f"mix_in_alpha must be in [0, 1], got {mix_in_alpha!r}")
  v, vm = model.config.vocab_size, mix_in_model.config.vocab_size
  if v != vm:
    raise ValueError(f"mix_in_model has vocab_size {vm} but the model has "
                     f"{v}; teacher-mixed sampling needs one vocabulary")
  limit = mix_in_model.config.max_position_embeddings
  if total > limit:
    raise ValueError(f"prompt length + max_new_tokens = {total} exceeds "
                     f"mix_in_model's max_position_embeddings {limit}")


def generate(model, variables, prompt_tokens, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_id: Optional[int] = None,
             rng=None, pad_id: Optional[int] = None,
             prompt_mask=None, mix_in_model=None, mix_in_variables=None,
             mix_in_alpha: Optional[float] = None) -> Array:
  """Samples continuations: int32 tokens ``[B, T + max_new_tokens]``.

  Args:
    model: a `Transformer` (its ``config`` and ``dtype`` are used).
    variables: its variables (boxed or plain).
    prompt_tokens: int ``[B, T]`` prompts, all of length T, ids in
      ``[0, vocab_size)`` (checked when concrete).
    max_new_tokens: tokens to append.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: keep only the k most likely tokens (sampling only).
    top_p: nucleus sampling mass (sampling only).
    eos_id: end-of-sequence id; tokens after it are ``pad_id``.
    rng: a PRNG key (needed when ``temperature > 0``).
    pad_id: filler after EOS (default ``eos_id``).
    prompt_mask: optional bool ``[B, T]``, False on left padding (the last
      prompt token of every row must be real).
    mix_in_model, mix_in_variables, mix_in_alpha: teacher-mixed sampling
      (MiniLLM): a second `Transformer` with the same vocabulary, its
      variables, and its weight :math:`\\alpha \\in [0, 1]` in the sampling
      mixture (see the module docstring). All three or none.
  """
  _check_args(model, prompt_tokens, max_new_tokens, float(temperature), top_k,
              top_p, rng)
  _check_mix(model, mix_in_model, mix_in_variables, mix_in_alpha,
             prompt_tokens.shape[1] + max_new_tokens)
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
  alpha = None if mix_in_alpha is None else jnp.asarray(mix_in_alpha,
                                                         jnp.float32)
  return _generate(model, mix_in_model, float(temperature), top_k,
                   None if top_p is None else float(top_p), max_new_tokens,
                   eos_id, 0 if pad is None else int(pad),
                   (variables, mix_in_variables, alpha),
                   jnp.asarray(prompt_tokens).astype(jnp.int32), rng,
                   jnp.asarray(prompt_mask).astype(bool))


def make_generate_fn(model, *, max_new_tokens: int, temperature: float = 0.0,
                     top_k: Optional[int] = None,
                     top_p: Optional[float] = None,
                     eos_id: Optional[int] = None,
                     pad_id: Optional[int] = None,
                     mix_in_model=None, mix_in_alpha: Optional[float] = None):
  """``fn(variables, prompts, rng) -> tokens``: `generate` with fixed
  settings, the form `kd_jax.train.lm_steps` takes (traceable: it can run
  inside a jitted train step).

  With `mix_in_model` / `mix_in_alpha` (teacher-mixed sampling) the function
  is ``fn(variables, prompts, rng, mix_in_variables)``.
  """
  if (mix_in_model is None) != (mix_in_alpha is None):
    raise ValueError("teacher-mixed sampling needs mix_in_model and "
                     "mix_in_alpha together")
  kw = dict(max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)

  if mix_in_model is None:
    def fn(variables, prompts, rng):
      return generate(model, variables, prompts, rng=rng, **kw)
  else:
    def fn(variables, prompts, rng, mix_in_variables):
      return generate(model, variables, prompts, rng=rng,
                      mix_in_model=mix_in_model,
                      mix_in_variables=mix_in_variables,
                      mix_in_alpha=mix_in_alpha, **kw)

  return fn


def _head(model, variables, hidden):
  """The model's head on ``hidden`` ``[B, D]``: the same product as its
  ``lm_head`` Dense / tied ``embed.attend`` (both operands in the compute
  dtype)."""
  kernel = head_kernel(variables, model.config)
  return jnp.dot(hidden.astype(model.dtype), kernel.astype(model.dtype))


def _prefill(model, variables, prompt, positions, prompt_mask, total):
  """Last-position logits ``[B, V]`` of the prompt and the filled cache.

  The prompt runs without the head: only the last position's logits are
  needed (the head over all T positions would be a ``[B, T, V]`` array)."""
  cache = init_cache(model.config, prompt.shape[0], total, model.dtype,
                     getattr(model, "scan_layers", False))
  _, feats = model.apply(variables, prompt, train=False, cache=cache,
                         positions=positions, attention_mask=prompt_mask,
                         logits=False)
  return _head(model, variables, feats["hidden"][:, -1]), feats["cache"]


def _decode(model, variables, tok, cache, positions):
  logits, feats = model.apply(variables, tok[:, None], train=False,
                              cache=cache, positions=positions[:, None])
  return logits[:, -1], feats["cache"]


@functools.partial(jax.jit, static_argnums=tuple(range(8)))
def _generate(model, mix_model, temperature, top_k, top_p, max_new_tokens,
              eos_id, pad, variables, prompt, rng, prompt_mask):
  b, t = prompt.shape
  total = t + max_new_tokens
  params, mix_params, mix_alpha = variables
  models = ((model, params),) + (
      () if mix_model is None else ((mix_model, mix_params),))
  lengths = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)  # real tokens
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  first = [_prefill(m, v, prompt, positions, prompt_mask, total)
           for m, v in models]

  def pick(logits, step):
    return _next_token(logits[0], rng, step, temperature, top_k, top_p,
                       logits[1] if mix_model is not None else None,
                       mix_alpha)

  tok = pick([lg for lg, _ in first], 0)
  out = jnp.concatenate(
      [prompt, jnp.full((b, max_new_tokens), pad, jnp.int32)], axis=1)
  out = out.at[:, t].set(tok)
  done = (tok == eos_id) if eos_id is not None else jnp.zeros((b,), bool)

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, caches, tok, done = carry
    stepped = [_decode(m, v, tok, c, lengths + i - 1)
               for (m, v), c in zip(models, caches)]
    nxt = pick([lg for lg, _ in stepped], i)
    nxt = jnp.where(done, pad, nxt)
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t + i, 1)
    if eos_id is not None:
      done = done | (nxt == eos_id)
    return i + 1, out, tuple(c for _, c in stepped), nxt, done

  carry = (jnp.int32(1), out, tuple(c for _, c in first), tok, done)
  return jax.lax.while_loop(cond, body, carry)[1]
