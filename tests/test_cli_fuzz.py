"""Fuzzing `jaxcl train` with random bad config overrides: unknown keys
(typos of real ones), values of the wrong type, values out of range. Each
must end in exit code 2 with one line `jaxcl: error: ...` on stderr, no
traceback, and no workdir written.

The cases run in real processes: one driver process imports the CLI once,
then forks a child per case (a fresh interpreter each would cost ~3 s)."""

import hashlib
import json
import os
import random
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import messages
import test_import
from helpers import CLIP_CONFIG, DIGITS_CONFIG, cli_in_forks, tiny_config, tiny_overrides
from jaxcl import config as config_lib, sweep
from jaxcl.hub import importer

NUM_CASES = 64

# Values each key's validation must refuse.
OUT_OF_RANGE = {
    'total_steps': ['-1', '-100'],
    'batch_size': ['0', '-32'],
    'log_every_steps': ['0', '-1'],
    'eval_every_steps': ['0'],
    'checkpoint_every_steps': ['0', '-5'],
    'keep_checkpoints': ['0', '-1'],
    'nonfinite': ['ignore', 'STOP', "''"],
    'method': ['byol', 'moco', 'SIMCLR'],
    'loss.impl': ['sparse', "''"],
    'loss.block_size': ['0', '-8'],
    'loss.estimator': ['moving', "''"],
    'loss.sogclr_gamma': ['0.0', '1.5', 'nan'],
    'mesh.data': ['3', '0', '-2'],
    'mesh.fsdp': ['0', '5'],
    'temperature.mode': ['frozen', 'Learnable'],
    'temperature.init': ['0.0', '-0.1', '100.0'],
    'temperature.min': ['0.0', '-1.0', '5.0'],
    'temperature.max': ['1e-5'],
    'temperature.warmup_steps': ['-1'],
    'temperature.period': ['-5'],
    'temperature.lr_multiplier': ['0.0', '-2.0'],
    'temperature.bias_init': ['inf', 'nan'],
    'model.name': ['resnet7', 'vgg16', "''"],
    'model.width': ['0', '-8'],
    'model.stage_sizes': ['(0,1)', '(-1,)', '(1,2.5)'],
    'model.head_hidden': ['0'],
    'model.head_out': ['0', '-16'],
    'model.head_layers': ['0'],
    'model.dtype': ['float8', 'int32'],
    'optimizer.name': ['sgdd', 'adam_w'],
    'optimizer.learning_rate': ['0.0', '-0.1', 'nan', 'inf'],
    'optimizer.warmup_steps': ['-10'],
    'optimizer.weight_decay': ['-0.1', 'nan'],
    'optimizer.momentum': ['-0.5', '1.5'],
    'optimizer.b1': ['1.0', '-0.1'],
    'optimizer.b2': ['1.5'],
    'optimizer.grad_clip_norm': ['-1.0'],
    'dataset.name': ['no_such_dataset', "''"],
    'dataset.mean': ['(0.5,0.5)', '()'],
    'dataset.std': ['(0.0,)', '(-1.0,)'],
    'augment.image_size': ['0', '-8'],
    'augment.crop_scale_min': ['0.0', '1.5'],
    'augment.crop_scale_max': ['2.0'],
    'augment.color_jitter_prob': ['1.5', '-0.1'],
    'augment.color_jitter_strength': ['-1.0'],
    'augment.grayscale_prob': ['2.0'],
    'augment.blur_prob': ['-1.0'],
    'eval.batch_size': ['0', '-512'],
    'eval.probe_steps': ['0'],
    'eval.knn_k': ['0', '-5'],
    'eval.knn_temperature': ['0.0', '-1.0'],
    'eval.probe_lr': ['0.0'],
    'eval.probe_l2': ['-1.0'],
    'eval.probe_batch_size': ['0'],
    'eval.max_train_examples': ['-1'],
}

