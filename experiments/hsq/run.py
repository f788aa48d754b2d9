"""HSQ experiment (spec ALGORITHMS_M22_HSQ_LAQ.md 4.2, expected shape UNVERIFIED).

HSQ with its defaults (as the released code: per-layer scalar grids, layers of <= 1000
entries sent raw, no error feedback; K = 256, dc = 16, 6-bit scalar), with error feedback,
with every layer quantized (`raw_layer_size=0`) and with dc = 8, against fp32 (identity),
QSGD 2-bit (s = 1, bucket 128), signSGD (scaled, + EF) and top-k + EF at about the default
HSQ's uplink. FedAvg on Synthetic(0.5, 0.5) with an MLP (the paper/logs:
CIFAR-10 VGG/ResNet, ImageNet ResNet-50). Reports accuracy, exact uplink bits, bits per
coordinate and the compression factor vs fp32.

  PYTHONPATH=. python -m experiments.hsq.run --workdir=results/hsq
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Optional, Sequence

from experiments.common import sweep
from experiments.common.sweep import Variant
from experiments.configs import quickstart
from fedjax_compress.compressors import _hsq


def base_config(rounds: int, hidden: int, seed: int) -> Any:
  """Quickstart FedAvg on synthetic data with an MLP(hidden) and `rounds` rounds."""
  c = quickstart.get_config()
  c.rounds, c.seed, c.checkpoint_every = rounds, seed, 10**9
  c.model.name, c.model.kwargs = "mlp", {"hidden": (hidden,)}
  return c


def layer_sizes(hidden: int) -> list[int]:
  """Leaf sizes of the MLP 60-hidden-10 (synthetic dim 60, 10 classes)."""
  return [60 * hidden, hidden, hidden * 10, 10]


def variants(sizes: Sequence[int]) -> list[Variant]:
  """fp32, HSQ (defaults, + EF, all layers, dc=8), QSGD 2-bit, signSGD+EF, top-k+EF at HSQ's bits."""
  num_params = sum(sizes)
  hsq_bits = _hsq.bits_per_message(sizes)
  k = max(1, round(hsq_bits / (32 + math.ceil(math.log2(num_params)))))
  return [Variant("fp32 (identity)", "identity", {}),
          Variant("HSQ K=256 dc=16 (defaults)", "hsq", {}),
          Variant("HSQ K=256 dc=16 + EF", "hsq", {"error_feedback": True}),
          Variant("HSQ K=256 dc=16, all layers", "hsq", {"raw_layer_size": 0}),
          Variant("HSQ K=256 dc=16, all layers + EF", "hsq",
                  {"raw_layer_size": 0, "error_feedback": True}),
          Variant("HSQ K=256 dc=8", "hsq", {"chunk": 8}),
          Variant("QSGD 2-bit (s=1, bucket 128)", "qsgd", {"levels": 1, "bucket_size": 128}),
          Variant("signSGD (scaled) + EF", "sign_sgd", {"scaled": True}, ef=True),
          Variant(f"top-k + EF (k={k}, ~HSQ defaults' bits)", "top_k", {"k": k}, ef=True)]


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="results/hsq")
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--hidden", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  base = base_config(a.rounds, a.hidden, a.seed)
  sizes = layer_sizes(a.hidden)
  num_params = sum(sizes)
  summaries, _ = sweep.run_variants(base, variants(sizes), a.workdir)
  ref = summaries[0]
  for s in summaries:
    if "error" in s:
      continue
    s["compression_x"] = ref["up_bits"] / s["up_bits"]
    s["bits_per_coord"] = s["up_bits"] / (s["rounds"] * base.cohort_size * num_params)
    s["acc_gap_vs_fp32"] = s["best_acc"] - ref["best_acc"]
  sweep.write(a.workdir, summaries, dict(num_params=num_params, args=vars(a)))
  print(f"\nD = {num_params}")
  print("| method | final acc | best acc | best acc - fp32 | uplink bits | bits/coord | x vs fp32 |")
  print("|---|---|---|---|---|---|---|")
  for s in summaries:
    if "error" in s:
      print(f"| {s['method']} | FAILED {s['error']} |")
      continue
    print(f"| {s['method']} | {s['final_acc']:.4f} | {s['best_acc']:.4f} | "
          f"{s['acc_gap_vs_fp32']:+.4f} | {s['up_bits']:.3g} | {s['bits_per_coord']:.3f} | "
          f"{s['compression_x']:.1f} |")


if __name__ == "__main__":
  main()
