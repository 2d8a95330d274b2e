"""SimCLR (Chen et al. 2020): two augmented views of each image, NT-Xent
over the 2N views of the global batch; evaluated by kNN and a linear probe
on the frozen encoder's features."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxcl import losses, models
from jaxcl.data import augment
from jaxcl.evaluation import probes
from jaxcl.methods import base


class SimCLREvalData:
  """The labeled splits the frozen encoder is evaluated on: the kNN bank and
  the probe train on `train`, both are scored on `test`."""

  def __init__(self, config, dataset):
    d = config.dataset
    self.num_classes, self.train, self.test = 0, None, None
    missing = base.missing_eval_split(config.dataset, dataset)
    if missing:  # an image folder without test/: trained, not evaluated
      self.skip_reason = f'{missing} does not exist'
      return
    self.skip_reason = 'the evaluation splits have no labels'
    self.train, info = dataset.split(d.eval_train_split)
    self.test, _ = dataset.split(d.eval_test_split)
    self.num_classes = info.num_classes

  @property
  def evaluates(self) -> bool:
    return self.num_classes > 0


class SimCLR(base.Method):
  name = 'simclr'
  image_output = 'L2-normalized encoder features (before the projection head)'
  skipped_without_labels = 'kNN and linear probe are skipped'
  monitor_metrics = ('knn_top1', 'linear_top1')
  num_views = 2

  def rankable_metrics(self, config):
    del config
    return ('knn_top1', 'linear_top1')

  def build_model(self, config, in_channels, rngs, tokenizer=None):
    m = config.model
    encoder = models.build_image_encoder(m, in_channels, config.augment.image_size, rngs)
    head = models.ProjectionHead(encoder.num_features, m.head_hidden, m.head_out, m.head_layers,
                                 rngs=rngs)
    temperature = models.build_temperature(config.temperature, config.total_steps, m.head_out,
                                           rngs)
    return models.SimCLRModel(encoder=encoder, head=head, temperature=temperature)

  def model_inputs(self, keys, batch, config):
    images = batch['image']
    view1, view2 = augment.random_views(keys, images, config.augment)
    # Interleave the views, [N, 2, ...] -> [2N, ...], so each device's rows stay on it.
    views = jnp.stack([view1, view2], axis=1).reshape(2 * images.shape[0], *view1.shape[1:])
    return base.standardize(views, config.dataset)

  def embeddings(self, model, inputs):
    z = model(inputs).reshape(inputs.shape[0] // 2, 2, -1)
    return z[:, 0], z[:, 1]

  def image_anchors(self, model, images):
    return model(images)  # the projection head's output, not the encoder's features

  def loss(self, a, b, temperature, bias, options, state=None):
    del bias
    return losses.nt_xent(a, b, temperature, options, state=state)

  def open_eval_data(self, config, dataset):
    return SimCLREvalData(config, dataset)

  def evaluate(self, encoders, eval_data):
    """{'knn_top1', 'linear_top1'} ({} when the splits have no labels)."""
    if not eval_data.num_classes:
      return {}
    cfg = encoders.config.eval
    extract = functools.partial(probes.extract_features, encoders.image, encoders.mesh,
                                batch_size=cfg.batch_size)
    train = extract(eval_data.train, max_examples=cfg.max_train_examples or None,
                    seed=encoders.config.seed)
    test = extract(eval_data.test)
    return probes.evaluate_features(train, test, eval_data.num_classes, cfg)


METHOD = SimCLR()
