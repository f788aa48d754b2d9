"""IGC memory at GPT-2-small scale (issue 11.4): per-encode temporaries and a chunked cohort round.

  python benchmarks/bench_igc_memory.py --analysis            # XLA memory analysis only (cheap)
  python benchmarks/bench_igc_memory.py --run --rounds 2      # also run the rounds concretely

`--analysis` prints, at `D = --num_params` (default 124,439,808 = GPT-2 small) and
`d = --d`, the XLA-reported temporaries of one jitted encode of every IGC variant (abstract
`ShapeDtypeStruct` inputs: nothing is allocated), and of one whole `build_round` program
(cohort `--cohort`, `clients_per_chunk=--chunk`, donated server state): temporaries,
arguments, outputs and their total, the figure that must fit the machine.

`--run` then runs each variant's round concretely in a child process (one variant per
process, so each peak RSS is its own): `--rounds` rounds after one warm-up round (which
includes compilation), printing seconds per round, the child's peak resident memory
(`ru_maxrss`) and the exact bits up and down of the last round. Variants:

- `static`: `intrinsic_static` up, `intrinsic_static_downlink` down (32 d bits), server
  `subspace_server_tx(sgd)`;
- `k_subspace`: `intrinsic_k_subspace(d, K)` up (random schedule), `intrinsic_k_subspace_downlink`
  down (32 K d bits), server sgd;
- `time_varying`: `intrinsic_time_varying` up, the dense model down, server sgd.

The model is one `D`-float32 leaf; the loss reads 65 of its entries (a linear model on
64 features), so local training is cheap and the D-sized gradient, update, encode and the
round's aggregation and downlink are what the figures measure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fedjax_compress import Keys, federated  # noqa: E402
from fedjax_compress import compressors as C  # noqa: E402

GPT2_SMALL = 124_439_808
VARIANTS = ("static", "k_subspace", "time_varying")
_FEATURES, _BATCH, _STEPS = 64, 2, 1


def _loss(p, batch, mask, key):
  del key
  pred = batch["x"] @ p["w"][:_FEATURES] + p["w"][_FEATURES]
  return jnp.sum(mask * (pred - batch["y"]) ** 2) / jnp.maximum(jnp.sum(mask), 1.0)


def _setup(variant: str, d: int, k: int):
  """(uplink, downlink or None, server_tx) of a variant."""
  sgd = optax.sgd(1.0)
  if variant == "static":
    return C.intrinsic_static(d), C.intrinsic_static_downlink(d), C.subspace_server_tx(sgd, d)
  if variant == "k_subspace":
    return C.intrinsic_k_subspace(d, k), C.intrinsic_k_subspace_downlink(d, k), sgd
  if variant == "time_varying":
    return C.intrinsic_time_varying(d), None, sgd
  raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _round(variant: str, args):
  up, dn, server = _setup(variant, args.d, args.k)
  rnd = federated.build_round(_loss, optax.sgd(0.1), server, up, local_steps=_STEPS,
                              downlink=dn, clients_per_chunk=args.chunk)
  return jax.jit(rnd, donate_argnums=0), up, dn, server


def _abstract_cohort(c: int):
  return federated.Cohort(
      ids=jax.ShapeDtypeStruct((c,), jnp.int32),
      batches={"x": jax.ShapeDtypeStruct((c, _STEPS, _BATCH, _FEATURES), jnp.float32),
               "y": jax.ShapeDtypeStruct((c, _STEPS, _BATCH), jnp.float32)},
      mask=jax.ShapeDtypeStruct((c, _STEPS, _BATCH), jnp.bool_),
      weight=jax.ShapeDtypeStruct((c,), jnp.float32))


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def encode_temporaries(args) -> None:
  """Temporaries of one jitted encode of each IGC compressor (3 leaves summing to D)."""
  d, k, num = args.d, args.k, args.num_params
  codecs = {
      "intrinsic_static": C.intrinsic_static(d),
      "intrinsic_static(coordinates='solve')": C.intrinsic_static(d, coordinates="solve"),
      f"intrinsic_k_subspace (K={k}, random)": C.intrinsic_k_subspace(d, k),
      f"intrinsic_k_subspace (K={k}, cyclic)": C.intrinsic_k_subspace(d, k, schedule="cyclic"),
      "intrinsic_time_varying": C.intrinsic_time_varying(d),
      "intrinsic_static_downlink (server)": C.intrinsic_static_downlink(d),
      f"intrinsic_k_subspace_downlink (K={k}; server)": C.intrinsic_k_subspace_downlink(d, k),
  }
  first = min(38_597_376, num // 3)
  sizes = {"a": first, "b": 768, "c": num - first - 768}
  like = {n: jax.ShapeDtypeStruct((m,), jnp.float32) for n, m in sizes.items()}
  keys = Keys(jax.random.key(0), jax.random.key(1))
  print(f"Encode temporaries, D = {num:,}, d = {d:,} (XLA memory analysis, abstract inputs)\n")
  print("| compressor | temporaries | bytes / parameter |")
  print("|---|---|---|")
  for name, c in codecs.items():
    state = jax.eval_shape(lambda c=c: c.init({n: jnp.zeros((m,)) for n, m in sizes.items()})[0])
    comp = jax.jit(lambda g, s, c=c: c.encode(g, s, keys)).lower(like, state).compile()
    t = comp.memory_analysis().temp_size_in_bytes
    print(f"| {name} | {_gib(t)} | {t / num:.2f} |", flush=True)


def round_analysis(args) -> None:
  """XLA memory analysis of the whole jitted round (donated state) for every variant."""
  print(f"\nWhole round, D = {args.num_params:,}, d = {args.d:,}, cohort {args.cohort}, "
        f"clients_per_chunk = {args.chunk} (XLA memory analysis, donated state)\n")
  print("| variant | temporaries | arguments | outputs | total | compile s |")
  print("|---|---|---|---|---|---|")
  params = {"w": jax.ShapeDtypeStruct((args.num_params,), jnp.float32)}
  for variant in args.variants:
    rnd, up, dn, server = _round(variant, args)
    state = jax.eval_shape(lambda p, up=up, dn=dn, server=server: federated.init_server_state(
        p, server, up, num_clients=args.cohort, downlink=dn), params)
    t0 = time.perf_counter()
    comp = rnd.lower(state, _abstract_cohort(args.cohort), jax.random.key(0)).compile()
    secs = time.perf_counter() - t0
    m = comp.memory_analysis()
    tot = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    print(f"| {variant} | {_gib(m.temp_size_in_bytes)} | {_gib(m.argument_size_in_bytes)} | "
          f"{_gib(m.output_size_in_bytes)} | {_gib(tot)} | {secs:.0f} |", flush=True)


def _total(b) -> int:
  """Exact total of per-client bits (`Bits` limbs or an integer array)."""
  return int(b.sum()) if hasattr(b, "hi") else int(np.sum(np.asarray(b, np.int64)))


def child(variant: str, args) -> dict:
  """Concrete rounds of one variant (run in its own process)."""
  rnd, up, dn, server = _round(variant, args)
  c = args.cohort
  params = {"w": jnp.zeros((args.num_params,), jnp.float32)}
  state = federated.init_server_state(params, server, up, num_clients=c, downlink=dn)
  del params
  kx, ky = jax.random.split(jax.random.key(1))
  cohort = federated.Cohort(
      ids=jnp.arange(c, dtype=jnp.int32),
      batches={"x": jax.random.normal(kx, (c, _STEPS, _BATCH, _FEATURES)),
               "y": jax.random.normal(ky, (c, _STEPS, _BATCH))},
      mask=jnp.ones((c, _STEPS, _BATCH), jnp.bool_), weight=jnp.ones((c,), jnp.float32))
  t0 = time.perf_counter()
  state, metrics = rnd(state, cohort, jax.random.key(100))
  jax.block_until_ready(state)
  warm = time.perf_counter() - t0
  times = []
  for r in range(args.rounds):
    t0 = time.perf_counter()
    state, metrics = rnd(state, cohort, jax.random.key(101 + r))
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  return dict(variant=variant, warmup_s=warm, round_s=times,
              peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              up_bits=_total(metrics.up_bits), down_bits=_total(metrics.down_bits),
              finite=bool(jnp.all(metrics.finite)))


def run_all(args) -> None:
  print(f"\nConcrete rounds, D = {args.num_params:,}, d = {args.d:,}, cohort {args.cohort}, "
        f"clients_per_chunk = {args.chunk}, {args.rounds} timed round(s) after a warm-up\n")
  print("| variant | warm-up s (compile + round) | s / round | peak RSS | up bits | down bits |")
  print("|---|---|---|---|---|---|")
  for variant in args.variants:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--num_params",
           str(args.num_params), "--d", str(args.d), "--k", str(args.k), "--cohort",
           str(args.cohort), "--chunk", str(args.chunk), "--rounds", str(args.rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
      print(f"| {variant} | failed (rc {out.returncode}): {out.stderr.strip()[-300:]} |", flush=True)
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    per = sum(r["round_s"]) / max(len(r["round_s"]), 1)
    print(f"| {variant} | {r['warmup_s']:.1f} | {per:.1f} | {r['peak_rss_gib']:.2f} GiB | "
          f"{r['up_bits']:,} | {r['down_bits']:,} |", flush=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num_params", type=int, default=GPT2_SMALL)
  p.add_argument("--d", type=int, default=10_000)
  p.add_argument("--k", type=int, default=3, help="K of the K-subspace variant")
  p.add_argument("--cohort", type=int, default=10)
  p.add_argument("--chunk", type=int, default=1, help="clients_per_chunk")
  p.add_argument("--rounds", type=int, default=1, help="timed rounds after the warm-up (--run)")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--analysis", action="store_true")
  p.add_argument("--run", action="store_true")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.variants = [v for v in args.variants.split(",") if v]
  for v in args.variants:
    if v not in VARIANTS:
      p.error(f"--variants: {v!r} is not one of {VARIANTS}")
  if args.child:
    print(json.dumps(child(args.child, args)))
    return
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  if args.analysis or not args.run:
    encode_temporaries(args)
    round_analysis(args)
  if args.run:
    run_all(args)


if __name__ == "__main__":
  main()
