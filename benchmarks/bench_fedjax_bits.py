"""Same quantizer, FedJAX-reported bits vs the honest count (issue 14).

For FedJAX 0.0.17's rotated uniform, structured DRIVE and TernGrad aggregators, one round on
a cohort of random client updates of FedJAX's EMNIST CNN (1,206,590 parameters, 8 tensors):

* `fedjax_reported`: the increase of FedJAX's `CompressionState.num_bits` over the round
  (its formula: `log2(levels) D + 64 #tensors`, computed once per round from the aggregate's
  shape: one client, unpadded, non-integer bits per element);
* `honest_by_hand`: what the cohort sends for FedJAX's own layout (each tensor zero-padded to
  a power of two before the rotation, fixed-width levels, two float32 per tensor);
* `fedjax_compress`: `sum_c bits.count(payload_c)` of our codec configured the same way
  (`per_tensor=True`, one block per tensor; TernGrad packs 5 trits per byte), checked
  against `8 len(wire.pack(payload))` of one real client message; and the same count for
  our default layout (the raveled model in 2^16-coordinate blocks: padding < 2^16).

Needs FedJAX, which pins jax 0.5.3: run it in the peer venv (see
/work/shared/bench/fedjax_peer/setup_env.sh), with this checkout on PYTHONPATH:

  PYTHONPATH=. /work/peer_venv/bin/python benchmarks/bench_fedjax_bits.py --cohorts 10,50
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

import fedjax
from fedjax.aggregators import compression as fjc

from fedjax_compress import Keys, bits, compressors, wire

BLOCK = 2**22  # one block per tensor: FedJAX pads each tensor to its own power of two


def pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def honest_by_hand(name: str, sizes: list[int], levels: int) -> int:
  """Bits one client sends for FedJAX's layout of quantizer `name`."""
  if name == "rotated_uniform":
    return sum(math.ceil(math.log2(levels)) * pow2(s) + 64 for s in sizes)
  if name == "drive":
    return sum(pow2(s) + 32 for s in sizes)
  if name == "terngrad":
    return sum(2 * s + 32 for s in sizes)  # 2-bit fixed width per trit, one scale
  raise ValueError(name)


SPECS = [  # name, levels, FedJAX aggregator factory, our codec (FedJAX layout, our default)
    ("rotated_uniform", 256, lambda k: fjc.rotated_uniform_stochastic_quantizer(256, k),
     lambda: compressors.rotated_uniform(256, per_tensor=True, block_size=BLOCK),
     lambda: compressors.rotated_uniform(256)),
    ("rotated_uniform", 2, lambda k: fjc.rotated_uniform_stochastic_quantizer(2, k),
     lambda: compressors.rotated_uniform(2, per_tensor=True, block_size=BLOCK),
     lambda: compressors.rotated_uniform(2)),
    ("drive", 2, fjc.structured_drive_quantizer,
     lambda: compressors.drive(scale="unbiased", per_tensor=True, block_size=BLOCK),
     lambda: compressors.drive(scale="unbiased")),
    ("terngrad", 3, fjc.terngrad_quantizer, compressors.terngrad, compressors.terngrad),
]


def client_updates(params, cohort: int, seed: int = 0) -> list:
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for c in range(cohort):
    keys = jax.random.split(jax.random.PRNGKey(seed * 1000 + c), len(leaves))
    out.append(jax.tree.unflatten(treedef, [1e-3 * jax.random.normal(k, jnp.shape(x))
                                            for k, x in zip(keys, leaves)]))
  return out


def run(cohort: int) -> list[dict]:
  model = fedjax.models.emnist.create_conv_model(only_digits=False)
  params = model.init(jax.random.PRNGKey(0))
  sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
  deltas = client_updates(params, cohort)
  rows = []
  for name, levels, make_fj, make_ours, make_default in SPECS:
    agg = make_fj(jax.random.PRNGKey(1))
    state = agg.init()
    _, state = agg.apply([(str(c), d, 1.0) for c, d in enumerate(deltas)], state)
    reported = float(state.num_bits)
    codec = make_ours()
    encode = jax.jit(codec.encode)
    ours, first = 0, None
    for c, d in enumerate(deltas):
      keys = Keys(jax.random.key(7), jax.random.fold_in(jax.random.key(8), c))
      payload, _ = encode(d, None, keys)
      ours += int(bits.count(payload))
      first = payload if first is None else first
    packed = 8 * len(wire.pack(jax.device_get(first), raw=True))  # body, no frame
    keys = Keys(jax.random.key(7), jax.random.key(8))  # exact bits from shapes, no compute
    blocked = cohort * int(bits.count(jax.eval_shape(make_default().encode, deltas[0], None,
                                                     keys)[0]))
    hand = honest_by_hand(name, sizes, levels)
    rows.append({"quantizer": f"{name}({levels})" if name == "rotated_uniform" else name,
                 "cohort": cohort, "D": sum(sizes), "padded_D": sum(pow2(s) for s in sizes),
                 "tensors": len(sizes), "fedjax_reported": reported,
                 "honest_by_hand": hand * cohort, "fedjax_compress": ours,
                 "fedjax_compress_blocked": blocked,
                 "one_client_count": int(bits.count(first)), "one_client_packed": packed,
                 "fedjax_over_honest": reported / (hand * cohort)})
  return rows


def markdown(rows: list[dict]) -> str:
  head = ("| quantizer | cohort | FedJAX reported / round | honest (FedJAX layout) / round | "
          "fedjax_compress, same layout / round | fedjax_compress, 2^16 blocks / round | "
          "FedJAX / honest |\n|---|---|---|---|---|---|---|\n")
  return head + "".join(
      f"| {r['quantizer']} | {r['cohort']} | {r['fedjax_reported']:,.0f} | "
      f"{r['honest_by_hand']:,} | {r['fedjax_compress']:,} | {r['fedjax_compress_blocked']:,} | "
      f"{r['fedjax_over_honest']:.4f} |\n"
      for r in rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cohorts", default="10,50")
  p.add_argument("--json", default="")
  a = p.parse_args()
  rows = [r for c in a.cohorts.split(",") for r in run(int(c))]
  for r in rows:
    assert math.ceil(r["one_client_count"] / 8) * 8 == r["one_client_packed"], r
    print(json.dumps(r))
  print(markdown(rows))
  if a.json:
    with open(a.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
