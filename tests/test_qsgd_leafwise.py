"""Leaf-wise `qsgd` (no ravel) against the raveled implementation it replaced.

The reference below is the previous `qsgd` (kept here verbatim in substance): `flattened`
ravels the pytree, `_buckets` pads it to whole buckets, `bucket_norms` computes
`m ||v/m||`. The leaf-wise codec sums the squares in another order, so norms may differ
in the last bits (<= a few float32 ulps); everything else is the same function of the norm
and the key: bits, wire length, dithers (hash of the raveled index), hence levels in every
bucket whose norm is bit-equal, and the decode formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, bits, compressors as C, wire
from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress._src.combinators import flattened
from fedjax_compress.compressors._quantize import (_buckets, _level_dtype, bucket_norms,
                                                   hash_uniform, level_width)


def raveled_qsgd(levels, bucket_size):
  """The raveled QSGD this module's `qsgd` replaced (same payload layout and dithers)."""
  width = level_width(levels)
  dtype = _level_dtype(width)

  def encode_fn(vec, state, keys, params=None):
    size = vec.shape[0]
    b = _buckets(vec.astype(jnp.float32), bucket_size)
    norms = bucket_norms(b)
    scaled = checks.ratio(jnp.abs(b), jnp.where(norms > 0, norms, 1.0)[:, None]) * levels
    low = jnp.floor(scaled)
    u = hash_uniform(keys.private, b.shape)
    mag = jnp.minimum(low + (u < scaled - low), levels)
    q = (jnp.sign(b) * mag).reshape(-1)[:size].astype(dtype)
    return {"norms": Field(norms, 32), "levels": Field(q, width)}, state

  def decode_fn(payload, state, keys, like):
    size = like.shape[0]
    norms = payload["norms"].data
    q = _buckets(payload["levels"].data.astype(jnp.float32), bucket_size)
    out = checks.saturate(q * (norms / levels)[:, None], jnp.isfinite(norms)[:, None])
    return checks.cast_finite(out.reshape(-1)[:size], like.dtype), state

  return flattened(Compressor(stateless_init, encode_fn, decode_fn))


def _tree(i, rng):
  """Random pytrees: odd leaf sizes, empty leaves, bf16/f16 leaves, zeros, values near 1e38."""
  shapes = [(int(rng.integers(1, 300)),), (int(rng.integers(1, 40)), int(rng.integers(1, 40))),
            (0,), (3, 0), (int(rng.integers(1, 2000)),), (7, 3, 5)]
  dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
  tree = {}
  for j, s in enumerate(shapes[:2 + i % 5]):
    x = rng.standard_normal(s) * 10.0 ** int(rng.integers(-30, 30))
    if i % 4 == 1 and x.size:
      x.flat[rng.integers(0, x.size)] = 3e38 * np.sign(rng.standard_normal())
    if i % 4 == 2:
      x[...] = 0
    if i % 4 == 3 and x.size > 4:
      x.flat[:4] = [1e38, -1e38, 1e-40, -0.0]
    dt = dtypes[j % 3] if i % 2 else jnp.float32
    tree[f"l{j}"] = jnp.asarray(x if dt == jnp.float32 else np.clip(x, -6e4, 6e4), dt)
  return tree


def _run(c, g, keys):
  @jax.jit
  def f(g):
    p, _ = c.encode(g, None, keys)
    return p, c.decode(p, None, keys, g)[0], bits.count(p)
  return f(g)


