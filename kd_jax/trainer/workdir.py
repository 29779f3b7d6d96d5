"""A run's workdir: created, locked, and its `config.json` written.

One run per workdir: `lock(workdir)` creates ``<workdir>/.kd_jax.lock``
atomically (``O_CREAT | O_EXCL``) holding the host, pid and start time
before anything else is written. A second run stops with one line naming
the holder (`errors.WorkdirLocked`). A stale lock -- its pid is dead on
this host -- is taken over with a warning. The processes of one run share
the lock: process 0 takes it, the others wait for it at a barrier. The lock
is released when the run ends, whatever the cause (preemption, an error);
a run killed with SIGKILL leaves a stale lock that the next run takes over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from typing import Iterator, Optional

from kd_jax import metrics_io
from kd_jax.trainer.errors import ConfigError
from kd_jax.trainer.errors import StorageError
from kd_jax.trainer.errors import WorkdirLocked

LOCK_FILE = ".kd_jax.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _describe(holder: Optional[dict]) -> str:
  if not holder:
    return "an unreadable lock"
  started = time.strftime("%Y-%m-%d %H:%M:%S",
                          time.localtime(holder.get("time", 0)))
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, "
          f"started {started}")


def _create(path: str, me: dict) -> bool:
  """Whether `path` was created (atomically) holding `me`."""
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(me, f)
  return True


def acquire(workdir: str) -> str:
  """Takes the workdir's lock (see the module docstring); returns its path."""
  path = os.path.join(workdir, LOCK_FILE)
  me = {"host": socket.gethostname(), "pid": os.getpid(),
        "time": time.time()}
  for _ in range(3):
    if _create(path, me):
      return path
    holder = _read(path)
    if holder and holder.get("host") == me["host"] and not _alive(
        int(holder.get("pid", -1))):
      logging.warning("workdir %s: taking over the stale lock of a run that "
                      "is gone (%s).", workdir, _describe(holder))
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    raise WorkdirLocked(
        f"workdir {workdir!r} is in use by another run ({_describe(holder)}; "
        f"{path}). Wait for it, use another --workdir, or delete the lock "
        "file if that run is gone (on another host its liveness cannot be "
        "checked).")
  raise WorkdirLocked(f"workdir {workdir!r}: could not take the lock {path}.")


def release(path: str) -> None:
  holder = _read(path)
  if holder and holder.get("pid") == os.getpid() and holder.get(
      "host") == socket.gethostname():
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def storage_error(e: OSError, path: str, what: str = "") -> StorageError:
  """One line for a write that failed for lack of space or permission."""
  reason = e.strerror or errno.errorcode.get(e.errno, str(e))
  return StorageError(f"cannot write {path}{' (' + what + ')' if what else ''}"
                      f": {reason}.")


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                  errno.EPERM, errno.EFBIG)


def find_os_error(e: BaseException) -> Optional[OSError]:
  """The `OSError` of a lack of space / permission in `e`'s chain (Orbax
  and tensorstore wrap it), else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return e
    text = str(e)
    for code in STORAGE_ERRNOS:
      name = os.strerror(code)
      if name in text or errno.errorcode[code] in text:
        return OSError(code, name)
    e = e.__cause__ or e.__context__
  return None


def prepare(workdir: str, config_json: Optional[str], *, main: bool) -> None:
  """Creates `workdir` and writes `config.json` (process 0); a workdir that
  is a file or cannot be written is one line."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError("workdir", f"{workdir!r} is a file; give a directory.")
  try:
    os.makedirs(workdir, exist_ok=True)
    if main and config_json is not None:
      metrics_io.write_text(os.path.join(workdir, "config.json"), config_json)
    elif not os.access(workdir, os.W_OK):
      raise PermissionError(errno.EACCES, "Permission denied", workdir)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise storage_error(e, workdir) from None
    raise ConfigError(
        "workdir", f"cannot write to {workdir!r} ({e.strerror or e}).") from None


@contextlib.contextmanager
def locked(workdir: str, *, main: bool = True) -> Iterator[None]:
  """Creates `workdir` and holds its lock while the block runs (process 0
  takes it; the other processes of the run share it)."""
  prepare(workdir, None, main=False)  # created; a file / unwritable: one line
  path = acquire(workdir) if main else None
  try:
    yield
  finally:
    if path is not None:
      release(path)
