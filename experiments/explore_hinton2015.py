r"""Protocol exploration for Hinton, Vinyals & Dean 2015, Section 3 (MNIST).

A standalone script on the engine's public API (`kd_jax.train.make_train_step
/ make_distill_step / make_multi_step`, `kd_jax.data`), not the trainer: it
finds the schedules the final seed experiment will use. Each call runs one
phase and appends one JSON record (arguments, test errors, per-class errors,
bias shifts, wall / CPU time, machine load) to `--log`.

Phases:

* `teacher`: 784-1200-1200-10 ReLU (`mlp_1200x2`: dropout 0.2 in / 0.5
  hidden), max-norm on incoming weight vectors, Hinton et al. 2012 momentum
  SGD with decaying LR and rising momentum, inputs jittered by up to
  `--jitter` pixels. Saves its parameters and its logits on the (unjittered)
  training and test sets to `--workdir`.
* `student`: `mlp_<W>x2` without regularization, hard labels only.
* `distill`: the same student on the teacher's soft targets at `--T` (plus
  `--hard_weight` x CE), on a transfer set that may omit classes
  (`--omit 3`) or keep only some (`--keep 7 8`); the bias shift of those
  classes is chosen on the test set (the paper's protocol) and on a
  validation split held out from the training set (`--val_size`).
* `plot_sweep`: reads the `distill` records of `--log` whose tag starts
  with one of the comma-separated `--tag` prefixes and plots test errors vs
  `--T` per (width, epochs)
  (`<workdir>/temperature_sweep.png`, `kd_jax.metrics_io.plot_sweep`).

Every record has the wall time of the first epoch (with compilation) and
the median of the others.

Example (a short probe; `nice` on a shared machine)::

  TFDS_DATA_DIR=../shared/data/tfds nice -n 10 python -m \
      experiments.explore_hinton2015 --phase=teacher --epochs=5 \
      --workdir=/tmp/h15 --log=/tmp/h15/probes.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kd_jax import data as data_lib
from kd_jax import models
from kd_jax import train
from kd_jax.train import bias_shift
from kd_jax.train import transforms

NUM_CLASSES = 10
SHIFT_GRID = np.round(np.arange(-15.0, 15.0001, 0.1), 1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--phase", required=True,
                 choices=("teacher", "student", "distill", "plot_sweep"))
  p.add_argument("--workdir", required=True)
  p.add_argument("--log", default=None, help="JSON-lines file (default: "
                 "<workdir>/probes.jsonl)")
  p.add_argument("--tag", default="", help="free text stored in the record")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch", type=int, default=100)
  p.add_argument("--width", type=int, default=800, help="student width")
  # Optimizer: 'hinton' = Hinton et al. 2012 momentum SGD (+ schedules),
  # 'sgd' = optax SGD + Nesterov-free momentum, 'adam'.
  p.add_argument("--opt", default="hinton", choices=("hinton", "sgd", "adam"))
  p.add_argument("--lr", type=float, default=None,
                 help="initial LR (hinton: 10 teacher / 1 student; sgd 0.1)")
  p.add_argument("--lr_final_frac", type=float, default=0.0025,
                 help="LR at the last epoch / initial LR (2012: 0.998^3000)")
  p.add_argument("--p_i", type=float, default=0.5)
  p.add_argument("--p_f", type=float, default=0.99)
  p.add_argument("--ramp_frac", type=float, default=1 / 6,
                 help="momentum ramp length / epochs (2012: 500/3000)")
  p.add_argument("--max_norm", type=float, default=None,
                 help="radius of the incoming weight vectors (teacher "
                 "default sqrt(15))")
  p.add_argument("--max_norm_output", action="store_true",
                 help="also constrain the output layer's incoming vectors")
  p.add_argument("--jitter", type=int, default=None,
                 help="teacher input jitter in pixels (default 2)")
  p.add_argument("--dropout", type=float, default=None)
  p.add_argument("--input_dropout", type=float, default=None)
  p.add_argument("--T", type=float, default=20.0)
  p.add_argument("--soft_weight", type=float, default=1.0)
  p.add_argument("--hard_weight", type=float, default=0.0)
  p.add_argument("--omit", type=int, nargs="*", default=None)
  p.add_argument("--keep", type=int, nargs="*", default=None)
  p.add_argument("--val_size", type=int, default=0,
                 help="examples held out of the transfer set to choose "
                 "the bias shift on")
  p.add_argument("--teacher_dir", default=None,
                 help="where the teacher's logits are (default: workdir)")
  p.add_argument("--eval_every", type=int, default=0,
                 help="also print test errors every N epochs (0: end only)")
  return p.parse_args(argv)


# ---------------------------------------------------------------------------
# Data, model, optimizer.


def load_mnist():
  tr = data_lib.load_mnist_arrays("train")
  te = data_lib.load_mnist_arrays("test")
  return tr, te


def build_model(args):
  if args.phase == "teacher":
    dropout = 0.5 if args.dropout is None else args.dropout
    in_drop = 0.2 if args.input_dropout is None else args.input_dropout
    return models.mnist.hinton_mlp(1200, dropout=dropout,
                                   input_dropout=in_drop)
  return models.mnist.hinton_mlp(args.width, dropout=args.dropout or 0.0,
                                 input_dropout=args.input_dropout or 0.0)


def _max_norm_mask(output_too: bool):
  def mask(tree):
    def per_model(params):
      dense = sorted(k for k in params if k.startswith("Dense_"))
      last = dense[-1] if dense else None
      return {k: jax.tree_util.tree_map(
          lambda p, k=k: jnp.ndim(p) >= 2 and (output_too or k != last), v)
              for k, v in params.items()}
    return {"student": per_model(tree["student"]),
            "distiller": jax.tree_util.tree_map(lambda _: False,
                                                tree["distiller"])}
  return mask


def build_optimizer(args, steps_per_epoch: int):
  teacher = args.phase == "teacher"
  e = args.epochs
  if args.opt == "adam":
    lr = args.lr or 1e-3
    sched = optax.cosine_decay_schedule(lr, e * steps_per_epoch)
    tx = optax.adam(sched)
  elif args.opt == "sgd":
    lr = args.lr or 0.1
    sched = optax.cosine_decay_schedule(lr, e * steps_per_epoch)
    tx = optax.sgd(sched, momentum=0.9)
  else:
    lr = args.lr or (10.0 if teacher else 1.0)
    decay = args.lr_final_frac ** (1.0 / max(e - 1, 1))
    lr_fn, mom_fn = transforms.hinton2012_schedules(
        steps_per_epoch, lr0=lr, decay=decay, p_initial=args.p_i,
        p_final=args.p_f, ramp_epochs=max(args.ramp_frac * e, 1e-9))
    tx = transforms.hinton_sgd(lr_fn, mom_fn)
  radius = args.max_norm if args.max_norm is not None else (
      15.0 ** 0.5 if teacher else None)
  if radius:
    tx = optax.chain(tx, transforms.max_norm(
        radius, mask=_max_norm_mask(args.max_norm_output)))
  return tx


# ---------------------------------------------------------------------------
# Compiled epoch and evaluation.


def make_epoch_fn(step, *, distill: bool, jitter: int):
  """`(state, tv, images, labels, tlogits, aug_rng, perm[S, B]) -> state,
  metrics`: gathers each batch from the device-resident arrays, jitters it
  with per-example keys and runs the engine's step, all in one `scan`."""

  def one(state, tv, images, labels, tlogits, aug_rng, idx):
    batch = {"image": images[idx], "label": labels[idx], "index": idx}
    batch = data_lib.augment_batch(aug_rng, batch, mean=(0.0,), std=(1.0,),
                                   jitter=jitter or None)
    if distill:
      batch["teacher_logits"] = tlogits[idx]
      return step(state, None, batch)
    return step(state, batch)

  return jax.jit(train.make_multi_step(one), donate_argnums=(0,))


