"""LBGM experiment (spec ALGORITHMS_IGC_LBGM.md 3.6 / 4.2) in the federated simulator.

The official FL setup scaled to a CPU: label-skewed non-IID split (each client holds
`--classes_per_client` classes, dealt round-robin as the official `--non-iid 3`), full
participation, FedSGD (one full-batch gradient per client per round: `local_steps=1`,
client `sgd(1.0)`, batch = largest client, no cycling), server SGD with momentum 0.9 (the
signSGD rows have their own `--sign_lr`, as in the official scripts).
Compares, in one process on the same data and initialization: FedSGD vs LBGM over a delta
sweep, and the stacked variants (scaled signSGD, top-k + EF) against the same compressor
without LBGM. Uplink bits are the exact payload bits (`RoundMetrics.up_bits`); beside them
the official code's "# params shared" count (`floats`, spec 3.5: one float per value sent -
1 per scalar LBGM tensor, `n_l` per full dense or signSGD tensor, `k_l` per top-k tensor,
indices and scales not counted) so the paper's savings compare like for like.

Setups (`--dataset`, `--model`):
  - `synthetic_images` + `cnn` (default): offline MNIST-shaped stroke images
    (`data.synthetic_images`) and the paper's CNN conv5x5(20)-pool-conv5x5(50)-pool-fc500-fc
    (431,080 params; im2col convs, which are much faster for per-client gradients on CPU).
  - `teacher` + `mlp`: the earlier setup, 60-d Gaussian inputs labelled by a random two-layer
    teacher, MLP 60-`--hidden`-10.
  - `mnist`: MNIST via tensorflow_datasets when it is installed and prepared in `--data_dir`
    (nothing is downloaded); otherwise a clear error.

The top-k baseline is *per-tensor* top-k (each tensor keeps `ceil(k n_l)` entries), the way
`lbgm` runs its inner compressor, so "saved vs base" measures LBGM's recycling (minus its
flag and length headers, `overhead_bits`), not global-vs-per-tensor index costs.

  python -m experiments.lbgm.run --workdir=results/lbgm_cnn
  python -m experiments.lbgm.run --workdir=results/lbgm_mlp --dataset=teacher --model=mlp \
      --rounds=300 --samples=6000 --test_samples=4000 --lr=0.05 --sign_lr=0.05 \
      --deltas=0.05,0.1,0.2,0.4 --global_topk
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_compress import Compressor, Field, compressors as C, error_feedback, federated, models
from fedjax_compress._src.keys import fold_keys
from fedjax_compress.data import FederatedData, from_partition, load_tfds, synthetic_images

CLASSES, TEACHER_DIM = 10, 60


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment's settings (the command-line flags of `main`)."""

  dataset: str = "synthetic_images"
  model: str = "cnn"
  rounds: int = 100
  clients: int = 20
  classes_per_client: int = 3
  samples: int = 800
  test_samples: int = 1000
  hidden: int = 64
  cnn_features: tuple[int, ...] = (20, 50)
  cnn_dense: int = 500
  image_noise: float = 0.3
  lr: float = 0.03
  sign_lr: float = 0.01
  deltas: tuple[float, ...] = (0.01, 0.05, 0.2, 0.4)
  stacked_delta: float = 0.4
  topk: float = 0.1
  global_topk: bool = False
  eval_every: int = 10
  seed: int = 0
  data_dir: Optional[str] = None


def deal_classes(labels: np.ndarray, clients: int, per_client: int, seed: int
                 ) -> list[np.ndarray]:
  """Official `--non-iid k` split: client i holds classes (i k + j) mod C, split evenly."""
  rng = np.random.default_rng(seed)
  num_classes = int(labels.max()) + 1
  holders: dict[int, list[int]] = {c: [] for c in range(num_classes)}
  for i in range(clients):
    for j in range(per_client):
      holders[(i * per_client + j) % num_classes].append(i)
  parts: list[list[int]] = [[] for _ in range(clients)]
  for c in range(num_classes):
    if not holders[c]:
      continue
    idx = rng.permutation(np.flatnonzero(labels == c))
    for h, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
      parts[h].extend(chunk.tolist())
  return [np.sort(np.array(p, np.int64)) for p in parts]


def teacher_arrays(seed: int, n: int, n_test: int) -> tuple[dict, dict]:
  """Gaussian 60-d inputs labelled by a random two-layer tanh teacher (the earlier MLP task)."""
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(TEACHER_DIM, 128)) / np.sqrt(TEACHER_DIM)
  w2 = rng.normal(size=(128, CLASSES))

  def draw(k: int) -> dict[str, np.ndarray]:
    x = rng.normal(size=(k, TEACHER_DIM)).astype(np.float32)
    return {"x": x, "y": (np.tanh(x @ w1) @ w2).argmax(1).astype(np.int32)}

  return draw(n), draw(n_test)


