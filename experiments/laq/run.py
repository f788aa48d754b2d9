"""LAQ experiment (spec ALGORITHMS_M22_HSQ_LAQ.md 3.8 / 4.3): GD vs QGD vs LAG vs LAQ on softmax regression.

Setup of the official `LAQ.py`, scaled to a CPU and to synthetic data (no MNIST download
here): M workers each hold a contiguous shard, softmax regression with
`0.01/2 ||W||^2`, one full-batch gradient per worker per round, server step on the mean
of the decoded updates (`eta = alpha M`), LAQ with b = 4, D = 10, ck = 0.8, t_bar = 100.
Every method runs in the federated simulator (`build_round`, per-client states) in the same
process on the same data; bits are the simulator's exact `up_bits`, summed on the host.

  python -m experiments.laq.run --workdir=results/laq
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

from fedjax_compress import bits, compressors as C, federated

flags.DEFINE_string("workdir", "results/laq", "output directory (summary.json)")
flags.DEFINE_integer("rounds", 1000, "communication rounds")
flags.DEFINE_integer("workers", 10, "workers M (full participation)")
flags.DEFINE_integer("samples", 600, "training samples per worker")
flags.DEFINE_integer("features", 100, "input features")
flags.DEFINE_float("eta", 1.0, "server step on the mean update (= the paper's alpha * M)")
flags.DEFINE_float("tol", 1e-6, "loss residual f - f* defining 'converged'")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_float("feature_decay", 0.0, "feature j scaled by j^-decay (0: isotropic)")
FLAGS = flags.FLAGS

CLASSES, L2 = 10, 0.01


def make_data(seed: int, m: int, n: int, p: int, decay: float = 0.0):
  """Linear-teacher 10-class data (Gumbel label noise, decaying feature scales); contiguous shards (as `LAQ.py` splits MNIST)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(p, CLASSES)) * (3 / np.sqrt(p) if decay == 0 else 2.0)
  def draw(k):
    # feature j scaled by j^-decay (decay 0.6: Sigma_jj = j^-1.2 as in FedProx's synthetic data)
    x = (rng.normal(size=(k, p)) * np.arange(1, p + 1)**-decay).astype(np.float32)
    logits = x @ w + rng.gumbel(size=(k, CLASSES))
    return x, logits.argmax(1).astype(np.int32)
  x, y = draw(m * n)
  xt, yt = draw(5000)
  return x.reshape(m, n, p), y.reshape(m, n), xt, yt


def loss_fn(params, x, y):
  """Mean softmax cross-entropy + 0.01/2 ||W||^2 (the official per-worker objective)."""
  logits = x @ params["w"] + params["b"]
  ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  return ce + L2 / 2 * jnp.sum(params["w"]**2)


def gd_reference(x, y, rounds, eta):
  """Plain full-batch GD losses (a `lax.scan`), used only to define f*."""
  m, _, p = x.shape
  params = {"w": jnp.zeros((p, CLASSES)), "b": jnp.zeros((CLASSES,))}
  global_loss = lambda pr: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(pr, x, y))  # noqa: E731

  def step(pr, _):
    pr = jax.tree.map(lambda t, g: t - eta * g, pr, jax.grad(global_loss)(pr))
    return pr, global_loss(pr)

  return np.asarray(jax.jit(lambda pr: jax.lax.scan(step, pr, None, rounds))(params)[1],
                    np.float64)


