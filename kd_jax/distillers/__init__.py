"""Feature / relation distillers: method = loss + trainable adapters / state.

One method, one module, named after the paper (`at.py`, `crd.py`, ...): the
module holds the distiller, its adapters (Flax Linen modules) and a
docstring naming its loss in `kd_jax.losses`, the paper and the authors'
repository. A module registers its distiller with `@register("<name>")`;
every module of this package is imported here, so adding a method is adding
a file.

Every distiller is a pure `init(rng, inputs) -> (params, state)` /
`__call__(params, state, inputs) -> (loss, new_state)` pair, plugged into the
engine as `kd_jax.train.Term(label, weight, distiller=obj)`; its params are
trained with the student by the same optax optimizer and saved with the
train state. See `base` for the protocol and `docs/distillers.md` for the
method table.

>>> from kd_jax import distillers
>>> distillers.create("at", p=2)
ATDistiller(feature_key='stages', layers='1:', teacher_layers='1:', p=2)
>>> "crd" in distillers.available()
True
"""

import importlib as _importlib
import pkgutil as _pkgutil
from typing import Any, Mapping, Optional, Tuple

from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import LayerwiseDistiller
from kd_jax.distillers.base import OneLayerDistiller
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import RunInfo
from kd_jax.distillers.base import init_distillers
from kd_jax.distillers.base import make_term_inputs
from kd_jax.distillers.base import parse_layers
from kd_jax.distillers.base import register
from kd_jax.distillers.base import registry
from kd_jax.distillers.base import run_pretrain_stage
from kd_jax.distillers.base import select_features

# Import every method module (each registers its distiller).
_METHOD_MODULES = tuple(sorted(
    m.name for m in _pkgutil.iter_modules(__path__)
    if not m.name.startswith("_") and m.name != "base"))
for _m in _METHOD_MODULES:
  _importlib.import_module(f"{__name__}.{_m}")

# Re-export the distiller classes (`kd_jax.distillers.ATDistiller`, ...).
_CLASSES = {cls.__name__: cls for cls in registry().values()}
globals().update(_CLASSES)

from kd_jax.distillers.crd import sample_negatives  # noqa: E402
from kd_jax.distillers.ofd import bn_before_relu  # noqa: E402


def available() -> Tuple[str, ...]:
  """Names accepted by `create` (the registered methods)."""
  return tuple(sorted(registry()))


def _lookup(name: str):
  reg = registry()
  if name not in reg:
    raise ValueError(f"unknown distiller {name!r}; valid names: "
                     f"{', '.join(available())}.")
  return reg[name]


def create(name: str, **kwargs) -> Distiller:
  """Builds the distiller registered as `name` with keyword arguments.

  Unknown names and unknown keyword arguments raise a ValueError listing the
  valid ones.
  """
  return _lookup(name).build(**kwargs)


def term_from_config(label: str, config: Mapping[str, Any], *,
                     num_data: Optional[int] = None,
                     dataset_labels: Any = None,
                     teacher_variables: Any = None,
                     placeholders: bool = False):
  """A distiller `kd_jax.train.Term` from a config entry (`loss.terms.<label>`).

  The entry names the method with `distiller` (not `name`, which stays the
  key of logit losses: `'ofa'` is both a logit loss and a distiller); `weight`
  and `warmup` are the term's, everything else goes to the method's
  `from_config` hook, e.g. `{'distiller': 'at', 'weight': 1000.0, 'p': 2}`.
  Run-time information the config cannot hold reaches the hooks as a
  `RunInfo` (CRD: `num_data`, `dataset_labels`; OFD `teacher_bn='auto'`:
  `teacher_variables`). `placeholders=True` builds the term without that
  information (dummy CRD size, OFD margins from data) -- to validate a config
  before the data and the teacher are loaded.

  >>> t = term_from_config("at", {"distiller": "at", "weight": 1000.0})
  >>> t.label, t.weight, type(t.distiller).__name__
  ('at', 1000.0, 'ATDistiller')
  """
  from kd_jax.train import objectives as _objectives  # pylint: disable=g-import-not-at-top
  cfg = dict(config)
  if "distiller" not in cfg:
    raise ValueError(
        f"loss.terms.{label}: a distiller term needs a 'distiller' key naming "
        f"the method (one of {', '.join(available())}).")
  name = cfg.pop("distiller")
  weight = float(cfg.pop("weight", 1.0))
  warmup = bool(cfg.pop("warmup", True))
  cfg = {k: tuple(v) if isinstance(v, list) else v  # ConfigDict lists
         for k, v in cfg.items()}
  info = RunInfo(num_data=num_data, dataset_labels=dataset_labels,
                 teacher_variables=teacher_variables,
                 placeholders=placeholders)
  try:
    d = _lookup(name).from_config(cfg, info)
  except ValueError as e:
    raise ValueError(f"loss.terms.{label}: {e}") from None
  return _objectives.Term(label, weight, label=label, warmup=warmup,
                          distiller=d)


def is_distiller_term(config: Mapping[str, Any]) -> bool:
  """Whether a `loss.terms.<label>` entry describes a distiller term."""
  return "distiller" in config


__all__ = [
    "Distiller", "LayerwiseDistiller", "OneLayerDistiller", "PretrainStage",
    "RunInfo", "available", "create", "register", "registry",
    "term_from_config", "is_distiller_term", "init_distillers",
    "make_term_inputs", "parse_layers", "run_pretrain_stage",
    "select_features", "sample_negatives", "bn_before_relu",
] + sorted(_CLASSES)
