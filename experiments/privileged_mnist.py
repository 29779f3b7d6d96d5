r"""Exploration of Lopez-Paz, Bottou, Schölkopf & Vapnik (ICLR 2016),
"Unifying distillation and privileged information", Section 4 experiment 5
(MNIST), with kd_jax's engine API -- not the trainer. EXPLORATION ONLY.

The protocol is the authors' `code/mnist.py` (github.com/lopezpaz/
distillation_privileged_information):

* 10 repetitions; each draws `N` (300 or 500) training images at random;
  the teacher sees the 28x28 images (privileged view), the student the same
  images downscaled to 7x7 (`scipy.misc.imresize(x, 25, mode='F')` = PIL
  bilinear = the `downscale` view); pixels / 255, no other normalization;
* teacher and student: MLPs with two hidden layers of 20 ReLUs (Keras Dense:
  Glorot-uniform weights, zero biases), RMSprop (Keras 0.x: lr 1e-3, rho
  0.9, eps 1e-6 inside the square root), batch 128 (the last, partial batch
  of every epoch included), 50 epochs, shuffled every epoch;
* the student minimizes `(1 - l) CE(y, softmax(f(x))) + T^2 l CE(softmax(
  f_t(x*)/T), softmax(f(x)))` (`kd_jax.losses.generalized_distillation_loss`,
  the authors' `t*t*l` weighting) for T in {1, 2, 5, 10, 20, 50} and l in
  {0, 0.1, ..., 1}; a fresh student per (T, l); test accuracy on the full
  test set (the student on 7x7 test images).

The paper shows the results as curves (Figure 2); the numbers behind them are
the authors' `figures/result_mnist_{300,500}` files (teacher accuracy,
student accuracy per T and l, 10 repetitions), summarized in `PAPER` below.

Usage (appends one JSON line per N to `<workdir>/runs.jsonl`):

  python -m experiments.privileged_mnist --n=300 --reps=10
"""

from __future__ import annotations

import itertools
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import explore_common as common
from kd_jax import models
from kd_jax import train
from kd_jax.data import views

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 300, "training examples per repetition")
flags.DEFINE_integer("reps", 10, "repetitions (authors: 10)")
flags.DEFINE_integer("epochs", 50, "epochs (authors: 50)")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_list("temperatures", ["1", "2", "5", "10", "20", "50"], "T grid")
flags.DEFINE_list("lambdas", [f"{i / 10:.1f}" for i in range(11)], "l grid")
flags.DEFINE_string("workdir", "workdirs/privileged_mnist", "outputs")
flags.DEFINE_bool("report", False, "print the tables of the recorded runs "
                  "(<workdir>/runs.jsonl) instead of running")

BATCH = 128

# Means over the authors' 10 repetitions (accuracy, from result_mnist_N):
# teacher; student alone (l = 0, mean over all T rows); and the best (T, l).
PAPER = {300: {"teacher": 0.8006, "student": 0.4700, "best": (20, 0.1, 0.6562)},
         500: {"teacher": 0.8366, "student": 0.5888,
               "best": (20, 0.6, 0.7433)}}


def _tx():
  return optax.rmsprop(1e-3, decay=0.9, eps=1e-6)   # Keras 0.x RMSprop


def _batches(rng, n):
  """Keras `fit(shuffle=True, batch_size=128)`: a new order every epoch,
  the last batch partial."""
  perm = rng.permutation(n)
  return [perm[i:i + BATCH] for i in range(0, n, BATCH)]


def _fit(step_fn, states, arrays, order_rng, epochs):
  """Runs `epochs` of Keras-style batches; `arrays[k]` is `[reps, n, ...]`;
  the reps share the batch order (vmapped states)."""
  n = arrays["label"].shape[1]
  for _ in range(epochs):
    for idx in _batches(order_rng, n):
      states, _ = step_fn(states, {k: v[:, idx] for k, v in arrays.items()})
  return states


def _init_states(model, x0, tx, keys):
  def one(k):
    k1, k2 = jax.random.split(k)
    return train.create_train_state(model.init(k1, x0), tx, rng=k2)
  return jax.vmap(one)(keys)


def _accuracy(model, states, x, y):
  logits = jax.jit(jax.vmap(lambda v: model.apply(v, x)[0]))(
      {"params": states.params})
  return np.asarray(jnp.mean(jnp.argmax(logits, -1) == y, axis=-1))


def _split(mnist, n, reps, seed):
  """Per repetition: N random training examples (the authors' permutation)."""
  tx_, ty, _, _ = mnist
  rng = np.random.RandomState(seed)
  idx = np.stack([rng.permutation(tx_.shape[0])[:n] for _ in range(reps)])
  return tx_[idx], ty[idx]


