"""kd_jax losses inside tunix and EasyDeL (`examples/tunix_kd_jax.py`,
`examples/easydel_kd_jax.py`).

The peers are not dependencies of kd_jax: these tests skip unless they are
installed, i.e. they run in the environment `experiments/benchmark_peers.py
--setup` creates (``workdirs/peers_venv/bin/python -m pytest -q
tests/test_peer_examples.py``; the tunix ones also after ``pip install -e
'.[tunix]'``), not in CI (the extra would downgrade transformers there). The references are the peers'
own losses (tunix ``LogitStrategy``, EasyDeL ``distillation_step``) and
float64 NumPy.
"""

import numpy as np
import pytest

REASON = "needs {} (installed by experiments/benchmark_peers.py --setup)"


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_loss(s, t, y, where, temp, alpha):
  s, t = s.astype(np.float64), t.astype(np.float64)
  ls, lt = _log_softmax(s / temp), _log_softmax(t / temp)
  kd = (np.exp(lt) * (lt - ls)).sum(-1)
  ce = -np.take_along_axis(_log_softmax(s), y[..., None], -1)[..., 0]
  n = where.sum()
  return (alpha * temp**2 * (kd * where).sum() + (1 - alpha) * (ce * where)
          .sum()) / n


def _tunix_pair():
  from flax import nnx
  from tunix.models.llama3 import model as tl
  cfg = lambda d, n: tl.ModelConfig(  # noqa: E731
      num_layers=n, vocab_size=32, embed_dim=d, hidden_dim=2 * d, num_heads=2,
      head_dim=8, num_kv_heads=1, rope_theta=1_000_000, norm_eps=1e-6)
  student = tl.Llama3(cfg(16, 1), rngs=nnx.Rngs(0))
  teacher = tl.Llama3(cfg(24, 2), rngs=nnx.Rngs(1))
  for m in (student, teacher):  # tunix initializes the MLPs to zeros
    for layer in m.layers:
      for p in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
        p.kernel[...] = 0.2 * np.random.default_rng(2).standard_normal(
            p.kernel.shape)
  return student, teacher


def test_tunix_strategy_with_kd_jax_losses():
  pytest.importorskip("tunix", reason=REASON.format("google-tunix"))
  import jax
  import jax.numpy as jnp
  from tunix.distillation import strategies
  from examples import tunix_kd_jax as tk
  student, teacher = _tunix_pair()
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, (3, 9)))
  mask = np.ones(tokens.shape, bool)
  mask[2, 5:] = False
  x = tk.next_token_inputs(type("X", (), {"input_tokens": tokens,
                                          "input_mask": jnp.asarray(mask)}))
  zs, zt = tk.llama_logits(student, **x), tk.llama_logits(teacher, **x)
  labels = tk.target_labels(**x)
  ours = tk.KdJaxLogitStrategy(tk.llama_logits, tk.llama_logits,
                               tk.target_labels, temperature=2.0, alpha=0.3)
  loss, _ = ours.compute_loss(zs, zt, labels)
  want = _numpy_loss(np.asarray(zs), np.asarray(zt), np.asarray(x["targets"]),
                     np.asarray(x["target_mask"]), 2.0, 0.3)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # unmasked, it is tunix's own LogitStrategy
  full = {"targets": labels["targets"], "mask": jnp.ones_like(labels["mask"])}
  theirs = strategies.LogitStrategy(tk.llama_logits, tk.llama_logits,
                                    lambda **k: None, temperature=2.0,
                                    alpha=0.3)
  np.testing.assert_allclose(
      float(ours.compute_loss(zs, zt, full)[0]),
      float(theirs.compute_loss(zs, zt, jax.nn.one_hot(x["targets"], 32))[0]),
      rtol=1e-5)
  fused = tk.KdJaxFusedStrategy(tk.llama_hidden, tk.llama_hidden,
                                tk.target_labels, temperature=2.0, alpha=0.3,
                                chunk_size=8)
  hs, ht = tk.llama_hidden(student, **x), tk.llama_hidden(teacher, **x)
  np.testing.assert_allclose(float(fused.compute_loss(hs, ht, labels)[0]),
                             want, rtol=1e-5)


