"""The trainer's user-facing errors: each prints as one line, and
`experiments.main` exits with the class's documented status.

| exit | error | what to do |
|---|---|---|
| 2 | `ConfigError`, `CheckpointRestoreError`, `WorkdirLocked` | fix the command / config, or wait for the other run |
| 3 | `StorageError` | free space / fix permissions, then rerun: it resumes |
| 4 | `NonFiniteError` | lower the learning rate, check the data; the last good checkpoint is kept |
| 75 | `Preempted` (SIGTERM / SIGINT) | rerun the same command: it resumes from the saved step |
"""

EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_NONFINITE = 4
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a restart policy reruns the command


class KDError(Exception):
  """A failure the user can act on: one line, and an exit status."""
  exit_status = EXIT_USAGE


class ConfigError(KDError, ValueError):
  """An invalid config value; the message starts with the config key."""

  def __init__(self, key: str, msg: str):
    super().__init__(f"config.{key}: {msg}")
    self.key = key


class WorkdirLocked(KDError):
  """Another run holds the workdir."""


class StorageError(KDError):
  """The workdir cannot be written (full disk, read-only, permissions)."""
  exit_status = EXIT_STORAGE


class NonFiniteError(KDError):
  """The loss or the gradients became NaN / inf (the run diverged)."""
  exit_status = EXIT_NONFINITE


class Preempted(KDError):
  """SIGTERM / SIGINT: the run saved a checkpoint at `step` and stopped."""
  exit_status = EXIT_PREEMPTED

  def __init__(self, msg: str, step: int):
    super().__init__(msg)
    self.step = step
