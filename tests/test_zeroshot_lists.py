"""The shipped zero-shot class names and templates: their counts, their
form, agreement with open_clip's copy of CLIP's ImageNet lists, and the
TFDS name mapping."""

import collections
import importlib.resources
import json
import subprocess
import sys

import pytest

from jaxcl.evaluation import zeroshot_lists

COUNTS = {'imagenet': (1000, 80), 'imagenet_simple': (1000, 7),
          'cifar10': (10, 18), 'cifar100': (100, 18)}


def test_names_are_the_shipped_files():
  files = importlib.resources.files('jaxcl.evaluation.zeroshot_lists')
  shipped = {p.name[:-len('.json')] for p in files.iterdir() if p.name.endswith('.json')}
  assert shipped == set(zeroshot_lists.NAMES) == set(COUNTS)


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_counts_and_form(name):
  class_names, templates = zeroshot_lists.load(name)
  assert (len(class_names), len(templates)) == COUNTS[name]
  assert isinstance(class_names, tuple) and isinstance(templates, tuple)
  assert all(isinstance(n, str) and n and n == n.strip() for n in class_names)
  assert len(set(templates)) == len(templates)
  for template in templates:
    assert template.count('{}') == 1, template
    assert template.count('{') == template.count('}') == 1, template
    assert template.format('X') == template.replace('{}', 'X')


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_each_file_names_its_source(name):
  folder = importlib.resources.files('jaxcl.evaluation.zeroshot_lists')
  text = folder.joinpath(f'{name}.json').read_text()
  data = json.loads(text)
  assert set(data) == {'source', 'class_names', 'templates'}
  assert data['source'].startswith('https://github.com/openai/CLIP/')


def test_class_names_unique_except_clips_two_imagenet_duplicates():
  for name in ('cifar10', 'cifar100'):
    class_names, _ = zeroshot_lists.load(name)
    assert len(set(class_names)) == len(class_names), name
  class_names, _ = zeroshot_lists.load('imagenet')
  repeated = {n: [i for i, m in enumerate(class_names) if m == n]
              for n, k in collections.Counter(class_names).items() if k > 1}
  # As CLIP published them: 'projectile, missile' and 'missile'; 'sunglass' and 'sunglasses'.
  assert repeated == {'missile': [657, 744], 'sunglasses': [836, 837]}


def test_imagenet_simple_is_a_subset_with_the_same_names():
  names, templates = zeroshot_lists.load('imagenet')
  simple_names, simple = zeroshot_lists.load('imagenet_simple')
  assert simple_names == names
  assert set(simple) <= set(templates)
  assert simple[0] == 'itap of a {}.'


def test_cifar_label_order():
  assert zeroshot_lists.load('cifar10')[0] == (
      'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
  # CIFAR-100's fine labels are alphabetical with '_' for the space.
  fine = [n.replace(' ', '_') for n in zeroshot_lists.load('cifar100')[0]]
  assert fine == sorted(fine)
  assert zeroshot_lists.load('cifar10')[1] == zeroshot_lists.load('cifar100')[1]


def _render(template):
  """open_clip's templates are functions of the class name."""
  if callable(template):
    text = template('\0')
    assert text.count('\0') == 1
    return text.replace('\0', '{}')
  return template


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_imagenet_lists_equal_open_clips():
  zero_shot_metadata = pytest.importorskip('open_clip.zero_shot_metadata')
  names, templates = zeroshot_lists.load('imagenet')
  assert names == tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
  assert templates == tuple(map(_render, zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES))
  _, simple = zeroshot_lists.load('imagenet_simple')
  assert simple == tuple(map(_render, zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES))


def test_unknown_name():
  with pytest.raises(ValueError,
                     match=r"unknown zero-shot list 'imagenet1k'; known: imagenet, ") as e:
    zeroshot_lists.load('imagenet1k')
  assert '\n' not in str(e.value)
  for name in zeroshot_lists.NAMES:
    assert name in str(e.value)


@pytest.mark.parametrize('tfds_name, expected', [
    ('imagenet2012', 'imagenet'), ('imagenet_v2', 'imagenet'),
    ('imagenet2012_real', 'imagenet'), ('imagenet_sketch', 'imagenet'),
    ('cifar10', 'cifar10'), ('cifar100', 'cifar100'),
    ('imagenet2012:5.1.0', 'imagenet'), ('imagenet_v2/matched-frequency', 'imagenet'),
    ('imagenet_v2/topimages:3.0.0', 'imagenet'), ('cifar10:3.0.2', 'cifar10'),
    ('imagenet_a', None), ('imagenet_r', None),  # 200-class subsets: no list shipped
    ('cifar10_corrupted', None), ('mnist', None), ('coco_captions', None), ('', None),
])
def test_for_dataset(tfds_name, expected):
  assert zeroshot_lists.for_dataset(tfds_name) == expected
  if expected:
    zeroshot_lists.load(expected)


def test_imports_no_runtime():
  code = ('import sys; from jaxcl.evaluation import zeroshot_lists; '
          'zeroshot_lists.load("imagenet"); '
          'print(sorted(m for m in ("jax", "numpy", "flax", "tensorflow", "tensorflow_datasets") '
          'if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout
