r"""Entry point: train a teacher, a student alone, distill, or a seed experiment.

    python -m experiments.main --config=configs/<name>.py[:<arg>] \
        --workdir=<dir> [--config.<key>=<value> ...]

The config's `task` selects what is trained (`'classify'`: images, the
default; `'lm'`: language models) and its `mode` what runs
(`configs/base.py` documents every key): `'train'` (supervised: a teacher
or a student alone), `'distill'` (a student from a frozen teacher,
`teacher.checkpoint` = a teacher run's workdir or a converted checkpoint)
or `'seed_experiment'` (several phases over several seeds,
`configs/mnist_seed.py`, `configs/lm_jane_austen.py`). Examples::

    TFDS_DATA_DIR=../shared/data/tfds python -m experiments.main \
        --config=configs/mnist_seed.py --workdir=workdirs/mnist_seed
    python -m experiments.main --config=configs/cifar100_teacher.py:resnet56 \
        --workdir=workdirs/cifar100/resnet56
    python -m experiments.main \
        --config=configs/cifar100_dkd.py:resnet56-resnet20 \
        --workdir=workdirs/cifar100/dkd_resnet56-resnet20 \
        --config.teacher.checkpoint=workdirs/cifar100/resnet56
    python -m experiments.main --config=configs/cifar100_kd.py --config.debug=True \
        --workdir=/tmp/smoke

Several processes (one per host, or locally for testing), e.g. two local
processes sharing one workdir::

    python -m experiments.main --config=... --workdir=wd \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0 &
    python -m experiments.main --config=... --workdir=wd \
        --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=1

(`--distributed` alone lets `jax.distributed.initialize()` find the
coordinator in a cluster's environment; on CPU the gloo collectives are
selected automatically.) Only process 0 writes reports, metrics and plots.
A run across processes needs `--config.train.parallel=jit` (or `pmap`); a
seed experiment switches its phases from 'none' to 'jit' itself.

Rerunning a command with the same `--workdir` resumes from the latest
checkpoint. Outputs in the workdir: `config.json`, `metrics.jsonl`,
TensorBoard events (`tensorboard/`), `curves.png`, `report.json`,
`checkpoints/`; a seed experiment adds `results.md` / `results.json`.
Failures print one line and exit with a status that says what to do
(`kd_jax/trainer/errors.py`): 2 the command, the config or a workdir held by
another run; 3 the disk (full, read-only); 4 the run diverged (NaN / inf);
75 preempted (SIGTERM / SIGINT: the checkpoint is saved, rerun to resume).
"""

import difflib
import importlib.util
import os
import sys


from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, "
                    "plots, report); reusing it resumes the run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                  "first (multi-host runs; coordinator from the environment).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                    "(multi-process runs; implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds after which the "
                     "processes of a multi-process run treat a silent one "
                     "as failed and stop (so one failing process ends all).")
config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/<name>.py or configs/<name>.py:<arg>.",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _fail(msg: str, status: int = 2):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(status)


def _exit_now(status: int):
  """Ends a process of a multi-process run at once: `sys.exit` would wait
  in `jax.distributed`'s shutdown barrier for the others, which may wait
  for this one. The coordination service then stops the others (missed
  heartbeats, `--heartbeat_timeout` seconds)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def _config_arg(argv):
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str):
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_kd_jax_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def _unknown_key_message(flag: str, argv) -> str:
  """`config.a.b: unknown key; did you mean ...?` for a bad override."""
  key = flag[len("config."):]
  try:
    node = _load_config(_config_arg(argv))
  except Exception:  # pylint: disable=broad-except
    return f"unknown command line flag --{flag}."
  parts, done = key.split("."), []
  for part in parts:
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      close = (difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
               or sorted(k for k in keys if k.startswith(part))[:1])
      where = "config" + "".join("." + p for p in done + [part])
      hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
              else f"valid keys: {', '.join(sorted(keys)) or '(none)'}.")
      return f"{where}: unknown key; {hint}"
    done.append(part)
    node = node[part]
  return f"invalid value for --{flag}."


def parse_flags(argv):
  """absl flag parsing with one-line errors (exit 2); the config file is
  checked before anything imports JAX."""
  spec = _config_arg(argv)
  if spec is not None:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      _fail(f"--config: config file {path!r} not found.")
  try:
    return FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    if e.flagname.startswith("config."):
      _fail(_unknown_key_message(e.flagname, argv))
    _fail(str(e))
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if "Error whilst parsing config file" in str(e) and len(lines) > 1:
      _fail(f"--config: cannot load {spec!r}: {lines[-1]}")  # get_config's
    _fail(lines[0] if lines else type(e).__name__)
  except Exception as e:  # pylint: disable=broad-except  (config file errors)
    for a in argv[1:]:
      if a.startswith("--config."):
        msg = _unknown_key_message(a[2:].split("=", 1)[0], argv)
        if "unknown key" in msg:
          _fail(msg)
    cause = e.__cause__ or e
    first = (str(cause).strip().splitlines() or [""])[0]
    _fail(f"--config: cannot load {spec!r}: {type(cause).__name__}: {first}")


def _summary(report) -> str:
  keys = ("task", "mode", "model", "teacher", "steps", "epochs")
  parts = [f"{k}={report[k]}" for k in keys if report.get(k) is not None]
  for k, v in report.items():
    if (k.startswith(("last_", "best_")) or k == "teacher_top1") and (
        isinstance(v, float)):
      parts.append(f"{k}={v:.4f}")
  for k in ("wall_s", "examples_per_sec", "steady_examples_per_sec",
            "tokens_per_sec", "steady_tokens_per_sec"):
    if isinstance(report.get(k), float):
      parts.append(f"{k}={report[k]:,.1f}")
  return " ".join(parts)


def _init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  multi = FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1
  if not (FLAGS.distributed or multi):
    return
  # Harmless on GPU/TPU; CPU processes need a collectives implementation.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {k: getattr(FLAGS, k) for k in ("coordinator_address",
                                       "num_processes", "process_id")
        if getattr(FLAGS, k) is not None}
  jax.distributed.initialize(
      heartbeat_timeout_seconds=int(FLAGS.heartbeat_timeout), **kw)


def main(argv):
  # After the flags (the config file is checked before anything imports JAX)
  # and before JAX starts a backend: see kd_jax/xla_flags.py.
  from kd_jax import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.use_fast_cpu_flags()
  if len(argv) > 1:
    _fail(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  _init_distributed()
  from kd_jax import trainer  # pylint: disable=g-import-not-at-top
  from kd_jax.data import sources  # pylint: disable=g-import-not-at-top
  from experiments import seed_experiment  # pylint: disable=g-import-not-at-top
  from kd_jax.trainer import preemption  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  multi = _num_processes() > 1
  try:
    with preemption.watch():
      if config.get("mode", None) == "seed_experiment":
        seed_experiment.run(config, FLAGS.workdir)
      else:
        report = trainer.train_and_evaluate(config, FLAGS.workdir)
        if _is_main():
          print(_summary(report), flush=True)
  except (trainer.KDError, sources.DatasetNotFoundError) as e:
    status = getattr(e, "exit_status", 2)
    print(f"error: {e}", file=sys.stderr, flush=True)
    if multi or isinstance(e, trainer.StorageError):
      # A failed write can leave Orbax's background threads posting to a
      # closed event loop at interpreter shutdown (tracebacks after the one
      # line); the last good checkpoint is already final, nothing is pending.
      _exit_now(status)
    sys.exit(status)
  except Exception:  # pylint: disable=broad-except
    if not multi:
      raise
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    _exit_now(1)


def _num_processes() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def _is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
