"""The full config schema of `experiments/main.py`, with defaults.

Every config file starts from `base_config()` (image classification) or
`lm_config()` (language models) and overrides what its recipe needs;
`kd_jax.trainer.parse` checks the result (once) before anything is
compiled: unknown keys are refused with the closest valid name, every value
against its range. Command-line overrides use the same keys, e.g.
`--config.train.batch_size=128 --config.loss.terms.kd.temperature=2`.

Keys (both tasks):

* `task`: `'classify'` (images, the default) or `'lm'` (language models);
  the data-free image tasks `'dafl'` (section `dafl`, `configs/dafl_mnist.py`)
  and `'deepinversion'` (below).
* `mode`: `'train'` (supervised: a teacher, or a student alone; images
  also with teacher-free distiller terms, self-distillation: `byot`,
  `cskd`, `tfkd`), `'distill'` (student from frozen teachers) or
  `'seed_experiment'` (several phases over several seeds, see
  `configs/mnist_seed.py`, `configs/lm_jane_austen.py`; chains and
  ensembles: `configs/mnist_takd.py`, `configs/cifar100_ban.py`).
* `seed`: init / dropout / shuffling seed.
* `debug`: tiny data, 2 steps, small evaluations -- what CI runs for every
  config; see `kd_jax.trainer.apply_debug`.
* `data`, `model`: the task's (below).
* `teacher`: the frozen teacher of `mode='distill'` -- its model fields (as
  `model`), `checkpoint` (a teacher run's workdir / an Orbax checkpoint dir),
  `precompute` (images: run the teacher once over the un-augmented training
  set; language models: cache its top-k log-probabilities once), `evaluate`
  (report the teacher's eval metric first), `weight`, `sharding` (mesh runs:
  'replicated' | 'fsdp' | 'tensor' | [(regex, spec), ...]). Several teachers:
  `teachers.<label>` sections instead (`loss.multi_teacher`:
  'mean_logits' distils from their weighted mean, 'mean_losses' averages
  every term over them).
* `loss`: `ce_weight`, `warmup_epochs` (DKD: `min(epoch / W, 1)` on KD terms,
  1-based epochs), `label_smoothing`, `terms` (label -> {`name` (a loss of
  `kd_jax.losses`, defaults to the label), `weight`, loss hyperparameters},
  or {`distiller` (a method of `kd_jax.distillers`), `weight`, its
  arguments}), `multi_teacher`, `fused_head` / `chunk_size` (language
  models: CE + the one divergence from the hidden states, in chunks).
* `optimizer`: `name` (sgd | adam | adamw | rmsprop (Keras 0.x: rho 0.9,
  eps 1e-6) | dot | a method's registered
  one), `learning_rate`, `momentum`, `nesterov`, `weight_decay` (coupled L2
  for sgd/adam as in PyTorch; decoupled for adamw), `schedule` (constant |
  step | cosine | warmup_cosine), `decay_epochs`, `decay_factor`,
  `warmup_epochs` (linear LR warm-up), `warmup_steps` (warmup_cosine),
  `grad_clip` (global norm; 0 = off), `delta` (DOT), `max_norm` (> 0:
  after each update, every hidden unit's incoming weight vector is
  projected onto the L2 ball of this radius -- Hinton et al. 2012; 0 =
  off), `max_norm_output` (the output layer's units too; default False).
* `train`: `batch_size` (global), `eval_batch_size`, `num_epochs`,
  `num_steps` (> 0: stop after this many steps), `steps_per_call` (train
  steps compiled into one scanned call), `eval_every_epochs`,
  `eval_every_steps` (> 0: evaluate every N steps instead), `log_every_steps`,
  `parallel` (none | jit | pmap), `num_devices` (0 = all), `progress_bar`,
  `pretrain_max_steps` (cap on a distiller's initialization stage -- AB /
  FT / FSP; 0 = the stage's own `epochs`), `on_nonfinite` ('stop': a NaN /
  inf loss or gradient stops the run naming the step, the last good
  checkpoint kept; 'skip_update': such updates are skipped, the run stops
  after `max_consecutive_skips` in a row), `mesh` / `sharding_rules`
  (docs/parallelism.md).
* `checkpoint`: `enabled`, `every_steps` (0 = only at epoch ends, see
  `every_epochs`), `every_epochs`, `keep`, `keep_best`, `async_save`.
* `report`: `paper` (what a recipe targets: source, metric, value) and free
  notes, copied to the run's `report.json`.

Image classification (`base_config()`): `data` = `name` (TFDS name: mnist,
cifar10, cifar100, imagenet2012), `data_dir` (TFDS data dir, '' =
`$TFDS_DATA_DIR`), `cache_dir`, `mock`, `train_subset` / `eval_subset`
(first N examples, 0 = all), `augment` (the dataset's standard train
augmentation), `teacher_view` ('same' | 'separate'), `image_size` (ImageNet
crop size), `num_workers` (ImageNet grain workers), `on_device` (in-memory
datasets: the training split on the devices once, only example indices per
chunk), `subset` ('first' | 'random': which `train_subset` examples; random
= drawn with the run's seed, the same for every phase of a seed),
`normalization` ('dataset': the dataset's mean / std | 'unit': pixels /
255), `views.student` / `views.teacher` (per-model input views,
`kd_jax.data.views`: a name or `{'name': ..., **arguments}`, e.g.
`{'name': 'downscale', 'size': 7}`; None = the image as is; in-memory
datasets; the student is evaluated on its view, the teacher on its own;
mode 'train' applies `views.student` to its model; Lopez-Paz et al.'s
privileged information, `configs/lopez_paz_mnist.py`); `model` / teacher =
`jitter` (int, 0 = off: translate each
training image by up to this many pixels in any direction, zero fill;
in-memory datasets), `omit_classes` / `keep_classes` (tuples of class
ids, default (): train on the training split without / with only these
classes -- a transfer set; the test set stays whole); `model` / teacher =
`evaluation` (optional section, off by default;
`kd_jax/trainer/error_counts.py`) = `error_counts` (report test errors as
counts: `errors`), `bias_shift_classes` (also report `errors_on` these
classes and the shift of their output biases that minimizes the test
errors: `shift`, `errors_shifted`, `errors_on_shifted`), `bias_shift_grid`
((lowest, highest, step) of the shifts tried; default (-15, 15, 0.1)),
`validation_size` (int, 0 = off; needs `bias_shift_classes`, in-memory
data: hold out this many examples of the training split -- stratified,
seed 0, the same for every seed and phase, taken BEFORE `omit_classes` /
`keep_classes`, so it contains the classes the transfer set lacks --, train
on the rest, and also report the shift chosen on that split, `shift_val`,
with the TEST errors under it, `errors_shifted_val`,
`errors_on_shifted_val`; debug runs hold out at most 16).
None of these keys is in `base_config()`: their defaults change nothing,
and configs that do not use them store the same `config.json` as before
(`configs/hinton2015.py` uses them all); `model` / teacher = `name`, `num_classes`, `dtype` (+
the teacher's `checkpoint_format`: 'orbax' | 'torch').

DeepInversion (`task='deepinversion'`, mode 'distill',
`kd_jax/trainer/inversion.py`; `configs/deepinversion_mnist.py`,
`configs/deepinversion_cifar100.py`): a batch of `train.batch_size` images
optimized for `train.num_steps` iterations by `optimizer` (the authors':
adam, 0.05) against the frozen `teacher`; `data.name` gives only the shape
and normalization (no image is read); `model` is the Adaptive DeepInversion
competitor (+ `init_checkpoint`: a trained run's workdir). Section
`deepinversion` (defaults: the authors' CIFAR-10 settings): `bn_weight` (10),
`first_bn_multiplier` (1), `tv_l2_weight` (2.5e-5), `tv_l1_weight` (0),
`l2_weight` (0), `ce_weight` (1), `adi_weight` (0 = off; > 0 needs `model`),
`adi_temperature` (3), `jitter` (2), `flip` (False), `clip` (False: pixels
clipped to the normalized [0, 1] range), `spatial_only` (True: BN layers
with 4-D inputs), `grid_rows` (10).

Language models (`lm_config()`): `data` = a prepared text dataset
(`experiments/prepare_corpus.py`): `data_dir`, `name`, `version`,
`train_sequences` / `eval_sequences` (first N, 0 = all), `eval_splits`;
`model` / teacher = `preset` (+ `overrides`) or `hf_dir`, `dtype`, `remat`
(+ the teacher's `topk` / `cache_dir` for `precompute`; the student's
`init_checkpoint`: an LM run's workdir whose newest parameters start it);
`generation` = `max_new_tokens` (0: train on the data; > 0: the loss covers
the last `max_new_tokens` positions), `lmbda`, `seq_kd`, `temperature`,
`top_k`, `top_p` (Seq-KD / on-policy GKD, TRL's names: `temperature` is the
sampling temperature only; GKD's loss temperature is its `js_divergence`
term's, default 1 as TRL); `minillm` = MiniLLM's procedure (`enabled`,
`num_rollouts`, `chunk_size`, `pt`, `pt_positions`, and the authors'
`teacher_mixed_alpha`, `reward_scaling`, `cliprange_reward`, `gamma`,
`length_norm`, `whiten`, `cliprange`, `single_step_reg`, `lm_coef`,
`kd_ratio`, `ppo_epochs`; `train.batch_size` is its PPO minibatch and
`train.num_steps` counts its optimizer updates). docs/lm.md.
A teacher with its own tokenizer (docs/cross_tokenizer.md,
`configs/lm_cross_tokenizer.py`): `teacher.data_name` (its prepared dataset
in `data.data_dir`) or `teacher.tokenizer` (a tokenizer.json), optional
`teacher.seq_len` (teacher tokens per window, 0 = automatic), and
cross-tokenizer terms `loss.terms.<label> = {'name': 'uld' |
'extended_uld' | 'hybrid', 'weight', temperatures, 'merge', 'beta',
'matched_by', ...}`. Every LM evaluation reports perplexity and bits per
byte (`<split>_bpb`) per held-out split.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "classify"
  c.mode = "train"
  c.seed = 0
  c.debug = False

  c.data = ml_collections.ConfigDict()
  c.data.name = "mnist"
  c.data.data_dir = ""
  c.data.cache_dir = ""
  c.data.mock = False
  c.data.mock_num_examples = 64
  c.data.train_subset = 0
  c.data.eval_subset = 0
  c.data.augment = True
  c.data.teacher_view = "same"
  c.data.image_size = 224
  c.data.num_workers = 8
  c.data.on_device = True  # in-memory datasets: whole split on device
  c.data.subset = "first"  # train_subset: 'first' N or 'random' (run's seed)
  c.data.normalization = "dataset"  # 'dataset' mean/std | 'unit': x / 255
  # Per-model input views (kd_jax.data.views): None = the image as is.
  c.data.views = ml_collections.ConfigDict()
  c.data.views.student = ml_collections.config_dict.placeholder(object)
  c.data.views.teacher = ml_collections.config_dict.placeholder(object)

  c.model = ml_collections.ConfigDict()
  c.model.name = "mlp_student"
  c.model.num_classes = 10
  c.model.dtype = "float32"

  c.teacher = ml_collections.ConfigDict()
  c.teacher.name = ""
  c.teacher.num_classes = 10
  c.teacher.dtype = "float32"
  c.teacher.checkpoint = ""
  c.teacher.checkpoint_format = "orbax"
  c.teacher.precompute = False
  c.teacher.evaluate = True  # report the teacher's eval accuracy first
  c.teacher.weight = 1.0
  # Mesh runs: 'replicated' (None) | 'fsdp' | 'tensor' | [(regex, spec), ...].
  c.teacher.sharding = ml_collections.config_dict.placeholder(object)

  c.loss = ml_collections.ConfigDict()
  c.loss.ce_weight = 1.0
  c.loss.warmup_epochs = 0
  c.loss.label_smoothing = 0.0
  c.loss.terms = ml_collections.ConfigDict()
  c.loss.multi_teacher = "mean_logits"
  c.loss.fused_head = False
  c.loss.chunk_size = 1024

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.decay_epochs = (150, 180, 210)
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip = 0.0
  c.optimizer.delta = 0.075

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64
  c.train.eval_batch_size = 500
  c.train.num_epochs = 1
  c.train.num_steps = 0
  c.train.steps_per_call = 1
  c.train.eval_every_epochs = 1
  c.train.eval_every_steps = 0
  c.train.log_every_steps = 100
  c.train.parallel = "none"
  c.train.num_devices = 0
  c.train.progress_bar = True
  c.train.pretrain_max_steps = 0  # cap on distiller init stages (0: none)
  c.train.on_nonfinite = "stop"   # NaN / inf: 'stop' | 'skip_update'
  c.train.max_consecutive_skips = 10
  # A device mesh (parallel 'jit'), e.g. {'data': 2, 'fsdp': 4, 'tensor': 1},
  # and optional (regex, spec) rules for the student state on it
  # (docs/parallelism.md). None: 'jit' is data parallel over all devices.
  c.train.mesh = ml_collections.config_dict.placeholder(object)
  c.train.sharding_rules = ml_collections.config_dict.placeholder(object)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.enabled = True
  c.checkpoint.every_steps = 0
  c.checkpoint.every_epochs = 1
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = True
  c.checkpoint.async_save = True

  c.report = ml_collections.ConfigDict()
  c.report.paper = ml_collections.ConfigDict()
  c.report.paper.source = ""
  c.report.paper.metric = ""
  c.report.paper.value = -1.0          # what this run targets (-1: none)
  c.report.paper.teacher_value = -1.0  # the paper's teacher / student-alone
  c.report.paper.student_value = -1.0
  c.report.notes = ""
  return c


def kd_terms(*, weight: float, temperature: float) -> ml_collections.ConfigDict:
  """`loss.terms` with one Hinton KD term."""
  t = ml_collections.ConfigDict()
  t.kd = ml_collections.ConfigDict(
      {"weight": float(weight), "temperature": float(temperature)})
  return t


def dkd_terms(*, alpha: float, beta: float,
              temperature: float) -> ml_collections.ConfigDict:
  """`loss.terms` with one DKD term (weight 1: alpha/beta are inside)."""
  t = ml_collections.ConfigDict()
  t.dkd = ml_collections.ConfigDict(
      {"weight": 1.0, "alpha": float(alpha), "beta": float(beta),
       "temperature": float(temperature)})
  return t


def cifar100_recipe(c: ml_collections.ConfigDict, *,
                    lr: float) -> ml_collections.ConfigDict:
  """The CIFAR-100 recipe of RepDistiller / mdistiller (teachers, students, KD).

  SGD momentum 0.9, batch 64, 240 epochs, LR ×0.1 at epochs 150/180/210,
  weight decay 5e-4 (coupled L2, as torch.optim.SGD), random crop (pad 4) +
  horizontal flip, per-channel normalization.
  """
  c.data.name = "cifar100"
  c.data.augment = True
  c.model.num_classes = 100
  c.teacher.num_classes = 100
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = lr
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = (150, 180, 210)
  c.optimizer.decay_factor = 0.1
  c.train.batch_size = 64
  c.train.eval_batch_size = 500
  c.train.num_epochs = 240
  c.train.steps_per_call = 1
  c.train.log_every_steps = 200
  c.train.parallel = "jit"
  c.checkpoint.every_epochs = 1
  return c


def imagenet_recipe(c: ml_collections.ConfigDict, *, lr: float = 0.1,
                    batch_size: int = 256, num_epochs: int = 100,
                    decay_epochs=(30, 60, 90)) -> ml_collections.ConfigDict:
  """ImageNet recipe of mdistiller / torchvision: SGD 0.9, wd 1e-4, step LR.

  Random-resized crop 224 + flip for training, resize 256 + center crop 224
  for evaluation, torchvision mean/std.
  """
  c.data.name = "imagenet2012"
  c.data.augment = True
  c.data.image_size = 224
  c.data.num_workers = 16
  c.model.num_classes = 1000
  c.teacher.num_classes = 1000
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = lr
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "step"
  c.optimizer.decay_epochs = tuple(decay_epochs)
  c.optimizer.decay_factor = 0.1
  c.train.batch_size = batch_size
  c.train.eval_batch_size = 250
  c.train.num_epochs = num_epochs
  c.train.steps_per_call = 1
  c.train.log_every_steps = 500
  c.train.parallel = "jit"
  c.checkpoint.every_steps = 2000
  c.checkpoint.every_epochs = 1
  return c


def lm_model(preset: str = "llama_tiny", **overrides
             ) -> ml_collections.ConfigDict:
  """A language-model `model` / `teacher` section: a preset + overrides."""
  return ml_collections.ConfigDict({
      "preset": preset, "hf_dir": "", "dtype": "float32", "remat": False,
      "overrides": overrides})


def lm_config() -> ml_collections.ConfigDict:
  """The language-model task's schema with defaults (`task = 'lm'`).

  AdamW with warm-up + cosine decay and gradient clipping; an evaluation
  (held-out perplexity) and a checkpoint every `train.eval_every_steps`.
  """
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.mode = "train"
  c.seed = 0
  c.debug = False
  c.data = ml_collections.ConfigDict({
      "data_dir": "workdirs/lm_data", "name": "jane_austen_v2048_s64",
      "version": "1.0.0", "train_sequences": 0, "eval_sequences": 0,
      "eval_splits": ("validation", "test")})
  c.model = lm_model()
  c.model.init_checkpoint = ""  # an LM run's workdir: start from its params
  c.teacher = lm_model()
  c.teacher.checkpoint = ""
  c.teacher.precompute = False  # top-k cache of the training sequences
  c.teacher.topk = 32
  c.teacher.cache_dir = ""      # default: <teacher>/topk_cache
  c.teacher.evaluate = False
  c.teacher.weight = 1.0
  c.teacher.sharding = ml_collections.config_dict.placeholder(object)
  c.generation = ml_collections.ConfigDict({
      "max_new_tokens": 0, "lmbda": 0.0, "seq_kd": False,
      "temperature": 0.9, "top_k": 0, "top_p": 0.0})
  # MiniLLM (Gu et al., ICLR 2024): the authors' names and script values;
  # the sizes (num_rollouts, chunk_size) are a small run's.
  c.minillm = ml_collections.ConfigDict({
      "enabled": False, "num_rollouts": 64, "chunk_size": 0, "pt": True,
      "pt_positions": "all", "teacher_mixed_alpha": 0.2,
      "reward_scaling": 0.5, "cliprange_reward": 100.0, "gamma": 0.95,
      "length_norm": True, "whiten": True, "cliprange": 0.2,
      "single_step_reg": True, "lm_coef": 1.0, "kd_ratio": 0.5,
      "ppo_epochs": 4})
  c.loss = ml_collections.ConfigDict({
      "ce_weight": 1.0, "terms": ml_collections.ConfigDict(),
      "fused_head": False, "chunk_size": 1024})
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 1e-3, "schedule": "warmup_cosine",
      "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0})
  c.train = ml_collections.ConfigDict({
      "batch_size": 32, "eval_batch_size": 64, "num_steps": 100,
      "num_epochs": 0, "log_every_steps": 10, "eval_every_steps": 100,
      "steps_per_call": 1, "parallel": "none", "progress_bar": True})
  c.train.mesh = ml_collections.config_dict.placeholder(object)
  c.train.sharding_rules = ml_collections.config_dict.placeholder(object)
  c.checkpoint = ml_collections.ConfigDict({
      "enabled": True, "keep": 1, "keep_best": False, "async_save": False,
      "every_epochs": 0, "every_steps": 0})
  c.report = ml_collections.ConfigDict({"notes": ""})
  return c
