"""Webdataset shards: the tar format against the `webdataset` package's own
writer and reader, the streams' determinism (worker processes, process
counts, resume from saved positions), epochs and shuffling, bad samples of
each kind, `jaxcl shard`, and the same first batch as the TFDS path."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import helpers
from jaxcl import config as config_lib, data as data_lib, errors
from jaxcl.data import decode, shard_sources, shard_writer, shards, stream
from jaxcl.text import tokenizers
from jaxcl.trainer import validation
from jaxcl.workdir import run_files

SHARDS, PER_SHARD = 4, 24


def _image_bytes(rng, fmt, size=(12, 14)):
  out = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(out, format=fmt)
  return out.getvalue()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """4 shards of 24 samples (PNG or JPEG, caption, class) by webdataset's TarWriter."""
  import webdataset as wds
  folder = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  for s in range(SHARDS):
    with wds.TarWriter(str(folder / f'shard-{s:06d}.tar')) as writer:
      for i in range(PER_SHARD):
        n = s * PER_SHARD + i
        fmt = 'PNG' if n % 2 else 'JPEG'
        writer.write({'__key__': f'{n:06d}', fmt.lower().replace('jpeg', 'jpg'):
                      _image_bytes(rng, fmt), 'txt': f'sample {n}', 'cls': str(n % 3)})
  return folder


def _urls(folder, prefix='shard', count=SHARDS):
  return f'{folder}/{prefix}-{{000000..{count - 1:06d}}}.tar'


def _mixture(folder, *, streams=4, window=6, fmt=None, urls=None):
  component = stream.ShardComponent('shards', tuple(shards.expand_urls(urls or _urls(folder))),
                                    fmt or decode.SampleFormat(image_size=8), window)
  return stream.Mixture((component,), (1.0,), streams, seed=3, with_text=True)


def _batches(folder, steps, *, streams=4, window=6, batch=8, process_index=0, process_count=1,
             positions=None, workers=0, fmt=None):
  it = stream.StreamBatches(_mixture(folder, streams=streams, window=window, fmt=fmt),
                            batch_size=batch, process_index=process_index,
                            process_count=process_count,
                            positions=stream.start_positions(streams) if positions is None
                            else positions, workers=workers)
  try:
    return [next(it) for _ in range(steps)], it.positions
  finally:
    it.close()


def _same(a, b):
  return (np.array_equal(a['image'], b['image']) and np.array_equal(a['label'], b['label'])
          and a['captions'] == b['captions'])


def test_expand_urls_braces_and_sources():
  assert shards.expand_urls('a/s-{00..02}.tar::b/{x,y}.tar') == [
      'a/s-00.tar', 'a/s-01.tar', 'a/s-02.tar', 'b/x.tar', 'b/y.tar']
  assert shards.split_name('dir/0001.seg.jpg') == ('dir/0001', 'seg.jpg')
  assert shards.split_name('noextension') is None


def test_reader_reads_what_webdataset_wrote(corpus):
  samples = list(shards.read_samples(str(corpus / 'shard-000001.tar')))
  assert [s['__key__'] for s in samples] == [f'{n:06d}' for n in range(24, 48)]
  assert samples[3]['txt'] == b'sample 27' and samples[3]['cls'] == b'0'
  assert Image.open(io.BytesIO(samples[3]['png'])).size == (14, 12)
  # From an offset: the same samples, without the first ones.
  assert [s['__key__'] for s in shards.read_samples(str(corpus / 'shard-000001.tar'), skip=20)
          ] == [f'{n:06d}' for n in range(44, 48)]


def test_webdataset_reads_what_jaxcl_wrote(tmp_path):
  import webdataset as wds
  writer = shards.ShardWriter(tmp_path, max_bytes=3000, prefix='train')
  for n in range(10):
    writer.write({'__key__': f'{n:04d}', 'jpg': bytes([n]) * 500, 'txt': f'caption {n}'})
  writer.close()
  assert sum(writer.written.values()) == 10 and len(writer.written) > 1
  urls = sorted(str(tmp_path / name) for name in writer.written)
  read = list(wds.WebDataset(urls, shardshuffle=False))
  assert [r['__key__'] for r in read] == [f'{n:04d}' for n in range(10)]
  assert [r['txt'] for r in read] == [f'caption {n}'.encode() for n in range(10)]
  assert read[7]['jpg'] == bytes([7]) * 500
  assert not list(tmp_path.glob('.*.tmp'))  # every shard completed and renamed


