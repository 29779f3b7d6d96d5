"""Test-session setup shared by tests/ and the kd_jax doctests.

8 simulated CPU devices so pmap / sharding tests run on one CPU; this must be
set before JAX is imported anywhere.
"""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

_SHARED_TFDS = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "shared", "data", "tfds"))
# Real MNIST prepared in TFDS format, when present (tests never download).
if os.path.isdir(_SHARED_TFDS):
  os.environ.setdefault("KD_JAX_TEST_TFDS_DIR", _SHARED_TFDS)


import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _tmp_in_tmp_path(tmp_path, monkeypatch):
  """Temporary files of every test -- TFDS's `mock_data` leaves a
  `tmp*tfds` metadata folder per call -- go into the test's `tmp_path`
  (pytest prunes old ones), also for subprocesses (TMPDIR)."""
  d = tmp_path / "_tmp"
  d.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(d))
  monkeypatch.setenv("TMPDIR", str(d))
