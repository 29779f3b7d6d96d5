"""Distiller protocol, feature selection and the pre-training-stage machinery.

A *distiller* is a method = loss + trainable adapters / state, written as a
pure `init` / `apply` pair so that its parameters and state are pytrees next
to the student's (`TrainState.distiller_params[label]`,
`TrainState.distiller_state[label]`): optax trains them with the student,
Orbax saves them, a resumed run continues exactly.

* `init(rng, inputs: TermInputs) -> (params, state)` builds the adapters from
  the feature shapes in `inputs` (run it on one real batch, see
  `init_distillers`).
* `__call__(params, state, inputs) -> (loss, new_state)` is called inside the
  compiled step (`kd_jax.train.Term(label, weight, distiller=obj)`).

Data parallelism: every distiller here keeps its state identical on all
devices by construction (adapter BatchNorms normalize with global-batch
statistics over `inputs.axis_name`; CRD gathers the embeddings before the
memory update), and says so with `state_is_synced = True`, so the engine does
not average it again. Relation losses all-gather the batch (`axis_name`), so
under `pmap` the loss and the gradients equal the 1-device ones.

Multi-stage methods (AB, FSP, FT, and FitNets' optional hint stage) expose
their initialization stage as a `PretrainStage`: an `Objective` of its own,
an optimizer wrapper that freezes what the stage must not train, and the
conversion of the stage's parameters into the main distiller's
(`run_pretrain_stage` runs it end to end with the engine's step).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from kd_jax.train import objectives as _objectives
from kd_jax.train import state as _state
from kd_jax.train import step_utils
from kd_jax.train import steps as _steps

Array = Any
PyTree = Any
TermInputs = _objectives.TermInputs
LayerSpec = Union[None, int, str, slice, Sequence[int]]

__all__ = [
    "Distiller", "PretrainStage", "RunInfo", "register", "registry",
    "LayerwiseDistiller", "OneLayerDistiller", "parse_layers",
    "select_features", "make_term_inputs", "init_distillers",
    "run_pretrain_stage", "layer_pairs", "token_mean",
]


# ------------------------------------------------------------- selection --

def parse_layers(spec: LayerSpec) -> Union[None, int, slice, Tuple[int, ...]]:
  """Normalizes a layer selection: None, int, slice, `"1:-1"`, `"-2"`, ints.

  >>> parse_layers("1:-1"), parse_layers("-2"), parse_layers([1, 2])
  (slice(1, -1, None), -2, (1, 2))
  """
  if spec is None or isinstance(spec, slice):
    return spec
  if isinstance(spec, bool):
    raise TypeError(f"layer selection must be an int, a slice string like "
                    f"'1:-1' or a list of ints; got {spec!r}.")
  if isinstance(spec, int):
    return spec
  if isinstance(spec, str):
    s = spec.strip()
    try:
      if ":" in s:
        parts = [p.strip() for p in s.split(":")]
        if len(parts) > 3:
          raise ValueError
        vals = [int(p) if p else None for p in parts]
        return slice(*vals)
      return int(s)
    except ValueError:
      raise ValueError(
          f"cannot parse layer selection {spec!r}; use an index like '-2', a "
          "slice like '1:-1' or '1:', or a list of ints.") from None
  if isinstance(spec, (list, tuple)):
    out = []
    for v in spec:
      if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(
            f"layer selection lists must hold ints; got {spec!r}.")
      out.append(v)
    return tuple(out)
  raise TypeError(
      f"layer selection must be None, an int, a slice, a string like '1:-1' "
      f"or a list of ints; got {type(spec).__name__}.")


def select_features(features: Any, key: str, layers: LayerSpec, *,
                    who: str, method: str) -> List[Array]:
  """The list of arrays a distiller uses from a features dict.

  Args:
    features: the model's features dict (`{'stages': [...],
      'preact_stages': [...], 'pooled': ...}` for the zoo, `{path: array}`
      from `kd_jax.capture.capture`).
    key: the dict key (`'stages'`, `'preact_stages'`, `'pooled'`, a path).
    layers: selection inside a list entry (see `parse_layers`); must be None
      (or 0/-1) for an array entry.
    who: `'student'` / `'teacher'` (for messages).
    method: the distiller's name (for messages).

  Returns:
    a non-empty list of arrays.
  """
  if features is None:
    raise ValueError(
        f"{method}: needs the {who}'s features but got none"
        + (" (teacher logits were precomputed or the teacher apply function "
           "returned no features)" if who == "teacher" else "")
        + "; the apply function must return `(logits, features_dict)`.")
  if isinstance(features, (list, tuple)):
    raise ValueError(
        f"{method}: got a list of {len(features)} {who} feature dicts "
        "(several teachers); feature distillers support a single teacher.")
  if not isinstance(features, Mapping):
    raise TypeError(
        f"{method}: {who} features must be a dict like {{'stages': [...], "
        f"'pooled': ...}}; got {type(features).__name__}.")
  if key not in features:
    raise KeyError(
        f"{method}: the {who} features have no key {key!r}; available keys: "
        f"{sorted(features)}.")
  value = features[key]
  sel = parse_layers(layers)
  if isinstance(value, (list, tuple)):
    n = len(value)
    try:
      if sel is None:
        out = list(value)
      elif isinstance(sel, int):
        out = [value[sel]]
      elif isinstance(sel, slice):
        out = list(value[sel])
      else:
        out = [value[i] for i in sel]
    except IndexError:
      raise IndexError(
          f"{method}: layer selection {layers!r} is out of range for the "
          f"{who}'s {key!r} list of {n} feature maps.") from None
    if not out:
      raise ValueError(
          f"{method}: layer selection {layers!r} picks no feature map from the "
          f"{who}'s {key!r} list of {n}; choose other layers.")
    return out
  if sel not in (None, 0, -1):
    raise ValueError(
        f"{method}: the {who}'s {key!r} entry is a single array; the layer "
        f"selection must be None, got {layers!r}.")
  return [value]


def _float32(x):
  return jnp.asarray(x, jnp.float32)


def layer_pairs(spec, num_student: int, num_teacher: int
                ) -> Tuple[Tuple[int, int], ...]:
  """Student layer -> teacher layer pairs (1-based block numbers).

  `spec`: ``'uniform'`` (TinyBERT's :math:`g(m) = m N / M`: student block
  m of M is paired with teacher block round(m N / M) of N), ``'last'``
  (MiniLM: the last blocks), or explicit ``[(student, teacher), ...]`` pairs
  of block numbers (negative numbers count from the end: -1 = the last).

  >>> layer_pairs("uniform", 4, 12), layer_pairs("last", 4, 12)
  (((1, 3), (2, 6), (3, 9), (4, 12)), ((4, 12),))
  >>> layer_pairs([(1, -2), (-1, -1)], 2, 6)
  ((1, 5), (2, 6))
  """
  if spec == "uniform":
    return tuple((m, max(1, round(m * num_teacher / num_student)))
                 for m in range(1, num_student + 1))
  if spec == "last":
    return ((num_student, num_teacher),)
  if isinstance(spec, str) or not all(
      isinstance(p, (list, tuple)) and len(p) == 2 for p in spec or ()):
    raise ValueError(f"layer map {spec!r}: use 'uniform', 'last' or a list of "
                     "(student block, teacher block) pairs.")
  out = []
  for s, t in spec:
    for v, n, who in ((s, num_student, "student"), (t, num_teacher, "teacher")):
      if not isinstance(v, int) or not (1 <= v <= n or -n <= v <= -1):
        raise ValueError(f"layer map {spec!r}: {who} block {v!r} is out of "
                         f"range for {n} blocks (1..{n} or -1..-{n}).")
    out.append((s if s > 0 else num_student + 1 + s,
                t if t > 0 else num_teacher + 1 + t))
  if not out:
    raise ValueError("layer map: no pairs given.")
  return tuple(out)


def token_mean(per_position, where):
  """Mean of a per-position ``[B, T]`` value over the `where` positions
  (all when None): the token-level average of the LM objectives."""
  if where is None:
    return jnp.mean(per_position)
  denom = jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(where, per_position, 0.0)) / denom


# -------------------------------------------------------------- registry --

_REGISTRY: Dict[str, type] = {}


def register(name: str):
  """Class decorator: registers a `Distiller` subclass under `name`.

  Sets `cls.name = name`; `kd_jax.distillers.create(name, ...)` and config
  entries `{'distiller': name, ...}` then build it (through
  `cls.from_config`).

  >>> @register("my_method")          # doctest: +SKIP
  ... class MyDistiller(Distiller): ...
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register: the name must be a non-empty string; got "
                     f"{name!r}.")

  def wrap(cls):
    if not (isinstance(cls, type) and issubclass(cls, Distiller)):
      raise TypeError(f"register({name!r}) decorates Distiller subclasses; "
                      f"got {cls!r}.")
    other = _REGISTRY.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
      raise ValueError(f"distiller name {name!r} is already registered by "
                       f"{other.__module__}.{other.__qualname__}.")
    cls.name = name
    _REGISTRY[name] = cls
    return cls

  return wrap


def registry() -> Mapping[str, type]:
  """A read-only view `{name: Distiller subclass}` of the registered methods."""
  return dict(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What only the run knows, for `Distiller.from_config` hooks.

  Attributes:
    num_data: training-set size (CRD's memory banks).
    dataset_labels: int `[N]` training labels (CRD's class negatives).
    teacher_variables: the teacher's Flax variables (OFD `teacher_bn='auto'`).
    placeholders: build without the above (dummy values) -- to validate a
      config before the data and the teacher are loaded.
  """
  num_data: Optional[int] = None
  dataset_labels: Any = None
  teacher_variables: Any = None
  placeholders: bool = False


def constructor_args(cls) -> List[str]:
  """Keyword arguments accepted by `cls(...)`, over the `__init__` chain."""
  names = []
  for klass in cls.__mro__:
    init = klass.__dict__.get("__init__")
    if init is None or klass is object:
      continue
    for p in inspect.signature(init).parameters.values():
      if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
        names.append(p.name)
  return sorted(set(names))


# -------------------------------------------------------------- protocol --

class Distiller(abc.ABC):
  """Base class of kd_jax distillers (a pure `init` / `__call__` pair).

  Subclasses are registered with `@register(name)` and implement `init` and
  `__call__`; adapters are Flax Linen modules whose `'params'` are the
  distiller params and whose `'batch_stats'` live in the distiller state (see
  `init_module` / `apply_module`). `pretrain` is a `PretrainStage` for
  two-stage methods.

  `views` names the extra input views the method needs: with `'strong'` the
  batch must carry `batch['image_strong']` (a strongly augmented copy, see
  `kd_jax.data.strong_augment`), the engine runs the student and the teacher
  on it as well and hands the logits to the distiller as
  `inputs.views['strong'] = (student_logits, teacher_logits)`. With
  `'pair'` (CS-KD) the batch carries `batch['image_pair']` (a same-class
  partner per example, `InMemoryPipeline(same_class_pairs=True)`) and the
  student's logits on it arrive as `inputs.views['pair'] =
  (student_logits, None)`, without gradient.

  `needs_teacher = False` marks self-distillation methods (BYOT, CS-KD,
  Tf-KD_reg) that use no teacher network: they read only the student's
  outputs, so a run of such terms alone needs no teacher.
  """
  name: str = "distiller"
  state_is_synced: bool = True
  pretrain: Optional["PretrainStage"] = None
  views: Tuple[str, ...] = ()
  # Config keys `from_config` accepts beyond the constructor's arguments.
  config_args: Tuple[str, ...] = ()
  needs_teacher: bool = True

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], run_info: RunInfo
                  ) -> "Distiller":
    """Builds the distiller from a config entry's constructor arguments.

    The default passes `cfg` to the constructor; methods that need run-time
    information (CRD, OFD) override it and read `run_info`. Unknown
    arguments raise a ValueError listing the valid ones.
    """
    del run_info
    return cls.build(**cfg)

  @classmethod
  def build(cls, **kwargs) -> "Distiller":
    """`cls(**kwargs)`; unknown arguments raise a ValueError listing the
    valid ones."""
    try:
      return cls(**kwargs)
    except TypeError as e:
      raise ValueError(
          f"distiller {cls.name!r}: {e}; valid arguments: "
          f"{', '.join(constructor_args(cls))}.") from None

  @abc.abstractmethod
  def init(self, rng, inputs: TermInputs) -> Tuple[PyTree, PyTree]:
    """Returns `(params, state)` of the adapters for these inputs."""

  @abc.abstractmethod
  def __call__(self, params, state, inputs: TermInputs):
    """Returns `(loss, new_state)`."""

  def __repr__(self):
    fields = {k: v for k, v in vars(self).items() if not k.startswith("_")
              and k != "pretrain"}
    body = ", ".join(f"{k}={v!r}" for k, v in fields.items()
                     if not hasattr(v, "shape"))
    return f"{type(self).__name__}({body})"

  # -- helpers for subclasses --------------------------------------------

  def _student(self, inputs, key, layers):
    return select_features(inputs.student_features, key, layers,
                           who="student", method=self.name)

  def _teacher(self, inputs, key, layers):
    feats = select_features(inputs.teacher_features, key, layers,
                            who="teacher", method=self.name)
    return [jax.lax.stop_gradient(f) for f in feats]

  def _check_pairs(self, s_list, t_list):
    if len(s_list) != len(t_list):
      raise ValueError(
          f"{self.name}: the layer selections pick {len(s_list)} student and "
          f"{len(t_list)} teacher feature maps; they must pair up.")


class LayerwiseDistiller(Distiller):
  """Base of methods that pair student/teacher feature maps layer by layer.

  Args:
    feature_key: features dict key (`'stages'`).
    layers: student selection (see `parse_layers`; `'1:'` = RepDistiller's
      `feat[1:-1]`, the stage outputs after the stem).
    teacher_layers: teacher selection (default: `layers`).
  """

  def __init__(self, *, feature_key: str = "stages", layers: LayerSpec = "1:",
               teacher_layers: LayerSpec = None):
    self.feature_key = feature_key
    self.layers = layers
    self.teacher_layers = (self.layers if teacher_layers is None
                           else teacher_layers)

  def _pairs(self, inputs):
    s = self._student(inputs, self.feature_key, self.layers)
    t = self._teacher(inputs, self.feature_key, self.teacher_layers)
    self._check_pairs(s, t)
    return s, t

  def init(self, rng, inputs):
    del rng
    self._pairs(inputs)  # validates the selection on the real shapes
    return {}, {}


class OneLayerDistiller(Distiller):
  """Base of methods that compare one selected feature of each network."""

  def __init__(self, *, feature_key: str, layer: LayerSpec):
    self.feature_key = feature_key
    self.layer = layer

  def _pair(self, inputs):
    s = self._student(inputs, self.feature_key, self.layer)
    t = self._teacher(inputs, self.feature_key, self.layer)
    if len(s) != 1:
      raise ValueError(f"{self.name}: select exactly one feature map; "
                       f"layer={self.layer!r} selects {len(s)}.")
    return s[0], t[0]

  def init(self, rng, inputs):
    del rng
    self._pair(inputs)
    return {}, {}


def init_module(module: nn.Module, rng, *args) -> Tuple[PyTree, PyTree]:
  """`(params, batch_stats)` of a Linen adapter (`{}` when it has no BN)."""
  variables = module.init(rng, *args, train=False)
  variables = dict(variables)
  params = variables.pop("params", {})
  stats = variables.pop("batch_stats", {})
  if variables:
    raise ValueError(f"adapter {type(module).__name__} created unsupported "
                     f"collections {sorted(variables)}.")
  return params, stats


def apply_module(module: nn.Module, params, stats, *args, train: bool):
  """Applies an adapter; returns `(output, new_batch_stats)`."""
  variables = {"params": params}
  if stats:
    variables["batch_stats"] = stats
  if stats and train:
    out, upd = module.apply(variables, *args, train=True,
                            mutable=["batch_stats"])
    return out, upd["batch_stats"]
  return module.apply(variables, *args, train=train), stats


# ----------------------------------------------------- term inputs / init --

def _forward_student(student_apply, variables, x, rng):
  apply = step_utils.as_student_apply(student_apply)
  out = apply(variables, x, train=True, rngs={"dropout": rng})
  logits, feats, _ = step_utils.split_apply_output(out)
  return logits, feats


def make_term_inputs(student_apply, teacher_apply, student_variables,
                     teacher_variables, batch: Mapping[str, Any], *,
                     rng=None, image_key: str = "image",
                     label_key: str = "label",
                     preprocess: Optional[Callable] = None) -> TermInputs:
  """Runs the student (train mode) and the teacher on `batch` -> `TermInputs`.

  What the engine builds inside its step, for initializing distillers on a
  real batch (their adapters take their shapes from the features).
  `teacher_apply=None` (self-distillation, `Distiller.needs_teacher =
  False`): no teacher outputs.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  batch = dict(batch)
  if preprocess is not None:
    batch = preprocess(batch)
  x, labels = batch[image_key], batch[label_key]
  s_logits, s_feats = _forward_student(student_apply, student_variables, x,
                                       rng)
  if teacher_apply is None:
    t_logits = t_feats = None
  else:
    t_logits, t_feats = _steps.teacher_forward(
        teacher_apply, teacher_variables, x)
    t_logits = _float32(t_logits)
    t_feats = jax.lax.stop_gradient(t_feats)
  return TermInputs(
      student_logits=_float32(s_logits), labels=jnp.asarray(labels),
      teacher_logits=t_logits, student_features=s_feats,
      teacher_features=t_feats, train=True, rng=rng,
      axis_name=None, epoch=jnp.ones((), jnp.int32), batch=batch,
      step=jnp.zeros((), jnp.int32))


def init_distillers(objective: _objectives.Objective, rng, *, student_apply,
                    teacher_apply, student_variables, teacher_variables,
                    batch: Mapping[str, Any], image_key: str = "image",
                    label_key: str = "label",
                    preprocess: Optional[Callable] = None):
  """`(distiller_params, distiller_state)` of every distiller term.

  Runs both networks once on `batch` (host side, no `axis_name`) and calls
  `objective.init_distillers`; pass the result to
  `kd_jax.train.create_train_state(..., distiller_params=...,
  distiller_state=...)`. Use a real batch: some distillers keep statistics of
  it (OFD margins without BatchNorm).
  """
  k_fwd, k_init = jax.random.split(rng)
  inputs = make_term_inputs(student_apply, teacher_apply, student_variables,
                            teacher_variables, batch, rng=k_fwd,
                            image_key=image_key, label_key=label_key,
                            preprocess=preprocess)
  return objective.init_distillers(k_init, inputs)


# -------------------------------------------------------- pretrain stages --

@dataclasses.dataclass(frozen=True)
class PretrainStage:
  """The initialization stage of a two-stage distiller.

  Attributes:
    distiller: the stage's loss as a distiller (its params/state layout is
      what `to_stage` returns).
    train_student: whether the stage trains the student (AB, FSP, FitNets
      hint stage: yes; FT paraphraser: no -- the student is frozen).
    epochs: the reference's default length (RepDistiller `--init_epochs`).
    description: what the stage trains, for logs and docs.
    to_stage: `(main_params, main_state) -> (stage_params, stage_state)`.
    to_main: `(stage_params, stage_state, main_params, main_state) ->
      (main_params, main_state)`, e.g. FT moves the trained paraphraser into
      the (frozen) main state.
    learning_rate: optional stage learning rate (RepDistiller: 0.01 for the
      FT paraphraser of ResNet/WRN students), or None for the main one.
  """
  distiller: Distiller
  train_student: bool
  epochs: int
  description: str
  to_stage: Callable[[PyTree, PyTree], Tuple[PyTree, PyTree]]
  to_main: Callable[[PyTree, PyTree, PyTree, PyTree], Tuple[PyTree, PyTree]]
  learning_rate: Optional[float] = None

  def objective(self, label: str) -> _objectives.Objective:
    """CE-free objective with the stage loss under `label`."""
    return _objectives.Objective(
        ce_weight=0.0,
        terms=(_objectives.Term(label, 1.0, distiller=self.distiller,
                                warmup=False),))

  def optimizer(self, tx: optax.GradientTransformation,
                student_mask: Optional[Callable[[PyTree], PyTree]] = None
                ) -> optax.GradientTransformation:
    """Wraps `tx` so that what the stage must not train gets zero updates.

    Without `train_student` the whole student is frozen (no weight decay
    either). With it, `student_mask(student_params) -> bool pytree` can
    freeze part of the student (e.g. its classifier, which RepDistiller's
    init stage leaves out of the optimizer; by default the whole student is
    trained and the classifier only sees weight decay).
    """
    train_student = self.train_student

    def labels(tree):
      student = tree["student"]
      if not train_student:
        s_lab = jax.tree_util.tree_map(lambda _: "freeze", student)
      elif student_mask is not None:
        s_lab = jax.tree_util.tree_map(lambda m: "train" if m else "freeze",
                                       student_mask(student))
      else:
        s_lab = jax.tree_util.tree_map(lambda _: "train", student)
      return {"student": s_lab,
              "distiller": jax.tree_util.tree_map(lambda _: "train",
                                                  tree["distiller"])}

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                                 labels)


def run_pretrain_stage(stage: PretrainStage, label: str, *, student_apply,
                       teacher_apply, student_variables, teacher_variables,
                       distiller_params, distiller_state,
                       tx: optax.GradientTransformation,
                       batches: Iterable[Mapping[str, Any]], rng,
                       student_mask=None, jit: bool = True,
                       preprocess: Optional[Callable] = None):
  """Runs a `PretrainStage` over `batches` with the engine's distill step.

  Args:
    stage: `distiller.pretrain`.
    label: the distiller term's label (keys its params in the train state).
    student_apply / teacher_apply: as for `make_distill_step`.
    student_variables / teacher_variables: Flax variables.
    distiller_params / distiller_state: the *main* layout for `label` (from
      `init_distillers`), converted with `stage.to_stage`.
    tx: the stage optimizer before freezing (see `PretrainStage.optimizer`).
    batches: iterable of batch dicts (one optimizer step each).
    rng: PRNG key.
    student_mask: optional student-params mask (see `optimizer`).
    jit: compile the step (False only for debugging).
    preprocess: in-program batch transform.

  Returns:
    `(student_variables, main_params, main_state, losses)`: the student after
    the stage, the main distiller's params/state for `label` and the list of
    stage-loss values.
  """
  sp, ss = stage.to_stage(distiller_params, distiller_state)
  stx = stage.optimizer(tx, student_mask)
  state = _state.create_train_state(
      student_variables, stx, rng=rng, distiller_params={label: sp},
      distiller_state={label: ss})
  step = _steps.make_distill_step(student_apply, teacher_apply,
                                  stage.objective(label), stx,
                                  preprocess=preprocess)
  if jit:
    step = jax.jit(step)
  losses = []
  for batch in batches:
    state, metrics = step(state, teacher_variables, dict(batch))
    losses.append(float(metrics[label]))
  mp, ms = stage.to_main(state.distiller_params[label],
                         state.distiller_state[label], distiller_params,
                         distiller_state)
  return state.variables, mp, ms, losses
