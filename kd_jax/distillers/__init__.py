"""Feature / relation distillers: method = loss + trainable adapters / state.

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

from typing import Any, Dict, Mapping, Optional, Tuple

from kd_jax.distillers import adapters
from kd_jax.distillers.base import Distiller
from kd_jax.distillers.base import PretrainStage
from kd_jax.distillers.base import init_distillers
from kd_jax.distillers.base import make_term_inputs
from kd_jax.distillers.base import parse_layers
from kd_jax.distillers.base import run_pretrain_stage
from kd_jax.distillers.base import select_features
from kd_jax.distillers.crd import CRDDistiller
from kd_jax.distillers.crd import sample_negatives
from kd_jax.distillers.hint import FitNetDistiller
from kd_jax.distillers.layerwise import ATDistiller
from kd_jax.distillers.layerwise import KDSVDDistiller
from kd_jax.distillers.layerwise import NSTDistiller
from kd_jax.distillers.ofa import OFADistiller
from kd_jax.distillers.ofd import OFDDistiller
from kd_jax.distillers.ofd import bn_before_relu
from kd_jax.distillers.relational import CCDistiller
from kd_jax.distillers.relational import PKTDistiller
from kd_jax.distillers.relational import RKDDistiller
from kd_jax.distillers.relational import SPDistiller
from kd_jax.distillers.reviewkd import ReviewKDDistiller
from kd_jax.distillers.staged import ABDistiller
from kd_jax.distillers.staged import FSPDistiller
from kd_jax.distillers.staged import FTDistiller
from kd_jax.distillers.vid import VIDDistiller

_REGISTRY: Dict[str, Any] = {
    "fitnet": FitNetDistiller,
    "at": ATDistiller,
    "nst": NSTDistiller,
    "sp": SPDistiller,
    "pkt": PKTDistiller,
    "rkd": RKDDistiller,
    "cc": CCDistiller,
    "vid": VIDDistiller,
    "ab": ABDistiller,
    "ft": FTDistiller,
    "fsp": FSPDistiller,
    "kdsvd": KDSVDDistiller,
    "ofd": OFDDistiller,
    "crd": CRDDistiller,
    "reviewkd": ReviewKDDistiller,
    "ofa": OFADistiller,
}


def available() -> Tuple[str, ...]:
  """Names accepted by `create`."""
  return tuple(sorted(_REGISTRY))


def create(name: str, **kwargs) -> Distiller:
  """Builds the distiller registered as `name` with keyword arguments.

  Unknown names and unknown keyword arguments raise a ValueError listing the
  valid ones.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown distiller {name!r}; valid names: "
                     f"{', '.join(available())}.")
  cls = _REGISTRY[name]
  try:
    return cls(**kwargs)
  except TypeError as e:
    import inspect
    valid = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "kwargs")]
    if cls.__init__ is not None and issubclass(cls, (ATDistiller,
                                                     NSTDistiller,
                                                     KDSVDDistiller)):
      valid += ["feature_key", "layers", "teacher_layers"]
    raise ValueError(f"distiller {name!r}: {e}; valid arguments: "
                     f"{', '.join(sorted(set(valid)))}.") from None


def term_from_config(label: str, config: Mapping[str, Any], *,
                     num_data: Optional[int] = None,
                     dataset_labels: Any = None,
                     teacher_variables: Any = None,
                     placeholders: bool = False):
  """A distiller `kd_jax.train.Term` from a config entry (`loss.terms.<label>`).

  The entry names the method with `distiller` (not `name`, which stays the
  key of logit losses: `'ofa'` is both a logit loss and a distiller); `weight`
  and `warmup` are the term's, everything else goes to the constructor, e.g.
  `{'distiller': 'at', 'weight': 1000.0, 'p': 2}`. Run-time information the
  config cannot hold is injected here:

  * CRD: `num_data` (training-set size, required) and, unless the entry says
    `class_negatives=False`, `dataset_labels` (RepDistiller's negatives from
    the other classes);
  * OFD with `teacher_bn='auto'`: the teacher's BN-before-ReLU parameters,
    `bn_before_relu(teacher_variables)`.

  `placeholders=True` builds the term without that information (dummy CRD
  size, OFD margins from data) -- to validate a config before the data and
  the teacher are loaded.

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
  if placeholders:
    num_data = num_data if num_data is not None else 2
    if name == "crd" and dataset_labels is None:
      cfg.pop("class_negatives", None)
      cfg["class_negatives"] = False
      cfg.pop("num_negatives", None)
      cfg["num_negatives"] = 1
    if name == "ofd" and teacher_variables is None and (
        cfg.get("teacher_bn") == "auto"):
      cfg.pop("teacher_bn")
  if name == "crd":
    class_negatives = bool(cfg.pop("class_negatives", True))
    if "num_data" not in cfg:
      if num_data is None:
        raise ValueError(f"loss.terms.{label}: CRD needs the training-set "
                         "size (`num_data`).")
      cfg["num_data"] = int(num_data)
    if class_negatives and "dataset_labels" not in cfg:
      if dataset_labels is None:
        raise ValueError(f"loss.terms.{label}: CRD with class_negatives=True "
                         "needs the training labels (`dataset_labels`).")
      cfg["dataset_labels"] = dataset_labels
  if name == "ofd" and cfg.get("teacher_bn") == "auto":
    if teacher_variables is None:
      raise ValueError(f"loss.terms.{label}: OFD with teacher_bn='auto' needs "
                       "the teacher variables.")
    cfg["teacher_bn"] = bn_before_relu(teacher_variables)
  for k, v in list(cfg.items()):  # ConfigDict tuples/lists -> tuples
    if isinstance(v, list):
      cfg[k] = tuple(v)
  try:
    d = create(name, **cfg)
  except ValueError as e:
    raise ValueError(f"loss.terms.{label}: {e}") from None
  return _objectives.Term(label, weight, label=label, warmup=warmup,
                          distiller=d)


def is_distiller_term(config: Mapping[str, Any]) -> bool:
  """Whether a `loss.terms.<label>` entry describes a distiller term."""
  return "distiller" in config


__all__ = [
    "Distiller", "PretrainStage", "adapters", "available", "create",
    "term_from_config", "is_distiller_term",
    "init_distillers", "make_term_inputs", "parse_layers",
    "run_pretrain_stage", "select_features", "sample_negatives",
    "bn_before_relu", "FitNetDistiller", "ATDistiller", "NSTDistiller",
    "SPDistiller", "PKTDistiller", "RKDDistiller", "CCDistiller",
    "VIDDistiller", "ABDistiller", "FTDistiller", "FSPDistiller",
    "KDSVDDistiller", "OFDDistiller", "CRDDistiller", "ReviewKDDistiller",
    "OFADistiller",
]
