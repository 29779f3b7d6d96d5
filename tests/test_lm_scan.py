"""`Transformer(scan_layers=True)`: one `nn.scan` over the blocks.

The reference is the unscanned model (itself checked against Hugging Face in
test_lm_models.py) run on the *same* weights: the scanned model gets them
through `stack_layers`, and every output must agree to float32 rounding
(logits, every block's output, gradients, the KV-cache decode, greedy
generation). The Hugging Face import with ``scan_layers=True`` is compared
with transformers' own forward pass.
"""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import lm
from kd_jax.train import sharding as S

CFG = dict(vocab_size=31, hidden_size=16, intermediate_size=24, num_layers=3,
           num_heads=4, num_kv_heads=2, max_position_embeddings=32,
           rope_theta=500.0)


def _models(remat=False, **kw):
  config = lm.LMConfig(**dict(CFG, **kw))
  return (lm.Transformer(config, jnp.float32, remat=remat),
          lm.Transformer(config, jnp.float32, remat=remat, scan_layers=True))


def _tokens(shape=(2, 9), seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 31, shape),
                     jnp.int32)


def _variables(model, tokens, seed=0):
  v = nn.unbox(model.init(jax.random.key(seed), tokens))
  # non-trivial norms, so a mixed-up layer order shows
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(
          jax.random.key(zlib.crc32(jax.tree_util.keystr(p).encode())),
          x.shape)
      if "scale" in jax.tree_util.keystr(p) else x, v)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_same_logits_stages_and_gradients(remat):
  plain, scanned = _models(remat)
  tokens = _tokens()
  v = _variables(plain, tokens)
  vs = lm.stack_layers(v, CFG["num_layers"])
  (l1, f1), (l2, f2) = plain.apply(v, tokens), scanned.apply(vs, tokens)
  np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-6)
  assert len(f2["stages"]) == CFG["num_layers"]
  for a, b in zip(f1["stages"], f2["stages"]):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f2["hidden"], f1["hidden"], rtol=1e-5,
                             atol=1e-6)

  def loss(model, variables):
    return jnp.sum(jnp.square(model.apply(variables, tokens)[0]))

  g1 = jax.jit(jax.grad(lambda x: loss(plain, x)))(v)
  g2 = jax.jit(jax.grad(lambda x: loss(scanned, x)))(vs)
  g2 = lm.unstack_layers(g2, CFG["num_layers"])
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5,
                                                       atol=1e-6), g1, g2)


def test_scanned_init_is_stacked_with_a_layers_axis():
  plain, scanned = _models()
  tokens = _tokens((1, 4))
  boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), tokens))
  q = boxed["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.names == ("layers", "embed", "heads", "kv")
  assert q.value.shape == (3, 16, 4, 4)
  names = S.logical_axis_names(scanned, tokens)
  assert names["layers/mlp/down_proj/kernel"] == ("layers", "mlp", "embed")
  # the same number of parameters in both layouts
  n = lambda m: sum(x.size for x in jax.tree.leaves(nn.unbox(  # noqa: E731
      jax.eval_shape(lambda: m.init(jax.random.key(0), tokens)))))
  assert n(plain) == n(scanned) == plain.config.num_params


def test_scanned_kv_cache_and_greedy_generation():
  plain, scanned = _models()
  prompt = _tokens((2, 5), seed=1)
  v = _variables(plain, prompt)
  vs = lm.stack_layers(v, CFG["num_layers"])
  cache = lm.init_cache(scanned.config, 2, 12, jnp.float32, scan_layers=True)
  assert cache["layers"]["k"].shape == (3, 2, 12, 2, 4)
  assert lm.cache_length(cache) == 12
  _, f = scanned.apply(vs, prompt, cache=cache)
  ref_cache = lm.init_cache(plain.config, 2, 12, jnp.float32)
  _, f_ref = plain.apply(v, prompt, cache=ref_cache)
  for i in range(CFG["num_layers"]):
    np.testing.assert_allclose(f["cache"]["layers"]["k"][i],
                               f_ref["cache"]["layers"][i]["k"], rtol=1e-5,
                               atol=1e-6)
  out1 = lm.generate(plain, v, prompt, max_new_tokens=7)
  out2 = lm.generate(scanned, vs, prompt, max_new_tokens=7)
  np.testing.assert_array_equal(out2, out1)


def test_layout_conversion_errors():
  plain, _ = _models()
  v = nn.unbox(plain.init(jax.random.key(0), _tokens((1, 3))))
  with pytest.raises(ValueError, match="missing \\['layers_3'\\]"):
    lm.stack_layers(v, 4)
  with pytest.raises(ValueError, match="unexpected \\['layers_2'\\]"):
    lm.stack_layers(v, 2)
  with pytest.raises(ValueError, match="no stacked 'layers'"):
    lm.unstack_layers(v, 3)
  with pytest.raises(ValueError, match="\\[3\\] != num_layers 2"):
    lm.unstack_layers(lm.stack_layers(v, 3), 2)


def test_from_hf_scan_layers_matches_transformers():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.LlamaConfig(
      vocab_size=31, hidden_size=16, intermediate_size=24,
      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=32, rms_norm_eps=1e-5)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
  state = {k: t.detach().numpy().copy() for k, t in hf.state_dict().items()}
  model, variables = lm.from_hf(cfg.to_dict(), state, dtype=jnp.float32,
                                scan_layers=True)
  assert model.scan_layers and "layers" in variables["params"]
  tokens = np.random.default_rng(3).integers(0, 31, (2, 7))
  got = model.apply(variables, jnp.asarray(tokens))[0]
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
