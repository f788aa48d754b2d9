"""Whole-model selection without raveling: multi-part top-k and layout helpers.

References: a stable NumPy sort of the magnitude bit patterns (ties: lowest index), and
NumPy ravel/scatter of the pytree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, compressors
from fedjax_compress._src import layout
from fedjax_compress.compressors import _sparsify as S
from fedjax_compress.compressors import _uniform as U


def _keys(v):
  return np.abs(np.asarray(v, np.float32)).view(np.int32) & 0x7FFFFFFF


def _top_reference(v, k):
  return np.sort(np.argsort(-_keys(v).astype(np.int64), kind="stable")[:k])


def _cases(rng, n):
  spikes = rng.random(n) * 1e-3
  spikes[rng.choice(n, 40, replace=False)] = 10 + rng.random(40)
  nan_inf = rng.normal(size=n)
  nan_inf[3], nan_inf[n // 2] = np.nan, -np.inf
  return [rng.normal(size=n), np.zeros(n), rng.integers(-2, 3, n).astype(float), spikes,
          nan_inf]


SPLITS = [(1000,), (5, 600, 1, 394), (33, 32, 935)]  # parts not multiples of the row


@pytest.mark.parametrize("split", SPLITS)
def test_top_indices_of_parts_is_exact(split):
  rng = np.random.default_rng(len(split))
  sel = jax.jit(lambda ps, k: S.top_indices_of(ps, k, sample=16), static_argnums=1)
  for v in _cases(rng, sum(split)):
    parts = [jnp.asarray(p, jnp.float32) for p in np.split(v, np.cumsum(split)[:-1])]
    for k in (1, 37, 240):
      np.testing.assert_array_equal(np.asarray(sel(parts, k)), _top_reference(v, k))


def test_top_k_masks_at_sampled_sizes_match_stable_sort():
  # m22/uniform's radix top-k masks at a size where the sparsifiers sample (reference).
  rng = np.random.default_rng(0)
  n = 4 * S.SAMPLE + 1000
  base = rng.normal(size=n).astype(np.float32)
  base[rng.choice(n, 3000)] = 0.5  # ties at many ranks
  parts = [jnp.asarray(base[:70_000]), jnp.asarray(base[70_000:])]
  for keep in (5000, (6 * n) // 10):
    got = np.concatenate([np.asarray(m) for m in jax.jit(U.top_k_masks, static_argnums=1)(
        parts, keep)])
    want = np.zeros(n, bool)
    want[_top_reference(base, keep)] = True
    np.testing.assert_array_equal(got, want)


def test_layout_take_and_scatter_add_match_ravel():
  rng = np.random.default_rng(1)
  tree = {"a": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
          "b": jnp.zeros((0,), jnp.float32),
          "c": jnp.asarray(rng.normal(size=7), jnp.bfloat16)}
  flat = np.asarray(layout.ravel(tree))
  idx = jnp.asarray([0, 14, 15, 21, 3, 22, 10**6], jnp.uint32)  # 22, 10^6: out of range
  got = np.asarray(layout.take(layout.flat_leaves(tree), idx))
  np.testing.assert_array_equal(got, np.where(np.asarray(idx) < 22,
                                              flat[np.minimum(np.asarray(idx), 21)], 0))
  vals = jnp.arange(1.0, 8.0)
  out = layout.scatter_add(tree, idx, vals)
  want = np.zeros(22, np.float32)
  np.add.at(want, np.asarray(idx)[:5], np.asarray(vals)[:5])
  np.testing.assert_array_equal(np.asarray(layout.ravel(out)), want)
  assert out["b"].shape == (0,) and out["a"].shape == (3, 5)
  assert bool(layout.all_finite(tree))
  assert not bool(layout.all_finite({"x": jnp.array([1.0, jnp.inf])}))


def test_random_k_stratified_is_uniform_in_each_stratum():
  # The sampler is unchanged by the per-leaf rewrite; check its distribution still: each
  # coordinate of a stratum of length L is drawn with probability 1/L (chi-square).
  tree = {"w": jnp.ones((6, 7)), "b": jnp.ones((5,))}       # D = 47, k = 5: strata 10,10,9,9,9
  c = compressors.random_k(5, unbiased=False)
  enc = jax.jit(jax.vmap(lambda key: layout.ravel(
      c.decode(c.encode(tree, None, Keys(key, key))[0], None, Keys(key, key), tree)[0])))
  hits = np.asarray(enc(jax.random.split(jax.random.key(0), 20_000))).sum(0)
  starts, lengths = S.strata(47, 5)
  for s, length in zip(starts, lengths):
    counts = hits[s:s + length]
    assert counts.sum() == 20_000
    expected = 20_000 / length
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 40.0  # df <= 9: p < 1e-5 for a sound sampler


@pytest.mark.parametrize("make", [lambda: compressors.top_k(fraction=0.01),
                                  lambda: compressors.random_k(fraction=0.01)])
def test_whole_model_sparse_codecs_at_sampled_size_equal_raveled_reference(make):
  # D > 4 * SAMPLE (the sampled selection), leaves of odd sizes, bf16 leaf.
  rng = np.random.default_rng(5)
  g = {"w": jnp.asarray(rng.normal(size=(301, 457)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=457), jnp.float32),
       "h": jnp.asarray(rng.normal(size=(3, 11)), jnp.bfloat16)}
  keys = Keys(jax.random.key(1), jax.random.key(2))
  c = make()
  f = jax.jit(lambda g: c.decode(c.encode(g, None, keys)[0], None, keys, g)[0])
  out = f(g)
  flat = np.asarray(layout.ravel(g), np.float32)
  got = np.asarray(layout.ravel(out), np.float32)
  nz = np.flatnonzero(got)
  assert nz.size == int(np.ceil(0.01 * flat.size))
  assert out["h"].dtype == jnp.bfloat16 and out["w"].shape == (301, 457)
  ratio = got[nz] / flat[nz]
  assert np.all(ratio > 0)
