"""Every bad config input gets one clear line on stderr, exit code 2, nothing written."""

import os

import pytest

import messages
from helpers import CLIP_CONFIG, DIGITS_CONFIG, cli_in_forks, jaxcl, tiny_overrides

# One real CLI process per bad input (left out by -m "not slow").
pytestmark = pytest.mark.slow

BAD = {
    'unknown key': (['--config.no_such_key=1'], "unknown config key 'no_such_key'"),
    'unknown nested key': (['--config.model.depth=3'], "unknown config key 'depth'"),
    'wrong type': (['--config.batch_size=many'], 'batch_size'),
    'batch not divisible': (['--config.batch_size=30'], 'not divisible by the 8 data shards'),
    'tau <= 0': (['--config.temperature.init=0'], 'temperature.init must be > 0'),
    'negative tau min': (['--config.temperature.min=-0.1'], 'temperature.min must be > 0'),
    'tau min > max': (['--config.temperature.min=0.5', '--config.temperature.max=0.2',
                       '--config.temperature.init=0.3'], 'temperature.min 0.5 must be <='),
    'tau mode': (['--config.temperature.mode=warm'], 'temperature.mode must be one of'),
    'missing dataset': (['--config.dataset.name=no_such_dataset'], "no TFDS dataset named"),
    'unprepared dataset': (['--config.dataset.name=cifar10'], 'is not prepared'),
    'mesh too big': (['--config.mesh.data=16'], 'needs 16 devices'),
    'negative steps': (['--config.total_steps=-5'], 'total_steps must be >= 0'),
    'model': (['--config.model.name=vgg'], 'model.name must be one of'),
    'optimizer': (['--config.optimizer.name=rmsprop'], 'optimizer.name must be one of'),
    'model dtype': (['--config.model.dtype=bf16'], 'model.dtype must be one of'),
    'std zero': (['--config.dataset.std=(0.0,)'], 'dataset.std values must be > 0'),
    'mean length': (['--config.dataset.mean=(0.1,0.2)'], 'dataset.mean needs 1 or 3 numbers'),
    'probe steps': (['--config.eval.probe_steps=0'], 'eval.probe_steps must be > 0'),
    'warmup': (['--config.optimizer.warmup_steps=-1'], 'warmup_steps must be >= 0'),
    'image key': (['--config.dataset.image_key=img'], "has no feature 'img'"),
    'eval split': (['--config.dataset.eval_test_split=validation'], "has no split 'validation'"),
    'method': (['--config.method=moco'], 'method must be one of'),
    # init.source was init.from, which config_flags could not parse (`from` is a keyword).
    'init source missing': (['--config.init.source=/no/such/run'], 'is not a directory'),
    'init old name': (['--config.init.from=/no/such/run'], 'init.from is now called init.source'),
    'init as a group': (["--config.init={'source': '/no/such/run'}"], 'names a group of keys'),
    # --noconfig.KEY (a boolean's False) is checked as --config.KEY is.
    'negated unknown key': (['--noconfig.augment.flipp'], "unknown config key 'flipp'"),
    'negated old name': (['--noconfig.init.from'], 'init.from is now called init.source'),
}
# Two-tower (CLIP) configs: text tower, tokenizer, ViT, caption data.
BAD_CLIP = {
    'text heads': (['--config.text.heads=5'], 'text.width 64 is not divisible by text.heads 5'),
    'text length': (['--config.text.max_length=1'], 'text.max_length must be >= 2'),
    'sentencepiece without a model': (['--config.text.tokenizer=sentencepiece'], 'text: '),
    'sentencepiece model missing': (['--config.text.tokenizer=sentencepiece',
                                     '--config.text.sentencepiece_model=/no/such.model'],
                                    'text: '),
    'tokenizer': (['--config.text.tokenizer=words'], 'text: '),
    'vit patch': (['--config.model.vit.patch_size=5'], 'not divisible by the ViT patch size 5'),
    'vit heads': (['--config.model.vit.heads=5'], 'model.vit.width 128 is not divisible'),
    'text key': (['--config.dataset.text_key=caption'], "has no feature 'caption'"),
    'template': (['--config.eval.zeroshot_templates=("a photo",)'], "needs exactly one '{}'"),
    'template field': (['--config.eval.zeroshot_templates=("a {label}",)'],
                       "needs exactly one '{}'"),
    'class names': (['--config.eval.class_names=("a","b")'], 'eval.class_names has 2 names'),
    'image folder has no captions': (['--config.dataset.name=image_folder',
                                      '--config.dataset.path=/tmp',
                                      '--config.dataset.image_size=32'], 'needs captions'),
    'pairs file missing': (['--config.dataset.name=image_text_pairs',
                            '--config.dataset.path=/no/such/pairs.jsonl',
                            '--config.dataset.image_size=32'], 'is not a file'),
}
CASES = {**{k: (DIGITS_CONFIG, *v) for k, v in BAD.items()},
         **{f'clip {k}': (CLIP_CONFIG, *v) for k, v in BAD_CLIP.items()}}