# Values of the wrong type, by the type of the key's default.
WRONG_TYPE = {
    int: ['abc', '2.5', '[1]', '1e3x'],
    float: ['abc', '[0.1]', 'fast'],
    bool: ['maybe', '2', 'yes please'],
    tuple: ['abc', '(1,', "{'a': 1}"],
}


def _flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _typo(rng, key):
  chars = 'abcdefghijklmnopqrstuvwxyz_'
  i = rng.randrange(len(key) + 1)
  kind = rng.choice(['insert', 'drop', 'replace', 'suffix'])
  if kind == 'insert':
    return key[:i] + rng.choice(chars) + key[i:]
  if kind == 'drop' and len(key) > 1:
    i = min(i, len(key) - 1)
    return key[:i] + key[i + 1:]
  if kind == 'replace' and i < len(key) and key[i] != '.':
    return key[:i] + rng.choice(chars.replace(key[i], '')) + key[i + 1:]
  return key + '_' + rng.choice(['x', 'size', 'old'])


def _pick(seed: int, case: int, options):
  """The option with the highest hash of (seed, case, option): adding a key
  to the config changes only the cases it wins (1 in the number of keys),
  so the reviewed messages of seed 0 stay valid as the config grows."""
  return max(sorted(options), key=lambda option: hashlib.sha256(
      f'{seed}:{case}:{option}'.encode()).digest())


def bad_overrides(seed: int, n: int) -> list[str]:
  known = _flat(tiny_config())
  typed = [k for k, v in known.items() if type(v) in WRONG_TYPE]
  cases, attempt = [], 0
  while len(cases) < n:
    attempt += 1
    rng = random.Random(f'{seed}:{attempt}')
    kind = rng.choice(['unknown', 'type', 'range', 'range'])
    if kind == 'unknown':
      key = _typo(rng, _pick(seed, attempt, known))
      if key in known or any(k.startswith(key + '.') for k in known) or '..' in key \
          or key.startswith('.') or key.endswith('.'):
        continue
      value = rng.choice(['1', '0.5', 'abc'])
    elif kind == 'type':
      key = _pick(seed, attempt, typed)
      value = rng.choice(WRONG_TYPE[type(known[key])])
    else:
      key = _pick(seed, attempt, OUT_OF_RANGE)
      value = rng.choice(OUT_OF_RANGE[key])
    case = f'--config.{key}={value}'
    if case not in cases:
      cases.append(case)
  return cases


@pytest.mark.slow  # dozens of CLI processes
def test_random_bad_overrides_exit_2_with_one_line(tmp_path):
  """64 real `jaxcl train` processes (forks of one driver; about 60 s on 2
  cores): the exit code, stderr and untouched workdir are what a user sees."""
  seed = int(os.environ.get('JAXCL_FUZZ_SEED', 0))
  overrides = bad_overrides(seed=seed, n=NUM_CASES)
  assert len(overrides) >= 50
  cases = [['train', '--config', DIGITS_CONFIG, '--workdir', str(tmp_path / f'run{i}'),
            '--config.total_steps=3', override] for i, override in enumerate(overrides)]
  results = cli_in_forks(cases, devices=1)
  # Seed 0's messages are reviewed word for word (tests/messages.py); other
  # seeds (JAXCL_FUZZ_SEED) check the form only.
  reviewed = messages.FUZZ_SEED_0 if seed == 0 else {}
  failures = []
  for i, (override, result) in enumerate(zip(overrides, results)):
    lines = [line for line in result['stderr'].splitlines() if line.strip()]
    ok = (result['code'] == 2 and len(lines) == 1 and lines[0].startswith('jaxcl: error: ')
          and 'Traceback' not in result['stderr'] and not (tmp_path / f'run{i}').exists()
          and (override not in reviewed or lines[0] == reviewed[override]))
    if not ok:
      failures.append(f'{override}: exit {result["code"]}, stderr {result["stderr"][-600:]!r}')
  assert not failures, f'{len(failures)} of {len(overrides)} cases:\n' + '\n'.join(failures)
  if seed == 0:
    assert set(reviewed) == set(overrides), 'tests/messages.py lists other cases than seed 0 makes'


