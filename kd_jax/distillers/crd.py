r"""CRD: contrastive representation distillation with a momentum memory bank.

.. math:: e^s = \mathrm{L2N}(W_s f^s + b_s), \quad
   e^t = \mathrm{L2N}(W_t f^t + b_t) \quad (\text{128-d})

and `kd_jax.losses.crd_loss` (NCE over one positive and `K` negatives drawn
from two memory banks `[N, 128]`, the student's and the teacher's), then the
momentum update of the rows of this batch (`crd_memory_update`, momentum
0.5). Both embeddings are trainable (RepDistiller `--distill crd -b 0.8`,
`nce_k=16384`, `nce_t=0.07`). The banks, the normalization constants
`Z_s, Z_t` (set on the first step, then fixed, as `ContrastMemory`) and the
sampling key are the distiller's *state*, so a checkpoint restores them and a
resumed run continues exactly.

Data: the batch must carry the dataset indices `batch['index']` (int `[B]`,
in `[0, N)`). Negatives come from `batch['contrast_idx']` (`[B, K+1]`,
column 0 the positive) when the pipeline provides them, otherwise the
distiller draws them in the step with `sample_negatives` from a key that
depends on the step and each example's index only -- so the draw (and the
whole step) is the same on 1 device, under `pmap` and under sharded `jit`.

Data parallelism: the loss is a per-example mean (`pmean`-ed under `pmap`);
the bank update all-gathers the embeddings and indices, so every device
holds the same banks (no averaging needed).

References:
  Tian, Krishnan & Isola, "Contrastive Representation Distillation",
  ICLR 2020. Authors' code: github.com/HobbitLong/RepDistiller (`crd/`,
  `distiller_zoo/`); loss math in `kd_jax.losses.crd_loss`,
  `crd_normalization`, `crd_memory_update`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerSpec
from kd_jax.distillers.base import apply_module
from kd_jax.distillers.base import init_module
from kd_jax.distillers.base import register
from kd_jax.models import layers as L
from kd_jax.losses import relations


class Embed(nn.Module):
  """Flatten + Linear (PyTorch init) [+ L2 normalization by the plain norm].

  CRD's `Embed` divides by `||x||_2` with no eps (RepDistiller `Normalize`);
  `normalize=False` is CC's `LinearEmbed`.
  """
  features: int = 128
  normalize: bool = True

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)
    d = x.shape[-1]
    x = nn.Dense(self.features, kernel_init=L.torch_default_init(d),
                 bias_init=L.torch_default_init(d), param_dtype=jnp.float32,
                 name="linear")(x)
    if self.normalize:
      x = x / jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x


def _other_class_with_replacement(keys, index, labels, k):
  """`[B, k]` uniform draws (with replacement) among the examples whose label
  differs from each example's: indices into the label-sorted order that
  skip the example's own class block."""
  num_data = labels.shape[0]
  order = jnp.argsort(labels, stable=True)
  sorted_labels = labels[order]
  own = labels[index]
  start = jnp.searchsorted(sorted_labels, own, side="left")
  stop = jnp.searchsorted(sorted_labels, own, side="right")
  count = num_data - (stop - start)

  def draw(key, s, c, n):
    u = jax.random.randint(key, (k,), 0, jnp.maximum(n, 1))
    return order[jnp.where(u < s, u, u + c)]

  return jax.vmap(draw)(keys, start, stop - start, count)


def _other_class_without_replacement(keys, index, labels, k):
  """`[B, k]` distinct examples of the other classes: the top-`k` of i.i.d.
  uniform priorities, the own class masked out."""
  num_data = labels.shape[0]

  def draw(key, y):
    pr = jax.random.uniform(key, (num_data,))
    pr = jnp.where(labels == y, -1.0, pr)
    return jax.lax.top_k(pr, k)[1]

  return jax.vmap(draw)(keys, labels[index])


