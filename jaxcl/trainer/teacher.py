"""A frozen image-text model that teaches the run's (config.distill): loaded
once from its workdir, a `jaxcl train` run or a `jaxcl import`, onto the
run's mesh.

Only its weights are read (no optimizer state), at the step the run first
taught with: the run pins it in its TEACHER_FILE, so the teacher's own run
may go on meanwhile and a resume stays exact. Its parameters are sharded
as its own run would shard them on this mesh (FSDP included). In the step
it sees the student's crops of the batch, resized to its image size and
standardized with its own mean and std, and the same caption read with its
own tokenizer (batch key 'teacher_text', or the student's 'text' when the
two tokenizers are one); see jaxcl.trainer.train_step.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
from etils import epath
from flax import nnx

from jaxcl import config as config_lib, errors, files
from jaxcl.data import augment
from jaxcl.methods.base import standardize
from jaxcl.trainer import checkpoints
from jaxcl.trainer.experiment import Experiment, setup
from jaxcl.workdir import run_files


@dataclasses.dataclass
class Teacher:
  workdir: str
  step: int  # its checkpoint that teaches
  config: Any  # its saved config
  method: Any  # jaxcl.methods.base.Method
  graphdef: Any  # its model in eval mode
  weights: tuple  # (params, batch_stats) on the run's mesh
  shardings: tuple  # their shardings
  tokenizer: Any
  text_key: str  # the batch key of its token ids

  def embeddings(self, weights, views, text_ids):
    """(images [n, D'], texts [n, D'], τ): its unit embeddings of the
    student's crops `views` float32 [n, S, S, C] in [0, 1] and of its token
    ids [n, L'], and its τ (a scalar, or per direction [2]); no gradient."""
    model = nnx.merge(self.graphdef, *weights)
    size = self.config.augment.image_size
    images = jax.vmap(lambda x: augment.resize(x, (size, size)))(views)
    a, b = self.method.embeddings(model, (standardize(images, self.config.dataset), text_ids))
    tau = self.method.temperature(model, self.step)
    return jax.tree.map(jax.lax.stop_gradient, (a, b, tau))

  def describe(self) -> str:
    tokens = 'its own tokenizer' if self.text_key != 'text' else 'the same tokenizer'
    return (f'taught by {self.workdir} (step {self.step}, {self.config.method}, '
            f'{self.config.model.name}, {tokens})')


def load(workdir: str, student: Experiment, run_workdir) -> Teacher:
  """The teacher in `workdir` on the Experiment `student`'s mesh, at the
  step the run in `run_workdir` pinned (its newest for a fresh run).
  ConfigError (one line) when it cannot teach this run."""
  config = config_lib.load_saved(workdir)
  config.mesh = student.config.mesh.copy_and_resolve_references()
  facts = run_files.saved_data_facts(workdir)
  exp = setup(config, tokenizer=run_files.saved_tokenizer(workdir), info=facts['info'])
  exp = dataclasses.replace(exp, mesh=student.mesh)
  if exp.info.image_shape[-1] != student.info.image_shape[-1]:
    raise errors.ConfigError(f'distill.teacher {workdir} reads images of '
                             f'{exp.info.image_shape[-1]} channel(s), this run '
                             f'{student.info.image_shape[-1]}')
  manager = checkpoints.checkpoint_manager(workdir, None, read_only=True)
  try:
    step = pinned_step(run_workdir, workdir)
    steps = manager.all_steps()
    if step is None:
      step = max(steps, default=None)
    if step not in steps:
      raise errors.ConfigError(
          f'distill.teacher {workdir} has no checkpoint of step {step}' if step is not None
          else f'distill.teacher {workdir} has no checkpoint to teach with')
    weights = checkpoints.restore_weights(manager, exp.abstract_state(), step)
  finally:
    manager.close()
  same_tokens = exp.tokenizer.spec() == student.tokenizer.spec()
  return Teacher(workdir=str(workdir), step=int(step), config=config, method=exp.method,
                 graphdef=exp.eval_graphdef, weights=weights,
                 shardings=(exp.state_sharding.params, exp.state_sharding.batch_stats),
                 tokenizer=exp.tokenizer, text_key='text' if same_tokens else 'teacher_text')


def pinned_step(run_workdir, teacher_workdir: str) -> int | None:
  """The teacher's step the run in `run_workdir` was taught with, or None
  (a fresh run). ConfigError when the run was taught by another workdir."""
  path = epath.Path(run_workdir) / files.TEACHER_FILE
  if not path.exists():
    return None
  pinned = json.loads(path.read_text())
  if pinned['workdir'] != str(teacher_workdir):
    raise errors.ConfigError(f'this run was taught by {pinned["workdir"]}, not '
                             f'{teacher_workdir} (distill.teacher)')
  return int(pinned['step'])


def pin(run_workdir, teacher: Teacher) -> None:
  """Records the teacher's workdir and step in the run's TEACHER_FILE."""
  files.write_atomically(epath.Path(run_workdir) / files.TEACHER_FILE, json.dumps(
      {'workdir': teacher.workdir, 'step': teacher.step}, indent=1) + '\n')
