"""kd_jax.xla_flags: which flags are added, and that XLA accepts them."""

import os
import subprocess
import sys

import pytest

from kd_jax import xla_flags

NAME = "xla_cpu_experimental_ynn_fusion_type"


def test_adds_supported_flag_and_keeps_existing_ones():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = xla_flags.use_fast_cpu_flags(env)
  if not xla_flags.jaxlib_knows_flag(NAME):
    assert out["added"] == [] and env["XLA_FLAGS"].endswith("count=8")
    pytest.skip("the installed jaxlib has no " + NAME)
  assert out["added"] == list(xla_flags.FAST_CPU_FLAGS)
  assert env["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=8", f"--{NAME}=dot,reduce"]
  # Idempotent: a second call finds the flag set and adds nothing.
  assert xla_flags.use_fast_cpu_flags(env)["added"] == []


def test_never_overrides_user_setting():
  env = {"XLA_FLAGS": f"--{NAME}=dot"}
  out = xla_flags.use_fast_cpu_flags(env)
  assert out["added"] == [] and env["XLA_FLAGS"] == f"--{NAME}=dot"


@pytest.mark.parametrize("env", [{"KD_JAX_FAST_CPU_FLAGS": "0"},
                                 {"JAX_PLATFORMS": "cuda"}])
def test_disabled_or_not_cpu(env):
  out = xla_flags.use_fast_cpu_flags(env)
  assert out["added"] == [] and "XLA_FLAGS" not in env


def test_unknown_flag_is_not_added(monkeypatch):
  monkeypatch.setattr(xla_flags, "FAST_CPU_FLAGS",
                      ("--xla_cpu_no_such_flag_kd_jax=1",))
  env = {}
  out = xla_flags.use_fast_cpu_flags(env)
  assert out["added"] == [] and "XLA_FLAGS" not in env
  assert "not supported" in out["skipped"]["--xla_cpu_no_such_flag_kd_jax=1"]


def test_too_late_after_backend_init():
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # conftest / earlier tests may have done it already
  before = os.environ.get("XLA_FLAGS")
  out = xla_flags.use_fast_cpu_flags()
  assert out["added"] == [] and "initialised" in out["skipped"]["*"]
  assert os.environ.get("XLA_FLAGS") == before


def test_flags_accepted_by_xla_in_a_fresh_process():
  code = ("from kd_jax import xla_flags; import os; "
          "out = xla_flags.use_fast_cpu_flags(); "
          "import jax, jax.numpy as jnp; "
          "x = jnp.ones((2, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4)); "
          "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
          "dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
          "print(out['added'], float(y.sum()), os.environ.get('XLA_FLAGS'))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
      [p for p in [os.environ.get("PYTHONPATH")] if p])
  r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, env=env, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  # 2*8*8*4 outputs; SAME 3x3 over ones: interior 27, edges 18, corners 12.
  expected = 2 * 4 * (6 * 6 * 27 + 4 * 6 * 18 + 4 * 12)
  assert f" {float(expected)} " in r.stdout
  if xla_flags.jaxlib_knows_flag(NAME):
    assert f"--{NAME}=dot,reduce" in r.stdout


def test_name_in_library_but_rejected_by_xla(tmp_path, monkeypatch):
  """Some flag names occur in jaxlib's library yet abort XLA as unknown
  flags (this jaxlib: `xla_cpu_use_multi_output_fusion`); the child-process
  check rejects them, accepts the real flag, and caches both verdicts."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  xla_flags.xla_accepts_flag.cache_clear()
  bogus = "--xla_cpu_use_multi_output_fusion=true"
  if not xla_flags.jaxlib_knows_flag(NAME):
    pytest.skip("the installed jaxlib has no " + NAME)
  assert xla_flags.xla_accepts_flag(xla_flags.FAST_CPU_FLAGS[0])
  if xla_flags.jaxlib_knows_flag("xla_cpu_use_multi_output_fusion"):
    assert not xla_flags.xla_accepts_flag(bogus)
  monkeypatch.setattr(xla_flags, "FAST_CPU_FLAGS", (bogus,))
  monkeypatch.setattr(xla_flags, "jaxlib_knows_flag", lambda name: True)
  env = {}
  out = xla_flags.use_fast_cpu_flags(env)
  assert out["added"] == [] and "XLA_FLAGS" not in env
  cache = (tmp_path / "kd_jax" / "xla_flags.json").read_text()
  assert bogus in cache and NAME in cache
  xla_flags.xla_accepts_flag.cache_clear()
