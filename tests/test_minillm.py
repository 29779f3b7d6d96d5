"""MiniLLM (`kd_jax.losses.minillm`, `kd_jax.distillers.minillm`) against a
float64 NumPy transcription of the authors' code path.

The transcription follows microsoft/LMOps ``minillm/`` line by line, with
torch replaced by NumPy: ``reward.py`` (``Reward.reward_fn``),
``minillm/sampler.py`` (``PPOSampler.run_sample``: rewards, entropy reward,
scaling, clipping, teacher-mixed importance weights), ``minillm/trainer.py``
(``compute_logits_and_log_probs``), ``minillm/losses.py``
(``_get_advantages_and_returns``, ``_pg_loss``, ``_reg_loss``,
``ppo_loss``, ``pt_loss``) and ``minillm/utils.py`` (``get_log_probs``,
``get_entropy``, ``get_x_entropy``, ``get_rev_kl``, ``whiten`` with the
global statistics of ``get_global_statistics``, the path their distributed
runs take). Their models are replaced by given logits: the pad id equals
EOS (GPT-2's convention in their pipelines) and prompts hold no pad id, so
their mask ``full_ids != pad`` equals kd_jax's response mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses
from kd_jax.distillers import minillm as M

EOS = 1


# --- float64 NumPy transcription of the authors' code -----------------------


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_logsumexp(z):
  m = z.max(-1, keepdims=True)
  return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def np_get_log_probs(logits, ids, mask):
  lp = np.take_along_axis(np_log_softmax(logits), ids[..., None], -1)[..., 0]
  return np.where(np.asarray(mask, bool), lp, 0.0)


def np_reward_fn(t_logits, full_ids, prompt_len):
  """Reward.reward_fn: teacher log p(y_t) from centered, masked logits."""
  attn = (full_ids != EOS).astype(np.float64)
  logits = t_logits - t_logits.mean(-1, keepdims=True)
  logits = logits * attn[..., None]
  logits = logits[:, prompt_len - 1:, :]
  mask = attn[:, prompt_len - 1:]
  sel = np.take_along_axis(logits[:, :-1], full_ids[:, prompt_len:, None],
                           -1)[..., 0]
  nsv = np_logsumexp(logits[:, :-1]) * mask[:, :-1]
  return sel - nsv


def np_logits_and_log_probs(logits_full, full_ids, prompt_len, temperature):
  """PPOTrainer.compute_logits_and_log_probs (no inf_mask: top_k=0, top_p=1)."""
  attn = (full_ids != EOS).astype(np.float64)
  logits = logits_full / temperature
  start, end = prompt_len - 1, full_ids.shape[1] - 1
  logits, mask = logits[:, start:end], attn[:, start:end]
  return logits, np_get_log_probs(logits, full_ids[:, prompt_len:], mask)


def np_run_sample(s_logits, t_logits, full_ids, prompt_len, a):
  """PPOSampler.run_sample for one batch (the rollout store's entries)."""
  mask = (full_ids != EOS)[:, prompt_len - 1:full_ids.shape[1] - 1]
  t_rewards = np_reward_fn(t_logits, full_ids, prompt_len)
  _, rollout_lp = np_logits_and_log_probs(s_logits, full_ids, prompt_len,
                                          a["temperature"])
  if a["teacher_mixed_alpha"] is not None:
    _, t_rollout_lp = np_logits_and_log_probs(t_logits, full_ids, prompt_len,
                                              a["temperature"])
    raw_lp = rollout_lp
    alpha = a["teacher_mixed_alpha"]
    mix_probs = (1 - alpha) * np.exp(rollout_lp) + alpha * np.exp(t_rollout_lp)
    w = np.exp(raw_lp - np.log(mix_probs))
  else:
    raw_lp = rollout_lp
    w = np.ones_like(raw_lp)
  rewards = t_rewards + (-raw_lp)
  if a["reward_scaling"] is not None:
    rewards = rewards / a["reward_scaling"]
  if a["cliprange_reward"]:
    rewards = np.clip(rewards, -a["cliprange_reward"], a["cliprange_reward"])
  rev_kl = np_get_rev_kl(t_rewards, rollout_lp, mask)
  return dict(mask=mask.astype(np.float64), logprobs=raw_lp, rewards=rewards,
              w=w, t_rewards=t_rewards, rev_kl=rev_kl)


def np_get_rev_kl(log_p, log_q, mask):
  log_ratio = (log_p - log_q) * mask
  return np.exp(log_ratio) - 1 - log_ratio


def np_whiten(xs):
  """utils.whiten with get_global_statistics (population variance)."""
  mean = xs.sum() / xs.size
  var = ((xs - mean) ** 2).sum() / xs.size
  return (xs - mean) / np.sqrt(var + 1e-8)


def np_advantages(rewards, mask, gamma, use_whitening=True):
  """Loss._get_advantages_and_returns."""
  lens = np.cumsum(mask, -1)
  lens = mask - lens + lens[:, -1:]
  lens = np.where(lens == 0, 1, lens)
  last, rev = 0.0, []
  for t in reversed(range(rewards.shape[1])):
    last = rewards[:, t] + gamma * last
    rev.append(last)
  rw = np.stack(rev[::-1], 1) / lens
  return np_whiten(rw) if use_whitening else rw


def np_pg_loss(logprobs, old_logprobs, advantages, mask, w, cliprange):
  n = mask.sum()
  ratio = np.exp((logprobs - old_logprobs) * mask) * w
  pg1 = -advantages * ratio
  pg2 = -advantages * np.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
  return np.sum(np.maximum(pg1, pg2) * mask) / n


def np_reg_loss(s_logits, t_logits, mask):
  """Loss._reg_loss: cross-entropy minus entropy (logits already / T)."""
  xent = -np.sum(np.exp(np_log_softmax(s_logits)) * np_log_softmax(t_logits),
                 -1) * mask
  ent = -np.sum(np.exp(np_log_softmax(s_logits)) * np_log_softmax(s_logits),
                -1) * mask
  return np.sum((xent - ent) * mask) / mask.sum()


def np_ppo_loss(new_s_logits, t_logits, store, full_ids, prompt_len, a):
  """Loss.ppo_loss (+ single-step term) on one minibatch."""
  start, end = prompt_len - 1, full_ids.shape[1] - 1
  logits = (new_s_logits / a["temperature"])[:, start:end]
  mask = (full_ids != EOS).astype(np.float64)[:, start:end]
  logprobs = np_get_log_probs(logits, full_ids[:, prompt_len:], mask)
  adv = np_advantages(store["rewards"], mask, a["gamma"])
  pg = np_pg_loss(logprobs, store["logprobs"], adv, mask, store["w"],
                  a["cliprange"])
  t_win = (t_logits / a["temperature"])[:, start:end]
  reg = np_reg_loss(logits, t_win, mask)
  return pg + (reg if a["single_step_reg"] else 0.0), pg, reg


def np_pt_loss(s_logits, t_logits, labels, kd_ratio):
  """Loss.pt_loss (labels -100 = ignored)."""
  loss_mask = (labels != -100).astype(np.float64)
  lp = np_log_softmax(s_logits)
  safe = np.where(labels == -100, 0, labels)
  nll = -np.take_along_axis(lp, safe[..., None], -1)[..., 0]
  lm_loss = np.sum(nll * loss_mask) / loss_mask.sum()
  if kd_ratio is None:
    return lm_loss, lm_loss
  x = np.sum(np.exp(np_log_softmax(t_logits)) * lp, -1)
  distil = -np.sum(x * loss_mask) / loss_mask.sum()
  return (1 - kd_ratio) * lm_loss + kd_ratio * distil, lm_loss


# --- inputs ------------------------------------------------------------------


def rollout_inputs(seed, b=4, prompt_len=3, r=6, v=9, scale=2.0):
  """Tokens (prompts without EOS, responses with EOS then EOS padding) and
  three logits arrays [B, L, V]: sampling student, teacher, updated student."""
  rng = np.random.default_rng(seed)
  length = prompt_len + r
  ids = rng.integers(2, v, (b, length))
  for i in range(b):
    stop = rng.integers(0, r + 2)  # >= r: no EOS in this row
    if stop < r:
      ids[i, prompt_len + stop:] = EOS
  logits = [scale * rng.standard_normal((b, length, v)) for _ in range(3)]
  return ids, logits


ARGS = dict(temperature=1.0, teacher_mixed_alpha=0.2, reward_scaling=0.5,
            cliprange_reward=100.0, gamma=0.95, cliprange=0.2,
            single_step_reg=True, lm_coef=1.0, kd_ratio=0.5)


def config_of(a):
  return M.MiniLLMConfig(**{k: a[k] for k in (
      "temperature", "teacher_mixed_alpha", "reward_scaling",
      "cliprange_reward", "gamma", "cliprange", "single_step_reg", "lm_coef",
      "kd_ratio")})


f32 = lambda x: jnp.asarray(x, jnp.float32)


# --- the loss functions one by one ---------------------------------------------


def test_token_log_probs_is_get_log_probs():
  ids, (s, _, _) = rollout_inputs(0)
  mask = ids != EOS
  got = losses.token_log_probs(f32(s / 0.7), jnp.asarray(ids), where=mask)
  want = np_get_log_probs(s / 0.7, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got_t = losses.token_log_probs(f32(s), jnp.asarray(ids), temperature=0.7)
  np.testing.assert_allclose(got_t, np_get_log_probs(s / 0.7, ids, 1), 1e-5,
                             1e-5)


@pytest.mark.parametrize("temperature,alpha,scaling,clip", [
    (1.0, 0.2, 0.5, 100.0),      # the authors' scripts
    (0.8, 0.2, 0.5, 1.0),        # T != 1: teacher reward at 1, weights at T
    (1.0, None, None, None),     # no mixing, no scaling, no clipping
    (1.2, 1.0, 2.0, 0.5),
])
def test_rollout_matches_run_sample(temperature, alpha, scaling, clip):
  ids, (s, t, _) = rollout_inputs(1)
  p = 3
  a = dict(ARGS, temperature=temperature, teacher_mixed_alpha=alpha,
           reward_scaling=scaling, cliprange_reward=clip)
  want = np_run_sample(s, t, ids, p, a)
  roll, metrics = jax.jit(functools.partial(
      M.make_rollout, config=config_of(a), prompt_len=p, eos_id=EOS))(
          jnp.asarray(ids), f32(s[:, :-1]), f32(t[:, :-1]))
  np.testing.assert_array_equal(roll.mask, want["mask"].astype(bool))
  np.testing.assert_allclose(roll.old_log_probs, want["logprobs"], 1e-5, 1e-5)
  np.testing.assert_allclose(roll.rewards, want["rewards"], 1e-5, 1e-5)
  np.testing.assert_allclose(roll.weights, want["w"], 1e-5, 1e-6)
  # The logged estimate (the authors log it on a separate student batch;
  # here on the rollout): sum per sequence / length.
  lens = want["mask"].sum(1)
  np.testing.assert_allclose(metrics["rollout_rev_kl"],
                             np.mean(want["rev_kl"].sum(1) / lens), 1e-5)


def test_rewards_and_weights_functions():
  rng = np.random.default_rng(2)
  lp, lq = np.log(rng.dirichlet(np.ones(5), (3, 4))).transpose(2, 0, 1)[:2]
  mask = rng.random((3, 4)) < 0.7
  r = losses.minillm_rewards(f32(lp), f32(lq), reward_scaling=0.5,
                             cliprange_reward=3.0, where=mask)
  np.testing.assert_allclose(r, np.where(mask, np.clip((lp - lq) / 0.5, -3, 3),
                                         0), 1e-5, 1e-6)
  for alpha in (0.0, 0.2, 0.7, 1.0):
    w = losses.teacher_mixed_weights(f32(lq), f32(lp),
                                     teacher_mixed_alpha=alpha, where=mask)
    mix = (1 - alpha) * np.exp(lq) + alpha * np.exp(lp)
    np.testing.assert_allclose(w, np.where(mask, np.exp(lq) / mix, 1.0),
                               1e-5, 1e-6)
  est = losses.reverse_kl_estimate(f32(lp), f32(lq), where=mask)
  np.testing.assert_allclose(est, np_get_rev_kl(lp, lq, mask), 1e-5, 1e-6)


@pytest.mark.parametrize("gamma,whiten", [(0.95, True), (1.0, True),
                                          (0.5, False)])
def test_advantages_match_get_advantages_and_returns(gamma, whiten):
  rng = np.random.default_rng(3)
  mask = np.ones((5, 7))
  for i, stop in enumerate([7, 3, 1, 6, 0]):
    mask[i, stop + 1:] = 0
  rewards = rng.standard_normal((5, 7)) * mask
  got = losses.minillm_advantages(f32(rewards), gamma=gamma, whiten=whiten,
                                  where=mask.astype(bool))
  want = np_advantages(rewards, mask, gamma, use_whitening=whiten)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_advantages_without_length_norm_and_mask():
  rng = np.random.default_rng(4)
  r = rng.standard_normal((2, 5))
  got = losses.minillm_advantages(f32(r), gamma=0.9, length_norm=False,
                                  whiten=False)
  want = np.stack([sum(0.9 ** (k - t) * r[:, k] for k in range(t, 5))
                   for t in range(5)], 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_advantages_whitened_over_devices():
  """With `axis_name`, 2 devices x 3 rows whiten like one 6-row batch."""
  rng = np.random.default_rng(5)
  mask = rng.random((6, 5)) < 0.8
  r = rng.standard_normal((6, 5)) * mask
  fn = jax.pmap(functools.partial(losses.minillm_advantages, axis_name="d"),
                axis_name="d", devices=jax.devices()[:2])
  got = fn(f32(r).reshape(2, 3, 5), where=jnp.asarray(mask).reshape(2, 3, 5))
  want = np_advantages(r, mask.astype(np.float64), 0.95)
  np.testing.assert_allclose(np.asarray(got).reshape(6, 5), want, 1e-5, 1e-5)


def test_pg_loss_value_and_gradient():
  ids, (s_old, _, s_new) = rollout_inputs(6)
  p = 3
  win = lambda z: z[:, p - 1:-1]
  mask = (ids != EOS)[:, p - 1:-1]
  targets = ids[:, p:]
  rng = np.random.default_rng(7)
  old = np_get_log_probs(win(s_old), targets, mask)
  adv = rng.standard_normal(mask.shape)
  w = rng.uniform(0.5, 1.25, mask.shape)
  n = mask.sum()

  def ref(z):
    return np_pg_loss(np_get_log_probs(z, targets, mask), old, adv, mask, w,
                      0.2)

  def loss(z):
    return jnp.sum(losses.minillm_pg_loss(
        z, jnp.asarray(targets), f32(old), f32(adv), f32(w), cliprange=0.2,
        where=jnp.asarray(mask))) / n

  z = win(s_new)
  value, grad = jax.jit(jax.value_and_grad(loss))(f32(z))
  np.testing.assert_allclose(value, ref(z), rtol=1e-5)
  fd = np.zeros_like(z)
  for idx in np.ndindex(z.shape):
    e = np.zeros_like(z)
    e[idx] = 1e-6
    fd[idx] = (ref(z + e) - ref(z - e)) / 2e-6
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=2e-6)
  assert np.abs(fd).max() > 1e-3  # the ratio is not clipped everywhere


def test_single_step_term_is_reg_loss():
  ids, (s, t, _) = rollout_inputs(8)
  p, temp = 3, 0.7
  win = lambda z: z[:, p - 1:-1] / temp
  mask = (ids != EOS)[:, p - 1:-1]
  got = jnp.sum(losses.reverse_kl(f32(s[:, p - 1:-1]), f32(t[:, p - 1:-1]),
                                  temperature=temp, where=jnp.asarray(mask)))
  np.testing.assert_allclose(got / mask.sum(),
                             np_reg_loss(win(s), win(t), mask), rtol=1e-5)


@pytest.mark.parametrize("kd_ratio", [0.5, 0.0, 1.0])
def test_pt_loss_matches(kd_ratio):
  rng = np.random.default_rng(9)
  s, t = 2 * rng.standard_normal((2, 3, 6, 11))
  labels = rng.integers(0, 11, (3, 6))
  labels[0, :2] = -100
  labels[2, 4:] = -100
  mask = labels != -100
  per = losses.minillm_pt_loss(f32(s), None if kd_ratio == 0 else f32(t),
                               jnp.asarray(np.where(mask, labels, 0)),
                               kd_ratio=kd_ratio, where=jnp.asarray(mask))
  want, _ = np_pt_loss(s, t, labels, kd_ratio)
  np.testing.assert_allclose(jnp.sum(per) / mask.sum(), want, rtol=1e-5)


# --- the whole update -------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ARGS,
    dict(ARGS, temperature=0.8, teacher_mixed_alpha=None,
         single_step_reg=False, lm_coef=0.5, kd_ratio=0.0),
])
def test_minillm_update_matches_authors(args):
  """make_rollout + minillm_loss (value and gradient in the updated
  student's logits) == run_sample + ppo_loss + lm_coef * pt_loss."""
  ids, (s_old, t, s_new) = rollout_inputs(10)
  p, cfg = 3, config_of(args)
  rng = np.random.default_rng(11)
  pt_s, pt_t = 2 * rng.standard_normal((2, 4, 7, 9))
  pt_labels = rng.integers(0, 9, (4, 7))
  pt_labels[1, :3] = -100
  pt_mask = pt_labels != -100
  kd = None if args["kd_ratio"] == 0 else args["kd_ratio"]

  store = np_run_sample(s_old, t, ids, p, args)

  def ref(z):
    rl, _, _ = np_ppo_loss(z, t, store, ids, p, args)
    pt, _ = np_pt_loss(pt_s, pt_t, pt_labels, kd)
    return rl + args["lm_coef"] * pt

  roll, _ = M.make_rollout(jnp.asarray(ids), f32(s_old[:, :-1]),
                           f32(t[:, :-1]), cfg, prompt_len=p, eos_id=EOS)
  pt_batch = (f32(pt_s), f32(pt_t), jnp.asarray(np.where(pt_mask, pt_labels,
                                                         0)),
              jnp.asarray(pt_mask))

  @jax.jit
  def loss(z):
    return M.minillm_loss(z, f32(t[:, :-1]), roll, cfg, prompt_len=p,
                          pt=pt_batch)

  (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(
      f32(s_new[:, :-1]))
  np.testing.assert_allclose(value, ref(s_new), rtol=1e-5)
  _, pg, reg = np_ppo_loss(s_new, t, store, ids, p, args)
  np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["reg_loss"], reg, rtol=1e-5)
  fd = np.zeros(s_new.shape)
  for idx in np.ndindex(s_new[:, :-1].shape):
    e = np.zeros_like(s_new)
    e[idx] = 1e-6
    fd[idx] = (ref(s_new + e) - ref(s_new - e)) / 2e-6
  np.testing.assert_allclose(grad, fd[:, :-1], rtol=1e-3, atol=5e-6)


