"""Subsets of an in-memory dataset: transfer sets without some classes, and a
validation split held out from the training set.

Hinton, Vinyals & Dean (2015, Section 3) distil on transfer sets that lack
classes: the MNIST training set without any 3s, or with only the 7s and 8s.
`transfer_set(images, labels, omit=(3,))` / `keep=(7, 8)` builds them;
`split_validation` holds out a labelled split of the training set (e.g. to
choose a post-hoc bias shift without looking at the test set).

All functions return index arrays into the given arrays (and the selected
arrays), so a subset keeps the identity of its examples: `index[i]` is the
position of example `i` in the full split.
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np


def _classes(arg, name, num_classes):
  if arg is None:
    return None
  vals = [int(c) for c in (arg if isinstance(arg, Iterable) else [arg])]
  bad = [c for c in vals
         if c < 0 or (num_classes is not None and c >= num_classes)]
  if bad:
    upper = "" if num_classes is None else f", < {num_classes}"
    raise ValueError(f"`{name}` must hold class ids >= 0{upper}; got "
                     f"{sorted(set(vals))}.")
  return tuple(sorted(set(vals)))


def class_subset(labels: np.ndarray, *, omit: Optional[Iterable[int]] = None,
                 keep: Optional[Iterable[int]] = None,
                 num_classes: Optional[int] = None) -> np.ndarray:
  """Indices (ascending, int64) of the examples whose label is kept.

  Exactly one of `omit` (drop these classes) and `keep` (only these
  classes) may be given; with neither, every index is returned.

  Example:
    >>> import numpy as np
    >>> class_subset(np.array([3, 1, 3, 7, 8]), omit=[3]).tolist()
    [1, 3, 4]
    >>> class_subset(np.array([3, 1, 3, 7, 8]), keep=(7, 8)).tolist()
    [3, 4]
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"`labels` must be a 1-D integer array; got "
                     f"{labels.dtype} of shape {labels.shape}.")
  omit = _classes(omit, "omit", num_classes)
  keep = _classes(keep, "keep", num_classes)
  if omit is not None and keep is not None:
    raise ValueError("give `omit` or `keep`, not both.")
  if keep is not None:
    sel = np.isin(labels, keep)
  elif omit is not None:
    sel = ~np.isin(labels, omit)
  else:
    sel = np.ones(labels.shape, bool)
  idx = np.flatnonzero(sel)
  if idx.size == 0:
    raise ValueError(f"the subset is empty (omit={omit}, keep={keep}; labels "
                     f"present: {sorted(np.unique(labels).tolist())}).")
  return idx


def transfer_set(images: np.ndarray, labels: np.ndarray, *,
                 omit: Optional[Iterable[int]] = None,
                 keep: Optional[Iterable[int]] = None,
                 num_classes: Optional[int] = None
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(images[idx], labels[idx], idx)` with `idx = class_subset(...)`.

  Example:
    >>> import numpy as np
    >>> x, y = np.arange(5)[:, None], np.array([3, 1, 3, 7, 8])
    >>> sx, sy, idx = transfer_set(x, y, omit=(3,))
    >>> sx[:, 0].tolist(), sy.tolist(), idx.tolist()
    ([1, 3, 4], [1, 7, 8], [1, 3, 4])
  """
  if len(images) != len(labels):
    raise ValueError(f"`images` and `labels` differ in length: {len(images)} "
                     f"vs {len(labels)}.")
  idx = class_subset(labels, omit=omit, keep=keep, num_classes=num_classes)
  return np.asarray(images)[idx], np.asarray(labels)[idx], idx


def split_validation(labels: np.ndarray, num_validation: int, *, seed: int,
                     stratified: bool = True
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """`(train_idx, val_idx)`: a random held-out split of a training set.

  `val_idx` has `num_validation` examples drawn without replacement
  (`np.random.default_rng(seed)`); with `stratified=True` each class gets
  its share `round(n_c * num_validation / N)` (largest remainders fill the
  rest), so every class -- including one omitted from a transfer set --
  is represented. Both index arrays are sorted and disjoint; their union
  is `range(N)`.

  Example:
    >>> import numpy as np
    >>> tr, va = split_validation(np.repeat(np.arange(3), 10), 6, seed=0)
    >>> len(tr), len(va), np.bincount(np.repeat(np.arange(3), 10)[va]).tolist()
    (24, 6, [2, 2, 2])
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if labels.ndim != 1:
    raise ValueError(f"`labels` must be 1-D; got shape {labels.shape}.")
  if isinstance(num_validation, bool) or not isinstance(
      num_validation, (int, np.integer)) or not 0 < num_validation < n:
    raise ValueError(f"`num_validation` must be an int in (0, {n}); got "
                     f"{num_validation!r}.")
  rng = np.random.default_rng(seed)
  if not stratified:
    val = rng.choice(n, size=int(num_validation), replace=False)
  else:
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * num_validation / n
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:int(num_validation) - take.sum()]] += 1
    val = np.concatenate([
        rng.choice(np.flatnonzero(labels == c), size=t, replace=False)
        for c, t in zip(classes, take)])
  val = np.sort(val)
  train = np.setdiff1d(np.arange(n), val)
  return train, val
