"""`jaxcl train`: the loop, top to bottom, for every method.

One global batch flows like this: each process reads its rows of uint8
images (and, for a text tower, one tokenized caption per image) with grain
(jaxcl.data) and places them on the mesh as global arrays split over the
batch axes (jaxcl.parallel). The jitted step (jaxcl.trainer.train_step) augments them on
the device into the method's views (jaxcl.methods), runs the towers, and
computes the loss over the global batch in shard_map. Every
`checkpoint_every_steps` the state goes to orbax (jaxcl.trainer.checkpoints), every
`eval_every_steps` the frozen model is evaluated (jaxcl.trainer.evaluator), and a
signal or a non-finite step stops the run cleanly (jaxcl.trainer.guards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time

import jax
import numpy as np
from etils import epath

from jaxcl import config as config_lib, data, errors, files, parallel
from jaxcl.hub import warm_start
from jaxcl.trainer import (
  checkpoints,
  compilation_cache,
  evaluator,
  guards,
  profiling,
  step_memory,
  teacher as teacher_lib,
  throughput,
  train_step,
)
from jaxcl.trainer.experiment import Experiment, setup
from jaxcl.workdir import lock as lock_lib, run_files
from jaxcl.workdir.metric_writer import MetricWriter


def train_and_evaluate(config, workdir, *, allow_batch_change: bool = False,
                       until_step: int | None = None) -> dict:
  """Trains, evaluates and checkpoints a validated config in `workdir`;
  resumes from the newest checkpoint there that restores, on whatever mesh
  this run has. Returns the final eval results; raises errors.Interrupted
  when SIGTERM or Ctrl-C stopped it (after saving its step).
  allow_batch_change: resume a run whose global batch_size was different.
  until_step: stop there with a checkpoint and no final evaluation (returns
  {}); the schedules still run to total_steps, so a later call continues
  the same run (jaxcl.halving's rungs)."""
  workdir = epath.Path(workdir)
  # Everything that can fail on bad input comes before the first write.
  run_files.check_trainable_workdir(workdir)
  config_lib.check_resumable(config, workdir, allow_batch_change)
  if config.wandb.project and importlib.util.find_spec('wandb') is None:
    raise errors.ConfigError('wandb.project is set but wandb is not installed: pip install wandb')
  resuming = files.is_run(workdir)
  exp = setup(config, tokenizer=run_files.saved_tokenizer(workdir) if resuming else None)
  if config.distill.teacher:  # its weights on this mesh, at the step the run pinned
    exp = dataclasses.replace(exp, teacher=teacher_lib.load(config.distill.teacher, exp,
                                                            workdir))
  size = data.known_size(exp.train_source)
  if size is not None and size < config.batch_size:
    raise errors.ConfigError(
        f'dataset {config.dataset.name!r} has {size} training example(s), fewer '
        f'than one batch of {config.batch_size}; lower batch_size or add data')
  eval_data = exp.method.open_eval_data(config, exp.dataset)
  # A fresh run's init.source is read before the workdir is touched: a bad one leaves nothing.
  initial = warm_start.initial_state(exp) if not resuming and config.init.source else None
  # So is the step compiled (unless a live run holds the workdir, or the run is
  # done), and a step that cannot fit in memory refused.
  lock_lib.WorkdirLock(workdir).check_free()
  compiled, notes = None, []
  target = config.total_steps if until_step is None else min(until_step, config.total_steps)
  if not resuming or (checkpoints.complete_step(workdir) or 0) < target:
    compiled = _compile_and_check(exp)
    notes.append(f'compiled the step in {compiled[1]["compile_seconds"]:.1f}s '
                 f'{compilation_cache.describe(compiled[1]["from_compilation_cache"])}; '
                 f'it needs {step_memory.describe(compiled[1]["peak_bytes"])} per device '
                 f'({files.COMPILED_STEP_FILE})')
  try:
    with _Run(exp, workdir, notes, initial) as run:
      return _train(run, eval_data, compiled, target)
  except OSError as e:  # writing the run's files: a full disk, a lost mount
    reason = e.strerror or errors.type_and_first_line(e)
    raise errors.RunError(f'cannot write to {workdir}: {reason}; the last complete checkpoint '
                          f'is step {checkpoints.complete_step(workdir)}') from None


def _compile_and_check(exp: Experiment):
  """(the step compiled from shapes, its step_memory.analysis with the
  compile's seconds and whether the persistent cache had it); ConfigError
  when it needs more memory than the device has."""
  t0, hits = time.perf_counter(), compilation_cache.hits()
  compiled = train_step.compile_step(exp)
  seconds, from_cache = time.perf_counter() - t0, compilation_cache.hits() > hits
  memory = dict(step_memory.analysis(compiled, exp), compile_seconds=round(seconds, 3),
                from_compilation_cache=from_cache)
  step_memory.check_fits(memory, exp.config, jax.local_devices()[0])
  return compiled, memory


class _Run:
  """One start of a run in its workdir: what it holds from taking the
  workdir's lock to its last line (the lock, the checkpoint manager, the
  training iterator, the metric writer, the profiler, the signal guard),
  owned by one ExitStack that closes them on every exit path, last opened
  first closed. A failure's message is what the user reads, so closing
  after one is quiet."""

  def __init__(self, exp: Experiment, workdir: epath.Path, notes: list, initial):
    self.exp, self.workdir, self.notes, self._initial = exp, workdir, notes, initial

  def __enter__(self) -> _Run:
    exp, config = self.exp, self.exp.config
    with contextlib.ExitStack() as stack:  # a failure while opening closes what was opened
      self.lock = stack.enter_context(run_files.hold_workdir(self.workdir))
      if self.lock.took_over is not None:
        self.notes.append(f'jaxcl: took over the lock of a run that is gone: '
                          f'{lock_lib.describe(self.lock.took_over)}')
      self.manager, self.state, self.resumed = self._restore()
      # Before the first step any failure closes the manager; once steps run,
      # only those below do: another may be a lost process, which orbax's
      # closing would wait for.
      self._manager_closes_on = (BaseException,)
      stack.push(_closer(self.manager, lambda: self._manager_closes_on))
      self.start_step = int(self.state.step)
      history = run_files.batch_history(self.workdir, config.batch_size, self.start_step)
      if len(history) > 1 and history[-1][0] == self.start_step:
        self.notes.append(f'jaxcl: global batch {history[-2][1]} -> {history[-1][1]} from step '
                          f'{self.start_step} (--allow_batch_change); recorded in '
                          f'{files.BATCH_HISTORY_FILE}')
      start_record, start_batch = run_files.data_position(history, self.start_step)
      self.notes += run_files.report_skipped_images(self.workdir, exp.dataset)
      saved = (checkpoints.saved_stream_positions(self.manager, self.start_step)
               if self.resumed else None)
      self.train_iter = data.train_batches(
          exp.train_source, batch_size=config.batch_size, seed=config.seed,
          process_index=jax.process_index(), process_count=jax.process_count(),
          transform=exp.method.record_transform(exp.caption_fields()),
          tokenizer=exp.caption_fields(),
          start_record=start_record, start_batch=start_batch, start_step=self.start_step,
          stream_positions=saved, patching=exp.patching)
      stack.push(_closer(self.train_iter, quiet=True))  # its worker processes end too
      self.history = history
      self.stack = stack.pop_all()
    return self

  def open_writer(self, total: int) -> MetricWriter:
    config = self.exp.config
    self.writer = MetricWriter(self.workdir, total_steps=max(total, self.start_step),
                               initial_step=self.start_step, wandb_config=config.wandb,
                               run_config=config_lib.flat_config(config))
    self.stack.push(_closer(self.writer, lambda: (Exception,)))  # the progress bar ends first
    return self.writer

  def start_loop(self, total: int):
    """The guards and the profiler of the loop, which outlive no run."""
    self.preemption = guards.Preemption()
    self.stack.callback(self.preemption.close)
    self.profiler = profiling.StepProfiler(self.workdir, self.exp.config.profile_steps, total)
    self.stack.push(_closer(self.profiler, quiet=True))
    self._manager_closes_on = (errors.RunError, errors.DatasetError, errors.Interrupted, OSError)
    return self.preemption, self.profiler

  def save(self, state) -> None:
    checkpoints.save_checkpoint(self.manager, state,
                                run_files.current_stream_positions(self.train_iter))

  def __exit__(self, *exc_info) -> bool:
    return self.stack.__exit__(*exc_info)

  def _restore(self):
    """(checkpoint manager, state, resumed): the newest checkpoint that
    restores, those that do not set aside (and noted), or a fresh state
    (init.source's weights when the caller read them)."""
    exp, workdir = self.exp, self.workdir
    manager = checkpoints.checkpoint_manager(workdir, exp.config.keep_checkpoints,
                                             cleanup=True)
    state, failures = checkpoints.restore_newest(manager, exp.abstract_state())
    if failures:
      aside = checkpoints.set_aside(workdir, [step for step, _ in failures])
      manager.close()
      manager = checkpoints.checkpoint_manager(workdir, exp.config.keep_checkpoints)
      self.notes += [f'jaxcl: checkpoint {step} does not restore ({error}); moved to {aside}'
                     for step, error in failures]
    if state is None:  # a fresh run: initialized, or init.source's weights
      initial = self._initial
      return manager, warm_start.initial_state(exp) if initial is None else initial, False
    return manager, state, True


def _closer(resource, closes_on=lambda: (BaseException,), *, quiet: bool = False):
  """An ExitStack callback: `resource.close()` when the run ends well (an
  error from it then propagates, unless `quiet`), quietly after an error of
  a type `closes_on()` names, not at all after another."""
  def close(exc_type, exc, tb):
    close_fn = getattr(resource, 'close', None)
    if close_fn is None:
      return False
    if exc_type is None and not quiet:
      close_fn()
    elif exc_type is None or issubclass(exc_type, closes_on()):
      try:
        close_fn()
      except Exception:  # the run's own failure is the one to report
        pass
    return False
  return close


def _train(run: _Run, eval_data, compiled, total: int) -> dict:
  """The loop, up to step `total` (total_steps, or a step before it: then no
  final evaluation); compiled: (the compiled step, its step_memory.analysis),
  or None for a run that was done (compiled here if a step is left after all)."""
  exp, workdir, state, start_step = run.exp, run.workdir, run.state, run.start_step
  config, method = exp.config, exp.method
  facts = run_files.data_facts(exp.info, method.export_facts(config, exp.dataset, eval_data))
  run_files.write_run_start(workdir, config, run.history, exp.tokenizer, facts, start_step)
  if exp.teacher is not None and jax.process_index() == 0:
    teacher_lib.pin(workdir, exp.teacher)
  if compiled is None and start_step < total:  # the newest checkpoint did not restore
    compiled = _compile_and_check(exp)
  compiled_step, memory = compiled or (None, {'flops_per_device': None})
  compiled_step = train_step.runnable(exp, compiled_step)
  if compiled is not None and jax.process_index() == 0:
    step_memory.write(workdir, memory, config, jax.local_devices()[0])
  writer = run.open_writer(total)  # wandb.init may fail (no login): all is closed then
  _print_start(run, eval_data)

  embed_fns = evaluator.make_embed_fns(exp)
  step, timer = start_step, throughput.IntervalTimer()
  finite = guards.FiniteCheck(config.nonfinite, run.manager)
  preemption, profiler = run.start_loop(total)
  bad_data, data_metrics = None, {}
  try:
    while step < total:
      profiler.before(step + 1)
      t0 = time.perf_counter()
      batch = parallel.put_batch(exp.mesh, train_step.model_batch(exp, next(run.train_iter)))
      timer.data_wait += time.perf_counter() - t0
      state, metrics = compiled_step(state, batch)
      # Keep one step in flight: dispatch runs ahead of the device by one step
      # at most (the check of the step before waits for it), so the progress
      # bar and timings count finished steps.
      finite.push(step + 1, metrics)
      step += 1
      profiler.after(step, state)
      timer.steps += 1
      log_due = step % config.log_every_steps == 0 or step == total
      if step == start_step + 1:  # report the first step, then time steady-state steps only
        jax.block_until_ready(state)
        writer.print(f'first step: {time.perf_counter() - t0:.1f}s')
        if not log_due:
          timer.restart()
      writer.advance(1)

      if log_due:
        data_metrics, bad_data = _log(run, step, metrics, timer, memory['flops_per_device'])

      preempted = preemption.reached(step)
      if run.lock.lost is not None:  # this run stalled long enough for another to take over
        raise errors.RunError(f'{workdir} was taken over by {lock_lib.describe(run.lock.lost)} '
                              f'while this run stalled; stopping without writing more')
      if step % config.checkpoint_every_steps == 0 or step == total or preempted or bad_data:
        finite.settle()  # never a checkpoint of a non-finite step
        run.save(state)
      if bad_data:  # too many bad samples: the data needs a look, the steps done are kept
        checkpoints.finish_checkpoints(run.manager)
        raise errors.RunError(f'{bad_data}; checkpoint of step {step} saved')
      if preempted:
        checkpoints.finish_checkpoints(run.manager)
        message = (f'{preemption.describe()}: checkpoint of step {step} saved in '
                   f'{workdir / files.CHECKPOINT_DIR}; run the same command again to resume')
        writer.print(f'jaxcl: {message}')
        raise errors.Interrupted(message, preemption.exit_code)

      if (step % config.eval_every_steps == 0 and step != config.total_steps
          and eval_data.evaluates):
        results = evaluator.run_evaluation(exp, state, eval_data, embed_fns, workdir)
        writer.write(step, results)
        writer.print(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
        timer.restart()
  except errors.DatasetError:  # a shard gone mid-run: the steps done are kept (one process)
    if jax.process_count() == 1 and run.manager.latest_step() != step:
      finite.settle()
      run.save(state)
      checkpoints.finish_checkpoints(run.manager)
    raise

  finite.settle()
  if finite.skipped:
    writer.print(f'jaxcl: {finite.skipped} non-finite step(s) skipped (nonfinite=skip)')
  if step < config.total_steps:  # stopped early on purpose (until_step): no final eval
    checkpoints.finish_checkpoints(run.manager)
    writer.print(f'jaxcl: stopped at step {step} of {config.total_steps}, checkpoint saved')
    return {}
  if run.manager.latest_step() is None:  # total_steps=0: keep the initial encoder for eval/export
    run.save(state)
  checkpoints.finish_checkpoints(run.manager)
  preemption.close()  # the final checkpoint is complete: from here Ctrl-C stops at once
  results = evaluator.run_evaluation(exp, state, eval_data, embed_fns, workdir)
  if results:
    writer.write(step, results)
  run_files.write_eval(workdir, step, results)
  summary = (', '.join(f'{k} {v:.4f}' for k, v in results.items())
             or f'no evaluation ({eval_data.skip_reason})')
  skipped = int(data_metrics.get('skipped_samples', 0))  # the last log step's: step `total`
  if skipped:  # bad samples, and those of shards that stopped being readable
    summary += f'; {skipped} bad sample(s) skipped ({files.SKIPPED_SAMPLES_FILE})'
  writer.print(f'final (step {step}): {summary}  -> {workdir / files.EVAL_FILE}')
  return results


def _print_start(run: _Run, eval_data) -> None:
  """What runs where, and the notes gathered before the writer was up."""
  exp, config, writer = run.exp, run.exp.config, run.writer
  num_params = sum(x.size for x in jax.tree.leaves(run.state.params))
  shape = (f'at their own sizes as NaFlex patches (budgets {list(exp.patching.budgets)})'
           if exp.patching else str(exp.info.image_shape))
  writer.print(
      f'jaxcl: {jax.device_count()} {jax.devices()[0].platform} device(s), '
      f'{jax.process_count()} process(es), mesh {dict(exp.mesh.shape)}; global batch '
      f'{config.batch_size}; {config.method} on {config.dataset.name}, '
      f'{data.describe_size(exp.train_source)} train images {shape}; '
      f'{config.model.name}'
      + exp.method.describe_model(config, exp.tokenizer)
      + f', {num_params / 1e6:.2f}M params; '
      + (f'resuming from step {run.start_step}' if run.resumed else 'starting from step 0'))
  if exp.teacher is not None:
    writer.print(f'jaxcl: {exp.teacher.describe()}, weight {config.distill.weight:g} from step '
                 f'{config.distill.start_step}')
  for note in run.notes:
    writer.print(note)
  if not eval_data.num_classes:
    writer.print(f'{eval_data.skip_reason}: {exp.method.skipped_without_labels}')


def _log(run: _Run, step: int, metrics, timer, step_flops):
  """One log step's row: the step's metrics, timings, the data's counts and
  FLOPs; returns (the data's metrics, a message when too many samples were bad)."""
  config = run.exp.config
  logged = {k: v if np.ndim(v) else float(v)  # arrays are drawn as histograms
            for k, v in jax.device_get(metrics).items()}
  logged.update(timer.metrics(config.batch_size))
  data_metrics, bad_data = run_files.stream_metrics(run.workdir, run.train_iter,
                                                    config.dataset.max_bad_fraction)
  logged.update(data_metrics)
  logged.update(throughput.metrics(step_flops, jax.device_count(), config.batch_size,
                                   logged['step_time'], jax.devices()[0].device_kind))
  run.writer.write(step, logged)
  run.writer.advance(0, loss=logged['loss'], tau=logged['temperature'],
                     acc=logged['contrastive_top1'])
  timer.restart()
  return data_metrics, bad_data
