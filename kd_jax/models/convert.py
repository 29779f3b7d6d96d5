"""Import PyTorch checkpoints of the reference definitions into Flax variables.

The CRD / DKD code bases (HobbitLong/RepDistiller, megvii-research/mdistiller)
release CIFAR-100 teachers as `<arch>_vanilla/ckpt_epoch_240.pth`, a dict whose
`model` entry is the `state_dict` of the reference PyTorch definition; the
ImageNet teachers are torchvision's. `from_torch_state_dict` maps such a
`state_dict` (torch tensors or NumPy arrays; torch is *not* needed for NumPy)
to Flax `{'params': ..., 'batch_stats': ...}` (float32):

* conv `weight` `[O, I/groups, kH, kW]` (OIHW) -> `kernel` `[kH, kW, I/groups, O]`
  (HWIO);
* linear `weight` `[out, in]` -> `kernel` `[in, out]`;
* BatchNorm `weight`/`bias`/`running_mean`/`running_var` -> `scale`/`bias`
  (params) and `mean`/`var` (batch_stats); `num_batches_tracked` is ignored.

Missing, unexpected or mis-shaped keys raise one `ValueError` listing all of
them. A `{'model': state_dict}` (or `{'state_dict': ...}`) wrapper and a
`module.` (DataParallel) prefix are unwrapped.

CLI::

  python -m kd_jax.models.convert --arch resnet56 --input ckpt.pth \\
      --output /abs/path/resnet56_orbax [--num-classes 100]

(`--input` may also be an `.npz` of NumPy arrays keyed like the state_dict;
`--num-classes` defaults to the classifier size found in the checkpoint.)

Hook for model families (how a family makes its models convertible)
--------------------------------------------------------------------
Register the model with a key map::

  registry.register(name, constructor, input_shape=(32, 32, 3),
                    torch_key_map=my_family.torch_key_map)

A key map is a function `shapes -> list[KeyMapEntry]`, where `shapes` is the
model's variable tree (`{'params': ..., 'batch_stats': ...}` of
`jax.ShapeDtypeStruct`, from `jax.eval_shape(model.init, ...)`) and each
`KeyMapEntry(flax_path, torch_keys, transform)` says how ONE Flax leaf is
computed: `transform(*[state_dict[k] for k in torch_keys])` (NumPy in, NumPy
out). Every Flax leaf needs exactly one entry; a torch key may feed several
leaves (e.g. a fused qkv weight split into query/key/value).

Most families need no code of their own: name the Flax submodules like the
torch modules with '.' replaced by '_' (`layer1.0.conv1` -> `layer1_0/conv1`)
and use `standard_key_map` (conv/linear kernels by rank, BatchNorm and
LayerNorm `scale`->`weight`, `mean`/`var` -> `running_mean`/`running_var`).
For anything else pass `module_to_torch=` (Flax module path -> torch prefix)
and/or patch individual entries, e.g.::

  def torch_key_map(shapes):
    entries = standard_key_map(shapes, module_to_torch=my_renamer)
    return replace_entries(entries, [KeyMapEntry(
        ('params', 'cls_token'), ('cls_token',), lambda t: t.reshape(1, 1, -1))])
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import registry

_IGNORED_SUFFIXES = ("num_batches_tracked",)


class KeyMapEntry(NamedTuple):
  """How one Flax leaf is computed from PyTorch state_dict entries.

  Attributes:
    flax_path: `(collection, module, ..., leaf)`, e.g.
      `('params', 'layer1_0', 'conv1', 'kernel')`.
    torch_keys: the state_dict keys the leaf is built from (usually one).
    transform: `transform(*arrays) -> np.ndarray` in the Flax layout.
  """
  flax_path: Tuple[str, ...]
  torch_keys: Tuple[str, ...]
  transform: Callable[..., np.ndarray]


def identity(w):
  """Same layout in both frameworks (biases, BN vectors)."""
  return w


def conv_kernel(w):
  """OIHW (torch `Conv2d.weight`) -> HWIO (Flax `Conv.kernel`)."""
  if np.ndim(w) != 4:
    raise ValueError(f"expected a 4-D OIHW conv weight, got rank {np.ndim(w)}")
  return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w):
  """`[out, in]` (torch `Linear.weight`) -> `[in, out]` (Flax `Dense.kernel`)."""
  if np.ndim(w) != 2:
    raise ValueError(f"expected a 2-D linear weight, got rank {np.ndim(w)}")
  return np.transpose(w)


def dots_for_underscores(module_path: Sequence[str]) -> str:
  """Flax module path -> torch prefix: `('layer1_0', 'conv1')` -> `layer1.0.conv1`."""
  return ".".join(name.replace("_", ".") for name in module_path)


def _leaves_with_paths(tree) -> List[Tuple[Tuple[str, ...], Any]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(str(k.key) for k in path), leaf) for path, leaf in flat]


def standard_key_map(
    shapes, *,
    module_to_torch: Callable[[Sequence[str]], str] = dots_for_underscores,
) -> List[KeyMapEntry]:
  """Key map for models built from Conv / Dense / BatchNorm / LayerNorm.

  For a Flax leaf `(collection, *module_path, leaf)` the torch key is
  `module_to_torch(module_path) + '.' + torch_leaf` with

  ========================  =================  =====================
  Flax leaf                 torch leaf         transform
  ========================  =================  =====================
  params `kernel` (rank 4)  `weight`           OIHW -> HWIO
  params `kernel` (rank 2)  `weight`           transpose
  params `scale`            `weight`           identity
  params `bias`             `bias`             identity
  batch_stats `mean`        `running_mean`     identity
  batch_stats `var`         `running_var`      identity
  ========================  =================  =====================

  Args:
    shapes: the model's variable tree (arrays or `jax.ShapeDtypeStruct`).
    module_to_torch: maps the Flax module path to the torch module prefix.

  Returns:
    One `KeyMapEntry` per leaf.
  """
  entries = []
  for path, leaf in _leaves_with_paths(shapes):
    collection, module_path, name = path[0], path[1:-1], path[-1]
    prefix = module_to_torch(module_path)
    rank = len(leaf.shape)
    if collection == "params" and name == "kernel" and rank == 4:
      torch_leaf, fn = "weight", conv_kernel
    elif collection == "params" and name == "kernel" and rank == 2:
      torch_leaf, fn = "weight", dense_kernel
    elif collection == "params" and name == "scale":
      torch_leaf, fn = "weight", identity
    elif collection == "params" and name == "bias":
      torch_leaf, fn = "bias", identity
    elif collection == "batch_stats" and name == "mean":
      torch_leaf, fn = "running_mean", identity
    elif collection == "batch_stats" and name == "var":
      torch_leaf, fn = "running_var", identity
    else:
      raise ValueError(
          f"standard_key_map does not know how to map Flax leaf "
          f"{'/'.join(path)} (shape {tuple(leaf.shape)}); give the family a "
          f"custom key map")
    key = f"{prefix}.{torch_leaf}" if prefix else torch_leaf
    entries.append(KeyMapEntry(path, (key,), fn))
  return entries


def replace_entries(entries: Iterable[KeyMapEntry],
                    new: Iterable[KeyMapEntry]) -> List[KeyMapEntry]:
  """`entries` with those of the same `flax_path` as one in `new` replaced."""
  new = list(new)
  paths = {e.flax_path for e in new}
  return [e for e in entries if e.flax_path not in paths] + new


# ----------------------------------------------------------------------------
# state_dict normalisation
# ----------------------------------------------------------------------------


def _to_numpy(value, key: str) -> np.ndarray:
  """torch.Tensor (duck-typed, torch not imported) or array-like -> NumPy."""
  if hasattr(value, "detach") and hasattr(value, "cpu"):
    value = value.detach().cpu()
    if getattr(value, "is_floating_point", lambda: False)():
      value = value.float()  # bf16 / fp16 tensors have no NumPy equivalent
    value = value.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic value types
    raise TypeError(f"state_dict[{key!r}] is not array-like: "
                    f"{type(value).__name__}") from e


def unwrap_state_dict(obj) -> Dict[str, Any]:
  """Unwraps `{'model': sd}` / `{'state_dict': sd}` and a `module.` prefix."""
  if not isinstance(obj, Mapping):
    raise TypeError(
        f"`state_dict` must be a mapping of parameter names to arrays; got "
        f"{type(obj).__name__}")
  for wrapper in ("model", "state_dict"):
    if wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  keys = list(obj)
  if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return dict(obj)


def _variable_shapes(name: str, num_classes: int):
  model = registry.create(name, num_classes=num_classes)
  x = registry.example_input(name)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, train=False))


def _key_map(name: str):
  spec = registry.get_spec(name)
  if spec.torch_key_map is None:
    convertible = [n for n in registry.available_models()
                   if registry.get_spec(n).torch_key_map is not None]
    raise ValueError(
        f"model {name!r} has no PyTorch key map; convertible models: "
        f"{', '.join(convertible)}")
  return spec.torch_key_map


def _set_path(tree: dict, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _fmt_list(title: str, items: List[str], limit: int = 40) -> str:
  shown = items[:limit]
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], *,
                          num_classes: int) -> Dict[str, Any]:
  """Maps a PyTorch `state_dict` of the reference definition to Flax variables.

  Args:
    name: a `kd_jax.models` name (e.g. `'resnet56'`, `'wrn_40_2'`, `'resnet50'`).
    state_dict: `{key: torch.Tensor | np.ndarray}` as saved by the reference
      code (optionally wrapped as `{'model': state_dict}`, keys optionally
      prefixed `module.`).
    num_classes: size of the classifier head of the checkpoint.

  Returns:
    `{'params': ..., 'batch_stats': ...}` of float32 `jax.Array`s, ready for
    `kd_jax.models.create(name, num_classes=num_classes).apply(...)`.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key.

  Example:
    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from kd_jax import models
    >>> sd = {'fc.weight': np.zeros((10, 128)), 'fc.bias': np.zeros(10)}
    >>> models.from_torch_state_dict('resnet8', sd, num_classes=10)
    Traceback (most recent call last):
    ...
    ValueError: cannot convert ... missing keys (...
  """
  key_map = _key_map(name)
  sd = unwrap_state_dict(state_dict)
  shapes = _variable_shapes(name, num_classes)
  entries = key_map(shapes)
  expected = dict(_leaves_with_paths(shapes))
  _check_key_map(name, entries, expected)
  variables, used, missing, misshaped = _convert_entries(entries, sd, expected)
  unexpected = sorted(k for k in sd if k not in used and
                      not k.endswith(_IGNORED_SUFFIXES))
  if missing or unexpected or misshaped:
    raise ValueError(_conversion_error(name, num_classes, missing, unexpected,
                                       misshaped))
  return jax.tree_util.tree_map(jnp.asarray, variables)


def _check_key_map(name, entries, expected) -> None:
  """Every Flax variable covered exactly once by the family's key map (a
  `RuntimeError` is a bug in the key map, not in the input)."""
  covered = [e.flax_path for e in entries]
  uncovered = sorted(set(expected) - set(covered))
  unknown = sorted(set(covered) - set(expected))
  if uncovered or unknown or len(covered) != len(set(covered)):
    raise RuntimeError(
        f"key map of {name!r} is inconsistent with its Flax variables: "
        f"uncovered={uncovered}, unknown={unknown}")


def _convert_entries(entries, sd, expected):
  """(variables, used torch keys, missing keys, mis-shaped descriptions)."""
  used = set()
  missing, misshaped = [], []
  variables: Dict[str, Any] = {}
  for entry in entries:
    absent = [k for k in entry.torch_keys if k not in sd]
    if absent:
      missing.extend(k for k in absent if k not in missing)
      continue
    used.update(entry.torch_keys)
    arrays = [_to_numpy(sd[k], k) for k in entry.torch_keys]
    want = tuple(expected[entry.flax_path].shape)
    src = ", ".join(f"{k} {tuple(a.shape)}" for k, a in
                    zip(entry.torch_keys, arrays))
    try:
      value = np.asarray(entry.transform(*arrays), dtype=np.float32)
    except Exception as e:  # wrong rank etc.
      misshaped.append(f"{src}: cannot map to {'/'.join(entry.flax_path)} "
                       f"{want}: {e}")
      continue
    if tuple(value.shape) != want:
      misshaped.append(f"{src} -> Flax {tuple(value.shape)}, but "
                       f"{'/'.join(entry.flax_path)} expects {want}")
      continue
    _set_path(variables, entry.flax_path, value)
  return variables, used, missing, misshaped


def _conversion_error(name, num_classes, missing, unexpected,
                      misshaped) -> str:
  parts = []
  if missing:
    parts.append(_fmt_list("missing keys", missing))
  if unexpected:
    parts.append(_fmt_list("unexpected keys", unexpected))
  if misshaped:
    parts.append(_fmt_list("mis-shaped keys", misshaped))
  hint = ""
  if misshaped:
    hint = (f"\n  (num_classes={num_classes}; a mis-shaped classifier "
            f"usually means a different num_classes)")
  return (f"cannot convert the state_dict to {name!r}:\n" + "\n".join(parts)
          + hint)


def infer_num_classes(name: str, state_dict: Mapping[str, Any]) -> int:
  """Reads the classifier size of `state_dict` for model `name`.

  The classifier is found as the leaves whose shape changes with
  `num_classes`; the value is read from the checkpoint's tensor for it.
  """
  key_map = _key_map(name)
  sd = unwrap_state_dict(state_dict)
  a, b = 3, 5
  sa, sb = _variable_shapes(name, a), _variable_shapes(name, b)
  shapes_b = dict(_leaves_with_paths(sb))
  for entry in key_map(sa):
    shape_a = tuple(_leaf_shape(entry.flax_path, sa))
    shape_b = tuple(shapes_b[entry.flax_path].shape)
    if shape_a != shape_b and entry.flax_path[-1] == "bias":
      key = entry.torch_keys[0]
      if key not in sd:
        raise ValueError(f"cannot infer num_classes: classifier key {key!r} "
                         f"is missing from the state_dict")
      return int(np.shape(_to_numpy(sd[key], key))[0])
  raise ValueError(f"cannot infer num_classes for {name!r}; pass it explicitly")


def _leaf_shape(path, tree):
  for k in path:
    tree = tree[k]
  return tree.shape


def load_torch_checkpoint(path: str, *, allow_pickle: bool = False):
  """Reads a `.pth` (needs torch) or `.npz` checkpoint into a dict.

  `.pth` files are loaded with `torch.load(weights_only=True)`; checkpoints
  holding arbitrary Python objects need `allow_pickle=True` (only for files
  you trust: unpickling can run code).
  """
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "reading a .pth checkpoint needs PyTorch (pip install torch, CPU "
        "build is enough); or export the state_dict to .npz with NumPy "
        "arrays") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except Exception as e:
    if allow_pickle:
      raise
    raise ValueError(
        f"torch.load({path!r}, weights_only=True) failed ({e}); if you trust "
        f"the file, retry with allow_pickle=True (CLI: --allow-pickle)") from e


def save_variables(variables, output: str) -> str:
  """Saves `{'params', 'batch_stats'}` as an Orbax checkpoint at `output`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  output = os.path.abspath(output)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(output, variables)
  return output


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m kd_jax.models.convert",
      description="Convert a PyTorch checkpoint of a reference KD model "
                  "(RepDistiller / mdistiller / torchvision) to an Orbax "
                  "checkpoint of Flax {'params', 'batch_stats'}.")
  parser.add_argument("--arch", required=True,
                      help="kd_jax model name, e.g. resnet56, wrn_40_2")
  parser.add_argument("--input", required=True, help=".pth or .npz file")
  parser.add_argument("--output", required=True,
                      help="Orbax checkpoint directory (must not exist)")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classifier size (default: read from checkpoint)")
  parser.add_argument("--allow-pickle", action="store_true",
                      help="torch.load with weights_only=False (trusted "
                           "files only)")
  args = parser.parse_args(argv)
  sd = unwrap_state_dict(
      load_torch_checkpoint(args.input, allow_pickle=args.allow_pickle))
  num_classes = args.num_classes or infer_num_classes(args.arch, sd)
  variables = from_torch_state_dict(args.arch, sd, num_classes=num_classes)
  out = save_variables(variables, args.output)
  n = sum(int(np.prod(v.shape)) for v in
          jax.tree_util.tree_leaves(variables["params"]))
  print(f"converted {args.arch} (num_classes={num_classes}, {n:,} params) "
        f"-> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
