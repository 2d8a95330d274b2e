"""The trainer: everything between a validated config and a trained run.

The modules, each importing only those above it:

- distributed: one process per host or GPU, jax.distributed started.
- compilation_cache: jax's persistent compilation cache for every command.
- profiling, throughput: a profiler trace of chosen steps; FLOPs and
  examples per second.
- dataset_checks: the dataset group's checks, and with data the data's.
- validation: every check on a config before anything is compiled or written.
- optim: optimizers and learning-rate schedules.
- ema_teacher: SigLIP 2's self-distillation terms and their EMA teacher.
- recipe_terms: the per-example terms of SigLIP 2's recipe (the decoder's,
  self-distillation's) on any rows: the whole batch or a microbatch.
- experiment: what a config builds before the first step (model, state,
  mesh, shardings, the method).
- per_example: state kept per training example (the per-example τ tables).
- grad_cache: the exact large-batch step in microbatches.
- train_step: the jitted step, (state, batch) -> (state, metrics).
- step_memory: the compiled step's memory and FLOPs, before a run starts.
- synthetic: a config's model and step without a dataset (benchmarks).
- checkpoints: orbax saves and restores of the state, with fallbacks.
- guards: stopping cleanly on a signal or a non-finite step.
- evaluator: the frozen model's embedding functions and the method's
  evaluation, during training, at its end and for `jaxcl eval`.
- trained: a trained run loaded back from its workdir.

The loop itself is jaxcl.train.
"""
