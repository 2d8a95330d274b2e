"""The captioned-shapes generator and builder; converting image-caption pair files."""

import csv
import json
import os
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxcl.data import pairs, shapes

S = 32
# Longest first, so that 'top left' is found before 'top'.
_POSITION_RE = re.compile('|'.join(sorted(shapes.POSITIONS, key=len, reverse=True)))
_FORM_AREA = {'circle': np.pi, 'square': 2.0, 'diamond': 2.0, 'triangle': 3 * np.sqrt(3) / 4}


@pytest.fixture(scope='module')
def examples():
  return shapes.generate(0, 200, S)


# ----------------------------------------------------------------- shapes ---
def test_generate_is_deterministic_for_a_seed(examples):
  again = shapes.generate(0, 200, S)
  other = shapes.generate(1, 200, S)
  for a, b in zip(examples, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['captions'] == b['captions'] and a['label'] == b['label']
  assert any(not np.array_equal(a['image'], c['image']) for a, c in zip(examples, other))
  assert [a['captions'] for a in examples] != [c['captions'] for c in other]


def test_captions_and_labels(examples):
  assert len(shapes.CLASS_NAMES) == 24 and shapes.CLASS_NAMES[1] == 'red square'
  labels = [e['label'] for e in examples]
  assert all(-1 <= label < 24 for label in labels)
  assert 0.5 < np.mean([label >= 0 for label in labels]) < 0.9  # ~70% single shapes
  for e in examples:
    assert e['image'].shape == (S, S, 3) and e['image'].dtype == np.uint8
    captions = e['captions']
    assert len(captions) == 3 and len(set(captions)) == 3
    assert all(isinstance(c, str) and 0 < len(c) < 90 for c in captions)
    if e['label'] >= 0:
      color, form = shapes.CLASS_NAMES[e['label']].split()
      for caption in captions:
        assert color in caption.split() or f'{color},' in caption, caption
        assert re.search(rf'\b{form}\b', caption), caption
        assert len(_POSITION_RE.findall(caption)) <= 1, caption  # some leave it out
    else:
      for caption in captions:  # two shapes: two of every attribute it names
        assert len(_POSITION_RE.findall(caption)) in (0, 2), caption
        assert sum(caption.count(s) for s in shapes.SIZES) in (0, 2), caption
  # Most captions name all four attributes.
  detailed = [c for e in examples for c in e['captions'] if _POSITION_RE.search(c)
              and any(s in c for s in shapes.SIZES)]
  assert len(detailed) > 0.5 * 3 * len(examples)


def test_pixels_show_what_the_caption_says(examples):
  colors = np.array(list(shapes.COLORS.values()), np.float32)
  checked = 0
  for e in examples[:60]:
    if e['label'] < 0:
      continue
    caption = max(e['captions'], key=len)  # the most detailed one
    image = e['image'].astype(np.float32)
    background = np.median(image.reshape(-1, 3), axis=0)  # the shape covers < 1/3
    difference = np.linalg.norm(image - background, axis=-1)
    # Color: the mean of the pixels fully inside the shape (edges are blended).
    core = difference > 0.8 * difference.max()
    nearest = list(shapes.COLORS)[np.argmin(np.linalg.norm(colors - image[core].mean(0), axis=1))]
    assert re.search(rf'\b{nearest}\b', caption), (nearest, caption)
    # Position: the shape's centroid lies in the grid cell the caption names.
    inside = difference > 0.5 * difference.max()
    ys, xs = np.nonzero(inside)
    row, col = int((ys.mean() + 0.5) * 3 // S), int((xs.mean() + 0.5) * 3 // S)
    if _POSITION_RE.search(caption):
      assert _POSITION_RE.search(caption).group() == shapes.POSITIONS[3 * row + col], caption
    # Size: the radius the area implies, against the midpoint of the two ranges.
    form = shapes.CLASS_NAMES[e['label']].split()[1]
    radius = np.sqrt(inside.sum() / _FORM_AREA[form]) / S
    size = 'large' if radius > 0.2 else 'small'
    if any(re.search(rf'\b{s}\b', caption) for s in shapes.SIZES):
      assert re.search(rf'\b{size}\b', caption), (radius, caption)
    checked += 1
  assert checked >= 30


def test_builder_prepares_what_generate_makes(tmp_path, monkeypatch):
  assert shapes.CaptionedShapes.SPLITS == {'train': (0, 10_000), 'test': (1, 1_000)}
  # The same class, fewer images, to stay fast.
  monkeypatch.setattr(shapes.CaptionedShapes, 'SPLITS', {'train': (0, 300), 'test': (1, 50)})
  builder = tfds.builder('captioned_shapes', data_dir=str(tmp_path), file_format='array_record')
  assert isinstance(builder, shapes.CaptionedShapes)
  tfds.disable_progress_bar()
  builder.download_and_prepare()
  features = builder.info.features
  assert features['label'].names == list(shapes.CLASS_NAMES)
  for split, (seed, num) in {'train': (0, 300), 'test': (1, 50)}.items():
    source = builder.as_data_source(split)
    expected = shapes.generate(seed, num, S, geometry=True)
    assert len(source) == num
    for i in range(num):  # generation order is kept
      record = source[i]
      np.testing.assert_array_equal(record['image'], expected[i]['image'])
      assert [c.decode('utf-8') for c in record['captions']] == expected[i]['captions']
      assert record['label'] == expected[i]['label']
      for key in ('boxes', 'box_labels', 'segmentation'):
        np.testing.assert_array_equal(record[key], expected[i][key])
      assert [c.decode('utf-8') for c in record['box_captions']] == expected[i]['box_captions']


def test_geometry_draws_nothing_and_says_where_each_shape_is(examples):
  """generate(geometry=True) makes the same images; each shape's box holds
  every pixel it mostly covers, and the segmentation names its class there."""
  located = shapes.generate(0, 200, S, geometry=True)
  for plain, example in zip(examples, located):
    np.testing.assert_array_equal(plain['image'], example['image'])
    assert plain['captions'] == example['captions'] and plain['label'] == example['label']
    boxes, labels, segmentation = (example[k] for k in ('boxes', 'box_labels', 'segmentation'))
    assert len(boxes) == len(labels) == (1 if example['label'] >= 0 else 2)
    if example['label'] >= 0:
      assert labels[0] == example['label']
    for described, label in zip(example['box_captions'], labels):  # 'small red circle'
      assert described.split(' ', 1)[1] == shapes.CLASS_NAMES[label]
      assert described.split(' ', 1)[0] in shapes.SIZES
    for label in set(labels):  # two shapes may share a class: their boxes' union
      rows, cols = np.nonzero(segmentation == label + 1)
      inside = np.zeros(len(rows), bool)
      for top, left, bottom, right in boxes[labels == label]:
        assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
        inside |= ((rows >= top * S) & (rows < bottom * S) & (cols >= left * S)
                   & (cols < right * S))
      assert inside.all() and len(rows) > 0
      # The shape is drawn there: its pixels are far brighter than the dark background.
      assert example['image'][rows, cols].max(axis=1).min() > shapes.BACKGROUND_MAX + 40
    assert (segmentation == 0).mean() > 0.5  # mostly background


# ------------------------------------------------------------------ pairs ---
def _png(path, color, size=(24, 16)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(path)


@pytest.fixture
def pair_files(tmp_path):
  _png(tmp_path / 'img' / 'red.png', (255, 0, 0))
  _png(tmp_path / 'img' / 'green.png', (0, 255, 0), size=(10, 30))
  _png(tmp_path / 'elsewhere' / 'blue.png', (0, 0, 255))
  (tmp_path / 'img' / 'garbage.png').write_bytes(b'not a png at all')
  blue = str(tmp_path / 'elsewhere' / 'blue.png')  # an absolute path
  return tmp_path, blue


def _prepare(path, tmp_path, **kwargs):
  log = []
  builder = pairs.prepare_pairs(path, image_size=8, data_dir=str(tmp_path / 'tfds'),
                                log=log.append, **kwargs)
  return builder, log


def _contents(builder, split='train'):
  """{captions tuple: mean color} of a split."""
  source = builder.as_data_source(split)
  out = {}
  for i in range(len(source)):
    record = source[i]
    assert record['image'].shape == (8, 8, 3) and record['image'].dtype == np.uint8
    captions = tuple(c.decode('utf-8') for c in record['captions'])
    out[captions] = tuple(np.round(record['image'].reshape(-1, 3).mean(0)).astype(int))
  return out


def test_jsonl_pairs_convert_once_and_report_bad_rows(pair_files):
  tmp_path, blue = pair_files
  lines = [
      {'image': 'img/red.png', 'caption': 'a red square'},  # 1
      {'image': 'img/green.png', 'caption': 'green'},  # 2
      {'image': 'img/missing.png', 'caption': 'nothing here'},  # 3
      {'image': 'img/garbage.png', 'caption': 'garbage'},  # 4
      {'image': 'img/red.png', 'caption': '   '},  # 5
      'this line is not JSON',  # 6
      {'image': 'img/red.png', 'text': 'wrong key'},  # 7
      '',  # 8: blank lines are not rows
      {'image': blue, 'caption': 'blue, from an absolute path'},  # 9
      {'image': './img/../img/red.png', 'caption': ' red again, café '},  # 10: same image
  ]
  path = tmp_path / 'pairs.jsonl'
  path.write_text('\n'.join(x if isinstance(x, str) else json.dumps(x) for x in lines) + '\n')

  builder, log = _prepare(path, tmp_path)
  assert _contents(builder) == {
      ('a red square', 'red again, café'): (255, 0, 0),
      ('green',): (0, 255, 0),
      ('blue, from an absolute path',): (0, 0, 255),
  }
  assert list(builder.info.splits) == ['train']
  assert [line for line, _ in builder.bad_rows] == [3, 4, 5, 6, 7]
  reasons = dict(builder.bad_rows)
  assert 'not found' in reasons[3] and 'missing.png' in reasons[3]
  assert 'unreadable' in reasons[4] and 'garbage.png' in reasons[4]
  assert 'empty' in reasons[5] and 'JSON' in reasons[6] and "'caption'" in reasons[7]
  assert re.search(r'converted 4 pairs \(3 images.*5 bad rows skipped', log[0]), log[0]
  assert log[1:] == [f'  line {line}: {reason}' for line, reason in builder.bad_rows]
  saved = json.loads((pathlib.Path(builder.data_dir) / pairs.BAD_ROWS_FILE).read_text())
  assert [tuple(row) for row in saved['bad_rows']] == builder.bad_rows

  # Again: nothing is converted, the files stay as they are.
  files = sorted(pathlib.Path(builder.data_dir).iterdir())
  mtimes = [p.stat().st_mtime_ns for p in files]
  again, log = _prepare(path, tmp_path)
  assert len(log) == 1 and 'nothing converted' in log[0] and 'converted 4' not in log[0]
  assert [p.stat().st_mtime_ns for p in sorted(pathlib.Path(again.data_dir).iterdir())] == mtimes
  assert again.bad_rows == builder.bad_rows and again.data_dir == builder.data_dir
  assert _contents(again) == _contents(builder)
  # Every split of a run opens the dataset: the process says so once.
  _, log = _prepare(path, tmp_path)
  assert log == []
  # Another image size is another dataset.
  other = pairs.prepare_pairs(path, image_size=4, data_dir=str(tmp_path / 'tfds'), log=log.append)
  assert other.data_dir != builder.data_dir
  assert other.as_data_source('train')[0]['image'].shape == (4, 4, 3)


def test_csv_and_tsv_pairs(pair_files):
  tmp_path, blue = pair_files
  path = tmp_path / 'pairs.csv'
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['file', 'text'])  # 1
    writer.writerow(['img/red.png', 'red, with a comma'])  # 2
    writer.writerow(['img/green.png', ''])  # 3
    writer.writerow(['img/green.png', 'two\nlines'])  # 4-5
    writer.writerow(['img/red.png'])  # 6: too few fields
    writer.writerow([blue, 'blue'])  # 7
  builder, _ = _prepare(path, tmp_path, image_key='file', caption_key='text')
  assert _contents(builder) == {('red, with a comma',): (255, 0, 0),
                                ('two\nlines',): (0, 255, 0),
                                ('blue',): (0, 0, 255)}
  assert [line for line, _ in builder.bad_rows] == [3, 6]

  tsv = tmp_path / 'pairs.tsv'
  tsv.write_text('caption\timage\nred\timg/red.png\ngreen\timg/green.png\n')
  builder, _ = _prepare(tsv, tmp_path)
  assert _contents(builder) == {('red',): (255, 0, 0), ('green',): (0, 255, 0)}
  # The wrong column names: every row is bad, said once, on the header line.
  rows, bad = pairs.read_pairs(tsv, image_key='file')
  assert rows == [] and bad[0][0] == 1 and "'file'" in bad[0][1]


def test_long_bad_row_lists_are_cut_in_the_log(pair_files):
  tmp_path, _ = pair_files
  path = tmp_path / 'many.jsonl'
  path.write_text('{"image": "img/red.png", "caption": "red"}\n' + 'oops\n' * 25)
  builder, log = _prepare(path, tmp_path)
  assert len(builder.bad_rows) == 25 and builder.bad_rows[-1][0] == 26
  assert len(log) == 22 and log[1].startswith('  line 2: ') and log[-1] == '  ... and 5 more'
  saved = json.loads((pathlib.Path(builder.data_dir) / pairs.BAD_ROWS_FILE).read_text())
  assert len(saved['bad_rows']) == 25


def test_test_split_is_by_image_and_deterministic(tmp_path):
  rows = []
  for i in range(30):
    _png(tmp_path / 'img' / f'{i}.png', (8 * i, 0, 0), size=(4, 4))
    rows += [{'image': f'img/{i}.png', 'caption': f'image {i} caption {k}'} for k in range(2)]
  path = tmp_path / 'pairs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  builder, _ = _prepare(path, tmp_path, test_fraction=0.3)
  train, test = _contents(builder, 'train'), _contents(builder, 'test')
  in_test = {i for i in range(30) if pairs.in_test_split(
      str(tmp_path / 'img' / f'{i}.png'), str(tmp_path), 0.3)}
  assert 0 < len(in_test) < 30
  assert sorted(test) == sorted((f'image {i} caption 0', f'image {i} caption 1') for i in in_test)
  assert len(train) == 30 - len(in_test)


def test_unusable_pair_files_raise(tmp_path):
  with pytest.raises(ValueError, match='cannot read'):
    pairs.prepare_pairs(tmp_path / 'nope.jsonl', image_size=8, data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='not .jsonl'):
    pairs.read_pairs(tmp_path / 'pairs.txt')
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"image": "missing.png", "caption": "x"}\n{"caption": "y"}\n')
  with pytest.raises(ValueError, match=r'no valid rows in .*bad.jsonl: line 1: image not found'):
    pairs.prepare_pairs(path, image_size=8, data_dir=str(tmp_path / 'tfds'), log=print)
