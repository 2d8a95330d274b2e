"""Training from webdataset shards for real: `jaxcl train` killed with
SIGKILL and resumed ends with the uninterrupted run's parameters, bit for
bit; a job of two processes resumed by one continues the same streams; bad
samples are counted in the metrics and named in the workdir."""

import io
import json
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from PIL import Image

import helpers
from helpers import CLIP_CONFIG, TINY_TWO_TOWER, final_params, jaxcl, tiny_overrides

# Whole runs and a 2-process job: minutes (pytest -m "not slow" leaves them out).
pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """4 training shards of 40 samples (one undecodable) and 1 held-out shard."""
  import webdataset as wds
  folder = tmp_path_factory.mktemp('shards')
  rng = np.random.default_rng(0)
  colors = ['red', 'green', 'blue', 'yellow']
  for name, count in [(f'train-{s:06d}', 40) for s in range(4)] + [('test-000000', 24)]:
    with wds.TarWriter(str(folder / f'{name}.tar')) as writer:
      for i in range(count):
        color = int(rng.integers(4))
        pixels = np.zeros((20, 20, 3), np.uint8) + rng.integers(0, 60, (20, 20, 3), np.uint8)
        pixels[..., color % 3] += 150
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format='JPEG')
        jpeg = out.getvalue() if (name, i) != ('train-000002', 7) else b'broken'
        writer.write({'__key__': f'{name}-{i:03d}', 'jpg': jpeg,
                      'txt': f'a {colors[color]} square', 'cls': str(color)})
  return folder


def _overrides(corpus, **extra):
  values = dict(TINY_TWO_TOWER, **{
      'dataset.name': 'webdataset', 'dataset.urls': f'{corpus}/train-{{000000..000003}}.tar',
      'dataset.eval_urls': f'{corpus}/test-000000.tar', 'dataset.image_size': '16',
      'augment.image_size': '16', 'dataset.streams': '4', 'dataset.workers': '2',
      'dataset.shuffle_buffer': '40', 'total_steps': str(STEPS),
      'checkpoint_every_steps': '4', 'log_every_steps': '4', 'eval_every_steps': '1000'})
  values.update({k: str(v) for k, v in extra.items()})
  return tiny_overrides(values)


@pytest.fixture(scope='module')
def uninterrupted(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  proc = jaxcl('train', '--config', CLIP_CONFIG, '--workdir', str(workdir), *_overrides(corpus),
               devices=2)
  assert '4 shards (samples uncounted), streamed' in proc.stdout
  (workdir.parent / 'uninterrupted.stdout').write_text(proc.stdout)
  return workdir


def _metrics(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r for r in rows if 'loss' in r}


def test_bad_samples_are_counted_and_named(uninterrupted):
  rows = _metrics(uninterrupted)
  # 12 steps x 32 rows read 384 of the 160 samples: the broken one 2 or 3 times.
  assert all(r['skipped_samples'] >= 1 for s, r in rows.items() if s >= 8)
  listed = json.loads((uninterrupted / 'skipped_samples.json').read_text())
  assert listed['skipped'] == rows[STEPS]['skipped_samples']
  # PIL's error in words, without its repr of the in-memory file (`<_io.BytesIO object at`).
  assert listed['first'][0].endswith('train-000002.tar train-000002-007: undecodable image: '
                                     'UnidentifiedImageError: not an image format PIL knows '
                                     '(jpg)'), listed['first'][0]
  evaluated = json.loads((uninterrupted / 'eval.json').read_text())
  assert 0 <= evaluated['i2t_r1'] <= 1  # the held-out shard was read for retrieval
  final = (uninterrupted.parent / 'uninterrupted.stdout').read_text().splitlines()[-1]
  assert final.startswith(f'final (step {STEPS}): ') and final.endswith(
      f'; {listed["skipped"]} bad sample(s) skipped (skipped_samples.json)  -> '
      f'{uninterrupted / "eval.json"}'), final


def test_killed_run_resumes_exactly_from_shards(corpus, uninterrupted, tmp_path):
  workdir = tmp_path / 'run'
  proc = helpers.run_until_checkpoint(workdir, 4, config_file=CLIP_CONFIG,
                                      overrides=_overrides(corpus), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = jaxcl('train', '--config', CLIP_CONFIG, '--workdir', str(workdir),
                  *_overrides(corpus), devices=2)
  assert 'resuming from step' in resumed.stdout
  step, params = final_params(workdir)
  _, reference = final_params(uninterrupted)
  assert step == STEPS
  # Exact: the streams went on from the positions saved with the checkpoint.
  jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_two_processes_then_one_continue_the_same_streams(corpus, uninterrupted, tmp_path):
  """A 2-process job killed mid-run, resumed by one process (about 60 s):
  the shard streams' saved positions must carry over to another process
  count, which only real processes reading real shards show."""
  workdir = tmp_path / 'run'
  procs = helpers.start_job(
      ['train', '--config', CLIP_CONFIG, '--workdir', str(workdir), *_overrides(corpus)],
      devices=1, output=lambda i: dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True))
  try:  # killed once they have a checkpoint before the end
    deadline = time.monotonic() + helpers.CHECKPOINT_WAIT_S
    while helpers.newest_checkpoint(workdir) is None:
      assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
      assert time.monotonic() < deadline, 'no checkpoint from the 2-process job'
      time.sleep(0.05)
  finally:
    for p in procs:
      p.kill()
      p.wait()
  stopped = helpers.newest_checkpoint(workdir)
  assert stopped < STEPS
  resumed_run = jaxcl('train', '--config', CLIP_CONFIG, '--workdir', str(workdir),
                      *_overrides(corpus), devices=2)
  assert f'resuming from step {stopped}' in resumed_run.stdout
  one, resumed = _metrics(uninterrupted), _metrics(workdir)
  assert sorted(one) == sorted(resumed) == [4, 8, 12]
  # The same samples at every step (two processes sum in another order than
  # one: each value close relative to itself, as in test_multiprocess).
  helpers.assert_close({s: (r['loss'], r['grad_norm']) for s, r in resumed.items()},
                       {s: (r['loss'], r['grad_norm']) for s, r in one.items()},
                       rtol=2e-5, what='step')
  assert resumed[STEPS]['skipped_samples'] == one[STEPS]['skipped_samples']
  # And the end: the parameters after the same samples (other batches would
  # move them by far more than the summation order does).
  _, params = final_params(workdir)
  _, reference = final_params(uninterrupted)
  helpers.assert_close(params, reference, rtol=1e-3, what='params')


def test_shards_and_workdir_on_gcs_train_as_on_local_disk(corpus, uninterrupted, gcs_dir):
  """The same shards read from gs:// (a local GCS server), the run's files
  written there: the uninterrupted local run's parameters, bit for bit."""
  shards = gcs_dir / 'shards'
  for path in corpus.iterdir():
    (shards / path.name).write_bytes(path.read_bytes())
  workdir = gcs_dir / 'run'
  jaxcl('train', '--config', CLIP_CONFIG, '--workdir', str(workdir), *_overrides(
      corpus, **{'dataset.urls': f'{shards}/train-{{000000..000003}}.tar',
                 'dataset.eval_urls': f'{shards}/test-000000.tar'}), devices=2)
  _, expected = final_params(uninterrupted)
  step, params = final_params(workdir)
  assert step == STEPS
  jax.tree.map(np.testing.assert_array_equal, params, expected)
