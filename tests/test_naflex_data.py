"""SigLIP 2's NaFlex data: images at their own aspect ratio through the
grain pipeline as patches (one budget per global batch), evaluation batches
of patches, the non-square captioned shapes, the config's checks, and a
NaFlex SigLIP run that trains, evaluates and resumes exactly."""

import io
import json
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

import helpers
from jaxcl import config as config_lib, data, errors
from jaxcl.data import decode, naflex, shapes
from jaxcl.evaluation import zeroshot_suite
from jaxcl.trainer import dataset_checks

PATCH = 4
# Native images of several sizes and orientations, as a random-access source.
SIZES = [(8, 8), (6, 20), (20, 6), (3, 9), (16, 12), (5, 5), (1, 30), (12, 4)]


class _Images:
  def __init__(self):
    rng = np.random.default_rng(0)
    self.images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': np.int32(index)}


@pytest.mark.parametrize('processes', [1, 2])
def test_each_global_batch_has_one_budget_and_the_reference_patches(processes):
  """Every record of a global batch is patched at that batch's budget, the
  same in every process (process p reads the p-th block of each batch)."""
  patching = naflex.Patching(PATCH, (4, 9, 16))
  source, batch_size = _Images(), 4
  seen_budgets = set()
  iterators = [data.train_iterator(source, batch_size=batch_size, seed=3, process_index=p,
                                   process_count=processes, patching=patching)
               for p in range(processes)]
  for k in range(12):
    parts = [next(it) for it in iterators]
    budget = patching.batch_budget(3, k)
    seen_budgets.add(budget)
    for part in parts:
      patches, grids = part['image']['patches'], part['image']['grid']
      assert patches.shape == (batch_size // processes, budget, PATCH * PATCH * 3)
      for label, row, grid in zip(part['label'], patches, grids):
        want, want_grid = naflex.to_patches(source.images[label], PATCH, budget)
        np.testing.assert_array_equal(row, want)
        np.testing.assert_array_equal(grid, want_grid)
  assert seen_budgets == {4, 9, 16}  # each drawn, over 12 batches


def test_eval_batches_of_patches_pad_with_one_patch_grids():
  source = naflex.PatchedSource(_Images(), naflex.Patching(PATCH, (4, 9)))
  batches = list(data.eval_batches(source, batch_size=5))
  assert [b['mask'].sum() for b in batches] == [5, 3]
  last = batches[-1]['image']
  assert last['patches'].shape == (5, 9, PATCH * PATCH * 3)  # the largest budget
  np.testing.assert_array_equal(last['grid'][3:], 1)  # padding: no empty softmax
  assert not last['patches'][3:].any()
  want, grid = naflex.to_patches(source.records.images[6], PATCH, 9)  # a 1 x 30 image
  np.testing.assert_array_equal(batches[1]['image']['patches'][1], want)
  assert tuple(grid) == (1, 9)


def test_flex_canvases_keep_the_square_stream_and_vary_the_aspect():
  square = shapes.generate(1, 20)
  flex = shapes.generate(1, 200, canvases=shapes.CaptionedShapesFlex.CANVASES)
  assert {x['image'].shape[:2] for x in flex} == set(shapes.CaptionedShapesFlex.CANVASES)
  assert all(x['image'].shape == (32, 32, 3) for x in square)
  # The canvas is drawn from a stream of its own: on one 32 x 32 canvas the shapes'
  # draws are the square data's.
  one_canvas = shapes.generate(1, 20, canvases=((32, 32),))
  for a, b in zip(square, one_canvas):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['captions'] == b['captions']


def test_squash_resizes_the_whole_image_and_evaluates_alike():
  """The square baseline of SigLIP's preprocessing: the whole canvas resized,
  so no shape is cropped away (the central square would lose the side cells)."""
  image = shapes.generate(2, 1, canvases=((20, 60),))[0]['image']
  encoded = shapes._png(image)
  fmt = decode.SampleFormat(image_size=32, crop='squash', reject_small=False)
  squashed, problem = decode.decode_image(encoded, fmt)
  assert problem is None
  np.testing.assert_array_equal(squashed, decode.crop_resize(image, (0, 0, 60, 20), 32))
  assert decode.evaluation_crop('squash') == 'squash'
  assert decode.evaluation_crop('random') == decode.evaluation_crop('center') == 'center'


def test_a_zero_shot_folder_of_a_naflex_run_gives_patches(tmp_path):
  """eval.zeroshot's folder:PATH entries keep each image's aspect ratio too."""
  rng = np.random.default_rng(0)
  for name, size in (('cat', (20, 60)), ('dog', (48, 24))):
    (tmp_path / name).mkdir()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        tmp_path / name / 'a.png')
  config = helpers.tiny_config(helpers.SIGLIP_CONFIG, NAFLEX_RUN)
  (entry,) = zeroshot_suite.parse_all((f'folder:{tmp_path}',))
  opened = zeroshot_suite.open_entry(entry, config, 3)
  grids = [tuple(opened.source[i]['image']['grid']) for i in range(2)]
  assert grids == [naflex.grid_for_budget(20, 60, 8, 16), naflex.grid_for_budget(48, 24, 8, 16)]
  assert opened.class_names == ('cat', 'dog')