def test_one_epoch_reads_every_sample_once_shuffled(corpus):
  # 4 streams x 2 rows x 12 steps = 96 = the corpus: windows of 6 divide each
  # stream's 24 samples, so the first 12 steps are exactly epoch 0.
  batches, _ = _batches(corpus, 24)
  first = [c for b in batches[:12] for c in b['captions']]
  assert sorted(first) == sorted(f'sample {n}' for n in range(96))
  second = [c for b in batches[12:] for c in b['captions']]
  assert sorted(second) == sorted(first)
  assert first != sorted(first, key=lambda c: int(c.split()[1]))  # shuffled within windows
  assert first != second  # and anew each epoch (another shard order, other windows)
  labels = np.concatenate([b['label'] for b in batches])
  captions = [c for b in batches for c in b['captions']]
  assert all(int(c.split()[1]) % 3 == label for c, label in zip(captions, labels))


def test_worker_processes_give_the_same_batches(corpus):
  alone, _ = _batches(corpus, 10)
  workers, _ = _batches(corpus, 10, workers=2)
  assert all(_same(a, b) for a, b in zip(alone, workers))


def test_processes_split_the_global_batch_and_resume_on_another_count(corpus):
  whole, _ = _batches(corpus, 20)
  halves = [_batches(corpus, 20, process_index=p, process_count=2)[0] for p in range(2)]
  for k, batch in enumerate(whole):
    joined = {key: np.concatenate([halves[0][k][key], halves[1][k][key]])
              for key in ('image', 'label')}
    assert np.array_equal(joined['image'], batch['image'])
    assert halves[0][k]['captions'] + halves[1][k]['captions'] == batch['captions']
  # Positions after 7 steps of one process: two processes go on from there.
  _, positions = _batches(corpus, 7)
  resumed = [_batches(corpus, 13, process_index=p, process_count=2, positions=positions)[0]
             for p in range(2)]
  for k in range(13):
    assert resumed[0][k]['captions'] + resumed[1][k]['captions'] == whole[7 + k]['captions']
  # And one process from two processes' positions.
  halves_positions = [_batches(corpus, 7, process_index=p, process_count=2)[1] for p in range(2)]
  again, _ = _batches(corpus, 13, positions=np.concatenate(halves_positions))
  assert all(_same(a, b) for a, b in zip(again, whole[7:]))


def _write_tar(path, members):
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_bad_samples_of_each_kind_are_skipped_counted_and_named(tmp_path):
  rng = np.random.default_rng(1)
  good = lambda n: [(f'{n}.jpg', _image_bytes(rng, 'JPEG')), (f'{n}.txt', f'good {n}'.encode())]
  members = good('g0') + [
      ('undecodable.jpg', b'not an image'), ('undecodable.txt', b'x'),
      ('noimage.txt', b'caption without an image'),
      ('nocaption.jpg', _image_bytes(rng, 'JPEG')),
      ('emptycaption.jpg', _image_bytes(rng, 'JPEG')), ('emptycaption.txt', b'   '),
      ('badlabel.jpg', _image_bytes(rng, 'JPEG')), ('badlabel.txt', b'y'), ('badlabel.cls', b'x'),
      ('notutf8.jpg', _image_bytes(rng, 'JPEG')), ('notutf8.txt', b'\xff\xfe'),
      ('tiny.png', _image_bytes(rng, 'PNG', (1, 1))), ('tiny.txt', b'z'),
  ] + good('g1')
  _write_tar(tmp_path / 'part-0.tar', members)
  # A shard cut off in the middle of a member: its whole samples come first.
  _write_tar(tmp_path / 'whole.tar', good('g2') + good('g3'))
  data = (tmp_path / 'whole.tar').read_bytes()
  (tmp_path / 'part-1.tar').write_bytes(data[:2048 + 1024])
  (tmp_path / 'whole.tar').unlink()
  fmt = decode.SampleFormat(image_size=16)  # 1x1 px is under 1/8 of it
  # window 1: file order, one epoch per batch
  mixture = _mixture(None, streams=1, window=1, fmt=fmt, urls=f'{tmp_path}/part-{{0..1}}.tar')
  it = stream.StreamBatches(mixture, batch_size=3, process_index=0, process_count=1,
                            positions=stream.start_positions(1))
  assert sorted(next(it)['captions']) == ['good g0', 'good g1', 'good g2']
  next(it)  # past the shard that ends early, whichever of the two came first
  bad = '\n'.join(it.bad)
  for where, why in [('undecodable', 'undecodable image: UnidentifiedImageError: not an image '
                                     'format PIL knows (jpg)'), ('noimage', 'no image (jpg, png'),
                     ('nocaption', 'no caption (txt)'), ('emptycaption', 'empty caption (txt)'),
                     ('badlabel', 'label (cls) is not an integer'),
                     ('notutf8', 'caption (txt) is not UTF-8'), ('tiny', 'wrongly sized image'),
                     ('part-1.tar after g2', 'truncated or corrupt: ReadError: unexpected end of '
                                             'data; counted as 1 bad sample')]:
    assert any(where in line and why in line for line in it.bad), (where, why, bad)
  assert all(line.startswith(str(tmp_path)) for line in it.bad)
  read, skipped, rows = it.counts()[:, 0]
  assert rows == 6 and read == skipped + rows and skipped == len(it.bad) >= 8
  # The run stops once more than max_bad_fraction of all samples read are
  # bad (decided on every process's counts), naming the first; 8 of 11 here.
  while it.counts()[0, 0] < stream.MIN_SAMPLES_FOR_BAD_FRACTION:
    next(it)
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  metrics, stop = run_files.stream_metrics(workdir, it, max_bad_fraction=0.8)
  assert stop is None and metrics['skipped_samples'] == it.counts()[1, 0]
  listed = json.loads((workdir / 'skipped_samples.json').read_text())
  assert listed['skipped'] == it.counts()[1, 0] and listed['first'] == it.bad
  _, stop = run_files.stream_metrics(workdir, it, max_bad_fraction=0.5)
  assert stop.startswith(f'{it.counts()[1, 0]} of the {it.counts()[0, 0]} samples read are bad, '
                         f'more than dataset.max_bad_fraction=0.5') and it.bad[0] in stop
  # Nothing usable at all (the captions under another key): one line, not a hang.
  wrong_key = decode.SampleFormat(image_size=16, text_key='caption')
  mixture = _mixture(None, streams=1, window=9, fmt=wrong_key, urls=str(tmp_path / 'part-0.tar'))
  it = stream.StreamBatches(mixture, batch_size=1, process_index=0, process_count=1,
                            positions=stream.start_positions(1))
  with pytest.raises(errors.DatasetError, match=r'the last 1000 samples read were all bad '
                     r'\(shards\); the last: .*part-0.tar .*: no (caption \(caption\)|image)'):
    next(it)


