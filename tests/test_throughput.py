"""Throughput accounting against hand-computed values."""

import jax
import jax.numpy as jnp
import pytest

from jaxcl.trainer import throughput


def test_step_flops_of_a_matmul():
  compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
  assert throughput.step_flops(compiled) == 2 * 64 * 32 * 16


@pytest.mark.parametrize('kind,peak', [
    ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5p', 459.0), ('TPU v6 lite', 918.0),
    ('NVIDIA A100-SXM4-40GB', 312.0), ('NVIDIA H100 80GB HBM3', 989.0),
    ('NVIDIA H100 PCIe', 756.0), ('NVIDIA H200', 989.0), ('cpu', None)])
def test_peaks(kind, peak):
  assert throughput.peak_tflops(kind) == peak


def test_metrics_by_hand():
  # 2 TFLOP per device per step, 4 devices, global batch 8, 0.5 s per step.
  got = throughput.metrics(2e12, 4, 8, 0.5, 'TPU v4')
  assert got['flops_per_example'] == pytest.approx(1e12)
  assert got['tflops_per_device'] == pytest.approx(4.0)
  assert got['mfu'] == pytest.approx(4.0 / 275.0)
  assert 'mfu' not in throughput.metrics(2e12, 4, 8, 0.5, 'cpu')
  assert throughput.metrics(None, 4, 8, 0.5, 'cpu') == {}