def _dataset_group(**kwargs):
  d = config_lib.base_config().dataset
  d.update(**kwargs)
  return d


@pytest.mark.parametrize('kwargs, vit, text_tower, message', [
    (dict(resolution='native'), True, True, 'dataset.resolution must be one of'),
    (dict(max_patches=(0,)), True, True, 'dataset.max_patches must be a positive integer'),
    (dict(max_patches=()), True, True, 'dataset.max_patches must be a positive integer'),
    (dict(resolution='naflex'), False, True, 'needs a ViT image tower'),
    (dict(resolution='naflex'), True, False, 'image-text method'),
    (dict(eval_budgets=(16,)), True, True, 'eval.max_patches is for dataset.resolution=naflex'),
    (dict(resolution='naflex', eval_budgets=(0,)), True, True, 'eval.max_patches must be'),
])
def test_resolution_problems_are_one_line(kwargs, vit, text_tower, message):
  budgets = kwargs.pop('eval_budgets', ())
  problem = dataset_checks.resolution_problem(_dataset_group(**kwargs), vit, text_tower,
                                              budgets)
  assert message in problem and '\n' not in problem
  assert not dataset_checks.resolution_problem(_dataset_group(resolution='naflex'), True, True)


def test_a_bad_resolution_is_refused_before_anything_runs(tmp_path):
  proc = helpers.jaxcl('train', '--config', helpers.DIGITS_CONFIG, '--workdir',
                       str(tmp_path / 'run'), '--config.dataset.resolution=naflex', check=False)
  assert proc.returncode == 2 and 'needs a ViT image tower' in proc.stderr.splitlines()[-1]
  assert not (tmp_path / 'run').exists()
  with pytest.raises(errors.ConfigError, match='dataset.resolution'):
    config = helpers.tiny_config(helpers.SIGLIP_CONFIG, helpers.TINY_TWO_TOWER)
    config.dataset.resolution = 'native'
    from jaxcl.trainer import validation  # noqa: PLC0415  (as the CLI loads it)
    validation.validate(config, 1, 1, check_data=False)


NAFLEX_RUN = {**helpers.TINY_TWO_TOWER, 'dataset.name': 'captioned_shapes_flex',
              'dataset.resolution': 'naflex', 'dataset.max_patches': '(8, 16)',
              'augment.image_size': '32', 'total_steps': '8', 'log_every_steps': '2',
              'checkpoint_every_steps': '4', 'eval_every_steps': '8'}


@pytest.mark.slow  # two short runs: the per-batch budget and its resume show only in a run
def test_naflex_siglip_trains_evaluates_and_resumes_exactly(tmp_path):
  whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
  args = ('--config', helpers.SIGLIP_CONFIG, *helpers.tiny_overrides(NAFLEX_RUN))
  out = helpers.jaxcl('train', '--workdir', str(whole), *args).stdout
  assert 'siglip on captioned_shapes_flex' in out and 'final (step 8): zeroshot_top1' in out
  _check_resume_is_exact(whole, resumed, args, checkpoint=4, last=8)
  # One checkpoint evaluated at three more budgets; the plain keys are the run's own (16).
  results = json.loads(helpers.jaxcl('eval', '--workdir', str(whole), '--max_patches',
                                     '4,8,25,16').stdout)
  for key in ('zeroshot_top1', 'i2t_r1', 't2i_r1'):
    assert results[key] == results[f'max_patches/16/{key}']
    assert {f'max_patches/{n}/{key}' for n in (4, 8, 25)} <= set(results)
  assert results['max_patches/4/i2t_r10'] != results['max_patches/16/i2t_r10'] or (
      results['max_patches/4/tolerance'] != results['max_patches/16/tolerance'])
  _check_export(whole, tmp_path / 'image.jaxexport')


