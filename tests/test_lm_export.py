"""Export of kd_jax LMs to Hugging Face folders (`kd_jax.models.lm.export`).

Round trip kd_jax -> folder -> transformers (``AutoModelForCausalLM`` /
``AutoTokenizer``, offline, float32): the loaded class is
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` with no missing, unexpected or
mis-shaped keys, its logits equal kd_jax's, greedy generations are
identical, and the tokenizer encodes like the project's ``tokenizers`` BPE
with the same special tokens; kd_jax's own importer reads the folder back
bit for bit.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.data import text
from kd_jax.models import lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 300
TEXT = ("It is a truth universally acknowledged, that a single man in "
        "possession of a good fortune, must be in want of a wife. ") * 8


@pytest.fixture(scope="module")
def tokenizer():
  return text.train_bpe_tokenizer([TEXT], vocab_size=VOCAB, min_frequency=1)


def _kd_model(seed=0, **kw):
  """A kd_jax model whose every parameter (norms, biases too) is random."""
  cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
             num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)
  cfg.update(kw)
  model = lm.Transformer(lm.LMConfig(**cfg), dtype=jnp.float32)
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(seed),
                                           jnp.zeros((1, 4), jnp.int32)))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys)]
  return model, jax.tree.unflatten(tree, leaves)


CASES = {
    "llama_gqa": (dict(), "LlamaForCausalLM"),
    "llama_tied_mha": (dict(tie_word_embeddings=True, num_kv_heads=4),
                       "LlamaForCausalLM"),
    "llama_biases": (dict(qkv_bias=True, o_bias=True, mlp_bias=True,
                          rope_theta=500.0), "LlamaForCausalLM"),
    "qwen2": (dict(qkv_bias=True, rope_theta=1e6), "Qwen2ForCausalLM"),
    "qwen2_tied": (dict(qkv_bias=True, tie_word_embeddings=True,
                        num_kv_heads=1), "Qwen2ForCausalLM"),
    "llama3_rope": (dict(rope_type="llama3", rope_factor=8.0,
                         rope_original_max_position=64), "LlamaForCausalLM"),
    "linear_rope_head_dim": (dict(rope_type="linear", rope_factor=4.0,
                                  head_dim=16), "LlamaForCausalLM"),
}


# The other cases run with -m slow (each loads a transformers model).
FAST = ("llama_biases", "llama_gqa", "linear_rope_head_dim", "qwen2_tied")


@pytest.mark.parametrize("case", [
    c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
    for c in sorted(CASES)])
def test_round_trip_through_transformers(case, tokenizer, tmp_path):
  kw, cls = CASES[case]
  model, variables = _kd_model(**kw)
  lm.save_hf_folder(str(tmp_path), model.config, variables,
                    tokenizer=tokenizer)
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True)
  assert type(hf).__name__ == cls
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                   "mismatched_keys")), info
  hf = hf.float().eval()
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  got, _ = jax.jit(model.apply)(variables, jnp.asarray(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * np.abs(want).max())
  # kd_jax's importer reads the folder back exactly.
  model2, variables2, tok2 = lm.load_hf_folder(str(tmp_path),
                                               dtype=jnp.float32)
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, variables2, variables)
  assert tok2.to_str() == tokenizer.to_str()


def test_tokenizer_and_generation_through_transformers(tokenizer, tmp_path):
  model, variables = _kd_model(seed=3)
  lm.save_hf_folder(str(tmp_path), model.config, variables,
                    tokenizer=tokenizer)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  sample = "a single man in want of a good fortune"
  assert hf_tok(sample)["input_ids"] == tokenizer.encode(sample).ids
  assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|endoftext|>", 1)
  assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<|pad|>", 0)
  assert hf_tok.decode(tokenizer.encode(sample).ids) == sample
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 0)
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  prompt = np.asarray([tokenizer.encode(sample).ids[:6]])
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(prompt), do_sample=False,
                       max_new_tokens=8, min_new_tokens=8).numpy()
  got = lm.generate(model, variables, prompt, max_new_tokens=8)
  np.testing.assert_array_equal(got, want)


def test_bfloat16_export(tmp_path):
  model, variables = _kd_model(seed=4)
  lm.save_hf_folder(str(tmp_path), model.config, variables, dtype="bfloat16")
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  assert hf.config.dtype == torch.bfloat16
  state = hf.state_dict()
  want = jax.device_get(variables)["params"]["embed_tokens"]["embedding"]
  emb = state["model.embed_tokens.weight"].float().numpy()
  np.testing.assert_array_equal(
      emb, np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32))
  _, v2, tok = lm.load_hf_folder(str(tmp_path), dtype=jnp.float32)
  assert tok is None
  np.testing.assert_array_equal(v2["params"]["embed_tokens"]["embedding"],
                                emb)


def test_export_errors(tokenizer, tmp_path):
  # Config and tokenizer problems are found before the variables are read.
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
              num_layers=2, num_heads=4, num_kv_heads=2)
  cfg = lambda **kw: lm.LMConfig(**dict(base, **kw))
  with pytest.raises(ValueError, match="Qwen2 has a bias on q/k/v only"):
    lm.save_hf_folder(str(tmp_path), cfg(qkv_bias=True, o_bias=True), None,
                      model_type="qwen2")
  with pytest.raises(ValueError, match="attention_bias covers"):
    lm.save_hf_folder(str(tmp_path), cfg(qkv_bias=True), None,
                      model_type="llama")
  with pytest.raises(ValueError, match="does not fit the model's vocab_size"):
    lm.save_hf_folder(str(tmp_path), cfg(vocab_size=200), None,
                      tokenizer=tokenizer)
  with pytest.raises(ValueError, match="not in the tokenizer"):
    lm.save_hf_folder(str(tmp_path), cfg(), None, tokenizer=tokenizer,
                      eos_token="</s>")
  with pytest.raises(ValueError, match="dtype must be"):
    lm.save_hf_folder(str(tmp_path), cfg(), None, dtype="float16")
  model, variables = _kd_model()
  with pytest.raises(ValueError, match="no layers_2/self_attn"):
    lm.save_hf_folder(str(tmp_path), cfg(num_layers=3), variables)
