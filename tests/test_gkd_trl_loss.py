"""GKD's loss as TRL computes it, against kd_jax's public loss functions.

A float64 NumPy transcription of huggingface/trl
``trl/experimental/gkd/gkd_trainer.py``: ``GKDTrainer.compute_loss`` (the
non-Liger path) shifts the logits and labels (``logits[:, :-1]``,
``labels[:, 1:]``) and calls ``generalized_jsd_loss(student_logits,
teacher_logits, labels=..., beta=self.beta)`` **without** a temperature, so
the loss is computed at T = 1 (``GKDConfig.temperature``, default 0.9, only
reaches the ``GenerationConfig`` of the on-policy samples). The loss is the
``batchmean`` of the per-token JSD over the tokens whose label is not -100
(sum / count, ``clamp_min(1)``), with TRL's endpoints (``beta = 0``:
``KL(teacher || student)``, ``beta = 1``: ``KL(student || teacher)``).

kd_jax's token mean of `kd_jax.losses.js_divergence` at temperature 1 must
equal it; this is the reference the GKD step's default (TRL's meaning:
sampling temperature only, loss at T = 1) is to be checked against.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl_div_log_target(inp, target):
  """``F.kl_div(inp, target, reduction="none", log_target=True)``."""
  return np.exp(target) * (target - inp)


def np_generalized_jsd_loss(student_logits, teacher_logits, labels=None,
                            beta=0.5, temperature=1.0):
  """GKDTrainer.generalized_jsd_loss, reduction="batchmean"."""
  student_logits = student_logits / temperature
  teacher_logits = teacher_logits / temperature
  s_lp = np_log_softmax(student_logits)
  t_lp = np_log_softmax(teacher_logits)
  if beta == 0:
    jsd = np_kl_div_log_target(s_lp, t_lp)
  elif beta == 1:
    jsd = np_kl_div_log_target(t_lp, s_lp)
  else:
    stacked = np.stack([s_lp + np.log1p(-beta), t_lp + np.log(beta)])
    m = stacked.max(0)
    mix = m + np.log(np.exp(stacked - m).sum(0))
    kl_teacher = np_kl_div_log_target(mix, t_lp)
    kl_student = np_kl_div_log_target(mix, s_lp)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
  if labels is not None:
    mask = labels != -100
    jsd = jsd[mask]
    return jsd.sum() / max(mask.sum(), 1)
  return jsd.sum() / max(jsd.shape[0], 1)


def np_trl_compute_loss(student_logits, teacher_logits, labels, beta):
  """GKDTrainer.compute_loss (non-Liger): shift, then the loss at T = 1."""
  return np_generalized_jsd_loss(student_logits[:, :-1],
                                 teacher_logits[:, :-1], labels[:, 1:],
                                 beta=beta)


def inputs(seed, b=3, length=10, v=13, prompt=4):
  rng = np.random.default_rng(seed)
  s = 2.0 * rng.standard_normal((b, length, v))
  t = 2.0 * rng.standard_normal((b, length, v))
  labels = rng.integers(0, v, (b, length))
  labels[:, :prompt] = -100                  # the prompt
  labels[1, 7:] = -100                       # after the first EOS
  return s, t, labels


def kd_jax_gkd_loss(s, t, labels, beta, temperature=1.0):
  """Token mean of kd_jax's JSD on the shifted logits / completion mask."""
  mask = labels[:, 1:] != -100
  per = losses.js_divergence(jnp.asarray(s[:, :-1], jnp.float32),
                             jnp.asarray(t[:, :-1], jnp.float32), beta=beta,
                             temperature=temperature,
                             where=jnp.asarray(mask))
  return float(jnp.sum(per)) / max(int(mask.sum()), 1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_js_divergence_at_t1_is_trl_gkd_loss(beta):
  s, t, labels = inputs(0)
  want = np_trl_compute_loss(s, t, labels, beta)
  np.testing.assert_allclose(kd_jax_gkd_loss(s, t, labels, beta), want,
                             rtol=1e-5)


def test_trl_loss_ignores_the_sampling_temperature():
  """GKDConfig.temperature (0.9) is not a loss temperature in TRL: dividing
  the logits by it, as kd_jax's GKD step did, gives another loss."""
  s, t, labels = inputs(1)
  trl = np_trl_compute_loss(s, t, labels, 0.5)
  at_t1 = kd_jax_gkd_loss(s, t, labels, 0.5, temperature=1.0)
  at_sampling_t = kd_jax_gkd_loss(s, t, labels, 0.5, temperature=0.9)
  np.testing.assert_allclose(at_t1, trl, rtol=1e-5)
  assert abs(at_sampling_t - trl) > 1e-3 * trl
  # ... which is TRL's function called *with* temperature=0.9.
  np.testing.assert_allclose(
      at_sampling_t,
      np_generalized_jsd_loss(s[:, :-1], t[:, :-1], labels[:, 1:], beta=0.5,
                              temperature=0.9), rtol=1e-5)


def test_empty_completion_is_zero_like_trl():
  s, t, labels = inputs(2)
  labels[:] = -100
  assert np_trl_compute_loss(s, t, labels, 0.5) == 0.0
  assert kd_jax_gkd_loss(s, t, labels, 0.5) == 0.0


def _bigram(variables, tokens, train=False, rngs=None):
  del train, rngs
  return variables["params"]["W"][tokens], {}


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_gkd_step_default_is_trl_compute_loss(beta):
  """`make_gkd_step`'s defaults: the JSD at T = 1 (TRL's loss) on the
  completion positions; ``lmbda = 0`` trains on the data completions, so
  the step's loss is TRL's ``compute_loss`` with the prompt labels at
  -100. TRL's sampling ``temperature`` is refused with the reason."""
  import jax
  import optax
  from kd_jax.train import create_train_state
  from kd_jax.train import lm_steps
  v, b, length, prompt = 11, 3, 9, 4
  rng = np.random.default_rng(3)
  ws, wt = 2.0 * rng.standard_normal((2, v, v))
  tokens = rng.integers(0, v, (b, length))
  step = jax.jit(lm_steps.make_gkd_step(
      _bigram, lambda tv, x: _bigram(tv, x), optax.sgd(0.0),
      student_generate=lambda *a: None, prompt_len=prompt, lmbda=0.0,
      beta=beta))
  state = create_train_state({"params": {"W": jnp.asarray(ws, jnp.float32)}},
                             optax.sgd(0.0), rng=jax.random.key(0))
  _, metrics = step(state, {"params": {"W": jnp.asarray(wt, jnp.float32)}},
                    {"tokens": jnp.asarray(tokens, jnp.int32)})
  labels = tokens.copy()
  labels[:, :prompt] = -100
  want = np_trl_compute_loss(ws[tokens], wt[tokens], labels, beta)
  np.testing.assert_allclose(float(metrics["js_divergence"]), want,
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  with pytest.raises(ValueError, match="sampling temperature.*"
                     "loss_temperature"):
    lm_steps.make_gkd_step(_bigram, _bigram, optax.sgd(0.0),
                           student_generate=None, prompt_len=prompt,
                           temperature=0.9)
