"""LAQ experiment (spec ALGORITHMS_M22_HSQ_LAQ.md 3.8 / 4.3): GD vs QGD vs LAG vs LAQ on softmax regression.

Setup of the official `LAQ.py`, scaled to a CPU and to synthetic data (no MNIST download
here): M workers each hold a contiguous shard, softmax regression with
`0.01/2 ||W||^2`, one full-batch gradient per worker per round, server step on the mean
of the decoded updates (`eta = alpha M`), LAQ with b = 4, D = 10, ck = 0.8, t_bar = 100.
Every method runs in the same process on the same data; bits are the payloads' exact
bits summed on the host. Rounds are a `lax.scan` over a vmapped client step.

  python -m experiments.laq.run --workdir=results/laq
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from fedjax_compress import Keys, bits, compressors as C

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


def run_method(c, x, y, rounds, eta):
  """FedSGD rounds with uplink `c`: returns per-round global loss, uploads [R, M], bits [R, M]."""
  m, _, p = x.shape
  params = {"w": jnp.zeros((p, CLASSES)), "b": jnp.zeros((CLASSES,))}
  s, r = c.init(params)
  stack = lambda t: jax.tree.map(lambda v: jnp.broadcast_to(v, (m,) + v.shape), t)  # noqa: E731
  grad = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))
  global_loss = lambda pr: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(pr, x, y))  # noqa: E731

  def step(carry, k):
    params, ss, rs = carry
    keys = Keys(jax.random.key(0), jax.random.split(jax.random.fold_in(jax.random.key(1), k), m))
    ps, ss = jax.vmap(c.encode, in_axes=(0, 0, Keys(None, 0), None))(grad(params, x, y), ss,
                                                                      keys, params)
    dec, rs = jax.vmap(c.decode, in_axes=(0, 0, Keys(None, 0), None))(ps, rs, keys, params)
    params = jax.tree.map(lambda t, d: t - eta * d.mean(0), params, dec)
    sent = (ps["radius"].count > 0) if isinstance(ps, dict) and "radius" in ps else \
        jnp.ones((m,), bool)
    return (params, ss, rs), (global_loss(params), sent, bits.count(ps, batch_dims=1))

  run = jax.jit(lambda carry: jax.lax.scan(step, carry, jnp.arange(rounds)))
  (params, _, _), (losses, sent, nbits) = run((params, stack(s), stack(r)))
  return params, np.asarray(losses, np.float64), np.asarray(sent), np.asarray(nbits, np.int64)


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
  _, ref_losses, _, _ = run_method(C.identity(), x, y, 3 * rounds, eta)
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
