"""One process of tests/test_multihost.py: a sharded federated round over two CPU processes.

Importing this module has no side effects (pytest's --doctest-modules imports it): the device
count and collectives are set in `main`, before the backend starts.
"""

import os
import sys


def main(port: int, pid: int, out: str) -> None:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from test_sharding import make_cohorts, make_round  # pylint: disable=import-outside-toplevel

  from fedjax_compress import federated  # pylint: disable=import-outside-toplevel
  rnd, state = make_round()
  mesh = federated.client_mesh()
  assert mesh.shape["clients"] == 4 and jax.process_count() == 2
  state = federated.shard_state(state, mesh)
  bits = []
  for r, cohort in enumerate(make_cohorts()):
    half = cohort.ids.shape[0] // 2
    local = jax.tree.map(lambda x: x[pid * half:(pid + 1) * half], cohort)
    state, m = rnd(state, federated.shard_cohort(local, mesh, process_local=True),
                   jax.random.key(r))
    bits.append(multihost_utils.process_allgather(m.up_bits, tiled=True))
  if pid == 0:
    params = multihost_utils.process_allgather(state.params, tiled=True)
    senders = multihost_utils.process_allgather(state.senders, tiled=True)
    np.savez(out, w=params["w"], b=params["b"], residual=senders.residual["w"],
             bits=np.stack(bits))
  else:
    multihost_utils.process_allgather(state.params, tiled=True)
    multihost_utils.process_allgather(state.senders, tiled=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
