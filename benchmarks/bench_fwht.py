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

  python benchmarks/bench_fwht.py --igc 1M,10M,100M [--igc_d 10000] [--legacy]

times one jitted IGC encode+decode (`decode(encode(g))` of a random D-vector, one pytree leaf)
for static, K-subspace (K = 3, random schedule) and time-varying IGC with the default ('auto')
maps, in units of one FWHT over the map's padded length (`[nb, L]` with the same method,
issue 11.3 target: <= 8) and of one memory pass (`g + 1`), all measured in the same run;
`--legacy` adds the exact global map (uniform permutation, threefry factors) for comparison
("extra passes" = what regenerating the factors costs over the same codec with cached ones).
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


def _size(text: str) -> int:
  mult = {"K": 10**3, "M": 10**6, "G": 10**9}
  return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(text)


def igc_costs(sizes: list[int], d: int, reps: int, legacy: bool) -> None:
  """IGC encode+decode in FWHT lengths and memory passes (see the module docstring)."""
  from fedjax_compress import Keys, compressors as C  # pylint: disable=import-outside-toplevel
  from fedjax_compress.ops import _fastfood  # pylint: disable=import-outside-toplevel
  keys = Keys(jax.random.key(1), jax.random.key(2))
  print("| D | codec | map | ms | FWHT lengths | memory passes |")
  print("|---|---|---|---|---|---|")
  for num in sizes:
    g = {"w": 1e-2 * jax.random.normal(jax.random.key(0), (num,), jnp.float32)}
    rows, big_l, _, _ = _fastfood.resolve(d, num, "auto", "auto", "auto")
    x = jnp.zeros((-(-num // rows), big_l), jnp.float32)
    t_fwht = _time(jax.jit(ops.fwht), x, reps)
    t_pass = _time(jax.jit(lambda t: jax.tree.map(lambda v: v + 1.0, t)), g, reps)
    codecs = [("static", "auto", lambda **kw: C.intrinsic_static(d, seed=0, **kw)),
              ("k_subspace K=3", "auto", lambda **kw: C.intrinsic_k_subspace(d, 3, seed=0, **kw)),
              ("time_varying", "auto", lambda **kw: C.intrinsic_time_varying(d, **kw))]
    if legacy:
      old = dict(block_rows=None, permutation="uniform", generator="threefry")
      codecs += [("static", "global uniform", lambda **kw: C.intrinsic_static(d, seed=0, **old)),
                 ("time_varying", "global uniform",
                  lambda **kw: C.intrinsic_time_varying(d, **old))]
    for name, kind, make in codecs:
      c = make()
      s, r = c.init(g)
      f = jax.jit(lambda g, s=s, r=r, c=c: c.decode(c.encode(g, s, keys)[0], r, keys, g)[0])
      t = _time(f, g, reps)
      print(f"| {num:,} | {name} | {kind} | {t * 1e3:.1f} | {t / t_fwht:.1f} | "
            f"{t / t_pass:.1f} |", flush=True)
    print(f"(D = {num:,}: one FWHT of [{x.shape[0]}, {big_l}] {t_fwht * 1e3:.1f} ms, one memory "
          f"pass {t_pass * 1e3:.2f} ms)", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--igc", default="", help="sizes for the IGC codec costs (e.g. 1M,10M)")
  parser.add_argument("--igc_d", type=int, default=10_000)
  parser.add_argument("--legacy", action="store_true", help="--igc: also the exact global map")
  parser.add_argument("--log2n", default="20,24")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--methods", default="auto,butterfly,kron,pallas,native")
  parser.add_argument("--fastfood_d", type=int, default=1024,
                      help="also time IGC's V^T g at D = n (0: skip)")
  args = parser.parse_args()
  if args.igc:
    igc_costs([_size(t) for t in args.igc.split(",")], args.igc_d, args.reps, args.legacy)
    return
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