@pytest.mark.slow  # CLI processes
def test_bad_shard_urls_exit_2_before_anything_is_compiled(tmp_path):
  """Shards that cannot be read (a folder, random bytes, an empty tar) and
  more streams than shards: found before the compile, all in one line."""
  folder = tmp_path / 'shards'
  (folder / 'folder.tar').mkdir(parents=True)
  (folder / 'sample.jpg').write_bytes(b'image bytes')  # the check reads them, not decodes
  for name in ('good-0', 'good-1'):
    with tarfile.open(folder / f'{name}.tar', 'w') as tar:
      tar.add(folder / 'sample.jpg', arcname='000.jpg')
  (folder / 'random.tar').write_bytes(random.Random(0).randbytes(20000))
  tarfile.open(folder / 'empty.tar', 'w').close()
  urls = lambda *names: '::'.join(f'{folder}/{name}.tar' for name in names)
  cases = {  # overrides: the error's words
      f'--config.dataset.urls={urls("folder")}':
          f'1 of the 1 shards of dataset.urls cannot be read: {folder}/folder.tar (a folder); '
          f'remove them from dataset.urls',
      f'--config.dataset.urls={urls("good-0", "random")}':
          f'1 of the 2 shards of dataset.urls cannot be read: {folder}/random.tar (not a tar '
          f'file: ReadError: invalid header); remove them from dataset.urls',
      f'--config.dataset.urls={urls("empty", "good-0")}':
          f'1 of the 2 shards of dataset.urls cannot be read: {folder}/empty.tar (no sample); '
          f'remove them from dataset.urls',
      f'--config.dataset.urls={urls("good-0", "good-1")} --config.dataset.streams=4':
          '4 data streams read 2 shards: some would read the same shard at once (the same rows '
          'twice in a batch); set dataset.streams to at most 2, or write smaller shards',
      f'--config.dataset.urls={urls("good-0", "folder", "random", "good-1", "empty")}':
          f'3 of the 5 shards of dataset.urls cannot be read: {folder}/folder.tar (a folder), '
          f'{folder}/random.tar (not a tar file: ReadError: invalid header), {folder}/empty.tar '
          f'(no sample); remove them from dataset.urls',
      f'--config.dataset.urls={urls("good-0")} --config.dataset.eval_urls={urls("random")}':
          f'1 of the 1 shards of dataset.eval_urls cannot be read: {folder}/random.tar (not a '
          f'tar file: ReadError: invalid header); remove them from dataset.eval_urls',
  }
  runs = [['train', '--config', CLIP_CONFIG, '--workdir', str(tmp_path / f'run{i}'),
           '--config.dataset.name=webdataset', '--config.dataset.image_size=16',
           *overrides.split(' ')] for i, overrides in enumerate(cases)]
  results = cli_in_forks(runs)
  for i, (overrides, result) in enumerate(zip(cases, results)):
    assert result['code'] == 2, (overrides, result)
    assert result['stderr'] == f'jaxcl: error: {cases[overrides]}\n', overrides
    assert not (tmp_path / f'run{i}').exists(), overrides


