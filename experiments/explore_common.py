"""Shared helpers of the standalone exploration scripts (`dafl_mnist.py`,
`privileged_mnist.py`, `deepinversion_demo.py`).

They use only kd_jax's public engine API (`kd_jax.train`: train states,
compiled steps, `make_multi_step`), not the trainer: each epoch is one
compiled `lax.scan` over the epoch's stacked batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import data
from kd_jax import train
from kd_jax.data import sources

MNIST_MEAN, MNIST_STD = sources.MNIST_MEAN, sources.MNIST_STD


def load_mnist(data_dir: Optional[str] = None):
  """`(train_x uint8 [N,28,28,1], train_y, test_x, test_y)`."""
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
  tx, ty = data.load_mnist_arrays("train", data_dir=data_dir)
  ex, ey = data.load_mnist_arrays("test", data_dir=data_dir)
  return tx, ty.astype(np.int32), ex, ey.astype(np.int32)


def normalizer(mean=MNIST_MEAN, std=MNIST_STD, view: Optional[Callable] = None):
  """`batch -> batch` inside the program: uint8 -> normalized float, then
  the model's view (e.g. `kd_jax.data.views.make_view('resize', size=32)`)."""
  def pre(batch):
    batch = dict(batch)
    batch["image"] = data.normalize(batch["image"], mean, std)
    if view is not None:
      batch = view(batch, None)
    return batch
  return pre


def epoch_chunk(images, labels, seed: int, epoch: int, batch_size: int,
                extra: Optional[Dict[str, np.ndarray]] = None):
  """The epoch's batches stacked `[steps, B, ...]` (last partial batch
  dropped), order `kd_jax.data.epoch_permutation(seed, epoch, N)`."""
  n = images.shape[0]
  steps = n // batch_size
  perm = data.epoch_permutation(seed, epoch, n)[:steps * batch_size]
  out = {"image": images[perm].reshape((steps, batch_size) + images.shape[1:]),
         "label": labels[perm].reshape(steps, batch_size)}
  for k, v in (extra or {}).items():
    out[k] = v[perm].reshape((steps, batch_size) + v.shape[1:])
  return out


def evaluate(eval_fn, variables, images, labels, batch_size=1000) -> float:
  """Top-1 accuracy (%) of a compiled `make_eval_step` over a dataset."""
  correct, count = 0.0, 0.0
  for i in range(0, images.shape[0], batch_size):
    m = eval_fn(variables, {"image": images[i:i + batch_size],
                            "label": labels[i:i + batch_size]})
    correct += float(m["top1"]) * float(m["count"])
    count += float(m["count"])
  return 100.0 * correct / count


def fit(model, tx, images, labels, test_images, test_labels, *, epochs: int,
        batch_size: int, seed: int, preprocess, teacher=None,
        teacher_variables=None, objective=None, log=print):
  """Supervised (teacher=None) or distillation training, one scanned call
  per epoch; returns `(variables, [test accuracy per epoch], seconds)`."""
  x0 = preprocess({"image": jnp.asarray(images[:2]),
                   "label": jnp.asarray(labels[:2])})["image"]
  init_key, state_key = jax.random.split(jax.random.key(seed))
  state = train.create_train_state(model.init(init_key, x0), tx, rng=state_key)
  if teacher is None:
    step = train.make_train_step(model, tx, preprocess=preprocess)
    run = jax.jit(train.make_multi_step(step))
    call = lambda st, chunk: run(st, chunk)  # noqa: E731
  else:
    step = train.make_distill_step(model, teacher, objective, tx,
                                   preprocess=preprocess)
    run = jax.jit(train.make_multi_step(step))
    call = lambda st, chunk: run(st, teacher_variables, chunk)  # noqa: E731
  ev = jax.jit(train.make_eval_step(model, preprocess=preprocess))
  accs, t0 = [], time.time()
  for epoch in range(epochs):
    state, metrics = call(state, epoch_chunk(images, labels, seed, epoch,
                                             batch_size))
    accs.append(evaluate(ev, state.variables, test_images, test_labels))
    log(f"  epoch {epoch + 1}/{epochs}: loss {float(metrics['loss'][-1]):.4f}"
        f" test top1 {accs[-1]:.2f}%  ({time.time() - t0:.0f} s)")
  return state.variables, accs, time.time() - t0


def machine_load() -> str:
  """`uptime`'s load averages (recorded next to every timing)."""
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True,
                          check=False).stdout.strip()
  except OSError:
    return "unknown"


def append_record(path: str, record: dict):
  """Appends one JSON line (every exploration run is recorded)."""
  d = os.path.dirname(path)
  if d:
    os.makedirs(d, exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def read_records(path: str):
  """The JSON lines of `append_record`."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
