"""M22 experiment (spec ALGORITHMS_M22_HSQ_LAQ.md 4.1, expected shape UNVERIFIED).

M22 at `R in {1, 2}` bits, GenNorm and double-Weibull fits, weight exponent `M in {0, 2}`,
top-k with `P/R` (`P = 0.6`), against uncompressed FedAvg and QSGD. The library has no
uniform min-max scalar quantizer (the paper's baseline), so QSGD (stochastic uniform levels
on bucket norms, `s = 1`: 2 bits/coordinate, `s = 3`: 3 bits) stands in for it; its payload is
NOT equal to M22's (M22 sends only `0.6 D / R` entries), so the comparison is made per bit:
`compressors.per_bit_accuracy` on cumulative uplink payload bits (simulator `up_bits`), and
accuracy at the smallest total uplink among the methods. FedAvg on Synthetic(0.5, 0.5) with
an MLP (the paper: CIFAR-10 CNN, 2 clients, 10 rounds, 3 local Adam epochs).

  PYTHONPATH=. python -m experiments.m22.run --workdir=results/m22
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from experiments.common import sweep
from experiments.common.sweep import Variant
from experiments.configs import quickstart
from fedjax_compress import compressors


def base_config(rounds: int, hidden: int, seed: int) -> Any:
  """Quickstart FedAvg on synthetic data with an MLP(hidden) and `rounds` rounds."""
  c = quickstart.get_config()
  c.rounds, c.seed, c.checkpoint_every = rounds, seed, 10**9
  c.model.name, c.model.kwargs = "mlp", {"hidden": (hidden,)}
  return c


def variants(lloyd_iters: int) -> list[Variant]:
  """Uncompressed, QSGD s=1/3 and M22 over R x family x M."""
  out = [Variant("uncompressed", "identity", {}),
         Variant("QSGD s=1 (2 bit)", "qsgd", {"levels": 1, "bucket_size": 128}),
         Variant("QSGD s=3 (3 bit)", "qsgd", {"levels": 3, "bucket_size": 128})]
  for r in (1, 2):
    for fam in ("gennorm", "weibull"):
      for m in (0.0, 2.0):
        out.append(Variant(f"M22 R={r} {fam} M={m:g}", "m22",
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


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="results/m22")
  p.add_argument("--rounds", type=int, default=30)
  p.add_argument("--hidden", type=int, default=32)
  p.add_argument("--lloyd-iters", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  base = base_config(a.rounds, a.hidden, a.seed)
  acc0 = sweep.initial_accuracy(base)
  summaries, runs = sweep.run_variants(base, variants(a.lloyd_iters), a.workdir)
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
  print("| method | final acc | best acc | uplink bits | bits/client/round | acc @ budget | "
        "per-bit acc (final) | per-bit acc (best) |")
  print("|---|---|---|---|---|---|---|---|")
  for s in summaries:
    if "error" in s:
      print(f"| {s['method']} | FAILED {s['error']} |")
      continue
    ab = f"{s['acc_at_budget']:.4f}" if s["acc_at_budget"] is not None else "-"
    print(f"| {s['method']} | {s['final_acc']:.4f} | {s['best_acc']:.4f} | {s['up_bits']:.3g} | "
          f"{s['bits_per_round_per_client']:.0f} | {ab} | {s['per_bit_acc_final']:.3e} | "
          f"{s['per_bit_acc_best']:.3e} |")


if __name__ == "__main__":
  main()
