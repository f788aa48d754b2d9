"""FedAvg clients/s side by side with FedJAX 0.0.17, in alternating processes on identical work.

Both sides train the same model (FedJAX's EMNIST CNN with dropout, 1,206,590 params, or a
60-200-10 MLP) on the same per-client data (each client holds `steps * batch` examples: one
epoch of `steps` SGD steps, client lr 0.1, server SGD lr 1, example-weighted mean of the
deltas). A round includes each library's host-side cohort preparation. FedJAX needs jax 0.5.3,
so it runs in its own venv (`--peer_python`); the two sides alternate as separate processes
(`--alternations` times, each timing `--rounds` rounds after warm-up) and the printed ratio is
the median of our clients/s over the median of FedJAX's, measured in the same run.

Our side is `federated.build_round` exactly as a user calls it: the model is written with
`nn.Conv` and the round's defaults pick the client chunking and the CPU convolution path.

  python benchmarks/bench_vs_fedjax.py --model cnn --cohorts 10,50,200
  python benchmarks/bench_vs_fedjax.py --model mlp --cohorts 10,50,200 --uplink qsgd
  python benchmarks/bench_vs_fedjax.py --model cnn --cohorts 50 --only fc --uplink ef_top_k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CLIENT_LR, SERVER_LR = 0.1, 1.0


def make_data(path: str, model: str, num_clients: int, n: int, seed: int = 0) -> None:
  """Per-client arrays in one .npz (x{i}, y{i}); random EMNIST-shaped images for the CNN."""
  rng = np.random.default_rng(seed)
  out = {}
  for i in range(num_clients):
    if model == "cnn":
      out[f"x{i}"] = rng.random((n, 28, 28, 1), dtype=np.float32)
      out[f"y{i}"] = rng.integers(0, 62, n).astype(np.int32)
    else:
      w = rng.normal(size=(60, 10))
      x = rng.normal(size=(n, 60)).astype(np.float32)
      out[f"x{i}"], out[f"y{i}"] = x, np.argmax(x @ w, axis=1).astype(np.int32)
  np.savez(path, **out)


def load_data(path: str) -> list[dict]:
  z = np.load(path)
  return [{"x": z[f"x{i}"], "y": z[f"y{i}"]} for i in range(len(z.files) // 2)]


def time_rounds(run_round, rounds: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    run_round()
  out = []
  for _ in range(rounds):
    t = time.perf_counter()
    run_round()
    out.append(time.perf_counter() - t)
  return out


# --------------------------------------------------------------------------- our side


def fc_side(a, clients: list[dict]) -> list[float]:
  """fedjax_compress: `build_round` with defaults, jitted with donation, `sample_cohort`."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from fedjax_compress import compressors, data as fdata, error_feedback, federated, models

  class EmnistCNN(nn.Module):
    """FedJAX's EMNIST CNN: conv3x3(32)-conv3x3(64)-maxpool-drop.25-dense128-drop.5-dense62."""

    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
      x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.Dropout(0.25, deterministic=not train)(x).reshape((x.shape[0], -1))
      x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(128)(x)))
      return nn.Dense(62)(x)

  model = EmnistCNN() if a.model == "cnn" else models.MLP(10, hidden=(200,))
  x0 = jnp.asarray(clients[0]["x"][:1])
  params = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x0)["params"]

  def loss_fn(p, batch, mask, key):
    kw = {"rngs": {"dropout": key}} if a.model == "cnn" else {}
    logits = model.apply({"params": p}, batch["x"], **kw)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)

  uplink = {"identity": compressors.identity,
            "qsgd": lambda: compressors.qsgd(127, bucket_size=512),
            "ef_top_k": lambda: error_feedback(compressors.top_k(fraction=0.01))}[a.uplink]()
  server_tx = optax.sgd(SERVER_LR)
  chunk = None if a.chunk == "default" else (a.chunk if a.chunk == "all" else int(a.chunk))
  round_fn = jax.jit(federated.build_round(loss_fn, optax.sgd(CLIENT_LR), server_tx, uplink,
                                           local_steps=a.steps, clients_per_chunk=chunk,
                                           conv_impl=a.conv_impl,
                                           vmap_clients=a.vmap_clients == "true"),
                     donate_argnums=0)
  fd = fdata.FederatedData(clients, {k: clients[0][k][:4] for k in clients[0]},
                           62 if a.model == "cnn" else 10, "bench")
  state = federated.init_server_state(params, server_tx, uplink, num_clients=len(clients))
  mesh = federated.client_mesh() if a.cpu_devices > 1 else None
  box = {"state": state if mesh is None else federated.shard_state(state, mesh), "r": 0}
  seed = jax.random.key(0)

  def run_round():
    cohort = federated.sample_cohort(fd, box["r"], cohort_size=a.cohort, local_steps=a.steps,
                                     batch_size=a.batch)
    if mesh is not None:
      cohort = federated.shard_cohort(cohort, mesh)
    box["state"], m = round_fn(box["state"], cohort, seed)
    jax.block_until_ready(box["state"].params)
    box["r"] += 1

  return time_rounds(run_round, a.rounds, a.warmup)