def test_ppo_minibatches_cover_each_epoch():
  order = M.ppo_minibatches(jax.random.key(0), 10, 3, 4)
  assert order.shape == (4, 3, 3)
  for e in range(4):
    flat = np.asarray(order[e]).ravel()
    assert len(set(flat.tolist())) == 9 and flat.max() < 10
  assert not np.array_equal(order[0], order[1])


def test_response_mask_stops_after_first_eos():
  ids = jnp.array([[5, 6, 2, 1, 1, 1], [5, 6, 2, 3, 4, 2]])
  np.testing.assert_array_equal(
      M.response_mask(ids, 2, EOS),
      [[True, True, False, False], [True, True, True, True]])


def test_errors():
  with pytest.raises(ValueError, match="teacher_mixed_alpha"):
    M.MiniLLMConfig(teacher_mixed_alpha=1.5)
  with pytest.raises(ValueError, match="ppo_epochs"):
    M.MiniLLMConfig(ppo_epochs=0)
  with pytest.raises(ValueError, match="teacher_mixed_alpha"):
    losses.teacher_mixed_weights(jnp.zeros(3), jnp.zeros(3),
                                 teacher_mixed_alpha=-0.1)
  with pytest.raises(ValueError, match="same shape"):
    losses.minillm_rewards(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="old_log_probs"):
    losses.minillm_pg_loss(jnp.zeros((2, 5)), jnp.zeros(2, jnp.int32),
                           jnp.zeros(3), jnp.zeros(2))
  with pytest.raises(ValueError, match="kd_ratio"):
    losses.minillm_pt_loss(jnp.zeros((2, 5)), None, jnp.zeros(2, jnp.int32))
  ids, (s, t, _) = rollout_inputs(0)
  with pytest.raises(ValueError, match="tokens\\[:, :-1\\]"):
    M.make_rollout(jnp.asarray(ids), f32(s), f32(t[:, :-1]),
                   M.MiniLLMConfig(), prompt_len=3)


