"""Fine-tuning and LiT: frozen parameter groups (no update, no optimizer
state, no backward pass through a frozen tower, batch norms in inference
mode), learning-rate multipliers against hand-computed SGD steps, init.source
(all weights, or parts by role: a SimCLR encoder as CLIP's image tower),
and position embeddings resampled as torch resamples them."""

import jax
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import CLIP_CONFIG, DIGITS_CONFIG, TINY_TWO_TOWER, tiny_config
from jaxcl import errors, parallel, train
from jaxcl.config import config_files
from jaxcl.hub import warm_start
from jaxcl.models import param_groups
from jaxcl.trainer import checkpoints, experiment, train_step, validation
from jaxcl.workdir import run_files


def _batch(exp, n=16, seed=0):
  rng = np.random.default_rng(seed)
  batch = {'image': rng.integers(0, 256, size=(n, *exp.info.image_shape), dtype=np.uint8)}
  if exp.tokenizer is not None:
    words = ['red', 'blue', 'circle', 'square', 'small', 'top', 'left', 'a', 'the']
    batch['text'] = exp.tokenizer.encode([' '.join(rng.choice(words, size=4)) for _ in range(n)])
  return parallel.put_batch(exp.mesh, batch)


def _clip(**overrides):
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16)
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  return experiment.setup(config, devices=jax.devices()[:1])


def _flat(tree):
  return {param_groups.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _steps(exp, n=2, state=None):
  step = train_step.make_train_step(exp)
  state = exp.init_state() if state is None else state
  for i in range(n):
    state, _ = step(state, _batch(exp, seed=i))
  return state


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_frozen_tower_keeps_its_weights_and_has_no_optimizer_state():
  exp = _clip(**{'optimizer.frozen': ('image_encoder/.*',)})
  before, after = _flat(exp.init_state().params), _flat(_steps(exp).params)
  frozen = [n for n in before if n.startswith('image_encoder/')]
  assert len(frozen) > 5
  for name in before:
    same = np.array_equal(before[name], after[name])
    assert same == name.startswith('image_encoder/'), name
  # Adam's two moments exist only for the trained parameters.
  # (Arrays only: the step counts and log τ's moments are scalars.)
  trained = sum(v.size for n, v in before.items()
                if not n.startswith('image_encoder/') and v.ndim > 0)
  moments = sum(x.size for x in jax.tree.leaves(exp.init_state().opt_state) if x.ndim > 0)
  assert moments == 2 * trained


def _flops(lowered):
  cost = lowered.compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


@pytest.mark.slow  # compiles its own steps
def test_frozen_tower_runs_no_backward_pass():
  """Freezing the image tower takes its backward pass out of the compiled
  step: the step's flops drop by at least 1.5x the tower's forward flops
  (a backward pass costs about twice the forward)."""
  flops = []
  for frozen in ((), ('image_encoder/.*',)):
    exp = _clip(**{'optimizer.frozen': frozen})
    flops.append(_flops(train_step.make_train_step(exp).lower(exp.init_state(), _batch(exp))))
  state = exp.init_state()
  images = jax.numpy.zeros((16, exp.config.augment.image_size, exp.config.augment.image_size, 3))
  forward = _flops(jax.jit(lambda p, x: nnx.merge(exp.train_graphdef, p, state.batch_stats)
                           .image_encoder(x)).lower(state.params, images))
  assert flops[0] - flops[1] > 1.5 * forward, (flops, forward)


@pytest.mark.slow  # compiles its own steps
def test_lr_multipliers_scale_a_groups_sgd_step():
  """SGD without momentum: a step is -lr x gradient, so a group's step with
  multiplier 0.5 is half the plain one, and 0 leaves it in place."""
  common = {'optimizer.name': 'sgd', 'optimizer.momentum': 0.0, 'optimizer.weight_decay': 0.0,
            'optimizer.warmup_steps': 0}
  plain = _clip(**common)
  scaled = _clip(**common, **{'optimizer.lr_multipliers': ('text_proj/.*=0.5',
                                                           'image_proj/.*=0')})
  start = _flat(plain.init_state().params)
  one, two = _flat(_steps(plain, 1).params), _flat(_steps(scaled, 1).params)
  for name in start:
    step_plain, step_scaled = one[name] - start[name], two[name] - start[name]
    factor = 0.5 if name.startswith('text_proj') else 0.0 if name.startswith('image_proj') else 1
    # (atol: the float32 rounding of parameters near 0.1, which the steps are differences of)
    np.testing.assert_allclose(step_scaled, factor * step_plain, rtol=1e-5, atol=1e-7,
                               err_msg=name)
  assert np.abs(one['text_proj/kernel'] - start['text_proj/kernel']).max() > 0


@pytest.mark.slow  # compiles its own steps
def test_frozen_batch_norm_uses_its_running_statistics():
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16)
  config.model.update(name='resnet18', stage_sizes=(1,), width=8, small_images=True)
  config.optimizer.frozen = ('image_encoder/.*',)
  exp = experiment.setup(config, devices=jax.devices()[:1])
  state = exp.init_state()
  after = _steps(exp, 1, state=jax.tree.map(lambda x: x, state))
  stats_before, stats_after = _flat(exp.init_state().batch_stats), _flat(after.batch_stats)
  assert stats_before and all(np.array_equal(stats_before[n], stats_after[n])
                              for n in stats_before)


