"""Feature capture from any Flax Linen model, by module path.

The Flax counterpart of torchdistill's forward hooks: distill intermediate
features of models that only return logits, without editing them.

>>> import jax, jax.numpy as jnp, flax.linen as nn
>>> class Net(nn.Module):
...   @nn.compact
...   def __call__(self, x):
...     x = nn.relu(nn.Dense(8, name="layer1")(x))
...     return nn.Dense(3, name="head")(x)
>>> net = Net()
>>> variables = net.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
>>> forward = capture(net.apply, ["layer1"])
>>> logits, feats = forward(variables, jnp.ones((2, 4)))
>>> logits.shape, feats["layer1"].shape
((2, 3), (2, 8))

Paths are the module names joined by `/` as in the params tree
(`"layer3/BatchNorm_1"`); a value stored with `self.sow("intermediates",
name, v)` inside module `a/b` is addressed as `"a/b/name"`. The captured
value of a module is the return value of its `__call__` (e.g. the output of
a BatchNorm, i.e. *before* a ReLU applied by its parent). `list_paths` shows
what can be captured.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

__all__ = ["capture", "list_paths"]

_COLLECTION = "intermediates"


def _normalize_paths(paths) -> Tuple[str, ...]:
  if isinstance(paths, str):
    paths = [paths]
  if not isinstance(paths, (list, tuple)) or not paths:
    raise ValueError(
        "`paths` must be a non-empty list of module paths such as "
        f"['layer2', 'layer3/BatchNorm_1']; got {paths!r}.")
  out = []
  for p in paths:
    if not isinstance(p, str):
      raise TypeError(
          f"every entry of `paths` must be a string like 'layer3/BatchNorm_1'; "
          f"got {p!r} ({type(p).__name__}).")
    q = p.strip("/")
    if not q:
      raise ValueError(
          f"empty module path {p!r} in `paths` (the model output is returned "
          "anyway).")
    if q in out:
      raise ValueError(f"duplicate module path {q!r} in `paths`.")
    out.append(q)
  return tuple(out)


def _with_intermediates(mutable):
  """Adds the 'intermediates' collection to a Flax `mutable` argument."""
  if mutable is True:
    return True
  if mutable is False or mutable is None:
    return [_COLLECTION]
  if isinstance(mutable, str):
    return [mutable, _COLLECTION]
  if isinstance(mutable, (list, tuple)):
    return list(mutable) + ([] if _COLLECTION in mutable else [_COLLECTION])
  raise TypeError(
      "capture supports `mutable` given as a bool, a collection name or a list "
      f"of names; got {type(mutable).__name__}.")


def _unwrap(node):
  """A captured tuple of values -> the value (tuple if called several times)."""
  if isinstance(node, tuple):
    return node[0] if len(node) == 1 else node
  return node


def _lookup(tree, path, method):
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  if isinstance(node, dict):          # a module: its method's return value
    if method not in node:
      return None
    return _unwrap(node[method])
  return _unwrap(node)                # a sown value


def _all_paths(tree, method, prefix=""):
  out = []
  for key, node in tree.items():
    if key == method:
      if prefix:
        out.append(prefix)
      continue
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(node, dict):
      out.extend(_all_paths(node, method, path))
    else:
      out.append(path)                # sown value
  return out


def _split_state(state):
  state = dict(state)
  inter = state.pop(_COLLECTION, {})
  inter = _to_dict(inter)
  return inter, state


def _to_dict(tree):
  if hasattr(tree, "items") and not isinstance(tree, dict):
    tree = dict(tree.items())
  if isinstance(tree, dict):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def list_paths(apply_fn: Callable[..., Any], variables, *args,
               method_name: str = "__call__", **kwargs) -> list:
  """Every path `capture` accepts for this model and input, in call order.

  Runs `apply_fn` once with all intermediates captured (use it interactively
  or at trace time; under `jit` it costs only tracing).

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> net = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  >>> v = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  >>> list_paths(net.apply, v, jnp.ones((1, 3)))
  ['layers_0', 'layers_2']
  """
  if "capture_intermediates" in kwargs:
    raise ValueError("do not pass `capture_intermediates`; list_paths sets it.")
  mutable = _with_intermediates(kwargs.pop("mutable", False))
  _, state = apply_fn(
      variables, *args, mutable=mutable,
      capture_intermediates=lambda mdl, name: name == method_name, **kwargs)
  inter, _ = _split_state(state)
  return _all_paths(inter, method_name)


def capture(apply_fn: Callable[..., Any], paths: Sequence[str], *,
            method_name: str = "__call__") -> Callable[..., Any]:
  """Wraps a Flax `apply` so it also returns the features at `paths`.

  Built on Flax's `capture_intermediates` (only the requested modules are
  recorded) and on values stored with `Module.sow("intermediates", ...)`.

  Args:
    apply_fn: `model.apply` of a Flax Linen module, or any function with its
      signature that forwards `mutable` and `capture_intermediates`.
    paths: module paths, `/`-separated as in the params tree, e.g.
      `["layer2", "layer3/BatchNorm_1"]`, or paths of sown values.
    method_name: the module method whose return value is captured.

  Returns:
    `fn(variables, *args, **kwargs)` returning `(output, {path: array})`, where
    `output` is whatever `apply_fn` returns (the logits for a classifier).
    With a truthy `mutable=` (e.g. `["batch_stats"]` in training) it returns
    `((output, {path: array}), updated_state)`, like Flax, without the
    intermediates collection. A module called several times yields a tuple
    of its outputs. Gradients flow through the captured features. Works
    under `jit`, `pmap` and `grad`.

  Raises:
    KeyError: when a path does not exist; the message lists every available
      path (at trace time under `jit`).
  """
  wanted = _normalize_paths(paths)
  wanted_set = frozenset(wanted)

  def wants(mdl, name):
    return name == method_name and "/".join(mdl.path) in wanted_set

  def captured(variables, *args, **kwargs):
    if "capture_intermediates" in kwargs:
      raise ValueError(
          "do not pass `capture_intermediates` to a captured apply function; "
          "it selects the modules from `paths`.")
    user_mutable = kwargs.pop("mutable", False)
    out, state = apply_fn(variables, *args,
                          mutable=_with_intermediates(user_mutable),
                          capture_intermediates=wants, **kwargs)
    inter, state = _split_state(state)
    feats: Dict[str, Any] = {}
    missing = []
    for p in wanted:
      v = _lookup(inter, p, method_name)
      if v is None:
        missing.append(p)
      else:
        feats[p] = v
    if missing:
      available = list_paths(apply_fn, variables, *args, mutable=user_mutable,
                             method_name=method_name, **kwargs)
      raise KeyError(
          f"module path(s) {missing} not found in the model. Available paths: "
          f"{available}")
    if user_mutable:
      return (out, feats), state
    return out, feats

  return captured
