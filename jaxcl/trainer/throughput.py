"""Throughput accounting: FLOPs from XLA's cost analysis of the compiled
step, achieved TFLOP/s per device, and MFU where the device's peak is known.

The FLOPs are those of the whole compiled train step (augmentation, both
towers forward and backward, the loss, the optimizer update), counted by XLA
on the per-device program after SPMD partitioning, so nothing is estimated by
hand. MFU = achieved FLOP/s per device / the device's peak dense bf16 FLOP/s.
`IntervalTimer` times the steps between two log steps, input waits apart.
"""

from __future__ import annotations

import time

# Peak dense bf16 TFLOP/s per device (chip), from the vendors' specifications.
PEAK_TFLOPS = (
    ('TPU v6 lite', 918.0),  # v6e (Trillium)
    ('TPU v6e', 918.0),
    ('TPU v5 lite', 197.0),  # v5e
    ('TPU v5e', 197.0),
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),  # v5p reports itself as 'TPU v5'
    ('TPU v4', 275.0),
    ('H200', 989.0),  # SXM, dense
    ('H100', 989.0),  # SXM, dense (the PCIe card: 756)
    ('A100', 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The peak dense bf16 TFLOP/s of a device kind (jax.Device.device_kind), or None."""
  if 'H100' in device_kind and 'PCIe' in device_kind:
    return 756.0
  for name, peak in PEAK_TFLOPS:
    if name in device_kind:
      return peak
  return None


def step_flops(compiled) -> float | None:
  """FLOPs of one execution of a compiled step on one device, or None when
  XLA gives no cost analysis on this platform."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def metrics(flops_per_device: float | None, num_devices: int, batch_size: int,
            step_time: float, device_kind: str) -> dict[str, float]:
  """flops_per_example, tflops_per_device and (peak known) mfu for a step
  that took `step_time` seconds; {} without a cost analysis."""
  if not flops_per_device or step_time <= 0:
    return {}
  achieved = flops_per_device / step_time / 1e12
  out = {'flops_per_example': flops_per_device * num_devices / batch_size,
         'tflops_per_device': achieved}
  peak = peak_tflops(device_kind)
  if peak:
    out['mfu'] = achieved / peak
  return out


class IntervalTimer:
  """Times the steps since the last `restart()`: wall time, and the part
  spent waiting for input, for the throughput metrics of a log step."""

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

  def metrics(self, batch_size: int) -> dict[str, float]:
    """examples_per_sec, step_time, data_wait_time, compute_time (per step)
    and data_wait_fraction over the interval."""
    elapsed = time.perf_counter() - self.start
    return {'examples_per_sec': self.steps * batch_size / elapsed,
            'step_time': elapsed / self.steps,
            'data_wait_time': self.data_wait / self.steps,
            'compute_time': (elapsed - self.data_wait) / self.steps,
            'data_wait_fraction': self.data_wait / elapsed}