def run_method(c, x, y, rounds, eta):
  """LAQ as documented, in the federated simulator: full participation, `local_steps=1`,
  client `sgd(1.0)` (delta = full local gradient), server `sgd(eta)` on the weighted mean
  (equal shards: the plain mean). Returns params, per-round global loss, uploads [R, M] and
  bits [R, M]."""
  m, n, p = x.shape
  params = {"w": jnp.zeros((p, CLASSES)), "b": jnp.zeros((CLASSES,))}
  server_tx = optax.sgd(eta)
  state = federated.init_server_state(params, server_tx, c, num_clients=m)
  rnd = jax.jit(federated.build_round(lambda pr, b, mask, k: loss_fn(pr, b["x"], b["y"]),
                                      optax.sgd(1.0), server_tx, c, local_steps=1))
  cohort = federated.Cohort(ids=jnp.arange(m, dtype=jnp.int32), weight=jnp.ones(m),
                            batches={"x": x[:, None], "y": y[:, None]},
                            mask=jnp.ones((m, 1, n), bool))
  global_loss = jax.jit(lambda pr: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(pr, x, y)))
  skip_bits = 1 + bits.length_bits(sum(v.size for v in jax.tree.leaves(params)))
  losses, sent, nbits = [], [], []
  for _ in range(rounds):
    state, met = rnd(state, cohort, jax.random.key(0))
    losses.append(float(global_loss(state.params)))
    up = np.asarray(met.up_bits, np.int64)
    nbits.append(up)
    # a LAQ skip costs exactly the two length headers; every other message is an upload
    sent.append(up > skip_bits if hasattr(state.senders, "clock") else np.ones(m, bool))
  return state.params, np.array(losses), np.array(sent), np.array(nbits)


def main(argv):
  del argv
  x, y, xt, yt = make_data(FLAGS.seed, FLAGS.workers, FLAGS.samples, FLAGS.features,
                          FLAGS.feature_decay)
  x, y = jnp.asarray(x), jnp.asarray(y)
  eta, rounds = FLAGS.eta, FLAGS.rounds
  methods = {
      "GD (float32)": C.identity(),
      "QGD b=4 (no skipping)": C.laq(4, step_size=eta, t_bar=0),
      "LAG (LAQ b=24, ~unquantized)": C.laq(24, step_size=eta),
      "LAQ b=4": C.laq(4, step_size=eta),
      "LAQ b=8": C.laq(8, step_size=eta),
  }
  # f* from a 3x longer GD run (the official script uses the last loss of the run).
  ref_losses = gd_reference(x, y, 3 * rounds, eta)
  f_star = float(ref_losses.min())
  rows = []
  for name, c in methods.items():
    t0 = time.time()
    params, losses, sent, nbits = run_method(c, x, y, rounds, eta)
    gap = losses - f_star
    hit = np.flatnonzero(gap <= FLAGS.tol)
    k = int(hit[0]) + 1 if hit.size else None
    upto = k if k is not None else rounds
    acc = float(np.mean(np.asarray(jnp.argmax(xt @ params["w"] + params["b"], 1)) == yt))
    rows.append(dict(method=name, rounds_to_tol=k, uploads_to_tol=int(sent[:upto].sum()),
                     bits_to_tol=int(nbits[:upto].sum()), uploads=int(sent.sum()),
                     bits=int(nbits.sum()), final_gap=float(gap[-1]), test_acc=acc,
                     seconds=round(time.time() - t0, 1)))
    print(json.dumps(rows[-1]))
  base = rows[0]
  for row in rows:
    row["bits_saved_vs_gd"] = 1 - row["bits"] / base["bits"]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
    json.dump(dict(flags={k: FLAGS[k].value for k in ("rounds", "workers", "samples", "features",
                                                       "eta", "tol", "seed", "feature_decay")},
                   f_star=f_star, rows=rows), f, indent=1)
  print(f"\n| method | rounds to f-f*<={FLAGS.tol:g} | uploads (to tol) | uplink bits (to tol) | "
        f"uploads ({rounds} rds) | uplink bits ({rounds} rds) | final f-f* | test acc |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['method']} | {r['rounds_to_tol']} | {r['uploads_to_tol']} | {r['bits_to_tol']:.3g} | "
          f"{r['uploads']} | {r['bits']:.3g} | {r['final_gap']:.2e} | {r['test_acc']:.4f} |")


if __name__ == "__main__":
  app.run(main)