def _check_resume_is_exact(whole, resumed, args, *, checkpoint: int, last: int):
  """`whole` as if killed after `checkpoint`, resumed in `resumed`: the same final weights."""
  shutil.copytree(whole, resumed)
  shutil.rmtree(resumed / 'checkpoints' / str(last))
  (resumed / 'eval.json').unlink()
  out = helpers.jaxcl('train', '--workdir', str(resumed), *args).stdout
  assert f'resuming from step {checkpoint}' in out
  import jax  # noqa: PLC0415  (conftest sets XLA_FLAGS before jax loads)
  (step_a, params_a), (step_b, params_b) = (helpers.final_params(w) for w in (whole, resumed))
  assert step_a == step_b == last
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)


def _check_export(workdir, output):
  """The exported NaFlex embedder takes patches at any budget, preprocessed on the
  host as FILE.json says, and gives the trained model's embeddings."""
  import jax  # noqa: PLC0415  (conftest sets XLA_FLAGS before jax loads)

  from jaxcl import export  # noqa: PLC0415  (as jax)
  from jaxcl.trainer import trained  # noqa: PLC0415  (as jax)
  metadata = export.export_encoder(workdir, output)
  assert metadata['input']['shape'][:2] == ['b', 'n'] and metadata['preprocess']['patch_size'] == 8
  embed = jax.export.deserialize(output.read_bytes())
  exp, state = trained.load_trained(str(workdir), open_data=False)
  images = [x['image'] for x in shapes.generate(5, 3, canvases=((20, 60), (48, 24)))]
  for budget in (9, 25):  # 25: more patches than any training batch had
    rows = [naflex.to_patches(image, 8, budget) for image in images]
    patches, grids = (np.stack(part) for part in zip(*rows))
    got = np.asarray(embed.call(patches, grids))
    want = np.asarray(exp.embed(state.params, state.batch_stats,
                                {'patches': patches, 'grid': grids}))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-6)  # unit rows


@pytest.mark.parametrize('text', ['', '8,x', '0', '-4', '8;16'])
def test_eval_budgets_flag_takes_positive_integers(text):
  with pytest.raises(errors.ConfigError, match='--max_patches takes comma-separated'):
    naflex.parse_budgets(text)
  assert naflex.parse_budgets(' 16, 8 ') == [16, 8]


@pytest.fixture(scope='module')
def flex_shards(tmp_path_factory):
  """The non-square shapes as webdataset shards: 2 training shards of 48 PNGs
  (one undecodable, and each beginning with a 1-pixel strip) and a
  held-out one of 32."""
  import webdataset as wds  # noqa: PLC0415  (a test-only reference library)
  folder = tmp_path_factory.mktemp('flex_shards')
  canvases = shapes.CaptionedShapesFlex.CANVASES
  for name, seed, count in (('train-000000', 0, 48), ('train-000001', 1, 48), ('test-000000', 2,
                                                                                32)):
    with wds.TarWriter(str(folder / f'{name}.tar')) as writer:
      for i, example in enumerate(shapes.generate(seed, count, canvases=canvases)):
        png = shapes._png(example['image']) if (name, i) != ('train-000001', 5) else b'broken'
        if name.startswith('train') and i == 0:  # a 1-pixel strip: too thin for 8-px patches
          png = shapes._png(example['image'][:1])
        writer.write({'__key__': f'{name}-{i:03d}', 'png': png, 'txt': example['captions'][0],
                      'cls': str(example['label'])})
  return folder


