"""M22 experiment (spec ALGORITHMS_M22_HSQ_LAQ.md 4.1, expected shape UNVERIFIED).

M22 at `R in {1, 2, 3, 4}` bits (GenNorm, weight exponent `M in {0, 2}`; double Weibull at
R = 1, 2), top-k with `P/R` (`P = 0.6`), against the paper's baseline - uniform min-max
quantization (`compressors.uniform`) of the same top-k-kept entries at the same R, so the
payload is equal up to side information (64 bits of range vs `32 2^R` of levels per layer) -
and against uncompressed FedAvg and QSGD. Compared per bit (`compressors.per_bit_accuracy`
on cumulative uplink payload bits) and at the smallest total uplink among the methods.
`--server-lrs a,b,...` runs every row at each server learning rate and reports the best one
per row (so M's effect on the direction is separated from its effect on the step length).
The tuned M22 and uniform rows are then replayed with a per-round probe (`probe.py`): the
fitted shape and scale per quantized layer (the codec's own fit of its kept entries), the
cosine of the applied aggregate to the true (uncompressed) one, and their length ratio;
written to `runs/<run>/probe.jsonl`, merged into the rows and summarised (`--no-probe`: off).
FedAvg on Synthetic(0.5, 0.5) with an MLP (the paper: CIFAR-10 CNN, 2 clients, 10 rounds,
3 local Adam epochs).

  PYTHONPATH=. python -m experiments.m22.run --workdir=results/m22 --server-lrs=0.5,1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

from experiments.common import sweep
from experiments.common.sweep import Variant
from experiments.configs import quickstart
from experiments.m22 import probe as probe_lib
from fedjax_compress import compressors


def base_config(rounds: int, hidden: int, seed: int) -> Any:
  """Quickstart FedAvg on synthetic data with an MLP(hidden) and `rounds` rounds."""
  c = quickstart.get_config()
  c.rounds, c.seed, c.checkpoint_every = rounds, seed, 10**9
  c.model.name, c.model.kwargs = "mlp", {"hidden": (hidden,)}
  return c


def variants(lloyd_iters: int, server_lr: float = 1.0,
             bits: Sequence[int] = (1, 2, 3, 4)) -> list[Variant]:
  """Uncompressed, QSGD s=1/3, and per R in `bits`: uniform min-max and M22 (families x M)."""
  tag = "" if server_lr == 1.0 else f" @lr={server_lr:g}"
  over = {} if server_lr == 1.0 else {"server_lr": float(server_lr)}
  v = lambda label, name, kw: Variant(label + tag, name, kw, overrides=over)
  out = [v("uncompressed", "identity", {}),
         v("QSGD s=1 (2 bit)", "qsgd", {"levels": 1, "bucket_size": 128}),
         v("QSGD s=3 (3 bit)", "qsgd", {"levels": 3, "bucket_size": 128})]
  for r in bits:
    out.append(v(f"uniform R={r}", "uniform", {"bits": r, "top_fraction": 0.6,
                                               "min_layer_size": 100}))
    for fam in (("gennorm", "weibull") if r <= 2 else ("gennorm",)):
      for m in (0.0, 2.0):
        out.append(v(f"M22 R={r} {fam} M={m:g}", "m22",
                     {"bits": r, "m": m, "family": fam, "top_fraction": 0.6,
                      "min_layer_size": 100, "lloyd_iters": lloyd_iters}))
  return out


def acc_at_budget(rows: Sequence[dict], budget: int) -> Optional[float]:
  """Accuracy of the last evaluated round whose cumulative uplink is <= budget."""
  acc = None
  for r in rows:
    if r["cum_up_bits"] > budget:
      break
    acc = r["accuracy"] if r["accuracy"] is not None else acc
  return acc


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
  """One JSON object per line."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="results/m22")
  p.add_argument("--rounds", type=int, default=30)
  p.add_argument("--hidden", type=int, default=32)
  p.add_argument("--lloyd-iters", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--server-lrs", default="1.0", help="comma-separated server lrs to tune over")
  p.add_argument("--bits", default="1,2,3,4", help="comma-separated R values")
  p.add_argument("--no-probe", action="store_true", help="skip the per-round probe replays")
  a = p.parse_args(argv)
  lrs = [float(x) for x in a.server_lrs.split(",") if x.strip()]
  bits = [int(x) for x in a.bits.split(",") if x.strip()]
  if not lrs or not bits or any(not 1 <= b <= 8 for b in bits):
    raise ValueError(f"need >= 1 server lr and R values in 1..8, got {a.server_lrs!r}, "
                     f"{a.bits!r}")
  base = base_config(a.rounds, a.hidden, a.seed)
  acc0 = sweep.initial_accuracy(base)
  grid = [variants(a.lloyd_iters, lr, bits) for lr in lrs]
  flat = [x for g in grid for x in g]
  summaries, runs = sweep.run_variants(base, flat, a.workdir)
  for s, lr, v in zip(summaries, [lr for lr, g in zip(lrs, grid) for _ in g], flat):
    s["server_lr"], s["run"] = lr, v.label
  by_run = {v.label: v for v in flat}
  labels = [x.label for x in variants(a.lloyd_iters, 1.0, bits)]  # untagged, grid order
  acc_by_lr: dict[str, dict[str, Any]] = {}
  for s, label in zip(summaries, labels * len(lrs)):
    acc_by_lr.setdefault(label, {})[f"{s['server_lr']:g}"] = s.get("best_acc")
  if len(lrs) > 1:  # one row per method: the server lr with the best accuracy
    by_row: dict[str, dict] = {}
    for s, label in zip(summaries, labels * len(lrs)):
      best = by_row.get(label)
      if "error" not in s and (best is None or s["best_acc"] > best["best_acc"]):
        by_row[label] = s
    for label, s in by_row.items():
      runs[label] = runs[s["method"]]
      s["method"] = label
    summaries = [by_row[x] for x in labels if x in by_row]
  for s in summaries:
    s["best_acc_by_lr"] = acc_by_lr.get(s["method"], {})
  if not a.no_probe:
    for s in summaries:
      v = by_run[s["run"]]
      fit_kw = probe_lib.fit_kwargs_of(v.compressor, v.kwargs)
      if "error" in s or fit_kw is None:
        continue
      prows, pacc = probe_lib.probe_run(sweep.configure(base, v), fit_kw)
      _write_jsonl(os.path.join(a.workdir, "runs", s["run"], "probe.jsonl"), prows)
      for row, pr in zip(runs[s["method"]], prows):  # merge into the metric rows
        row.update({k: val for k, val in pr.items() if k != "round"})
      s.update(probe_lib.summarize(prows), probe_final_acc=pacc)
  ok = [s for s in summaries if "error" not in s]
  budget = min(s["up_bits"] for s in ok)
  for s in ok:
    rows = [r for r in runs[s["method"]] if r["accuracy"] is not None]
    pba = compressors.per_bit_accuracy([r["accuracy"] for r in rows],
                                       [r["cum_up_bits"] for r in rows], acc0)
    s["per_bit_acc_final"], s["per_bit_acc_best"] = pba.final, pba.best
    s["bits_per_round_per_client"] = s["up_bits"] / (s["rounds"] * base.cohort_size)
    s["acc_at_budget"] = acc_at_budget(runs[s["method"]], budget)
  sweep.write(a.workdir, summaries, dict(initial_acc=acc0, budget_bits=budget, args=vars(a)))
  print(f"\ninitial acc {acc0:.4f}; common uplink budget {budget:.4g} bits")
  print("| method | server lr | final acc | best acc | uplink bits | bits/client/round | "
        "acc @ budget | per-bit acc (final) | per-bit acc (best) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for s in summaries:
    if "error" in s:
      print(f"| {s['method']} | FAILED {s['error']} |")
      continue
    ab = f"{s['acc_at_budget']:.4f}" if s["acc_at_budget"] is not None else "-"
    print(f"| {s['method']} | {s['server_lr']:g} | {s['final_acc']:.4f} | {s['best_acc']:.4f} | "
          f"{s['up_bits']:.3g} | "
          f"{s['bits_per_round_per_client']:.0f} | {ab} | {s['per_bit_acc_final']:.3e} | "
          f"{s['per_bit_acc_best']:.3e} |")
  probed = [s for s in ok if "cos_mean" in s]
  if probed:
    print("\n| method | server lr | cos(g^, g) | len ratio |g^|/|g| | client cos | "
          "fitted shape (first/mean/last, layer 1) | fitted scale (mean, layer 1) | "
          "best acc by server lr |")
    print("|---|---|---|---|---|---|---|---|")
    for s in probed:
      f0 = lambda k: s[k][0] if s.get(k) else float("nan")
      by_lr = ", ".join(f"{lr}: {acc:.3f}" for lr, acc in s["best_acc_by_lr"].items()
                        if acc is not None)
      print(f"| {s['method']} | {s['server_lr']:g} | {s['cos_mean']:.3f} | "
            f"{s['len_ratio_mean']:.3f} | {s['client_cos_mean']:.3f} | "
            f"{f0('fit_shape_first'):.3f} / {f0('fit_shape_mean'):.3f} / "
            f"{f0('fit_shape_last'):.3f} | {f0('fit_scale_mean'):.3f} | {by_lr} |")


if __name__ == "__main__":
  main()
