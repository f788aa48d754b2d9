"""HSQ codebook search: matmul + argmax |<c, x>| vs a broadcast product and a per-chunk loop.

Usage: python benchmarks/bench_hsq.py [--coords 1048576] [--codebook 256] [--chunk 16]
Prints the median wall time of each search over `--reps` runs (after one compile run) and
its ratio to the matmul search measured in the same run; all three must pick the same
indices. Also times one full greedy `hsq` encode+decode for reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress import Keys, compressors as C
from fedjax_compress.compressors._hsq import codebook


def _time(fn, *args, reps):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--coords", type=int, default=1 << 20)
  ap.add_argument("--codebook", type=int, default=256)
  ap.add_argument("--chunk", type=int, default=16)
  ap.add_argument("--block", type=int, default=512, help="chunks per block (broadcast)")
  ap.add_argument("--reps", type=int, default=3)
  args = ap.parse_args()
  k, dc = args.codebook, args.chunk
  t = time.perf_counter()
  cb = jnp.asarray(codebook(k, dc))
  t_cb = time.perf_counter() - t
  n = args.coords // dc
  x = jax.random.normal(jax.random.key(0), (n, dc))

  @jax.jit
  def matmul_search(x):
    return jnp.argmax(jnp.abs(x @ cb.T), axis=1)

  @jax.jit
  def blocked_matmul_search(x):  # same matmul, [block, K] scores at a time
    blocks = x.reshape(-1, args.block, dc)
    return jax.lax.map(lambda b: jnp.argmax(jnp.abs(b @ cb.T), axis=1), blocks).reshape(-1)

  @jax.jit
  def broadcast_search(x):  # explicit products, [block, K, dc] at a time (bounded memory)
    blocks = x.reshape(-1, args.block, dc)
    return jax.lax.map(
        lambda b: jnp.argmax(jnp.abs(jnp.sum(b[:, None, :] * cb[None, :, :], axis=2)), axis=1),
        blocks).reshape(-1)

  @jax.jit
  def loop_search(x):  # one chunk at a time (sequential scan)
    return jax.lax.map(lambda v: jnp.argmax(jnp.abs(jnp.sum(cb * v[None, :], axis=1))), x)

  assert n % args.block == 0, "coords / chunk must be a multiple of --block"
  ref = np.asarray(matmul_search(x))
  for fn in (blocked_matmul_search, broadcast_search, loop_search):
    got = np.asarray(fn(x))
    # Float summation order may flip near-ties; require agreement on all but a handful.
    assert np.mean(got != ref) < 1e-4, f"{fn.__name__} disagrees on {np.mean(got != ref)}"
  t_mm = _time(matmul_search, x, reps=args.reps)
  rows = [("matmul + argmax (baseline)", t_mm)]
  rows.append(("matmul + argmax, blocked", _time(blocked_matmul_search, x, reps=args.reps)))
  rows.append(("broadcast product, blocked", _time(broadcast_search, x, reps=args.reps)))
  rows.append(("per-chunk loop (lax.map)", _time(loop_search, x, reps=args.reps)))

  c = C.hsq(codebook_size=k, chunk=dc, error_feedback=False)
  g = x.reshape(-1)
  keys = Keys(jax.random.key(1), jax.random.key(2))
  roundtrip = jax.jit(lambda g: c.decode(c.encode(g, None, keys)[0], None, keys, g)[0])
  rows.append(("full hsq encode+decode", _time(roundtrip, g, reps=args.reps)))

  print(f"device={jax.devices()[0].platform} coords={n * dc} K={k} dc={dc} "
        f"codebook build {t_cb:.2f}s (k-means, once per factory)")
  for name, sec in rows:
    print(f"{name:32s} {sec * 1e3:9.1f} ms   x{sec / t_mm:6.2f} vs matmul")


if __name__ == "__main__":
  main()
