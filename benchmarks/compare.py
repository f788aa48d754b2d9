"""Side-by-side comparison of every compressor family on one federated task (issue 7).

Each method runs through `experiments.common.runner.run_experiment` with the same dataset,
model, rounds, cohort and seed (a method may override fields it needs, e.g. LAQ's full
participation; the `note` column says so). Writes to `--out`:

* `results.csv` / `results.md`: final / best test accuracy, total uplink and downlink bits
  (sums of the per-round metric rows), uplink compression ratio vs `identity` measured in
  the same run, accuracy at a common uplink budget (the smallest total uplink among the
  methods: the last evaluated round whose cumulative uplink fits), and encode+decode wall
  time per round of a jitted, vmapped round trip on one cohort of random updates (median of
  `--time-reps`), with its ratio to identity's time.
* `accuracy_vs_uplink.png`, `accuracy_vs_downlink.png`, and one run directory per method
  (`runs/<label>`, deleted first: every invocation trains from scratch).

  PYTHONPATH=. python benchmarks/compare.py --out results/compare
  PYTHONPATH=. python benchmarks/compare.py --methods identity,top_k_ef,qsgd --rounds 3
  PYTHONPATH=. python benchmarks/compare.py --dataset digits --rounds 40 --out results/digits
  PYTHONPATH=. python benchmarks/compare.py --dataset emnist --data_dir ~/tensorflow_datasets \
      --num_clients 100 --partition dirichlet --alpha 0.3   # needs the `data` extra

The model is `--model` (default: logistic regression on synthetic data, an MLP 64-64-10 on
scikit-learn's offline 8x8 `digits` (20 clients, Dirichlet 0.5 label skew), a CNN on other
image datasets, the GRU char model on tiny_shakespeare). tfds datasets are never downloaded unless
`--download` is given; an absent dataset stops with a message naming `--data_dir`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shutil
import time
import traceback
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import runner  # noqa: E402
from experiments.configs import quickstart  # noqa: E402
from fedjax_compress import data as fdata  # noqa: E402
from fedjax_compress import models  # noqa: E402
from fedjax_compress._src.base import Keys  # noqa: E402


class Method(NamedTuple):
  """One row of the comparison: an uplink compressor and optional config overrides."""

  label: str
  compressor: str
  kwargs: dict
  ef: bool = False
  downlink: str = ""
  downlink_kwargs: dict = {}
  overrides: dict = {}
  note: str = ""


SMALL_MODEL = 10_000  # up to this many parameters the fixed sizes below are used


def model_scaled_sizes(num_params: Optional[int]) -> tuple[int, int]:
  """(count-sketch width = its top-k, IGC d): 60 and 64 for small models, else D/10 and D/100."""
  if not num_params or num_params <= SMALL_MODEL:
    return 60, 64
  return num_params // 10, num_params // 100


def default_methods(num_clients: int, num_params: Optional[int] = None) -> list[Method]:
  """The default families, configured for the ~600-parameter logistic model.

  With `num_params` (D), the IGC rows use server lr `D/d`: `V V^T g` keeps ~`d/D` of `g`.
  Above `SMALL_MODEL` parameters the count sketch and IGC sizes scale with D
  (`model_scaled_sizes`). LAQ / SLAQ run their papers' schedule: every client every round,
  one local step of client sgd 1.0 (delta = the local gradient), server sgd = `step_size`;
  LAQ on full-batch gradients, SLAQ on minibatches of the shared batch size.
  """
  sk, d = model_scaled_sizes(num_params)
  igc_over = {"server_lr": num_params / d} if num_params else {}
  igc_note = f", server lr D/d={num_params / d:.3g}" if num_params else ""
  lazy = dict(cohort_size=num_clients, local_steps=1, client_lr=1.0, server_lr=0.5)
  laq_over = dict(lazy, batch_size=-1)
  return [
      Method("identity", "identity", {}),
      Method("top_k_ef", "top_k", {"fraction": 0.1}, ef=True, note="10% + EF"),
      Method("random_k", "random_k", {"fraction": 0.25}, note="25%, unbiased"),
      Method("qsgd", "qsgd", {"levels": 4, "bucket_size": 64}, note="s=4, bucket 64"),
      Method("sign_sgd_ef", "sign_sgd", {"scaled": True}, ef=True, note="scaled + EF"),
      Method("count_sketch", "count_sketch", {"rows": 3, "cols": sk, "k": sk},
             note=f"3x{sk}, top-{sk}"),
      Method("power_sgd_ef", "power_sgd", {"rank": 1, "min_compression_rate": 1.0}, ef=True,
             note="rank 1 + EF"),
      Method("uniform", "uniform", {"bits": 2, "top_fraction": 0.6, "min_layer_size": 100},
             note="R=2 min-max, P=0.6 (M22's baseline)"),
      Method("m22", "m22", {"bits": 2, "top_fraction": 0.6, "min_layer_size": 100,
                            "lloyd_iters": 20}, note="R=2 gennorm, P=0.6"),
      Method("hsq", "hsq", {"codebook_size": 256, "chunk": 8}, note="K=256, dc=8, EF"),
      Method("lbgm", "lbgm", {"inner": {"name": "identity"}, "threshold": 0.2},
             note="identity inner, delta 0.2"),
      Method("laq", "laq", {"bits": 4, "step_size": 0.5}, overrides=laq_over,
             note="b=4; full participation, local_steps=1, full batch, server sgd 0.5"),
      Method("slaq", "slaq", {"bits": 3, "step_size": 0.5}, overrides=lazy,
             note="b=3, official SLAQ rule; full participation, local_steps=1, minibatch, "
                  "server sgd 0.5"),
      Method("igc_static", "intrinsic_static", {"d": d, "seed": 0},
             downlink="intrinsic_static_downlink", downlink_kwargs={"d": d, "seed": 0},
             overrides=igc_over, note=f"d={d}, static downlink" + igc_note),
      Method("igc_k_subspace", "intrinsic_k_subspace",
             {"d": d, "num_subspaces": 4, "seed": 0, "schedule": "random"},
             downlink="intrinsic_k_subspace_downlink",
             downlink_kwargs={"d": d, "num_subspaces": 4, "seed": 0},
             overrides=igc_over, note=f"d={d}, K=4 random, K-subspace downlink" + igc_note),
      Method("igc_time_varying", "intrinsic_time_varying", {"d": d}, overrides=igc_over,
             note=f"d={d}" + igc_note),
      # the peers' compressors (issue 14)
      Method("drive", "drive", {}, note="1 bit/coord, optimal scale, Hadamard blocks"),
      Method("eden", "eden", {"bits": 2}, note="2 bits/coord, unbiased scale"),
      Method("rotated_uniform", "rotated_uniform", {"levels": 16}, note="16 levels (FedJAX)"),
      Method("kashin", "kashin", {"bits": 3, "redundancy": 1.25, "block_size": 1024},
             note="3 bits/coef, redundancy 1.25 Hadamard frame, 5 clip iters (TFF)"),
      Method("terngrad", "terngrad", {}, note="2.5 sigma clip, 1.6 bits/elt"),
      Method("natural_compression", "natural_compression", {}, note="9 bits/elt, unbiased"),
      Method("natural_dithering", "natural_dithering", {"levels": 4, "bucket_size": 64},
             note="s=4, bucket 64"),
      Method("cast_bf16", "cast", {"dtype": "bfloat16"}, note="bf16 round to nearest"),
      Method("threshold_ef", "threshold", {"tau": 0.02}, ef=True, note="|g| > 0.02 + EF"),
      Method("dgc", "dgc", {"fraction": 0.1, "momentum": 0.9}, note="10%, momentum 0.9"),
      Method("fetchsgd", "fetchsgd", {"rows": 3, "cols": sk, "k": sk, "momentum": 0.9},
             note=f"3x{sk}, top-{sk}, server sketch momentum 0.9 + error"),
  ]


def num_params(config: Any, data: Any) -> int:
  """Parameter count D of `config`'s model on `data`."""
  model = models.create(config.model.name, data.num_classes, **dict(config.model.kwargs))
  params = models.init_params(model, data.clients[0]["x"][:1])
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def default_model(dataset: str) -> str:
  """Model for a dataset: logistic on synthetic, mlp on digits, char_lm on tiny_shakespeare,
  else cnn."""
  return {"synthetic": "logistic", "digits": "mlp",
          "tiny_shakespeare": "char_lm"}.get(dataset, "cnn")


