"""error_feedback(top_k): residual by exact-support mask (new) vs scatter into x (old), interleaved.

Usage: python benchmarks/bench_ef_residual.py D CLIENTS ROUNDS   (e.g. 1.2e6 10 6)
Prints min / median ms and passes (one jitted x + 1 over the same pytree) for top_k alone, new
and old; asserts the two residual paths agree bit for bit.
"""
import sys, time, statistics
sys.path.insert(0, __import__('os').path.dirname(__file__))
import jax, jax.numpy as jnp
from bench_codecs import mlp_width, mlp_params
from fedjax_compress import Keys, compressors as C, error_feedback
d_target, B, R = int(float(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
params = mlp_params(mlp_width(d_target), jax.random.key(0))
g = jax.tree.map(lambda p: 1e-2 * jax.random.normal(jax.random.key(p.size), (B,) + p.shape, jnp.float32), params)
keys = Keys(jax.random.key(1), jax.random.key(2))
tk = C.top_k(fraction=0.01)
_dec = lambda *a: tk.decode(*a); _dec.sparse_coords = tk.decode.sparse_coords
efs = {'new': error_feedback(tk), 'old': error_feedback(tk._replace(decode=_dec))}
s0 = jax.vmap(lambda p: efs['new'].init(p)[0])(jax.tree.map(lambda x: 0.5 * x, g))
s0 = s0._replace(residual=jax.tree.map(lambda x: 0.5 * x, g))
def mk(ef):
  @jax.jit
  def f(g, s):
    def one(g, s):
      p, s2 = ef.encode(g, s, keys)
      return ef.decode(p, None, keys, g)[0], s2
    return jax.vmap(one)(g, s)
  return f
def tkf(g):
  p, _ = tk.encode(g, None, keys); return tk.decode(p, None, keys, g)[0]
fns = {'pass': (jax.jit(lambda t: jax.tree.map(lambda x: x + 1.0, t)), (g,)),
       'topk': (jax.jit(jax.vmap(tkf)), (g,)),
       'new': (mk(efs['new']), (g, s0)), 'old': (mk(efs['old']), (g, s0))}
ref = fns['old'][0](g, s0); out = fns['new'][0](g, s0)
assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)))
for f, a in fns.values(): jax.block_until_ready(f(*a))
T = {n: [] for n in fns}
for r in range(R):
  for n, (f, a) in fns.items():
    for _ in range(3):
      t = time.perf_counter(); jax.block_until_ready(f(*a)); T[n].append(time.perf_counter() - t)
bp = min(T['pass'])
for n in fns:
  print(f"D={d_target:.0e} B={B} {n:5s} min {min(T[n])*1e3:8.2f} med {statistics.median(T[n])*1e3:8.2f} ms  passes {min(T[n])/bp:5.1f}/{statistics.median(T[n])/statistics.median(T['pass']):5.1f}")