def _save_workdir(exp, state, workdir):
  """A jaxcl workdir holding `state` as its checkpoint (what a run writes)."""
  facts = run_files.data_facts(exp.info, exp.method.export_facts(exp.config, exp.dataset))
  run_files.write_run_start(workdir, exp.config, [[0, exp.config.batch_size]], exp.tokenizer,
                            facts, 0)
  manager = checkpoints.checkpoint_manager(workdir, exp.config.keep_checkpoints)
  checkpoints.save_checkpoint(manager, state)
  checkpoints.finish_checkpoints(manager)
  manager.close()


@pytest.fixture(scope='module')
def trained_clip(tmp_path_factory):
  """A CLIP workdir whose weights differ from a fresh init (seed 7, 2 steps)."""
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16, seed=7)
  exp = experiment.setup(config, devices=jax.devices()[:1])
  state = _steps(exp)
  workdir = tmp_path_factory.mktemp('clip_run')
  _save_workdir(exp, state, workdir)
  return workdir, _flat(state.params)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_init_from_a_workdir_loads_every_weight(trained_clip):
  workdir, weights = trained_clip
  exp = _clip(**{'init.source': str(workdir)})
  state = warm_start.initial_state(exp)
  got = _flat(state.params)
  assert got.keys() == weights.keys()
  for name in weights:
    np.testing.assert_array_equal(got[name], weights[name], err_msg=name)
  assert int(state.step) == 0


@pytest.mark.slow  # compiles its own steps
def test_finetune_config_starts_from_every_weight_of_a_workdir(trained_clip):
  """configs/finetune.py:WORKDIR: the workdir's architecture and weights."""
  workdir, weights = trained_clip
  config = config_files.load(f'{helpers.REPO}/configs/finetune.py:{workdir}')
  config.batch_size = 16
  validation.validate(config)
  assert config.init.source == str(workdir) and config.optimizer.learning_rate == 1e-5
  exp = experiment.setup(config, devices=jax.devices()[:1])
  got = _flat(warm_start.initial_state(exp).params)
  assert got.keys() == weights.keys()
  assert all(np.array_equal(got[n], weights[n]) for n in weights)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_init_load_takes_only_the_named_towers(trained_clip):
  workdir, weights = trained_clip
  exp = _clip(**{'init.source': str(workdir), 'init.load': ('text',)})
  fresh, got = _flat(exp.init_state().params), _flat(warm_start.initial_state(exp).params)
  for name in weights:
    want = weights[name] if name.startswith('text_') else fresh[name]
    np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.slow  # compiles its own steps
def test_simclr_encoder_becomes_clips_image_tower(tmp_path):
  """LiT's start: a SimCLR run's ResNet (weights and batch-norm statistics)
  as CLIP's image encoder; CLIP's image projection keeps its init."""
  simclr_config = tiny_config(DIGITS_CONFIG, seed=3)
  simclr_config.dataset.name = 'captioned_shapes'
  simclr = experiment.setup(simclr_config, devices=jax.devices()[:1])
  state = _steps(simclr, 1)
  _save_workdir(simclr, state, tmp_path / 'simclr')
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16)
  config.model.update({k: simclr_config.model[k] for k in ('name', 'stage_sizes', 'width',
                                                           'small_images')})
  config.augment.image_size = simclr_config.augment.image_size
  config.init.update(source=str(tmp_path / 'simclr'), load=('image',))
  exp = experiment.setup(config, devices=jax.devices()[:1])
  loaded = warm_start.initial_state(exp)
  params, source = _flat(loaded.params), _flat(state.params)
  stats, source_stats = _flat(loaded.batch_stats), _flat(state.batch_stats)
  encoder = [n for n in source if n.startswith('encoder/')]
  assert encoder
  for name in encoder:
    np.testing.assert_array_equal(params['image_' + name], source[name], err_msg=name)
  assert source_stats and all(np.array_equal(stats['image_' + n], v)
                              for n, v in source_stats.items() if n.startswith('encoder/'))
  fresh = _flat(exp.init_state().params)
  np.testing.assert_array_equal(params['image_proj/kernel'], fresh['image_proj/kernel'])


