"""What an uplink compressor costs a FedAvg round of FedJAX's EMNIST CNN, in one process.

Rounds with each uplink (`identity`, `qsgd(127, bucket_size=512)`, `error_feedback(top_k(1 %))`)
are built with `federated.build_round` defaults and timed in turn, `--alternations` times,
on the same cohort (random EMNIST-shaped data, 5 local steps of batch 10, dropout on). Each
row prints clients/s (median over the alternations) and the round-time share of the codec,
`1 - rate / rate(identity)`. Issue 11.1's target is a share <= 10 %.

  python benchmarks/bench_uplink_cost.py --cohort 10 --alternations 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_compress import compressors, error_feedback, federated, tune_cpu_allocator
from fedjax_compress.models._fedjax_models import EmnistCNN

UPLINKS = {
    "identity": compressors.identity,
    "qsgd": lambda: compressors.qsgd(127, bucket_size=512),
    "ef_top_k": lambda: error_feedback(compressors.top_k(fraction=0.01)),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cohort", type=int, default=10)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=10)
  ap.add_argument("--alternations", type=int, default=6)
  a = ap.parse_args()
  tune_cpu_allocator()
  model = EmnistCNN()
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                      jnp.ones((1, 28, 28, 1)))["params"]

  def loss_fn(p, batch, mask, key):
    logits = model.apply({"params": p}, batch["x"], train=True, rngs={"dropout": key})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

  c, s, b = a.cohort, a.steps, a.batch
  rng = np.random.default_rng(0)
  cohort = federated.Cohort(
      ids=np.arange(c, dtype=np.int32),
      batches={"x": rng.random((c, s, b, 28, 28, 1), dtype=np.float32),
               "y": rng.integers(0, 62, (c, s, b)).astype(np.int32)},
      mask=np.ones((c, s, b), bool), weight=np.ones(c, np.float32))
  server_tx, key = optax.sgd(1.0), jax.random.key(0)
  runs = {}
  for name, make in UPLINKS.items():
    up = make()
    fn = jax.jit(federated.build_round(loss_fn, optax.sgd(0.1), server_tx, up, local_steps=s))
    state = federated.init_server_state(params, server_tx, up, num_clients=c)
    jax.block_until_ready(fn(state, cohort, key)[0].params)  # compile
    runs[name] = (fn, state)
  times = {name: [] for name in runs}
  for _ in range(a.alternations):
    for name, (fn, state) in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(state, cohort, key)[0].params)
      times[name].append(time.perf_counter() - t)
  base = c / statistics.median(times["identity"])
  print(f"# EMNIST CNN, cohort {c}, {s} steps x batch {b}, jax {jax.__version__}")
  for name, ts in times.items():
    rate = c / statistics.median(ts)
    print(f"{name:10s} {rate:6.1f} clients/s  codec share of the round {1 - rate / base:+.1%}")


if __name__ == "__main__":
  main()
