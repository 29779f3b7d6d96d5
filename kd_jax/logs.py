"""Narrow silencing of known, harmless third-party log messages."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


class _DropPrefixes(logging.Filter):

  def __init__(self, prefixes):
    super().__init__()
    self.prefixes = tuple(prefixes)

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_absl(*prefixes: str) -> Iterator[None]:
  """Drops absl log records whose message starts with one of `prefixes`
  (e.g. Orbax's "Metadata file does not exist" when a teacher's item
  directory is read directly, TFDS's "OpenCV is not installed" note on
  its first PNG decode) while the block runs; everything else passes."""
  logger = logging.getLogger("absl")
  f = _DropPrefixes(prefixes)
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)