def test_tunix_trainer_runs_a_kd_jax_strategy():
  pytest.importorskip("tunix", reason=REASON.format("google-tunix"))
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from tunix.distillation import distillation_trainer as dt
  from examples import tunix_kd_jax as tk
  student, teacher = _tunix_pair()
  s0 = jax.tree.map(np.asarray, nnx.state(student, nnx.Param).to_pure_dict())
  t0 = jax.tree.map(np.asarray, nnx.state(teacher, nnx.Param).to_pure_dict())
  strategy = tk.KdJaxLogitStrategy(
      tk.llama_logits, tk.llama_logits, tk.target_labels,
      divergence="js_divergence", temperature=1.0, alpha=1.0, kd_scale=1.0)
  trainer = dt.DistillationTrainer(
      student, teacher, strategy, optax.adam(1e-2),
      dt.TrainingConfig(eval_every_n_steps=100, max_steps=3))
  trainer = trainer.with_gen_model_input_fn(tk.next_token_inputs)
  rng = np.random.default_rng(4)
  data = [dt.TrainingInput(input_tokens=jnp.asarray(rng.integers(0, 32, (2, 9))),
                           input_mask=jnp.ones((2, 9), bool))
          for _ in range(3)]
  trainer.train(data)
  assert trainer.train_steps == 3
  s1 = nnx.state(trainer.model, nnx.Param).to_pure_dict()
  t1 = nnx.state(trainer.teacher_model, nnx.Param).to_pure_dict()
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(s0), jax.tree.leaves(s1)))
  for a, b in zip(jax.tree.leaves(t0), jax.tree.leaves(t1)):
    np.testing.assert_array_equal(a, b)


def _easydel_states(tmp_path):
  import jax
  import jax.numpy as jnp
  import optax
  from experiments import peer_sides as ps
  from kd_jax.models import lm
  dirs = []
  for seed, (d, n) in enumerate(((16, 1), (24, 2))):
    c = lm.LMConfig(vocab_size=32, hidden_size=d, intermediate_size=2 * d,
                    num_layers=n, num_heads=2, num_kv_heads=1, rope_theta=1e6)
    m = lm.Transformer(c, dtype=jnp.float32)
    v = m.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    dirs.append(lm.save_hf_folder(str(tmp_path / f"m{seed}"), c, v))
  tokens = np.random.default_rng(5).integers(0, 32, (2, 9)).astype(np.int32)
  spec = ps.Spec(dirs[1], dirs[0], tokens)
  student, teacher = ps.easydel_models(spec)
  return (student, student.to_state().init_tx(optax.sgd(0.5)),
          teacher.to_state(), tokens)


def test_easydel_step_with_kd_jax_loss_equals_easydels(tmp_path):
  pytest.importorskip("easydel", reason=REASON.format("easydel"))
  import jax
  import jax.numpy as jnp
  from easydel.trainers.distillation_trainer._fn import distillation_step
  from examples import easydel_kd_jax as ek
  student, s_state, t_state, tokens = _easydel_states(tmp_path)
  batch = {"input_ids": jnp.asarray(tokens[:, :-1]),
           "attention_mask": jnp.ones((2, 8), jnp.int32),
           "labels": jnp.asarray(tokens[:, 1:])}
  copy = lambda s: jax.tree.map(  # noqa: E731
      lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x, s)
  with student.mesh:
    theirs, m_theirs = jax.jit(lambda s, b, t: distillation_step(
        s, b, t, temperature=2.0, alpha=0.3))(copy(s_state), batch, t_state)
    outs = [jax.jit(lambda s, b, t, c=c: ek.kd_jax_distillation_step(
        s, b, t, temperature=2.0, alpha=0.3, fused_chunk_size=c))(
            copy(s_state), batch, t_state) for c in (None, 4)]
  for ours, m_ours in outs:
    np.testing.assert_allclose(float(m_ours.loss), float(m_theirs.loss),
                               rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ours.graphstate),
                    jax.tree.leaves(theirs.graphstate)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
