"""jaxcl sweep and jaxcl report on a tiny config: files written, finished runs
skipped on a re-run, every plot referenced by the page."""

import csv
import json
import re

import pytest

import messages
from helpers import DIGITS_CONFIG, jaxcl, tiny_config, tiny_overrides
from jaxcl import config as config_lib, search_records, sweep
from jaxcl.trainer import validation

RUN = ['--config.total_steps=6', '--config.log_every_steps=3', '--config.eval_every_steps=1000',
       '--config.checkpoint_every_steps=6']


def test_parse_temperatures():
  assert sweep.parse_temperatures('0.05, 0.1,learnable') == ['0.05', '0.1', 'learnable']
  for bad in ('', '0.1,,0.2', '0.1,', ',0.1', '0.1,hot', '0.1,0.1', '0.1,0.10', '1,1.0'):
    with pytest.raises(config_lib.ConfigError):
      sweep.parse_temperatures(bad)
  # Neither is a τ, and both are told so alike.
  messages_of = {}
  for bad in ('nan', 'inf', '-inf'):
    with pytest.raises(config_lib.ConfigError) as e:
      sweep.parse_temperatures(f'0.1,{bad}')
    messages_of[bad] = str(e.value).replace(bad, 'X')
  assert len(set(messages_of.values())) == 1, messages_of


def test_run_configs_take_tau_as_train_takes_temperature_init():
  config = tiny_config()  # temperature.min 0.01, max 1.0
  for tau, problem in (('5', 'temperature.init 5.0 must lie in [temperature.min, '
                               'temperature.max] = [0.01, 1.0]'),
                       ('1e-9', 'temperature.init 1e-09 must lie in [temperature.min, '
                                'temperature.max] = [0.01, 1.0]'),
                       ('0', 'temperature.init must be > 0, got 0.0'),
                       ('-1', 'temperature.init must be > 0, got -1.0')):
    with pytest.raises(config_lib.ConfigError) as e:
      sweep.run_configs(config, ['0.1', tau])
    assert str(e.value) == f'--temperatures {tau}: {problem}'
    with pytest.raises(config_lib.ConfigError) as e:  # as jaxcl train's validation of the run
      validation.validate(tiny_config(**{'temperature.init': tau, 'temperature.mode': 'fixed'}))
    assert str(e.value) == problem
  config.temperature.max = 5.0  # a wider range takes it
  assert sweep.run_configs(config, ['5'])['5'].temperature.init == 5.0


def test_run_config_sets_the_mode():
  base = config_lib.base_config()
  fixed = sweep.run_config(base, '2.0')  # outside [min, max]: run_configs refuses it
  assert (fixed.temperature.mode, fixed.temperature.init, fixed.temperature.max) == (
      'fixed', 2.0, base.temperature.max)
  assert sweep.run_config(base, 'learnable').temperature.mode == 'learnable'


def test_a_sweep_folder_is_refused_to_other_settings(tmp_path):
  config, values = tiny_config(), ['0.1', 'learnable']
  halving = sweep.settings(config, values, 'halving', eta=2, holdout=0.2, monitor='')
  sweep.prepare(config, tmp_path, values, halving, writer=True)  # records them, trains nothing
  # Nothing trained under them yet (a sweep refused as its first run starts): not held to them.
  assert sweep.check_settings(tmp_path, sweep.settings(config, values)) is None
  config_lib.save(sweep.run_config(config, '0.1'), tmp_path / 'tau-0.1')  # the first run starts
  other = {
      'holds a halving sweep, not grid (--search=grid)': sweep.settings(config, values),
      'holds a sweep of --temperatures=0.1,learnable, not 0.1': sweep.settings(
          config, ['0.1'], 'halving', eta=2, holdout=0.2, monitor=''),
      'holds a sweep with --holdout=0.2, not --holdout=0.1': sweep.settings(
          config, values, 'halving', eta=2, holdout=0.1, monitor=''),
      'holds a sweep with no --monitor, not --monitor=linear_top1': sweep.settings(
          config, values, 'halving', eta=2, holdout=0.2, monitor='linear_top1'),
      'holds a sweep with a different config (total_steps: 600 there, 1200 now)': sweep.settings(
          tiny_config(total_steps=1200), values, 'halving', eta=2, holdout=0.2, monitor=''),
      # eval changes what the runs report: a rerun may not mix two evaluations
      'holds a sweep with a different config (eval.knn_k: 20 there, 5 now)': sweep.settings(
          tiny_config(**{'eval.knn_k': 5}), values, 'halving', eta=2, holdout=0.2, monitor=''),
  }
  for message, settings in other.items():
    with pytest.raises(config_lib.ConfigError) as e:
      sweep.check_settings(tmp_path, settings)
    assert str(e.value).startswith(f'{tmp_path} {message}'), str(e.value)
  # How and where the runs go may change: another machine, more frequent logs.
  elsewhere = tiny_config(**{'dataset.data_dir': str(tmp_path), 'log_every_steps': 7,
                             'mesh.data': 1})
  assert sweep.check_settings(tmp_path, sweep.settings(
      elsewhere, values, 'halving', eta=2, holdout=0.2, monitor=''))['search'] == 'halving'


