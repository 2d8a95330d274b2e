"""Checkpoints: orbax saves and restores of the train state, the fallback
past checkpoints that do not restore, and setting those aside.

The position in random-access data is not saved: it follows from the step
(and the batch history, jaxcl.workdir.run_files), see jaxcl.data.train_iterator.
The position of shard streams is: item 'data' of the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxcl import errors, files, parallel
from jaxcl.trainer import per_example


def checkpoint_manager(workdir, keep_checkpoints: int | None, *, cleanup: bool = False,
                       read_only: bool = False, background: bool = True
                       ) -> ocp.CheckpointManager:
  """keep_checkpoints: how many to keep (config.keep_checkpoints; None for
  a reader, which deletes none). cleanup: delete unfinished checkpoint
  writes left by a killed run (orbax writes to a temporary directory and
  renames it when complete, so those are never restored); only the run that
  holds the workdir may do this.
  read_only: for eval and export, which write nothing in the workdir.
  background=False: saves write before returning, without the host copy of
  the state a background write takes (an import writes one checkpoint)."""
  # (orbax's own read_only option logs three warnings; not creating the
  # folder and not saving is all these commands need.)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep_checkpoints,
                                         enable_async_checkpointing=background and not read_only,
                                         cleanup_tmp_directories=cleanup and not read_only,
                                         create=not read_only)
  if jax.process_count() == 1:
    _save_whole_shards_in_one_process()
  workdir = epath.Path(workdir)
  if not files.is_object_store(workdir):  # orbax wants an absolute local path
    workdir = workdir.absolute()
  return ocp.CheckpointManager(workdir / files.CHECKPOINT_DIR,
                               options=options)


@functools.cache  # once per process
def _save_whole_shards_in_one_process() -> None:
  """Orbax splits the writing of every replicated array among its replicas
  (so that a pod's hosts share it) unless the platform is a GPU. In one
  process that only cuts each array into one slice per device: hundreds of
  small programs compiled at a run's first save (1.5 s of a tiny digits run
  on a CPU) for the same bytes written. One process writes whole shards;
  a multi-process job keeps orbax's choice. (The state's random key is
  raw key data, so orbax's array-metadata store, which only restores typed
  keys, is not needed.)"""
  absl = logging.getLogger('absl')
  level = absl.level
  absl.setLevel(logging.ERROR)  # the registry warns that it replaces orbax's default
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
        override=True)
  finally:
    absl.setLevel(level)


DATA_ITEM = 'data'  # where shard streams stand after the checkpoint's step


def save_checkpoint(manager, state, stream_positions=None) -> None:
  """Starts writing the train state, RNG included, in the background, with
  the streams' positions (int64 [S, sources, 7], jaxcl.data.stream) when the
  run reads shards or a mixture. A failed write (here or, for the previous background
  one, at this call) raises CheckpointError."""
  items = {'state': ocp.args.StandardSave(state)}
  if stream_positions is not None:
    items[DATA_ITEM] = ocp.args.JsonSave({'stream_positions': stream_positions.tolist()})
  try:
    manager.save(int(state.step), args=ocp.args.Composite(**items))
  except Exception as e:  # tensorstore errors come in many types
    raise _write_failed(manager, e) from None


def finish_checkpoints(manager) -> None:
  """Blocks until the background checkpoint writes are complete."""
  try:
    manager.wait_until_finished()
  except Exception as e:
    raise _write_failed(manager, e) from None


def complete_step(workdir) -> int | None:
  """The newest checkpoint on disk whose write completed, None if none. A
  write orbax did not finish (killed, or the disk filled) has no final
  directory name or no commit marker, and is never restored."""
  path = epath.Path(workdir) / files.CHECKPOINT_DIR
  try:
    steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()
             and (p / files.CHECKPOINT_DONE).exists()] if path.exists() else []
  except OSError:  # called while reporting a storage failure: unknown, not a traceback
    return None
  return max(steps, default=None)


def _write_failed(manager, e: Exception) -> errors.CheckpointError:
  return errors.CheckpointError(
      f'writing a checkpoint in {manager.directory} failed ({errors.type_and_first_line(e)}); '
      f'the last complete checkpoint is step {complete_step(manager.directory.parent)}; '
      f'the unfinished one is never restored')


def restore_checkpoint(manager, abstract_state, step=None):
  """The state of checkpoint `step` (default: the latest) in the layout of
  `abstract_state` (Experiment.abstract_state()), whatever mesh wrote it.
  Returns None when there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  abstract_state, strict = _per_example_resized(manager, step, abstract_state)
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state, strict=strict))).state


def restore_weights(manager, abstract_state, step: int):
  """(params, batch_stats) of checkpoint `step` alone, in the layout of
  `abstract_state`'s: a frozen model's weights without its optimizer
  state, which is never read into memory (orbax's partial restore)."""
  weights = {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}
  restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(
      sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype), weights)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=weights, restore_args=restore_args, partial_restore=True))).state
  return restored['params'], restored['batch_stats']


