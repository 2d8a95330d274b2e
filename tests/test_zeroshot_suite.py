"""The zero-shot suite (eval.zeroshot, eval.retrieval, `jaxcl eval --zeroshot`):
entries parsed, results against a float64 NumPy re-implementation of
prompt-ensembled zero-shot over the model's own embeddings, the shipped
CIFAR-10 list on a local image folder, the classifier cache (a hit reads
it, a new step replaces it), and one-line errors for datasets that are not
there. All on a step-0 CLIP workdir of the tiny towers and local data."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import CLIP_CONFIG, DIGITS_CONFIG, TINY_TWO_TOWER, cli_in_forks, tiny_config
from jaxcl import data, errors, files, train
from jaxcl.evaluation import zeroshot_cache, zeroshot_lists, zeroshot_suite
from jaxcl.trainer import checkpoints, evaluator, trained, validation

CIFAR10 = zeroshot_lists.load('cifar10')[0]
FOLDER_KEY = 'cifar_colors'


# --------------------------------------------------------------- parsing ---
def test_entries_parse():
  p = zeroshot_suite.parse
  e = p('imagenet2012:validation[:10%]')
  assert (e.name, e.split, e.key, e.path, e.list_name) == (
      'imagenet2012', 'validation[:10%]', 'imagenet2012:validation[:10%]', '', '')
  e = p('cifar10:3.0.2:test')
  assert (e.name, e.split) == ('cifar10:3.0.2', 'test')
  e = p('imagenet_v2/matched-frequency')
  assert (e.name, e.split, e.key) == ('imagenet_v2/matched-frequency', '', e.spec)
  e = p('folder:/data/in1k/val/=imagenet')
  assert (e.path, e.key, e.list_name, e.name) == ('/data/in1k/val/', 'val', 'imagenet', '')
  e = p('folder:/data/date=2024/pets')  # an '=' followed by a path belongs to the path
  assert (e.path, e.key, e.list_name) == ('/data/date=2024/pets', 'pets', '')
  with pytest.raises(errors.ConfigError, match="unknown zero-shot list 'pets'"):
    p('cifar10=pets')
  with pytest.raises(errors.ConfigError, match='would both report as zeroshot/pets'):
    zeroshot_suite.parse_all(['folder:/a/pets', 'folder:/b/pets=imagenet'])
  with pytest.raises(errors.ConfigError, match='not image folders'):
    zeroshot_suite.parse('folder:/x', 'retrieval')
  with pytest.raises(errors.ConfigError, match='is not a TFDS dataset'):
    zeroshot_suite.parse('a b')
  with pytest.raises(errors.ConfigError, match='non-empty strings'):
    zeroshot_suite.parse_all(['cifar10', ''])


def test_default_splits():
  split = lambda name, splits: zeroshot_suite._default_split(
      zeroshot_suite.parse(name), splits)
  assert split('imagenet2012', ('train', 'validation', 'test')) == 'validation'  # unlabeled test
  assert split('imagenet_v2', ('test',)) == 'test'
  assert split('cifar100', ('train', 'test')) == 'test'
  assert split('coco_captions', ('train', 'val', 'restval', 'test')) == 'test'
  with pytest.raises(errors.ConfigError, match='name one: x:SPLIT'):
    split('x', ('train',))


def test_simclr_has_no_suite():
  config = tiny_config(DIGITS_CONFIG)
  config.eval.zeroshot = ('cifar10',)
  with pytest.raises(errors.ConfigError, match='eval.zeroshot needs a text tower'):
    validation.validate(config, check_data=False)


# ---------------------------------------------------- a step-0 CLIP run ---
@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """CLASS/*.png with CIFAR-10's class names: two images of one constant
  color per class, and one of noise."""
  root = tmp_path_factory.mktemp('zs') / FOLDER_KEY
  rng = np.random.default_rng(0)
  for name in CIFAR10:
    (root / name).mkdir(parents=True)
    color = rng.integers(0, 256, 3).astype(np.uint8)
    for i in range(2):
      Image.fromarray(np.tile(color, (40, 40, 1))).save(root / name / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / 'n.png')
  return root


@pytest.fixture(scope='module')
def run(folder, tmp_path_factory):
  """A CLIP workdir at step 0 (8 devices), evaluated by the run itself."""
  workdir = tmp_path_factory.mktemp('clip0')
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, total_steps=0)
  config.eval.zeroshot = (f'folder:{folder}=cifar10', 'captioned_shapes')
  validation.validate(config)
  train.train_and_evaluate(config, workdir)
  return workdir


def _reference(exp, state, folder):
  """float64 prompt-ensembled zero-shot of the folder, from the model's own
  image and text embeddings: (classifier [C, D], image embeddings, labels)."""
  params, stats = state.params, state.batch_stats
  source = data.ImageFolderSource(str(folder), exp.config.augment.image_size)
  records = [source[i] for i in range(len(source))]
  images = np.stack([r['image'] for r in records])
  labels = np.array([r['label'] for r in records])
  z = np.asarray(jax.jit(exp.embed)(params, stats, images), np.float64)
  names, templates = zeroshot_lists.load('cifar10')
  ids = exp.tokenizer.encode([t.format(n) for n in names for t in templates])
  text = np.asarray(jax.jit(exp.embed_text)(params, stats, jnp.asarray(ids)), np.float64)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  mean = text.reshape(len(names), len(templates), -1).mean(1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True), z, labels


def _topk(z, labels, classifier, k):
  scores = z @ classifier.T
  correct = scores[np.arange(len(labels)), labels][:, None]
  others = (scores >= correct) & (np.arange(classifier.shape[0])[None] != labels[:, None])
  return float(np.mean(others.sum(1) < k))  # ties count against, as jaxcl's


def _cache(workdir):
  with np.load(workdir / files.ZEROSHOT_CACHE_FILE) as npz:
    return {k: npz[k] for k in npz.files}


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_suite_results_match_a_float64_reference(run, folder):
  results = json.loads((run / files.EVAL_FILE).read_text())
  assert results['step'] == 0
  for key in ('top1', 'top5'):
    # The TFDS entry is the run's own test split, names and templates: the same numbers.
    assert results[f'zeroshot/captioned_shapes/{key}'] == results[f'zeroshot_{key}']
  exp, state = trained.load_trained(str(run))
  classifier, z, labels = _reference(exp, state, folder)
  names, templates = zeroshot_lists.load('cifar10')
  key = zeroshot_cache.cache_key(0, evaluator.weights_fingerprint(state.params), names,
                                 templates, exp.tokenizer.spec())
  cached = _cache(run)
  assert int(cached['step']) == 0 and len(cached) == 3  # step, the folder's and the shapes'
  # The shipped CIFAR-10 list (names and 18 templates), not the folder names with one template.
  np.testing.assert_allclose(cached[key], classifier, atol=2e-6)
  for k in (1, 5):
    expected = _topk(z, labels, classifier, k)
    # float32 on 8 devices vs float64 here: a near-tie may go the other way, one image at most.
    assert results[f'zeroshot/{FOLDER_KEY}/top{k}'] == pytest.approx(expected, abs=1 / len(z)), k


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_cache_hit_reads_the_file_and_a_new_step_replaces_it(run, folder):
  path = run / files.ZEROSHOT_CACHE_FILE
  before, stat = json.loads((run / files.EVAL_FILE).read_text()), os.stat(path)
  assert trained.evaluate_workdir(str(run)) == before  # same mesh: the same numbers
  after = os.stat(path)
  assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # not rewritten

  # A hit uses what the file holds: here, each class's mean image embedding,
  # which classifies the constant-color images far better than the prompts.
  exp, state = trained.load_trained(str(run))
  _, z, labels = _reference(exp, state, folder)
  cached = _cache(run)
  key = zeroshot_cache.cache_key(0, evaluator.weights_fingerprint(state.params),
                                 *zeroshot_lists.load('cifar10'), exp.tokenizer.spec())
  means = np.stack([z[labels == c].mean(0) for c in range(len(CIFAR10))])
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  np.savez(path, **{**cached, key: means.astype(np.float32)})
  tampered = trained.evaluate_workdir(str(run))[f'zeroshot/{FOLDER_KEY}/top1']
  assert tampered == pytest.approx(_topk(z, labels, means, 1), abs=1 / len(z))
  assert tampered > before[f'zeroshot/{FOLDER_KEY}/top1'] + 0.2, (tampered, before)

  # A new checkpoint (step 1, other weights): computed again, the file holds step 1 alone.
  new = state.replace(step=jnp.int32(1), params=jax.tree.map(lambda x: x * 1.5, state.params))
  manager = checkpoints.checkpoint_manager(str(run), exp.config.keep_checkpoints)
  checkpoints.save_checkpoint(manager, new)
  checkpoints.finish_checkpoints(manager)
  manager.close()
  results = trained.evaluate_workdir(str(run))
  assert results['step'] == 1
  cached = _cache(run)
  assert int(cached['step']) == 1 and len(cached) == 3 and key not in cached
  classifier, z, labels = _reference(exp, new, folder)
  assert results[f'zeroshot/{FOLDER_KEY}/top1'] == pytest.approx(_topk(z, labels, classifier, 1),
                                                                 abs=1 / len(z))


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_cli_zeroshot_flag_and_one_line_errors(run, folder, tmp_path):
  workdir = tmp_path / 'wd'
  shutil.copytree(run, workdir)
  saved = (workdir / files.CONFIG_FILE).read_text()
  wd = ['eval', '--workdir', str(workdir)]
  with_empty = tmp_path / 'with_empty'  # an emptied class, and a folder of notes
  shutil.copytree(folder, with_empty)
  (with_empty / 'zebra').mkdir()
  (with_empty / 'docs').mkdir()
  (with_empty / 'docs' / 'readme.txt').write_text('not an image')
  cases = {
      'ok': (wd + ['--zeroshot', f'folder:{folder}=cifar10', '--retrieval',
                   'captioned_shapes:test'], None),
      'unprepared': (wd + ['--zeroshot', 'cifar100'],
                     "eval.zeroshot: TFDS dataset 'cifar100' is not prepared under"),
      'unknown': (wd + ['--zeroshot', 'no_such_set'], "no TFDS dataset named 'no_such_set'"),
      'no folder': (wd + ['--zeroshot', f'folder:{tmp_path}/none'], 'is not a folder'),
      'class folders without images': (
          wd + ['--zeroshot', f'folder:{with_empty}'],
          f"eval.zeroshot 'folder:{with_empty}': 2 class folder(s) of {with_empty} hold no image "
          f'(.png, .jpg, .jpeg, .bmp, .gif, .webp): docs, zebra; every class folder is a label, '
          f'so remove them or add images'),
      'list': (wd + ['--zeroshot', f'folder:{folder}=cifar100'],
               "zero-shot list 'cifar100' has 100 classes, the dataset 10"),
      'channels': (wd + ['--zeroshot', 'digits'], "'digits': its images have 1 channel(s)"),
      'no captions': (wd + ['--retrieval', 'digits'], "retrieval reads the features 'image'"),
      'train flag': (['train', '--config', CLIP_CONFIG, '--workdir', str(tmp_path / 'x'),
                      '--zeroshot', 'cifar10'], 'jaxcl train does not take --zeroshot'),
  }
  results = dict(zip(cases, cli_in_forks([argv for argv, _ in cases.values()])))
  assert results['ok']['code'] == 0, results['ok']['stderr'][-2000:]
  for name, (_, message) in cases.items():
    if message is None:
      continue
    lines = results[name]['stderr'].strip().splitlines()
    assert results[name]['code'] == 2 and len(lines) == 1, (name, results[name])
    assert lines[0].startswith('jaxcl: error: ') and message in lines[0], (name, lines)
  assert "file_format='array_record'" in results['unprepared']['stderr']
  assert not (tmp_path / 'x').exists()
  got = json.loads((workdir / files.EVAL_FILE).read_text())
  assert (workdir / files.CONFIG_FILE).read_text() == saved  # the flag changes no saved config
  assert f'zeroshot/{FOLDER_KEY}/top1' in got and 'zeroshot/captioned_shapes/top1' not in got
  for key in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10'):
    # The run's own retrieval split: the same images and captions, on one device.
    assert got[f'retrieval/captioned_shapes:test/{key}'] == pytest.approx(got[key], abs=1e-3)
  assert files.ZEROSHOT_CACHE_FILE in files.WORKDIR_NAMES