def mnist_arrays(cfg: Config) -> tuple[dict, dict]:
  """`cfg.samples` / `cfg.test_samples` MNIST examples from a prepared tfds directory."""
  try:
    full = load_tfds("mnist", data_dir=cfg.data_dir, num_clients=1, partition="iid")
  except (ImportError, FileNotFoundError) as e:
    raise RuntimeError(
        "--dataset=mnist needs tensorflow_datasets with MNIST already prepared in --data_dir "
        f"(nothing is downloaded): {e}. The default --dataset=synthetic_images runs "
        "offline.") from e
  rng = np.random.default_rng(cfg.seed)
  train = full.clients[0]
  idx = rng.permutation(len(train["y"]))[:cfg.samples]
  tidx = rng.permutation(len(full.test["y"]))[:cfg.test_samples]
  return ({k: v[idx] for k, v in train.items()}, {k: v[tidx] for k, v in full.test.items()})


def make_data(cfg: Config) -> FederatedData:
  """The configured dataset, dealt to `cfg.clients` clients with `cfg.classes_per_client` each."""
  if cfg.dataset == "synthetic_images":
    train, test = synthetic_images(cfg.samples, cfg.test_samples, noise=cfg.image_noise,
                                   seed=cfg.seed)
  elif cfg.dataset == "teacher":
    train, test = teacher_arrays(cfg.seed, cfg.samples, cfg.test_samples)
  elif cfg.dataset == "mnist":
    train, test = mnist_arrays(cfg)
  else:
    raise ValueError(f"unknown dataset {cfg.dataset!r}: synthetic_images, teacher or mnist")
  parts = deal_classes(train["y"], cfg.clients, cfg.classes_per_client, cfg.seed)
  return from_partition(train, parts, test, CLASSES,
                        f"{cfg.dataset}-noniid{cfg.classes_per_client}")


def make_model(cfg: Config, example_x: np.ndarray) -> nn.Module:
  """The paper's CNN (im2col convs) for images, or an MLP with one `cfg.hidden` layer."""
  if cfg.model == "cnn":
    if example_x.ndim != 4:
      raise ValueError(f"--model=cnn needs NHWC images; {cfg.dataset!r} has x of rank "
                       f"{example_x.ndim} (use --model=mlp)")
    return models.CNN(CLASSES, features=cfg.cnn_features, dense=cfg.cnn_dense, kernel_size=5,
                      padding="VALID", conv_impl="im2col")
  if cfg.model == "mlp":
    return models.MLP(CLASSES, hidden=(cfg.hidden,))
  raise ValueError(f"unknown model {cfg.model!r}: cnn or mlp")


def per_tensor(inner: Compressor) -> Compressor:
  """`inner` run on every tensor separately, keys folded with the tensor index (as `lbgm` does)."""

  def init_fn(params):
    pairs = [inner.init(p) for p in jax.tree.leaves(params)]
    return tuple(s for s, _ in pairs), tuple(r for _, r in pairs)

  def encode_fn(updates, state, keys, params=None):
    us = jax.tree.leaves(updates)
    ps = [None] * len(us) if params is None else jax.tree.leaves(params)
    out = [inner.encode(u, s, fold_keys(keys, i), p) for i, (u, s, p) in enumerate(zip(us, state, ps))]
    return tuple(m for m, _ in out), tuple(s for _, s in out)

  def decode_fn(payload, state, keys, like):
    ls = jax.tree.leaves(like)
    out = [inner.decode(m, s, fold_keys(keys, i), l)
           for i, (m, s, l) in enumerate(zip(payload, state, ls))]
    return (jax.tree.unflatten(jax.tree.structure(like), [g for g, _ in out]),
            tuple(s for _, s in out))

  return Compressor(init_fn, encode_fn, decode_fn, None)


SIDE_FIELDS = ("indices", "scale", "finite")  # not "params shared" in the official count


def official_floats(payload: Any) -> jax.Array:
  """The official "# params shared" of one message: entries of its value fields (int32).

  Variable-length fields count their `count` (an LBGM scalar round sends `rho` only: 1;
  a full round its inner fields); `indices`, `scale` and `finite` fields are not counted.
  """
  total = jnp.zeros((), jnp.int32)
  leaves = jax.tree_util.tree_flatten_with_path(payload, is_leaf=lambda x: isinstance(x, Field))[0]
  for path, f in leaves:
    name = getattr(path[-1], "key", None) if path else None
    if not isinstance(f, Field) or name in SIDE_FIELDS:
      continue
    total = total + (jnp.asarray(f.count, jnp.int32) if f.count is not None
                     else jnp.int32(np.size(f.data)))
  return total