def _per_example_resized(manager, step: int, abstract_state):
  """(abstract_state, strict) for restoring checkpoint `step`: per-example
  tables (jaxcl.trainer.per_example) written on another number of devices have
  other padding rows. Their target keeps the abstract's rows, or for a
  set-up that does not know the split's size (rows 0: eval, export) the
  saved rows padded to this mesh; orbax pads or trims the padding only
  (strict=False), and only when nothing else differs from what was saved."""
  if not abstract_state.per_example:
    return abstract_state, True
  saved = ocp.StandardCheckpointHandler().metadata(
      epath.Path(manager.directory) / str(step) / 'state').tree
  saved_tables = saved.get('per_example', {})

  def target(name, leaf):
    if leaf.shape[0] or name not in saved_tables:
      return leaf
    shards = parallel.num_batch_shards(leaf.sharding.mesh)
    rows = per_example.num_rows(saved_tables[name].shape[0], shards)
    return jax.ShapeDtypeStruct((rows, *leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)

  tables = {name: target(name, leaf) for name, leaf in abstract_state.per_example.items()}
  abstract_state = abstract_state.replace(per_example=tables)
  # The rest's shapes as a multiset (the two trees flatten in different orders).
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
  same_rest = shapes(abstract_state.replace(per_example={})) == shapes(
      {k: v for k, v in saved.items() if k != 'per_example'})
  resized = any(name in saved_tables and leaf.shape != saved_tables[name].shape
                for name, leaf in tables.items())
  # Padding differs by less than either layout's shards; more is another
  # dataset size, which the strict restore refuses.
  padding_only = all(
      abs(leaf.shape[0] - saved_tables[name].shape[0]) < max(
          parallel.num_batch_shards(leaf.sharding.mesh), _saved_shards(saved_tables[name]))
      for name, leaf in tables.items() if name in saved_tables)
  return abstract_state, not (resized and same_rest and padding_only)


def _saved_shards(metadata) -> int:
  """How many shards a saved table's rows were split into (1 if unknown)."""
  sharding = getattr(metadata, 'sharding', None)
  try:
    sizes = dict(zip(sharding.axis_names, sharding.shape))
    first = sharding.partition_spec[0]
    axes = first if isinstance(first, (list, tuple)) else [first]
    return max(1, int(np.prod([sizes[a] for a in axes if a is not None])))
  except (AttributeError, IndexError, KeyError, TypeError):
    return 1


def saved_stream_positions(manager, step: int) -> np.ndarray | None:
  """The shard streams' positions saved with checkpoint `step`, None if it
  has none (a run that does not read shards)."""
  if not (epath.Path(manager.directory) / str(step) / DATA_ITEM).exists():
    return None
  saved = manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: ocp.args.JsonRestore()}))
  return np.asarray(saved[DATA_ITEM]['stream_positions'], np.int64)


def _reader_alone(manager) -> ocp.CheckpointManager:
  """`manager`, or in a multi-process job a read-only manager of the same
  checkpoints for this process alone. Orbax's restore ends in a barrier of
  all processes, which a process whose read failed never reaches: the others
  would wait there for it, or meet its next collective instead. Alone, each
  process reads its own shards, and restore_newest's all-gather decides."""
  if jax.process_count() == 1:
    return manager
  me = jax.process_index()
  return ocp.CheckpointManager(manager.directory, options=ocp.CheckpointManagerOptions(
      create=False, enable_async_checkpointing=False, cleanup_tmp_directories=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me,
                                                                 active_processes={me})))


# Tests only: 'PROCESS:STEP' makes process PROCESS fail to restore checkpoint
# STEP, as a host whose copy of a file is unreadable would (the others read it).
FAULT_ENV = 'JAXCL_TEST_RESTORE_FAILS'


def _injected_fault(step: int) -> None:
  if os.environ.get(FAULT_ENV) == f'{jax.process_index()}:{step}':
    raise OSError(f'{FAULT_ENV}: process {jax.process_index()} cannot read step {step}')


def restore_newest(manager, abstract_state):
  """(state, failures): the newest checkpoint that restores, and the
  (step, reason) of each newer one that did not (a truncated or missing
  file, an interrupted copy). (None, []) when there are no checkpoints;
  CheckpointError when there are some and none restores."""
  state, failures, reader = None, [], _reader_alone(manager)
  for step in sorted(manager.all_steps(), reverse=True):
    for attempt in range(2):  # once more: a transient read error (a 503) is not corruption
      try:
        _injected_fault(step)
        state, error = restore_checkpoint(reader, abstract_state, step=step), None
        break
      except Exception as e:  # orbax/tensorstore raise many types
        state, error = None, errors.type_and_first_line(e)
        if attempt == 0:
          time.sleep(1.0)
          continue
        break
    if jax.process_count() > 1:  # all processes resume from the same step, or none does
      restored = multihost_utils.process_allgather(np.int32(error is None))
      if error is None and not np.all(restored):
        state, error = None, 'another process could not restore it'
    if error is None:
      break
    failures.append((step, error))
  if reader is not manager:
    reader.close()
  if state is not None:
    return state, failures
  if failures:
    raise errors.CheckpointError(
        f'no checkpoint in {manager.directory} restores (' +
        '; '.join(f'step {s}: {e}' for s, e in failures) + '); nothing was changed: move '
        'them away to start over')
  return None, []


def set_aside(workdir, steps) -> epath.Path:
  """Moves unrestorable checkpoints out of the manager's sight (so that they
  neither count towards keep_checkpoints nor get deleted) into
  workdir/unrestorable_checkpoints/STEP-TIME, for inspection."""
  workdir = epath.Path(workdir)
  aside = workdir / files.UNRESTORABLE_DIR
  if jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
      files.move_folder(workdir / files.CHECKPOINT_DIR / str(step),
                        aside / f'{step}-{int(time.time())}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('jaxcl: unrestorable checkpoints set aside')
  return aside