def test_fewer_shards_than_streams_is_refused(corpus):
  """Two streams starting on one shard would put the same rows twice in a batch."""
  cfg = config_lib.base_config().dataset
  cfg.update(name='webdataset', urls=_urls(corpus), image_size=8)
  stream_source = shard_sources.Stream(cfg, False, [shard_sources.shard_component(
      cfg, False, cfg.urls, 'dataset.urls')], [1.0])
  assert stream_source.default_streams(batch_size=64, process_count=1) == 4  # not 64
  assert stream_source.default_streams(batch_size=64, process_count=2) == 4
  cfg.streams = 8
  with pytest.raises(errors.ConfigError, match='8 data streams read 4 shards: .* at most 4'):
    stream_source.batches(batch_size=64, seed=0, process_index=0, process_count=1)


def test_a_missing_shard_is_named(tmp_path, corpus):
  with pytest.raises(errors.DatasetError,
                     match=r'cannot open shard .*shard-000004.tar \(dataset.urls\): no such file$'):
    shards.check_shards(shards.expand_urls(_urls(corpus, count=10)), 'dataset.urls')
  with pytest.raises(errors.DatasetError, match='cannot open shard .*nowhere'):
    shards.check_shards([str(tmp_path / 'nowhere' / 'a.tar')], 'dataset.urls')


def _unreadable_shards(folder, corpus):
  """Beside two good shards: a folder, random bytes, an empty tar, an empty
  file and a tar cut off in its first member, each named as .tar."""
  for s in range(2):
    (folder / f'good-{s}.tar').write_bytes((corpus / f'shard-00000{s}.tar').read_bytes())
  (folder / 'folder.tar').mkdir()
  (folder / 'random.tar').write_bytes(np.random.default_rng(5).bytes(30000))
  _write_tar(folder / 'empty.tar', [])
  (folder / 'zero.tar').write_bytes(b'')
  (folder / 'cut.tar').write_bytes((corpus / 'shard-000000.tar').read_bytes()[:1500])
  return [str(folder / f'{name}.tar') for name in
          ('good-0', 'folder', 'random', 'good-1', 'empty', 'zero', 'cut')]


def test_unreadable_shards_are_named_together_before_the_run(tmp_path, corpus):
  paths = _unreadable_shards(tmp_path, corpus)
  with pytest.raises(errors.DatasetError) as raised:
    shards.check_readable(paths, 'dataset.urls')
  assert str(raised.value) == (
      f'5 of the 7 shards of dataset.urls cannot be read: {tmp_path}/folder.tar (a folder), '
      f'{tmp_path}/random.tar (not a tar file: ReadError: invalid header), {tmp_path}/empty.tar '
      f'(no sample) and 2 more; remove them from dataset.urls')
  assert [shards.first_sample_problem(p) for p in paths[-2:]] == [
      'not a tar file: ReadError: empty file',
      'truncated or corrupt: ReadError: truncated header']
  shards.check_readable([paths[0], paths[3]], 'dataset.urls')  # good ones pass


