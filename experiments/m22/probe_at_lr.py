"""Probe the M22 experiment's M22 / uniform rows at one common server lr (same trajectory lr).

`run.py` probes each row at its own tuned lr, so rows differ in trajectory; this replays every
M22 / uniform row of `--bits` at the single `--server-lr`, so `cos` and `len_ratio` of M = 0 and
M = 2 are compared at equal step size. Writes `<workdir>/probe_lr<lr>.json` and a table.

  PYTHONPATH=. python -m experiments.m22.probe_at_lr --workdir=results/m22 --server-lr=1 --bits=1,2
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from experiments.common import sweep
from experiments.m22 import probe as probe_lib
from experiments.m22 import run


def main(argv: Optional[Sequence[str]] = None) -> None:
  """CLI entry point."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="results/m22")
  p.add_argument("--server-lr", type=float, default=1.0)
  p.add_argument("--bits", default="1,2,3,4")
  p.add_argument("--rounds", type=int, default=30)
  p.add_argument("--hidden", type=int, default=32)
  p.add_argument("--lloyd-iters", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  bits = [int(x) for x in a.bits.split(",") if x.strip()]
  base = run.base_config(a.rounds, a.hidden, a.seed)
  out = []
  for v in run.variants(a.lloyd_iters, a.server_lr, bits):
    fit_kw = probe_lib.fit_kwargs_of(v.compressor, v.kwargs)
    if fit_kw is None:
      continue
    rows, acc = probe_lib.probe_run(sweep.configure(base, v), fit_kw)
    s = dict(method=v.label, server_lr=a.server_lr, final_acc=acc, **probe_lib.summarize(rows),
             rows=rows)
    out.append(s)
    print(json.dumps({k: val for k, val in s.items() if k != "rows"}), flush=True)
  os.makedirs(a.workdir, exist_ok=True)
  with open(os.path.join(a.workdir, f"probe_lr{a.server_lr:g}.json"), "w") as f:
    json.dump(dict(args=vars(a), rows=out), f, indent=1)
  print(f"\n| method (server lr {a.server_lr:g}) | final acc | cos(g^, g) | len ratio | "
        "client cos | cos / len ratio, layer 1 | cos / len ratio, layer 2 | "
        "fitted shape (mean, layer 1 / 2) |")
  print("|---|---|---|---|---|---|---|---|")
  for s in out:
    print(f"| {s['method']} | {s['final_acc']:.4f} | {s['cos_mean']:.3f} | "
          f"{s['len_ratio_mean']:.3f} | {s['client_cos_mean']:.3f} | "
          f"{s['leaf_cos_mean'][0]:.3f} / {s['leaf_len_ratio_mean'][0]:.3f} | "
          f"{s['leaf_cos_mean'][-1]:.3f} / {s['leaf_len_ratio_mean'][-1]:.3f} | "
          f"{s['fit_shape_mean'][0]:.3f} / {s['fit_shape_mean'][-1]:.3f} |")


if __name__ == "__main__":
  main()
