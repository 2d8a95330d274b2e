"""A trained run loaded back from its workdir, for `jaxcl eval` and
`jaxcl export`: its saved config, tokenizer and newest checkpoint that
restores. Neither writes anything in the workdir but eval.json (and eval
the zero-shot cache, jaxcl.evaluation.zeroshot_cache)."""

from __future__ import annotations

import sys

from etils import epath

from jaxcl import config as config_lib, errors, files
from jaxcl.trainer import checkpoints, evaluator, validation
from jaxcl.trainer.experiment import setup
from jaxcl.workdir import run_files


def load_trained(workdir, *, open_data: bool = True, changes: dict | None = None):
  """(Experiment, state) of the latest checkpoint in a finished or running
  workdir. open_data=False: set up from the data facts the run saved,
  opening no dataset (a run from before data_facts.json opens it still).
  changes: {dotted key: value} applied to the saved config for this call
  (the file is not changed), before it is validated."""
  config = config_lib.load_saved(workdir)
  if changes:
    config.update_from_flattened_dict(changes)
  config.distill.teacher = ''  # a teacher teaches training only: gone, it stops no eval
  facts = None if open_data else run_files.saved_data_facts(workdir)
  try:
    validation.validate(config, check_data=facts is None)  # on the devices present now
  except errors.ConfigError as e:
    if not str(e).startswith('mesh:'):
      raise
    config.mesh = config_lib.base_config().mesh  # trained on a pod, evaluated on a laptop
    validation.validate(config, check_data=facts is None)
  if not (epath.Path(workdir) / files.CHECKPOINT_DIR).is_dir():
    raise errors.ConfigError(f'{workdir} has no checkpoint to load')
  exp = setup(config, tokenizer=run_files.saved_tokenizer(workdir),
              info=facts['info'] if facts else None)
  manager = checkpoints.checkpoint_manager(workdir, None, read_only=True)
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


def evaluate_workdir(workdir, zeroshot: list[str] | None = None,
                     retrieval: list[str] | None = None,
                     max_patches: list[int] | None = None) -> dict:
  """`jaxcl eval`: recomputes eval.json from the latest checkpoint.
  zeroshot, retrieval, max_patches: the suite and NaFlex budgets of this call
  instead of the saved config's eval.zeroshot, eval.retrieval
  (jaxcl.evaluation.zeroshot_suite), eval.max_patches; None: the saved one."""
  changes = {f'eval.{key}': tuple(value) for key, value in
             (('zeroshot', zeroshot), ('retrieval', retrieval), ('max_patches', max_patches))
             if value is not None}
  step, results = evaluate_checkpoint(workdir, changes)
  run_files.write_eval(workdir, step, results)
  return {'step': step, **results}


def evaluate_checkpoint(workdir, changes: dict | None = None) -> tuple[int, dict]:
  """(step, results) of the method's evaluation of the latest checkpoint,
  the saved config changed by `changes` for this call (load_trained); writes
  nothing but the zero-shot cache."""
  exp, state = load_trained(workdir, changes=changes)
  eval_data = exp.method.open_eval_data(exp.config, exp.dataset)
  results = evaluator.run_evaluation(exp, state, eval_data, evaluator.make_embed_fns(exp),
                                      workdir)
  return int(state.step), results