def test_a_read_that_fails_once_is_tried_again(tmp_path, corpus):
  """A real, passing read error: a unix socket at the shard's path (open()
  fails with ENXIO, as a flaky network file system's EIO would), replaced
  by the shard 0.1 s later. One failed read must not refuse the run; one
  that keeps failing still names the shard."""
  flaky, good = tmp_path / 'flaky.tar', tmp_path / 'good.tar'
  good.write_bytes((corpus / 'shard-000000.tar').read_bytes())
  with socket.socket(socket.AF_UNIX) as sock:
    sock.bind(str(flaky))
    assert shards.first_sample_problem(str(flaky)).startswith(
        'OSError: [Errno 6] No such device or address')  # after READ_TRIES reads
    replace = threading.Timer(0.1, os.replace, (good, flaky))
    replace.start()
    try:
      shards.check_readable([str(flaky)], 'dataset.urls')
    finally:
      replace.join()


def test_many_shards_are_checked_with_a_progress_line(corpus, monkeypatch, capsys):
  """Thousands of shards on an object store take a while: the check says
  how far it got (here from 1 shard, every 0 s), on stderr only."""
  monkeypatch.setattr(shards, 'PROGRESS_FROM', 1)
  monkeypatch.setattr(shards, 'PROGRESS_EVERY_S', 0.0)
  shards.check_readable(shards.expand_urls(_urls(corpus)), 'dataset.urls')
  out, err = capsys.readouterr()
  assert not out and err.splitlines()[-1].startswith(
      f'jaxcl: checked {SHARDS} of the {SHARDS} shards of dataset.urls (')


def test_unreadable_shards_on_gcs_are_named_alike(tmp_path, corpus, gcs_dir):
  """The same check through epath's gs:// (a local GCS server): a folder
  there is a prefix with objects under it."""
  local = _unreadable_shards(tmp_path, corpus)
  (tmp_path / 'folder.tar' / 'inside.txt').write_text('an object under the prefix')
  helpers.upload_tree(tmp_path, gcs_dir)
  with pytest.raises(errors.DatasetError) as raised:
    shards.check_readable([p.replace(str(tmp_path), str(gcs_dir)) for p in local], 'dataset.urls')
  assert str(raised.value) == (
      f'5 of the 7 shards of dataset.urls cannot be read: {gcs_dir}/folder.tar (a folder), '
      f'{gcs_dir}/random.tar (not a tar file: ReadError: invalid header), {gcs_dir}/empty.tar '
      f'(no sample) and 2 more; remove them from dataset.urls')


def test_a_shard_of_random_bytes_counts_as_its_samples(tmp_path, corpus):
  """Met mid-run (corrupted after the check), a shard that is no tar counts
  as the samples its size holds at the good shards' samples per byte, or
  as sizes.json declares; so half the shards bad stops the run."""
  for s in range(SHARDS):
    data = (corpus / f'shard-{s:06d}.tar').read_bytes()
    if s % 2:  # as large as a good shard: it stands for as many samples
      data = np.random.default_rng(s).bytes(len(data))
    (tmp_path / f'shard-{s:06d}.tar').write_bytes(data)
  it = stream.StreamBatches(_mixture(None, streams=2, window=6, urls=_urls(tmp_path)),
                            batch_size=8, process_index=0, process_count=1,
                            positions=stream.start_positions(2))
  while it.counts()[0, 0] < stream.MIN_SAMPLES_FOR_BAD_FRACTION:
    next(it)
  bad = [line for line in it.bad if 'shard-00000' in line and ' 0' not in line.split('.tar')[1]]
  assert bad[0].endswith('.tar: not a tar file: ReadError: invalid header; counted as '
                         f'{PER_SHARD} bad samples'), it.bad
  read, skipped, rows = it.counts()[:, 0]
  assert skipped == PER_SHARD * len(bad) and read == skipped + rows
  (tmp_path / 'workdir').mkdir()
  _, stop = run_files.stream_metrics(tmp_path / 'workdir', it, max_bad_fraction=0.05)
  assert stop is not None and 'not a tar file' in stop
  it.close()
  declared = tmp_path / 'declared'  # a folder whose sizes.json counts its shards
  declared.mkdir()
  (declared / 'bad.tar').write_bytes((tmp_path / 'shard-000001.tar').read_bytes())
  (declared / 'sizes.json').write_text(json.dumps({'bad.tar': 30}))
  assert shards.estimated_samples(str(declared / 'bad.tar'), (str(declared / 'bad.tar'),)) == 30