# kwargs of the default model (`default_model`) where they differ from the model's defaults
DEFAULT_MODEL_KWARGS = {"digits": {"hidden": (64,)}}  # 4,810 params on 8x8 inputs


def dataset_config(dataset: str, *, data_dir: Optional[str] = None,
                   num_clients: Optional[int] = None, partition: Optional[str] = None,
                   alpha: float = 0.5, download: bool = False) -> dict:
  """Fields of `config.dataset` (read by `runner.make_dataset`) for the CLI flags.

  Synthetic data keep the quickstart fields; `partition='iid'` shares one labelling model
  (`data.synthetic(iid=True)`) and 'dirichlet' is rejected (Synthetic(a, b) is non-IID by
  construction). `digits` goes to `data.load_digits` (20 clients, Dirichlet `alpha` label
  skew or IID), tfds datasets to `data.load_tfds` (defaults: 100 clients, Dirichlet 0.5).
  The data (and partition) seed is 0 whatever the training seed, as in the quickstart.
  """
  if dataset == "synthetic":
    if partition == "dirichlet":
      raise ValueError("--partition dirichlet applies to tfds datasets; synthetic data are "
                       "non-IID by construction (use --partition iid for the IID variant)")
    c = quickstart.get_config().dataset.to_dict()
    if num_clients is not None:
      c["num_clients"] = num_clients
    if partition == "iid":
      c["iid"] = True
    return c
  if dataset == "digits":
    return dict(name="digits", num_clients=num_clients or 20,
                partition=partition or "dirichlet", alpha=alpha, seed=0)
  return dict(name=dataset, data_dir=data_dir, num_clients=num_clients or 100,
              partition=partition or "dirichlet", alpha=alpha, download=download, seed=0)


