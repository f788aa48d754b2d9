"""Round throughput (clients/s): one vmapped jitted round vs a per-client jitted Python loop.

Both do the same work per client (local SGD steps, QSGD encode, decode, weighted mean, server
step) on the same cohort, measured in the same run; the ratio is vmapped / loop.

  python benchmarks/bench_round.py --clients 8,32 --repeats 3         # CPU, small
  python benchmarks/bench_round.py --clients 64,256 --hidden 256      # GPU
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_compress import compressors, data, federated, models
from fedjax_compress._src import keys as K
from fedjax_compress._src.base import Keys


def _timeit(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def bench(num_clients: int, hidden: int, steps: int, batch: int, repeats: int) -> dict:
  """Best-of-`repeats` seconds per round for both implementations on one cohort."""
  fd = data.synthetic(0.5, 0.5, num_clients=num_clients, samples_per_client=steps * batch,
                      seed=0)
  model = models.MLP(fd.num_classes, hidden=(hidden,))
  loss_fn = models.classification_loss(model)
  params = models.init_params(model, fd.clients[0]["x"][:1])
  up = compressors.qsgd(4, bucket_size=128)
  client_tx, server_tx = optax.sgd(0.05), optax.sgd(1.0)
  state = federated.init_server_state(params, server_tx, up, num_clients=num_clients)
  cohort = federated.sample_cohort(fd, 0, cohort_size=num_clients, local_steps=steps,
                                   batch_size=batch)
  cohort = jax.tree.map(jnp.asarray, cohort)
  seed = jax.random.key(0)

  round_fn = jax.jit(federated.build_round(loss_fn, client_tx, server_tx, up, local_steps=steps))

  def vmapped():
    jax.block_until_ready(round_fn(state, cohort, seed))

  client_fn = jax.jit(federated.build_client_update(loss_fn, client_tx, up, local_steps=steps))
  decode = jax.jit(up.decode)

  @jax.jit
  def server_step(params, opt_state, agg):
    upd, opt_state = server_tx.update(agg, opt_state, params)
    return optax.apply_updates(params, upd), opt_state

  w = cohort.weight / jnp.sum(cohort.weight)

  def loop():
    ukeys = K.round_keys(seed, 0, cohort.ids, K.UPLINK)
    tkeys = K.round_keys(seed, 0, cohort.ids, K.LOCAL_TRAINING).private
    agg = jax.tree.map(jnp.zeros_like, state.params)
    for c in range(num_clients):
      k = Keys(ukeys.shared, ukeys.private[c])
      batch_c = jax.tree.map(lambda x: x[c], cohort.batches)
      payload, _, _, _ = client_fn(state.params, state.senders, batch_c, cohort.mask[c],
                                   tkeys[c], k)
      dec, _ = decode(payload, state.receivers, k, state.params)
      agg = jax.tree.map(lambda a, d: a + w[c] * d, agg, dec)
    jax.block_until_ready(server_step(state.params, state.opt_state, agg))

  t_vmap = _timeit(vmapped, repeats)
  t_loop = _timeit(loop, repeats)
  return {"clients": num_clients, "vmap_clients_per_s": num_clients / t_vmap,
          "loop_clients_per_s": num_clients / t_loop, "ratio": t_loop / t_vmap}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--clients", default="8,32")
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  print(f"backend={jax.default_backend()} devices={jax.devices()[0].device_kind} "
        f"model=MLP(60-{a.hidden}-10) steps={a.steps} batch={a.batch} uplink=qsgd(4)")
  print(f"{'clients':>8} {'vmap clients/s':>15} {'loop clients/s':>15} {'ratio':>7}")
  for n in [int(x) for x in a.clients.split(",")]:
    r = bench(n, a.hidden, a.steps, a.batch, a.repeats)
    print(f"{r['clients']:>8} {r['vmap_clients_per_s']:>15.1f} {r['loop_clients_per_s']:>15.1f} "
          f"{r['ratio']:>6.1f}x")


if __name__ == "__main__":
  main()