@pytest.mark.parametrize('streams', [1, 2])
def test_an_empty_shard_counts_alike_for_any_number_of_streams(tmp_path, corpus, streams):
  """One empty tar beside a good shard (emptied after the check): each
  stream skips it and counts it, instead of stopping with 'no sample in
  any of the 2 shards' when its share of the epochs met it in a row."""
  (tmp_path / 'shard-000000.tar').write_bytes((corpus / 'shard-000000.tar').read_bytes())
  _write_tar(tmp_path / 'shard-000001.tar', [])
  mixture = _mixture(None, streams=streams, window=4, urls=_urls(tmp_path, count=2))
  it = stream.StreamBatches(mixture, batch_size=4, process_index=0, process_count=1,
                            positions=stream.start_positions(streams))
  captions = [c for _ in range(40) for c in next(it)['captions']]
  it.close()
  assert {int(c.split()[1]) for c in captions} == set(range(PER_SHARD))  # the good shard's
  read, skipped, rows = it.counts()[:, 0]
  assert rows == 160 and skipped > 0 and read == skipped + rows
  assert all(line.endswith('shard-000001.tar: no sample; counted as 1 bad sample')
             for line in it.bad)


def test_random_crop_is_seeded_by_the_position(corpus):
  fmt = decode.SampleFormat(image_size=8, crop='random', crop_scale=(0.3, 0.6))
  a, _ = _batches(corpus, 3, fmt=fmt)
  b, _ = _batches(corpus, 3, fmt=fmt)
  center, _ = _batches(corpus, 3)
  assert all(_same(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0]['image'], center[0]['image'])


def test_jaxcl_shard_writes_pairs_and_folders(tmp_path):
  import webdataset as wds
  rng = np.random.default_rng(2)
  images = tmp_path / 'images'
  (images / 'cat').mkdir(parents=True)
  (images / 'dog').mkdir()
  jpeg = _image_bytes(rng, 'JPEG', (20, 20))
  (images / 'cat' / 'a.jpg').write_bytes(jpeg)
  (images / 'cat' / 'b.png').write_bytes(_image_bytes(rng, 'PNG', (20, 20)))
  (images / 'dog' / 'c.webp').write_bytes(_image_bytes(rng, 'WEBP', (20, 20)))
  (images / 'dog' / 'd.jpg').write_bytes(b'broken')
  rows = [{'image': 'images/cat/a.jpg', 'caption': 'a cat'},
          {'image': 'images/dog/c.webp', 'caption': 'a dog'},
          {'image': 'images/dog/d.jpg', 'caption': 'broken'},
          {'image': 'images/cat/b.png', 'caption': ''}]
  pairs = tmp_path / 'pairs.jsonl'
  pairs.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  logged = []
  manifest = shard_writer.write_shards(str(pairs), str(tmp_path / 'out'), workers=0,
                                       log=logged.append)
  assert manifest['splits']['train']['samples'] == 2 and manifest['skipped'] == 2
  assert manifest['reencoded_as_jpeg'] == 1
  assert sorted(why.split(':')[0] for _, why in manifest['bad']) == [
      "empty 'caption'", 'unreadable image /' + str(images / 'dog' / 'd.jpg')[1:]]
  samples = list(wds.WebDataset(str(tmp_path / 'out' / 'train-000000.tar'), shardshuffle=False))
  assert [s['txt'] for s in samples] == [b'a cat', b'a dog']
  assert samples[0]['jpg'] == jpeg  # a JPEG is copied byte for byte
  assert Image.open(io.BytesIO(samples[1]['jpg'])).format == 'JPEG'  # the WebP re-encoded
  assert json.loads((tmp_path / 'out' / 'sizes.json').read_text()) == {'train-000000.tar': 2}
  assert "--config.dataset.urls='" in logged[0]

  manifest = shard_writer.write_shards(str(images), str(tmp_path / 'folder'), workers=2)
  assert manifest['classes'] == ['cat', 'dog'] and manifest['skipped'] == 1
  samples = list(wds.WebDataset(str(tmp_path / 'folder' / 'train-000000.tar'),
                                shardshuffle=False))
  assert [s['cls'] for s in samples] == [b'0', b'0', b'1'] and 'txt' not in samples[0]
  with pytest.raises(errors.DatasetError, match='exists and is not an empty folder'):
    shard_writer.write_shards(str(images), str(tmp_path / 'folder'))