@pytest.mark.slow  # CLI processes
def test_bad_shard_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
  """`jaxcl shard` with an output it cannot use, an input it cannot read, or
  a class folder without images: one line naming the problem, no output."""
  (tmp_path / 'file').write_text('')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'mine.txt').write_text('kept')
  for folder, files in {'good': {'cat/a.png'}, 'broken': {'cat/a.jpg'},
                        'empty_class': {'cat/a.png', 'dog/'},
                        'notes': {'cat/a.png', 'docs/readme.txt'}}.items():
    for name in files:
      path = tmp_path / folder / name
      path.parent.mkdir(parents=True, exist_ok=True)
      if path.suffix == '.png':
        Image.new('RGB', (20, 20)).save(path)
      elif path.suffix:
        path.write_bytes(b'not an image')
      else:
        path.mkdir()
  no_image = ('class folder(s) of {} hold no image (.png, .jpg, .jpeg, .bmp, .gif, .webp): {}; '
              'every class folder is a label, so remove them or add images')
  cases = {  # (input, output, flags): the error's words
      ('good', 'file/sub', ''):
          f'--output {tmp_path}/file/sub: {tmp_path}/file is a file, not a folder',
      ('good', 'full', ''): f'--output {tmp_path}/full exists and is not an empty folder',
      ('none', 'out', ''): f'--input {tmp_path}/none does not exist',
      ('broken', 'out', ''):
          f'no usable image in {tmp_path}/broken (unreadable image {tmp_path}/broken/cat/a.jpg: '
          f'UnidentifiedImageError: not an image format PIL knows)',
      ('empty_class', 'out', ''): '1 ' + no_image.format(tmp_path / 'empty_class', 'dog'),
      ('notes', 'out', ''): '1 ' + no_image.format(tmp_path / 'notes', 'docs'),
      ('good', 'out', '--shard_size=0'): '--shard_size=0: 0.0 is not number >= 0.001',
      ('good', 'out', '--shard_size=nan'):
          '--shard_size must be a positive number of MB, got nan',
      ('good', 'out', '--workers=-2'): '--workers=-2: -2 is not integer >= -1',
      ('good', 'out', '--test_fraction=1'): '--test_fraction must be in [0, 1), got 1.0',
  }
  runs = [['shard', '--input', str(tmp_path / source), '--output', str(tmp_path / output),
           '--workers=0', *flags.split()] for source, output, flags in cases]
  under_a_file = f'--output {tmp_path}/file/sub: {tmp_path}/file is a file, not a folder'
  for argv in (['export', '--workdir', str(tmp_path), '--format=open_clip'],  # the others
               ['export', '--workdir', str(tmp_path)], ['import', str(tmp_path)]):
    runs.append(argv + ['--output', str(tmp_path / 'file' / 'sub')])
    cases[tuple(argv)] = under_a_file
  results = cli_in_forks(runs)
  for case, result in zip(cases, results):
    assert result['code'] == 2, (case, result)
    assert result['stderr'] == f'jaxcl: error: {cases[case]}\n', (case, result['stderr'])
  assert not (tmp_path / 'out').exists() and not (tmp_path / 'file').read_text()
  assert [p.name for p in (tmp_path / 'full').iterdir()] == ['mine.txt']