@pytest.fixture(scope='module')
def refusals(tmp_path_factory):
  """{case: (its workdir, {'code', 'stderr'})}: `jaxcl train` with each case's
  overrides on 8 devices, all run at once (jaxcl imported once, one fork each;
  about 70 s on 2 cores for all the cases, the refusals being what users see)."""
  tmp = tmp_path_factory.mktemp('refusals')
  workdirs = {case: tmp / f'run{i}' for i, case in enumerate(CASES)}
  argvs = [['train', '--config', config_file, '--workdir', str(workdirs[case]), *overrides]
           for case, (config_file, overrides, _) in CASES.items()]
  return dict(zip(CASES, zip(workdirs.values(), cli_in_forks(argvs, devices=8))))


@pytest.mark.parametrize('case', CASES)
def test_bad_config_exits_2_with_one_line(case, refusals):
  workdir, proc = refusals[case]
  assert proc['code'] == 2, proc['stderr']
  lines = proc['stderr'].strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('jaxcl: error: '), proc['stderr']
  assert lines[0] == messages.expected(messages.CONFIG[case])
  assert 'Traceback' not in proc['stderr']
  assert not os.path.exists(workdir)


def test_every_case_has_a_reviewed_message():
  assert set(messages.CONFIG) == set(CASES)
  for case, (_, _, fragment) in CASES.items():  # the fragment each case was written for
    assert fragment in messages.CONFIG[case], case


def test_missing_config_file_and_flags(tmp_path):
  for args, expected in [
      (['train', '--config', str(tmp_path / 'nope.py'), '--workdir', str(tmp_path)],
       'does not exist'),
      (['train', '--workdir', str(tmp_path)], '--config is required'),
      (['train', '--config', DIGITS_CONFIG], '--workdir is required'),
      (['eval', '--workdir', str(tmp_path / 'nowhere')], 'does not exist'),
      (['fly'], "unknown command 'fly'"),
  ]:
    proc = jaxcl(*args, check=False)
    assert proc.returncode == 2 and expected in proc.stderr, (args, proc.stderr)
    assert 'Traceback' not in proc.stderr


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / 'file'
  path.write_text('x')
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(path), check=False)
  assert proc.returncode == 2 and 'not a directory' in proc.stderr


def test_resuming_with_a_different_config_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(),
        '--config.total_steps=0')
  saved = (workdir / 'config.json').read_text()
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               *tiny_overrides(), '--config.total_steps=0', '--config.model.width=16', check=False)
  assert proc.returncode == 2, proc.stderr
  assert 'different config (model.width: 8 there, 16 now)' in proc.stderr
  assert (workdir / 'config.json').read_text() == saved
  # Changing only the schedule of events is allowed.
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(),
        '--config.total_steps=0', '--config.log_every_steps=7')
  # The loss's implementation may change (equal values and gradients); its estimator may not.
  jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir), *tiny_overrides(),
        '--config.total_steps=0', '--config.loss.impl=blockwise')
  proc = jaxcl('train', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               *tiny_overrides(), '--config.total_steps=0', '--config.loss.estimator=sogclr',
               check=False)
  assert proc.returncode == 2 and "loss.estimator: 'batch' there, 'sogclr' now" in proc.stderr


def test_a_config_file_setting_init_from_still_trains_from_it(tmp_path):
  """`jaxcl train` with a config file written for init.from (init.source's
  old name) reads it as init.source: the missing source is refused before
  anything is written, as init.source's is (the flags' copy of the config
  is renamed too, not only the one the overrides are checked against)."""
  old = tmp_path / 'old.py'
  old.write_text(f'import runpy\n\ndef get_config():\n'
                 f'  config = runpy.run_path({DIGITS_CONFIG!r})["get_config"]()\n'
                 f'  config.init["from"] = "/no/such/run"\n  return config\n')
  [proc] = cli_in_forks([['train', '--config', str(old), '--workdir', str(tmp_path / 'run'),
                          *tiny_overrides()]])
  assert proc['code'] == 2, proc['stderr']
  assert proc['stderr'].strip() == ('jaxcl: error: init.source /no/such/run is not a directory '
                                    '(a jaxcl workdir or a checkpoint directory jaxcl import '
                                    'reads)'), proc['stderr']
  assert not (tmp_path / 'run').exists()
