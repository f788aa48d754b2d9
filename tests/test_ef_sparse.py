"""error_feedback's sparse residual path (top_k / random_k expose `decode.sparse_coords`).

Reference: the generic path (dense inner decode, `e' = sat(x - decoded)`), reached by wrapping
the inner decoder in a function without the attribute; the residuals must agree bit for bit.
`layout.replace_at` is checked against a NumPy ravel / assign / unravel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, compressors, error_feedback
from fedjax_compress._src import layout

SHAPES = {"a": (7, 9), "b": (0,), "c": (5,), "d": (3, 2, 4)}


def _tree(seed, dtype=jnp.float32, peak=None):
  """Normal entries; with `peak`, each leaf scaled so its largest `|x|` is `peak`."""
  rng = np.random.default_rng(seed)
  def leaf(s):
    v = rng.normal(size=s)
    return v / np.max(np.abs(v)) * peak if peak is not None and v.size else v
  return {k: jnp.asarray(leaf(s), dtype) for k, s in SHAPES.items()}


def _keys(t):
  return Keys(jax.random.key(100 + t), jax.random.key(200 + t))


def _generic(inner):
  """`inner` with a decode that hides `sparse_coords` (forces the dense residual path)."""
  return inner._replace(decode=lambda *a: inner.decode(*a))


INNERS = {
    "top_k": lambda: compressors.top_k(6),
    "top_k_fraction": lambda: compressors.top_k(fraction=0.3),
    "random_k": lambda: compressors.random_k(5),
    "random_k_biased": lambda: compressors.random_k(5, unbiased=False),
    "random_k_uniform": lambda: compressors.random_k(7, sampling="uniform"),
    "random_k_shared": lambda: compressors.random_k(4, shared_mask=True),
}


def _run(c, trees, jit=True):
  s, r = c.init(trees[0])
  enc = jax.jit(c.encode) if jit else c.encode
  out = []
  for t, g in enumerate(trees):
    p, s = enc(g, s, _keys(t))
    out.append((p, s.residual))
  return out


def _assert_same(got, want):
  for (pg, rg), (pw, rw) in zip(got, want):
    for a, b in zip(jax.tree.leaves(pg), jax.tree.leaves(pw)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(rg), jax.tree.leaves(rw)):
      assert a.dtype == b.dtype == jnp.float32 and a.shape == b.shape
      np.testing.assert_array_equal(np.asarray(a).view(np.int32), np.asarray(b).view(np.int32))


@pytest.mark.parametrize("name", INNERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sparse_residual_equals_dense_path_bitwise(name, dtype):
  inner = INNERS[name]()
  assert hasattr(inner.decode, "sparse_coords")
  trees = [_tree(t, dtype) for t in range(4)]
  _assert_same(_run(error_feedback(inner), trees), _run(error_feedback(_generic(inner)), trees))
  _assert_same(_run(error_feedback(inner), trees[:2], jit=False),
               _run(error_feedback(_generic(inner)), trees[:2], jit=False))


@pytest.mark.parametrize("name", ["top_k", "random_k"])
def test_sparse_residual_saturates_and_propagates_like_dense_path(name):
  inner = INNERS[name]()
  big = [_tree(t, peak=3e38) for t in range(3)]  # g + e overflows float32 (saturates)
  got, want = _run(error_feedback(inner), big), _run(error_feedback(_generic(inner)), big)
  _assert_same(got, want)
  assert all(np.all(np.isfinite(np.asarray(x))) for _, r in got for x in jax.tree.leaves(r))
  bad = _tree(9)
  bad["a"] = bad["a"].at[1, 2].set(jnp.nan).at[4, 4].set(jnp.inf)  # under jit: propagate
  got = _run(error_feedback(inner), [bad, _tree(10)])
  _assert_same(got, _run(error_feedback(_generic(inner)), [bad, _tree(10)]))
  assert np.isnan(np.asarray(got[0][1]["a"])[1, 2])


def test_sparse_path_telescopes_in_float64():
  c = error_feedback(compressors.top_k(fraction=0.2))
  trees = [_tree(30 + t) for t in range(6)]
  s, r = c.init(trees[0])
  step = jax.jit(lambda g, s, keys: c.encode(g, s, keys))
  sum_g = np.zeros(layout.num_params(trees[0]))
  sum_d = np.zeros_like(sum_g)
  for t, g in enumerate(trees):
    p, s = step(g, s, _keys(t))
    sum_g += np.asarray(layout.ravel(g), np.float64)
    sum_d += np.asarray(layout.ravel(c.decode(p, r, _keys(t), g)[0]), np.float64)
  e = np.asarray(layout.ravel(s.residual), np.float64)
  np.testing.assert_allclose(sum_d + e, sum_g, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(e) > 0


@pytest.mark.parametrize("k", [1, 6, 40])
def test_top_k_support_is_the_sent_set_under_ties(k):
  """Integer-valued leaves (many ties at the k-th magnitude, +-0, a NaN): the mask of
  `top_k_support` is exactly the set of sent indices (NumPy), and EF's residual equals the
  dense path bit for bit."""
  rng = np.random.default_rng(k)
  tree = {n: jnp.asarray(rng.integers(-3, 4, size=s), jnp.float32) for n, s in SHAPES.items()}
  tree["a"] = tree["a"].at[0, 0].set(-0.0)
  inner = compressors.top_k(k)
  p, _ = jax.jit(inner.encode)(tree, None, _keys(0))
  mask = inner.decode.exact_support(p, _keys(0), tree)
  got = np.flatnonzero(np.asarray(layout.ravel(jax.tree.map(lambda m: m.astype(jnp.float32),
                                                             mask))))
  np.testing.assert_array_equal(got, np.asarray(p["indices"].data))
  trees = [tree, _tree(3)]
  _assert_same(_run(error_feedback(inner), trees), _run(error_feedback(_generic(inner)), trees))
  nan_tree = dict(tree, c=tree["c"].at[2].set(jnp.nan))
  _assert_same(_run(error_feedback(inner), [nan_tree]),
               _run(error_feedback(_generic(inner)), [nan_tree]))


def test_generic_inners_keep_the_dense_path():
  for inner in (compressors.qsgd(2), compressors.sign_sgd(scaled=True),
                compressors.power_sgd(1), compressors.lbgm(compressors.top_k(3), 0.4)):
    assert not hasattr(inner.decode, "sparse_coords")


def test_replace_at_matches_numpy():
  tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.zeros((0,)), "c": jnp.ones(5, jnp.bfloat16),
          "d": -jnp.arange(3.0)}
  flat = np.asarray(layout.ravel(tree), np.float64)
  idx = jnp.asarray([0, 11, 12, 16, 19, 2**31 + 5, 4], jnp.uint32)  # 20 parameters: two dropped
  vals = jnp.asarray([-1.0, 7.5, 2.0, 3.0, 9.0, 100.0, 0.25])
  got = jax.jit(layout.replace_at)(tree, idx, vals)
  want = flat.copy()
  for i, v in zip(np.asarray(idx), np.asarray(vals)):
    if i < flat.size:
      want[i] = v
  assert jax.tree.structure(got) == jax.tree.structure(tree)
  for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
    assert g.dtype == t.dtype and g.shape == t.shape
  np.testing.assert_array_equal(np.asarray(layout.ravel(got), np.float64), want)


@pytest.mark.parametrize("count", [1, 4, 9, 40])
def test_replace_at_windows_of_increasing_indices_match_numpy(count):
  # Leaves smaller and larger than len(idx); idx sorted, some past D (dropped).
  rng = np.random.default_rng(count)
  tree = {"a": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32), "b": jnp.zeros((0,)),
          "c": jnp.asarray(rng.normal(size=3), jnp.float32), "d": jnp.asarray(rng.normal(size=2)),
          "e": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  flat = np.asarray(layout.ravel(tree), np.float64)  # 43 parameters
  for trial in range(5):
    idx = np.sort(rng.choice(50, count, replace=False)).astype(np.uint32)
    vals = rng.normal(size=count).astype(np.float32)
    combine = lambda old, v: old * 2.0 + v
    want = flat.copy()
    for i, v in zip(idx, vals):
      if i < flat.size:
        want[i] = np.float32(np.float32(flat[i]) * 2 + v)
    for increasing in (False, True):
      got = jax.jit(layout.replace_at, static_argnums=(3, 4))(
          tree, jnp.asarray(idx), jnp.asarray(vals), combine, increasing)
      np.testing.assert_array_equal(np.asarray(layout.ravel(got), np.float64), want)
