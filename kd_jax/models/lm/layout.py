"""Parameter layouts of `Transformer`: one subtree per block, or stacked.

``Transformer(scan_layers=False)`` keeps block ``i`` under ``layers_{i}``
(``params/layers_3/mlp/up_proj/kernel`` ``[D, F]``, the layout of the
Hugging Face import); ``scan_layers=True`` stacks all blocks along a
leading axis under ``layers`` (``params/layers/mlp/up_proj/kernel``
``[L, D, F]``). The values are the same, so a checkpoint of either layout
runs the other model after `stack_layers` / `unstack_layers`.

>>> import numpy as np
>>> p = {"layers_0": {"w": np.zeros(2)}, "layers_1": {"w": np.ones(2)},
...      "norm": {"scale": np.ones(2)}}
>>> s = stack_layers(p, 2)
>>> s["layers"]["w"].shape, sorted(s)
((2, 2), ['layers', 'norm'])
>>> bool((unstack_layers(s, 2)["layers_1"]["w"] == 1).all())
True
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

PyTree = Any


def _params(tree: Mapping[str, Any]):
  """(the params dict, a function putting a new one back in place)."""
  if "params" in tree:
    return tree["params"], lambda p: dict(tree, params=p)
  return tree, lambda p: p


def stack_layers(tree: Mapping[str, Any], num_layers: int) -> dict:
  """``layers_0 .. layers_{L-1}`` -> one ``layers`` subtree stacked on axis 0.

  `tree` is a params dict or a variables dict with ``"params"`` (plain
  arrays, not `nn.LogicallyPartitioned` boxes: ``nn.unbox`` first).
  """
  params, put_back = _params(tree)
  names = [f"layers_{i}" for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  extra = sorted(k for k in params if k.startswith("layers_")
                 and k not in names)
  if missing or extra or "layers" in params:
    raise ValueError(f"stack_layers: expected blocks layers_0..layers_"
                     f"{num_layers - 1} and no 'layers' subtree; missing "
                     f"{missing}, unexpected {extra}"
                     f"{', found layers' if 'layers' in params else ''}")
  blocks = [params[n] for n in names]
  if any(jax.tree.structure(b) != jax.tree.structure(blocks[0])
         for b in blocks):
    raise ValueError("stack_layers: the blocks do not all have the same "
                     "parameters")
  out = {k: v for k, v in params.items() if k not in names}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return put_back(out)


def unstack_layers(tree: Mapping[str, Any], num_layers: int) -> dict:
  """The inverse of `stack_layers`: ``layers`` ``[L, ...]`` -> ``layers_i``."""
  params, put_back = _params(tree)
  if "layers" not in params:
    raise ValueError("unstack_layers: no stacked 'layers' subtree (is the "
                     "tree already unstacked?)")
  stacked = params["layers"]
  lengths = {int(x.shape[0]) for x in jax.tree.leaves(stacked)}
  if lengths != {num_layers}:
    raise ValueError(f"unstack_layers: stacked leading axes {sorted(lengths)}"
                     f" != num_layers {num_layers}")
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return put_back(out)
