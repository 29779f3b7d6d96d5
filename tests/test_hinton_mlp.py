"""The MNIST MLPs of Hinton, Vinyals & Dean 2015 and the sweep plot."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import metrics_io
from kd_jax import models
from kd_jax.models import mnist


def _count(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,width", [("mlp_1200x2", 1200), ("mlp_800x2", 800),
                                        ("mlp_300x2", 300), ("mlp_30x2", 30)])
def test_registered_sizes(name, width):
  m = models.create(name, num_classes=10)
  shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  want = 784 * width + width + width * width + width + width * 10 + 10
  assert _count(shapes["params"]) == want
  assert (m.dropout, m.input_dropout) == ((0.5, 0.2) if width == 1200 else
                                          (0.0, 0.0))


def test_input_dropout_drops_and_rescales_inputs():
  # No hidden layer, identity-like kernel: logit j = pixel j (kept or not).
  m = mnist.MLP(hidden=(), num_classes=784, dropout=0.0, input_dropout=0.25)
  x = jnp.linspace(0.1, 1.0, 784).reshape(1, 28, 28, 1)
  v = {"params": {"Dense_0": {"kernel": jnp.eye(784),
                              "bias": jnp.zeros(784)}}}
  z, _ = m.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)})
  z, xf = np.asarray(z[0]), np.asarray(x).ravel()
  kept = np.isclose(z, xf / 0.75, rtol=1e-5)
  dropped = z == 0
  assert np.all(kept | dropped)
  assert 0.15 < dropped.mean() < 0.35
  ze, _ = m.apply(v, x, train=False)
  np.testing.assert_allclose(np.asarray(ze[0]), xf, rtol=1e-6)


def test_hinton_mlp_bad_width():
  with pytest.raises(ValueError, match="width"):
    mnist.hinton_mlp(0)


def test_plot_sweep(tmp_path):
  path = str(tmp_path / "sweep.png")
  res = {"800 units": {1.0: [150, 148], 20.0: [80, 78]},
         "30 units": {1.0: [400], 3.0: [350, 352], 20.0: [420]}}
  out = metrics_io.plot_sweep(res, path, xlabel="T", ylabel="test errors",
                              note="paper: ...", logx=True)
  assert out == path and os.path.getsize(path) > 1000
  with pytest.raises(ValueError, match="empty"):
    metrics_io.plot_sweep({}, path, xlabel="T", ylabel="e")
  with pytest.raises(ValueError, match="without values"):
    metrics_io.plot_sweep({"a": {1.0: []}}, path, xlabel="T", ylabel="e")
