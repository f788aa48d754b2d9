"""FWHT benchmark: our `fwht` vs a plain jnp butterfly, one memory pass, FFHT (CPU) and
Dao-AILab `fast-hadamard-transform` (GPU), all measured in the same run.

  python benchmarks/bench_fwht.py --log2n 20,24 --reps 5

Prints median wall time per transform (float32, one vector of length 2^k) and ratios:
`vs_plain` = ours / plain jnp butterfly, `vs_mempass` = ours / one read+write pass of the same
array (`x * -1`), `vs_ffht` / `vs_dao` = ours / external library (when importable).
FFHT transforms a NumPy array in place, so each method is also timed "donated" (`jit` with
`donate_argnums=0` on a fresh copy per call: in place where the method can alias its input,
as the native kernel does), beside a donated memory pass.
Targets (issue 3): GPU within 4x of one memory pass; CPU within 2x of FFHT.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fedjax_compress import ops
from fedjax_compress.ops import _native as native


def plain_butterfly(x: jax.Array) -> jax.Array:
  """Textbook jnp FWHT baseline: `log2 n` stages of `[a + b, a - b]` over halves."""
  n = x.shape[-1]
  h = n // 2
  while h >= 1:
    y = x.reshape(-1, 2, h)
    x = jnp.concatenate([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=1).reshape(n)
    h //= 2
  return x


def _time(fn, arg, reps: int) -> float:
  """Median wall time of `fn(arg)` over `reps` calls after one warm-up call."""
  jax.block_until_ready(fn(arg))
  out = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(arg))
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def _time_donated(fn, arg, reps: int) -> float:
  """Median wall time of a donating `fn` over `reps` calls, each on its own fresh copy of `arg`."""
  copies = [arg.copy() for _ in range(reps + 1)]
  jax.block_until_ready(copies)
  jax.block_until_ready(fn(copies[0]))
  out = []
  for c in copies[1:]:
    t = time.perf_counter()
    jax.block_until_ready(fn(c))
    out.append(time.perf_counter() - t)
  return statistics.median(out)


def _ffht():
  try:
    import ffht  # pylint: disable=import-outside-toplevel
    return ffht
  except ImportError:
    return None


def _dao():
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from fast_hadamard_transform import hadamard_transform  # pylint: disable=import-outside-toplevel
    return (torch, hadamard_transform) if torch.cuda.is_available() else None
  except ImportError:
    return None


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--log2n", default="20,24")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--methods", default="auto,butterfly,kron,pallas,native")
  parser.add_argument("--fastfood_d", type=int, default=1024,
                      help="also time IGC's V^T g at D = n (0: skip)")
  args = parser.parse_args()
  backend = jax.default_backend()
  print(f"backend={backend} devices={jax.devices()} default_method={ops.default_method()}")
  ffht, dao = _ffht(), _dao()
  print(f"ffht-unofficial: {'available' if ffht else 'not importable'}; "
        f"fast-hadamard-transform: {'available' if dao else 'not importable / no CUDA'}")
  for k in (int(s) for s in args.log2n.split(",")):
    n = 1 << k
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    base = _time(jax.jit(plain_butterfly), x, args.reps)
    mem = _time(jax.jit(lambda v: v * -1.0), x, args.reps)
    mem_d = _time_donated(jax.jit(lambda v: v * -1.0, donate_argnums=0), x, args.reps)
    ext = {}
    if ffht is not None:
      a = np.asarray(x).copy()
      ext["ffht"] = _time(lambda v: ffht.fht(v), a, args.reps)  # in place, numpy float32
    if dao is not None:
      torch, ht = dao
      tx = torch.randn(1, n, device="cuda", dtype=torch.float32)
      def run(v):
        out = ht(v)
        torch.cuda.synchronize()
        return out
      ext["dao"] = _time(run, tx, args.reps)
    print(f"\nn=2^{k}: plain_butterfly {base * 1e3:.3f} ms, memory_pass {mem * 1e3:.3f} ms "
          f"(donated {mem_d * 1e3:.3f} ms)"
          + "".join(f", {name} {t * 1e3:.3f} ms" for name, t in ext.items()))
    for method in args.methods.split(","):
      if method == "pallas" and backend == "cpu":
        print("  pallas    skipped on CPU (interpret mode is a correctness path, not a fast one)")
        continue
      if method == "native" and (backend != "cpu" or not native.available()):
        print("  native    skipped (CPU only; needs a C++ compiler)")
        continue
      f = lambda v, m=method: ops.fwht(v, method=m)
      t = _time(jax.jit(f), x, args.reps)
      td = _time_donated(jax.jit(f, donate_argnums=0), x, args.reps)
      ratios = f"vs_plain {t / base:.2f}x  vs_mempass {t / mem:.1f}x" + "".join(
          f"  vs_{name} {t / te:.2f}x" for name, te in ext.items())
      ratios_d = f"vs_mempass {td / mem_d:.1f}x" + "".join(
          f"  vs_{name} {td / te:.2f}x" for name, te in ext.items())
      print(f"  {method:9s} {t * 1e3:9.3f} ms   {ratios}\n"
            f"  {'':9s} {td * 1e3:9.3f} ms donated   {ratios_d}")
    if args.fastfood_d:
      d = args.fastfood_d
      fwht_t = _time(jax.jit(ops.fwht), x, args.reps)
      p = jax.jit(lambda k: ops.fastfood_params(k, d, n))(jax.random.key(1))
      t_fixed = _time(jax.jit(lambda y: ops.fastfood_transpose(p, y)), x, args.reps)
      t_regen = _time(jax.jit(lambda y: ops.fastfood_transpose(
          ops.fastfood_params(jax.random.key(1), d, n), y)), x, args.reps)
      t_block = _time(jax.jit(lambda y: ops.fastfood_transpose(
          ops.fastfood_params(jax.random.key(1), d, n, block_rows=1 << 16), y)), x, args.reps)
      t_feistel = _time(jax.jit(lambda y: ops.fastfood_transpose(
          ops.fastfood_params(jax.random.key(1), d, n, permutation="feistel"), y)), x, args.reps)
      print(f"  fastfood V^T g (d={d}, D=2^{k}): factors kept {t_fixed * 1e3:.2f} ms "
            f"({t_fixed / fwht_t:.1f}x one fwht); regenerated from the key: uniform perm "
            f"{t_regen * 1e3:.2f} ms ({t_regen / fwht_t:.1f}x), blocked 2^16 rows "
            f"{t_block * 1e3:.2f} ms ({t_block / fwht_t:.1f}x), feistel perm "
            f"{t_feistel * 1e3:.2f} ms ({t_feistel / fwht_t:.1f}x)")


if __name__ == "__main__":
  main()
