"""Loss specification of a distillation run: weighted CE + KD terms + warm-up.

An `Objective` is a small, immutable description

.. math::
  \mathcal{L} = w_{ce}\,\mathrm{CE}(z^s, y)
      + \lambda(e) \sum_k w_k\, \mathcal{L}_k(z^s, z^t, y, f^s, f^t; \phi_k),
  \qquad \lambda(e) = \min(e / E_{warm}, 1)

where :math:`e` is the 1-based epoch and :math:`E_{warm}` is `warmup_epochs`
(:math:`\lambda = 1` when `warmup_epochs == 0`). This is the DKD recipe of
mdistiller (Zhao et al., CVPR 2022), whose trainer counts epochs from 1, so
epoch 1 of a 20-epoch warm-up gives a factor 0.05. Terms created with
`warmup=False` are not scaled.

Each KD term is either

* a loss of `kd_jax.losses` named by string: `'kd'` resolves to
  `kd_jax.losses.kd_loss` (the exact name `'kd_loss'` works as well). It is
  called as `fn(student_logits, teacher_logits, [labels=...], [axis_name=...],
  **hparams)` -- `labels`/`axis_name` are passed only when the function
  accepts them -- and a per-example result is averaged over the batch
  (the references' "batchmean"), or
* any callable with the same convention (`Term('mine', fn=my_loss)`), or
* a *distiller* (`Term('fitnet', distiller=obj)`), the hook for feature
  methods: an object with

  - `init(rng, inputs: TermInputs) -> (params, state)`
  - `__call__(params, state, inputs: TermInputs) -> (loss, new_state)`

  Its params live in `TrainState.distiller_params[label]` and are trained by
  the same optimizer as the student; its state (e.g. BatchNorm statistics of
  an adapter) in `TrainState.distiller_state[label]`. Under `pmap` the
  engine averages the floating leaves of that state over the devices after
  each step, unless the distiller sets `state_is_synced = True` (its state
  is identical on all devices by construction, e.g. a CRD memory bank
  updated from gathered embeddings). `TermInputs.batch` is the
  (preprocessed) batch dict, `TermInputs.step` the optimizer step.

Multi-teacher "average of losses": when `teacher_logits` is a list, every
logit term is evaluated against each teacher and combined with
`teacher_weights` (uniform by default).

Metrics (all float32 scalars): `'ce'` and one entry per term label (the *raw*
term value, before weight and warm-up), `'loss'` (the weighted total that is
differentiated), `'top1'` (student accuracy on the batch) and `'kd_factor'`
(the warm-up factor).

References:
  Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
  NeurIPS Deep Learning Workshop 2015.
  Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 (warm-up).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses as _losses

Array = Any
PyTree = Any


@dataclasses.dataclass(frozen=True)
class TermInputs:
  """Everything a distiller term may look at (inside the compiled step).

  `teacher_*` are constants (stop_gradient-ed); `teacher_features` is None
  when the teacher logits were precomputed.
  """
  student_logits: Array
  labels: Array
  teacher_logits: Optional[Array] = None
  student_features: Optional[PyTree] = None
  teacher_features: Optional[PyTree] = None
  train: bool = True
  rng: Optional[Array] = None
  axis_name: Optional[str] = None
  epoch: Optional[Array] = None
  # The (preprocessed) batch dict and the optimizer step: CRD reads the
  # example indices (`batch['index']`) and optional pipeline negatives
  # (`batch['contrast_idx']`); the step makes per-step sampling keys that do
  # not depend on the device.
  batch: Optional[Mapping[str, Any]] = None
  step: Optional[Array] = None
  # Extra input views a distiller declared (`Distiller.views`), e.g.
  # `{'strong': (student_logits, teacher_logits)}` on `batch['image_strong']`.
  views: Optional[Mapping[str, Any]] = None
  # Token-level objectives (language models): bool `[B, T]`, the trained
  # target positions; `labels` are then the targets `[B, T]`.
  where: Optional[Array] = None


class SparseTeacher(NamedTuple):
  """A teacher given by its top-k log-probabilities per position (an offline
  cache, `kd_jax.data.text.TopkCacheSource`): `logprobs` float `[..., k]`,
  `indices` int `[..., k]`. Terms on such a teacher name a loss of
  `kd_jax.losses.TOPK_LOSSES` (`Term('topk_kd', temperature=..., tail=...)`).
  """
  logprobs: Array
  indices: Array


def available_losses(on: str = "logits") -> Tuple[str, ...]:
  """Short names usable in a `Term` (`kd_jax.losses.LOGIT_LOSSES` / ...).

  `on='logits'`: losses of `(student_logits, teacher_logits)`;
  `on='features'`: every registered loss (for `Term(..., features=key)`).
  """
  if on == "logits":
    return tuple(sorted({**_losses.LOGIT_LOSSES, **_losses.TOPK_LOSSES}))
  return tuple(sorted({**_losses.LOGIT_LOSSES, **_losses.FEATURE_LOSSES}))


def resolve_loss(name: str, on: str = "logits") -> Callable:
  """`'kd'` or `'kd_loss'` -> `kd_jax.losses.kd_loss`; clear error otherwise."""
  if not isinstance(name, str):
    raise TypeError(f"loss `name` must be a string; got {type(name).__name__}.")
  short = name[:-len("_loss")] if name.endswith("_loss") else name
  every = {**_losses.LOGIT_LOSSES, **_losses.FEATURE_LOSSES,
           **_losses.TOPK_LOSSES}
  valid = available_losses(on)
  if short in valid:
    return every[short]
  if short in every:
    raise ValueError(
        f"loss {name!r} is not a function of (student_logits, "
        f"teacher_logits); pass `features=<feature key>` to apply it to "
        f"features, or use a distiller. Logit losses: {', '.join(valid)}.")
  raise ValueError(
      f"unknown loss name {name!r}; valid names: {', '.join(valid)} "
      "(kd_jax.losses.LOGIT_LOSSES / FEATURE_LOSSES).")


def _accepts(fn: Callable, arg: str) -> bool:
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return False
  params = sig.parameters
  if arg in params:
    return True
  return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_hparams(fn: Callable, hparams: Mapping[str, Any], label: str):
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return
  params = sig.parameters
  if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  reserved = {"labels", "axis_name", "where"}
  valid = [n for n, p in params.items()
           if p.kind == inspect.Parameter.KEYWORD_ONLY and n not in reserved]
  valid += [n for n, p in params.items()
            if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
            and p.default is not inspect.Parameter.empty and n not in reserved]
  for k in hparams:
    if k not in params or k in reserved or k not in valid:
      raise ValueError(
          f"loss term {label!r}: unknown hyperparameter {k!r} for "
          f"{getattr(fn, '__name__', fn)}; valid hyperparameters: "
          f"{', '.join(valid) or '(none)'}.")


class Term:
  """One weighted KD term of an `Objective`.

  Args:
    name: a loss of `kd_jax.losses` (`'kd'`, `'dkd'`, ...), or any label when
      `fn` or `distiller` is given.
    weight: multiplies the (batch-averaged) term.
    label: metric key / distiller-params key (defaults to `name`).
    warmup: scale this term by the objective's warm-up factor.
    fn: custom loss callable, used instead of looking `name` up.
    distiller: feature-distiller object (see module docstring).
    features: apply the loss to `student_features[features]` and
      `teacher_features[features]` instead of the logits (any loss of
      `kd_jax.losses`, e.g. `Term('sp', 3000., features='pooled')`); the
      features must already be comparable -- methods with trainable adapters
      are distillers.
    **hparams: keyword hyperparameters of the loss (e.g. `temperature=4.`).

  >>> Term('kd', weight=0.9, temperature=4.0).label
  'kd'
  """

  def __init__(self, name: str, weight: float = 1.0, *,
               label: Optional[str] = None, warmup: bool = True,
               fn: Optional[Callable] = None, distiller: Any = None,
               features: Optional[str] = None, **hparams):
    if fn is not None and distiller is not None:
      raise ValueError(f"term {name!r}: give `fn` or `distiller`, not both.")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
      raise TypeError(f"term {name!r}: `weight` must be a number; got {weight!r}.")
    if weight < 0:
      raise ValueError(f"term {name!r}: `weight` must be >= 0; got {weight}.")
    self.name = name
    self.weight = float(weight)
    self.label = label or name
    self.warmup = bool(warmup)
    self.distiller = distiller
    self.features = features
    self.hparams = dict(hparams)
    if features is not None and distiller is not None:
      raise ValueError(
          f"term {name!r}: `features` is for parameter-free losses; a "
          "distiller reads the features itself.")
    if distiller is not None:
      if not (hasattr(distiller, "init") and callable(distiller)):
        raise TypeError(
            f"term {name!r}: `distiller` must have `init(rng, inputs)` and be "
            f"callable as `(params, state, inputs) -> (loss, new_state)`.")
      self.fn = None
    else:
      self.fn = fn if fn is not None else resolve_loss(
          name, on="logits" if features is None else "features")
      _check_hparams(self.fn, self.hparams, self.label)
    self._takes_labels = self.fn is not None and _accepts(self.fn, "labels")
    self._takes_axis = self.fn is not None and _accepts(self.fn, "axis_name")
    self._takes_where = self.fn is not None and _accepts(self.fn, "where")
    # A loss of a sparse (top-k) teacher: `fn(student, logprobs, indices)`.
    self.sparse = self.fn is not None and any(
        self.fn is f for f in _losses.TOPK_LOSSES.values())

  @property
  def is_distiller(self) -> bool:
    return self.distiller is not None

  def __repr__(self):
    hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
    on = f", features={self.features!r}" if self.features is not None else ""
    return (f"Term({self.name!r}, weight={self.weight}, label={self.label!r}"
            f"{on}{', ' + hp if hp else ''})")

  def value(self, student, teacher, labels, axis_name, where=None,
            denom=None):
    """Batch-mean value of a logit/feature term (float32 scalar); with
    `where` (token-level), the sum over the `where` positions / `denom`."""
    kwargs = dict(self.hparams)
    if self._takes_labels:
      kwargs["labels"] = labels
    if self._takes_axis and axis_name is not None:
      kwargs["axis_name"] = axis_name
    if where is not None:
      if not self._takes_where:
        raise ValueError(f"loss term {self.label!r}: "
                         f"{getattr(self.fn, '__name__', self.fn)} has no "
                         "`where=` argument; it cannot be a token-level term.")
      kwargs["where"] = where
    if self.sparse != isinstance(teacher, SparseTeacher):
      raise ValueError(
          f"loss term {self.label!r}: " + (
              f"{self.name!r} needs a sparse (top-k) teacher; precompute the "
              "teacher's top-k log-probabilities (teacher.precompute)."
              if self.sparse else
              "the teacher is a top-k cache (teacher.precompute); use a loss "
              f"of {sorted(_losses.TOPK_LOSSES)} (e.g. 'topk_kd')."))
    out = (self.fn(student, teacher.logprobs, teacher.indices, **kwargs)
           if self.sparse else self.fn(student, teacher, **kwargs))
    out = jnp.asarray(out, jnp.float32)
    if where is not None:
      return jnp.sum(out) / denom
    return jnp.mean(out) if out.ndim else out


def _check_logits_labels(s, labels) -> None:
  """`[batch, classes]` student logits and integer labels of that batch."""
  if s.ndim != 2:
    raise ValueError(
        f"`student_logits` must have shape [batch, num_classes]; got "
        f"{tuple(s.shape)}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(
        f"`labels` must hold integer class indices; got dtype "
        f"{jnp.result_type(labels)}.")
  if tuple(labels.shape) != s.shape[:1]:
    raise ValueError(
        f"`labels` must have shape {s.shape[:1]} (the batch of the "
        f"student logits); got {tuple(labels.shape)}.")


def _check_token_inputs(s, labels, where):
  """Token-level inputs: logits `[..., V]`, integer targets and a mask of
  their shape; returns (bool mask, float32 max(count, 1))."""
  if s.ndim < 2:
    raise ValueError(f"token-level `student_logits` must be [..., vocab]; got "
                     f"shape {tuple(s.shape)}.")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise TypeError(f"`labels` (targets) must be integers; got "
                    f"{jnp.result_type(labels)}.")
  if tuple(labels.shape) != s.shape[:-1] or tuple(where.shape) != s.shape[:-1]:
    raise ValueError(
        f"targets {tuple(labels.shape)} and `where` {tuple(where.shape)} must "
        f"have the logits' leading shape {s.shape[:-1]}.")
  mask = where.astype(bool)
  return mask, jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _token_cross_entropy(s, targets, mask, denom):
  """Mean next-token NLL over the `mask` positions."""
  logp = jax.nn.log_softmax(s, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, nll, 0.0)) / denom


def _distiller_value(t, distiller_params, distiller_state, inputs):
  """(scalar value, new state) of distiller term `t`."""
  p = (distiller_params or {}).get(t.label)
  st = (distiller_state or {}).get(t.label, {})
  value, st_new = t.distiller(p, st, inputs)
  value = jnp.asarray(value, jnp.float32)
  value = jnp.mean(value) if value.ndim else value
  return value, (st_new if st_new is not None else {})


@dataclasses.dataclass(frozen=True)
class Objective:
  r"""Weighted hard-label CE + KD terms with a DKD-style warm-up factor.

  Args:
    ce_weight: weight of the hard-label cross-entropy (0 disables it).
    terms: sequence of `Term` (may be empty: plain supervised training).
    warmup_epochs: :math:`E_{warm}`; 0 means no warm-up.
    label_smoothing: label smoothing of the CE term (optax convention).
    teacher_weights: per-teacher weights when several teacher logits are
      given as a list (normalized to sum to 1; uniform when None).

  Call: `objective(student_logits, labels, teacher_logits=..., epoch=...,
  ...) -> (loss, aux)` with `aux = {'metrics': {...}, 'distiller_state':
  {...}}`.

  >>> import jax.numpy as jnp
  >>> obj = Objective(ce_weight=0.7, terms=(Term('kd', 0.3, temperature=5.),))
  >>> s = jnp.zeros((2, 3)); y = jnp.array([0, 1])
  >>> loss, aux = obj(s, y, teacher_logits=s)
  >>> round(float(loss), 4), round(float(aux['metrics']['kd']), 4)
  (0.769, 0.0)
  """
  ce_weight: float = 1.0
  terms: Tuple[Term, ...] = ()
  warmup_epochs: float = 0
  label_smoothing: float = 0.0
  teacher_weights: Optional[Tuple[float, ...]] = None

  def __post_init__(self):
    terms = tuple(self.terms)
    for t in terms:
      if not isinstance(t, Term):
        raise TypeError(f"`terms` must hold `Term` objects; got {t!r}.")
    labels = [t.label for t in terms]
    reserved = {"ce", "loss", "top1", "kd_factor"}
    for lab in labels:
      if labels.count(lab) > 1:
        raise ValueError(f"duplicate term label {lab!r}; pass `label=` to "
                         "distinguish terms with the same loss.")
      if lab in reserved:
        raise ValueError(f"term label {lab!r} is reserved for a metric; "
                         "pass another `label=`.")
    object.__setattr__(self, "terms", terms)
    if self.ce_weight < 0:
      raise ValueError(f"`ce_weight` must be >= 0; got {self.ce_weight}.")
    if self.warmup_epochs < 0:
      raise ValueError(
          f"`warmup_epochs` must be >= 0; got {self.warmup_epochs}.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(
          f"`label_smoothing` must be in [0, 1); got {self.label_smoothing}.")
    if self.teacher_weights is not None:
      w = tuple(float(v) for v in self.teacher_weights)
      if any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(
            f"`teacher_weights` must be >= 0 with a positive sum; got {w}.")
      object.__setattr__(self, "teacher_weights", w)

  @property
  def distiller_terms(self) -> Tuple[Term, ...]:
    return tuple(t for t in self.terms if t.is_distiller)

  @property
  def views(self) -> Tuple[str, ...]:
    """The extra input views its distillers declare (e.g. `('strong',)`)."""
    out = []
    for t in self.distiller_terms:
      for v in getattr(t.distiller, "views", ()):
        if v not in out:
          out.append(v)
    return tuple(out)

  def warmup_factor(self, epoch) -> Array:
    """:math:`\\min(e / E_{warm}, 1)` for 1-based `epoch`; 1 without warm-up."""
    if not self.warmup_epochs:
      return jnp.ones((), jnp.float32)
    if epoch is None:
      raise ValueError(
          "`epoch` is required when `warmup_epochs` > 0 (pass "
          "`steps_per_epoch` to the step builder).")
    e = jnp.asarray(epoch, jnp.float32)
    return jnp.minimum(e / jnp.float32(self.warmup_epochs), 1.0)

  def init_distillers(self, rng, inputs: TermInputs):
    """Initial `(distiller_params, distiller_state)` dicts keyed by label."""
    params, state = {}, {}
    for i, t in enumerate(self.distiller_terms):
      p, s = t.distiller.init(jax.random.fold_in(rng, i), inputs)
      params[t.label] = p
      state[t.label] = s if s is not None else {}
    return params, state

  def _feature_value(self, t, student_features, teacher_features, labels,
                     axis_name):
    if student_features is None or teacher_features is None:
      raise ValueError(
          f"loss term {t.label!r} reads features[{t.features!r}] but the "
          f"{'student' if student_features is None else 'teacher'} features "
          "are missing (precomputed teacher logits carry no features).")
    # Several teachers: a list with one feature dict per teacher.
    tfs = (list(teacher_features) if isinstance(teacher_features, list)
           else [teacher_features])
    w = ((1.0,) if len(tfs) == 1 else self.teacher_weights
         or (1.0,) * len(tfs))
    if len(w) != len(tfs):
      raise ValueError(f"`teacher_weights` has {len(w)} entries for "
                       f"{len(tfs)} teachers.")

    def get(feats, who):
      if not isinstance(feats, Mapping) or t.features not in feats:
        keys = sorted(feats) if isinstance(feats, Mapping) else type(feats)
        raise KeyError(
            f"loss term {t.label!r}: the {who} features have no key "
            f"{t.features!r}; available: {keys}.")
      return feats[t.features]

    sf = get(student_features, "student")
    return sum((wi / sum(w)) * t.value(sf, get(tf, "teacher"), labels,
                                      axis_name)
               for wi, tf in zip(w, tfs))

  def __call__(self, student_logits, labels, *, teacher_logits=None,
               student_features=None, teacher_features=None, epoch=None,
               distiller_params=None, distiller_state=None, train=True,
               rng=None, axis_name=None, batch=None, step=None, views=None,
               where=None):
    """`(loss, aux)`; `aux = {'metrics': ..., 'distiller_state': ...}`.

    With `where` (bool, the shape of `labels`) the objective is token-level
    (language models): `student_logits` `[..., V]`, `labels` the targets
    `[...]`; CE and every logit term are means over the `where` positions
    (sum / count, TRL's "batchmean" over tokens), `top1` is the token
    accuracy and `metrics['tokens']` the count.
    """
    s = jnp.asarray(student_logits, jnp.float32)
    if where is None:
      _check_logits_labels(s, labels)
      ce, mask, denom = self._cross_entropy(s, labels), None, None
    else:
      mask, denom = _check_token_inputs(s, labels, where)
      ce = _token_cross_entropy(s, labels, mask, denom)
    factor = self.warmup_factor(epoch)
    teachers, tw = self._teachers(teacher_logits, s, token_level=mask
                                  is not None)
    if teacher_features is not None:
      teacher_features = jax.lax.stop_gradient(teacher_features)
    new_dstate = dict(distiller_state or {})
    values = []
    for ti, t in enumerate(self.terms):
      if t.is_distiller:
        inputs = TermInputs(
            student_logits=s, labels=labels,
            teacher_logits=(teachers[0] if teachers and len(teachers) == 1
                            else teachers),
            student_features=student_features,
            teacher_features=teacher_features, train=train,
            rng=(None if rng is None
                 else jax.random.fold_in(rng, ti)),
            axis_name=axis_name, epoch=epoch, batch=batch, step=step,
            views=views, where=mask)
        value, new_dstate[t.label] = _distiller_value(
            t, distiller_params, distiller_state, inputs)
      elif t.features is not None:
        value = self._feature_value(t, student_features, teacher_features,
                                    labels, axis_name)
      else:
        if teachers is None:
          raise ValueError(
              f"loss term {t.label!r} needs teacher logits; got none (give a "
              "teacher apply function or precomputed `teacher_logits`).")
        value = sum(w * t.value(s, tl, labels, axis_name, mask, denom)
                    for w, tl in zip(tw, teachers))
      values.append(value)
    total, metrics = self.combine(ce, values, factor)
    hits = jnp.argmax(s, axis=-1) == labels
    if mask is None:
      metrics["top1"] = jnp.mean(hits.astype(jnp.float32))
    else:
      metrics["top1"] = jnp.sum(jnp.where(mask, hits, False)) / denom
      metrics["tokens"] = jnp.sum(mask).astype(jnp.float32)
    return total, {"metrics": metrics, "distiller_state": new_dstate}

  def combine(self, ce, values, factor=None):
    """`(loss, metrics)` from the CE and the raw term values (in `terms`
    order): `ce_weight * ce + sum_k w_k * lambda(e) * value_k`. Also what a
    step that computes CE and a term together (the fused LM head) calls."""
    if len(values) != len(self.terms):
      raise ValueError(f"{len(values)} term values for {len(self.terms)} "
                       "terms.")
    factor = jnp.ones((), jnp.float32) if factor is None else factor
    metrics: Dict[str, Array] = {"ce": ce}
    total = self.ce_weight * ce
    for t, value in zip(self.terms, values):
      metrics[t.label] = value
      scale = t.weight * (factor if t.warmup else 1.0)
      total = total + scale * value
    metrics["loss"] = total
    metrics["kd_factor"] = factor
    return total, metrics

  def _cross_entropy(self, s, labels):
    """Mean CE of the student's logits (with label smoothing when set)."""
    if self.label_smoothing:
      onehot = optax.smooth_labels(
          jax.nn.one_hot(labels, s.shape[-1]), self.label_smoothing)
      return jnp.mean(optax.softmax_cross_entropy(s, onehot))
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(s, labels))

  def _teachers(self, teacher_logits, s, token_level=False):
    """(list of float32 stop-gradient teacher logits, their normalized
    weights), or (None, None) without teacher logits. A `SparseTeacher`
    (top-k cache) is passed through. Token-level logits may differ from the
    student's in their last (vocabulary) axis: the loss's `vocab_size`
    decides."""
    if teacher_logits is None:
      return None, None
    if isinstance(teacher_logits, SparseTeacher):
      return [SparseTeacher(jax.lax.stop_gradient(teacher_logits.logprobs),
                            teacher_logits.indices)], (1.0,)
    teachers = (list(teacher_logits)
                if isinstance(teacher_logits, (list, tuple))
                else [teacher_logits])
    teachers = [jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
                for t in teachers]
    for i, t in enumerate(teachers):
      if (t.shape[:-1] != s.shape[:-1] if token_level else t.shape != s.shape):
        raise ValueError(
            f"teacher logits {i} must have the student's shape "
            f"{tuple(s.shape)}; got {tuple(t.shape)}.")
    if self.teacher_weights is not None and len(teachers) > 1:
      if len(self.teacher_weights) != len(teachers):
        raise ValueError(
            f"`teacher_weights` has {len(self.teacher_weights)} entries "
            f"but {len(teachers)} teacher logits were given.")
      tw = self.teacher_weights  # (one combined logits array: no weights)
    else:
      tw = (1.0,) * len(teachers)
    return teachers, tuple(w / sum(tw) for w in tw)
