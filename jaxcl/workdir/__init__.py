"""A run's workdir: what it holds beyond the checkpoints, and who may write it.

The modules, each importing only those above it:

- lock: one run per workdir (WORKDIR/jaxcl.lock, on local disks and gs://).
- metrics_log: the metrics log, one JSON row per log step, on any store.
- metric_writer: where metrics go (the log, TensorBoard, wandb, the console).
- run_files: the run's other files (config, tokenizer, eval and export
  records), written whole and read back.

File names are in jaxcl.files; the checkpoints are jaxcl.trainer.checkpoints'.
"""
