"""Client-axis sharding: cohort leaves and per-client states split over a 1-D 'clients' mesh.

Params are replicated; XLA (Auto axis mode) partitions the vmapped round.

Multi-host (TPU pod slices, GPU hosts; tested on CPU with two processes and gloo in
tests/test_multihost.py): every process runs the same script,

    jax.distributed.initialize()            # coordinator/process ids from the environment
    mesh = client_mesh()                    # all devices of all processes
    state = shard_state(init_server_state(...), mesh)   # same seed => same state everywhere
    for r in ...:
      local = sample_cohort(...)            # this process's cohort_size / process_count rows
      state, m = round_fn(state, shard_cohort(local, mesh, process_local=True), key)

Process p holds global cohort rows `[p * c_local, (p + 1) * c_local)`; metrics come back as
global arrays (read them with `jax.experimental.multihost_utils.process_allgather`).
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


def _split(tree: Any, mesh: Mesh, what: str, process_local: bool = False) -> Any:
  n = mesh.shape["clients"]
  sharded = NamedSharding(mesh, P("clients"))
  # With process-local rows, each process owns its addressable share of the devices.
  share = n // jax.process_count() if process_local else n

  def put(x):
    if np.shape(x)[0] % share:
      raise ValueError(f"{what} leading axis {np.shape(x)[0]} is not a multiple of the "
                       f"{share} devices it is split over; pad it "
                       f"(sample_cohort(..., pad_to={share}))")
    if process_local:
      return jax.make_array_from_process_local_data(sharded, np.asarray(x))
    return jax.device_put(x, sharded)

  return jax.tree.map(put, tree)


def shard_cohort(cohort: Cohort, mesh: Mesh, *, process_local: bool = False) -> Cohort:
  """Place every cohort leaf with `NamedSharding(mesh, P('clients'))` (size % devices == 0).

  `process_local=True` (multi-host): `cohort` holds only this process's rows, and the global
  cohort is their concatenation in process order (`jax.make_array_from_process_local_data`).
  """
  return _split(cohort, mesh, "cohort", process_local)


def shard_state(state: ServerState, mesh: Mesh) -> ServerState:
  """Replicate params/optimizer/downlink/algorithm server state; split per-client states."""
  rep = NamedSharding(mesh, P())
  n = mesh.shape["clients"]
  leaves = jax.tree.leaves((state.senders, state.receivers, state.alg_clients))
  split = all(np.shape(x)[0] % n == 0 for x in leaves)
  place = (lambda t: _split(t, mesh, "client states")) if split else (
      lambda t: jax.device_put(t, rep))
  return state.replace(
      params=jax.device_put(state.params, rep), opt_state=jax.device_put(state.opt_state, rep),
      senders=place(state.senders), receivers=place(state.receivers),
      alg_clients=place(state.alg_clients), alg_server=jax.device_put(state.alg_server, rep),
      round=jax.device_put(state.round, rep),
      broadcast=jax.device_put(state.broadcast, rep),
      down_sender=jax.device_put(state.down_sender, rep),
      down_receiver=jax.device_put(state.down_receiver, rep),
      aggregator=jax.device_put(state.aggregator, rep))