def logits_of(module, params, images, batch=2000):
  fwd = jax.jit(lambda p, x: module.apply({"params": p}, x / 255.0)[0])
  out = [np.asarray(fwd(params, jnp.asarray(images[i:i + batch], jnp.float32)))
         for i in range(0, len(images), batch)]
  return np.concatenate(out)


def per_class_errors(logits, labels):
  wrong = np.argmax(logits, -1) != labels
  return [int(wrong[labels == c].sum()) for c in range(NUM_CLASSES)]


# ---------------------------------------------------------------------------
# One phase.


def _transfer(args, tr_x, tr_y, tlogits):
  """Transfer-set arrays (and the held-out validation indices)."""
  idx = np.arange(len(tr_y))
  val = None
  if args.val_size:
    idx, val = data_lib.split_validation(tr_y, args.val_size, seed=args.seed)
  if args.omit or args.keep:
    sub = data_lib.class_subset(tr_y[idx], omit=args.omit or None,
                                keep=args.keep or None,
                                num_classes=NUM_CLASSES)
    idx = idx[sub]
  return (tr_x[idx], tr_y[idx], None if tlogits is None else tlogits[idx],
          val)


def train_phase(args, module, tx, x, y, tl, test, *, jitter) -> Dict:
  distill = args.phase == "distill"
  n = len(y)
  spe = n // args.batch
  key = jax.random.key(args.seed)
  variables = module.init(key, jnp.zeros((1, 28, 28, 1)))
  state = train.create_train_state(variables, tx,
                                   rng=jax.random.fold_in(key, 1))
  if distill:
    obj = train.Objective(ce_weight=args.hard_weight, terms=(
        train.Term("kd", args.soft_weight, temperature=args.T),))
    step = train.make_distill_step(module, None, obj, tx)
  else:
    step = train.make_train_step(module, tx)
  epoch_fn = make_epoch_fn(step, distill=distill, jitter=jitter)
  dx, dy = jnp.asarray(x), jnp.asarray(y)
  dtl = jnp.asarray(tl) if distill else jnp.zeros((1, NUM_CLASSES))
  aug_root = jax.random.fold_in(key, data_lib.AUG_TAG)
  times, history = [], []
  for epoch in range(args.epochs):
    perm = data_lib.epoch_permutation(args.seed, epoch, n)[:spe * args.batch]
    perm = jnp.asarray(perm.reshape(spe, args.batch), jnp.int32)
    t0 = time.time()
    state, m = epoch_fn(state, None, dx, dy, dtl,
                        jax.random.fold_in(aug_root, epoch), perm)
    loss = float(jnp.mean(m["loss"]))
    times.append(time.time() - t0)
    if args.eval_every and ((epoch + 1) % args.eval_every == 0):
      errs = int((np.argmax(logits_of(module, state.params, test[0]), -1)
                  != test[1]).sum())
      history.append({"epoch": epoch + 1, "test_errors": errs, "loss": loss})
      print(f"epoch {epoch + 1}: loss {loss:.4f} test errors {errs} "
            f"({times[-1]:.1f}s)", flush=True)
  return {"state": state, "epoch_times": times, "history": history,
          "train_examples": n, "final_loss": loss}


