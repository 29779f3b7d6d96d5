"""Pieces of `benchmark_step --suite=accelerator` that need no accelerator."""

import types

import jax
import jax.numpy as jnp

from experiments import benchmark_step as bs


def test_peak_table_lookup_and_override():
  h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
  cpu = types.SimpleNamespace(device_kind="cpu")
  assert bs.device_peak_tflops(h100, "bfloat16") == 989.0
  assert bs.device_peak_tflops(h100, "float32") == 494.0
  assert bs.device_peak_tflops(cpu, "float32") is None
  assert bs.device_peak_tflops(cpu, "bfloat16", override=1.5) == 1.5


def test_xla_flops_of_a_matmul():
  m, k, n = 16, 32, 8
  compiled = jax.jit(jnp.dot).lower(
      jnp.zeros((m, k)), jnp.zeros((k, n))).compile()
  assert bs._xla_flops(compiled) == 2 * m * k * n  # pylint: disable=protected-access


def test_accelerator_pairs_are_registered_models():
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  names = set(models.available_models())
  for teacher, student, *_ in bs.ACCEL_PAIRS.values():
    assert teacher in names and student in names
