"""The largest batch per device whose compiled train step fits 16, 40 and 80 GB.

  python benchmarks/max_batch.py [--models clip_b16,siglip_b16] [--budgets_gb 16,40,80]
      [--losses dense,blockwise] [--microbatch_sizes 0,256] [--remats none,full]
      [--json benchmarks/max_batch.json] [--nomoonshot]

For the published ViT-B/16 CLIP towers at 224 px (open_clip's ViT-B-16, a
49,408-token text table) and SigLIP B/16 (ViT-B-16-SigLIP, 32,000 tokens),
in bfloat16 activations with AdamW, on one device, for each loss (dense,
blockwise), microbatch size (off, 256) and remat (none, full): the step is
compiled (never run: nothing is allocated, so this runs on a CPU) and XLA's
memory analysis gives its peak bytes (jaxcl.trainer.step_memory). Peak memory is
close to linear in the batch N (the towers' activations; the dense loss's
N x N float32 logits are 17 MB at N = 2,048), so it is compiled at two batch
sizes, fitted by a line, and solved for each budget; the 80 GB answer is
checked by compiling there (and bisected down until it fits), the smaller
budgets' answers are the line's.

The memory at the largest batch is split into the state (parameters and
AdamW's moments), the batch, the loss (its own compiled value-and-gradient
on N embeddings: the logits) and the rest, the towers (activations and
gradients). Figures are XLA's CPU buffer assignment; a GPU's or TPU's
compiler fuses and schedules differently, so treat them as estimates of
what a device would need, and check with compiled_step.json there.

--moonshot: a 65,536-pair ViT-B/16 CLIP step (microbatches of 512, blockwise
loss, remat full, bfloat16 first moment) against one 80 GB device.
"""

import json
import sys
import time

import jax
import numpy as np
from absl import app, flags

from jaxcl import losses, parallel
from jaxcl.config import config_files, recipes
from jaxcl.trainer import step_memory, synthetic, train_step, validation

_MODELS = flags.DEFINE_string('models', 'clip_b16,siglip_b16', 'Comma-separated models.')
_BUDGETS = flags.DEFINE_string('budgets_gb', '16,40,80', 'Device memories, GB (1e9 bytes).')
_JSON = flags.DEFINE_string('json', 'benchmarks/max_batch.json', 'Where to write the rows.')
_MOONSHOT = flags.DEFINE_bool('moonshot', True, 'Also compile the 64k-batch CLIP step.')

MODELS = {'clip_b16': ('configs/clip_vit_b16.py', 'ViT-B-16'),
          'siglip_b16': ('configs/siglip_vit_b16.py', 'ViT-B-16-SigLIP'),
          # SigLIP 2's recipe on it: the decoder, and the EMA teacher's terms (on: start_step 0)
          'siglip2_b16_recipe': ('configs/siglip2_b16.py', 'ViT-B-16-SigLIP',
                                 {'self_distill.start_step': 0}),
          # SigLIP 2 B/16 NaFlex: the 16 x 16 learned grid (256 px) at three patch budgets
          **{f'siglip2_b16_naflex{n}': ('configs/siglip_vit_b16.py', 'ViT-B-16-SigLIP2-256',
                                        {'dataset.resolution': 'naflex',
                                         'dataset.max_patches': (n,),
                                         'dataset.name': 'captioned_shapes_flex'})
             for n in (256, 576, 1024)}}
_LOSSES = flags.DEFINE_string('losses', 'dense,blockwise', 'Comma-separated loss.impl values.')
_MICROBATCHES = flags.DEFINE_string('microbatch_sizes', '0,256', 'Comma-separated; 0: off.')
_REMATS = flags.DEFINE_string('remats', 'none,full', 'Comma-separated model.remat values.')
GB = 1e9


def model_config(model: str):
  path, architecture, *overrides = MODELS[model]
  config = config_files.load(path)
  recipes.architecture(config, architecture)
  config.model.dtype = 'bfloat16'
  for values in overrides:
    config.update_from_flattened_dict(values)
  return config


def variant_config(model, variant, batch_size, **extra):
  config = model_config(model)
  config.batch_size = batch_size
  config.loss.update(impl=variant['loss'], block_size=1024)
  config.microbatch_size = variant['microbatch_size']
  # Scanned layers (one compiled block per tower) keep each compile to seconds; remat
  # scans anyway, and on the CPU the unrolled towers measured 5% less (tests/test_remat_scan).
  config.model.update(remat=variant['remat'], scan_layers=True)
  for key, value in extra.items():
    config.update_from_flattened_dict({key: value})
  checked = config.copy_and_resolve_references()
  # synthetic.tokenizer stands in for the vocabulary file and its text normalization
  checked.text.update(tokenizer='bytes', normalize='', pad_id=-1)
  validation.validate(checked, num_devices=1, process_count=1, check_data=False)
  return config


def compiled_memory(config) -> dict:
  """step_memory.analysis of the config's step on one device, and the parts."""
  exp = synthetic.setup(config, devices=jax.devices()[:1])
  t0 = time.perf_counter()
  record = step_memory.analysis(train_step.compile_step(exp), exp, with_flops=False)
  record['compile_s'] = round(time.perf_counter() - t0, 1)
  state = exp.abstract_state()
  record['state_bytes'] = parallel.bytes_per_device((state.params, state.opt_state))
  record['batch_bytes'] = parallel.bytes_per_device(train_step.abstract_batch(exp))
  record['loss_bytes'] = loss_memory(exp)
  return record


