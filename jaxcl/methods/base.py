"""The interface every contrastive method implements (see jaxcl.methods).

A Method is stateless: the trainer, the evaluation and export call its hooks
with the config and the arrays; which method runs is decided once, by
`jaxcl.methods.get(config.method)`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcl.data import augment
from jaxcl.models import temperature as temperature_lib


@dataclasses.dataclass
class Encoders:
  """A frozen model's jitted embedding functions, bound to its weights, for
  evaluation: `image` (uint8 images [b, H, W, C] -> [b, D]) and, for a
  method with a text tower, `text` (token ids int32 [b, L] -> [b, D]).
  workdir, step, weights: where evaluation may cache what depends only on
  the weights (jaxcl.evaluation.zeroshot_cache), their step and fingerprint; workdir
  None: nothing is cached. temperature: the model's τ at that step (zero-shot
  calibration)."""
  config: Any
  mesh: jax.sharding.Mesh
  image: Callable
  text: Callable | None = None
  tokenizer: Any = None
  workdir: Any = None
  step: int = 0
  weights: str = ''
  temperature: float = 1.0
  logit_transform: str = 'linear'
  # A ViT's patch tokens of uint8 images, flattened [b, patches x width] (the patch probe).
  patch_tokens: Callable | None = None
  # The decoder's teacher-forced logits of (uint8 images, ids) (config.decoder).
  decoder: Callable | None = None


class Method(abc.ABC):
  """What differs between contrastive methods."""

  name: str
  # The arrays of a host batch the step reads (records carry more: labels).
  batch_keys: tuple[str, ...] = ('image',)
  # Augmented views of each image per step: model_inputs gets this many keys per row.
  num_views: int = 1
  # Softmax directions with a τ each under temperature.per_direction (CLIP's two).
  directions: int = 1
  # Whether the loss is a softmax over candidates (SigLIP's is not): SogCLR's
  # estimator (loss.estimator) replaces its denominator.
  softmax_loss: bool = True
  # Whether the model has a text tower: records carry captions, a tokenizer
  # is built and saved, and export writes a text embedder.
  text_tower: bool = False
  # What the exported image embedder returns, for its FILE.json.
  image_output = ''
  # What the run's log says when the evaluation data has no labels.
  skipped_without_labels = ''
  # Evaluation results that score a run, best first: the first one present
  # ranks candidates (jaxcl.halving), higher is better.
  monitor_metrics: tuple[str, ...] = ()
  # The parts init.load can name (presets.LOADABLE): part -> {role: the model
  # attribute holding it}. Loading a part copies each role both models have,
  # so a SimCLR encoder becomes a CLIP image encoder (LiT).
  towers: dict = {'image': {'encoder': 'encoder'},
                  'temperature': {'temperature': 'temperature', 'bias': 'bias'}}

  def check_config(self, config) -> None:
    """Raises errors.ConfigError for values this method cannot run with."""

  @abc.abstractmethod
  def build_model(self, config, in_channels: int, rngs, tokenizer=None):
    """The nnx model; `tokenizer` (text towers only) sizes the vocabulary."""

  @abc.abstractmethod
  def model_inputs(self, keys, batch: dict, config):
    """The model's inputs for one step, made outside the gradient: the
    augmented, standardized views of batch['image'] [n, ...] (and the token
    ids); keys [n, num_views] (augment.view_keys): row i's randomness."""

  @abc.abstractmethod
  def embeddings(self, model, inputs):
    """The two embedding sets the loss contrasts: (a [n, D], b [n, D])."""

  @abc.abstractmethod
  def loss(self, a, b, temperature, bias, options, state=None):
    """The method's loss over the global batch (a jaxcl.losses.LossResult);
    options: a losses.LossOptions; state: a per-anchor estimator's state
    (jaxcl.losses.estimators), for the methods whose loss takes one."""

  def temperature(self, model, step, embeddings=None):
    """τ for the loss at `step`: a float32 scalar (or, per direction,
    [directions]); a predicted τ, from the anchors' embeddings (a, b) [n, D]:
    [n, 2], each row's τ as an a anchor and as a b anchor."""
    if embeddings is not None and model.temperature.predicts:
      return jnp.stack([model.temperature.of_embeddings(z) for z in embeddings], axis=1)
    return model.temperature(step)

  def temperature_metrics(self, tau) -> dict:
    """What the step logs about the τ that `temperature` gave."""
    if jnp.ndim(tau) == 2:  # one per anchor
      return temperature_lib.distribution_metrics(tau)
    return {'temperature': tau, 'inv_temperature': 1.0 / tau}

  def image_anchors(self, model, images):
    """The embeddings the loss contrasts for standardized images [b, ...]
    (what a predicted τ reads): [b, D]."""
    return model.embed(images)

  def bias(self, model):
    """The learned logit bias the loss takes, or None."""
    del model
    return None

  def describe_model(self, config, tokenizer) -> str:
    """What the run's first line says of the model beyond the image tower."""
    del config, tokenizer
    return ''

  def record_transform(self, tokenizer):
    """A grain random_map function applied to training records, or None."""
    del tokenizer
    return None

  @abc.abstractmethod
  def open_eval_data(self, config, dataset):
    """The evaluation splits, opened from a jaxcl.data.Dataset; the object
    has `num_classes`, `skip_reason` and `evaluates` (whether `evaluate`
    computes anything)."""

  @abc.abstractmethod
  def evaluate(self, encoders: Encoders, eval_data) -> dict:
    """The frozen model's evaluation metrics (fractions in [0, 1])."""

  @abc.abstractmethod
  def rankable_metrics(self, config) -> tuple[str, ...]:
    """Every score `evaluate` writes under `config` that can rank runs
    (jaxcl.halving's --monitor), higher being better: not ECE or uniformity
    (better low), nor tolerance (no score)."""

  def export_paths(self, output) -> list:
    """The files an export to `output` writes beside the image embedder."""
    del output
    return []

  def export_artifacts(self, exp, params, batch_stats, output, facts: dict, export_fn):
    """({path: bytes}, metadata) that export adds for this method beside the
    image embedder. export_fn(fn, input ShapeDtypeStruct) -> jax.export.Exported;
    facts: the run's data facts (jaxcl.workdir.run_files)."""
    del exp, params, batch_stats, output, facts, export_fn
    return {}, {}

  def export_facts(self, config, dataset, eval_data=None) -> dict:
    """What export needs to know about the data beyond the image shape,
    saved in the workdir (data_facts.json) so export runs without the
    dataset: from the run's open `eval_data`, or read from `dataset`."""
    del config, dataset, eval_data
    return {}


def missing_eval_split(dataset_config, dataset) -> str | None:
  """An image folder's absent evaluation split folder (the run then trains
  without evaluating), or None."""
  d = dataset_config
  return dataset.missing_split(d.eval_train_split) or dataset.missing_split(d.eval_test_split)


def standardize(images, dataset_config):
  """float32 images in [0, 1] -> the encoder's normalized input (the
  dataset group's mean and std); NaFlex images ({'patches': uint8, 'grid'})
  -> their patches standardized, the grid as it is."""
  d = dataset_config
  if isinstance(images, dict):
    return {'patches': augment.standardize_patches(images['patches'], d.mean, d.std),
            'grid': images['grid']}
  return augment.standardize(images, d.mean, d.std)