def evaluate(args, module, params, test, val_data) -> Dict:
  te_logits = logits_of(module, params, test[0])
  out = {"test_errors": int((np.argmax(te_logits, -1) != test[1]).sum()),
         "test_errors_per_class": per_class_errors(te_logits, test[1])}
  shifted = args.omit or args.keep
  if args.phase == "distill" and shifted:
    classes = list(args.omit or args.keep)
    d_test, e_test = bias_shift.choose_bias_shift(te_logits, test[1], classes,
                                                  SHIFT_GRID)
    out["shift_on_test"] = {"delta": d_test, "test_errors": e_test,
                            "per_class": per_class_errors(
                                np.asarray(bias_shift.shift_logits(
                                    te_logits, classes, d_test)), test[1])}
    if val_data is not None:
      v_logits = logits_of(module, params, val_data[0])
      d_val, e_val = bias_shift.choose_bias_shift(v_logits, val_data[1],
                                                  classes, SHIFT_GRID)
      shifted_te = np.asarray(bias_shift.shift_logits(te_logits, classes,
                                                      d_val))
      out["shift_on_val"] = {
          "delta": d_val, "val_errors": e_val,
          "test_errors": int((np.argmax(shifted_te, -1) != test[1]).sum()),
          "per_class": per_class_errors(shifted_te, test[1])}
  return out, te_logits


