"""Published weights in and out: open_clip, transformers and big_vision
checkpoints read into jaxcl workdirs (`jaxcl import`), jaxcl runs written as
open_clip directories (`jaxcl export --format open_clip`), and a fresh run's
weights taken from either (`init.source`).

The modules, each importing only those above it:

- tensors: a checkpoint's tensors read one at a time, the rules that turn
  them into jaxcl parameters, their inverses, a streaming writer.
- open_clip_layout, transformers_layout, big_vision_layout: each library's
  directory layout, config and tensor names.
- open_clip_plan: what of a jaxcl model open_clip can express.
- importer: `jaxcl import SOURCE --output WORKDIR`.
- open_clip_export: `jaxcl export --format open_clip`.
- warm_start: `init.source`, from a trained run or a published checkpoint.
"""