class FloatCount(NamedTuple):
  """Sender state of `count_floats`: the inner state and the floats sent so far."""

  inner: Any
  floats: jax.Array


def count_floats(inner: Compressor) -> Compressor:
  """`inner` whose sender state also accumulates `official_floats` of every message."""

  def init_fn(params):
    sender, receiver = inner.init(params)
    return FloatCount(sender, jnp.zeros((), jnp.int32)), receiver

  def encode_fn(updates, state, keys, params=None):
    payload, sender = inner.encode(updates, state.inner, keys, params)
    return payload, FloatCount(sender, state.floats + official_floats(payload))

  return Compressor(init_fn, encode_fn, inner.decode, inner.aggregate, inner.reduce)


def method_table(cfg: Config) -> list[tuple[str, Optional[str], Compressor, float]]:
  """`(name, base name or None, uplink, server lr)` rows, each base listed before its variants."""
  d, k, lr, slr = cfg.stacked_delta, cfg.topk, cfg.lr, cfg.sign_lr
  topk_name = f"top-{100 * k:g}% (per tensor) + EF"
  rows = [("FedSGD", None, C.identity(), lr)]
  rows += [(f"LBGM d={x:g}", "FedSGD", C.lbgm(C.identity(), x), lr) for x in cfg.deltas]
  rows += [("signSGD (scaled)", None, C.sign_sgd(scaled=True), slr),
           (f"signSGD + LBGM d={d:g}", "signSGD (scaled)", C.lbgm(C.sign_sgd(scaled=True), d),
            slr),
           (topk_name, None, error_feedback(per_tensor(C.top_k(fraction=k))), lr),
           (f"EF(top-{100 * k:g}% + LBGM d={d:g})", topk_name,
            error_feedback(C.lbgm(C.top_k(fraction=k), d)), lr)]
  if cfg.global_topk:
    rows.append((f"top-{100 * k:g}% (global) + EF", None, error_feedback(C.top_k(fraction=k)),
                 lr))
  return rows


