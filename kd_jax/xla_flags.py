r"""XLA:CPU flags that make kd_jax's convnets faster, applied only on request.

XLA reads `XLA_FLAGS` once, when JAX creates its first backend, and aborts the
process on a flag name it does not know. So entry points (scripts, not the
library) call `use_fast_cpu_flags()` before anything touches a device:

    from kd_jax import xla_flags
    xla_flags.use_fast_cpu_flags()   # before the first jax computation

What it sets (`FAST_CPU_FLAGS`):

* `--xla_cpu_experimental_ynn_fusion_type=dot,reduce`: XLA:CPU sends
  convolutions, dots, reductions and some elementwise fusions to the YNNPACK
  library by default; its convolutions are slow at the small batches of
  CIFAR/MNIST training (the weight gradient of a 5x5 32->64 convolution at
  batch 64: 35.7 ms vs 11.8 ms on XLA's Eigen path). This flag keeps YNNPACK
  for dots and reductions only; convolutions take the Eigen path. (`dot`
  alone also takes reductions off YNNPACK, which made the KD losses ~2x
  slower.) Measured 1.1-1.6x on the MNIST CNN train step; no measurable
  change on the CIFAR ResNet distillation step on the 2-core VM of
  docs/performance.md (the same finding upstream:
  https://github.com/jax-ml/jax/issues/37465). Results change only by float
  rounding (a different convolution algorithm).

Safety rules, each one a reason to leave `XLA_FLAGS` untouched:

* the flag is experimental: it is added only if the installed jaxlib knows it
  (its name occurs in jaxlib's XLA library; an unknown flag would abort) and
  XLA:CPU starts with it in a child process (some names occur in the library
  yet abort as unknown flags); that verdict is cached per jaxlib version
  under `$XDG_CACHE_HOME/kd_jax` (default `~/.cache/kd_jax`), so only the
  first run pays the child's start-up (~0.5 s here);
* a flag the user already set in `XLA_FLAGS` (any value) is never overridden;
* `KD_JAX_FAST_CPU_FLAGS=0` in the environment disables the whole helper;
* if JAX's backends are already initialised the flags could no longer take
  effect, so nothing is changed (and the return value says so);
* if `JAX_PLATFORMS` names platforms but not `cpu`, CPU flags are pointless.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import subprocess
import sys
from typing import Dict, List, MutableMapping, Optional

FAST_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
"""Flags `use_fast_cpu_flags` adds (each only if the installed jaxlib has it)."""

DISABLE_ENV = "KD_JAX_FAST_CPU_FLAGS"


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].lstrip("-")


def _jaxlib_libraries() -> List[str]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  root = os.path.dirname(jaxlib.__file__)
  names = sorted(os.listdir(root))
  # The XLA flag registry lives in libjax_common (jaxlib >= 0.4.3x); search it
  # first, then any other shared library of the package.
  names.sort(key=lambda n: (not n.startswith("libjax_common"), n))
  return [os.path.join(root, n) for n in names if n.endswith(".so")]


@functools.lru_cache(maxsize=None)
def jaxlib_knows_flag(name: str) -> bool:
  """True if `name` (e.g. 'xla_cpu_foo') occurs in the installed jaxlib.

  A flag XLA registers appears in its library as the literal name; a jaxlib
  without it would reject the flag. Reads the library through `mmap` (no
  import of JAX, no backend initialisation; ~0.05 s).
  """
  needle = name.lstrip("-").encode()
  for path in _jaxlib_libraries():
    try:
      with open(path, "rb") as f, mmap.mmap(
          f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(needle) >= 0:
          return True
    except (OSError, ValueError):
      continue
  return False


def _cache_file() -> str:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(root, "kd_jax", "xla_flags.json")


def _jaxlib_key() -> str:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return f"{jaxlib.__version__}:{os.path.dirname(jaxlib.__file__)}"
  except ImportError:
    return "none"


def _read_cache() -> Dict[str, bool]:
  try:
    with open(_cache_file()) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def _write_cache(key: str, ok: bool) -> None:
  data = _read_cache()
  data[key] = ok
  path = _cache_file()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(data, f)
    os.replace(tmp, path)
  except OSError:
    pass  # no writable cache: the check runs again next time


@functools.lru_cache(maxsize=None)
def xla_accepts_flag(flag: str) -> bool:
  """True if XLA:CPU starts with `XLA_FLAGS=flag` (checked in a child process,
  which XLA would abort on a flag it rejects; cached per jaxlib)."""
  key = f"{_jaxlib_key()}|{flag}"
  cached = _read_cache().get(key)
  if isinstance(cached, bool):
    return cached
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  env[DISABLE_ENV] = "0"
  try:
    ok = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=120).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False  # not cached: a transient failure should not stick
  _write_cache(key, ok)
  return ok


def _backends_initialized() -> bool:
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # pylint: disable=broad-except
    return True  # unknown JAX internals: assume too late, change nothing


def _cpu_possible(environ) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "") or environ.get(
      "JAX_PLATFORM_NAME", "")
  return not platforms or "cpu" in platforms.lower().split(",")


def use_fast_cpu_flags(environ: Optional[MutableMapping[str, str]] = None
                       ) -> Dict[str, object]:
  """Appends the supported `FAST_CPU_FLAGS` to `XLA_FLAGS` when it is safe.

  Args:
    environ: the environment to edit (default `os.environ`).

  Returns:
    `{'added': [flags added], 'skipped': {flag or '*': reason}}`.
  """
  env = os.environ if environ is None else environ
  skipped: Dict[str, str] = {}
  if env.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    return {"added": [], "skipped": {"*": f"{DISABLE_ENV}=0"}}
  if not _cpu_possible(env):
    return {"added": [], "skipped": {"*": "JAX_PLATFORMS excludes cpu"}}
  if environ is None and _backends_initialized():
    return {"added": [], "skipped": {
        "*": "JAX backends already initialised (call this before any JAX "
             "computation)"}}
  current = env.get("XLA_FLAGS", "")
  user_names = {_flag_name(tok) for tok in current.split()}
  added = []
  for flag in FAST_CPU_FLAGS:
    name = _flag_name(flag)
    if name in user_names:
      skipped[flag] = "already set in XLA_FLAGS"
    elif not jaxlib_knows_flag(name) or not xla_accepts_flag(flag):
      skipped[flag] = "not supported by the installed jaxlib"
    else:
      added.append(flag)
  if added:
    env["XLA_FLAGS"] = " ".join([current.strip()] + added).strip()
  return {"added": added, "skipped": skipped}