@pytest.mark.slow  # a dozen CLI processes
def test_bad_import_and_export_inputs_exit_2_with_one_line(tmp_path):
  """`jaxcl import` of malformed config JSON, misshapen or integer tensors, a
  pooling token that is not end-of-text, a text file as .npz, a jax.export
  artifact; `jaxcl export` and import to outputs they cannot use: exit 2,
  one line, nothing written."""
  # Here, not at the top: test_import's makers need torch, open_clip and safetensors.
  source = tmp_path / 'source'
  test_import.make_open_clip(source)
  workdir = tmp_path / 'run'
  importer.import_checkpoint(source, workdir)

  def variant(name, config=None, tensors=None):
    """A copy of `source` with config(cfg) and tensors(weights) applied."""
    path = tmp_path / name
    shutil.copytree(source, path)
    cfg_file, weights_file = path / 'open_clip_config.json', path / 'open_clip_model.safetensors'
    if config:
      cfg_file.write_text(json.dumps(config(json.loads(cfg_file.read_text()))))
    if tensors:
      weights = load_file(str(weights_file))
      tensors(weights)
      save_file(weights, str(weights_file))
    return str(path)

  c_fc = 'transformer.resblocks.0.mlp.c_fc.weight'  # [4 x 32, 32]
  transposed = lambda w: w.update({c_fc: np.ascontiguousarray(w[c_fc].T)})
  integer = lambda w: w.update({'ln_final.weight': w['ln_final.weight'].astype(np.int32)})
  eos_2 = lambda cfg: {**cfg, 'model_cfg': {**cfg['model_cfg'], 'text_cfg': {
      **cfg['model_cfg']['text_cfg'], 'pool_type': 'eos', 'eos_id': 2}}}
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_text('{"model_type": "clip", "vision_config": null, "text_config": 5}')
  save_file({'logit_scale': np.zeros((), np.float32)}, str(hf / 'model.safetensors'))
  (tmp_path / 'model.npz').write_text('not a zip archive\n')
  (tmp_path / 'enc.jaxexport').write_bytes(b'serialized StableHLO')
  (tmp_path / 'enc.jaxexport.json').write_text('{}')
  (tmp_path / 'a_file').write_text('mine')
  out = tmp_path / 'out'
  imports = {
      variant('listed', config=lambda cfg: [cfg]): 'open_clip_config.json holds a list, not a '
                                                   'JSON object',
      variant('numbered', config=lambda cfg: {**cfg, 'model_cfg': {**cfg['model_cfg'],
                                                                   'vision_cfg': 224}}):
          'open_clip_config.json: model_cfg.vision_cfg is a number, not an object',
      str(hf): 'config.json: text_config is a number, not an object',
      variant('transposed', tensors=transposed):
          f"tensor {c_fc} has shape (32, 128); the config implies (128, 32) (jaxcl's "
          f"text_encoder/blocks/0/mlp_in/kernel, (32, 128) in jaxcl's layout)",
      variant('integer', tensors=integer): 'tensor ln_final.weight holds int32 values',
      variant('eos', config=eos_2): 'the source pools its text at token id 2 (its eos_id)',
      str(tmp_path / 'model.npz'): 'model.npz is not an npz file',
      str(tmp_path / 'enc.jaxexport'): 'is a jax.export artifact',
  }
  export = lambda output, *more: ['export', '--workdir', str(workdir), '--output', str(output),
                                  *more]
  cases = {**{(s, f'--output={out}'): e for s, e in imports.items()},
           **{tuple(export(tmp_path / 'a_file', '--format', 'open_clip')): 'is a file',
              tuple(export(workdir / 'checkpoints' / 'x', '--format', 'open_clip')):
                  'keeps its own files',
              tuple(export('/proc/jaxcl-x', '--format', 'open_clip')): 'cannot write --output',
              tuple(export(tmp_path)): 'is a directory; give a file name',
              (str(source), f'--output={tmp_path / "a_file"}'): 'exists and is not an empty'}}
  argvs = [list(argv) if argv[0] == 'export' else ['import', *argv] for argv in cases]
  failures = []
  for (argv, expected), result in zip(cases.items(), cli_in_forks(argvs)):
    lines = result['stderr'].strip().splitlines()
    if not (result['code'] == 2 and len(lines) == 1 and lines[0].startswith('jaxcl: error: ')
            and expected in lines[0]):
      failures.append(f'{argv}: exit {result["code"]}, stderr {result["stderr"][-600:]!r}')
  assert not failures, '\n'.join(failures)
  assert not out.exists() and (tmp_path / 'a_file').read_text() == 'mine'
  assert not (workdir / 'checkpoints' / 'x').exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith('.')]