# --------------------------------------------------------------------------- FedJAX side


def fj_side(a, clients: list[dict]) -> list[float]:
  """FedJAX 0.0.17 `fed_avg` as shipped (jit `for_each_client`), or its mean replaced by a
  `fedjax.aggregators` quantizer (the emnist_compression notebook's algorithm)."""
  import fedjax
  import haiku as hk
  import jax

  if a.model == "cnn":
    fjm = fedjax.models.emnist.create_conv_model(only_digits=False)
  else:
    def fwd(batch):
      return hk.Sequential([hk.Linear(200), jax.nn.relu, hk.Linear(10)])(batch["x"])
    fjm = fedjax.create_model_from_haiku(
        transformed_forward_pass=hk.transform(fwd),
        sample_batch={"x": np.zeros((1, 60), np.float32), "y": np.zeros(1, np.int32)},
        train_loss=lambda b, p: fedjax.metrics.unreduced_cross_entropy_loss(b["y"], p),
        eval_metrics={"accuracy": fedjax.metrics.Accuracy()})
  fd = fedjax.InMemoryFederatedData({f"c{i:05d}".encode(): c for i, c in enumerate(clients)})
  grad_fn = fedjax.model_grad(fjm)
  client_opt, server_opt = fedjax.optimizers.sgd(CLIENT_LR), fedjax.optimizers.sgd(SERVER_LR)
  hp = fedjax.ShuffleRepeatBatchHParams(batch_size=a.batch, num_epochs=1)
  params = fjm.init(jax.random.PRNGKey(0))
  sampler = fedjax.client_samplers.UniformGetClientSampler(fd, a.cohort, seed=0)
  if a.uplink == "identity":
    alg = fedjax.algorithms.fed_avg.federated_averaging(grad_fn, client_opt, server_opt, hp)
    box = {"state": alg.init(params)}

    def run_round():
      box["state"], _ = alg.apply(box["state"], sampler.sample())
      jax.block_until_ready(box["state"].params)
  else:
    from fedjax.aggregators import compression
    agg = compression.uniform_stochastic_quantizer(256, jax.random.PRNGKey(0))
    train = fedjax.algorithms.fed_avg.create_train_for_each_client(grad_fn, client_opt)
    box = {"p": params, "o": server_opt.init(params), "a": agg.init()}

    def run_round():
      sampled = sampler.sample()
      sizes = {cid: len(cds) for cid, cds, _ in sampled}
      batched = [(cid, cds.shuffle_repeat_batch(hp), rng) for cid, cds, rng in sampled]
      deltas = ((cid, d, sizes[cid]) for cid, d in train(box["p"], batched))
      mean, box["a"] = agg.apply(deltas, box["a"])
      box["o"], box["p"] = server_opt.apply(mean, box["o"], box["p"])
      jax.block_until_ready(box["p"])

  return time_rounds(run_round, a.rounds, a.warmup)