def base_config(dataset: str, rounds: int, seed: int, *, model: Optional[str] = None,
                model_kwargs: Optional[dict] = None, eval_every: int = 1,
                **data_kw: Any) -> Any:
  """Quickstart config with `rounds`, the dataset (`dataset_config(**data_kw)`), the model
  (default `default_model(dataset)` with `DEFAULT_MODEL_KWARGS`) and only the final round
  checkpointed."""
  c = quickstart.get_config()
  c.rounds, c.seed, c.eval_every = rounds, seed, eval_every
  c.checkpoint_every = 10**9  # only the final round is checkpointed
  c.dataset = dataset_config(dataset, **data_kw)
  c.model.name = model or default_model(dataset)
  if model is None and model_kwargs is None:
    model_kwargs = DEFAULT_MODEL_KWARGS.get(dataset)
  c.model.kwargs = dict(model_kwargs or {})
  return c


def load_data(config: Any) -> fdata.FederatedData:
  """`config.dataset` loaded; a missing tfds package or dataset exits with what to do."""
  name = config.dataset.name
  try:
    return runner.make_dataset(config.dataset)
  except (ImportError, FileNotFoundError) as e:
    raise SystemExit(
        f"--dataset {name} is not available offline: {e}\nPrepare it once with tfds on a "
        "machine with network access and pass its directory as --data_dir (or pass "
        "--download), or run the built-in --dataset synthetic.") from e


def method_config(base: Any, m: Method, num_clients: int, max_batch: int) -> Any:
  """`base` with the method's compressor, downlink and overrides (batch -1: largest client)."""
  c = copy.deepcopy(base)
  c.compressor, c.compressor_kwargs, c.error_feedback = m.compressor, dict(m.kwargs), m.ef
  c.downlink, c.downlink_kwargs = m.downlink, dict(m.downlink_kwargs)
  for k, v in m.overrides.items():
    setattr(c, k, v)
  if c.batch_size == -1:
    c.batch_size = max_batch
  c.cohort_size = min(c.cohort_size, num_clients)
  return c


def time_roundtrip(config: Any, reps: int, data: Optional[fdata.FederatedData] = None) -> float:
  """Median seconds of one jitted, vmapped encode+decode of a cohort of random updates."""
  exp = runner.build_experiment(config, data)
  params, comp, n = exp.state.params, exp.uplink, config.cohort_size
  sender, receiver = comp.init(params)
  stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), t)  # noqa: E731
  key = jax.random.key(config.seed + 7)
  updates = jax.tree.map(
      lambda p: 0.01 * jax.random.normal(jax.random.fold_in(key, p.size), (n,) + p.shape,
                                         p.dtype), params)
  keys = Keys(jax.random.key(1), jax.random.split(jax.random.key(2), n))

  def one(u, s, r, k):
    payload, s2 = comp.encode(u, s, k, params)
    out, r2 = comp.decode(payload, r, k, params)
    return out, s2, r2

  fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, Keys(None, 0))))
  args = (updates, stack(sender), stack(receiver), keys)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def acc_at_budget(rows: Sequence[dict], budget: int) -> Optional[float]:
  """Accuracy of the last evaluated round with cumulative uplink <= `budget` (None if none)."""
  acc = None
  for r in rows:
    if r["cum_up_bits"] > budget:
      break
    if r["accuracy"] is not None:
      acc = r["accuracy"]
  return acc


