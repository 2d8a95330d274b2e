"""`jaxcl export --format open_clip`: a CLIP or SigLIP workdir as an open_clip
model directory, the layout `jaxcl import` reads:

  DIR/open_clip_config.json        {"model_cfg", "preprocess_cfg", "jaxcl": where it came from}
  DIR/open_clip_model.safetensors  the state dict, float32
  DIR/<tokenizer files>            jaxcl.hub.open_clip_plan says which

  import open_clip
  model, _, preprocess = open_clip.create_model_and_transforms('local-dir:DIR')
  tokenizer = open_clip.get_tokenizer('local-dir:DIR')

What open_clip can express, and the refusals of the rest, are
jaxcl.hub.open_clip_plan's. The tensors are the import's rules
(jaxcl.hub.open_clip_layout) run backwards, each parameter read from the
device, converted and written one at a time. The directory is assembled
under a temporary sibling name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from jaxcl import config as config_lib, errors, files, models
from jaxcl.hub import open_clip_layout as layout_lib, open_clip_plan as plan_lib, tensors as t
from jaxcl.models import param_groups
from jaxcl.trainer.trained import load_trained
from jaxcl.workdir import run_files

FORMAT = plan_lib.FORMAT
_refuse = plan_lib.refuse



def weight_entries(params: dict, layout: layout_lib.Layout, tau: float) -> list:
  """[(open_clip tensor name, shape, fetch)] of jaxcl's parameters {path:
  array} (fetch: that tensor, read from the device when called); τ gives the
  logit scale of a model whose τ is not a parameter (fixed or scheduled)."""
  rules = {r.target: r for r in layout_lib.layout_rules(layout)}
  entries = []
  for target, leaf in params.items():
    r = rules.pop(target, None)
    if r is None:
      _refuse(f"jaxcl's parameter {target} has no place in open_clip's model")
    inv = t.inverse(r)
    shape = jax.eval_shape(inv, jax.ShapeDtypeStruct(leaf.shape, jnp.float32)).shape
    entries.append((r.sources[0], tuple(shape),
                    lambda leaf=leaf, inv=inv: inv(np.asarray(jax.device_get(leaf), np.float32))))
  if rules.pop('temperature/log_tau', None) is not None:
    entries.append(('logit_scale', (), lambda: np.float32(-math.log(tau))))
  if rules:
    target, r = next(iter(rules.items()))
    _refuse(f"open_clip's tensor {r.sources[0]} has no jaxcl parameter ({target})")
  return entries


def _check_output(workdir, output: epath.Path, overwrite: bool) -> bool:
  """Whether `output` holds an earlier export that --overwrite replaces;
  ConfigError for a file, a workdir's own name, or any other non-empty folder."""
  if output.exists() and not output.is_dir():
    raise errors.ConfigError(f'--output {output} is a file; --format {FORMAT} writes a directory')
  for folder in [output, *output.parents]:
    if files.is_run(folder) or files.same_file(folder, workdir):
      inside = output.relative_to(folder).parts
      if not inside or inside[0] in files.WORKDIR_NAMES:
        raise errors.ConfigError(f'--output {output} is where the jaxcl workdir {folder} keeps '
                                 f'its own files; choose another directory')
  names = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
  if names and not overwrite:
    raise errors.ConfigError(f'--output {output} is not empty; pass --overwrite to replace an '
                             f'earlier open_clip export there')
  foreign = [n for n in names if n not in plan_lib.EXPORT_FILES]
  if names and (foreign or layout_lib.CONFIG not in names):
    what = foreign[0] if foreign else f'no {layout_lib.CONFIG}'
    raise errors.ConfigError(f'--output {output} holds {what}: not an open_clip export, the '
                             f'only folder --overwrite replaces')
  try:  # before the model is loaded: a folder that cannot be written
    output.parent.mkdir(parents=True, exist_ok=True)
    probe = output.parent / f'.{output.name}.probe-{uuid.uuid4().hex[:8]}'
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    raise errors.ConfigError(f'cannot write --output {output}: '
                             f'{e.strerror or errors.first_line(e)}') from None
  return bool(names)


def _write(output: epath.Path, contents: dict, entries: list, replacing: bool) -> None:
  """The export directory, assembled under a temporary sibling name and
  renamed into place (an earlier export it replaces is removed after)."""
  tag = uuid.uuid4().hex[:8]
  staging = output.parent / f'.{output.name}.exporting-{tag}'
  old = output.parent / f'.{output.name}.replaced-{tag}' if replacing else None
  try:
    staging.mkdir(parents=True)
    t.write_safetensors(staging / layout_lib.WEIGHTS, entries, {'format': 'pt'})
    for name, data in contents.items():
      (staging / name).write_bytes(data)
    if old is not None:
      output.rename(old)
    elif output.exists():
      output.rmdir()  # empty
    try:
      staging.rename(output)
    except OSError:
      if old is not None:
        old.rename(output)
      raise
  except OSError as e:
    raise errors.ConfigError(f'cannot write --output {output}: '
                             f'{e.strerror or errors.first_line(e)}') from None
  finally:
    for path in (staging, old):
      if path is not None and path.exists():
        path.rmtree(missing_ok=True)


