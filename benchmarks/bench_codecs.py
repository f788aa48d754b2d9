"""Encode+decode cost of every registered compressor at model scale, in memory passes and SGD steps.

Usage:
  python benchmarks/bench_codecs.py [--sizes 1M,10M,100M] [--codecs identity,top_k,...]
                                    [--reps 5] [--batch 32] [--markdown]

For each size D the "model" is an MLP `in -> w -> w -> 10` whose width `w` is chosen so it has
about D float32 parameters (4 tensors of weights + 3 biases; the exact D is printed). For every
codec (every `fedjax_compress.testing.REGISTRY` entry, with the configuration of `AT_SCALE`
where the registry's toy one does not fit a large model, e.g. top_k at 1 %), one jitted
`decode(encode(g))` of a random update `g` is timed (median of `--reps` runs after a compile
run) and printed

- as a multiple of one memory pass: one jitted `g + 1` over the same pytree (read and write of
  D float32), timed in the same window as the codec: `--rounds` alternations of `--reps`
  pass runs and `--reps` codec runs, passes = median codec time / median pass time of that
  window (this box's pass time drifts 3-4x within minutes, with page faults and neighbours;
  a global median made ratios of codecs timed minutes apart incomparable), and
- as a multiple of one local SGD step of the MLP (forward, backward and `p - lr g` on a batch
  of `--batch` examples), measured once per size in the same run.

The host allocator is tuned first (`tune_cpu_allocator`, as `experiments.run` does: large
buffers are reused instead of page-faulted in per op); `--default_allocator` keeps glibc's
defaults. A codec that fails (e.g. out of memory) prints its error and the run goes on. `--codecs`
takes registry names (see `--list`); `--markdown` also prints a table for BENCHMARKS.md.
Targets (issue 11.3, CPU, D = 10M): identity, qsgd, sign_sgd, random_k, error_feedback, hsq
<= 10 passes; top_k <= 15; m22 <= 20.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress import (Compressor, Keys, bits, compressors as C, error_feedback,
                             tune_cpu_allocator)
from fedjax_compress.testing import REGISTRY

IN_DIM, OUT_DIM = 784, 10

# Configurations sensible at 1M-100M parameters, for registry entries whose test configuration
# is a toy one (fractions of 10-25 %, tiny sketches, d = 16). Entries not listed run as
# registered. Each value gets D (the model size) so sketch sizes can follow the model.
AT_SCALE: dict[str, Callable[[int], Compressor]] = {
    "top_k": lambda d: C.top_k(fraction=0.01),
    "random_k": lambda d: C.random_k(fraction=0.01),
    "random_k_shared": lambda d: C.random_k(fraction=0.01, shared_mask=True),
    "qsgd": lambda d: C.qsgd(4),
    "ef_top_k": lambda d: error_feedback(C.top_k(fraction=0.01)),
    "count_sketch": lambda d: C.count_sketch(5, max(1, d // 100), k=max(1, d // 100)),
    "count_sketch_1row": lambda d: C.count_sketch(1, max(1, d // 100)),
    "ef_count_sketch": lambda d: error_feedback(
        C.count_sketch(5, max(1, d // 100), k=max(1, d // 100))),
    "power_sgd": lambda d: C.power_sgd(4),
    "ef_power_sgd": lambda d: error_feedback(C.power_sgd(4)),
    "igc_static": lambda d: C.intrinsic_static(10_000, seed=0),
    "igc_static_blocked": lambda d: C.intrinsic_static(10_000, seed=1, block_rows=4096),
    "igc_k_subspace": lambda d: C.intrinsic_k_subspace(10_000, 3, seed=0),
    "igc_k_subspace_cyclic": lambda d: C.intrinsic_k_subspace(10_000, 3, seed=0,
                                                              schedule="cyclic"),
    "igc_time_varying": lambda d: C.intrinsic_time_varying(10_000),
    "igc_static_downlink": lambda d: C.intrinsic_static_downlink(10_000, seed=0),
    "igc_k_subspace_downlink": lambda d: C.intrinsic_k_subspace_downlink(10_000, 3, seed=0),
    "lbgm_top_k": lambda d: C.lbgm(C.top_k(fraction=0.01), 0.4),
    "ef_lbgm_top_k": lambda d: error_feedback(C.lbgm(C.top_k(fraction=0.01), 0.4)),
}


def parse_size(text: str) -> int:
  """'10M' -> 10_000_000, '500k' -> 500_000, '1e6' -> 1_000_000."""
  text = text.strip()
  mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower())
  value = float(text[:-1]) * mult if mult else float(text)
  if not value >= 1 or not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"size must be >= 1, got {text!r}")
  return int(value)


def mlp_width(d: int) -> int:
  """Width `w` of the MLP `IN -> w -> w -> OUT` with the parameter count closest to `d`."""
  # w^2 + (IN + OUT + 2) w + OUT - d = 0
  b = IN_DIM + OUT_DIM + 2
  return max(1, round((-b + math.sqrt(b * b + 4 * max(d - OUT_DIM, 0))) / 2))


def mlp_params(width: int, key: jax.Array) -> dict:
  """float32 parameters of the MLP `IN -> width -> width -> OUT` (He-scaled normal)."""
  dims = [IN_DIM, width, width, OUT_DIM]
  keys = jax.random.split(key, len(dims) - 1)
  return {f"layer{i}": {"w": jax.random.normal(k, (a, b), jnp.float32) * math.sqrt(2.0 / a),
                        "b": jnp.zeros((b,), jnp.float32)}
          for i, (k, a, b) in enumerate(zip(keys, dims[:-1], dims[1:]))}


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = x
  n = len(params)
  for i in range(n):
    layer = params[f"layer{i}"]
    h = h @ layer["w"] + layer["b"]
    if i < n - 1:
      h = jax.nn.relu(h)
  logp = jax.nn.log_softmax(h)
  return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def timeit(fn: Callable, *args, reps: int) -> float:
  """Median wall seconds of `fn(*args)` over `reps` runs, after one compile-and-warm-up run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def paired(fn: Callable, args: tuple, base: Callable, base_args: tuple, *, reps: int,
           rounds: int) -> tuple[float, float]:
  """Median wall seconds of `fn(*args)` and of `base(*base_args)`, timed alternately.

  `rounds` alternations of `reps` runs of each (after a warm-up run of each), so both
  medians come from the same minutes of a noisy machine.
  """
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(base(*base_args))
  times: dict[int, list[float]] = {0: [], 1: []}
  for _ in range(rounds):
    for which, (f, a) in enumerate(((base, base_args), (fn, args))):
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        times[which].append(time.perf_counter() - t)
  return statistics.median(times[1]), statistics.median(times[0])