def _other_example_with_replacement(keys, index, num_data, k):
  """`[B, k]` uniform draws (with replacement) among the other examples."""
  def draw(key, i):
    u = jax.random.randint(key, (k,), 0, num_data - 1)
    return jnp.where(u < i, u, u + 1)
  return jax.vmap(draw)(keys, index)


def _other_example_without_replacement(keys, index, num_data, k):
  """`[B, k]` distinct other examples (top-`k` of uniform priorities)."""
  def draw(key, i):
    pr = jax.random.uniform(key, (num_data,))
    pr = pr.at[i].set(-1.0)
    return jax.lax.top_k(pr, k)[1]
  return jax.vmap(draw)(keys, index)


def sample_negatives(rng, index, *, num_data: int, num_negatives: int,
                     dataset_labels=None, replace: bool = False):
  r"""CRD's contrast indices `[B, K+1]`: the positive, then `K` negatives.

  A pure function of `(rng, index)`: example `b`'s negatives are drawn with
  `fold_in(rng, index[b])`, so they do not depend on the rest of the batch
  or on how it is sharded.

  * `dataset_labels` (int `[N]`, the labels of the whole training set)
    given: negatives are drawn from the examples of the *other* classes,
    RepDistiller's `CIFAR100InstanceSample(mode='exact')`; without
    `replace`, `K` distinct ones (as its `np.random.choice(..., replace=
    False)`), via the top-`K` of i.i.d. uniform priorities, which is an exact
    uniform sample without replacement.
  * otherwise: uniform over the `N - 1` other examples.

  Args:
    rng: PRNG key.
    index: int `[B]`, the examples' dataset indices in `[0, N)`.
    num_data: `N`.
    num_negatives: `K`.
    dataset_labels: optional int `[N]` (NumPy or JAX).
    replace: sample with replacement (cheaper: `O(B K)` instead of
      `O(B N)`).

  Returns:
    int32 `[B, K+1]`, column 0 = `index`.

  >>> import jax, jax.numpy as jnp
  >>> c = sample_negatives(jax.random.PRNGKey(0), jnp.array([3, 7]),
  ...                      num_data=10, num_negatives=4,
  ...                      dataset_labels=jnp.arange(10) % 2)
  >>> c.shape, bool((c[:, 0] == jnp.array([3, 7])).all())
  ((2, 5), True)
  >>> bool(((jnp.arange(10) % 2)[c[:, 1:]] != jnp.array([[1], [1]])).all())
  True
  """
  index = jnp.asarray(index)
  if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(
        f"`index` must be an integer array [B]; got {index.dtype} "
        f"{tuple(index.shape)}.")
  if num_data < 2 or num_negatives < 1:
    raise ValueError(f"need num_data >= 2 and num_negatives >= 1; got "
                     f"{num_data}, {num_negatives}.")
  index = index.astype(jnp.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)
  if dataset_labels is not None:
    labels = jnp.asarray(dataset_labels, jnp.int32)
    if labels.shape != (num_data,):
      raise ValueError(f"`dataset_labels` must have shape ({num_data},); got "
                       f"{tuple(labels.shape)}.")
    draw = (_other_class_with_replacement if replace
            else _other_class_without_replacement)
    neg = draw(keys, index, labels, num_negatives)
  else:
    if not replace and num_negatives > num_data - 1:
      raise ValueError(f"cannot draw {num_negatives} distinct negatives from "
                       f"{num_data - 1} examples; use replace=True.")
    draw = (_other_example_with_replacement if replace
            else _other_example_without_replacement)
    neg = draw(keys, index, num_data, num_negatives)
  return jnp.concatenate([index[:, None], neg.astype(jnp.int32)], axis=1)


