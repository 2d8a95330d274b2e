"""What CLIP and SigLIP share: an image and a text tower projected to one
space, trained on (image, caption) pairs, evaluated by zero-shot
classification and image-text retrieval. The two differ only in their loss
(and SigLIP's logit bias): jaxcl.methods.clip, jaxcl.methods.siglip."""

from __future__ import annotations

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxcl import data, errors, files, models, presets
from jaxcl.data import augment
from jaxcl.evaluation import decoder_eval, patch_probe, probes, zeroshot_cache, zeroshot_suite
from jaxcl.methods import base
from jaxcl.text import tokenizers

# Recall@1/5/10 both ways: what the retrieval evaluation writes (evaluate.retrieval_recall).
RECALLS = tuple(f'{direction}_r{k}' for direction in ('i2t', 't2i') for k in (1, 5, 10))


class TwoTowerEvalData:
  """The test split with its captions (retrieval), a labeled split with
  class names and prompt templates (zero-shot; by default the same split),
  and the suite of eval.zeroshot and eval.retrieval (`suite`, `retrieval`:
  lists of jaxcl.evaluation.zeroshot_suite.Opened)."""

  def __init__(self, config, dataset):
    d = config.dataset
    self.num_classes, self.class_names, self.templates = 0, (), ()
    self.test = self.zeroshot = self.patches = None
    entries = [zeroshot_suite.parse_all(config.eval[group], group)
               for group in zeroshot_suite.GROUPS]
    channels = (dataset.training(with_text=True)[1].image_shape[-1]
                if any(entries) else 0)
    self.suite, self.retrieval = ([zeroshot_suite.open_entry(entry, config, channels)
                                   for entry in group] for group in entries)
    missing = base.missing_eval_split(config.dataset, dataset)
    if missing:
      self.skip_reason = f'{missing} does not exist'
      return
    self.skip_reason = 'the evaluation splits have no labels'
    self.test, _ = dataset.split(d.eval_test_split, with_text=True)
    self.captions = _captions(self.test)
    self.zeroshot, self.class_names, self.templates = zeroshot_data(config, dataset,
                                                                    with_captions=True)
    self.num_classes = len(self.class_names)
    self.patches = patch_probe.open_data(config, dataset)  # None where it does not apply

  @property
  def evaluates(self) -> bool:
    return self.test is not None or bool(self.suite or self.retrieval)

  def at_budget(self, budget: int) -> TwoTowerEvalData:
    """A copy whose NaFlex sources give patches at `budget` (the same split
    opened twice stays one source: zero-shot then reuses retrieval's images)."""
    at = {}
    move = lambda source: at.setdefault(id(source), source.at(budget)) if isinstance(
        source, data.naflex.PatchedSource) else source
    other = copy.copy(self)
    other.test, other.zeroshot = move(self.test), move(self.zeroshot)
    other.suite, other.retrieval = ([dataclasses.replace(e, source=move(e.source)) for e in group]
                                    for group in (self.suite, self.retrieval))
    return other


def _captions(source) -> list:
  """Each record's captions, read without its image (a NaFlex source's records)."""
  records = getattr(source, 'records', source)
  return [records[i]['captions'] for i in range(len(records))]


