"""Checks on a config's `distill` group and, with check_data, on its teacher's
workdir (validation's part for distillation). Like validation, it loads no
jax at import: the teacher is read from its config.json alone.
"""

from __future__ import annotations

import math

from etils import epath

from jaxcl import config as config_lib, errors, files, methods
from jaxcl.errors import check

# τ modes with one τ per anchor: the distillation softmax takes one τ per direction.
_PER_ANCHOR = ('individual', 'predicted')


def check_distill_group(config, text_tower: bool, check_data: bool) -> None:
  """ConfigError for the first invalid value of config.distill."""
  d = config.distill
  check(isinstance(d.teacher, str), f'distill.teacher must be a workdir, got {d.teacher!r}')
  check(isinstance(d.weight, (int, float)) and not isinstance(d.weight, bool)
        and math.isfinite(d.weight) and d.weight >= 0,
        f'distill.weight must be a number >= 0, got {d.weight!r}')
  check(isinstance(d.start_step, int) and not isinstance(d.start_step, bool)
        and d.start_step >= 0, f'distill.start_step must be an integer >= 0, got '
                               f'{d.start_step!r}')
  if not d.teacher:
    return
  check(text_tower, f'distill.teacher teaches an image-text model (clip, siglip), not '
                    f'{config.method}')
  problem = _side_problem(config)
  check(not problem, f'distill.teacher: this run {problem}')
  if check_data:
    _check_teacher(d.teacher)


def _check_teacher(workdir: str) -> None:
  try:
    teacher = config_lib.load_saved(workdir)
  except errors.ConfigError as e:
    raise errors.ConfigError(f'distill.teacher: {e}') from None
  try:
    text_tower = methods.get(teacher.method).text_tower
  except errors.ConfigError as e:
    raise errors.ConfigError(f'distill.teacher {workdir}: {e}') from None
  check(text_tower, f'distill.teacher {workdir} is a {teacher.method} run: a teacher is an '
                    f'image-text model (clip, siglip)')
  problem = _side_problem(teacher)
  check(not problem, f'distill.teacher {workdir} {problem}')
  check((epath.Path(workdir) / files.CHECKPOINT_DIR).is_dir(),
        f'distill.teacher {workdir} has no checkpoint to teach with')
  check((epath.Path(workdir) / files.DATA_FACTS_FILE).exists(),
        f'distill.teacher {workdir} has no {files.DATA_FACTS_FILE} (a run from before jaxcl '
        f'wrote it): resume it once with this jaxcl to write it')


def _side_problem(config) -> str:
  """Why a teacher's or a student's config cannot take part, or ''."""
  if config.temperature.mode in _PER_ANCHOR:
    return (f'has temperature.mode={config.temperature.mode} (a τ per anchor): distillation '
            f'takes one τ per softmax direction')
  if config.dataset.resolution == 'naflex':
    return 'takes NaFlex patches: distillation reads square images'
  return ''
