"""Captioned shapes: an embedded, procedurally generated image-text dataset.

Each image (S x S RGB, uint8) shows one shape (probability 0.7) or two shapes
in different cells of a 3x3 grid on a dark, slightly noisy background. A
shape has one of 6 colors, one of 4 forms, one of 2 sizes and one of 9
positions; each image comes with 3 captions in different phrasings, most of
them naming all four attributes, some leaving out the position or the size
(as real captions vary in detail), e.g.

    a small red circle in the top left
    top left: a small red circle
    there is a small red circle in the top left of the image

so a contrastive image-text model has to bind color, form, size and place.
Single-shape images also carry a class label, the color-form combination
(24 classes, CLASS_NAMES); two-shape images have label -1. Zero-shot
classification prompts the text tower with ZEROSHOT_TEMPLATES filled with
the class names.

Everything is NumPy and deterministic from a seed: no network, no files.
`CaptionedShapes` is the TFDS builder (registered as 'captioned_shapes'):
train = generate(0, 10_000), test = generate(1, 1_000) at 32 x 32, records in
generation order, prepared locally in a few seconds.
"""

from __future__ import annotations

import io
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# Well separated in RGB (every pair >= 100 apart) so that a color word is
# unambiguous after the per-image jitter below.
COLORS = {
    'red': (225, 35, 35),
    'green': (35, 195, 55),
    'blue': (45, 85, 235),
    'yellow': (235, 220, 35),
    'purple': (165, 55, 215),
    'cyan': (35, 215, 225),
}
FORMS = ('circle', 'square', 'triangle', 'diamond')
SIZES = ('small', 'large')
# The 3x3 grid, row-major: POSITIONS[3 * row + col].
POSITIONS = ('top left', 'top', 'top right',
             'left', 'center', 'right',
             'bottom left', 'bottom', 'bottom right')
# How a caption puts each position after a noun ("a red circle at the top").
PLACES = {
    'top left': 'in the top left', 'top': 'at the top', 'top right': 'in the top right',
    'left': 'on the left', 'center': 'in the center', 'right': 'on the right',
    'bottom left': 'in the bottom left', 'bottom': 'at the bottom',
    'bottom right': 'in the bottom right',
}

# Color-major: label = color_index * len(FORMS) + form_index.
CLASS_NAMES = tuple(f'{color} {form}' for color in COLORS for form in FORMS)

# Prompts for zero-shot classification, in the captions' own phrasing;
# prompt ensembling averages the text embeddings over them.
ZEROSHOT_TEMPLATES = (
    'a {}',
    'a small {}',
    'a large {}',
    'a {}, small',
    'a {}, large',
    'there is a {} in the image',
)

ONE_SHAPE_PROBABILITY = 0.7
CAPTIONS_PER_IMAGE = 3
# Shape radius (center to farthest point) as a fraction of the image side:
# ~4-5 px and ~8-9 px at S = 32.
RADIUS = {'small': (0.12, 0.155), 'large': (0.245, 0.28)}
COLOR_JITTER = 12  # +- per channel and shape
BACKGROUND_MAX = 40  # background channels in [0, 40) ...
BACKGROUND_NOISE = 3.0  # ... plus Gaussian pixel noise of this std

# Caption templates. One shape: s = size, c = color, f = form, pos = position
# name, place = PLACES[pos]. Like real captions they vary in detail: most
# name all four attributes, some leave out the position or the size.
_ONE = (
    'a {s} {c} {f} {place}',
    'a {c} {f}, {s}, {place}',
    '{pos}: a {s} {c} {f}',
    'there is a {s} {c} {f} {place} of the image',
    'a picture of a {s} {c} {f} {place}',
    'a {s} {c} {f}',
    'a {c} {f} {place}',
    'a {c} {f}',
)
# Two shapes: the same attributes with suffixes 1 and 2, in drawing order.
_TWO = (
    'a {s1} {c1} {f1} {place1} and a {s2} {c2} {f2} {place2}',
    '{pos1}: a {s1} {c1} {f1}; {pos2}: a {s2} {c2} {f2}',
    '{s1} {c1} {f1} {place1}, {s2} {c2} {f2} {place2}',
    'a {c1} {f1} ({s1}, {pos1}) and a {c2} {f2} ({s2}, {pos2})',
    'a {c1} {f1} and a {c2} {f2}',
)
# Two shapes may touch but not cover each other: their centers are at least
# this fraction of the sum of their radii apart.
_MIN_SEPARATION = 0.85


