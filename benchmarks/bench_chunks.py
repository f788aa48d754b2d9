"""Client execution: clients/s of one round for each `clients_per_chunk`, measured in one run.

Same cohort, same work (local SGD steps, identity uplink, weighted mean, server step); only
the chunking of the client axis changes (1 = one client at a time inside the one XLA program
via `lax.scan`, 'all' = one vmap over the cohort). Repeats are interleaved across chunk sizes
so machine noise hits all alike; printed is the median round time and the ratio against
chunk 1. Models: 'mlp' (60-H-10, `--hidden`), 'cnn' (FedJAX's EMNIST CNN, 1,206,590 params,
`nn.Conv`; the round's CPU default rewrites convolutions to im2col).

  python benchmarks/bench_chunks.py --model mlp --hidden 200 --cohort 50
  python benchmarks/bench_chunks.py --model mlp --hidden 4096 --cohort 32 --chunks 1,4,all
  python benchmarks/bench_chunks.py --model cnn --cohort 10 --chunks 1,2,all
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_compress import compressors, federated, models


def make(model_name: str, hidden: int, cohort: int, steps: int, batch: int):
  """(loss_fn, params, Cohort) on random data of the model's input shape."""
  rng = np.random.default_rng(0)
  if model_name == "cnn":
    model = models.create("emnist_cnn", num_classes=62)
    x = rng.random((cohort, steps, batch, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 62, (cohort, steps, batch))
  else:
    model = models.MLP(10, hidden=(hidden,))
    x = rng.normal(size=(cohort, steps, batch, 60)).astype(np.float32)
    y = rng.integers(0, 10, (cohort, steps, batch))
  params = model.init(jax.random.key(0), jnp.asarray(x[0, 0]))["params"]
  cohort_ = federated.Cohort(ids=jnp.arange(cohort), weight=jnp.ones(cohort),
                             batches={"x": jnp.asarray(x), "y": jnp.asarray(y, jnp.int32)},
                             mask=jnp.ones((cohort, steps, batch), bool))
  return models.classification_loss(model), params, cohort_


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
  p.add_argument("--hidden", type=int, default=200)
  p.add_argument("--cohort", type=int, default=50)
  p.add_argument("--chunks", default="1,2,4,8,all")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=20)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()
  loss_fn, params, cohort = make(a.model, a.hidden, a.cohort, a.steps, a.batch)
  d = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  uplink, server_tx = compressors.identity(), optax.sgd(1.0)
  runs = {}
  for c in a.chunks.split(","):
    chunk = c if c == "all" else int(c)
    rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(0.05), server_tx, uplink,
                                        local_steps=a.steps, clients_per_chunk=chunk))
    st = federated.init_server_state(params, server_tx, uplink, num_clients=a.cohort)
    key = jax.random.key(0)
    jax.block_until_ready(rnd(st, cohort, key))  # compile
    runs[c] = (rnd, st, key)
  times = {c: [] for c in runs}
  for _ in range(a.repeats):
    for c, (rnd, st, key) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(rnd(st, cohort, key))
      times[c].append(time.perf_counter() - t)
  base = statistics.median(times[next(iter(times))])
  print(f"model={a.model} D={d:,} cohort={a.cohort} steps={a.steps} batch={a.batch} "
        f"backend={jax.default_backend()} default={federated._round.default_clients_per_chunk()}")
  for c, ts in times.items():
    med = statistics.median(ts)
    print(f"  clients_per_chunk={c:>4}: {a.cohort / med:8.1f} clients/s  "
          f"({base / med:.2f}x chunk {next(iter(times))})", flush=True)


if __name__ == "__main__":
  main()
