r"""A short real run of every feature / relation distiller on MNIST.

    python -m experiments.run_methods_mnist [--data_dir ../shared/data/tfds] \
        [--steps 300] [--teacher_steps 600] [--methods at,crd,...]

A `cnn_teacher` (zoo `SmallCNN`: two 5x5 convs 32/64, dense 512) is trained
first; then, for every method, a small CNN student (two 5x5 convs 16/32,
dense 128; 32/64 channels for FSP and KDSVD, which need the teacher's
channel widths) is trained from the same initialization for `--steps` steps
with `1.0·CE + weight·L_method` (the published CIFAR weights; two-stage
methods first run their initialization stage for `--stage_steps` steps).
Baselines: the student alone (CE) and Hinton KD (0.1·CE + 0.9·KD, T=4).
Prints the test accuracy of each run. Not a benchmark of the methods (tiny
budget, weights tuned for CIFAR ResNets); a check that each one trains a real
network end to end with the engine. Layer selection on MNIST: all conv
stages (the CNNs have no stem stage to skip); CRD uses 4096 negatives.
"""

from __future__ import annotations

import argparse
import os
import time

# KDSVD runs many tiny LAPACK SVDs; OpenBLAS's own thread pool then spins
# against XLA's (minutes per step on a 2-core machine). One BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import distillers
from kd_jax import models
from kd_jax import train
from kd_jax.data import mnist as mnist_data

MEAN, STD = 0.1307, 0.3081


class StudentCNN(nn.Module):
  """Two 5x5 conv + max-pool stages, then Dense(hidden) -> 10."""
  widths: tuple = (16, 32)
  hidden: int = 128

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    stages, pre, h = [], [], x
    for w in self.widths:
      z = nn.Conv(w, (5, 5), padding="SAME")(h)
      h = nn.max_pool(nn.relu(z), (2, 2), strides=(2, 2))
      pre.append(z)  # before ReLU and pooling, as the zoo's SmallCNN
      stages.append(h)
    pooled = nn.relu(nn.Dense(self.hidden)(h.reshape(h.shape[0], -1)))
    return nn.Dense(10)(pooled), {"stages": stages, "preact_stages": pre,
                                  "pooled": pooled}


# method -> (weight, distiller kwargs, same-width student)
METHODS = {
    "fitnet": (100.0, {"hint_layer": 1}, False),
    "at": (1000.0, {"layers": None}, False),
    "nst": (50.0, {"layers": None}, False),
    "sp": (3000.0, {}, False),
    "pkt": (30000.0, {}, False),
    "rkd": (1.0, {}, False),
    "cc": (0.02, {}, False),
    "vid": (1.0, {"layers": None}, False),
    "ab": (1.0, {"layers": None}, False),
    "ft": (200.0, {}, False),
    "fsp": (50.0, {}, True),
    "kdsvd": (1.0, {"layers": None}, True),
    "ofd": (1e-3, {"layers": None}, False),
    "crd": (0.8, {"num_negatives": 4096}, False),
    "reviewkd": (5.0, {"layers": None}, False),
    "ofa": (1.0, {"stages": (1, 2), "layers": (0, 1)}, False),
}


def preprocess(batch):
  b = dict(batch)
  b["image"] = (b["image"].astype(jnp.float32) / 255.0 - MEAN) / STD
  return b


