"""Peak memory of `jaxcl import` of a published-size checkpoint.

  python benchmarks/import_memory.py [--architecture ViT-B-16]
      [--json benchmarks/import_memory.json]

Builds transformers' CLIPModel at the architecture's published size with
random weights (nothing is downloaded), saves it as a transformers
directory (config.json, model.safetensors, CLIP's BPE vocabulary from
open_clip), and runs `jaxcl import` on it in a fresh process, reporting:

- the weights' size in float32 (the one copy importing should hold);
- the import process's peak RSS (resource.getrusage of the child), and the
  peak RSS of a process that only imports jax and jaxcl's importer (the
  baseline every command pays);
- the checkpoint's size on disk (parameters and AdamW's two moments);
- the wall time of the import.

Prints a table and writes the row as JSON.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from jaxcl import presets


def _child_peak_mb(args) -> tuple[float, float]:
  """(peak RSS in MiB, seconds) of a fresh process running `args`."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  start = time.perf_counter()
  proc = subprocess.run(args, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(proc.stderr[-2000:])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  if peak <= before:
    raise SystemExit('a later child did not exceed an earlier one; run each case alone')
  return peak / 1024, seconds


def _source(directory, name):
  import open_clip
  from transformers import CLIPConfig, CLIPModel
  a = presets.ARCHITECTURES[name]
  cfg = CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=a['text.width'],
                       intermediate_size=a['text.mlp_dim'], num_hidden_layers=a['text.depth'],
                       num_attention_heads=a['text.heads'],
                       max_position_embeddings=a['text.max_length'], hidden_act='quick_gelu'),
      vision_config=dict(hidden_size=a['model.vit.width'], intermediate_size=a['model.vit.mlp_dim'],
                         num_hidden_layers=a['model.vit.depth'],
                         num_attention_heads=a['model.vit.heads'],
                         image_size=a['augment.image_size'], patch_size=a['model.vit.patch_size'],
                         hidden_act='quick_gelu'),
      projection_dim=a['model.embed_dim'])
  model = CLIPModel(cfg)
  model.save_pretrained(directory)
  shutil.copy(open_clip.tokenizer.default_bpe(), os.path.join(directory,
                                                              'bpe_simple_vocab_16e6.txt.gz'))
  return sum(p.numel() for p in model.parameters())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--architecture', default='ViT-B-16')
  parser.add_argument('--json', default='benchmarks/import_memory.json')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    source, output = os.path.join(tmp, 'source'), os.path.join(tmp, 'imported')
    count = _source(source, args.architecture)
    baseline, _ = _child_peak_mb([sys.executable, '-c',
                                  'import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready();'
                                  'from jaxcl.hub import importer'])
    peak, seconds = _child_peak_mb([sys.executable, '-m', 'jaxcl.cli', 'import', source,
                                    '--output', output])
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(output)
                  for f in fs) / 2**20
  row = {'architecture': args.architecture, 'parameters': count,
         'weights_mib': round(count * 4 / 2**20, 1), 'peak_rss_mib': round(peak, 1),
         'baseline_rss_mib': round(baseline, 1), 'checkpoint_mib': round(on_disk, 1),
         'seconds': round(seconds, 1)}
  print('| architecture | parameters | weights (f32) | import peak RSS | jax baseline RSS | '
        'peak - baseline | checkpoint on disk | wall |')
  print('|---|---|---|---|---|---|---|---|')
  print(f"| {row['architecture']} | {count:,} | {row['weights_mib']} MiB "
        f"| {row['peak_rss_mib']} MiB | {row['baseline_rss_mib']} MiB "
        f"| {peak - baseline:.0f} MiB | {row['checkpoint_mib']} MiB | {row['seconds']} s |")
  with open(args.json, 'w') as f:
    json.dump(row, f, indent=2)


if __name__ == '__main__':
  main()