def generate(seed: int, num_images: int, image_size: int = 32,
             canvases: tuple[tuple[int, int], ...] = (), geometry: bool = False) -> list[dict]:
  """`num_images` captioned images, the same for the same arguments.

  Returns a list of dicts
    'image': uint8 [S, S, 3] with S = image_size, or [H, W, 3] with (H, W)
      drawn from `canvases` for each image (the 3 x 3 cells then span each
      side, and a shape's radius is a fraction of the shorter side),
    'captions': list of CAPTIONS_PER_IMAGE distinct str,
    'label': int, the CLASS_NAMES index for one shape, -1 for two;
  with `geometry` (the same images: it draws no random number) also
    'boxes': float32 [k, 4], each shape's (top, left, bottom, right) as
      fractions of the height and width: the box of the pixels it covers at
      least half of, in drawing order,
    'box_labels': int32 [k], each shape's CLASS_NAMES index,
    'box_captions': [k] str, each shape described ("small red circle"),
    'segmentation': uint8 [H, W], 1 + the class of the shape covering at
      least half of each pixel (the later one where two do), 0 elsewhere.
  """
  rng = np.random.default_rng(seed)
  if not canvases:
    # Pixel centers, shared by every shape's rasterization.
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing='ij')
    return [_example(rng, (image_size, image_size), ys, xs, geometry)
            for _ in range(num_images)]
  # The canvas from a stream of its own: the shapes' stream is the square one's.
  picks = np.random.default_rng([seed, len(canvases)]).integers(len(canvases), size=num_images)
  grids = {}
  for h, w in canvases:
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5,
                         np.arange(w, dtype=np.float32) + 0.5, indexing='ij')
    grids[(h, w)] = ys, xs
  return [_example(rng, canvases[i], *grids[canvases[i]], geometry) for i in picks]


def _example(rng, canvas, ys, xs, geometry: bool = False) -> dict:
  num_shapes = 1 if rng.random() < ONE_SHAPE_PROBABILITY else 2
  shapes = _layout(rng, canvas, num_shapes)
  background = rng.integers(0, BACKGROUND_MAX, size=3).astype(np.float32)
  image = background + rng.normal(0.0, BACKGROUND_NOISE, (*canvas, 3)).astype(np.float32)
  alphas = []
  for shape in shapes:
    base = np.asarray(COLORS[shape['color']], np.float32)
    color = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    alpha = _coverage(shape['form'], ys - shape['y'], xs - shape['x'], shape['radius'])
    image = image * (1.0 - alpha[..., None]) + color * alpha[..., None]
    alphas.append(alpha)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  templates = _ONE if num_shapes == 1 else _TWO
  chosen = rng.choice(len(templates), CAPTIONS_PER_IMAGE, replace=False)
  captions = [_caption(templates[i], shapes) for i in chosen]
  classes = [list(COLORS).index(shape['color']) * len(FORMS) + FORMS.index(shape['form'])
             for shape in shapes]
  example = {'image': image, 'captions': captions,
             'label': classes[0] if num_shapes == 1 else -1}
  if not geometry:
    return example
  described = [f"{shape['size']} {shape['color']} {shape['form']}" for shape in shapes]
  return {**example, **_geometry(alphas, classes), 'box_captions': described}


def _geometry(alphas: list, classes: list) -> dict:
  """generate's 'boxes', 'box_labels' and 'segmentation' of the shapes'
  coverages (float32 [H, W] each, in drawing order) and classes."""
  height, width = alphas[0].shape
  segmentation = np.zeros((height, width), np.uint8)
  boxes = []
  for alpha, label in zip(alphas, classes):
    inside = alpha >= 0.5
    segmentation[inside] = label + 1
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    boxes.append([rows[0] / height, cols[0] / width, (rows[-1] + 1) / height,
                  (cols[-1] + 1) / width])
  return {'boxes': np.asarray(boxes, np.float32), 'box_labels': np.asarray(classes, np.int32),
          'segmentation': segmentation}


def _layout(rng, canvas, num_shapes) -> list[dict]:
  """Attributes and pixel geometry of `num_shapes` shapes in distinct cells
  of a canvas (height, width)."""
  height, width = canvas
  size = min(canvas)
  cell_y, cell_x = height / 3, width / 3
  while True:  # rejection sampling: two large shapes in nearby cells would overlap
    cells = rng.choice(9, num_shapes, replace=False)
    shapes = []
    for c in cells:
      row, col = divmod(int(c), 3)
      size_name = SIZES[rng.integers(len(SIZES))]
      radius = rng.uniform(*RADIUS[size_name]) * size
      # Jitter within the cell, then pull the center in so the whole shape
      # stays inside the image (large shapes in corner cells move inward, but
      # their centers stay in their cell).
      y = (row + 0.5) * cell_y + rng.uniform(-cell_y / 4, cell_y / 4)
      x = (col + 0.5) * cell_x + rng.uniform(-cell_x / 4, cell_x / 4)
      y = float(np.clip(y, radius + 0.5, height - radius - 0.5))
      x = float(np.clip(x, radius + 0.5, width - radius - 0.5))
      shapes.append({'color': list(COLORS)[rng.integers(len(COLORS))],
                     'form': FORMS[rng.integers(len(FORMS))],
                     'size': size_name, 'position': POSITIONS[int(c)],
                     'radius': radius, 'y': y, 'x': x})
    if num_shapes == 1:
      return shapes
    a, b = shapes
    if np.hypot(a['y'] - b['y'], a['x'] - b['x']) >= _MIN_SEPARATION * (a['radius'] + b['radius']):
      return shapes