def run_method(cfg: Config, model: nn.Module, data: FederatedData, uplink: Compressor,
               lr: float) -> dict[str, Any]:
  """One FedSGD run: per-round uplink bits (ints) and train loss, test accuracy every few rounds."""
  server_tx = optax.sgd(lr, momentum=0.9)
  uplink = count_floats(uplink)
  params = models.init_params(model, data.clients[0]["x"][:1], cfg.seed)
  state = federated.init_server_state(params, server_tx, uplink, num_clients=data.num_clients)
  rnd = jax.jit(federated.build_round(models.classification_loss(model), optax.sgd(1.0),
                                      server_tx, uplink, local_steps=1))
  batch = int(data.client_sizes().max())
  out: dict[str, Any] = {"up_bits": [], "floats": [], "train_loss": [], "eval_rounds": [],
                         "test_acc": []}
  floats_so_far = 0
  for r in range(cfg.rounds):
    cohort = federated.sample_cohort(data, r, cohort_size=data.num_clients, local_steps=1,
                                     batch_size=batch, seed=cfg.seed, cycle=False)
    state, m = rnd(state, cohort, jax.random.key(cfg.seed))
    out["up_bits"].append(int(np.asarray(m.up_bits, np.int64).sum()))
    floats_now = int(np.asarray(state.senders.floats, np.int64).sum())
    out["floats"].append(floats_now - floats_so_far)
    floats_so_far = floats_now
    out["train_loss"].append(float(np.sum(np.asarray(m.loss) * np.asarray(m.weight))))
    if (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1:
      out["eval_rounds"].append(r + 1)
      out["test_acc"].append(models.evaluate(model, state.params, data.test)["accuracy"])
  return out


def summarize(name: str, base: Optional[dict], curve: dict, lr: float, seconds: float
              ) -> dict[str, Any]:
  """Table row of one method; `base` is its base method's row (or None)."""
  acc = np.array(curve["test_acc"])
  row = dict(method=name, base=None if base is None else base["method"], lr=lr,
             best_acc=float(acc.max()), final_acc=float(acc[-1]),
             final_train_loss=curve["train_loss"][-1], uplink_bits=sum(curve["up_bits"]),
             round1_bits=curve["up_bits"][0], floats_shared=sum(curve["floats"]),
             seconds=round(seconds, 1))
  if base is not None:
    row["overhead_bits"] = row["round1_bits"] - base["round1_bits"]
    row["uplink_saved_vs_base"] = 1 - row["uplink_bits"] / base["uplink_bits"]
    row["floats_saved_vs_base"] = 1 - row["floats_shared"] / base["floats_shared"]
    row["rel_acc_drop_vs_base"] = (base["best_acc"] - row["best_acc"]) / base["best_acc"]
  return row


def run(cfg: Config, log: bool = True) -> dict[str, Any]:
  """All methods of `method_table(cfg)` on one dataset: `{'config', 'rows', 'curves'}`."""
  data = make_data(cfg)
  model = make_model(cfg, data.clients[0]["x"])
  rows, curves, by_name = [], {}, {}
  for name, base, uplink, lr in method_table(cfg):
    t0 = time.time()
    curve = run_method(cfg, model, data, uplink, lr)
    row = summarize(name, by_name.get(base), curve, lr, time.time() - t0)
    by_name[name], curves[name] = row, curve
    rows.append(row)
    if log:
      print(json.dumps(row), flush=True)
  return {"config": dataclasses.asdict(cfg), "rows": rows, "curves": curves}


def markdown_table(rows: list[dict[str, Any]]) -> str:
  """The BENCHMARKS.md table of `rows`."""
  lines = ["| method | best test acc | final test acc | uplink bits | uplink saved vs base | "
           "floats shared (official) | floats saved vs base | rel. acc drop vs base |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    saved = f"{100 * r['uplink_saved_vs_base']:.1f}%" if r["base"] else "-"
    fsaved = f"{100 * r['floats_saved_vs_base']:.1f}%" if r["base"] else "-"
    drop = f"{100 * r['rel_acc_drop_vs_base']:.2f}%" if r["base"] else "-"
    lines.append(f"| {r['method']} | {r['best_acc']:.4f} | {r['final_acc']:.4f} | "
                 f"{r['uplink_bits']:.4g} | {saved} | {r['floats_shared']:.4g} | {fsaved} | "
                 f"{drop} |")
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Config, str]:
  """`(Config, workdir)` from command-line arguments (defaults: `Config()`)."""
  d = Config()
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="results/lbgm_cnn", help="output directory (summary.json)")
  p.add_argument("--dataset", default=d.dataset, choices=["synthetic_images", "teacher", "mnist"])
  p.add_argument("--model", default=d.model, choices=["cnn", "mlp"])
  p.add_argument("--data_dir", default=None, help="tfds data directory for --dataset=mnist")
  for name, help_ in [("rounds", "communication rounds"), ("clients", "clients (all participate)"),
                      ("classes_per_client", "classes per client (the official --non-iid)"),
                      ("samples", "training examples in total"), ("test_samples", "test examples"),
                      ("hidden", "MLP hidden width"), ("eval_every", "rounds between test evals"),
                      ("seed", "data / init seed")]:
    p.add_argument(f"--{name}", type=int, default=getattr(d, name), help=help_)
  for name, help_ in [("image_noise", "pixel noise of synthetic_images"),
                      ("lr", "server learning rate (momentum 0.9)"),
                      ("sign_lr", "server learning rate of the signSGD rows"),
                      ("stacked_delta", "LBGM threshold on signSGD / top-k"),
                      ("topk", "top-k fraction (per tensor)")]:
    p.add_argument(f"--{name}", type=float, default=getattr(d, name), help=help_)
  p.add_argument("--deltas", default=",".join(f"{x:g}" for x in d.deltas),
                 help="LBGM thresholds to sweep (identity base), comma-separated")
  p.add_argument("--cnn_features", default=",".join(map(str, d.cnn_features)),
                 help="CNN conv widths, comma-separated (paper: 20,50)")
  p.add_argument("--cnn_dense", type=int, default=d.cnn_dense, help="CNN dense width (paper: 500)")
  p.add_argument("--global_topk", action="store_true", help="also run global top-k + EF")
  a = vars(p.parse_args(argv))
  workdir = a.pop("workdir")
  a["deltas"] = tuple(float(x) for x in a["deltas"].split(",") if x)
  a["cnn_features"] = tuple(int(x) for x in a["cnn_features"].split(",") if x)
  return Config(**a), workdir


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Run all methods, write `<workdir>/summary.json` and print the markdown table."""
  cfg, workdir = parse_args(argv)
  out = run(cfg)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(out, f, indent=1)
  print("\n" + markdown_table(out["rows"]))


if __name__ == "__main__":
  main()
