"""Checks on the config groups of SigLIP 2's recipe terms (validation's
part for them): `decoder` (LocCa), `self_distill` (SILC, TIPS) and
`distill` with, when check_data, its teacher's workdir. Like validation,
it loads no jax at import: the teacher is read from its config.json alone.
"""

from __future__ import annotations

import math

from etils import epath

from jaxcl import config as config_lib, errors, files, methods, presets
from jaxcl.errors import check

# τ modes with one τ per anchor: the distillation softmax takes one τ per direction.
_PER_ANCHOR = ('individual', 'predicted')


def check_decoder_group(config, text_tower: bool) -> None:
  """ConfigError for the first invalid value of config.decoder."""
  d = config.decoder
  _check_weight_and_start(d, 'decoder')
  for key in ('width', 'depth', 'heads', 'mlp_dim'):
    check(isinstance(d[key], int) and not isinstance(d[key], bool) and d[key] >= 0,
          f'decoder.{key} must be an integer >= 0 (0: from the text tower), got {d[key]!r}')
  check(isinstance(d.parallel_fraction, (int, float)) and 0 <= d.parallel_fraction <= 1,
        f'decoder.parallel_fraction must be in [0, 1], got {d.parallel_fraction!r}')
  tasks = tuple(d.tasks) if isinstance(d.tasks, (tuple, list)) else ()
  check(bool(tasks) and set(tasks) <= set(presets.DECODER_TASKS),
        f'decoder.tasks must name some of {presets.DECODER_TASKS}, got {d.tasks!r}')
  if not d.weight:
    return
  check(text_tower, f'decoder.weight: the decoder writes captions, {config.method} has none')
  check(config.model.name in presets.VIT_NAMES,
        'decoder.weight: the decoder reads a ViT\'s patch tokens (model.name vit-*)')
  width = d.width or config.text.width
  check(width % (d.heads or config.text.heads) == 0,
        f'decoder width {width} is not divisible by its {d.heads or config.text.heads} heads')


def check_self_distill_group(config, text_tower: bool) -> None:
  """ConfigError for the first invalid value of config.self_distill."""
  s = config.self_distill
  _check_weight_and_start(s, 'self_distill')
  check(_number(s.masked_weight) and s.masked_weight >= 0,
        f'self_distill.masked_weight must be a number >= 0, got {s.masked_weight!r}')
  for key in ('local_views', 'head_hidden', 'head_bottleneck', 'prototypes'):
    check(_integer(s[key]) and s[key] > 0,
          f'self_distill.{key} must be a positive integer, got {s[key]!r}')
  check(_integer(s.local_size) and s.local_size >= 0,
        f'self_distill.local_size must be an integer >= 0 (0: 3/7 of the image size), got '
        f'{s.local_size!r}')
  for key in ('momentum', 'center_momentum'):
    check(_number(s[key]) and 0 <= s[key] < 1,
          f'self_distill.{key} must be in [0, 1), got {s[key]!r}')
  check(_number(s.mask_ratio) and 0 < s.mask_ratio < 1,
        f'self_distill.mask_ratio must be in (0, 1), got {s.mask_ratio!r}')
  for key in ('student_temperature', 'teacher_temperature', 'patch_teacher_temperature'):
    check(_number(s[key]) and s[key] > 0, f'self_distill.{key} must be > 0, got {s[key]!r}')
  for key in ('global_scale', 'local_scale'):
    pair = s[key]
    check(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_number(x) for x in pair)
          and 0 < pair[0] <= pair[1] <= 1,
          f'self_distill.{key} must be (min, max) areas with 0 < min <= max <= 1, got {pair!r}')
  if not (s.weight or s.masked_weight):
    return
  check(text_tower, f'self_distill: SigLIP 2\'s self-distillation trains an image-text '
                    f'model (clip, siglip), not {config.method}')
  check(config.model.name in presets.VIT_NAMES,
        'self_distill: the terms read a ViT\'s patch tokens (model.name vit-*)')
  check(config.dataset.resolution == 'square',
        'self_distill: a NaFlex run has no square crops to distill (SigLIP 2 trains its '
        'NaFlex variant without these terms)')
  patch, size = config.model.vit.patch_size, config.augment.image_size
  check(s.local_size % patch == 0 and s.local_size <= size,
        f'self_distill.local_size {s.local_size} must be whole patches of {patch} px, at '
        f'most augment.image_size {size}')
  patches = (size // patch) ** 2
  check(0 < round(s.mask_ratio * patches) < patches,
        f'self_distill.mask_ratio {s.mask_ratio} of {patches} patches masks none or all')


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_weight_and_start(group, name: str) -> None:
  check(isinstance(group.weight, (int, float)) and not isinstance(group.weight, bool)
        and math.isfinite(group.weight) and group.weight >= 0,
        f'{name}.weight must be a number >= 0, got {group.weight!r}')
  check(isinstance(group.start_step, int) and not isinstance(group.start_step, bool)
        and group.start_step >= 0, f'{name}.start_step must be an integer >= 0, got '
                                   f'{group.start_step!r}')


def check_distill_group(config, text_tower: bool, check_data: bool) -> None:
  """ConfigError for the first invalid value of config.distill."""
  d = config.distill
  check(isinstance(d.teacher, str), f'distill.teacher must be a workdir, got {d.teacher!r}')
  _check_weight_and_start(d, 'distill')
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
  check(teacher.temperature.mode != 'free',
        f'distill.teacher {workdir} has no τ (temperature.mode=free): its softmax over '
        f'cosines is not the one it trained with')
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