def run(mnist):
  n, reps = FLAGS.n, FLAGS.reps
  xr, yr = _split(mnist, n, reps, FLAGS.seed)             # [reps, n, 28, 28, 1]
  _, _, ex, ey = mnist
  both = views.model_views(student="downscale", teacher=None)
  scale = lambda u8: jnp.asarray(u8, jnp.float32) / 255.0  # noqa: E731
  tr = jax.vmap(lambda x: both({"image": x}, None))(scale(xr))
  te = both({"image": scale(ex)}, None)
  order = np.random.RandomState(FLAGS.seed + 1)
  keys = jax.random.split(jax.random.key(FLAGS.seed), reps)

  model = models.create("lopez_paz_mlp", num_classes=10)
  step = jax.jit(jax.vmap(train.make_train_step(model, _tx())))
  t0 = time.time()
  tstates = _fit(step, _init_states(model, te["teacher_image"][:1], _tx(),
                                    keys),
                 {"image": tr["teacher_image"], "label": jnp.asarray(yr)},
                 order, FLAGS.epochs)
  teacher_acc = _accuracy(model, tstates, te["teacher_image"], ey)
  t_logits = jax.vmap(lambda v, x: model.apply(v, x)[0])(
      {"params": tstates.params}, tr["teacher_image"])   # the privileged view
  print(f"N={n}: teacher {teacher_acc.mean():.4f} +- {teacher_acc.std():.4f} "
        f"({time.time() - t0:.0f} s)", flush=True)

  results = {}
  arrays = {"image": tr["image"], "label": jnp.asarray(yr),
            "teacher_logits": t_logits}
  for i, (t_, l_) in enumerate(itertools.product(FLAGS.temperatures,
                                                 FLAGS.lambdas)):
    T, lam = float(t_), float(l_)
    objective = train.Objective(ce_weight=1.0 - lam, terms=(
        train.Term("generalized_distillation", lam, temperature=T),))
    inner = train.make_distill_step(model, None, objective, _tx())
    dstep = jax.jit(jax.vmap(lambda st, b: inner(st, None, b)))
    skeys = jax.vmap(lambda k: jax.random.fold_in(k, i + 1))(keys)
    sstates = _fit(dstep, _init_states(model, te["image"][:1], _tx(), skeys),
                   arrays, order, FLAGS.epochs)
    acc = _accuracy(model, sstates, te["image"], ey)
    results[f"T={t_},l={l_}"] = acc.tolist()
    print(f"  T={t_:>2} l={l_}: {acc.mean():.4f} +- {acc.std():.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
  return {"n": n, "reps": reps, "teacher": teacher_acc.tolist(),
          "students": results, "seconds": time.time() - t0}


def summarize(res):
  """teacher / student alone (l = 0) / best (T, l) means, as for PAPER."""
  st = res["students"]
  lam0 = [v for k, v in st.items() if k.endswith("l=0.0")]
  best = max(st.items(), key=lambda kv: np.mean(kv[1]))
  return {"teacher_mean": float(np.mean(res["teacher"])),
          "teacher_std": float(np.std(res["teacher"])),
          "student_l0_mean": float(np.mean(lam0)),
          "student_l0_std": float(np.std(lam0)),
          "best_setting": best[0], "best_mean": float(np.mean(best[1])),
          "best_std": float(np.std(best[1]))}


def report_tables(records):
  """Markdown: per N, teacher / student alone / fixed and best (T, l) with
  paired gains over repetitions (the student alone of a repetition = the
  mean of its six l = 0 runs), and the T x l grid of means."""
  from experiments.seed_experiment import paired_interval  # pylint: disable=g-import-not-at-top
  out = []
  for rec in records:
    st = {k: np.asarray(v) for k, v in rec["students"].items()}
    alone = np.mean([v for k, v in st.items() if k.endswith("l=0.0")], axis=0)
    best = max(st, key=lambda k: st[k].mean())
    out.append(f"N={rec['n']} ({rec['reps']} reps, {rec['wall_seconds']:.0f} s,"
               f" load after: {rec['load_after'].split('average:')[-1]})")
    out.append("| model | accuracy % (mean +- std) | paired gain vs alone "
               "[95% CI] |\n|---|---|---|")
    t = np.asarray(rec["teacher"])
    out.append(f"| teacher (28x28) | {100 * t.mean():.2f} +- {100 * t.std():.2f} | |")
    out.append(f"| student alone (7x7, l=0) | {100 * alone.mean():.2f} +- "
               f"{100 * alone.std():.2f} | |")
    for k in ("T=10,l=1.0", "T=20,l=0.5", best):
      if k not in st:
        continue
      g = paired_interval(st[k] - alone)
      ci = ("" if g["ci95"] is None else
            f" [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]")
      tag = " (best)" if k == best else ""
      out.append(f"| distilled {k}{tag} | {100 * st[k].mean():.2f} +- "
                 f"{100 * st[k].std():.2f} | {100 * g['mean']:+.1f}{ci} |")
    temps = sorted({k.split(",")[0] for k in st}, key=lambda x: float(x[2:]))
    lams = sorted({k.split(",")[1] for k in st}, key=lambda x: float(x[2:]))
    out.append("\n| T \\ l | " + " | ".join(x[2:] for x in lams) + " |")
    out.append("|---|" + "---|" * len(lams))
    for tt in temps:
      out.append(f"| {tt[2:]} | " + " | ".join(
          f"{100 * st[f'{tt},{ll}'].mean():.1f}" for ll in lams) + " |")
    out.append("")
  return "\n".join(out)


def main(argv):
  del argv
  if FLAGS.report:
    path = os.path.join(FLAGS.workdir, "runs.jsonl")
    print(report_tables(common.read_records(path)))
    return
  mnist = common.load_mnist()
  load0, t0 = common.machine_load(), time.time()
  res = run(mnist)
  summary = summarize(res)
  rec = {"script": "experiments/privileged_mnist.py",
         "command": " ".join(sys.argv), **res, "summary": summary,
         "paper": PAPER.get(FLAGS.n), "wall_seconds": time.time() - t0,
         "load_before": load0, "load_after": common.machine_load(),
         "jax": jax.__version__}
  common.append_record(os.path.join(FLAGS.workdir, "runs.jsonl"), rec)
  print(summary, "paper:", PAPER.get(FLAGS.n))


if __name__ == "__main__":
  app.run(main)