@pytest.mark.parametrize("levels,bucket", [(4, 512), (4, 64), (127, 512), (1, 3), (300, 7)])
def test_matches_raveled_qsgd(levels, bucket):
  rng = np.random.default_rng(levels * 1000 + bucket)
  new, old = C.qsgd(levels, bucket_size=bucket), raveled_qsgd(levels, bucket)
  for i in range(6):  # i % 4: plain / one 3e38 / zeros / +-1e38, 1e-40, -0; i % 5: leaf count
    g = _tree(i, rng)
    keys = Keys(jax.random.key(i), jax.random.key(100 + i))
    pn, dn, bn = _run(new, g, keys)
    po, _, bo = _run(old, g, keys)
    d = sum(x.size for x in jax.tree.leaves(g))
    assert int(bn) == int(bo) == 32 * -(-d // bucket) + d * level_width(levels)
    assert len(wire.pack(pn)) == len(wire.pack(po))
    nn, no = np.asarray(pn["norms"].data), np.asarray(po["norms"].data)
    assert nn.shape == no.shape and nn.dtype == no.dtype == np.float32
    np.testing.assert_allclose(nn, no, rtol=8 * 2.0**-24, atol=0)
    ln, lo = np.asarray(pn["levels"].data), np.asarray(po["levels"].data)
    assert ln.shape == lo.shape == (d,) and ln.dtype == lo.dtype
    same = np.repeat(nn == no, bucket)[:d]
    assert np.array_equal(ln[same], lo[same])
    # decode = saturate(level * norm / s), cast (saturating) to each leaf's dtype
    scale = np.repeat(nn.astype(np.float64) / levels, bucket)[:d]
    ref = np.clip(ln * scale, -checks.float_max(jnp.float32), checks.float_max(jnp.float32))
    offset = 0
    for k, leaf in g.items():
      n = leaf.size
      assert dn[k].shape == leaf.shape and dn[k].dtype == leaf.dtype
      lim = checks.float_max(leaf.dtype)
      want = np.clip(ref[offset:offset + n], -lim, lim).reshape(leaf.shape)
      np.testing.assert_allclose(np.asarray(dn[k], np.float64), want, rtol=2e-2 if
                                 leaf.dtype != jnp.float32 else 2e-6, atol=0)
      offset += n


def test_norms_match_float64_reference_and_saturate():
  rng = np.random.default_rng(7)
  g = {"a": jnp.asarray(rng.standard_normal(1000) * 1e-25, jnp.float32),
       "b": jnp.asarray(rng.standard_normal((33, 31)), jnp.float32),
       "c": jnp.asarray(np.full(700, 3e38), jnp.float32)}
  p, _ = jax.jit(lambda g: C.qsgd(8, bucket_size=128).encode(g, None, Keys(
      jax.random.key(0), jax.random.key(1))))(g)
  v = np.concatenate([np.asarray(x, np.float64).ravel() for x in g.values()])
  nb = -(-v.size // 128)
  want = np.linalg.norm(np.pad(v, (0, nb * 128 - v.size)).reshape(nb, 128), axis=1)
  got = np.asarray(p["norms"].data, np.float64)
  fmax = checks.float_max(jnp.float32)
  np.testing.assert_allclose(got, np.minimum(want, fmax), rtol=4e-7)
  assert np.all(got[want > fmax] == fmax)


def test_aggregate_is_weighted_sum_of_decodes():
  rng = np.random.default_rng(3)
  g = {"w": jnp.asarray(rng.standard_normal((37, 29)), jnp.float32),
       "b": jnp.asarray(rng.standard_normal(29), jnp.bfloat16)}
  c = C.qsgd(5, bucket_size=64)
  keys = [Keys(jax.random.key(i), jax.random.key(50 + i)) for i in range(3)]
  ps = [c.encode(jax.tree.map(lambda x, i=i: x * (i + 1), g), None, k)[0]
        for i, k in enumerate(keys)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *ps)
  w = jnp.asarray([0.5, -1.0, 2.0])
  agg = jax.jit(lambda p: c.aggregate(p, w, None, g))(stacked)
  dec = [c.decode(p, None, None, g)[0] for p in ps]
  for k in g:
    want = sum(float(wi) * np.asarray(d[k], np.float64) for wi, d in zip(w, dec))
    assert agg[k].dtype == g[k].dtype
    np.testing.assert_allclose(np.asarray(agg[k], np.float64), want,
                               rtol=1e-5 if g[k].dtype == jnp.float32 else 1e-2, atol=1e-6)