def zeroshot_data(config, dataset, with_captions: bool = False):
  """(labeled source, class names, prompt templates) of zero-shot
  classification: eval.zeroshot_dataset (default: the training dataset) at
  eval.zeroshot_split (default: eval_test_split), read with the training
  dataset's keys; eval.class_names or the label feature's names;
  eval.zeroshot_templates or the dataset's own. No names: zero-shot is
  skipped, unless the user asked for a zero-shot dataset (an error).
  dataset: the run's jaxcl.data.Dataset (the training data). with_captions:
  when zero-shot reads the retrieval split, open it as retrieval does, so
  the Dataset hands back the same source and its images are read once."""
  d, e = config.dataset, config.eval
  split = e.zeroshot_split or d.eval_test_split
  zs = ml_collections.ConfigDict(d.to_dict())
  zs.name = e.zeroshot_dataset or d.name
  other = data.Dataset(zs, config.model.vit.patch_size) if zs.name != d.name else dataset
  retrieval_split = zs.name == d.name and split == d.eval_test_split
  source, info = other.split(split, with_text=with_captions and retrieval_split)
  names = tuple(e.class_names) or info.class_names
  if e.class_names and len(names) != info.num_classes:
    raise errors.ConfigError(f'eval.class_names has {len(names)} names, the labels of '
                             f'{zs.name!r} have {info.num_classes} classes')
  if e.zeroshot_dataset and not names:
    raise errors.ConfigError(f'eval.zeroshot_dataset {zs.name!r} has no class names in '
                             f'its {d.label_key!r} feature; set eval.class_names')
  if names and zs.name != d.name:
    channels = dataset.training(with_text=True)[1].image_shape[-1]
    if info.image_shape[-1] != channels:
      raise errors.ConfigError(f'eval.zeroshot_dataset {zs.name!r} images have '
                               f'{info.image_shape[-1]} channels, the training images '
                               f'{channels}')
  return source, names, tuple(e.zeroshot_templates) or data.zeroshot_templates(zs.name)


