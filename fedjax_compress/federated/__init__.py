"""Federated simulator: one round as one jitted program (vmap clients, scan local steps).

Public API:
  - `Cohort(ids, batches, mask, weight)`, `ServerState`, `RoundMetrics` (struct dataclasses).
  - `init_server_state(params, server_tx, uplink, *, num_clients, downlink=None,
    algorithm=None) -> ServerState`.
  - `build_round(loss_fn, client_tx, server_tx, uplink, *, local_steps, downlink=None)
    -> round_fn(state, cohort, seed_key) -> (state, RoundMetrics)`.
  - `build_client_update(loss_fn, client_tx, uplink, *, local_steps)` (the per-client part).
  - FL algorithms: `fedprox(inner, mu)` (client_tx); `fedavgm`, `fedadam`, `fedyogi`,
    `scale_by_fedopt` (server_tx); `scaffold`, `mime`, `mimelite` -> `Algorithm`, passed as
    `build_round(..., algorithm=)` and `init_server_state(..., algorithm=)`.
  - `sample_cohort(data, round_index, *, cohort_size, local_steps, batch_size, seed, ...)
    -> Cohort` (host-side NumPy, fixed shapes, padding).
  - Client samplers `uniform_sampler(n, c, *, replace=False, seed=0)`,
    `epoch_sampler(n, c, *, seed=0)`, `fixed_sampler(cohorts)`: `sampler(round) -> ids`,
    passed as `sample_cohort(..., sampler=...)`.
  - `check_memory(fn, *args, limit_bytes=None)`: compile-time memory check (clear error
    before any work), `estimate_memory`, `device_memory_limit`.
  - `client_mesh(num_devices=None) -> Mesh`, `shard_cohort(cohort, mesh)`,
    `shard_state(state, mesh)`.
"""

from fedjax_compress.federated._algorithms import (Algorithm, FedOptState, FedProxState,
                                                   fedadam, fedavgm, fedprox, fedyogi, mime,
                                                   mimelite, scaffold, scale_by_fedopt)
from fedjax_compress.federated._memory import (InsufficientMemoryError, MemoryEstimate,
                                               check_memory, device_memory_limit,
                                               estimate_memory)
from fedjax_compress.federated._round import (build_client_update, build_local_train,
                                              build_round, full_batch_grad)
from fedjax_compress.federated._sampling import (EpochSampler, FixedSampler, UniformSampler,
                                                 epoch_sampler, fixed_sampler, sample_cohort,
                                                 uniform_sampler)
from fedjax_compress.federated._sharding import client_mesh, shard_cohort, shard_state
from fedjax_compress.federated._state import Cohort, RoundMetrics, ServerState, init_server_state

__all__ = ["Cohort", "ServerState", "RoundMetrics", "init_server_state", "build_round",
           "build_client_update", "build_local_train", "sample_cohort", "client_mesh",
           "shard_cohort", "shard_state", "uniform_sampler", "epoch_sampler", "fixed_sampler",
           "UniformSampler", "EpochSampler", "FixedSampler", "Algorithm", "fedprox",
           "FedProxState", "fedavgm", "fedadam", "fedyogi", "scale_by_fedopt", "FedOptState",
           "scaffold", "mime", "mimelite", "full_batch_grad", "check_memory", "estimate_memory",
           "device_memory_limit", "MemoryEstimate", "InsufficientMemoryError"]
