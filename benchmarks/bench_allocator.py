"""glibc's default malloc against `tune_cpu_allocator()`: codec and memory-pass times, A/B.

The settings are process-wide, so each side runs in its own process. The two sides alternate
(`--alternations` times), and the medians of each side's runs are compared:
- `pass D`: one jitted `x + 1` over a single float32 array of D entries (one fresh output
  buffer per call: above glibc's 32 MiB mmap threshold each call page-faults it in).
- every codec of `--codecs`, through `bench_codecs.py --sizes ...` (its ms column).

  python benchmarks/bench_allocator.py --sizes 10M --pass_sizes 10M,124M --alternations 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

from bench_codecs import parse_size

HERE = os.path.dirname(os.path.abspath(__file__))
PASS_CHILD = """
import statistics, sys, time
if sys.argv[1] == "tuned":
  import fedjax_compress; assert all(fedjax_compress.tune_cpu_allocator().values())
import jax, jax.numpy as jnp
for n in map(int, sys.argv[2].split(",")):
  x = jnp.ones((n,), jnp.float32)
  f = jax.jit(lambda v: v + 1)
  jax.block_until_ready(f(x)); ts = []
  for _ in range(15):
    t = time.perf_counter(); jax.block_until_ready(f(x)); ts.append(time.perf_counter() - t)
  print(f"pass {n} {statistics.median(ts) * 1e3:.3f}")
  del x
"""


def run_side(side: str, a) -> dict[str, float]:
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
  out: dict[str, float] = {}
  sizes = ",".join(str(parse_size(s)) for s in a.pass_sizes.split(","))
  p = subprocess.run([sys.executable, "-c", PASS_CHILD, side, sizes], capture_output=True,
                     text=True, env=env, check=True, timeout=a.timeout)
  for line in p.stdout.splitlines():
    _, n, ms = line.split()
    out[f"pass {int(n):,}"] = float(ms)
  if a.codecs:
    cmd = [sys.executable, os.path.join(HERE, "bench_codecs.py"), "--sizes", a.sizes,
           "--codecs", a.codecs, "--reps", str(a.reps), "--rounds", "2"]
    if side == "default":
      cmd.append("--default_allocator")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True,
                       timeout=a.timeout)
    size = None
    for line in p.stdout.splitlines():
      m = re.match(r"# D = ([0-9,]+) \(", line)
      if m:
        size = m.group(1)
      m = re.match(r"(\S+)\s+([0-9.]+) ms", line)
      if m and size:
        out[f"{m.group(1)} (D = {size})"] = float(m.group(2))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="10M", help="bench_codecs sizes")
  ap.add_argument("--codecs", default="identity,qsgd,top_k,ef_top_k,hsq,hsq_no_ef")
  ap.add_argument("--pass_sizes", default="10M,124M", help="single-array pass sizes")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--alternations", type=int, default=2)
  ap.add_argument("--timeout", type=float, default=1800)
  a = ap.parse_args()
  runs: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
  for _ in range(a.alternations):
    for side in runs:
      runs[side].append(run_side(side, a))
  keys = list(runs["default"][0])
  print("| what | default malloc (ms) | tuned (ms) | default / tuned |")
  print("|---|---|---|---|")
  for k in keys:
    d = statistics.median(r[k] for r in runs["default"] if k in r)
    t = statistics.median(r[k] for r in runs["tuned"] if k in r)
    print(f"| {k} | {d:.1f} | {t:.1f} | {d / t:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