@pytest.mark.parametrize('extra', [0, 1])
def test_position_embeddings_resample_as_torch_does(extra):
  import torch
  rng = np.random.default_rng(0)
  position = rng.normal(size=(1, extra + 3 * 3, 5)).astype(np.float32)
  out = warm_start.resample_positions(position, (1, extra + 6 * 6, 5))
  grid = torch.tensor(position[0, extra:]).reshape(1, 3, 3, 5).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(grid, size=(6, 6), mode='bilinear',
                                         align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 5)
  np.testing.assert_allclose(out[:, extra:], want.numpy(), atol=1e-6)
  np.testing.assert_array_equal(out[:, :extra], position[:, :extra])
  # Not a square grid with the same class tokens: not resampled (an error for the caller).
  assert warm_start.resample_positions(position, (1, 1 - extra + 36, 5)) is None


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_init_from_another_image_size_resamples_positions(trained_clip):
  workdir, weights = trained_clip
  exp = _clip(**{'init.source': str(workdir), 'augment.image_size': 48})
  got = _flat(warm_start.initial_state(exp).params)
  assert got['image_encoder/position'].shape[1] > weights['image_encoder/position'].shape[1]
  np.testing.assert_array_equal(got['image_encoder/blocks/0/mlp_in/kernel'],
                                weights['image_encoder/blocks/0/mlp_in/kernel'])


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_bad_groups_and_sources_are_config_errors(trained_clip):
  workdir, _ = trained_clip
  with pytest.raises(errors.ConfigError, match="'image/.*' matches no parameter"):
    _clip(**{'optimizer.frozen': ('image/.*',)})
  with pytest.raises(errors.ConfigError, match='PATTERN=FACTOR'):
    config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16)
    config.optimizer.lr_multipliers = ('text_proj/.*',)
    validation.validate(config)
  with pytest.raises(errors.ConfigError, match='another tokenizer'):
    warm_start.initial_state(_clip(**{'init.source': str(workdir), 'text.max_length': 40}))
  with pytest.raises(errors.ConfigError, match=r"this model \(simclr\) has no 'text' part"):
    simclr = experiment.setup(tiny_config(DIGITS_CONFIG), devices=jax.devices()[:1])
    simclr.config.init.update(source=str(workdir), load=('text',))
    warm_start.initial_state(simclr)


def test_parts_the_source_lacks_keep_their_init(tmp_path):
  """A source whose image tower ends without a projection (SigLIP's MAP head
  is the embedding) still gives its image encoder to a model with one; the
  projection keeps its initialization."""
  source_config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16, seed=5)
  source_config.model.update(embed_dim=32, image_projection=False)
  source = experiment.setup(source_config, devices=jax.devices()[:1])
  state = source.init_state()
  _save_workdir(source, state, tmp_path / 'source')
  exp = _clip(**{'model.embed_dim': 32, 'init.source': str(tmp_path / 'source'),
                 'init.load': ('image',)})
  got, fresh, want = (_flat(warm_start.initial_state(exp).params),
                      _flat(exp.init_state().params), _flat(state.params))
  assert 'image_proj/kernel' not in want
  np.testing.assert_array_equal(got['image_proj/kernel'], fresh['image_proj/kernel'])
  for name in (n for n in want if n.startswith('image_encoder/')):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_loading_a_part_this_model_lacks_is_an_error(trained_clip):
  workdir, _ = trained_clip
  exp = _clip(**{'init.source': str(workdir), 'init.load': ('temperature',),
                 'temperature.mode': 'fixed'})
  with pytest.raises(errors.ConfigError, match="init.load 'temperature'"):
    warm_start.initial_state(exp)


def test_a_bad_init_from_leaves_the_workdir_untouched(tmp_path):
  """init.source is read before the workdir is held: a missing source is a
  one-line error and the workdir stays empty (trainable with a fixed config)."""
  config = tiny_config(CLIP_CONFIG, TINY_TWO_TOWER, batch_size=16)
  config.init.source = str(tmp_path / 'nowhere')
  workdir = tmp_path / 'run'
  with pytest.raises(errors.ConfigError, match='is not a directory'):
    train.train_and_evaluate(config, workdir)
  assert not workdir.exists() or not any(workdir.iterdir())
