"""CLIP / SigLIP: the sharded two-tower step against one device, the τ clamp
under a large gradient, zero-shot and retrieval metrics against hand-computed
values, and a tiny run end to end (train, eval, export, zero-shot from the
exported files alone)."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from helpers import (
  CLIP_CONFIG,
  SIGLIP_CONFIG,
  TINY_TWO_TOWER,
  assert_close,
  copy_without_dataset,
  jaxcl,
  qkv_biases,
  tiny_config,
  tiny_overrides,
  two_tower_batch,
  without_key_bias,
)
from jaxcl import data, parallel
from jaxcl.data import shapes
from jaxcl.evaluation import probes
from jaxcl.trainer import experiment, train_step, trained

# ------------------------------------------------ sharded == single device ---
# float32 sums reordered by 8 devices vs 1 (tests/helpers.py: assert_close);
# measured worst on 2 x86 cores in brackets. The loss's metrics see the
# towers' rounding times 1/τ = 14 [1.3e-6]; gradients [1.6e-6]; parameters
# after 2 Adam steps [8.6e-6], all but each attention's key bias (below).
RTOL_LOSS = 1e-5
RTOL_GRAD = 3e-5
RTOL_PARAMS = 1e-4


# SigLIP's variants run in the full suite; the quick loop (-m 'not slow') checks CLIP's.
@pytest.fixture(scope='module', params=['clip', pytest.param('siglip', marks=pytest.mark.slow)])
def experiments(request):
  config_file = CLIP_CONFIG if request.param == 'clip' else SIGLIP_CONFIG
  config = tiny_config(config_file, TINY_TWO_TOWER, batch_size=16)
  assert config.method == request.param
  return (experiment.setup(config, devices=jax.devices()[:1]),
          experiment.setup(config, devices=jax.devices()[:8]))


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_sharded_two_tower_step_equals_single_device(experiments):
  results = []
  for exp in experiments:
    state = exp.init_state()
    fn = jax.jit(train_step.make_loss_and_grads(exp))
    (loss, (metrics, _, tau, bias, *_)), grads = fn(state, parallel.put_batch(
        exp.mesh, two_tower_batch(exp, 16)))
    results.append(jax.device_get((loss, metrics, grads)))
  (loss1, m1, g1), (loss8, m8, g8) = results
  assert float(loss1) > 0
  # float32 sums reordered by 8 devices vs 1 (tests/helpers.py: assert_close).
  assert_close(loss8, loss1, rtol=RTOL_LOSS, what='loss')
  del m1['uniformity'], m8['uniformity']  # a per-device estimate: tests/test_diagnostics.py
  assert_close(m8, m1, rtol=RTOL_LOSS, what='metrics')
  assert len(jax.tree.leaves(g1)) == len(jax.tree.leaves(g8)) > 10
  assert_close(g8, g1, rtol=RTOL_GRAD, what='grads')
  # The key biases' gradients are rounding noise (see _without_key_bias).
  key_biases = qkv_biases(g1)
  assert len(key_biases) == 2  # one attention block per tower
  for name, qkv in key_biases.items():
    width = len(qkv) // 3
    assert np.max(np.abs(qkv[width:2 * width])) < 1e-4 * np.max(np.abs(qkv)), name
  # τ (and SigLIP's bias) are parameters with a gradient, equal on both meshes.
  assert abs(float(g1['temperature']['log_tau'][...])) > 0
  if experiments[0].config.method == 'siglip':
    assert abs(float(g1['bias']['value'][...])) > 0
  else:
    assert 'bias' not in g1


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_sharded_two_tower_train_steps_equal_single_device(experiments):
  finals = []
  for exp in experiments:
    step, state = train_step.make_train_step(exp), exp.init_state()
    for i in range(2):
      state, metrics = step(state, parallel.put_batch(exp.mesh,
                                                      two_tower_batch(exp, 16, seed=i)))
    finals.append(jax.device_get((state.params, metrics)))
  (p1, m1), (p8, m8) = finals
  assert len(qkv_biases(p1)) == 2
  assert_close(without_key_bias(p8), without_key_bias(p1), rtol=RTOL_PARAMS, what='params')
  for key in ('loss', 'temperature', 'inv_temperature'):
    assert_close(m8[key], m1[key], rtol=RTOL_LOSS, what=key)
  if experiments[0].config.method == 'siglip':
    assert m1['bias'] == pytest.approx(experiments[0].config.temperature.bias_init, abs=0.1)
  else:
    assert 'bias' not in m1


@pytest.mark.slow  # too long for the quick loop (conftest.py: QUICK_TEST_S)
def test_large_gradient_on_tau_is_clamped_without_nan(experiments):
  exp = experiments[1]  # the 8-device one
  state = exp.init_state()
  batch = parallel.put_batch(exp.mesh, two_tower_batch(exp, 16))
  (_, _), grads = jax.jit(train_step.make_loss_and_grads(exp))(state, batch)
  g = float(grads['temperature']['log_tau'][...])
  assert g != 0
  # An optimizer whose step on log τ is -1e4 |g| at every step: far below log τ_min.
  labels = jax.tree.map_with_path(
      lambda path, _: 'tau' if 'log_tau' in jax.tree_util.keystr(path) else 'rest', state.params)
  push_down = optax.stateless(lambda g, _: jax.tree.map(lambda x: -1e4 * jnp.abs(x), g))
  pushed = optax.multi_transform({'tau': push_down, 'rest': optax.adamw(1e-3)}, labels)
  exp = dataclasses.replace(exp, optimizer=pushed)
  step = train_step.make_train_step(exp)
  state = jax.jit(lambda: experiment.TrainState(
      step=state.step, params=state.params, batch_stats=state.batch_stats,
      opt_state=pushed.init(state.params), rng=state.rng), out_shardings=exp.replicated)()
  t = exp.config.temperature
  for i in range(3):
    state, metrics = step(state, parallel.put_batch(exp.mesh, two_tower_batch(exp, 16, seed=i)))
    tau = float(np.exp(jax.device_get(state.params['temperature']['log_tau'][...])))
    assert tau == pytest.approx(t.min, rel=1e-5)  # clamped every step
    if i > 0:  # the loss used the clamped τ
      assert float(metrics['temperature']) == pytest.approx(t.min, rel=1e-5)
    assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


# ---------------------------------------------------- metrics, by hand ---
def test_zeroshot_accuracy_by_hand():
  # 2-d embeddings, 3 classes at 0°, 90°, 180°.
  classes = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
  images = np.array([[0.9, 0.1], [0.1, 0.9], [-0.6, 0.8], [0.6, 0.8]], np.float32)
  labels = np.array([0, 1, 2, 2])
  # scores: img0 [.9 .1 -.9] -> 0 (right); img1 [.1 .9 -.1] -> 1 (right);
  # img2 [-.6 .8 .6] -> 1, its class 2 second (top-2 hit); img3 [.6 .8 -.6] -> class 2 last.
  got = probes.zeroshot_accuracy(images, labels, classes, ks=(1, 2))
  assert got == {'zeroshot_top1': 0.5, 'zeroshot_top2': 0.75}
  # A tie with a wrong class counts against.
  tie = probes.zeroshot_accuracy(np.array([[1, 1]], np.float32), np.array([0]),
                                   np.array([[1, 0], [0, 1]], np.float32), ks=(1,))
  assert tie == {'zeroshot_top1': 0.0}


def test_zeroshot_classifier_averages_normalized_templates():
  # Class 0's two templates: (3, 0) and (0, 1) -> normalized mean (0.5, 0.5) -> (.707, .707).
  emb = np.array([[[3, 0], [0, 1]], [[0, -2], [0, -1]]], np.float32)
  got = probes.zeroshot_classifier(emb)
  np.testing.assert_allclose(got, [[0.5 ** 0.5, 0.5 ** 0.5], [0, -1]], rtol=1e-6)


def test_retrieval_recall_by_hand():
  images = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
  # Captions 0, 1 belong to image 0, caption 2 to image 1, caption 3 to image 2.
  texts = np.array([[0, 1], [0.8, 0.6], [0.6, 0.8], [-1, 0]], np.float32)
  owner = np.array([0, 0, 1, 2])
  got = probes.retrieval_recall(images, texts, owner, ks=(1, 2))
  # i2t: img0 scores [0, .8, .6, -1]: best own caption (.8) ranks 1st -> hit@1.
  # img1 scores [1, .6, .8, 0]: caption 0 (not its own) beats its caption 2 -> rank 2.
  # img2 scores [0, -.8, -.6, 1]: its caption 3 first.
  assert got['i2t_r1'] == pytest.approx(2 / 3) and got['i2t_r2'] == pytest.approx(1.0)
  # t2i: cap0 [0, 1, 0] -> image 1 first, its image 0 ties with image 2 for second: rank 2 ->
  # miss @2.
  # cap1 [.8, .6, -.8] -> image 0 first; cap2 [.6, .8, -.6] -> image 1 first; cap3 -> image 2.
  assert got['t2i_r1'] == pytest.approx(3 / 4) and got['t2i_r2'] == pytest.approx(3 / 4)


# ------------------------------------------------------ a tiny run, end to end ---
RUN = ['--config.total_steps=30', '--config.log_every_steps=10', '--config.eval_every_steps=1000',
       '--config.checkpoint_every_steps=30']


@pytest.fixture(scope='module')
def clip_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('clip')
  jaxcl('train', '--config', CLIP_CONFIG, '--workdir', str(workdir),
        *tiny_overrides(TINY_TWO_TOWER), *RUN, devices=2)
  return workdir


@pytest.mark.slow  # a whole CLI run
def test_clip_run_writes_metrics_and_eval(clip_run):
  rows = [json.loads(line) for line in open(clip_run / 'metrics.jsonl')]
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [10, 20, 30]
  for key in ('temperature', 'inv_temperature', 'contrastive_top1', 'loss'):
    assert key in train_rows[0]
  assert train_rows[-1]['loss'] < train_rows[0]['loss']
  results = json.loads((clip_run / 'eval.json').read_text())
  for key in ('zeroshot_top1', 'zeroshot_top5', 'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1',
              't2i_r5', 't2i_r10'):
    assert 0 <= results[key] <= 1, key
  assert results['zeroshot_top1'] <= results['zeroshot_top5']
  assert results['i2t_r1'] <= results['i2t_r5'] <= results['i2t_r10']
  assert (clip_run / 'tokenizer.json').exists()


@pytest.mark.slow  # a whole CLI run
def test_clip_eval_recomputes_eval_json(clip_run):
  before = json.loads((clip_run / 'eval.json').read_text())
  jaxcl('eval', '--workdir', str(clip_run), devices=1)  # another mesh, same numbers
  after = json.loads((clip_run / 'eval.json').read_text())
  # Each embedding is computed per example, but XLA may tile another batch
  # shape differently: a near-tie among the 1000 test images may then go the
  # other way, moving a rate by 1/1000.
  for key, value in before.items():
    assert after[key] == pytest.approx(value, rel=0, abs=1e-3 + 1e-9), key


ZERO_SHOT = r'''
import json, sys
import jax, numpy as np
prefix, images, labels = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
meta = json.load(open(prefix + '.json'))
load = lambda path: jax.export.deserialize(open(path, 'rb').read())
image_embedder = load(prefix)
text_embedder = load(prefix.rsplit('/', 1)[0] + '/' + meta['text']['file'])
tok = meta['tokenizer']
assert tok['type'] == 'bytes'
def tokenize(texts):
  ids = np.full((len(texts), tok['max_length']), tok['pad_id'], np.int32)
  for i, text in enumerate(texts):
    b = list(text.encode('utf-8'))[:tok['max_length'] - 1]
    ids[i, :len(b)] = np.array(b, np.int32) + tok['byte_offset']
    ids[i, len(b)] = tok['eot_id']
  return ids
names, templates = meta['zeroshot']['class_names'], meta['zeroshot']['templates']
t = np.asarray(text_embedder.call(tokenize([tp.format(n) for n in names for tp in templates])))
t = t.reshape(len(names), len(templates), -1).mean(1)
classifier = t / np.linalg.norm(t, axis=1, keepdims=True)
z = np.asarray(image_embedder.call(images))
pred = np.argmax(z @ classifier.T, axis=1)
assert 'jaxcl' not in sys.modules
print(json.dumps({'zeroshot_top1': float(np.mean(pred == labels))}))
'''


@pytest.mark.slow  # a whole CLI run
def test_exported_towers_reproduce_zeroshot(clip_run, tmp_path):
  artifact = tmp_path / 'export' / 'clip.jaxexport'
  proc = jaxcl('export', '--workdir', str(clip_run), '--output', str(artifact))
  assert 'clip.text.jaxexport' in proc.stdout
  meta = json.loads(open(f'{artifact}.json').read())
  assert meta['method'] == 'clip' and meta['text']['input']['shape'] == ['b', 48]
  assert len(meta['zeroshot']['class_names']) == 24 and meta['logit_bias'] is None
  # The same prompts when the dataset is gone: export reads them from the workdir.
  moved = copy_without_dataset(clip_run, tmp_path / 'moved')
  jaxcl('export', '--workdir', str(moved), '--output', str(tmp_path / 'moved.jaxexport'))
  assert not (moved / 'deleted-tfds').exists()  # no data opened
  assert json.loads(open(f'{tmp_path / "moved.jaxexport"}.json').read())['zeroshot'] == (
      meta['zeroshot'])

  exp, _ = trained.load_trained(str(clip_run))
  source, _ = data.load_source(exp.config.dataset, 'test')
  records = [source[i] for i in range(len(source))]
  labeled = [r for r in records if r['label'] >= 0]
  np.save(tmp_path / 'images.npy', np.stack([r['image'] for r in labeled]))
  np.save(tmp_path / 'labels.npy', np.array([r['label'] for r in labeled]))
  run = subprocess.run([sys.executable, '-c', ZERO_SHOT, str(artifact),
                        str(tmp_path / 'images.npy'), str(tmp_path / 'labels.npy')],
                       capture_output=True, text=True,
                       cwd=tmp_path)  # outside the repo: jaxcl is not importable by path
  assert run.returncode == 0, run.stderr
  got = json.loads(run.stdout)['zeroshot_top1']
  expected = json.loads((clip_run / 'eval.json').read_text())['zeroshot_top1']
  assert got == pytest.approx(expected, abs=0.01)


@pytest.mark.slow  # a whole CLI run
def test_train_on_a_pairs_file_with_broken_rows(tmp_path):
  rows = []
  for i, example in enumerate(shapes.generate(seed=5, num_images=48)):
    Image.fromarray(example['image']).save(tmp_path / f'{i}.png')
    rows.append(json.dumps({'image': f'{i}.png', 'caption': example['captions'][0]}))
  rows.insert(3, json.dumps({'image': 'missing.png', 'caption': 'a red circle'}))  # line 4
  rows.insert(7, '{not json')  # line 8
  rows.insert(9, json.dumps({'image': '0.png', 'caption': '  '}))  # line 10
  (tmp_path / 'pairs.jsonl').write_text('\n'.join(rows) + '\n')
  workdir = tmp_path / 'run'
  proc = jaxcl('train', '--config', CLIP_CONFIG, '--workdir', str(workdir),
               *tiny_overrides(TINY_TWO_TOWER, batch_size=8), '--config.total_steps=2',
               '--config.dataset.name=image_text_pairs',
               f'--config.dataset.path={tmp_path / "pairs.jsonl"}',
               '--config.dataset.image_size=32', '--config.dataset.pairs.test_fraction=0.25',
               '--config.eval.batch_size=8')
  out = proc.stdout + proc.stderr
  assert '3 bad rows' in out, out
  for line in ('line 4', 'line 8', 'line 10'):
    assert line in out, out
  results = json.loads((workdir / 'eval.json').read_text())
  assert 'zeroshot_top1' not in results  # no labels
  assert 0 <= results['i2t_r1'] <= results['i2t_r10'] <= 1