# --- one outer step with real models -----------------------------------------


def test_update_fn_with_transformers():
  """make_update_fn on tiny Llama models: the rollout is the mixed
  generation of the step's key, the first update's terms equal the
  authors' transcription on those samples, and training moves the weights."""
  import flax.linen as nn
  import optax
  from kd_jax.models import lm
  v, p, new, n = 12, 3, 4, 4

  def model(seed, hidden):
    cfg = lm.LMConfig(vocab_size=v, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_layers=1,
                      num_heads=2, max_position_embeddings=16,
                      initializer_range=0.5)
    m = lm.Transformer(cfg, dtype=jnp.float32)
    return m, nn.unbox(jax.jit(m.init)(jax.random.key(seed),
                                       jnp.zeros((1, 4), jnp.int32)))

  (s, sv), (t, tv) = model(0, 16), model(1, 32)
  cfg = M.MiniLLMConfig(ppo_epochs=1)
  gen = lm.make_generate_fn(s, max_new_tokens=new, temperature=1.0,
                            eos_id=EOS, mix_in_model=t,
                            mix_in_alpha=cfg.teacher_mixed_alpha)
  generate = lambda params, tvars, prompts, key: gen(
      {"params": params}, prompts, key, tvars)
  s_apply = lambda params, x: s.apply({"params": params}, x)[0]
  t_apply = lambda tvars, x: t.apply(tvars, x)[0]
  tx = optax.adam(1e-2)
  step = jax.jit(M.make_update_fn(s_apply, t_apply, generate, tx, cfg,
                                  prompt_len=p, batch_size=n, chunk_size=2,
                                  eos_id=EOS))
  rng = np.random.default_rng(12)
  data = rng.integers(2, v, (n, p + new)).astype(np.int32)
  pt = rng.integers(0, v, (1, 2, 6)).astype(np.int32)
  params = sv["params"]
  key = jax.random.key(5)
  new_params, _, metrics = step(params, tx.init(params), tv,
                                {"tokens": data, "pt_tokens": pt}, key)
  # The rollout the step drew (its key derivation), chunk by chunk.
  keys = jax.random.split(jax.random.split(key)[0], 2)
  tokens = np.concatenate([np.asarray(generate(params, tv, data[i:i + 2, :p],
                                               keys[i // 2]))
                           for i in (0, 2)])
  assert tokens.shape == (n, p + new)
  pad = lambda z: np.concatenate([np.asarray(z, np.float64),
                                  np.zeros_like(z[:, :1])], 1)
  s_logits = pad(s_apply(params, tokens[:, :-1]))
  t_logits = pad(t_apply(tv, tokens[:, :-1]))
  a = dict(ARGS, kd_ratio=0.5)
  store = np_run_sample(s_logits, t_logits, tokens, p, a)
  # Responses are sampled: a row may emit EOS anywhere; the transcription's
  # mask equals kd_jax's here because prompts hold no EOS.
  _, pg, reg = np_ppo_loss(s_logits, t_logits, store, tokens, p, a)
  pt_s = np.asarray(s_apply(params, pt[0][:, :-1]), np.float64)
  pt_t = np.asarray(t_apply(tv, pt[0][:, :-1]), np.float64)
  pt_loss, _ = np_pt_loss(pt_s, pt_t, pt[0][:, 1:], 0.5)
  np.testing.assert_allclose(metrics["pg_loss"], pg, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics["reg_loss"], reg, rtol=1e-4)
  np.testing.assert_allclose(metrics["pt_loss"], pt_loss, rtol=1e-4)
  np.testing.assert_allclose(metrics["tot_loss"], pg + reg + pt_loss,
                             rtol=1e-4, atol=1e-5)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_params,
                       params)
  assert min(jax.tree.leaves(moved)) > 0
  assert all(np.isfinite(float(x)) for x in metrics.values())


def test_update_fn_flags_and_skips_nonfinite_updates():
  """`on_nonfinite`: a NaN reward (here a NaN teacher) gives a NaN loss;
  each update's ``nonfinite`` flag is 1, ``'skip_update'`` leaves the
  parameters and the optimizer state as they were, ``'stop'`` only flags;
  per-update metrics have shape [U]."""
  import optax
  v, p, r, n = 7, 2, 3, 4
  s_apply = lambda params, x: params["W"][x]
  t_apply = lambda tv, x: tv["W"][x]
  fixed = jnp.asarray(np.random.default_rng(0).integers(2, v, (n, r)))
  generate = lambda params, tv, prompts, key: jnp.concatenate(
      [prompts, fixed[:prompts.shape[0]]], 1)
  rng = np.random.default_rng(1)
  params = {"W": f32(rng.standard_normal((v, v)))}
  tokens = jnp.asarray(rng.integers(2, v, (n, p + r)))
  cfg = M.MiniLLMConfig(teacher_mixed_alpha=None, ppo_epochs=2)
  tx = optax.adam(1e-2)
  for mode, teacher in (("skip_update", np.nan), ("stop", np.nan),
                        ("skip_update", 1.0)):
    tv = {"W": f32(np.full((v, v), teacher) * rng.standard_normal((v, v)))}
    step = jax.jit(M.make_update_fn(
        s_apply, t_apply, generate, tx, cfg, prompt_len=p, batch_size=2,
        eos_id=EOS, per_update_metrics=True, on_nonfinite=mode))
    new, opt, m = step(params, tx.init(params), tv, {"tokens": tokens},
                       jax.random.key(0))
    assert m["nonfinite"].shape == m["pg_loss"].shape == (4,)
    bad = np.isnan(teacher)
    np.testing.assert_array_equal(m["nonfinite"], [float(bad)] * 4)
    same = np.array_equal(new["W"], params["W"])
    assert same == (bad and mode == "skip_update"), (mode, teacher)
    if same:
      assert int(opt[0].count) == 0
