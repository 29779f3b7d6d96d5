"""`config.loss.terms` -> typed term specs -> the run's `Objective`.

`parse_terms(node)` turns the config entries into `TermSpec`s once: a logit
term's loss is resolved (`kd_jax.losses.LOGIT_LOSSES` / `TOPK_LOSSES`) and
its hyperparameters checked against the loss's signature; a distiller
term's method is looked up (`kd_jax.distillers`) and its arguments checked
against the method's constructor. `check_values(specs, logits_shape)`
traces every logit loss once on abstract inputs of the run's shape, so a
value the loss rejects (a temperature of 0, a beta of 2) is a one-line
`ConfigError` before any data is loaded. `build_objective(loss, run_info)`
is the one config -> `kd_jax.train.Objective` function: it builds each
term once, distillers with what only the run knows (`RunInfo`: CRD's
dataset, OFD's teacher).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from kd_jax import distillers as distillers_lib
from kd_jax.train import objectives as objectives_lib
from kd_jax.trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TermSpec:
  """One `loss.terms.<label>` entry, checked.

  kind: `'loss'` (a loss of `kd_jax.losses`, `name` its short name) or
    `'distiller'` (`name` the method of `kd_jax.distillers`).
  hparams: the loss's hyperparameters / the method's constructor arguments.
  """
  label: str
  kind: str
  name: str
  weight: float = 1.0
  warmup: bool = True
  hparams: Tuple[Tuple[str, Any], ...] = ()

  @property
  def kwargs(self) -> dict:
    return dict(self.hparams)

  def term(self) -> objectives_lib.Term:
    """The engine `Term` of a loss term (cheap, pure)."""
    return objectives_lib.Term(self.name, self.weight, label=self.label,
                               warmup=self.warmup, **self.kwargs)


def teacher_free(spec: TermSpec) -> bool:
  """Whether a term needs no teacher: a distiller whose method declares
  `needs_teacher = False` (self-distillation: BYOT, CS-KD, Tf-KD_reg)."""
  return spec.kind == "distiller" and not getattr(
      distillers_lib.registry()[spec.name], "needs_teacher", True)


def term_views(specs: Sequence[TermSpec]) -> Mapping[str, str]:
  """{input view: label of the first term declaring it} of the distiller
  terms (`Distiller.views`: `'strong'`, `'pair'`), from their classes."""
  out = {}
  for spec in specs:
    if spec.kind == "distiller":
      for v in getattr(distillers_lib.registry()[spec.name], "views", ()):
        out.setdefault(v, spec.label)
  return out


def _plain(v):
  if hasattr(v, "to_dict"):
    return v.to_dict()
  return tuple(v) if isinstance(v, list) else v


def _number(key: str, v, *, minimum: float = 0.0) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
      v >= minimum):
    raise ConfigError(key, f"must be a number >= {minimum:g}; got {v!r}.")
  return float(v)


def _parse_one(label: str, entry: Mapping[str, Any]) -> TermSpec:
  key = f"loss.terms.{label}"
  if hasattr(entry, "to_dict"):
    entry = entry.to_dict()
  if not isinstance(entry, Mapping):
    raise ConfigError(key, f"must be a mapping of the term's settings; got "
                      f"{entry!r}.")
  cfg = {k: _plain(v) for k, v in entry.items()}
  weight = _number(f"{key}.weight", cfg.pop("weight", 1.0))
  warmup = bool(cfg.pop("warmup", True))
  if distillers_lib.is_distiller_term(cfg):
    name = cfg.pop("distiller")
    try:
      cls = distillers_lib.registry()[name]
    except KeyError:
      raise ConfigError(f"{key}.distiller", f"unknown distiller {name!r}; "
                        f"valid: {', '.join(distillers_lib.available())}."
                        ) from None
    valid = sorted(set(distillers_lib.base.constructor_args(cls))
                   | set(getattr(cls, "config_args", ())))
    for k in cfg:
      if k not in valid:
        raise ConfigError(f"{key}.{k}", f"unknown argument of distiller "
                          f"{name!r}; valid: {', '.join(valid)}.")
    return TermSpec(label, "distiller", name, weight, warmup,
                    tuple(cfg.items()))
  name = cfg.pop("name", label)
  spec = TermSpec(label, "loss", name, weight, warmup, tuple(cfg.items()))
  try:
    spec.term()
  except (ValueError, TypeError) as e:
    raise ConfigError(key + (".name" if "unknown loss name" in str(e)
                             else ""), str(e)) from None
  return spec


def parse_terms(node) -> Tuple[TermSpec, ...]:
  """`loss.terms` (a mapping label -> entry) -> `TermSpec`s, in order."""
  if not node:
    return ()
  return tuple(_parse_one(label, node[label]) for label in node)


def check_values(specs: Sequence[TermSpec], logits_shape: Tuple[int, ...],
                 *, token_level: bool = False) -> None:
  """Traces every loss term on abstract inputs of `logits_shape` (`[B, K]`,
  or `[B, T, V]` with a `where` mask when `token_level`): a value the loss
  rejects raises a `ConfigError` naming the term."""
  s = jax.ShapeDtypeStruct(logits_shape, jnp.float32)
  labels = jax.ShapeDtypeStruct(logits_shape[:-1], jnp.int32)
  where = (jax.ShapeDtypeStruct(logits_shape[:-1], jnp.bool_)
           if token_level else None)
  for spec in specs:
    if spec.kind != "loss":
      continue
    t = spec.term()
    teacher = (objectives_lib.SparseTeacher(
        jax.ShapeDtypeStruct(logits_shape[:-1] + (2,), jnp.float32),
        jax.ShapeDtypeStruct(logits_shape[:-1] + (2,), jnp.int32))
               if t.sparse else s)
    denom = jnp.float32(1.0) if token_level else None
    try:
      jax.eval_shape(lambda a, b, y, w, t=t: t.value(a, b, y, None, w, denom),
                     s, teacher, labels, where)
    except (ValueError, TypeError) as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ConfigError(f"loss.terms.{spec.label}", msg) from None


def build_objective(loss, *, run_info: Optional[
    distillers_lib.RunInfo] = None) -> objectives_lib.Objective:
  """The run's `Objective` from its `LossConfig` (terms built once;
  distillers get `run_info`). Errors are `ConfigError`s naming the key.
  (`kd_jax.trainer.build_objective` also takes a `config.loss` mapping.)"""
  info = run_info or distillers_lib.RunInfo(placeholders=True)
  terms = []
  for spec in loss.terms:
    if spec.kind == "loss":
      terms.append(spec.term())
      continue
    key = f"loss.terms.{spec.label}"
    cfg = dict(spec.kwargs, distiller=spec.name, weight=spec.weight,
               warmup=spec.warmup)
    try:
      terms.append(distillers_lib.term_from_config(
          spec.label, cfg, num_data=info.num_data,
          dataset_labels=info.dataset_labels,
          teacher_variables=info.teacher_variables,
          placeholders=info.placeholders))
    except (ValueError, TypeError) as e:
      msg = str(e)
      raise ConfigError(key, msg[len(key) + 2:] if msg.startswith(key + ": ")
                        else msg) from None
  try:
    return objectives_lib.Objective(
        ce_weight=float(loss.ce_weight), terms=tuple(terms),
        warmup_epochs=float(loss.warmup_epochs or 0),
        label_smoothing=float(loss.label_smoothing or 0.0))
  except (ValueError, TypeError) as e:
    raise ConfigError("loss", str(e)) from None
