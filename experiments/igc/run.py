"""IGC experiment (spec ALGORITHMS_IGC_LBGM.md 4.1, shape of the claim): a `d` sweep.

Static IGC (uplink `intrinsic_static`, downlink `intrinsic_static_downlink`: `32 d` bits each
way), K-subspace IGC (`intrinsic_k_subspace` with the random schedule, downlink
`intrinsic_k_subspace_downlink`: `32 d` up, `32 min(K d, D)` down) and time-varying IGC
(`32 d` up, dense `32 D` down) for several intrinsic dimensions `d`,
against uncompressed FedAvg and top-k + EF / count sketch (FetchSGD-style) at about the
uplink of `d = 128`. Each IGC run is repeated with the server lr multiplied by `D/d`
(`--no-rescale` skips these): `V V^T g` keeps about `d/D` of `g`, so at the same lr the
steps shrink by that factor. FedAvg on Synthetic(0.5, 0.5) with a one-hidden-layer MLP (CPU budget;
the paper uses GPT-2 / BERT / ResNet). Reports accuracy vs uplink / downlink bits, the
measured compression factors and the nominal `D/d`, and the uplink needed to reach
`--target` x the uncompressed best accuracy.

  PYTHONPATH=. python -m experiments.igc.run --workdir=results/igc
"""

from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from experiments.common import sweep
from experiments.configs import quickstart
from experiments.common.sweep import Variant


def base_config(rounds: int, hidden: int, seed: int) -> Any:
  """Quickstart FedAvg on synthetic data with an MLP(hidden) and `rounds` rounds."""
  c = quickstart.get_config()
  c.rounds, c.seed, c.checkpoint_every = rounds, seed, 10**9
  c.model.name, c.model.kwargs = "mlp", {"hidden": (hidden,)}
  return c


def variants(ds: Sequence[int], num_params: int, rescale: bool,
             num_subspaces: int = 4) -> list[Variant]:
  """Uncompressed, static / K-subspace / time-varying IGC per `d` (and with server lr D/d),
  top-k, sketch (`num_subspaces=0` drops the K-subspace rows).

  `V V^T g` keeps about `d/D` of `g`'s energy, so at the same server lr IGC takes ~`d/D`-times
  smaller steps; the `lr x D/d` variants undo that shrinkage (as random-k's rescaling does).
  """
  out = [Variant("uncompressed", "identity", {})]
  for d in ds:
    if d >= num_params:
      continue
    scales = [1.0] + ([num_params / d] if rescale else [])
    for lr in scales:
      tag = "" if lr == 1.0 else " lr x D/d"
      over = {} if lr == 1.0 else {"server_lr": lr}
      out.append(Variant(f"static d={d}{tag}", "intrinsic_static", {"d": d, "seed": 0},
                         downlink="intrinsic_static_downlink",
                         downlink_kwargs={"d": d, "seed": 0}, overrides=over))
      if num_subspaces:
        k_kw = {"d": d, "num_subspaces": num_subspaces, "seed": 0}
        out.append(Variant(f"K-subspace K={num_subspaces} d={d}{tag}", "intrinsic_k_subspace",
                           dict(k_kw, schedule="random"),
                           downlink="intrinsic_k_subspace_downlink", downlink_kwargs=k_kw,
                           overrides=over))
      out.append(Variant(f"time-varying d={d}{tag}", "intrinsic_time_varying", {"d": d},
                         overrides=over))
  k = max(1, round(32 * 128 / 44))  # ~uplink of d=128: 32-bit value + ~12-bit index each
  out.append(Variant(f"top-k+EF k={k}", "top_k", {"k": k}, ef=True))
  out.append(Variant("count sketch 1x128 + EF", "count_sketch", {"rows": 1, "cols": 128},
                     ef=True))
  return out


def bits_to_target(rows: Sequence[dict], target: float) -> Optional[int]:
  """Cumulative uplink bits at the first evaluated round with accuracy >= target."""
  for r in rows:
    if r["accuracy"] is not None and r["accuracy"] >= target:
      return int(r["cum_up_bits"])
  return None


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="results/igc")
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--hidden", type=int, default=32)
  p.add_argument("--ds", default="32,128,512")
  p.add_argument("--target", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_subspaces", type=int, default=4, help="K of K-subspace IGC (0: skip)")
  p.add_argument("--no-rescale", action="store_true", help="skip the server lr x D/d variants")
  a = p.parse_args(argv)
  base = base_config(a.rounds, a.hidden, a.seed)
  num_params = 60 * a.hidden + a.hidden + a.hidden * 10 + 10  # synthetic dim 60, 10 classes
  vs = variants([int(d) for d in a.ds.split(",")], num_params, not a.no_rescale,
                a.num_subspaces)
  summaries, runs = sweep.run_variants(base, vs, a.workdir)
  ref = next(s for s in summaries if s["method"] == "uncompressed")
  target = a.target * ref["best_acc"]
  for s in summaries:
    if "error" in s:
      continue
    d = next((int(t[2:]) for t in s["method"].split() if t.startswith("d=")), None)
    s["nominal_D_over_d"] = num_params / d if d else None
    s["up_factor"] = ref["up_bits"] / s["up_bits"]
    s["down_factor"] = ref["down_bits"] / s["down_bits"]
    s["total_factor"] = (ref["up_bits"] + ref["down_bits"]) / (s["up_bits"] + s["down_bits"])
    s["up_bits_to_target"] = bits_to_target(runs[s["method"]], target)
  sweep.write(a.workdir, summaries, dict(num_params=num_params, target_acc=target,
                                         args=vars(a)))
  print(f"\nD = {num_params}; target = {a.target} x uncompressed best = {target:.4f}")
  print("| method | final acc | best acc | uplink bits | downlink bits | up x | down x | "
        "total x | D/d | uplink bits to target |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for s in summaries:
    if "error" in s:
      print(f"| {s['method']} | FAILED {s['error']} |")
      continue
    dd = f"{s['nominal_D_over_d']:.1f}" if s["nominal_D_over_d"] else "-"
    bt = f"{s['up_bits_to_target']:.3g}" if s["up_bits_to_target"] else "not reached"
    print(f"| {s['method']} | {s['final_acc']:.4f} | {s['best_acc']:.4f} | {s['up_bits']:.3g} | "
          f"{s['down_bits']:.3g} | {s['up_factor']:.1f} | {s['down_factor']:.1f} | "
          f"{s['total_factor']:.2f} | {dd} | {bt} |")


if __name__ == "__main__":
  main()
