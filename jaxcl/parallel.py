"""The device mesh and how arrays are laid out on it.

The mesh comes from the config's `mesh` group: named axes `data` and `fsdp`,
each a size or -1 for "all remaining devices". The batch is split over both.
Parameters and optimizer state are replicated over `data` and, when `fsdp`
is larger than 1, sharded over `fsdp` (FSDP / ZeRO-3): each array large
enough is split along its largest dimension that `fsdp` divides, small ones
stay replicated. Axes are `Auto` (GSPMD): the towers run under `jax.jit` on
the sharded batch and XLA inserts the collectives (all-gathering sharded
parameters where they are used, reduce-scattering their gradients; batch-norm
means are global), while the loss runs in `jax.shard_map` and moves
embeddings itself.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxcl.presets import BATCH_AXES, MESH_AXES, mesh_shape  # noqa: F401  (re-exported)

FSDP_AXIS = 'fsdp'  # the axis parameters and optimizer state are split over
FSDP_MIN_SIZE = 2**12  # arrays with fewer elements stay replicated


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                       axis_types=(AxisType.Auto,) * len(sizes), devices=devices)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the batch axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """Where an array of `shape` goes: split over `fsdp` along its largest
  dimension that fsdp divides (the first of equals), or replicated when fsdp
  is 1, the array is small, or no dimension divides."""
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], -i))
  return P(*([None] * axis + [FSDP_AXIS]))


def state_shardings(mesh: Mesh, abstract_tree):
  """NamedShardings for a tree of parameters / optimizer state (FSDP over
  the `fsdp` axis, see `fsdp_spec`)."""
  fsdp = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_tree)


def bytes_per_device(tree) -> int:
  """Bytes of a tree of jax.Arrays (or ShapeDtypeStructs with shardings)
  held by one device."""
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def put_batch(mesh: Mesh, local_batch):
  """This process's rows of the global batch -> global jax.Arrays sharded over
  the batch axes (`jax.make_array_from_process_local_data`, right on a pod)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def gather_to_host(tree):
  """Batch-sharded global arrays -> the whole arrays as NumPy on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
