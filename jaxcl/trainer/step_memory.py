"""The compiled step's memory and FLOPs, known before a run starts.

XLA's memory analysis of the compiled per-device program gives the bytes of
its arguments (the state and the batch), its outputs, and its temporaries
(activations, gradients, the loss's logits). Outputs written into donated
arguments (the state) are counted once: peak = arguments + outputs +
temporaries - aliased. A run whose peak exceeds the device's memory (or
`device_memory_gb`) stops with one line before it writes anything, instead
of failing in the allocator.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxcl import errors, files, models, parallel
from jaxcl.data import augment
from jaxcl.trainer import throughput, train_step

GIB = 2 ** 30


def has_loops(config) -> bool:
  """Whether the step loops over microbatches or layers (jaxcl.trainer.grad_cache,
  jaxcl.models.transformer.run_blocks)."""
  return bool(config.microbatch_size or config.model.remat != 'none' or config.model.scan_layers)


def flops_per_device(exp, compiled) -> float | None:
  """The model's FLOPs in one step on one device. XLA's cost analysis counts
  a loop's body once, so a step with loops is counted as its plain twin
  (Experiment.plain: the same math, unrolled), lowered but not compiled,
  whose count is of the whole mesh's program: split evenly over the devices.
  Remat's recomputation is not counted (MFU counts the model's FLOPs); the
  loss's shard_map body is counted per shard and the replicated optimizer
  update once, so on D devices such a step's count is a little below the
  compiled per-device count (a few percent for ViT-B)."""
  if not has_loops(exp.config):
    return throughput.step_flops(compiled)
  plain = exp.plain()
  try:
    lowered = train_step.make_train_step(plain).lower(plain.abstract_state(),
                                                      train_step.abstract_batch(plain))
    flops = (lowered.cost_analysis() or {}).get('flops')
  except Exception:  # a platform without a cost analysis
    return None
  return float(flops) / exp.mesh.size if flops else None


def activation_bytes(exp) -> int:
  """Bytes per device the towers' forward pass keeps for the backward pass
  (jax.vjp's residuals), on one chunk: the batch, or one microbatch. This is
  what remat trades for recomputation. Counted from shapes, nothing runs.
  Weights kept as residuals do not grow with the rows, so only the growth is
  counted: 2 x (residuals at n rows - residuals at n/2)."""
  _, encode = train_step.make_towers(exp)
  state = exp.abstract_state()
  rows = exp.config.microbatch_size or exp.config.batch_size

  def residuals(n):
    def pullback(params, batch):
      inputs = (batch, augment.view_keys(jax.random.key(0), exp.method.num_views, n))
      return jax.vjp(lambda p: encode(p, state.batch_stats, inputs)[0], params)[1]
    shapes = jax.eval_shape(pullback, state.params, train_step.abstract_batch(exp, n))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))

  return 2 * (residuals(rows) - residuals(rows // 2)) // parallel.num_batch_shards(exp.mesh)


def analysis(compiled, exp, with_flops: bool = True) -> dict:
  """{argument_bytes, output_bytes, temp_bytes, alias_bytes, peak_bytes,
  state_bytes (params, opt_state, ema, per_example), training_only_param_bytes
  (the decoder's, the self-distillation heads'), flops_per_device,
  flops_per_example} of the compiled step of `exp`: bytes per device, FLOPs
  per device and per example of the global batch (all devices' work; None
  without with_flops)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # a backend without one
    stats = None
  names = ('argument', 'output', 'temp', 'alias')
  out = {f'{name}_bytes': int(getattr(stats, f'{name}_size_in_bytes')) if stats else None
         for name in names}
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                       - out['alias_bytes']) if stats else None
  state = exp.abstract_state()
  # The state's parts, and the parameters of the training-only parts SigLIP 2's recipe adds.
  out['state_bytes'] = {field: parallel.bytes_per_device(getattr(state, field))
                        for field in ('params', 'opt_state', 'ema', 'per_example')}
  out['training_only_param_bytes'] = {
      part: parallel.bytes_per_device(state.params[part])
      for part in models.TRAINING_ONLY if part in state.params}
  flops = flops_per_device(exp, compiled) if with_flops else None
  out['flops_per_device'] = flops
  out['flops_per_example'] = flops * exp.mesh.size / exp.config.batch_size if flops else None
  return out


def device_memory_bytes(device_memory_gb: float, device) -> tuple[int | None, str]:
  """(bytes a step may use per device, where that figure comes from):
  device_memory_gb (the config's) when set, else what the device reports
  (GPUs and TPUs do, CPUs do not: None)."""
  if device_memory_gb:
    return int(device_memory_gb * GIB), 'device_memory_gb'
  try:
    stats = device.memory_stats() or {}
  except Exception:  # a platform without memory stats
    stats = {}
  limit = stats.get('bytes_limit')
  return (int(limit), f'{device.device_kind} memory') if limit else (None, '')


def describe(num_bytes: int | None) -> str:
  """Bytes for a person: '1.38 GiB', '12.5 MiB'."""
  if num_bytes is None:
    return 'an unknown amount (no memory analysis on this platform)'
  if num_bytes >= GIB:
    return f'{num_bytes / GIB:.2f} GiB'
  return f'{num_bytes / 2 ** 20:.1f} MiB'


def check_fits(record: dict, config, device) -> None:
  """ConfigError, one line, when the step's peak exceeds the memory there is."""
  limit, source = device_memory_bytes(config.device_memory_gb, device)
  if limit is None or record['peak_bytes'] is None or record['peak_bytes'] <= limit:
    return
  raise errors.ConfigError(
      f'the compiled step needs {describe(record["peak_bytes"])} per device (temporaries '
      f'{describe(record["temp_bytes"])}), more than the {describe(limit)} of {source}; lower '
      f'batch_size or set microbatch_size, model.remat, loss.impl=blockwise (docs/scaling.md)')


def write(workdir, record: dict, config, device) -> None:
  """DIR/compiled_step.json: the analysis, with what it was compiled for."""
  limit, _ = device_memory_bytes(config.device_memory_gb, device)
  payload = dict(record, batch_size=config.batch_size, microbatch_size=config.microbatch_size,
                 device_kind=device.device_kind, device_memory_bytes=limit)
  files.write_atomically(workdir / files.COMPILED_STEP_FILE, json.dumps(payload, indent=2))