@pytest.mark.slow  # two short runs: streamed NaFlex batches and their resume show only in a run
def test_naflex_from_shards_trains_and_resumes_exactly(flex_shards, tmp_path):
  whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
  run = {**NAFLEX_RUN, 'dataset.name': 'webdataset', 'dataset.image_size': '0',
         'dataset.urls': f'{flex_shards}/train-{{000000..000001}}.tar',
         'dataset.eval_urls': f'{flex_shards}/test-000000.tar', 'dataset.streams': '2',
         'dataset.workers': '2', 'dataset.shuffle_buffer': '16', 'total_steps': '6',
         'checkpoint_every_steps': '3', 'eval_every_steps': '6'}
  args = ('--config', helpers.SIGLIP_CONFIG, *helpers.tiny_overrides(run))
  out = helpers.jaxcl('train', '--workdir', str(whole), *args).stdout
  assert 'NaFlex patches (budgets [8, 16])' in out and 'final (step 6):' in out
  _check_resume_is_exact(whole, resumed, args, checkpoint=3, last=6)
  rows = [json.loads(line) for line in (whole / 'metrics.jsonl').read_text().splitlines()]
  assert max(r.get('skipped_samples', 0) for r in rows) >= 1  # counted, and listed:
  skipped = json.loads((whole / 'skipped_samples.json').read_text())['first']
  assert any('x1 px, enlarged 8 times' in why for why in skipped)  # a 1-pixel strip


def test_patching_of_a_config():
  d = ml_collections.ConfigDict({'resolution': 'naflex', 'max_patches': (64, 16)})
  p = naflex.patching(d, 8)
  assert (p.patch_size, p.budgets, p.eval_budget) == (8, (64, 16), 64)
  assert naflex.patching(ml_collections.ConfigDict({'resolution': 'square'}), 8) is None


@pytest.mark.parametrize('height, width, patch, budget, bad', [
    (1, 60, 8, 16, True),  # a 1-pixel strip: its one row of patches enlarges it 8 times
    (60, 1, 16, 256, True),
    (20, 60, 8, 16, False),
    (32, 32, 8, 16, False),
    (32, 32, 8, 1024, True),  # a thumbnail at a large budget: 32 x 32 patches of 8 px
    (4, 4, 8, 16, True),
    (5, 5, 8, 16, False),  # 6.4 times
    (30, 2000, 16, 256, False),  # a panorama keeps its aspect: 2 x 125 patches
])
def test_the_naflex_size_rule_refuses_what_its_grid_would_enlarge_8_times(
    height, width, patch, budget, bad):
  problem = naflex.size_problem(height, width, patch, budget)
  assert (problem is not None) == bad
  assert naflex.size_problem(width, height, patch, budget) == (
      problem and problem.replace(f'{width}x{height}', f'{height}x{width}').replace(
          '{}x{} grid'.format(*naflex.grid_for_budget(height, width, patch, budget)),
          '{}x{} grid'.format(*naflex.grid_for_budget(width, height, patch, budget))))


def _encoded(image, kind='PNG'):
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=kind, quality=95)
  return out.getvalue()


def test_naflex_decoding_skips_huge_images(monkeypatch):
  """An image over twice PIL's pixel limit (a decompression bomb) is a bad
  image, found from its header alone; here the limit is lowered to 1,000
  pixels so that a 64 x 64 image is one."""
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000)
  image, problem = decode.decode_image(_encoded(np.zeros((64, 64, 3), np.uint8)),
                                       decode.SampleFormat(image_size=0, naflex=(8, 16)))
  assert image is None and 'DecompressionBombError' in problem


def test_naflex_decoding_skips_strips_and_corrupt_images_and_drafts_big_jpegs():
  rng = np.random.default_rng(0)
  fmt = decode.SampleFormat(image_size=0, naflex=(8, 16))
  strip = _encoded(rng.integers(0, 256, (1, 60, 3), dtype=np.uint8))
  image, problem = decode.decode_image(strip, fmt)
  assert image is None and problem.startswith('wrongly sized image: 60x1 px')
  kept, _ = decode.decode_image(strip, decode.SampleFormat(image_size=0, naflex=(8, 16),
                                                           reject_small=False))
  assert kept.shape == (1, 60, 3)  # a curated TFDS dataset uses every image
  assert decode.decode_image(b'not an image', fmt)[1].startswith('undecodable image')
  # A 640 x 480 JPEG for 16 patches of 8 (a 4 x 3 grid: 32 x 24 px) decodes at 1/8 scale.
  smooth = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((80, 80, 1))).astype(np.uint8)
  jpeg = _encoded(smooth, 'JPEG')
  full, _ = decode.decode_image(jpeg, fmt)
  drafted, _ = decode.decode_image(jpeg, decode.SampleFormat(image_size=0, naflex=(8, 16),
                                                             naflex_draft=True))
  assert full.shape == (480, 640, 3) and drafted.shape == (60, 80, 3)
  (a, grid_a), (b, grid_b) = (naflex.to_patches(x, 8, 16) for x in (full, drafted))
  np.testing.assert_array_equal(grid_a, grid_b)
  assert np.abs(a.astype(int) - b.astype(int)).mean() < 2  # grey levels


