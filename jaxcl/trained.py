"""A trained run loaded back from its workdir, for `jaxcl eval` and
`jaxcl export`: its saved config, tokenizer and newest checkpoint that
restores. Neither writes anything in the workdir but eval.json."""

from __future__ import annotations

import sys

from etils import epath

from jaxcl import checkpoints, errors, evaluation, files, run_files
from jaxcl import config as config_lib
from jaxcl.experiment import setup


def load_trained(workdir, *, open_data: bool = True):
  """(Experiment, state) of the latest checkpoint in a finished or running
  workdir. open_data=False: set up from the data facts the run saved,
  opening no dataset (a run from before data_facts.json opens it still)."""
  config = config_lib.load_saved(workdir)
  facts = None if open_data else run_files.saved_data_facts(workdir)
  try:
    config_lib.validate(config, check_data=facts is None)  # on the devices present now
  except errors.ConfigError as e:
    if not str(e).startswith('mesh:'):
      raise
    config.mesh = config_lib.base_config().mesh  # trained on a pod, evaluated on a laptop
    config_lib.validate(config, check_data=facts is None)
  if not (epath.Path(workdir) / files.CHECKPOINT_DIR).is_dir():
    raise errors.ConfigError(f'{workdir} has no checkpoint to load')
  exp = setup(config, tokenizer=run_files.saved_tokenizer(workdir),
              info=facts['info'] if facts else None)
  manager = checkpoints.checkpoint_manager(workdir, config, read_only=True)
  try:
    state, failures = checkpoints.restore_newest(manager, exp.abstract_state())
  except errors.CheckpointError as e:
    raise errors.ConfigError(str(e)) from None
  finally:
    manager.close()
  for step, error in failures:  # left in place: the run that owns the workdir sets them aside
    print(f'jaxcl: checkpoint {step} does not restore ({error}); using step {int(state.step)}',
          file=sys.stderr)
  if state is None:
    raise errors.ConfigError(f'{workdir} has no checkpoint to load')
  return exp, state


def evaluate_workdir(workdir) -> dict:
  """`jaxcl eval`: recomputes eval.json from the latest checkpoint."""
  exp, state = load_trained(workdir)
  eval_data = exp.method.open_eval_data(exp.config, exp.dataset)
  results = evaluation.run_evaluation(exp, state, eval_data, evaluation.make_embed_fns(exp))
  run_files.write_eval(workdir, int(state.step), results)
  return {'step': int(state.step), **results}
