"""State kept per training example (TrainState.per_example): tables of one
row per example of the training split, split over the batch axes like the
data, read and written by the batch's dataset indices (batch['index']).

SogCLR's moving averages live here (jaxcl.losses.estimators). A table's rows are the
examples padded to a multiple of the batch shards (`num_rows`);
a restore onto another number of devices pads or trims the padding
(jaxcl.trainer.checkpoints). Rows are read and written with a gather and a scatter
under GSPMD, which partitions them over the shards that hold the rows. If a
batch holds an example twice (it straddles two epochs), one of its two
updates is kept.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxcl.models.temperature import distribution_metrics


def num_rows(examples: int, shards: int) -> int:
  """Rows of a table: the examples, padded to a multiple of the batch shards
  (each device holds an equal slice; padding rows are never read)."""
  return -(-examples // shards) * shards


def gather(tables: dict, batch: dict) -> dict:
  """{name: table [rows, ...]} -> the batch's rows {name: [N, ...]}."""
  return {name: table[batch['index']] for name, table in tables.items()}


def scatter(tables: dict, batch: dict, rows: dict) -> dict:
  """The tables with the batch's rows replaced by `rows`."""
  return {name: table.at[batch['index']].set(rows[name]) for name, table in tables.items()}


def metrics(rows: dict) -> dict:
  """What the step logs about the batch's rows after the step: the mean
  log u (SogCLR); with individual τ, the batch's τ (temperature.distribution_metrics)."""
  if 'log_u' not in rows:
    return {}
  out = {'sogclr_log_u': jnp.mean(rows['log_u'])}
  if 'tau' in rows:
    out.update(distribution_metrics(rows['tau']))
  return out