@pytest.mark.slow  # a jaxcl shard process
def test_jaxcl_shard_to_gcs_completes_without_folder_objects(tmp_path, gcs_dir):
  """An object store has no folders: the unfinished prefix is gone once its
  shards are moved out, and removing it must not fail the complete output.
  (Over a minute: the local server lacks GCS's moveTo; gcsfs retries it.)"""
  rng = np.random.default_rng(4)
  for i in range(3):
    (tmp_path / f'{i}.png').write_bytes(_image_bytes(rng, 'PNG', (20, 20)))
  out = gcs_dir / 'out'
  proc = helpers.jaxcl('shard', '--input', str(tmp_path), '--output', str(out), '--workers=0')
  assert proc.stdout.splitlines() == [  # the gs:// URL as it is, not made a local path
      f"train: 3 samples in 1 shard(s): --config.dataset.urls='{out}/train-{{000000..000000}}.tar'",
      f'0 bad row(s) or image(s) skipped, 3 image(s) re-encoded as JPEG; {out}/manifest.json']
  assert sorted(p.name for p in out.iterdir()) == ['manifest.json', 'sizes.json',
                                                   'train-000000.tar']
  assert json.loads((out / 'sizes.json').read_text()) == {'train-000000.tar': 3}

@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_first_batch_from_shards_equals_the_tfds_path(tmp_path):
  """The shapes' first TFDS batch written to a shard, read back in order
  (one stream, window 1): the same images, labels and token ids."""
  import webdataset as wds
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER)
  tokenizer = tokenizers.build_tokenizer(config.text)
  source, _ = data_lib.load_source(config.dataset, 'train', with_text=True)

  class Strings:  # the caption the sampler draws, as it is
    encode = staticmethod(lambda texts: np.array(texts, dtype=object))

  first = lambda t: next(data_lib.train_iterator(source, batch_size=32, seed=config.seed,
                                                 transform=data_lib.caption_sampler(t)))
  tfds_batch, drawn = first(tokenizer), first(Strings())
  with wds.TarWriter(str(tmp_path / 'first-0.tar')) as writer:
    for i, (image, caption, label) in enumerate(zip(drawn['image'], drawn['text'],
                                                    drawn['label'])):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format='PNG')
      writer.write({'__key__': f'{i:03d}', 'png': png.getvalue(), 'txt': caption,
                    'cls': str(label)})
  config.dataset.update(name='webdataset', urls=str(tmp_path / 'first-0.tar'), image_size=32,
                        shuffle_buffer=1, streams=1, workers=0)
  shard_source, info = data_lib.Dataset(config.dataset).training(with_text=True)
  assert info.image_shape == (32, 32, 3) and data_lib.known_size(shard_source) is None
  batch = next(data_lib.train_batches(shard_source, batch_size=32, seed=config.seed,
                                      process_index=0, process_count=1, tokenizer=tokenizer))
  for key in ('image', 'label', 'text'):
    np.testing.assert_array_equal(batch[key], tfds_batch[key], err_msg=key)


class _Records:
  """A random-access source of 10 records: 'record n' captions, label 7."""

  def __len__(self):
    return 10

  def __getitem__(self, index):
    return {'image': np.full((8, 8, 3), index, np.uint8), 'label': np.int32(7),
            'captions': [f'record {index}', f'record {index} again']}


def test_mixture_proportions_and_exact_resume(corpus):
  shards_part = _mixture(corpus).components[0]
  mixture = stream.Mixture((shards_part, stream.RecordComponent('records', _Records(), True)),
                           (0.7, 0.3), streams=4, seed=5, with_text=True)
  make = lambda steps, p=0, count=1, positions=None, start=0: (lambda it: (
      [next(it) for _ in range(steps)], it))(stream.StreamBatches(
          mixture, batch_size=8, process_index=p, process_count=count, start_step=start,
          positions=stream.start_positions(4, 2) if positions is None else positions))
  batches, it = make(300)
  # 300 steps x 4 streams draw a source: the share of rows from the shards is
  # binomial(1200, 0.7) / 1200, within 4 standard deviations (0.053) of 0.7.
  read, skipped, rows = it.counts()
  assert rows.sum() == 300 * 8 and skipped.sum() == 0
  assert abs(rows[0] / rows.sum() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / 1200)
  from_records = [c for b in batches for c in b['captions'] if c.startswith('record')]
  assert len(from_records) == rows[1]
  assert {c.split()[1] for c in from_records} == {str(n) for n in range(10)}
  assert any(c.endswith('again') for c in from_records)  # either caption is drawn
  # A resume at step 120 by two processes sees the same batches.
  _, first = make(120)
  halves = [make(30, p, 2, first.positions, start=120)[0] for p in range(2)]
  for k in range(30):
    assert halves[0][k]['captions'] + halves[1][k]['captions'] == batches[120 + k]['captions']
    np.testing.assert_array_equal(np.concatenate([halves[0][k]['image'],
                                                  halves[1][k]['image']]),
                                  batches[120 + k]['image'])


