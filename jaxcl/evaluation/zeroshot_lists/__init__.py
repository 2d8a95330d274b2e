"""The class names and prompt templates CLIP published for zero-shot
classification, shipped as data (one JSON file per list set, each naming
its source): a leaf that imports no jax, numpy or other part of jaxcl.

- 'imagenet': CLIP's 1000 curated ImageNet-1k class names (in the label
  order of TFDS imagenet2012) and its 80 templates.
- 'imagenet_simple': the same names and the 7 of those templates that
  forward selection chose (CLIP's notebook; a bit better than the 80).
- 'cifar10', 'cifar100': the CLIP paper's names (in TFDS label order;
  cifar100's are the 100 fine labels) and 18 templates.

Templates hold one '{}' for the class name: ``template.format(name)``.
CLIP's ImageNet names are not unique: 'missile' (labels 657, 744) and
'sunglasses' (836, 837) appear twice, as published.
"""

from __future__ import annotations

import functools
import importlib.resources
import json

NAMES = ('imagenet', 'imagenet_simple', 'cifar10', 'cifar100')

# TFDS dataset (no version or config) -> the list of its label space. Not
# imagenet_a / imagenet_r: they label 200-class subsets of ImageNet.
_TFDS = {
    'imagenet2012': 'imagenet',
    'imagenet_v2': 'imagenet',
    'imagenet2012_real': 'imagenet',
    'imagenet_sketch': 'imagenet',
    'cifar10': 'cifar10',
    'cifar100': 'cifar100',
}


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(class names, templates) of the list set `name` (one of NAMES)."""
  if name not in NAMES:
    raise ValueError(f'unknown zero-shot list {name!r}; known: {", ".join(NAMES)}')
  text = importlib.resources.files(__name__).joinpath(f'{name}.json').read_text(
      encoding='utf-8')
  data = json.loads(text)
  return tuple(data['class_names']), tuple(data['templates'])


def for_dataset(tfds_name: str) -> str | None:
  """The list set for a TFDS dataset ('imagenet2012', 'cifar10:3.0.2',
  'imagenet_v2/matched-frequency', ...), or None when jaxcl ships none."""
  return _TFDS.get(tfds_name.split(':')[0].split('/')[0])