def test_an_older_sweep_record_is_checked_on_what_it_has(tmp_path):
  config, values = tiny_config(), ['0.1']
  grid, halving = sweep.settings(config, values), sweep.settings(
      config, values, 'halving', eta=2, holdout=0.2, monitor='')
  # A grid's sweep.json before sweeps recorded their settings: a table only.
  (tmp_path / 'sweep.json').write_text(json.dumps({'columns': ['run'], 'rows': [{'run': 'a'}]}))
  config_lib.save(sweep.run_config(config, '0.1'), tmp_path / 'tau-0.1')  # a run of it
  assert sweep.check_settings(tmp_path, grid)['rows'] == [{'run': 'a'}]
  with pytest.raises(config_lib.ConfigError, match='holds a grid sweep, not halving'):
    sweep.check_settings(tmp_path, halving)
  # A config recorded before init.from became init.source.
  grid['config']['init.from'] = grid['config'].pop('init.source')
  (tmp_path / 'sweep.json').write_text(json.dumps(grid))
  assert sweep.check_settings(tmp_path, sweep.settings(config, values))['search'] == 'grid'


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('sweep')
  proc = jaxcl('sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               '--temperatures=0.1,learnable', *tiny_overrides(), *RUN)
  return workdir, proc


@pytest.mark.slow  # a real sweep of two runs
def test_sweep_writes_table_and_plot(swept):
  workdir, proc = swept
  assert 'sweep.csv' in proc.stdout
  rows = list(csv.DictReader(open(workdir / 'sweep.csv')))
  assert [r['tau'] for r in rows] == ['0.1', 'learnable']
  assert float(rows[0]['final_tau']) == pytest.approx(0.1)  # fixed stays fixed
  for key in ('entropy', 'contrastive_top1', 'knn_top1', 'linear_top1', 'wall_time_s', 'loss'):
    assert all(r[key] != '' for r in rows), key
  table = json.loads((workdir / 'sweep.json').read_text())
  assert table['rows'][1]['run'] == 'tau-learnable'
  assert (workdir / 'sweep.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  for run in ('tau-0.1', 'tau-learnable'):
    assert json.loads((workdir / run / 'eval.json').read_text())['step'] == 6


@pytest.mark.slow  # a real sweep of two runs
def test_sweep_rerun_skips_finished_runs(swept):
  workdir, _ = swept
  before = (workdir / 'tau-0.1' / 'eval.json').stat().st_mtime_ns
  proc = jaxcl('sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               '--temperatures=0.1,learnable', *tiny_overrides(), *RUN)
  assert proc.stdout.count('is finished, skipped') == 2
  assert (workdir / 'tau-0.1' / 'eval.json').stat().st_mtime_ns == before


@pytest.mark.slow  # a real sweep of two runs
def test_report_references_every_plot(swept):
  workdir, _ = swept
  proc = jaxcl('report', '--workdir', str(workdir))
  page = (workdir / 'report.html').read_text()
  assert 'report.html' in proc.stdout
  pngs = sorted(p for p in workdir.rglob('*.png'))
  assert len(pngs) >= 1 + 2 * 6  # the sweep plot and each run's plots
  assert page.count('<img src="data:image/png;base64,') == len(pngs)
  for png in pngs:
    assert f'alt="{png.name}"' in page
  assert 'tau-learnable' in page and 'knn_top1' in page
  # A single run's report too.
  jaxcl('report', '--workdir', str(workdir / 'tau-0.1'))
  single = (workdir / 'tau-0.1' / 'report.html').read_text()
  pngs = list((workdir / 'tau-0.1' / 'report').glob('*.png'))
  assert len(re.findall('<img ', single)) == len(pngs)


@pytest.mark.slow  # a real sweep of two runs
def test_sweep_rerun_with_another_config_is_refused(swept):
  workdir, _ = swept
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob('*.json')}
  proc = jaxcl('sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               '--temperatures=0.1,learnable', *tiny_overrides(), *RUN,
               '--config.optimizer.learning_rate=0.001', check=False)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines() == [
      messages.expected(messages.CLI['sweep rerun with another config'], workdir=workdir)]
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob('*.json')} == before


@pytest.mark.slow  # a real sweep of two runs
def test_sweep_reevaluates_a_run_whose_results_are_unreadable(swept):
  """(Was ..._unreadable_or_stale: a rerun with a changed eval key then
  re-evaluated both runs; a sweep now refuses other settings,
  test_a_sweep_folder_is_refused_to_other_settings.)"""
  workdir, _ = swept
  (workdir / 'tau-0.1' / 'eval.json').write_text('{"step": 6, "knn_to')  # cut short
  proc = jaxcl('sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir),
               '--temperatures=0.1,learnable', *tiny_overrides(), *RUN)
  # tau-0.1 is evaluated again, not trained further; tau-learnable is done.
  assert proc.stdout.count('training tau-') == 1 and 'training tau-0.1' in proc.stdout
  assert 'tau-learnable is finished, skipped' in proc.stdout
  assert 'resuming from step 6' in proc.stdout
  assert json.loads((workdir / 'tau-0.1' / 'eval.json').read_text())['step'] == 6


@pytest.mark.slow  # jaxcl processes; init.source is the swept fixture's first run
def test_a_sweep_refused_as_its_first_run_starts_holds_no_rerun(swept, tmp_path):
  """A missing init.source is refused as the first run starts, after the sweep
  recorded its settings: the record is taken back, and one that nothing
  trained under (as a kill then leaves it) does not hold the corrected command."""
  workdir, typo, source = tmp_path / 'sweep', tmp_path / 'typo', swept[0] / 'tau-0.1'
  quick = {'total_steps': 0, 'eval.max_train_examples': 64, 'eval.probe_steps': 1}
  command = ['sweep', '--config', DIGITS_CONFIG, '--workdir', str(workdir), '--temperatures=0.1',
             *tiny_overrides(**quick)]
  refused = jaxcl(*command, f'--config.init.source={typo}', check=False)
  lines = refused.stderr.strip().splitlines()
  assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
  assert lines[0].startswith(f'jaxcl: error: init.source {typo} is not a directory')
  assert not workdir.exists()
  config = tiny_config(**quick, **{'init.source': str(typo)})
  sweep.prepare(config, workdir, ['0.1'], sweep.settings(config, ['0.1']), writer=True)
  jaxcl(*command, f'--config.init.source={source}')
  assert json.loads((workdir / 'sweep.json').read_text())['config']['init.source'] == str(source)


def test_the_sweep_table_has_the_dense_and_decoder_scores_a_run_has():
  """A ViT run's patch probe and a decoder's scores are columns, where a run has them."""
  rows = [{'run': 'tau-0.1', 'tau': 0.1, 'zeroshot_top1': 0.9, 'patch_probe_top1': 0.8,
           'refer_accuracy': 0.2, 'decoder_perplexity': 3.4}, {'run': 'tau-0.2', 'tau': 0.2}]
  columns = search_records.columns(rows)
  assert {'patch_probe_top1', 'refer_accuracy', 'decoder_perplexity'} <= set(columns)
  assert 'knn_top1' not in columns
