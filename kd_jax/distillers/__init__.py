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

from typing import Any, Dict, Tuple

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


__all__ = [
    "Distiller", "PretrainStage", "adapters", "available", "create",
    "init_distillers", "make_term_inputs", "parse_layers",
    "run_pretrain_stage", "select_features", "sample_negatives",
    "bn_before_relu", "FitNetDistiller", "ATDistiller", "NSTDistiller",
    "SPDistiller", "PKTDistiller", "RKDDistiller", "CCDistiller",
    "VIDDistiller", "ABDistiller", "FTDistiller", "FSPDistiller",
    "KDSVDDistiller", "OFDDistiller", "CRDDistiller", "ReviewKDDistiller",
    "OFADistiller",
]