def _coverage(form, dy, dx, r) -> np.ndarray:
  """Fraction of each pixel inside the shape: float32 [S, S] in [0, 1].

  dy, dx: pixel centers relative to the shape's center; r: its radius. Uses
  a signed distance to the outline (negative inside), so edges are
  anti-aliased over one pixel.
  """
  if form == 'circle':
    distance = np.sqrt(dy * dy + dx * dx) - r
  elif form == 'square':
    distance = np.maximum(np.abs(dy), np.abs(dx)) - r / np.sqrt(2.0)  # corners on the circle
  elif form == 'diamond':
    distance = (np.abs(dy) + np.abs(dx) - r) / np.sqrt(2.0)
  elif form == 'triangle':
    # Equilateral, pointing up, inscribed in the circle of radius r, so its
    # centroid is the shape's center: the intersection of three half-planes.
    base = dy - r / 2
    # The sides' outward unit normals are (-1/2, +-sqrt(3)/2) in (y, x); every
    # side is r / 2 (the inradius) from the center.
    sides = -0.5 * dy + np.sqrt(3.0) / 2 * np.abs(dx) - r / 2
    distance = np.maximum(base, sides)
  else:
    raise ValueError(f'unknown form {form!r}')
  return np.clip(0.5 - distance, 0.0, 1.0).astype(np.float32)


def _caption(template: str, shapes: list[dict]) -> str:
  if len(shapes) == 1:
    (shape,) = shapes
    return template.format(s=shape['size'], c=shape['color'], f=shape['form'],
                           pos=shape['position'], place=PLACES[shape['position']])
  fields = {}
  for i, shape in enumerate(shapes, 1):
    fields.update({f's{i}': shape['size'], f'c{i}': shape['color'], f'f{i}': shape['form'],
                   f'pos{i}': shape['position'], f'place{i}': PLACES[shape['position']]})
  return template.format(**fields)


# -------------------------------------------------------------- the builder ---
class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural captioned shapes: 32x32 RGB, 3 captions each, 24 classes."""

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'train = generate(0, 10000), test = generate(1, 1000), 32x32.',
      '1.1.0': 'Captions vary in detail: some leave out the position or the size.',
      '1.2.0': 'Each shape\'s box, class and description, and a segmentation map (the same '
               'images).'}
  IMAGE_SIZE = 32
  # split: (seed, number of images)
  SPLITS: ClassVar[dict[str, tuple[int, int]]] = {'train': (0, 10_000), 'test': (1, 1_000)}

  def _info(self):
    size = self.IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Procedurally generated shapes (6 colors x 4 forms x 2 sizes x 9 '
                     'positions, one or two per image) with 3 captions per image; label = '
                     'color-form class for one-shape images, -1 for two-shape images.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
            # Encodes and decodes without TensorFlow; decodes to an object
            # array of UTF-8 bytes.
            'captions': tfds.features.Tensor(shape=(None,), dtype=np.object_),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            # generate(geometry=True): boxes (top, left, bottom, right) as fractions,
            # their classes and descriptions, and 1 + the class of each pixel (0: background)
            'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            'box_labels': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'box_captions': tfds.features.Tensor(shape=(None,), dtype=np.object_),
            'segmentation': tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
        }),
        # Records stay in generation order: source[i] == generate(seed, n)[i].
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    return {split: self._generate_examples(seed, num)
            for split, (seed, num) in self.SPLITS.items()}

  def _generate_examples(self, seed, num_images):
    yield from enumerate(generate(seed, num_images, self.IMAGE_SIZE, geometry=True))


class CaptionedShapesFlex(tfds.core.GeneratorBasedBuilder):
  """Captioned shapes on wide, tall and square canvases of about 1,000 pixels
  (CANVASES), stored as PNG: SigLIP 2's NaFlex keeps each aspect ratio, a
  square resize squashes the forms."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'train = generate(0, 10000, canvases), test = generate(1, 1000, canvases).'}
  # (height, width): 1:1, 1:2, 2:1, 1:3, 3:1; the shorter side is at least 20 pixels.
  CANVASES = ((32, 32), (24, 48), (48, 24), (20, 60), (60, 20))
  SPLITS: ClassVar[dict[str, tuple[int, int]]] = CaptionedShapes.SPLITS

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Captioned shapes (as captioned_shapes) on canvases of several aspect '
                     'ratios, PNG-encoded.'),
        features=tfds.features.FeaturesDict({
            # Encoded bytes that TFDS stores as given (no TensorFlow); jaxcl decodes them.
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'captions': tfds.features.Tensor(shape=(None,), dtype=np.object_),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(seed, num)
            for split, (seed, num) in self.SPLITS.items()}

  def _generate_examples(self, seed, num_images):
    for index, example in enumerate(generate(seed, num_images, canvases=self.CANVASES)):
      yield index, {**example, 'image': _png(example['image'])}


def _png(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='PNG')
  return out.getvalue()