# --------------------------------------------------------------------------- driver


def run_side(a) -> None:
  clients = load_data(a.data)
  times = (fc_side if a.side == "fc" else fj_side)(a, clients)
  import jax
  print(json.dumps({"side": a.side, "times": times, "jax": jax.__version__}), flush=True)


def _child(a, side: str, python: str, cohort: int) -> dict:
  cmd = [python, os.path.abspath(__file__), "--side", side, "--data", a.data, "--model", a.model,
         "--cohort", str(cohort), "--steps", str(a.steps), "--batch", str(a.batch),
         "--rounds", str(a.rounds), "--warmup", str(a.warmup), "--uplink", a.uplink,
         "--chunk", a.chunk, "--conv_impl", a.conv_impl, "--cpu_devices", str(a.cpu_devices),
         "--vmap_clients", a.vmap_clients]
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if side == "fc" and a.cpu_devices > 1:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={a.cpu_devices}").strip()
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{side} side failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
  p.add_argument("--cohorts", default="10,50,200")
  p.add_argument("--cohort", type=int, default=10, help=argparse.SUPPRESS)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=None, help="default 10 (cnn), 20 (mlp)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--alternations", type=int, default=2)
  p.add_argument("--uplink", default="identity", choices=["identity", "qsgd", "ef_top_k"],
                 help="ours: qsgd(127 levels) / EF(top-k 1%%); FedJAX: its 256-level uniform "
                      "stochastic quantizer for both compressed settings")
  p.add_argument("--chunk", default="default", help="clients_per_chunk: default|all|<int>")
  p.add_argument("--conv_impl", default="auto", choices=["auto", "im2col", "xla"],
                 help="build_round(conv_impl=): our side's convolution path")
  p.add_argument("--vmap_clients", default="true", choices=["true", "false"],
                 help="build_round(vmap_clients=): our side's clients vmapped or lax.mapped "
                      "inside a chunk")
  p.add_argument("--cpu_devices", type=int, default=1,
                 help="our side: split the host into this many XLA CPU devices and shard the "
                      "cohort's client axis over them (federated.client_mesh/shard_cohort)")
  p.add_argument("--only", default="fc,fj")
  p.add_argument("--peer_python", default="/work/peer_venv/bin/python")
  p.add_argument("--timeout", type=float, default=1800)
  p.add_argument("--side", default="", help=argparse.SUPPRESS)
  p.add_argument("--data", default="", help=argparse.SUPPRESS)
  p.add_argument("--json", default="", help="append results as JSON lines to this file")
  a = p.parse_args()
  a.batch = a.batch or (10 if a.model == "cnn" else 20)
  if a.side:
    return run_side(a)
  sides = a.only.split(",")
  pythons = {"fc": sys.executable, "fj": a.peer_python}
  for cohort in [int(c) for c in a.cohorts.split(",")]:
    with tempfile.TemporaryDirectory() as tmp:
      a.data = os.path.join(tmp, "clients.npz")
      make_data(a.data, a.model, max(cohort, 10), a.steps * a.batch)
      med = {s: [] for s in sides}
      for _ in range(a.alternations):
        for s in sides:
          r = _child(a, s, pythons[s], cohort)
          med[s].append(statistics.median(r["times"]))
      rate = {s: cohort / statistics.median(v) for s, v in med.items()}
      line = (f"model={a.model} cohort={cohort} steps={a.steps} batch={a.batch} "
              f"uplink={a.uplink} chunk={a.chunk} conv={a.conv_impl} " +
              " ".join(f"{s}={rate[s]:.1f} clients/s" for s in sides))
      if "fc" in rate and "fj" in rate:
        line += f" ratio fc/fj={rate['fc'] / rate['fj']:.2f}x"
      print(line, flush=True)
      if a.json:
        with open(a.json, "a") as f:
          f.write(json.dumps(dict(vars(a), cohort=cohort, clients_per_s=rate,
                                  round_s=med)) + "\n")


if __name__ == "__main__":
  main()