def codecs_at_scale(d: int, names: list[str] | None) -> list[tuple[str, Callable[[], Compressor]]]:
  """(name, factory) of the selected registry entries, `AT_SCALE` configurations first."""
  entries = {e.name: e for e in REGISTRY}
  selected = list(entries) if not names else names
  unknown = [n for n in selected if n not in entries]
  if unknown:
    raise SystemExit(f"unknown codecs {unknown}; registered: {', '.join(entries)}")
  return [(n, (lambda n=n: AT_SCALE[n](d)) if n in AT_SCALE else entries[n].make)
          for n in selected]


def bench_size(d_target: int, names: list[str] | None, reps: int, batch: int,
               rounds: int = 3) -> list[dict]:
  width = mlp_width(d_target)
  params = mlp_params(width, jax.random.key(0))
  d = sum(x.size for x in jax.tree.leaves(params))
  g = jax.tree.map(lambda p: 1e-2 * jax.random.normal(jax.random.key(p.size), p.shape,
                                                       jnp.float32), params)
  keys = Keys(jax.random.key(1), jax.random.key(2))

  one_pass = jax.jit(lambda t: jax.tree.map(lambda x: x + 1.0, t))
  first_pass = timeit(one_pass, g, reps=reps)
  pass_times: list[float] = []  # one per codec window

  x = jax.random.normal(jax.random.key(3), (batch, IN_DIM), jnp.float32)
  y = jax.random.randint(jax.random.key(4), (batch,), 0, OUT_DIM)
  sgd = jax.jit(lambda p: jax.tree.map(lambda a, b: a - 0.01 * b, p,
                                       jax.grad(mlp_loss)(p, x, y)))
  t_sgd = timeit(sgd, params, reps=reps)
  print(f"# D = {d:,} (MLP {IN_DIM}-{width}-{width}-{OUT_DIM}), one pass "
        f"{first_pass * 1e3:.2f} ms, one SGD step (batch {batch}) {t_sgd * 1e3:.1f} ms",
        flush=True)

  rows = []
  for name, make in codecs_at_scale(d, names):
    try:
      c = make()
      sender, receiver = c.init(params)

      @jax.jit
      def roundtrip(g, sender, receiver, c=c):
        # Both new states are returned: a stateful codec's state update (an error-feedback
        # residual, LBGM's look-back gradient) is part of its cost, and XLA drops unused work.
        payload, sender = c.encode(g, sender, keys, params)
        out, receiver = c.decode(payload, receiver, keys, g)
        return out, sender, receiver, bits.count(payload)

      sec, t_pass_here = paired(roundtrip, (g, sender, receiver), one_pass, (g,), reps=reps,
                                rounds=rounds)
      nbits = roundtrip(g, sender, receiver)[-1]
      nbits = int(nbits)
      del roundtrip
    except Exception as e:  # noqa: BLE001 (report and go on: e.g. out of memory at 100M)
      msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
      print(f"{name:26s} FAILED: {type(e).__name__}: {msg}", flush=True)
      rows.append({"codec": name, "d": d, "failed": f"{type(e).__name__}: {msg}"})
      continue
    pass_times.append(t_pass_here)
    row = {"codec": name, "d": d, "sec": sec, "passes": sec / t_pass_here, "sgd_steps": sec / t_sgd,
           "bits_fraction": nbits / (32 * d)}
    rows.append(row)
    row["t_pass_window"] = t_pass_here
    print(f"{name:26s} {sec * 1e3:10.1f} ms  x{row['passes']:8.1f} passes "
          f"(pass {t_pass_here * 1e3:.2f} ms)  "
          f"x{row['sgd_steps']:7.2f} SGD steps  bits {row['bits_fraction']:.4f} of dense",
          flush=True)
  pass_times = pass_times or [first_pass]  # no codec ran: fall back to the first measurement
  t_pass = statistics.median(pass_times)
  print(f"# D = {d:,}: memory pass median {t_pass * 1e3:.2f} ms over {len(pass_times)} "
        f"windows (min {min(pass_times) * 1e3:.2f}, max {max(pass_times) * 1e3:.2f})",
        flush=True)
  for r in rows:
    r["t_pass"], r["t_sgd"] = t_pass, t_sgd
  return rows