def save_teacher(workdir, module, params, tr_x, te_logits):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "teacher_params.msgpack"), "wb") as f:
    f.write(flax.serialization.to_bytes(params))
  np.savez(os.path.join(workdir, "teacher_logits.npz"),
           train=logits_of(module, params, tr_x), test=te_logits)


def run(args) -> Dict:
  (tr_x, tr_y), test = load_mnist()
  module = build_model(args)
  tlogits = None
  if args.phase == "distill":
    tdir = args.teacher_dir or args.workdir
    with np.load(os.path.join(tdir, "teacher_logits.npz")) as f:
      tlogits = f["train"]
  x, y, tl, val = _transfer(args, tr_x, tr_y, tlogits)
  val_data = None if val is None else (tr_x[val], tr_y[val])
  tx = build_optimizer(args, len(y) // args.batch)
  jitter = (2 if args.jitter is None else args.jitter) if (
      args.phase == "teacher") else (args.jitter or 0)
  load0, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.time()
  res = train_phase(args, module, tx, x, y, tl, test, jitter=jitter)
  ev, te_logits = evaluate(args, module, res["state"].params, test, val_data)
  if args.phase == "teacher":
    save_teacher(args.workdir, module, res["state"].params, tr_x, te_logits)
  ep = res["epoch_times"]
  return {"args": vars(args), "command": " ".join(sys.argv), **ev,
          "train_examples": res["train_examples"],
          "final_train_loss": res["final_loss"], "history": res["history"],
          "wall_s": time.time() - wall0, "cpu_s": time.process_time() - cpu0,
          "epoch_s_first": ep[0], "epoch_s_median": float(np.median(ep[1:]))
          if len(ep) > 1 else ep[0],
          "load_start": load0, "load_end": os.getloadavg()[0],
          "jax": jax.__version__}


PAPER_SWEEP_NOTE = (
    "Paper (Hinton et al. 2015, Sec. 3): with >= 300 units per layer all "
    "T > 8 gave fairly similar results; with 30 units per layer T in "
    "[2.5, 4] worked significantly better than higher or lower T.")


def plot_sweep(args, log):
  from kd_jax import metrics_io  # pylint: disable=g-import-not-at-top
  prefixes = tuple(t for t in args.tag.split(",") if t)
  res = {}
  with open(log) as f:
    for line in f:
      r = json.loads(line)
      a = r["args"]
      if a["phase"] != "distill" or not a["tag"].startswith(prefixes) or (
          a.get("omit") or a.get("keep")):
        continue
      res.setdefault(f"{a['width']} units, {a['epochs']} epochs", {}
                     ).setdefault(float(a["T"]), []).append(r["test_errors"])
  os.makedirs(args.workdir, exist_ok=True)
  path = metrics_io.plot_sweep(
      res, os.path.join(args.workdir, "temperature_sweep.png"),
      xlabel="distillation temperature T", ylabel="test errors (of 10,000)",
      title="MNIST 784-W-W-10 distilled students", note=PAPER_SWEEP_NOTE,
      logx=True)
  print(json.dumps({"plot": path, "points": {k: {str(t): v for t, v in
                                                 sorted(d.items())}
                                             for k, d in res.items()}}))


def main(argv=None):
  args = parse_args(argv)
  log = args.log or os.path.join(args.workdir, "probes.jsonl")
  if args.phase == "plot_sweep":
    plot_sweep(args, log)
    return
  rec = run(args)
  os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
  with open(log, "a") as f:
    f.write(json.dumps(rec) + "\n")
  short = {k: rec[k] for k in ("test_errors", "test_errors_per_class",
                               "wall_s", "epoch_s_median", "load_start",
                               "load_end") if k in rec}
  for k in ("shift_on_test", "shift_on_val"):
    if k in rec:
      short[k] = rec[k]
  print(json.dumps(short))


if __name__ == "__main__":
  main()
