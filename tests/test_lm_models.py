"""Tests of `kd_jax.models.lm` against Hugging Face `transformers` (offline).

Tiny random Llama / Qwen2 models are built from configs in memory (nothing is
downloaded); their state dicts are imported with `from_hf` and compared in
float32: logits (<= 1e-4 relative), greedy generation (token-identical to
`generate(do_sample=False)`), the safetensors folder round trip, and the
error messages of bad inputs. RoPE and RMSNorm are also checked against
float64 NumPy transcriptions of their formulas.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.models import lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97


def _hf_model(kind="llama", *, tie=False, kv_heads=2, seed=0, **kw):
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads, max_position_embeddings=64,
              tie_word_embeddings=tie, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
  base.update(kw)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**base)
    cls = transformers.LlamaForCausalLM
  else:
    cfg = transformers.Qwen2Config(**base)
    cls = transformers.Qwen2ForCausalLM
  torch.manual_seed(seed)
  model = cls(cfg).eval()
  with torch.no_grad():  # non-trivial norms and biases
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model


def _state_numpy(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


CASES = {
    "llama_gqa": dict(kind="llama", kv_heads=2),
    "llama_mha_tied": dict(kind="llama", kv_heads=4, tie=True),
    "llama_bias_mlpbias": dict(kind="llama", kv_heads=1, attention_bias=True,
                               mlp_bias=True, rope_theta=500.0),
    "qwen2_gqa": dict(kind="qwen2", kv_heads=2, rope_theta=1e6),
    "qwen2_tied": dict(kind="qwen2", kv_heads=1, tie=True),
    # Llama 3.1 RoPE scaling; a small original context so that all three
    # frequency bands occur at head_dim 8.
    "llama3_rope": dict(kind="llama", kv_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "linear_rope": dict(kind="llama", kv_heads=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 100.0, "factor": 4.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf_float32(case):
  kw = dict(CASES[case])
  theta = kw.pop("rope_theta", None)
  if theta is not None:
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
  hf = _hf_model(**kw)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  if theta is not None:
    assert model.config.rope_theta == theta
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  logits, feats = model.apply(variables, jnp.asarray(tokens), train=False)
  assert logits.shape == (2, 11, VOCAB) and logits.dtype == jnp.float32
  assert _rel(logits, want) <= 1e-4
  # features["hidden"] is the head's input: hidden @ head_kernel == logits.
  kernel = lm.head_kernel(variables, model.config)
  assert kernel.shape == (32, VOCAB)
  assert _rel(feats["hidden"] @ kernel, want) <= 1e-4
  none, feats2 = model.apply(variables, jnp.asarray(tokens), train=False,
                             logits=False)
  assert none is None
  np.testing.assert_array_equal(feats2["hidden"], feats["hidden"])


def test_old_style_config_rope_theta_top_level():
  hf = _hf_model(kind="llama", rope_parameters={"rope_type": "default",
                                                "rope_theta": 321.0})
  cfg = hf.config.to_dict()
  cfg.pop("rope_parameters")
  cfg["rope_theta"] = 321.0  # as written by transformers 4.x
  cfg["rope_scaling"] = None
  model, variables = lm.from_hf(cfg, _state_numpy(hf), dtype=jnp.float32)
  assert model.config.rope_theta == 321.0
  tokens = np.arange(12).reshape(1, 12) % VOCAB
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  got, _ = model.apply(variables, jnp.asarray(tokens), train=False)
  assert _rel(got, want) <= 1e-4


def test_kv_cache_matches_full_forward():
  hf = _hf_model(kind="qwen2", kv_heads=2)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, 9)))
  apply = jax.jit(lambda v, t, c: model.apply(v, t, train=False, cache=c))
  full, _ = model.apply(variables, tokens, train=False)
  cache = lm.init_cache(model.config, 2, 12, jnp.float32)
  first, f1 = apply(variables, tokens[:, :5], cache)
  rest = []
  cache = f1["cache"]
  for i in range(5, 9):
    out, f = apply(variables, tokens[:, i:i + 1], cache)
    cache = f["cache"]
    rest.append(out)
  stepwise = jnp.concatenate([first] + rest, axis=1)
  assert int(cache["index"]) == 9
  assert _rel(stepwise, full) <= 1e-5


@pytest.mark.parametrize("case", ["llama_gqa", "qwen2_tied"])
def test_greedy_generation_matches_hf(case):
  hf = _hf_model(**CASES[case], seed=3)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  prompt = np.random.default_rng(2).integers(3, VOCAB, (3, 6))
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(prompt), max_new_tokens=10,
                       do_sample=False, eos_token_id=None,
                       pad_token_id=0).numpy()
  got = lm.generate(model, variables, jnp.asarray(prompt), max_new_tokens=10)
  assert got.shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_eos_pads_and_stops():
  hf = _hf_model(kind="llama", seed=4)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  prompt = jnp.asarray(np.random.default_rng(5).integers(3, VOCAB, (4, 5)))
  free = np.asarray(lm.generate(model, variables, prompt, max_new_tokens=8))
  # Pick as EOS a token some (not necessarily all) rows emit.
  eos = int(free[0, 5 + 2])
  got = np.asarray(lm.generate(model, variables, prompt, max_new_tokens=8,
                               eos_id=eos, pad_id=VOCAB - 1))
  for row_free, row in zip(free, got):
    gen_free, gen = row_free[5:], row[5:]
    hits = np.flatnonzero(gen_free == eos)
    if hits.size == 0:
      np.testing.assert_array_equal(gen, gen_free)
    else:
      j = hits[0]
      np.testing.assert_array_equal(gen[:j + 1], gen_free[:j + 1])
      assert (gen[j + 1:] == VOCAB - 1).all()


def test_sampling_respects_top_k_and_is_reproducible():
  hf = _hf_model(kind="llama", seed=6)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  prompt = jnp.asarray(np.random.default_rng(7).integers(3, VOCAB, (2, 4)))
  kw = dict(max_new_tokens=6, temperature=0.7, top_k=1,
            rng=jax.random.key(0))
  # top_k=1 sampling is greedy decoding whatever the temperature.
  np.testing.assert_array_equal(
      lm.generate(model, variables, prompt, **kw),
      lm.generate(model, variables, prompt, max_new_tokens=6))
  kw.update(top_k=None, top_p=0.9, temperature=1.0)
  a = lm.generate(model, variables, prompt, **kw)
  b = lm.generate(model, variables, prompt, **kw)
  np.testing.assert_array_equal(a, b)


def test_filter_logits_against_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 20)).astype(np.float32) * 3
  for top_k, top_p in ((5, None), (None, 0.6), (4, 0.5), (None, 1e-6)):
    got = np.asarray(lm.filter_logits(jnp.asarray(z), temperature=0.5,
                                      top_k=top_k, top_p=top_p))
    for row, g in zip(z.astype(np.float64) / 0.5, got):
      keep = np.ones(row.size, bool)
      if top_k:
        keep &= row >= np.sort(row)[::-1][top_k - 1]
      if top_p:
        masked = np.where(keep, row, -np.inf)
        order = np.argsort(-masked)
        p = np.exp(masked[order] - masked[order][0])
        p /= p.sum()
        before = np.cumsum(p) - p
        kept = order[before < top_p]
        keep_p = np.zeros(row.size, bool)
        keep_p[kept] = True
        keep_p[order[0]] = True
        keep &= keep_p
      np.testing.assert_array_equal(np.isfinite(g), keep)
      np.testing.assert_allclose(g[keep], row[keep], rtol=1e-6)


def test_rope_and_rmsnorm_against_float64_numpy():
  dh, theta = 8, 10000.0
  pos = np.arange(7)
  config = lm.LMConfig(vocab_size=5, hidden_size=16, intermediate_size=8,
                       num_layers=1, num_heads=2, rope_theta=theta)
  cos, sin = lm.rope_cos_sin(jnp.asarray(pos)[None],
                             lm.rope_inv_freq(config))
  ang = pos[:, None] * theta ** (-np.arange(0, dh, 2) / dh)
  np.testing.assert_allclose(cos[0], np.cos(np.concatenate([ang, ang], 1)),
                             atol=1e-6)
  np.testing.assert_allclose(sin[0], np.sin(np.concatenate([ang, ang], 1)),
                             atol=1e-6)
  # A rotation keeps the norm of each (i, i + dh/2) pair and rotates it by
  # the angle of its frequency.
  from kd_jax.models.lm.model import apply_rope
  x = np.random.default_rng(0).normal(size=(1, 7, 1, dh))
  y = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), cos, sin))[0, :, 0]
  x0 = x[0, :, 0]
  a, b = x0[:, :dh // 2], x0[:, dh // 2:]
  np.testing.assert_allclose(y[:, :dh // 2], a * np.cos(ang) - b * np.sin(ang),
                             atol=1e-5)
  np.testing.assert_allclose(y[:, dh // 2:], b * np.cos(ang) + a * np.sin(ang),
                             atol=1e-5)
  norm = lm.model.RMSNorm(1e-5, jnp.float32)
  h = np.random.default_rng(1).normal(size=(2, 3, 16)) * 4
  v = norm.init(jax.random.key(0), jnp.zeros((1, 16)))
  v = jax.tree.map(lambda s: s * 0 + np.linspace(0.5, 2, 16), nn.unbox(v))
  want = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-5) * np.linspace(
      0.5, 2, 16)
  np.testing.assert_allclose(norm.apply(v, jnp.asarray(h, jnp.float32)),
                             want, rtol=1e-5)


def test_init_has_logical_axes_and_matches_import_structure():
  hf = _hf_model(kind="qwen2", kv_heads=2)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                            jnp.zeros((1, 4), jnp.int32)))
  specs = nn.get_partition_spec(boxed)["params"]
  layer = specs["layers_0"]
  assert tuple(specs["embed_tokens"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")
  assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == ("embed", "heads",
                                                           "kv")
  assert tuple(layer["self_attn"]["o_proj"]["kernel"]) == ("heads", "kv",
                                                           "embed")
  assert tuple(layer["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(boxed))
  assert jax.tree.map(jnp.shape, variables) == shapes
  assert sum(x.size for x in jax.tree.leaves(variables)) == (
      model.config.num_params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  # bfloat16 compute by default.
  logits, feats = model.apply(variables, jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.bfloat16 and feats["hidden"].dtype == (
      jnp.bfloat16)


def test_safetensors_folder_round_trip(tmp_path):
  from safetensors.numpy import save_file
  tokenizers = pytest.importorskip("tokenizers")
  hf = _hf_model(kind="llama", tie=True)
  state = _state_numpy(hf)
  state.pop("lm_head.weight", None)  # as HF writes tied checkpoints
  half = len(state) // 2
  keys = sorted(state)
  save_file({k: state[k] for k in keys[:half]},
            str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({k: state[k] for k in keys[half:]},
            str(tmp_path / "model-00002-of-00002.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {f"w{i}": i for i in range(VOCAB - 10)}, unk_token="w0"))
  tok.save(str(tmp_path / "tokenizer.json"))
  model, variables, tokenizer = lm.load_hf_folder(str(tmp_path),
                                                  dtype=jnp.float32)
  assert tokenizer.get_vocab_size() == VOCAB - 10
  tokens = np.random.default_rng(0).integers(0, VOCAB, (1, 8))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  got, _ = model.apply(variables, jnp.asarray(tokens), train=False)
  assert _rel(got, want) <= 1e-4


def test_bfloat16_safetensors_are_read(tmp_path):
  import safetensors.torch
  t = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
  safetensors.torch.save_file({"w": t}, str(tmp_path / "a.safetensors"))
  got = lm.read_safetensors(str(tmp_path / "a.safetensors"))["w"]
  np.testing.assert_array_equal(got, np.arange(6.0).reshape(2, 3))


# ---------------------------------------------------------------------------
# Bad inputs: one clear error naming the problem.
# ---------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_in_one_error():
  hf = _hf_model(kind="llama")
  state = _state_numpy(hf)
  state.pop("model.layers.1.mlp.up_proj.weight")
  state["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
  state["model.norm.weight"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as err:
    lm.from_hf(hf.config.to_dict(), state)
  msg = str(err.value)
  assert "missing keys: model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected keys: model.layers.0.extra.weight" in msg
  assert "mis-shaped keys: model.norm.weight: (5,) (expected (32,))" in msg


def test_untied_checkpoint_without_head_is_an_error():
  hf = _hf_model(kind="llama", tie=False)
  state = _state_numpy(hf)
  del state["lm_head.weight"]
  with pytest.raises(ValueError, match="missing keys: lm_head.weight"):
    lm.from_hf(hf.config.to_dict(), state)


def test_unsupported_config_errors():
  cfg = _hf_model(kind="llama").config.to_dict()
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    lm.from_hf(dict(cfg, model_type="gpt2"), {})
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    lm.config_from_hf(dict(cfg, rope_parameters={"rope_type": "yarn",
                                                 "rope_theta": 1.0}))


def test_tokenizer_larger_than_model_vocab(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {f"w{i}": i for i in range(VOCAB + 3)}, unk_token="w0"))
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match=r"tokenizer vocabulary \(100 tokens\) "
                     r"does not fit the model's vocab_size 97"):
    lm.load_tokenizer(str(tmp_path), vocab_size=VOCAB)


def test_folder_without_config_or_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    lm.load_hf_folder(str(tmp_path))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"has no \*.safetensors"):
    lm.load_hf_folder(str(tmp_path))


def test_sequence_longer_than_context():
  config = lm.LMConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
                       num_layers=1, num_heads=2, max_position_embeddings=6)
  model = lm.Transformer(config, dtype=jnp.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="sequence length 7 exceeds the "
                     "model's max_position_embeddings 6"):
    model.apply(variables, jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"prompt length 4 \+ max_new_tokens 3 "
                     "= 7 exceeds the model's max_position_embeddings 6"):
    lm.generate(model, variables, jnp.zeros((1, 4), jnp.int32),
                max_new_tokens=3)
  with pytest.raises(ValueError, match="tokens must be an int array"):
    model.apply(variables, jnp.zeros((1, 3), jnp.float32))


def test_sharded_forward_and_step_match_single_device():
  """FSDP x tensor-parallel mesh (4 x 2 CPU devices) from the logical axis
  names: same logits and same distillation step as unsharded."""
  import optax
  from kd_jax.train import create_train_state
  from kd_jax.train import lm_steps
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("vocab", "tp"), ("embed", "fsdp"), ("heads", "tp"), ("kv", None),
           ("mlp", "tp"))
  cfg = dict(vocab_size=32, hidden_size=16, intermediate_size=32,
             num_heads=4, num_kv_heads=2, max_position_embeddings=32)
  teacher = lm.Transformer(lm.LMConfig(num_layers=2, **cfg), jnp.float32)
  student = lm.Transformer(lm.LMConfig(num_layers=1, **cfg), jnp.float32)
  x = jnp.zeros((1, 4), jnp.int32)
  boxed_t = teacher.init(jax.random.key(0), x)
  boxed_s = student.init(jax.random.key(1), x)

  def shard(boxed):
    sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                     rules)
    return jax.device_put(nn.unbox(boxed), sh)

  tv, sv = nn.unbox(boxed_t), nn.unbox(boxed_s)
  tv_sh, sv_sh = shard(boxed_t), shard(boxed_s)
  q = tv_sh["params"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp", None)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (8, 12)))
  batch_sh = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec("fsdp"))
  tokens_sh = jax.device_put(tokens, batch_sh)
  fwd = jax.jit(lambda v, t: teacher.apply(v, t)[0])
  np.testing.assert_allclose(fwd(tv_sh, tokens_sh), fwd(tv, tokens),
                             rtol=1e-5, atol=1e-6)

  tx = optax.adam(1e-2)
  step = jax.jit(lm_steps.make_lm_distill_step(student, teacher, tx,
                                               divergence="js_divergence",
                                               ce_weight=0.5))
  s1, m1 = step(create_train_state(sv, tx, rng=jax.random.key(2)), tv,
                {"tokens": tokens})
  s2, m2 = step(create_train_state(sv_sh, tx, rng=jax.random.key(2)), tv_sh,
                {"tokens": tokens_sh})
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               s1.params, s2.params)
  k = s2.params["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")


def test_remat_same_values_and_gradients():
  config = lm.LMConfig(vocab_size=13, hidden_size=8, intermediate_size=16,
                       num_layers=2, num_heads=2, max_position_embeddings=8)
  plain = lm.Transformer(config, dtype=jnp.float32)
  remat = lm.Transformer(config, dtype=jnp.float32, remat=True)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (2, 6)))
  variables = nn.unbox(plain.init(jax.random.key(0), tokens))
  assert jax.tree.map(jnp.shape, nn.unbox(remat.init(
      jax.random.key(0), tokens))) == jax.tree.map(jnp.shape, variables)

  def loss(v, model):
    return jnp.sum(jnp.square(model.apply(v, tokens)[0]))

  g1 = jax.jit(jax.grad(lambda v: loss(v, plain)))(variables)
  g2 = jax.jit(jax.grad(lambda v: loss(v, remat)))(variables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), g1, g2)


def test_presets_parameter_counts():
  for name, millions in (("llama_1m", 1.4), ("llama_5m", 5.0)):
    config = lm.preset_config(name, vocab_size=4096,
                              max_position_embeddings=128)
    model = lm.Transformer(config)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
    assert n == config.num_params
    assert abs(n / 1e6 - millions) < 0.1, (name, n)
  with pytest.raises(ValueError, match="unknown LM preset 'gpt'"):
    lm.preset_config("gpt", vocab_size=10)


def test_left_padded_prompts_match_hf_generate():
  hf = _hf_model(kind="qwen2", kv_heads=2, seed=8)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  rng = np.random.default_rng(9)
  prompt = rng.integers(3, VOCAB, (3, 7))
  mask = np.ones((3, 7), bool)
  mask[1, :3] = False  # row 1: 4 real tokens, left-padded
  mask[2, :6] = False  # row 2: 1 real token
  prompt[~mask] = 0
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(prompt),
                       attention_mask=torch.as_tensor(mask.astype(np.int64)),
                       max_new_tokens=6, do_sample=False, eos_token_id=None,
                       pad_token_id=0).numpy()
  got = lm.generate(model, variables, jnp.asarray(prompt), max_new_tokens=6,
                    prompt_mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(got), want)
  # A left-padded row continues exactly as the unpadded prompt alone.
  alone = lm.generate(model, variables, jnp.asarray(prompt[1:2, 3:]),
                      max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(got)[1, 7:], np.asarray(alone)[0,
                                                                          4:])
  with pytest.raises(ValueError, match="must be left-padded"):
    lm.generate(model, variables, jnp.asarray(prompt), max_new_tokens=2,
                prompt_mask=jnp.asarray(mask[:, ::-1]))


def test_attention_mask_forward_matches_hf():
  hf = _hf_model(kind="llama", kv_heads=2, seed=10)
  model, variables = lm.from_hf(hf.config.to_dict(), _state_numpy(hf),
                                dtype=jnp.float32)
  tokens = np.random.default_rng(11).integers(3, VOCAB, (2, 8))
  mask = np.ones((2, 8), bool)
  mask[0, :3] = False
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens),
              attention_mask=torch.as_tensor(mask.astype(np.int64)),
              position_ids=torch.as_tensor(positions)).logits.numpy()
  got, _ = model.apply(variables, jnp.asarray(tokens),
                       attention_mask=jnp.asarray(mask),
                       positions=jnp.asarray(positions))
  assert _rel(np.asarray(got)[mask], want[mask]) <= 1e-4