class TwoTower(base.Method):
  """CLIP and SigLIP; subclasses give the loss and, for SigLIP, the bias."""

  batch_keys = ('image', 'text')
  text_tower = True
  towers = {'image': {'encoder': 'image_encoder', 'projection': 'image_proj'},
            'text': {'encoder': 'text_encoder', 'projection': 'text_proj'},
            'temperature': {'temperature': 'temperature', 'temperature_t2i': 'temperature_t2i',
                            'bias': 'bias'}}
  image_output = 'L2-normalized image embeddings (the shared image-text space)'
  skipped_without_labels = 'zero-shot classification is skipped'
  monitor_metrics = ('zeroshot_top1', 'i2t_r1', 't2i_r1')

  def check_config(self, config):
    x = config.text
    for key in ('max_length', 'width', 'depth', 'heads', 'mlp_dim'):
      errors.check(isinstance(x[key], int) and x[key] > 0,
                   f'text.{key} must be a positive integer, got {x[key]!r}')
    errors.check(x.max_length >= 2, f'text.max_length must be >= 2 (a token and end-of-text), '
                                    f'got {x.max_length}')
    errors.check(x.width % x.heads == 0,
                 f'text.width {x.width} is not divisible by text.heads {x.heads}')
    errors.check(config.model.embed_dim > 0,
                 f'model.embed_dim must be > 0, got {config.model.embed_dim}')
    errors.check(x.pool in presets.TEXT_POOLS,
                 f'text.pool must be one of {presets.TEXT_POOLS}, got {x.pool!r}')
    errors.check(x.act in presets.ACTIVATIONS,
                 f'text.act must be one of {presets.ACTIVATIONS}, got {x.act!r}')
    if not config.model.image_projection:
      features = (presets.vit_sizes(config.model)['width']
                  if config.model.name in presets.VIT_NAMES else None)
      errors.check(features == config.model.embed_dim,
                   f'model.image_projection=False needs a ViT whose width equals '
                   f'model.embed_dim ({config.model.embed_dim}), got {config.model.name} '
                   f'with width {features}')
    try:
      tokenizers.build_tokenizer(x)
    except (ValueError, RuntimeError, OSError) as e:  # sentencepiece raises RuntimeError
      raise errors.ConfigError(f'text: {errors.first_line(e)}') from None
    errors.check(bool(config.dataset.text_key), 'dataset.text_key must name the caption feature')
    errors.check(config.dataset.name != 'image_folder',
                 f'{self.name} needs captions: image_folder has none; use a TFDS image-text '
                 f'dataset or dataset.name=image_text_pairs')

  def make_bias(self, temperature_config):
    """The model's learned logit bias module (from the temperature group), or None."""
    del temperature_config
    return None

  def build_model(self, config, in_channels, rngs, tokenizer=None):
    m, x = config.model, config.text
    image_encoder = models.build_image_encoder(m, in_channels, config.augment.image_size, rngs)
    text_encoder = models.transformer.TextTransformer(
        vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length,
        eot_id=tokenizer.eot_id, width=x.width, depth=x.depth, heads=x.heads, mlp_dim=x.mlp_dim,
        causal=x.causal, pool=x.pool, act=x.act, norm_eps=x.norm_eps, remat=m.remat,
        scan_layers=m.scan_layers, rngs=rngs, dtype=models.activation_dtype(m))
    temperature = functools.partial(models.build_temperature, config.temperature,
                                    config.total_steps)
    d = config.decoder
    decoder = (models.decoder.CaptionDecoder(
        vocab_size=tokenizer.vocab_size, max_length=tokenizer.max_length,
        image_width=image_encoder.num_features, width=d.width or x.width,
        depth=d.depth or -(-x.depth // 2), heads=d.heads or x.heads,
        mlp_dim=d.mlp_dim or x.mlp_dim, act=x.act, norm_eps=x.norm_eps, rngs=rngs,
        dtype=models.activation_dtype(m)) if d.weight else None)
    s = config.self_distill
    heads = (models.self_distill.SelfDistillHeads(
        image_encoder.num_features, s.head_hidden, s.head_bottleneck, s.prototypes, rngs=rngs,
        dtype=models.activation_dtype(m)) if s.weight or s.masked_weight else None)
    return models.TwoTowerModel(image_encoder=image_encoder, text_encoder=text_encoder,
                                embed_dim=m.embed_dim,
                                temperature=temperature(m.embed_dim, rngs),
                                bias=self.make_bias(config.temperature), rngs=rngs,
                                image_projection=m.image_projection,
                                text_projection_bias=x.projection_bias,
                                temperature_t2i=temperature()
                                if config.temperature.per_direction else None,
                                decoder=decoder, self_distill=heads)

  def views(self, keys, batch, config):
    """The images as the towers see them before standardizing (a teacher
    sees them too): one light crop per image, float32 [n, S, S, C] in
    [0, 1]; NaFlex patches as they are, no crop."""
    if isinstance(batch['image'], dict):
      return batch['image']
    return augment.random_views(keys, batch['image'], config.augment)[0]

  def model_inputs(self, keys, batch, config):
    """(images, token ids), and with the decoder's rows in the batch
    (config.decoder) its (ids, which rows it predicts in parallel)."""
    # The caption is the other "view".
    inputs = (base.standardize(self.views(keys, batch, config), config.dataset), batch['text'])
    if 'decoder_ids' not in batch:
      return inputs
    parallel = models.decoder.parallel_examples(keys[:, 0], config.decoder.parallel_fraction)
    return (*inputs, (batch['decoder_ids'], parallel))

  def embeddings(self, model, inputs):
    """(a, b), and the decoder's logits when `inputs` carry its rows."""
    return model(*inputs)

  def describe_model(self, config, tokenizer):
    d, s = config.decoder, config.self_distill
    terms = ([f'LocCa decoder from step {d.start_step}'] if d.weight else []) + (
        [f'EMA self-distillation from step {s.start_step}'] if s.weight or s.masked_weight else [])
    return (f' + text transformer ({config.text.tokenizer} tokens, length {tokenizer.max_length})'
            + ''.join(f' + {term}' for term in terms))

  def record_transform(self, tokenizer):
    return data.caption_sampler(tokenizer)

  def open_eval_data(self, config, dataset):
    return TwoTowerEvalData(config, dataset)

  def evaluate(self, encoders, eval_data):
    """`evaluate_at_budget`: a NaFlex run's at its own budget (the largest of
    dataset.max_patches), and at each of eval.max_patches as max_patches/N/KEY."""
    scores = self.evaluate_at_budget(encoders, eval_data)
    patching = data.patching(encoders.config.dataset, encoders.config.model.vit.patch_size)
    results = {}
    for budget in sorted(encoders.config.eval.max_patches) if patching else ():
      at_budget = (scores if budget == patching.eval_budget
                   else self.evaluate_at_budget(encoders, eval_data.at_budget(budget)))
      results.update({f'max_patches/{budget}/{k}': v for k, v in at_budget.items()})
    return {**scores, **results}

  def evaluate_at_budget(self, encoders, eval_data):
    """Zero-shot top-1/5, its calibration and the image embeddings'
    tolerance and uniformity (when a labeled split is there), image-to-text /
    text-to-image recall@1/5/10, the patch probe (where the data has a
    segmentation: jaxcl.evaluation.patch_probe), then the suite's
    zeroshot/KEY/top1|top5|ece... and retrieval/KEY/i2t_r1 ...
    (jaxcl.evaluation.zeroshot_suite)."""
    suite = {}
    for entry in eval_data.suite:
      scores = _zeroshot(encoders, entry.source, entry.class_names, entry.templates)[0]
      suite.update({f'zeroshot/{entry.key}/{k.removeprefix("zeroshot_")}': v
                    for k, v in scores.items()})
    for entry in eval_data.retrieval:
      captions = _captions(entry.source)
      scores = _retrieval(encoders, None, entry.source, captions)
      suite.update({f'retrieval/{entry.key}/{k}': v for k, v in scores.items()})
    if eval_data.test is None:
      return suite
    results, images = {}, None
    if eval_data.num_classes:
      results, (images, labels) = _zeroshot(encoders, eval_data.zeroshot, eval_data.class_names,
                                            eval_data.templates)
      results.update(probes.tolerance_uniformity(images, labels))
    same = eval_data.zeroshot is eval_data.test and eval_data.num_classes
    results.update(_retrieval(encoders, images if same else None, eval_data.test,
                              eval_data.captions))
    if eval_data.patches is not None and encoders.patch_tokens is not None:
      results.update(patch_probe.evaluate(encoders.patch_tokens, encoders.mesh,
                                          eval_data.patches, encoders.config.eval))
    if encoders.decoder is not None and not isinstance(eval_data.test,
                                                        data.naflex.PatchedSource):
      results.update(decoder_eval.evaluate(encoders.decoder, encoders.mesh, eval_data.test,
                                           encoders.tokenizer, encoders.config.eval.batch_size))
    return {**results, **suite}

  def rankable_metrics(self, config):
    """Zero-shot top-1/5, recall@k and a ViT's patch probe, then the same of
    each entry of eval.zeroshot and eval.retrieval (zeroshot/KEY/top1 ...,
    as `evaluate`)."""
    suite = [f'zeroshot/{entry.key}/{metric}' for metric in ('top1', 'top5')
             for entry in zeroshot_suite.parse_all(config.eval.zeroshot)]
    suite += [f'retrieval/{entry.key}/{metric}' for metric in RECALLS
              for entry in zeroshot_suite.parse_all(config.eval.retrieval, 'retrieval')]
    dense = (('patch_probe_top1',) if config.model.name in presets.VIT_NAMES
             and config.dataset.resolution == 'square' else ())
    return ('zeroshot_top1', 'zeroshot_top5', *RECALLS, *dense, *suite)

  def export_paths(self, output):
    return [files.text_artifact_path(output),
            *(files.tokenizer_artifact_path(output, name)
              for name in (files.SENTENCEPIECE_FILE, *files.CLIP_BPE_FILES))]

  def export_artifacts(self, exp, params, batch_stats, output, facts, export_fn):
    """The text embedder (int32 token ids [b, L] -> float32 [b, D], the
    image embedder's space), the tokenizer (its SentencePiece model copied),
    the logit bias and the zero-shot prompts of eval.json."""
    tokenizer, text_file = exp.tokenizer, files.text_artifact_path(output)
    (batch,) = jax.export.symbolic_shape('b')
    exported = export_fn(lambda ids: exp.embed_text(params, batch_stats, ids),
                         jax.ShapeDtypeStruct((batch, tokenizer.max_length), jnp.int32))
    dim = int(exported.out_avals[0].shape[1])
    artifacts = {text_file: exported.serialize()}
    tokenizer_spec = tokenizer.spec()
    if tokenizer.data_file() is not None:  # copied beside the artifacts, named in the spec
      key, name, contents = tokenizer.data_file()
      tokenizer_spec[key] = files.tokenizer_artifact_path(output, name).name
      artifacts[files.tokenizer_artifact_path(output, name)] = contents
    bias = self.bias(nnx.merge(exp.eval_graphdef, params, batch_stats))
    zeroshot = facts.get('zeroshot')
    if not (isinstance(zeroshot, dict) and isinstance(zeroshot.get('class_names'), list)
            and isinstance(zeroshot.get('templates'), list)):
      raise errors.ConfigError(f'the run\'s {files.DATA_FACTS_FILE} lacks its zero-shot '
                               f'prompts (zeroshot.class_names, zeroshot.templates)')
    metadata = {
        'text': {'file': text_file.name,
                 'input': {'shape': ['b', tokenizer.max_length], 'dtype': 'int32',
                           'description': 'token ids from the tokenizer below'},
                 'output': {'shape': ['b', dim], 'dtype': 'float32',
                            'description': 'L2-normalized text embeddings'}},
        'tokenizer': tokenizer_spec,
        'logit_bias': None if bias is None else float(bias),
        # The prompts of eval.json's zero-shot classification.
        'zeroshot': zeroshot,
    }
    return artifacts, metadata

  def export_facts(self, config, dataset, eval_data=None):
    """The zero-shot prompts, which export writes beside the text embedder."""
    if eval_data is None:
      _, names, templates = zeroshot_data(config, dataset)
    else:
      names, templates = eval_data.class_names, eval_data.templates
    return {'zeroshot': {'class_names': list(names), 'templates': list(templates)}}


def _zeroshot(encoders, source, class_names, templates):
  """({'zeroshot_top1', 'zeroshot_top5'} and the calibration at the model's
  τ, (image embeddings, labels)) of a labeled source; the classifier from the
  workdir's cache when it has it."""
  batch_size, mesh = encoders.config.eval.batch_size, encoders.mesh

  def compute():
    prompts = [t.format(name) for name in class_names for t in templates]
    text = probes.embed_rows(encoders.text, mesh, encoders.tokenizer.encode(prompts),
                               batch_size=batch_size)
    return probes.zeroshot_classifier(text.reshape(len(class_names), len(templates), -1))

  classifier = zeroshot_cache.classifier(encoders.workdir, encoders.step, encoders.weights,
                                         class_names, templates, encoders.tokenizer.spec(),
                                         compute)
  images, labels = probes.extract_features(encoders.image, mesh, source, batch_size=batch_size)
  keep = labels >= 0  # images without a single class label (e.g. two shapes) are not scored
  scores = {**probes.zeroshot_accuracy(images[keep], labels[keep], classifier),
            **probes.zeroshot_calibration(images[keep], labels[keep], classifier,
                                            encoders.temperature, encoders.logit_transform)}
  return scores, (images, labels)


def _retrieval(encoders, images, source, captions):
  """Recall@1/5/10 both ways of a source's images (`images`: their
  embeddings, when computed already) and their captions (a list per image)."""
  batch_size, mesh = encoders.config.eval.batch_size, encoders.mesh
  if images is None:
    images, _ = probes.extract_features(encoders.image, mesh, source, batch_size=batch_size)
  flat = [c for caps in captions for c in caps]
  owner = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
  text = probes.embed_rows(encoders.text, mesh, encoders.tokenizer.encode(flat),
                             batch_size=batch_size)
  return probes.retrieval_recall(images, text, owner)