def test_a_mixture_by_config_of_shards_and_tfds(tmp_path):
  """A config's dataset.mixture: the shards of the shapes and the TFDS shapes."""
  import webdataset as wds
  config = helpers.tiny_config(helpers.CLIP_CONFIG, helpers.TINY_TWO_TOWER)
  source, _ = data_lib.load_source(config.dataset, 'test', with_text=True)
  with wds.TarWriter(str(tmp_path / 'shapes-0.tar')) as writer:
    for i in range(64):
      png = io.BytesIO()
      Image.fromarray(source[i]['image']).save(png, format='PNG')
      writer.write({'__key__': f'{i:03d}', 'png': png.getvalue(), 'txt': 'from shards'})
  config.dataset.update(name='mixture', image_size=32, workers=0, mixture=(
      f'shards:{tmp_path}/shapes-0.tar=0.5', 'captioned_shapes=0.5'))
  validation.validate(config)
  stream_source, info = data_lib.Dataset(config.dataset).training(with_text=True)
  assert info.image_shape == (32, 32, 3)
  assert data_lib.describe_size(stream_source) == (
      'a mixture of 0:' + tmp_path.name + ' (0.5), 1:captioned_shapes (0.5), streamed')
  it = data_lib.train_batches(stream_source, batch_size=32, seed=0, process_index=0,
                          process_count=1)
  captions = [c for _ in range(4) for c in next(it)['captions']]
  shares = it.counts()[2] / it.counts()[2].sum()
  assert 0.2 < shares[0] < 0.8 and captions.count('from shards') == it.counts()[2][0]
  # Evaluation reads the first source's splits: the shards' eval_urls (none here).
  assert data_lib.Dataset(config.dataset).missing_split('test') == (
      'the test split (dataset.eval_urls is empty)')
  config.dataset.mixture = ('captioned_shapes=0', )
  with pytest.raises(config_lib.ConfigError, match="not 'SOURCE=WEIGHT' with a weight > 0"):
    validation.validate(config)
  config.dataset.mixture = ('pairs:/nowhere.jsonl=1', )
  with pytest.raises(config_lib.ConfigError, match=r'dataset.mixture\[0\]: dataset.path '):
    validation.validate(config)


@pytest.mark.slow  # 6,000 samples decoded under tracemalloc
def test_memory_does_not_grow_with_the_stream(tmp_path):
  """Two passes over 3,000 samples (8 MB of JPEGs, 30x the shuffle buffer of
  100): what Python holds after the whole stream is what it held after a
  tenth of it, within 1 MB."""
  import webdataset as wds
  rng = np.random.default_rng(3)
  for s in range(12):
    with wds.TarWriter(str(tmp_path / f'big-{s:02d}.tar')) as writer:
      for i in range(250):
        writer.write({'__key__': f'{i:04d}', 'jpg': _image_bytes(rng, 'JPEG', (32, 32)),
                      'txt': f'sample {s} {i}'})
  corpus = sum(p.stat().st_size for p in tmp_path.glob('big-*.tar'))
  mixture = _mixture(None, streams=4, window=25, urls=f'{tmp_path}/big-{{00..11}}.tar')
  it = stream.StreamBatches(mixture, batch_size=40, process_index=0, process_count=1,
                            positions=stream.start_positions(4))
  tracemalloc.start()
  try:
    held = []
    for step in range(150):  # 150 x 40 = 6,000 samples
      next(it)
      if step in (15, 149):
        held.append(tracemalloc.get_traced_memory()[0])
  finally:
    tracemalloc.stop()
  assert corpus > 7e6 and held[1] - held[0] < 1e6, (corpus, held)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_a_shard_gone_mid_run_is_one_line_from_a_worker(tmp_path, corpus):
  for shard in corpus.glob('shard-*.tar'):
    (tmp_path / shard.name).write_bytes(shard.read_bytes())
  it = stream.StreamBatches(_mixture(None, streams=2, window=100, urls=_urls(tmp_path)),
                            batch_size=4, process_index=0, process_count=1,
                            positions=stream.start_positions(2), workers=2)
  try:
    next(it)
    for shard in tmp_path.glob('shard-*.tar'):
      shard.unlink()
    with pytest.raises(errors.DatasetError, match=r'^cannot open shard .*shard-00000\d.tar: '
                                                  r'FileNotFoundError'):
      for _ in range(200):  # the workers run ahead: the shards they already read still come
        next(it)
  finally:
    it.close()


