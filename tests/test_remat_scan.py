"""model.remat and model.scan_layers: the ViT and text towers give the plain
towers' outputs and gradients, keep their parameter layout (so checkpoints
load either way), and a scanned tower's program does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import CLIP_CONFIG, TINY_TWO_TOWER, assert_close, jaxcl, tiny_overrides
from jaxcl import config as config_lib, errors
from jaxcl.models import transformer
from jaxcl.trainer import validation

# Recomputation and scanning run the same float32 operations; XLA may fuse
# them differently, which moves results by a few ulps of their scale.
RTOL = 1e-5
VARIANTS = [('full', False), ('dots', False), ('dots_no_batch', False), ('none', True),
            ('full', True)]


def _vit(remat='none', scan=False, depth=3, pool='cls'):
  return transformer.ViT(image_size=16, in_channels=3, patch_size=4, width=32, depth=depth,
                         heads=4, mlp_dim=64, pool=pool, pre_norm=True, remat=remat,
                         scan_layers=scan, rngs=nnx.Rngs(0))


def _text(remat='none', scan=False, depth=3, pool='eot', causal=True):
  return transformer.TextTransformer(vocab_size=50, max_length=12, eot_id=2, width=32,
                                     depth=depth, heads=4, mlp_dim=64, causal=causal, pool=pool,
                                     remat=remat, scan_layers=scan, rngs=nnx.Rngs(0))


def _images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)


def _ids():
  ids = np.random.default_rng(1).integers(3, 50, size=(4, 12))
  for row, end in enumerate((3, 7, 11, 5)):  # end-of-text at several places, pads after it
    ids[row, end], ids[row, end + 1:] = 2, 0
  return jnp.asarray(ids, jnp.int32)


def _output_and_grads(model, inputs):
  graphdef, params = nnx.split(model)
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32)), jnp.float32)

  def objective(params):
    out = nnx.merge(graphdef, params)(inputs)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return jax.device_get((out, grads))


TOWERS = {
    'vit_cls': (lambda **kw: _vit(pool='cls', **kw), _images),
    'vit_map': (lambda **kw: _vit(pool='map', **kw), _images),
    'text_causal_eot': (lambda **kw: _text(**kw), _ids),
    'text_last': (lambda **kw: _text(pool='last', causal=False, **kw), _ids),
}


# The quick loop checks one image and one text tower; the full suite all four.
@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
@pytest.mark.parametrize('tower', [
    'vit_cls', 'text_causal_eot', pytest.param('vit_map', marks=pytest.mark.slow),
    pytest.param('text_last', marks=pytest.mark.slow)])
def test_remat_and_scan_give_the_plain_towers_outputs_and_gradients(tower):
  build, inputs = TOWERS[tower]
  plain = build()
  out, grads = _output_and_grads(plain, inputs())
  assert np.abs(out).max() > 0 and len(jax.tree.leaves(grads)) > 10
  for remat, scan in VARIANTS:
    model = build(remat=remat, scan=scan)
    # The same parameters, laid out alike: a checkpoint of either loads into the other.
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(plain))
    assert_close(nnx.state(model), nnx.state(plain), rtol=0, what='params')
    out_v, grads_v = _output_and_grads(model, inputs())
    assert_close(out_v, out, rtol=RTOL, what=f'{remat}/{scan} output')
    assert_close(grads_v, grads, rtol=RTOL, what=f'{remat}/{scan} grads')


def _matmuls_in_program(depth, scan):
  """The matrix products in the lowered gradient program: XLA's work to
  compile grows with them (the parameters' stacking adds none)."""
  model = _text(depth=depth, scan=scan)
  graphdef, params = nnx.split(model)
  grad = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(_ids())))
  return jax.jit(grad).lower(params).as_text().count('dot_general')


def test_scanned_tower_compiles_one_block_whatever_its_depth():
  plain = [_matmuls_in_program(depth, scan=False) for depth in (2, 8)]
  scanned = [_matmuls_in_program(depth, scan=True) for depth in (2, 8)]
  assert plain[1] > 3 * plain[0]  # unrolled: a copy per block
  assert scanned[1] == scanned[0] > 0  # scanned: one block


@pytest.mark.parametrize('overrides,match', [
    ({'model.remat': 'some'}, 'model.remat must be one of'),
    ({'model.scan_layers': True}, 'apply to ViT and text towers; simclr with resnet18'),
    ({'model.remat': 'full'}, 'apply to ViT and text towers; simclr with resnet18'),
])
def test_bad_remat_values_are_config_errors(overrides, match):
  config = config_lib.base_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(errors.ConfigError, match=match):
    validation.validate(config, num_devices=1, process_count=1, check_data=False)


@pytest.mark.slow
def test_a_run_resumes_with_remat_and_scan_switched_on(tmp_path):
  args = ['train', '--config', CLIP_CONFIG, '--workdir', str(tmp_path),
          *tiny_overrides(TINY_TWO_TOWER, **{'text.depth': 2, 'model.vit.depth': 2,
                                             'eval_every_steps': 100,
                                             'checkpoint_every_steps': 2})]
  jaxcl(*args, '--config.total_steps=2')
  resumed = jaxcl(*args, '--config.total_steps=4', '--config.model.remat=full',
                  '--config.model.scan_layers=True')
  assert 'resuming from step 2' in resumed.stdout
  assert 'final (step 4)' in resumed.stdout
