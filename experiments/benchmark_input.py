"""Input-pipeline throughput: examples/s of each pipeline stage.

Rows:
* in-memory host pipelines (MNIST real when available, CIFAR real when TFDS
  has it, else synthetic CIFAR-shaped arrays -- the in-memory pipeline's cost
  does not depend on pixel values): single batches and `[n, B]` chunks;
* host NumPy crop+flip (reference for what on-device augmentation replaces);
* on-device augmentation + normalization (`pipeline.preprocess_fn()`, jitted,
  device-resident uint8 input, timed with `block_until_ready`);
* ImageNet-style grain pipeline on synthetic in-memory JPEGs (per-record
  decode + RandomResizedCrop), with 0 and `--imagenet_workers` workers.

Usage:
  python experiments/benchmark_input.py [--batch_size 128] [--steps 200]
      [--tfds_dir DIR] [--imagenet_workers 4] [--skip_imagenet]
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np


def _rate(fn, n_examples, repeats):
  fn()  # warm-up (jit compile, caches)
  t = time.perf_counter()
  for _ in range(repeats):
    fn()
  dt = time.perf_counter() - t
  return n_examples * repeats / dt


def _host_crop_flip(rng, images, pad=4):
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offs = rng.integers(0, 2 * pad + 1, (b, 2))
  flips = rng.random(b) < 0.5
  out = np.empty_like(images)
  for i in range(b):
    v = padded[i, offs[i, 0]:offs[i, 0] + h, offs[i, 1]:offs[i, 1] + w]
    out[i] = v[:, ::-1] if flips[i] else v
  return out


def _synthetic_jpegs(n, rng):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  recs = []
  for i in range(n):
    h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 7 + i) % 256, (yy * 5) % 256, (xx + yy) % 256],
                   -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    recs.append({"image": buf.getvalue(), "label": i % 1000})
  return recs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch_size", type=int, default=128)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--chunk", type=int, default=50)
  shared = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                        "shared", "data", "tfds")
  ap.add_argument("--tfds_dir", default=os.environ.get(
      "KD_JAX_TEST_TFDS_DIR", os.environ.get(
          "TFDS_DATA_DIR", shared if os.path.isdir(shared) else None)))
  ap.add_argument("--cache_dir", default=None)
  ap.add_argument("--imagenet_workers", type=int, default=4)
  ap.add_argument("--imagenet_batch", type=int, default=32)
  ap.add_argument("--imagenet_batches", type=int, default=24)
  ap.add_argument("--skip_imagenet", action="store_true")
  args = ap.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from kd_jax import data  # pylint: disable=g-import-not-at-top

  bs, rows = args.batch_size, []
  pipes = {}
  if args.tfds_dir and os.path.isdir(os.path.join(args.tfds_dir, "mnist")):
    pipes["mnist (real)"] = data.create_pipeline(
        "mnist", "train", global_batch_size=bs, train=True,
        data_dir=args.tfds_dir, cache_dir=args.cache_dir)
  for name in ("cifar100", "cifar10"):
    if args.tfds_dir and os.path.isdir(os.path.join(args.tfds_dir, name)):
      pipes[f"{name} (real)"] = data.create_pipeline(
          name, "train", global_batch_size=bs, train=True,
          data_dir=args.tfds_dir, cache_dir=args.cache_dir)
      break
  else:
    rng = np.random.default_rng(0)
    info = data.dataset_info("cifar100")
    pipes["cifar100 (synthetic 50k)"] = data.InMemoryPipeline(
        rng.integers(0, 256, (50000, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 100, (50000,)), global_batch_size=bs, seed=0,
        mean=info.mean, std=info.std, crop_padding=info.crop_padding,
        flip=info.flip)

  for label, p in pipes.items():
    it = p.iterator()
    rows.append((label, f"host batches [B={bs}]",
                 _rate(lambda: next(it), bs, args.steps)))
    it = p.iterator()
    n = args.chunk
    rows.append((label, f"host chunks [{n}, {bs}]",
                 _rate(lambda: it.next_chunk(n), n * bs,
                       max(1, args.steps // n))))

  cifar = [p for k, p in pipes.items() if k.startswith("cifar")][0]
  batch = next(cifar.iterator())
  hrng = np.random.default_rng(0)
  rows.append(("cifar", f"host NumPy crop+flip [B={bs}]",
               _rate(lambda: _host_crop_flip(hrng, batch["image"]), bs,
                     args.steps)))
  dev = jax.devices()[0]
  fn = jax.jit(cifar.preprocess_fn())
  key = jax.random.key(0)
  dbatch = jax.device_put(batch, dev)
  rows.append(("cifar", f"device crop+flip+norm [B={bs}] ({dev.platform})",
               _rate(lambda: fn(key, dbatch)["image"].block_until_ready(), bs,
                     args.steps)))
  chunk = jax.device_put(cifar.iterator().next_chunk(args.chunk), dev)
  rows.append(("cifar", f"device crop+flip+norm [{args.chunk}, {bs}] ({dev.platform})",
               _rate(lambda: fn(key, chunk)["image"].block_until_ready(),
                     args.chunk * bs, max(1, args.steps // args.chunk))))
  rows.append(("cifar", f"host->device put uint8 [B={bs}] ({dev.platform})",
               _rate(lambda: jax.block_until_ready(jax.device_put(batch, dev)),
                     bs, args.steps)))

  if not args.skip_imagenet:
    srng = np.random.default_rng(0)
    recs = _synthetic_jpegs(256, srng)
    ib = args.imagenet_batch
    for workers in sorted({0, args.imagenet_workers}):
      p = data.GrainImagePipeline(recs, global_batch_size=ib, train=True,
                                  num_workers=workers, num_threads=8)
      it = p.iterator()
      next(it)  # start-up (worker spawn) excluded
      n_batches = args.imagenet_batches  # >> buffered batches (2 / worker)
      t = time.perf_counter()
      for _ in range(n_batches):
        next(it)
      rate = n_batches * ib / (time.perf_counter() - t)
      it.close()
      rows.append(("imagenet (synthetic JPEG ~400x400)",
                   f"grain RRC-224 train, workers={workers}", rate))

  w = max(len(r[0]) for r in rows)
  w2 = max(len(r[1]) for r in rows)
  print(f"{'pipeline':<{w}}  {'stage':<{w2}}  {'examples/s':>12}")
  print("-" * (w + w2 + 16))
  for a, b, r in rows:
    print(f"{a:<{w}}  {b:<{w2}}  {r:>12,.0f}")
  print(f"\njax {jax.__version__}, device {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")


if __name__ == "__main__":
  main()
