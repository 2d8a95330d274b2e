"""Export round trip: the artifact, loaded in a fresh process that has only jax
and numpy, gives the trained encoder's L2-normalized embeddings."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import DIGITS_CONFIG, RUN_STEPS, copy_without_dataset, jaxcl, tiny_overrides
from jaxcl import data, models
from jaxcl.trainer import trained

LOADER = r'''
import sys
import jax, numpy as np
images = np.load(sys.argv[2])
with open(sys.argv[1], 'rb') as f:
  embed = jax.export.deserialize(f.read())
out = np.asarray(embed.call(images))
np.save(sys.argv[3], out)
small = np.asarray(embed.call(images[:3]))  # another batch size, same artifact
np.testing.assert_allclose(small, out[:3], rtol=1e-5, atol=1e-6)
assert 'jaxcl' not in sys.modules, 'the loader must not need jaxcl'
print('ok', out.shape, out.dtype)
'''


@pytest.mark.slow  # a whole CLI run and export
def test_export_round_trip(uninterrupted, tmp_path):
  workdir = uninterrupted
  artifact = tmp_path / 'out' / 'encoder.jaxexport'
  proc = jaxcl('export', '--workdir', str(workdir), '--output', str(artifact))
  assert 'wrote' in proc.stdout
  meta = json.loads(open(f'{artifact}.json').read())
  assert meta['input'] == {**meta['input'], 'shape': ['b', 8, 8, 1], 'dtype': 'uint8'}
  assert meta['output']['dtype'] == 'float32' and meta['step'] == RUN_STEPS
  assert meta['config_name'] == 'simclr_digits'

  exp, state = trained.load_trained(str(workdir))
  source, _ = data.load_source(exp.config.dataset, 'test')
  images = np.stack([source[i]['image'] for i in range(10)])
  expected = np.asarray(models.l2_normalize(
      jax.jit(exp.embed)(state.params, state.batch_stats, images)))
  assert meta['output']['shape'] == ['b', expected.shape[1]]

  np.save(tmp_path / 'images.npy', images)
  run = subprocess.run([sys.executable, '-c', LOADER, str(artifact), str(tmp_path / 'images.npy'),
                        str(tmp_path / 'out.npy')], capture_output=True, text=True,
                       cwd=tmp_path)  # outside the repo: jaxcl is not importable by path
  assert run.returncode == 0, run.stderr
  got = np.load(tmp_path / 'out.npy')
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a whole CLI run and export
def test_export_needs_no_dataset(uninterrupted, tmp_path):
  """What export needs of the data is saved in the workdir: with the dataset
  gone, it writes the same artifact (the same embeddings, the same FILE.json)."""
  workdir = uninterrupted
  with_data, without = tmp_path / 'a' / 'enc.jaxexport', tmp_path / 'b' / 'enc.jaxexport'
  jaxcl('export', '--workdir', str(workdir), '--output', str(with_data))
  moved = copy_without_dataset(workdir, tmp_path / 'moved')
  jaxcl('export', '--workdir', str(moved), '--output', str(without))
  assert not (moved / 'deleted-tfds').exists()  # not even prepared again: no data opened
  assert open(f'{with_data}.json').read() == open(f'{without}.json').read()
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  outputs = [np.asarray(jax.export.deserialize(path.read_bytes()).call(images))
             for path in (with_data, without)]
  np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.slow  # a whole CLI run and export
def test_export_with_predicted_temperature(uninterrupted, tmp_path):
  """--with_temperature: the image embedder also returns τ(x), the run's
  predicted temperature of each image as an anchor (SimCLR: read from the
  projection head's output)."""
  workdir = tmp_path / 'run'
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(),
        '--config.total_steps=6', '--config.log_every_steps=3',
        '--config.temperature.mode=predicted',
        '--config.temperature.min=0.05', '--config.temperature.max=0.9',
        '--config.optimizer.warmup_steps=0')
  artifact = tmp_path / 'out' / 'encoder.jaxexport'
  jaxcl('export', '--workdir', str(workdir), '--output', str(artifact), '--with_temperature')
  meta = json.loads(open(f'{artifact}.json').read())
  assert meta['output_temperature']['shape'] == ['b']
  images = np.random.default_rng(1).integers(0, 256, (7, 8, 8, 1), dtype=np.uint8)
  embeddings, tau = jax.export.deserialize(artifact.read_bytes()).call(images)
  exp, state = trained.load_trained(str(workdir))
  want = jax.jit(exp.predicted_temperature)(state.params, state.batch_stats, images)
  np.testing.assert_allclose(np.asarray(tau), np.asarray(want), rtol=1e-5)
  assert np.all((np.asarray(tau) > 0.05) & (np.asarray(tau) < 0.9))
  assert len(np.unique(np.asarray(tau))) > 1  # trained: no longer init for every image
  assert embeddings.shape == (7, meta['embedding_size'])
  refused = jaxcl('export', '--workdir', str(uninterrupted), '--output',
                  str(tmp_path / 'x.jaxexport'), '--with_temperature', check=False)
  assert refused.returncode == 2 and 'temperature.mode=learnable' in refused.stderr
