"""LBGM experiment (spec ALGORITHMS_IGC_LBGM.md 3.6 / 4.2) in the federated simulator.

The official FL setup scaled to a CPU and to synthetic data (no MNIST/CIFAR download here):
label-skewed non-IID split (each client holds 3 classes, dealt round-robin as `--non-iid 3`),
full participation, FedSGD (one full-batch gradient per client per round: `local_steps=1`,
client `sgd(1.0)`, batch = largest client, no cycling), server SGD with momentum 0.9.
Model: an MLP instead of the paper's CNN (CPU budget). Compares, in one process on the same
data: FedSGD vs LBGM over a delta sweep, and the stacked variants (signSGD, top-k + EF).
Uplink bits are the exact payload bits reported by the simulator (`RoundMetrics.up_bits`).

  python -m experiments.lbgm.run --workdir=results/lbgm
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from fedjax_compress import compressors as C, error_feedback, federated
from fedjax_compress.data import from_partition

flags.DEFINE_string("workdir", "results/lbgm", "output directory (summary.json)")
flags.DEFINE_integer("rounds", 300, "communication rounds")
flags.DEFINE_integer("clients", 20, "clients (all participate)")
flags.DEFINE_integer("classes_per_client", 3, "label skew: classes held by each client")
flags.DEFINE_integer("samples", 6000, "training examples in total")
flags.DEFINE_integer("hidden", 64, "MLP hidden width")
flags.DEFINE_float("lr", 0.05, "server learning rate (momentum 0.9)")
flags.DEFINE_string("deltas", "0.05,0.1,0.2,0.4", "LBGM thresholds to sweep")
flags.DEFINE_integer("eval_every", 10, "rounds between test evaluations")
flags.DEFINE_integer("seed", 0, "data / init seed")
FLAGS = flags.FLAGS

CLASSES, DIM = 10, 60


def make_data(seed: int, n: int, clients: int, per_client: int):
  """Random two-layer teacher labels on Gaussian inputs; each client gets `per_client` classes."""
  rng = np.random.default_rng(seed)
  w1, w2 = rng.normal(size=(DIM, 128)) / np.sqrt(DIM), rng.normal(size=(128, CLASSES))
  def draw(k):
    x = rng.normal(size=(k, DIM)).astype(np.float32)
    return x, (np.tanh(x @ w1) @ w2).argmax(1).astype(np.int32)
  x, y = draw(n)
  xt, yt = draw(4000)
  # Official `--non-iid k` dealing: class c goes to the clients holding it, split evenly.
  holders = {c: [] for c in range(CLASSES)}
  for i in range(clients):
    for j in range(per_client):
      holders[(i * per_client + j) % CLASSES].append(i)
  parts = [[] for _ in range(clients)]
  for c in range(CLASSES):
    idx = rng.permutation(np.flatnonzero(y == c))
    for h, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
      parts[h].extend(chunk.tolist())
  return from_partition({"x": x, "y": y}, [np.array(p) for p in parts], {"x": xt, "y": yt},
                        CLASSES, "teacher-mlp-noniid")


def init_params(seed: int, hidden: int):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w1": jax.random.normal(k1, (DIM, hidden)) / np.sqrt(DIM), "b1": jnp.zeros(hidden),
          "w2": jax.random.normal(k2, (hidden, CLASSES)) / np.sqrt(hidden),
          "b2": jnp.zeros(CLASSES)}


def apply(params, x):
  return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss_fn(params, batch, mask, key):
  """Masked mean cross-entropy of one (full) batch."""
  del key
  logp = jax.nn.log_softmax(apply(params, batch["x"]))
  nll = -jnp.take_along_axis(logp, batch["y"][:, None], 1)[:, 0]
  return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def run_method(uplink, data, rounds, lr, seed, eval_every):
  """Returns test-accuracy curve, per-round uplink bits (Python ints) and the final loss."""
  server_tx = optax.sgd(lr, momentum=0.9)
  params = init_params(seed, FLAGS.hidden)
  state = federated.init_server_state(params, server_tx, uplink, num_clients=data.num_clients)
  rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(1.0), server_tx, uplink,
                                      local_steps=1))
  batch = int(data.client_sizes().max())
  xt, yt = jnp.asarray(data.test["x"]), jnp.asarray(data.test["y"])
  acc_fn = jax.jit(lambda p: jnp.mean(jnp.argmax(apply(p, xt), 1) == yt))
  accs, up_bits, losses = [], [], []
  for r in range(rounds):
    cohort = federated.sample_cohort(data, r, cohort_size=data.num_clients, local_steps=1,
                                     batch_size=batch, seed=seed, cycle=False)
    state, m = rnd(state, cohort, jax.random.key(seed))
    up_bits.append(int(np.asarray(m.up_bits, np.int64).sum()))
    losses.append(float(np.sum(np.asarray(m.loss) * np.asarray(m.weight))))
    if (r + 1) % eval_every == 0 or r == rounds - 1:
      accs.append(float(acc_fn(state.params)))
  return np.array(accs), np.array(up_bits, np.int64), losses[-1]


def main(argv):
  del argv
  data = make_data(FLAGS.seed, FLAGS.samples, FLAGS.clients, FLAGS.classes_per_client)
  deltas = [float(d) for d in FLAGS.deltas.split(",") if d]
  methods = [("FedSGD", None, C.identity())]
  methods += [(f"LBGM d={d:g}", "FedSGD", C.lbgm(C.identity(), d)) for d in deltas]
  methods += [("signSGD (scaled)", None, C.sign_sgd(scaled=True)),
              ("signSGD + LBGM d=0.4", "signSGD (scaled)", C.lbgm(C.sign_sgd(scaled=True), 0.4)),
              ("top-10% + EF", None, error_feedback(C.top_k(fraction=0.1))),
              ("EF(top-10% + LBGM d=0.4)", "top-10% + EF",
               error_feedback(C.lbgm(C.top_k(fraction=0.1), 0.4)))]
  rows, by_name = [], {}
  for name, base, c in methods:
    t0 = time.time()
    accs, up, final_loss = run_method(c, data, FLAGS.rounds, FLAGS.lr, FLAGS.seed,
                                      FLAGS.eval_every)
    row = dict(method=name, base=base, best_acc=float(accs.max()), final_acc=float(accs[-1]),
               final_train_loss=final_loss, uplink_bits=int(up.sum()),
               seconds=round(time.time() - t0, 1))
    if base is not None:
      b = by_name[base]
      row["uplink_saved_vs_base"] = 1 - row["uplink_bits"] / b["uplink_bits"]
      row["rel_acc_drop_vs_base"] = (b["best_acc"] - row["best_acc"]) / b["best_acc"]
    by_name[name] = row
    rows.append(row)
    print(json.dumps(row), flush=True)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
    json.dump(dict(flags={k: FLAGS[k].value for k in (
        "rounds", "clients", "classes_per_client", "samples", "hidden", "lr", "deltas",
        "seed")}, rows=rows), f, indent=1)
  print("\n| method | best test acc | final test acc | uplink bits | uplink saved vs base | "
        "rel. acc drop vs base |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    saved = f"{100 * r['uplink_saved_vs_base']:.1f}%" if r["base"] else "-"
    drop = f"{100 * r['rel_acc_drop_vs_base']:.2f}%" if r["base"] else "-"
    print(f"| {r['method']} | {r['best_acc']:.4f} | {r['final_acc']:.4f} | "
          f"{r['uplink_bits']:.4g} | {saved} | {drop} |")


if __name__ == "__main__":
  app.run(main)