@register("crd")
class CRDDistiller(Distiller):
  """CRD (params: the two embeddings; state: banks, `Z`, sampling key).

  Args:
    num_data: `N`, the training-set size (bank rows).
    feat_dim: embedding size (128).
    num_negatives: `K` (RepDistiller `nce_k` 16384).
    temperature: `tau` (0.07, read back as float32 like the reference).
    momentum: bank momentum (0.5).
    dataset_labels: optional `[N]` labels for class-exclusive negatives
      (RepDistiller's sampling); without them negatives are uniform.
    replace: sample negatives with replacement (default: without, as the
      reference when `K` <= the number of candidates).
    feature_key / layer: the embedding input (`'pooled'` = `feat[-1]`).
    index_key / contrast_key: batch keys.
  """

  def __init__(self, *, num_data: int, feat_dim: int = 128,
               num_negatives: int = 16384,
               temperature: float = relations.CRD_TEMPERATURE,
               momentum: float = 0.5, dataset_labels: Any = None,
               replace: Optional[bool] = None,
               feature_key: str = "pooled", layer: LayerSpec = None,
               index_key: str = "index", contrast_key: str = "contrast_idx"):
    if not isinstance(num_data, int) or num_data < 2:
      raise ValueError(f"crd: `num_data` must be an int >= 2 (the training "
                       f"set size); got {num_data!r}.")
    self.num_data = num_data
    self.feat_dim = feat_dim
    self.num_negatives = num_negatives
    self.temperature = float(np.float32(temperature))
    self.momentum = momentum
    self.dataset_labels = (None if dataset_labels is None
                           else np.asarray(dataset_labels, np.int32))
    if self.dataset_labels is not None:
      if self.dataset_labels.shape != (num_data,):
        raise ValueError(
            f"crd: `dataset_labels` must have shape ({num_data},); got "
            f"{self.dataset_labels.shape}.")
      biggest = np.bincount(self.dataset_labels).max()
      candidates = num_data - int(biggest)
    else:
      candidates = num_data - 1
    if replace is None:
      replace = num_negatives > candidates
    elif not replace and num_negatives > candidates:
      raise ValueError(
          f"crd: cannot draw {num_negatives} distinct negatives from "
          f"{candidates} candidates; pass replace=True.")
    self.replace = bool(replace)
    self.feature_key = feature_key
    self.layer = layer
    self.index_key = index_key
    self.contrast_key = contrast_key

  config_args = ("class_negatives",)

  @classmethod
  def from_config(cls, cfg, run_info):
    """Injects `num_data` and (unless `class_negatives=False`) the dataset
    labels from `run_info`; with `run_info.placeholders` a dummy size and
    uniform negatives stand in (config validation before the data loads)."""
    cfg = dict(cfg)
    num_data, labels = run_info.num_data, run_info.dataset_labels
    if run_info.placeholders:
      num_data = 2 if num_data is None else num_data
      if labels is None:
        cfg["class_negatives"], cfg["num_negatives"] = False, 1
    class_negatives = bool(cfg.pop("class_negatives", True))
    if "num_data" not in cfg:
      if num_data is None:
        raise ValueError("CRD needs the training-set size (`num_data`).")
      cfg["num_data"] = int(num_data)
    if class_negatives and "dataset_labels" not in cfg:
      if labels is None:
        raise ValueError("CRD with class_negatives=True needs the training "
                         "labels (`dataset_labels`).")
      cfg["dataset_labels"] = labels
    return super().from_config(cfg, run_info)

  def __repr__(self):
    return (f"CRDDistiller(num_data={self.num_data}, feat_dim={self.feat_dim}, "
            f"num_negatives={self.num_negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}, "
            f"class_negatives={self.dataset_labels is not None}, "
            f"replace={self.replace})")

  def _pair(self, inputs):
    s = self._student(inputs, self.feature_key, self.layer)
    t = self._teacher(inputs, self.feature_key, self.layer)
    if len(s) != 1:
      raise ValueError(f"crd: select one feature; got {len(s)}.")
    return s[0], t[0]

  def _index(self, inputs):
    batch = inputs.batch
    if batch is None or self.index_key not in batch:
      raise KeyError(
          f"crd: the batch needs the dataset indices `batch[{self.index_key!r}]`"
          " (int [B] in [0, num_data)); build the pipeline with example "
          "indices" + ("" if batch is None else f"; batch keys: {sorted(batch)}")
          + ".")
    idx = jnp.asarray(batch[self.index_key])
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
      raise ValueError(f"crd: `batch[{self.index_key!r}]` must be int [B]; got "
                       f"{idx.dtype} {tuple(idx.shape)}.")
    return idx.astype(jnp.int32)

  def init(self, rng, inputs):
    s, t = self._pair(inputs)
    ks, kt, k1, k2, kn = jax.random.split(rng, 5)
    emb = Embed(self.feat_dim, normalize=True)
    ps, _ = init_module(emb, ks, s)
    pt, _ = init_module(emb, kt, t)
    stdv = 1.0 / math.sqrt(self.feat_dim / 3.0)
    shape = (self.num_data, self.feat_dim)
    state = {
        "memory_s": jax.random.uniform(k1, shape, jnp.float32, -stdv, stdv),
        "memory_t": jax.random.uniform(k2, shape, jnp.float32, -stdv, stdv),
        "z": jnp.full((2,), -1.0, jnp.float32),
        "key": jax.random.key_data(kn),
    }
    return {"embed_s": ps, "embed_t": pt}, state

  def contrast_indices(self, state, inputs, idx):
    """The batch's `[B, K+1]` contrast indices (pipeline's or sampled)."""
    batch = inputs.batch or {}
    if self.contrast_key in batch:
      c = jnp.asarray(batch[self.contrast_key]).astype(jnp.int32)
      if c.shape != (idx.shape[0], self.num_negatives + 1):
        raise ValueError(
            f"crd: `batch[{self.contrast_key!r}]` must have shape "
            f"[{idx.shape[0]}, {self.num_negatives + 1}]; got {tuple(c.shape)}.")
      return c
    key = jax.random.wrap_key_data(state["key"])
    step = inputs.step if inputs.step is not None else 0
    key = jax.random.fold_in(key, jnp.asarray(step, jnp.uint32))
    return sample_negatives(
        key, idx, num_data=self.num_data, num_negatives=self.num_negatives,
        dataset_labels=self.dataset_labels, replace=self.replace)

  def __call__(self, params, state, inputs):
    s, t = self._pair(inputs)
    idx = self._index(inputs)
    emb = Embed(self.feat_dim, normalize=True)
    es, _ = apply_module(emb, params["embed_s"], {}, s, train=inputs.train)
    et, _ = apply_module(emb, params["embed_t"], {}, t, train=inputs.train)
    cidx = jax.lax.stop_gradient(self.contrast_indices(state, inputs, idx))
    ms, mt = state["memory_s"], state["memory_t"]
    ax = inputs.axis_name

    def first_z(_):
      zs, zt = losses.crd_normalization(
          jax.lax.stop_gradient(es), jax.lax.stop_gradient(et), ms, mt, cidx,
          temperature=self.temperature, axis_name=ax)
      return jnp.stack([zs, zt])

    z = jax.lax.cond(state["z"][0] > 0, lambda _: state["z"], first_z, None)
    z = jax.lax.stop_gradient(z)
    loss = losses.crd_loss(es, et, ms, mt, cidx, z_student=z[0],
                           z_teacher=z[1], temperature=self.temperature,
                           axis_name=ax)
    new_state = dict(state)
    new_state["memory_s"] = losses.crd_memory_update(
        ms, es, idx, momentum=self.momentum, axis_name=ax)
    new_state["memory_t"] = losses.crd_memory_update(
        mt, et, idx, momentum=self.momentum, axis_name=ax)
    new_state["z"] = z
    return loss, new_state
