"""Distillation losses: pure functions of arrays.

Response-based (`logits`), divergences, feature-based (`features`),
relation-based (`relations`), generalized distillation with privileged
information (`privileged`), the generator / input-synthesis losses of
data-free distillation (`datafree`: differentiated *through* the teacher)
and token-level losses for language models
(`tokens`: fused LM-head divergences in bounded memory, sparse top-k teachers). Every function validates shapes/dtypes at trace
time, computes in float32 and never differentiates through the teacher.

`LOGIT_LOSSES` and `FEATURE_LOSSES` are the explicit registries behind the
short names of `kd_jax.train.Term` (`Term('kd', ...)` is `kd_loss`):
logit losses are functions `(student_logits, teacher_logits, ...)`, feature
losses take two feature arrays (or lists of them). Add a loss with
`register_loss(name, fn, on=...)` (or an entry in the dict).
"""

from typing import Callable, Dict

from kd_jax.losses.divergences import forward_kl
from kd_jax.losses.divergences import js_divergence
from kd_jax.losses.divergences import reverse_kl
from kd_jax.losses.divergences import total_variation
from kd_jax.losses.datafree import adi_competition_loss
from kd_jax.losses.datafree import bn_statistics_loss
from kd_jax.losses.datafree import dafl_activation_loss
from kd_jax.losses.datafree import dafl_information_entropy_loss
from kd_jax.losses.datafree import dafl_one_hot_loss
from kd_jax.losses.datafree import image_l2_norm
from kd_jax.losses.datafree import image_total_variation
from kd_jax.losses.features import ab_loss
from kd_jax.losses.features import at_loss
from kd_jax.losses.features import attention_map
from kd_jax.losses.features import fitnet_loss
from kd_jax.losses.features import fsp_loss
from kd_jax.losses.features import ft_loss
from kd_jax.losses.features import hcl_loss
from kd_jax.losses.features import kdsvd_loss
from kd_jax.losses.features import nst_loss
from kd_jax.losses.features import ofd_loss
from kd_jax.losses.features import ofd_margin
from kd_jax.losses.features import vid_init_log_scale
from kd_jax.losses.features import vid_loss
from kd_jax.losses.logits import dist_loss
from kd_jax.losses.logits import dkd_loss
from kd_jax.losses.logits import kd_loss
from kd_jax.losses.logits import ofa_loss
from kd_jax.losses.logits import standardize_logits
from kd_jax.losses.privileged import generalized_distillation_loss
from kd_jax.losses.relations import cc_loss
from kd_jax.losses.relations import crd_loss
from kd_jax.losses.relations import crd_memory_update
from kd_jax.losses.relations import crd_normalization
from kd_jax.losses.relations import pkt_loss
from kd_jax.losses.relations import rkd_loss
from kd_jax.losses.relations import sp_loss
# Token-level losses for language models (fused LM heads, sparse teachers).
from kd_jax.losses.tokens import fused_head_divergence
from kd_jax.losses.tokens import fused_head_topk_kd
from kd_jax.losses.tokens import topk_kd_loss

LOGIT_LOSSES: Dict[str, Callable] = {
    "kd": kd_loss,
    "dkd": dkd_loss,
    "dist": dist_loss,
    "ofa": ofa_loss,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js_divergence": js_divergence,
    "total_variation": total_variation,
    "generalized_distillation": generalized_distillation_loss,
}
"""Short name -> loss of `(student_logits, teacher_logits, ...)`."""

FEATURE_LOSSES: Dict[str, Callable] = {
    "ab": ab_loss,
    "at": at_loss,
    "fitnet": fitnet_loss,
    "fsp": fsp_loss,
    "ft": ft_loss,
    "hcl": hcl_loss,
    "kdsvd": kdsvd_loss,
    "nst": nst_loss,
    "ofd": ofd_loss,
    "vid": vid_loss,
    "cc": cc_loss,
    "crd": crd_loss,
    "pkt": pkt_loss,
    "rkd": rkd_loss,
    "sp": sp_loss,
}
"""Short name -> loss of two feature arrays (or lists of them)."""

_KINDS = {"logits": LOGIT_LOSSES, "features": FEATURE_LOSSES}


def register_loss(name: str, fn: Callable, *, on: str = "logits") -> Callable:
  """Adds `fn` under `name` to the registry of `on` ('logits'/'features').

  Returns `fn`, so it also works as `register_loss('x', fn)` at definition.
  """
  if on not in _KINDS:
    raise ValueError(f"register_loss: `on` must be one of {sorted(_KINDS)}; "
                     f"got {on!r}.")
  if not callable(fn):
    raise TypeError(f"register_loss: {name!r} must map to a callable.")
  other = _KINDS[on].get(name)
  if other is not None and other is not fn:
    raise ValueError(f"loss name {name!r} is already registered ({on}).")
  _KINDS[on][name] = fn
  return fn