def summarize(label: str, note: str, rows: Sequence[dict], seconds: float) -> dict:
  """Per-method totals from its metric rows (bits summed as Python ints)."""
  accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
  return dict(compressor=label, note=note, rounds=len(rows),
              final_accuracy=accs[-1] if accs else None,
              best_accuracy=max(accs) if accs else None,
              up_bits=sum(int(r["up_bits"]) for r in rows),
              down_bits=sum(int(r["down_bits"]) for r in rows),
              run_seconds=round(seconds, 1))


def add_relative(table: list[dict], runs: dict[str, list[dict]],
                 budget_bits: Optional[int] = None) -> None:
  """Compression ratio, accuracy at the common uplink budget and time ratio vs identity.

  The budget is `budget_bits`, or by default the smallest total uplink among the methods
  (every method's accuracy is then read at a point all of them reached).
  """
  ok = [t for t in table if t.get("error") is None]
  ident = next((t for t in ok if t["compressor"] == "identity"), None)
  if budget_bits is not None and budget_bits <= 0:
    raise ValueError(f"budget_bits must be positive, got {budget_bits}")
  budget = budget_bits if budget_bits is not None else min((t["up_bits"] for t in ok), default=0)
  for t in table:
    if t.get("error") is not None:
      continue
    t["compression_ratio"] = (ident["up_bits"] / t["up_bits"]
                              if ident and t["up_bits"] else None)
    t["budget_bits"] = budget
    t["acc_at_budget"] = acc_at_budget(runs[t["compressor"]], budget)
    t["time_ratio"] = (t["codec_seconds"] / ident["codec_seconds"]
                       if ident and t.get("codec_seconds") and ident.get("codec_seconds")
                       else None)


COLUMNS = ["compressor", "final_accuracy", "best_accuracy", "up_bits", "down_bits",
           "compression_ratio", "acc_at_budget", "codec_seconds", "time_ratio", "run_seconds",
           "note", "error"]


def _fmt(v: Any) -> str:
  """Markdown cell text."""
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, int) and abs(v) >= 10**5:
    return f"{v:.3e}"
  return str(v).replace("|", "\\|")  # a note like '|g| > tau' must not split the row