def batches(x, y, batch_size, steps, seed):
  rs = np.random.RandomState(seed)
  n = x.shape[0]
  order = np.concatenate([rs.permutation(n) for _ in range(
      steps * batch_size // n + 2)])
  for i in range(steps):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {"image": x[idx], "label": y[idx], "index": idx.astype(np.int32)}


def evaluate(model, variables, x, y):
  fwd = jax.jit(lambda v, xb: jnp.argmax(model.apply(
      v, preprocess({"image": xb})["image"], train=False)[0], -1))
  correct = 0
  for i in range(0, x.shape[0], 1000):
    correct += int(jnp.sum(fwd(variables, x[i:i + 1000]) == y[i:i + 1000]))
  return 100.0 * correct / x.shape[0]


def train_teacher(x, y, steps, batch_size):
  teacher = models.create("cnn_teacher", num_classes=10)
  tv = teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  tx = optax.adam(1e-3)
  state = train.create_train_state(tv, tx, rng=jax.random.PRNGKey(1))
  step = jax.jit(train.make_train_step(teacher, tx, preprocess=preprocess))
  for b in batches(x, y, batch_size, steps, seed=0):
    state, _ = step(state, {"image": b["image"], "label": b["label"]})
  return teacher, state.variables


def run_method(name, *, teacher, tv, x, y, xt, yt, steps, stage_steps,
               batch_size, lr):
  same = name in METHODS and METHODS[name][2]
  student = StudentCNN((32, 64) if same else (16, 32))
  sv = student.init(jax.random.PRNGKey(2), jnp.zeros((1, 28, 28, 1)))
  if name == "student":
    obj = train.Objective(ce_weight=1.0)
  elif name == "kd":
    obj = train.Objective(ce_weight=0.1, terms=(
        train.Term("kd", 0.9, temperature=4.0),))
  else:
    weight, kw, _ = METHODS[name]
    kw = dict(kw)
    if name == "crd":
      kw.update(num_data=x.shape[0], dataset_labels=y)
    terms = [train.Term(name, weight, distiller=distillers.create(name, **kw))]
    if name == "ofa":  # OFA also applies its loss to the student's logits
      terms.append(train.Term("ofa", 1.0, label="ofa_logits", eps=1.0))
    obj = train.Objective(ce_weight=1.0, terms=tuple(terms))
  tx = optax.adam(lr)
  first = next(batches(x, y, batch_size, 1, seed=1))
  dparams, dstate = ({}, {})
  if obj.distiller_terms:
    dparams, dstate = distillers.init_distillers(
        obj, jax.random.PRNGKey(3), student_apply=student,
        teacher_apply=teacher, student_variables=sv, teacher_variables=tv,
        batch=first, preprocess=preprocess)
  stage_info = ""
  for t in obj.distiller_terms:
    stage = t.distiller.pretrain
    if stage is None or stage_steps <= 0 or name == "fitnet":
      continue  # FitNets: joint training, as RepDistiller / mdistiller
    sv, mp, ms, losses = distillers.run_pretrain_stage(
        stage, t.label, student_apply=student, teacher_apply=teacher,
        student_variables=sv, teacher_variables=tv,
        distiller_params=dparams[t.label], distiller_state=dstate[t.label],
        tx=optax.adam(lr), batches=batches(x, y, batch_size, stage_steps, 7),
        rng=jax.random.PRNGKey(5), preprocess=preprocess)
    dparams[t.label], dstate[t.label] = mp, ms
    stage_info = f"stage loss {losses[0]:.4g}->{losses[-1]:.4g}"
  state = train.create_train_state(sv, tx, rng=jax.random.PRNGKey(4),
                                   distiller_params=dparams,
                                   distiller_state=dstate)
  if obj.terms:
    step = jax.jit(train.make_distill_step(student, teacher, obj, tx,
                                           preprocess=preprocess))
    run = lambda st, b: step(st, tv, b)  # noqa: E731
  else:
    step = jax.jit(train.make_train_step(student, tx, preprocess=preprocess))
    run = step
  first_m = last_m = None
  for b in batches(x, y, batch_size, steps, seed=1):
    state, m = run(state, b)
    first_m = first_m or jax.device_get(m)
    last_m = m
  last_m = jax.device_get(last_m)
  acc = evaluate(student, state.variables, xt, yt)
  term = name if name in METHODS else None
  trace = (f"{term} {float(first_m[term]):.4g}->{float(last_m[term]):.4g}"
           if term else "")
  return acc, " ".join(s for s in (stage_info, trace) if s)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", default="../shared/data/tfds")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--stage_steps", type=int, default=100)
  p.add_argument("--teacher_steps", type=int, default=600)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--methods", default="student,kd," + ",".join(METHODS))
  args = p.parse_args(argv)
  x, y = mnist_data.load_mnist_arrays("train", data_dir=args.data_dir)
  xt, yt = mnist_data.load_mnist_arrays("test", data_dir=args.data_dir)
  t0 = time.time()
  teacher, tv = train_teacher(x, y, args.teacher_steps, args.batch_size)
  print(f"teacher cnn_teacher: {evaluate(teacher, tv, xt, yt):.2f}% test "
        f"({args.teacher_steps} steps, {time.time() - t0:.0f}s)", flush=True)
  print(f"{'method':10s} {'test top-1':>10s}  {'time':>6s}  loss trace")
  for name in args.methods.split(","):
    t0 = time.time()
    acc, info = run_method(name, teacher=teacher, tv=tv, x=x, y=y, xt=xt,
                           yt=yt, steps=args.steps,
                           stage_steps=args.stage_steps,
                           batch_size=args.batch_size, lr=args.lr)
    print(f"{name:10s} {acc:9.2f}%  {time.time() - t0:5.0f}s  {info}",
          flush=True)


if __name__ == "__main__":
  main()