def _local(path: epath.Path) -> str:
  return str(path) if '://' in str(path) else str(path.absolute())


def export_open_clip(workdir, output, *, overwrite: bool = False,
                     timm_model_name: str | None = None) -> dict:
  """Writes the open_clip directory `output` (which must not exist, be empty
  or, with `overwrite`, hold an earlier export) for the newest checkpoint in
  `workdir`; returns a summary. Every check runs before anything is written.
  timm_model_name: see open_clip_plan.plan."""
  output = epath.Path(output)
  plan = plan_lib.plan(config_lib.load_saved(workdir), run_files.saved_tokenizer(workdir),
                       _local(output), timm_model_name=timm_model_name)
  replacing = _check_output(workdir, output, overwrite)
  exp, state = load_trained(workdir, open_data=False)
  return write_open_clip(exp, state, output, plan, replacing=replacing,
                         source=_local(epath.Path(workdir)))


def write_open_clip(exp, state, output, plan: plan_lib.Plan, *, replacing: bool = False,
                    source: str = '') -> dict:
  """Writes the model of `exp` with `state`'s parameters as the open_clip
  directory `output` that `plan` (open_clip_plan.plan of its config and
  tokenizer) describes, replacing an export there if `replacing`; returns
  a summary. export_open_clip checks `output` first; this does not."""
  output, config = epath.Path(output), exp.config
  params = {param_groups.path_name(k): v
            for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  # What only training uses stays behind: the decoder and the self-distillation heads.
  params = {k: v for k, v in params.items()
            if not k.startswith(tuple(f'{part}/' for part in models.TRAINING_ONLY))}
  if config.temperature.mode == 'free':
    _refuse("open_clip's logits are the cosine times a scale; this run trained on 2 artanh of "
            "the cosine (temperature.mode=free)")
  if config.temperature.mode in ('individual', 'predicted'):
    _refuse(f"open_clip has one logit scale; this run gave each anchor its own τ "
            f"(temperature.mode={config.temperature.mode})")
  channels = params['image_encoder/patchify/kernel'].shape[2]
  if channels != 3:
    _refuse(f"the image tower takes {channels}-channel images; open_clip's take RGB")
  layout = dataclasses.replace(plan.layout, logit_bias='bias/value' in params)
  model_cfg = dict(plan.model_cfg)
  if layout.logit_bias:
    model_cfg['init_logit_bias'] = float(jax.device_get(params['bias/value']))
  model = nnx.merge(exp.eval_graphdef, state.params, state.batch_stats)
  tau = float(model.temperature(state.step))
  entries = weight_entries(params, layout, tau)
  rgb = lambda values: [float(v) for v in (list(values) * 3 if len(values) == 1 else values)]
  spec = {k: v for k, v in exp.tokenizer.spec().items() if k not in ('model_file', 'vocab_file')}
  cfg = {'model_cfg': model_cfg,
         'preprocess_cfg': {'mean': rgb(config.dataset.mean), 'std': rgb(config.dataset.std),
                            'size': config.augment.image_size, 'interpolation': 'bicubic',
                            'resize_mode': 'squash'},
         'jaxcl': {'workdir': source, 'step': int(state.step), 'method': config.method,
                   'temperature': tau, 'tokenizer': spec,
                   'tokenizer_files': sorted(plan.tokenizer_files), 'notes': plan.notes}}
  contents = {**plan.tokenizer_files,
              layout_lib.CONFIG: (json.dumps(cfg, indent=2) + '\n').encode()}
  if jax.process_index() == 0:  # on a pod every process loaded the same parameters
    _write(output, contents, entries, replacing)
  return {'output': str(output), 'model': 'CustomTextCLIP' if layout.timm else 'CLIP',
          'timm_model_name': model_cfg['vision_cfg'].get('timm_model_name'),
          'tensors': len(entries), 'parameters': sum(math.prod(s) for _, s, _ in entries),
          'step': int(state.step), 'tokenizer': plan.tokenizer, 'notes': plan.notes}


def describe(summary: dict, output) -> str:
  """What export_open_clip wrote, for a person, and how to load it."""
  trunk = f' (timm {summary["timm_model_name"]})' if summary['timm_model_name'] else ''
  return '\n'.join(
      [f'wrote {output}: open_clip {summary["model"]}{trunk}, {summary["tensors"]} tensors, '
       f'{summary["parameters"]:,} parameters from step {summary["step"]}; load it with '
       f"open_clip.create_model_and_transforms('local-dir:{output}')",
       f'tokenizer: {summary["tokenizer"]}'] + [f'note: {note}' for note in summary['notes']])