def write_tables(table: list[dict], out: str) -> None:
  """`results.csv` (exact ints) and `results.md`."""
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS + ["budget_bits", "rounds"], extrasaction="ignore")
    w.writeheader()
    for t in table:
      w.writerow(t)
  budget = next((t["budget_bits"] for t in table if "budget_bits" in t), None)
  head = ["compressor", "final acc", "best acc", "uplink bits", "downlink bits",
          "up ratio vs identity", f"acc @ {_fmt(budget)} up bits", "enc+dec s/round",
          "time vs identity", "note"]
  keys = ["compressor", "final_accuracy", "best_accuracy", "up_bits", "down_bits",
          "compression_ratio", "acc_at_budget", "codec_seconds", "time_ratio", "note"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in table:
    if t.get("error"):
      lines.append(f"| {t['compressor']} | FAILED: {t['error']} |" + " |" * (len(head) - 2))
    else:
      lines.append("| " + " | ".join(_fmt(t.get(k)) for k in keys) + " |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(runs: dict[str, list[dict]], out: str) -> None:
  """Accuracy vs cumulative uplink and vs cumulative downlink bits (log x), all methods."""
  for kind, key in (("uplink", "cum_up_bits"), ("downlink", "cum_down_bits")):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in runs.items():
      pts = [(r[key], r["accuracy"]) for r in rows if r["accuracy"] is not None and r[key] > 0]
      if pts:
        ax.plot(*zip(*pts), marker=".", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"cumulative {kind} bits (all clients)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"accuracy_vs_{kind}.png"), dpi=120)
    plt.close(fig)


def run_all(methods: Sequence[Method], base: Any, out: str, *, time_reps: int = 5,
            progress: bool = False, budget_bits: Optional[int] = None,
            data: Optional[fdata.FederatedData] = None) -> list[dict]:
  """Run every method (failures are recorded, not raised); write tables and plots.

  The dataset is loaded once (`data`, or `load_data(base)`) and shared by every method.
  """
  os.makedirs(out, exist_ok=True)
  table, runs = _run_methods(methods, base, out, time_reps, progress, data)
  add_relative(table, runs, budget_bits)
  write_tables(table, out)
  plot(runs, out)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(table, f, indent=1)
  return table


def _run_methods(methods: Sequence[Method], base: Any, out: str, time_reps: int,
                 progress: bool, data: Optional[fdata.FederatedData] = None
                 ) -> tuple[list[dict], dict[str, list[dict]]]:
  """Train and time every method on one loaded dataset; returns the table entries and the
  metric rows per label."""
  data = load_data(base) if data is None else data
  num_clients, max_batch = data.num_clients, int(data.client_sizes().max())
  table, runs = [], {}
  for m in methods:
    cfg = method_config(base, m, num_clients, max_batch)
    t0 = time.time()
    run_dir = os.path.join(out, "runs", m.label)
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh run: never resume a stale checkpoint
    try:
      rows = runner.run_experiment(cfg, run_dir, progress=progress, data=data)
      entry = summarize(m.label, m.note, rows, time.time() - t0)
      entry["codec_seconds"] = time_roundtrip(cfg, time_reps, data)
      runs[m.label] = rows
    except Exception as e:  # pylint: disable=broad-except
      tb = traceback.format_exc().strip().splitlines()
      entry = dict(compressor=m.label, note=m.note, error=f"{type(e).__name__}: {e}"[:200])
      print(f"[{m.label}] FAILED\n" + "\n".join(tb[-8:]), flush=True)
    table.append(entry)
    print(json.dumps(entry), flush=True)
  return table, runs


def _json_kwargs(text: str) -> dict:
  """A JSON object of model kwargs; lists become tuples (flax modules must be hashable)."""
  kw = json.loads(text or "{}")
  if not isinstance(kw, dict):
    raise SystemExit(f"--model_kwargs must be a JSON object, got {text!r}")
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """The CLI flags."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="results/compare")
  p.add_argument("--dataset", default="synthetic",
                 help="'synthetic', 'digits' (scikit-learn, offline) or a tfds name (emnist, "
                      "cifar10, fashion_mnist, ...)")
  p.add_argument("--data_dir", default=None, help="tfds data directory")
  p.add_argument("--download", action="store_true", help="let tfds download the dataset")
  p.add_argument("--num_clients", type=int, default=None,
                 help="clients (default: 30 synthetic, 20 digits, 100 tfds; ignored by "
                      "tiny_shakespeare)")
  p.add_argument("--partition", choices=("iid", "dirichlet"), default=None,
                 help="tfds / digits split into clients (default dirichlet); synthetic: iid "
                      "only")
  p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
  p.add_argument("--model", choices=("logistic", "mlp", "cnn", "resnet", "char_lm"),
                 default=None,
                 help="default: logistic (synthetic), mlp 64 (digits), char_lm "
                      "(tiny_shakespeare), cnn (other)")
  p.add_argument("--model_kwargs", default=None,
                 help='JSON, e.g. \'{"features": [16]}\' (default: the default model\'s)')
  p.add_argument("--rounds", type=int, default=30)
  p.add_argument("--eval_every", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--methods", default="", help="comma-separated labels (default: all)")
  p.add_argument("--time-reps", type=int, default=5)
  p.add_argument("--budget_bits", type=float, default=None,
                 help="common uplink budget for the 'acc @ budget' column (default: the "
                      "smallest total uplink among the methods)")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  """CLI entry point; returns the table."""
  a = parse_args(argv)
  try:
    base = base_config(a.dataset, a.rounds, a.seed, model=a.model,
                       model_kwargs=(None if a.model_kwargs is None
                                     else _json_kwargs(a.model_kwargs)), eval_every=a.eval_every,
                       data_dir=a.data_dir, num_clients=a.num_clients, partition=a.partition,
                       alpha=a.alpha, download=a.download)
  except ValueError as e:
    raise SystemExit(str(e)) from e
  t0 = time.time()
  data = load_data(base)
  methods = default_methods(data.num_clients, num_params(base, data))
  if a.methods:
    want = a.methods.split(",")
    unknown = set(want) - {m.label for m in methods}
    if unknown:
      raise SystemExit(f"unknown methods {sorted(unknown)}; have {[m.label for m in methods]}")
    methods = [m for m in methods if m.label in want]
  budget = None if a.budget_bits is None else int(a.budget_bits)
  table = run_all(methods, base, a.out, time_reps=a.time_reps, budget_bits=budget, data=data)
  print(open(os.path.join(a.out, "results.md")).read())
  print(f"total {time.time() - t0:.0f}s; wrote {a.out}")
  return table


if __name__ == "__main__":
  main()