def markdown(rows: list[dict]) -> str:
  sizes = sorted({r["d"] for r in rows})
  names = list(dict.fromkeys(r["codec"] for r in rows))
  cell = {(r["codec"], r["d"]): r for r in rows}
  head = "| codec | " + " | ".join(f"D = {d:,}: ms / passes / SGD steps" for d in sizes) + " |"
  lines = [head, "|---|" + "---|" * len(sizes)]
  for n in names:
    parts = []
    for d in sizes:
      r = cell.get((n, d))
      if r is None:
        parts.append("-")
      elif "failed" in r:
        parts.append(f"failed ({r['failed'].split(':')[0]})")
      else:
        parts.append(f"{r['sec'] * 1e3:.1f} / {r['passes']:.1f} / {r['sgd_steps']:.2f}")
    lines.append(f"| {n} | " + " | ".join(parts) + " |")
  base = {d: cell_any for d in sizes for cell_any in [next(r for r in rows if r['d'] == d)]}
  lines.append("")
  lines.append("Baselines: " + "; ".join(
      f"D = {d:,}: one pass {base[d]['t_pass'] * 1e3:.2f} ms (median of the codecs' windows; "
      f"passes use each codec's own window), one SGD step "
      f"{base[d]['t_sgd'] * 1e3:.1f} ms" for d in sizes))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="1M,10M,100M",
                  help="comma-separated model sizes (suffix k/M/G), e.g. 1M,10M")
  ap.add_argument("--codecs", default="", help="comma-separated registry names (default: all)")
  ap.add_argument("--reps", type=int, default=5, help="timed runs per round")
  ap.add_argument("--rounds", type=int, default=3,
                  help="alternations of pass and codec timing per codec")
  ap.add_argument("--batch", type=int, default=32, help="batch of the SGD-step baseline")
  ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
  ap.add_argument("--list", action="store_true", help="list the codec names and exit")
  ap.add_argument("--default_allocator", action="store_true",
                  help="keep glibc's default malloc settings (default: tune_cpu_allocator(), "
                       "as experiments.run does; see benchmarks/bench_allocator.py)")
  args = ap.parse_args(argv)
  # First, before any computation starts JAX's CPU backend (its threads keep their arenas).
  tuned = {} if args.default_allocator else tune_cpu_allocator()
  if args.list:
    for e in REGISTRY:
      print(e.name + ("  (AT_SCALE)" if e.name in AT_SCALE else ""))
    return
  sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
  names = [n.strip() for n in args.codecs.split(",") if n.strip()] or None
  print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{jax.devices()[0].device_kind}; reps {args.reps} x rounds {args.rounds}; allocator "
        f"{'tuned' if tuned and all(tuned.values()) else 'default'}", flush=True)
  rows = []
  for s in sizes:
    rows += bench_size(s, names, args.reps, args.batch, args.rounds)
  if args.markdown:
    print()
    print(markdown(rows))


if __name__ == "__main__":
  main(sys.argv[1:])
