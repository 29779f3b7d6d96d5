"""The trainer's user-facing errors: each prints as one line (exit status 2
from `experiments.main`)."""


class ConfigError(ValueError):
  """An invalid config value; the message starts with the config key."""

  def __init__(self, key: str, msg: str):
    super().__init__(f"config.{key}: {msg}")
    self.key = key
