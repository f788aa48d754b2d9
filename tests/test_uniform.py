"""Uniform min-max quantization (the M22 paper's baseline) against a float64 NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, bits, compressors as C, wire

KEYS = Keys(jax.random.key(0), jax.random.key(1))


def _ref_dense(x, r):
  """float64: codes `round((L-1)(x-lo)/(hi-lo))` and values `lo + c (hi-lo)/(L-1)`, `L = 2^r`."""
  x = np.asarray(x, np.float64)
  lo, hi, n = x.min(), x.max(), 2**r - 1
  c = np.clip(np.round((x - lo) / (hi - lo) * n), 0, n)
  return c, lo + c * (hi - lo) / n


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
def test_dense_per_layer_matches_float64_reference_and_bits(r):
  rng = np.random.default_rng(r)
  g = {"a": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32),
       "b": jnp.asarray(100 * rng.standard_t(3, size=1500), jnp.float32),
       "c": jnp.asarray(rng.normal(size=20), jnp.float32)}          # < min_layer_size: raw
  c = C.uniform(r, min_layer_size=100)
  payload, _ = c.encode(g, None, KEYS)
  out, _ = c.decode(payload, None, KEYS, g)
  for name in ("a", "b"):
    _, ref = _ref_dense(g[name].ravel(), r)
    step = (float(g[name].max()) - float(g[name].min())) / (2**r - 1)
    amax = float(jnp.max(jnp.abs(g[name])))  # float32 rounding of lo + c step: ~ulp(amax)
    np.testing.assert_allclose(np.ravel(out[name]), ref, rtol=0, atol=1e-6 * amax + 1e-5 * step)
    err = np.abs(np.ravel(out[name]) - np.asarray(g[name], np.float64).ravel())
    assert err.max() <= step / 2 * (1 + 1e-5)          # nearest level: half a step at most
    assert float(out[name].min()) == float(g[name].min())  # the coded min and max are exact
    assert float(out[name].max()) == float(g[name].max())
  np.testing.assert_array_equal(out["c"], g["c"])
  expected = r * (1200 + 1500) + 2 * 64 + 32 * 20
  assert int(bits.count(payload)) == wire.total_bits(payload) == expected
  back = wire.unpack(wire.pack(payload), payload)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(payload)):
    np.testing.assert_array_equal(x, y)


def test_top_k_keeps_the_m22_entries_and_pools_one_range():
  rng = np.random.default_rng(5)
  x = rng.laplace(size=3000).astype(np.float32)
  g = {"w": jnp.asarray(x[:2000].reshape(40, 50)), "v": jnp.asarray(x[2000:])}
  r, p = 2, 0.6
  c = C.uniform(r, top_fraction=p, min_layer_size=1, per_layer=False)
  m = C.m22(r, top_fraction=p, min_layer_size=1, per_layer=False, lloyd_iters=5)
  out, _ = c.decode(c.encode(g, None, KEYS)[0], None, KEYS, g)
  mout, _ = m.decode(m.encode(g, None, KEYS)[0], None, KEYS, g)
  flat = np.concatenate([np.ravel(out["v"]), np.ravel(out["w"])])  # sorted leaf order
  mflat = np.concatenate([np.ravel(mout["v"]), np.ravel(mout["w"])])
  xs = np.concatenate([x[2000:], x[:2000]]).astype(np.float64)
  keep = math.ceil(p / r * xs.size)
  kept = np.zeros(xs.size, bool)
  kept[np.argsort(-np.abs(xs), kind="stable")[:keep]] = True
  np.testing.assert_array_equal(flat != 0, kept)
  np.testing.assert_array_equal(mflat != 0, kept)        # the same entries as M22
  _, ref = _ref_dense(xs[kept], r)                       # one range over both leaves
  np.testing.assert_allclose(flat[kept], ref, rtol=1e-6, atol=1e-6)


def test_stochastic_rounding_is_unbiased_given_the_range():
  g = {"w": jax.random.normal(jax.random.key(3), (64,))}
  c = C.uniform(2, min_layer_size=1, stochastic=True)
  dec = jax.jit(jax.vmap(lambda k: c.decode(c.encode(g, None, Keys(k, k))[0], None, None, g)[0]["w"]))
  n = 20000
  s = np.asarray(dec(jax.random.split(jax.random.key(4), n)), np.float64)
  x = np.asarray(g["w"], np.float64)
  step = (x.max() - x.min()) / 3
  assert np.all(np.abs(s - x) <= step * (1 + 1e-5))
  assert np.all(np.abs(s.mean(0) - x) < 5 * 0.5 * step / math.sqrt(n) + 1e-6)


def test_constant_zero_huge_and_empty_inputs():
  c = C.uniform(3, min_layer_size=1)
  g = {"a": jnp.full((50,), -0.3), "z": jnp.zeros((10,)), "e": jnp.zeros((0, 4)),
       "h": jnp.array([3e38, -3e38, 1e38, 0.0])}
  payload, _ = c.encode(g, None, KEYS)
  out, _ = c.decode(payload, None, KEYS, g)
  np.testing.assert_array_equal(out["a"], g["a"])
  np.testing.assert_array_equal(out["z"], g["z"])
  assert out["e"].shape == (0, 4)
  assert np.all(np.isfinite(out["h"]))
  np.testing.assert_array_equal(out["h"][:2], g["h"][:2])          # the coded max and min
  assert int(bits.count(payload)) == 3 * 64 + 3 * 64               # 3 non-empty layers


def test_bad_arguments():
  for kw in [dict(bits=0), dict(bits=9), dict(bits=2.0), dict(top_fraction=0.0),
             dict(top_fraction=1.5), dict(min_layer_size=0)]:
    with pytest.raises(ValueError):
      C.uniform(**kw)
  with pytest.raises(ValueError, match="NaN"):
    C.uniform(2).encode({"w": jnp.array([1.0, jnp.nan])}, None, KEYS)
  with pytest.raises(ValueError, match="keys"):
    C.uniform(2, stochastic=True).encode({"w": jnp.ones(3)}, None, None)