def loss_memory(exp) -> int:
  """Temporaries of the loss's value and gradient alone, on N embeddings."""
  n, d = exp.config.batch_size, exp.config.model.embed_dim
  method, config = exp.method, exp.config
  embeddings = jax.ShapeDtypeStruct((n, d), np.float32)

  def loss(a, b):
    options = losses.LossOptions(impl=config.loss.impl, block_size=config.loss.block_size)
    return method.loss(a, b, np.float32(0.07), np.float32(-10.0), options).loss

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(embeddings,
                                                                       embeddings).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def largest_batches(model, variant, budgets) -> list[dict]:
  """For each budget, the largest batch (a multiple of the microbatch, or of
  16) whose compiled step fits. Peak bytes are fitted by a line through
  compiles at two batch sizes and solved per budget. Each answer is checked
  by compiling there; where it does not fit, a bisection between the
  largest batch known to fit and it finds the largest that does (to 2%).
  Where the line's answer fits it stands: a batch that fits, within what the
  line says (the towers grow linearly; only the dense loss's N² logits bend
  it, and they make the line overshoot). 'checked' False: none fits."""
  multiple = variant['microbatch_size'] or 16
  sizes = [multiple * 2, multiple * 8]
  records = {}

  def record_at(n):
    if n not in records:
      records[n] = compiled_memory(variant_config(model, variant, n))
    return records[n]

  def fits(n, budget):
    return record_at(n)['peak_bytes'] <= budget * GB

  for n in sizes:
    record_at(n)
  line = {k: np.polyfit(sizes, [records[n][k] for n in sizes], 1)
          for k in ('peak_bytes', 'temp_bytes', 'loss_bytes', 'batch_bytes')}
  slope, intercept = line['peak_bytes']
  rows, ceiling = [], None
  for budget in sorted(budgets, reverse=True):
    # (none fits where the line is above the budget at every batch: a negative n)
    n = max(int((budget * GB - intercept) / slope) // multiple * multiple, 0) if slope > 0 else 0
    if ceiling is not None:  # a smaller memory never fits a larger batch
      n = min(n, ceiling)
    if n and not fits(n, budget):  # the line overshot (the dense loss grows as N²): bisect
      low, high = max((m for m in records if m < n and fits(m, budget)), default=0), n
      while high - low > max(multiple, 0.02 * high):
        middle = (low + high) // 2 // multiple * multiple
        if middle <= low:
          break
        low, high = (middle, high) if fits(middle, budget) else (low, middle)
      n = low
    record, checked = (records[n], True) if n else (records[sizes[0]], False)
    ceiling = n
    rows.append(dict(model=model, budget_gb=budget, **variant, batch_size=n, checked=checked,
                     **{k: record[k] for k in ('peak_bytes', 'temp_bytes', 'state_bytes',
                                               'batch_bytes', 'loss_bytes', 'compile_s')}))
    print(_line(rows[-1]), flush=True)
  return rows


def _line(row) -> str:
  towers = row['peak_bytes'] - row['state_bytes'] - row['batch_bytes'] - row['loss_bytes']
  batch = f"{row['batch_size']:,}" if row['batch_size'] else 'none fits'
  return (f"| {row['model']} | {row['budget_gb']} | {row['loss']} | "
          f"{row['microbatch_size'] or 'off'} | {row['remat']} | {batch} | "
          f"{row['peak_bytes'] / GB:.1f} | {towers / GB:.1f} | {row['loss_bytes'] / GB:.2f} | "
          f"{row['state_bytes'] / GB:.2f} | {row['batch_bytes'] / GB:.2f} |")


def main(argv):
  del argv
  budgets = [float(b) for b in _BUDGETS.value.split(',')]
  print('| model | GB | loss | microbatch | remat | max batch | peak GB | towers GB | '
        'loss GB | params+opt GB | batch GB |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  rows = []
  variants = [dict(loss=loss, microbatch_size=int(m), remat=r)
              for loss in _LOSSES.value.split(',') for m in _MICROBATCHES.value.split(',')
              for r in _REMATS.value.split(',')]
  result = {'device': jax.devices()[0].device_kind, 'rows': rows}
  for model in _MODELS.value.split(','):
    for variant in variants:
      rows += largest_batches(model, variant, budgets)
      with open(_JSON.value, 'w') as f:  # after every variant: a long run keeps what it has
        json.dump(result, f, indent=2)
  if _MOONSHOT.value:
    variant = dict(loss='blockwise', microbatch_size=512, remat='full')
    record = compiled_memory(variant_config('clip_b16', variant, 65_536,
                                            **{'optimizer.mu_dtype': 'bfloat16'}))
    result['moonshot'] = dict(model='clip_b16', batch_size=65_536, **variant,
                              mu_dtype='bfloat16', **record)
    fits = 'fits' if record['peak_bytes'] <= 80 * GB else 'does not fit'
    print(f"moonshot: CLIP ViT-B/16, batch 65,536 on one device: peak "
          f"{record['peak_bytes'] / GB:.1f} GB ({fits} 80 GB)")
  with open(_JSON.value, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {_JSON.value}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