def test_held_out_shards_are_the_test_split(tmp_path, corpus):
  """eval_urls in memory, center-cropped, with their classes (a sample
  without `cls` is unlabeled, -1, as the shapes' two-shape images)."""
  import webdataset as wds
  rng = np.random.default_rng(4)
  with wds.TarWriter(str(tmp_path / 'held-0.tar')) as writer:
    writer.write({'__key__': 'a', 'jpg': _image_bytes(rng, 'JPEG'), 'txt': 'one', 'cls': '4'})
    writer.write({'__key__': 'b', 'jpg': _image_bytes(rng, 'JPEG'), 'txt': 'two'})
    writer.write({'__key__': 'c', 'jpg': b'broken', 'txt': 'three', 'cls': '1'})
  cfg = config_lib.base_config().dataset
  cfg.update(name='webdataset', urls=_urls(corpus), eval_urls=str(tmp_path / 'held-0.tar'),
             image_size=8, eval_samples=10)
  test, info = data_lib.Dataset(cfg).split('test', with_text=True)
  assert info.num_classes == 5 and len(test) == 2 and test.skipped[0][0].endswith('held-0.tar c')
  assert [int(test[i]['label']) for i in range(2)] == [4, -1]
  assert test[0]['captions'] == ['one'] and test[0]['image'].shape == (8, 8, 3)
  train, info = data_lib.Dataset(cfg).split('train')  # SimCLR's kNN bank: the first eval_samples
  assert len(train) == 10 and info.num_classes == 3 and train[0]['captions'] == []


# ------------------------------------------- jaxcl shard interrupted ---
SHARD_WAIT_S = 300  # for its first shard: seconds on 2 idle cores, generous for a busy machine


def _with_ctrl_c():
  """SIGINT as a terminal's foreground job has it: pytest started in the
  background of a shell without job control (`pytest ... &` in a script)
  has it ignored, and its children inherit that, so Ctrl-C would not stop
  the command under test."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_shard_of_many_rows(tmp_path, workers: int) -> subprocess.Popen:
  """`jaxcl shard` of 50,000 rows (one PNG re-encoded each time, minutes of
  work) into tmp_path/out in its own process group, as a terminal starts
  it; returned once its first shard is complete."""
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
      tmp_path / 'image.png')
  (tmp_path / 'pairs.jsonl').write_text(''.join(
      json.dumps({'image': 'image.png', 'caption': f'row {i}'}) + '\n' for i in range(50000)))
  proc = subprocess.Popen(
      [sys.executable, '-m', 'jaxcl.cli', 'shard', '--input', str(tmp_path / 'pairs.jsonl'),
       '--output', str(tmp_path / 'out'), '--shard_size=0.1', f'--workers={workers}'],
      cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True, preexec_fn=_with_ctrl_c)
  first = tmp_path / 'out' / shard_writer.UNFINISHED_DIR / 'train-000000.tar'
  deadline = time.monotonic() + SHARD_WAIT_S
  while not first.exists():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f'no complete shard (exit {proc.poll()}): {proc.communicate()}')
    time.sleep(0.05)
  return proc


@pytest.mark.slow  # a jaxcl shard process and its workers
def test_ctrl_c_during_jaxcl_shard_removes_what_it_wrote(tmp_path):
  proc = _start_shard_of_many_rows(tmp_path, workers=2)
  os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the main process and its workers
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130
  assert stderr.strip().splitlines() == [  # one line, no worker's traceback
      f'jaxcl: stopped (Ctrl-C) before the shards were complete; what it wrote to '
      f'{tmp_path / "out"} is removed: run the same command again to start over']
  assert not (tmp_path / 'out').exists()


@pytest.mark.slow  # a jaxcl shard process
def test_jaxcl_shard_killed_leaves_no_complete_looking_shard_and_reruns(tmp_path):
  proc = _start_shard_of_many_rows(tmp_path, workers=0)
  proc.kill()
  proc.communicate()
  out = tmp_path / 'out'
  assert [p.name for p in out.iterdir()] == [shard_writer.UNFINISHED_DIR]
  (tmp_path / 'pairs.jsonl').write_text(''.join(  # a shorter input: the same command, quicker
      json.dumps({'image': 'image.png', 'caption': f'row {i}'}) + '\n' for i in range(30)))
  logged = []
  manifest = shard_writer.write_shards(str(tmp_path / 'pairs.jsonl'), str(out), shard_mb=0.1,
                                       log=logged.append)
  assert logged[0] == f'removing the unfinished output of an interrupted jaxcl shard from {out}'
  shard_names = [f'train-{i:06d}.tar' for i in range(manifest['splits']['train']['shards'])]
  assert sorted(p.name for p in out.iterdir()) == ['manifest.json', 'sizes.json', *shard_names]
  assert sum(json.loads((out / 'sizes.json').read_text()).values()) == 30
