"""Client-axis sharding: cohort leaves and per-client states split over a 1-D 'clients' mesh.

Params are replicated; XLA (Auto axis mode) partitions the vmapped round. Multi-host: run the
same program on every host after `jax.distributed.initialize()`; each host loads its slice of
the cohort and builds global arrays with `jax.make_array_from_process_local_data(sharding,
local_slice)` using `NamedSharding(client_mesh(), P('clients'))` (untested here).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_compress.federated._state import Cohort, ServerState


def client_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D Auto-mode mesh `('clients',)` over the first `num_devices` devices (default: all)."""
  n = len(jax.devices()) if num_devices is None else num_devices
  if not 1 <= n <= len(jax.devices()):
    raise ValueError(f"num_devices must be in [1, {len(jax.devices())}], got {n}")
  # Auto axis mode: XLA propagates the client sharding through gathers and reductions
  # (Explicit mode would need out_sharding annotations on every gather by ids).
  return jax.make_mesh((n,), ("clients",), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def _split(tree: Any, mesh: Mesh, what: str) -> Any:
  n = mesh.shape["clients"]
  sharded = NamedSharding(mesh, P("clients"))

  def put(x):
    if np.shape(x)[0] % n:
      raise ValueError(f"{what} leading axis {np.shape(x)[0]} is not a multiple of the "
                       f"{n} devices; pad it (sample_cohort(..., pad_to={n}))")
    return jax.device_put(x, sharded)

  return jax.tree.map(put, tree)


def shard_cohort(cohort: Cohort, mesh: Mesh) -> Cohort:
  """Place every cohort leaf with `NamedSharding(mesh, P('clients'))` (size % devices == 0)."""
  return _split(cohort, mesh, "cohort")


def shard_state(state: ServerState, mesh: Mesh) -> ServerState:
  """Replicate params/optimizer/downlink state; split per-client states over 'clients'."""
  rep = NamedSharding(mesh, P())
  n = mesh.shape["clients"]
  leaves = jax.tree.leaves((state.senders, state.receivers))
  split = all(np.shape(x)[0] % n == 0 for x in leaves)
  place = (lambda t: _split(t, mesh, "client states")) if split else (
      lambda t: jax.device_put(t, rep))
  return state.replace(
      params=jax.device_put(state.params, rep), opt_state=jax.device_put(state.opt_state, rep),
      senders=place(state.senders), receivers=place(state.receivers),
      round=jax.device_put(state.round, rep),
      broadcast=jax.device_put(state.broadcast, rep),
      down_sender=jax.device_put(state.down_sender, rep),
      down_receiver=jax.device_put(state.down_receiver, rep))