# ------------------------------------------------------------- jaxcl sweep ---
SWEPT = '0.1,0.5'  # the candidates of the sweep folders the reruns meet
# Bad sweep input: (flags, words its one line holds). A new workdir is made for none.
BAD_SWEEPS = [
    ('--temperatures=0.1,,0.2', 'has an empty value'),
    ('--temperatures=', 'needs at least one value'),
    ('--temperatures=nan', "'nan' is neither a finite number nor 'learnable'"),
    ('--temperatures=inf', "'inf' is neither a finite number nor 'learnable'"),
    ('--temperatures=0.1,0.10', 'lists one τ twice'),
    ('--temperatures=5', '--temperatures 5: temperature.init 5.0 must lie in'),
    ('--temperatures=1e-9', '--temperatures 1e-9: temperature.init 1e-09 must lie in'),
    ('--eta=3', '--eta: for --search halving only'),
    ('--search=halving --eta=1', 'eta'),
    ('--search=halving --eta=1000', 'too few'),
    ('--search=halving --holdout=1', '--holdout must be 0'),
    ('--search=halving --holdout=0.001', '--holdout must be 0'),
    ('--search=halving --monitor=accuracy', "--monitor=accuracy: simclr's evaluation"),
    ('--search=halving --monitor=zeroshot_top1', "--monitor=zeroshot_top1: simclr's evaluation"),
]
# Reruns in a sweep folder with other settings: (folder, flags, words).
OTHER_SWEEPS = [
    ('halving', f'--temperatures={SWEPT}', 'holds a halving sweep, not grid'),
    ('halving', '--search=halving --temperatures=0.1,0.5,learnable',
     f'holds a sweep of --temperatures={SWEPT}, not 0.1,0.5,learnable'),
    ('halving', f'--search=halving --temperatures={SWEPT} --eta=3',
     'holds a sweep with --eta=2, not --eta=3'),
    ('halving', f'--search=halving --temperatures={SWEPT} --monitor=linear_top1',
     'holds a sweep with no --monitor, not --monitor=linear_top1'),
    ('halving', f'--search=halving --temperatures={SWEPT} --config.total_steps=16',
     'holds a sweep with a different config (total_steps: 8 there, 16 now)'),
    ('halving', f'--search=halving --temperatures={SWEPT} --config.eval.knn_k=5',
     'holds a sweep with a different config (eval.knn_k: 20 there, 5 now)'),
    ('grid', f'--search=halving --temperatures={SWEPT}', 'holds a grid sweep, not halving'),
    ('grid', f'--temperatures={SWEPT} --config.optimizer.learning_rate=0.001',
     'holds a sweep with a different config (optimizer.learning_rate: 0.002 there, 0.001 now)'),
]


@pytest.mark.slow  # a CLI process per case
def test_bad_sweep_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
  """22 real `jaxcl sweep` processes (forks of one driver; about 60 s on 2 cores)."""
  config = tiny_config(total_steps=8)
  folders = {}  # each as a sweep leaves it once its first run started: it holds a rerun
  for search, options in (('halving', dict(eta=2, holdout=0.2, monitor='')), ('grid', {})):
    folders[search] = tmp_path / search
    configs, _ = sweep.prepare(config, folders[search], SWEPT.split(','),
                               sweep.settings(config, SWEPT.split(','), search, **options),
                               writer=True)
    config_lib.save(configs['0.1'], folders[search] / 'tau-0.1')
  before = {p: p.read_bytes() for p in sorted(tmp_path.rglob('*')) if p.is_file()}
  cases = [(tmp_path / f'new{i}', flags, words) for i, (flags, words) in enumerate(BAD_SWEEPS)]
  cases += [(folders[folder], flags, words) for folder, flags, words in OTHER_SWEEPS]
  results = cli_in_forks([['sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
                           *tiny_overrides(), '--config.total_steps=8', *flags.split()]
                          for workdir, flags, _ in cases])
  failures = []
  for (workdir, flags, words), result in zip(cases, results):
    lines = result['stderr'].splitlines()
    if not (result['code'] == 2 and len(lines) == 1 and lines[0].startswith('jaxcl: error: ')
            and words in lines[0]):
      failures.append(f'{flags}: exit {result["code"]}, stderr {result["stderr"][-600:]!r}')
  assert not failures, '\n'.join(failures)
  after = {p: p.read_bytes() for p in sorted(tmp_path.rglob('*')) if p.is_file()
           and p.parent != tmp_path}  # cli_in_forks' own files lie in tmp_path
  assert after == before and not any(w.exists() for w, _, _ in cases if w.name.startswith('new'))
  # nan and inf are told the same
  nan, inf = (results[[f for f, _ in BAD_SWEEPS].index(f'--temperatures={v}')]['stderr']
              for v in ('nan', 'inf'))
  assert nan.replace('nan', 'X') == inf.replace('inf', 'X')