@pytest.fixture(scope='module')
def flex_pairs(tmp_path_factory):
  """A pairs file of non-square images: two PNGs, a JPEG, a 1-pixel strip and
  a corrupt file (the last two bad rows)."""
  folder = tmp_path_factory.mktemp('flex_pairs')
  rng = np.random.default_rng(1)
  rows = []
  for name, size, kind in (('wide.png', (20, 60), 'PNG'), ('tall.png', (48, 24), 'PNG'),
                           ('photo.jpg', (40, 50), 'JPEG'), ('strip.png', (1, 60), 'PNG')):
    (folder / name).write_bytes(_encoded(rng.integers(0, 256, (*size, 3), dtype=np.uint8),
                                         kind))
    rows.append({'image': name, 'caption': f'a picture named {name}'})
  noise = _encoded(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
  (folder / 'broken.png').write_bytes(noise[:len(noise) // 2])
  rows.append({'image': 'broken.png', 'caption': 'cut short'})
  (folder / 'pairs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return folder


def _naflex_group(**kwargs):
  return _dataset_group(**{'resolution': 'naflex', 'max_patches': (8, 16), 'workers': 0,
                          'image_size': 0, **kwargs})


def test_a_pairs_file_at_native_size_gives_the_reference_patches(flex_pairs, tmp_path):
  d = _naflex_group(name=data.PAIRS, path=str(flex_pairs / 'pairs.jsonl'),
                    data_dir=str(tmp_path))
  dataset = data.Dataset(d, 8)
  source, info = dataset.split('train', with_text=True)
  assert info.image_shape == (0, 0, 3) and len(source) == 3
  bad = dict(dataset.builder().bad_rows)
  assert bad[4].startswith('wrongly sized image: 60x1 px') and bad[5].startswith('undecodable')
  for index, name in enumerate(('wide.png', 'tall.png', 'photo.jpg')):
    record = source[index]
    with Image.open(flex_pairs / name) as pil:
      want, grid = naflex.to_patches(np.asarray(pil.convert('RGB')), 8, 16)
    np.testing.assert_array_equal(record['image']['patches'], want)
    np.testing.assert_array_equal(record['image']['grid'], grid)
    assert record['captions'] == [f'a picture named {name}']
  # Another budget is another conversion: the strip's rule depends on it.
  assert data.Dataset(_naflex_group(name=data.PAIRS, path=str(flex_pairs / 'pairs.jsonl'),
                                    data_dir=str(tmp_path), max_patches=(4,)),
                      8).builder().data_dir != dataset.builder().data_dir


def test_a_naflex_mixture_of_shards_and_a_pairs_file_streams_patches(flex_shards, flex_pairs,
                                                                     tmp_path):
  """Every kind of source at its own size in one stream: each global batch at
  its budget, the 1-pixel strip of the shards and the broken PNG skipped."""
  d = _naflex_group(name='mixture', data_dir=str(tmp_path), mixture=(
      f'shards:{flex_shards}/train-{{000000..000001}}.tar=0.5',
      f'pairs:{flex_pairs}/pairs.jsonl=0.5'), eval_urls=f'{flex_shards}/test-000000.tar')
  dataset = data.Dataset(d, 8)
  stream, info = dataset.training(with_text=True)
  assert info.image_shape == (0, 0, 3)
  it = data.train_batches(stream, batch_size=8, seed=0, process_index=0, process_count=1,
                          patching=dataset.patching)
  try:
    for step in range(12):
      batch = next(it)
      budget = dataset.patching.batch_budget(0, step)
      assert batch['image']['patches'].shape == (8, budget, 8 * 8 * 3)
      rows, cols = batch['image']['grid'].T
      assert (rows * cols <= budget).all() and (rows * cols >= budget // 2).all()
    _, skipped, rows = it.counts()
  finally:
    it.close()
  assert rows[0] > 0 and rows[1] > 0  # both sources in the batches
  assert skipped[0] >= 1 and any('wrongly sized image: 60x1 px' in why for why in it.bad)
  test, _ = dataset.split('test', with_text=True)  # the first source's held-out shards
  assert test[0]['image']['patches'].shape == (16, 8 * 8 * 3)
