"""docs/architecture.md's "adding ..." checklists, followed: a new logit
loss, a new feature distiller and a new optimizer, each added exactly as the
checklist says (a function / class / builder + its registration) and then
used by a config through the one trainer, with nothing else changed. (The LM
method checklist is followed by `kd_jax/distillers/tinybert.py` and
`minilm.py`: `tests/test_lm_intermediate.py`, the 'inter' phase of
`tests/test_lm_trainer.py`.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mnist
from kd_jax import distillers
from kd_jax import losses
from kd_jax import trainer
from kd_jax.distillers import base as dbase
from kd_jax.train import optim


def _debug(phase="distill"):
  c = mnist.get_config(phase)
  c.debug = True
  return c


def l1_logits(student_logits, teacher_logits, *, scale=1.0, where=None):
  """Toy loss: scale * mean |z_s - z_t| per example."""
  if not scale > 0:
    raise ValueError(f"scale must be > 0; got {scale}.")
  out = scale * jnp.mean(jnp.abs(student_logits - teacher_logits), -1)
  return out if where is None else jnp.where(where, out, 0.0)


@pytest.fixture
def registered_loss():
  losses.register_loss("l1_logits", l1_logits)
  yield
  del losses.LOGIT_LOSSES["l1_logits"]


def test_adding_a_logit_loss(registered_loss, tmp_path):
  c = _debug()
  c.loss.terms = {"l1": {"name": "l1_logits", "weight": 0.5, "scale": 2.0}}
  rep = trainer.train_and_evaluate(c, str(tmp_path / "ok"))
  assert np.isfinite(rep["last_top1"])
  # Its hyperparameters are checked against the signature, its values by
  # tracing it at parse time (before data or compilation).
  c.loss.terms.l1.scael = 1.0
  with pytest.raises(trainer.ConfigError, match=r"loss\.terms\.l1.*scael"):
    trainer.parse(trainer.apply_debug(c))
  del c.loss.terms.l1["scael"]
  c.loss.terms.l1.scale = 0.0
  with pytest.raises(trainer.ConfigError,
                     match=r"config\.loss\.terms\.l1: scale must be > 0"):
    trainer.parse(trainer.apply_debug(c))


class PooledL2(dbase.Distiller):
  """Toy feature distiller: a trainable linear map of the student's last
  hidden features onto the teacher's."""

  def __init__(self, *, feature_key: str = "stages"):
    self.feature_key = feature_key

  def _pair(self, inputs):
    return (self._student(inputs, self.feature_key, -1)[0],
            self._teacher(inputs, self.feature_key, -1)[0])

  def init(self, rng, inputs):
    s, t = self._pair(inputs)
    return {"w": 0.01 * jax.random.normal(rng, (s.shape[-1],
                                                t.shape[-1]))}, {}

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    return jnp.mean(jnp.square(s @ params["w"] - t)), state


@pytest.fixture
def registered_distiller():
  dbase.register("toy_pooled_l2")(PooledL2)
  yield
  del dbase._REGISTRY["toy_pooled_l2"]  # pylint: disable=protected-access


def test_adding_a_feature_distiller(registered_distiller, tmp_path):
  c = _debug()
  c.loss.terms.toy = {"distiller": "toy_pooled_l2", "weight": 1.0}
  rep = trainer.train_and_evaluate(c, str(tmp_path / "ok"))
  w = rep["_final_state"].distiller_params["toy"]["w"]
  assert w.shape == (128, 256)  # student 784-128 vs teacher 784-512-256
  c.loss.terms.toy.feature_kee = "x"
  with pytest.raises(trainer.ConfigError, match=r"toy\.feature_kee: "
                     r"unknown argument of distiller 'toy_pooled_l2'"):
    trainer.parse(trainer.apply_debug(c))
  assert "toy_pooled_l2" in distillers.available()


@pytest.fixture
def registered_optimizer():
  optim.register_optimizer("lion_test", optim.OptimizerEntry(
      lambda spec, schedule: optax.lion(schedule, weight_decay=0.0)))
  yield
  del optim.OPTIMIZERS["lion_test"]


def test_adding_an_optimizer(registered_optimizer, tmp_path):
  c = _debug("student")
  c.optimizer.name = "lion_test"
  c.optimizer.learning_rate = 1e-4
  rep = trainer.train_and_evaluate(c, str(tmp_path / "ok"))
  assert rep["steps"] == 2 and np.isfinite(rep["last_loss"])
  # The transformation the config builds is Lion's: -lr * sign(gradient)
  # on its first step (zero momentum).
  tx, _ = optim.make_optimizer(trainer.parse(trainer.apply_debug(c))
                               .optimizer, steps_per_epoch=1, total_steps=1)
  p = {"w": jnp.ones(3)}
  upd, _ = tx.update({"w": jnp.asarray([1.0, -2.0, 0.5])}, tx.init(p), p)
  np.testing.assert_allclose(np.asarray(upd["w"]), [-1e-4, 1e-4, -1e-4],
                             rtol=1e-6)
