"""Blocked Fastfood paths (chunked project / transpose, `fastfood_gram`) and IGC memory bounds.

Issue 11.3-11.4: blocked maps are applied a chunk of blocks at a time, and the CG solves of
the absolute-coordinate downlinks use the blocked Gram operator, so no IGC encode keeps more
than the raveled update plus `O(chunk)` live (XLA memory analysis on abstract inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys
from fedjax_compress import compressors as C
from fedjax_compress.ops import _fastfood as F

# (d, D, map options): one global block, partial last blocks, L > D_b, stored tables,
# hashed/Feistel factors, G := 1. FAST runs by default (compiles dominate on 2 cores), the
# rest under -m slow.
FAST = [
    (5, 37, dict(block_rows=8)),
    (3, 37, dict(block_rows=8, permutation="feistel", generator="hash")),
    (20, 100, dict(block_rows=8)),
]
SLOW = [
    (5, 37, {}),
    (16, 1000, dict(block_rows=64, gaussian=False)),
    (10, 70_001, dict(block_rows=4096, permutation="uniform", generator="threefry")),
    (40, 3 * 65536 + 5, {}),
]
CONFIGS = FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW]


def _params(seed, d, num, kw, k=None):
  if k is None:
    return F.fastfood_params(seed, d, num, **kw)
  base = jax.random.key(seed)
  return jax.vmap(lambda i: F.fastfood_params(jax.random.fold_in(base, i), d, num, **kw))(
      jnp.arange(k))


def _dense(p) -> np.ndarray:
  """`V` as a float64 matrix, column by column through the whole-array projection."""
  eye = np.eye(p.d, dtype=np.float32)
  proj = jax.jit(jax.vmap(F._project_whole, in_axes=(None, 0)))  # pylint: disable=protected-access
  return np.asarray(proj(p, jnp.asarray(eye)), np.float64).T


@pytest.mark.parametrize("d,num,kw", CONFIGS)
def test_chunked_project_and_transpose_equal_whole_array(d, num, kw):
  p = _params(1, d, num, kw)
  z = jax.random.normal(jax.random.key(2), (d,)) * 3.0
  y = jax.random.normal(jax.random.key(3), (num,))
  whole_p = jax.jit(F._project_whole)(p, z)  # pylint: disable=protected-access
  whole_t = jax.jit(F._transpose_whole)(p, y)  # pylint: disable=protected-access
  # project: the same per-block arithmetic, written in place: bit for bit
  np.testing.assert_array_equal(F.fastfood_project(p, z), whole_p)
  # transpose: only the order of the block sum differs
  np.testing.assert_allclose(F.fastfood_transpose(p, y), whole_t, rtol=0,
                             atol=1e-6 * float(jnp.abs(whole_t).max()))
  # adjoint in float64 against the dense matrix
  v = _dense(p)
  np.testing.assert_allclose(F.fastfood_transpose(p, y), v.T @ np.asarray(y, np.float64),
                             rtol=0, atol=1e-5 * np.abs(v.T @ np.asarray(y, np.float64)).max())


@pytest.mark.parametrize("d,num,kw,k,chunk", [
    (*FAST[0], None, 8), (*FAST[1], 3, 8), (*FAST[2], 3, F.GRAM_CHUNK)] + [
        pytest.param(*c, k, chunk, marks=pytest.mark.slow) for c in FAST + SLOW
        for k in (None, 3) for chunk in (8, F.GRAM_CHUNK)])
def test_gram_equals_float64_normal_matrix(d, num, kw, k, chunk):
  """`fastfood_gram` = `V^T V z` (stacked: `[V_k^T] sum_j V_j z_j`), any chunking."""
  p = _params(4, d, num, kw, k)
  shape = (d,) if k is None else (k, d)
  z = jax.random.normal(jax.random.key(5), shape)
  got = np.asarray(F.fastfood_gram(p, z, chunk=chunk), np.float64)
  if k is None:
    v = _dense(p)
    want = v.T @ (v @ np.asarray(z, np.float64))
  else:
    vs = [_dense(jax.tree.map(lambda x, i=i: x[i], p)) for i in range(k)]
    y = sum(v @ np.asarray(z[i], np.float64) for i, v in enumerate(vs))
    want = np.stack([v.T @ y for v in vs])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_gram_random_inputs_symmetric_positive():
  """`<u, G w> = <G u, w>` and `<u, G u> = ||V u||^2 >= 0` on random inputs (blocked map)."""
  p = _params(7, 12, 5000, dict(block_rows=256))
  gram = functools.partial(F.fastfood_gram, chunk=600)  # 2 blocks per chunk, overlapping tail
  for s in range(3):
    u, w = jax.random.normal(jax.random.key(10 + s), (2, 12))
    np.testing.assert_allclose(jnp.vdot(u, gram(p, w)), jnp.vdot(gram(p, u), w), rtol=1e-5)
    vu = F.fastfood_project(p, u)
    np.testing.assert_allclose(jnp.vdot(u, gram(p, u)), jnp.vdot(vu, vu), rtol=1e-5)


def test_gram_saturates_and_rejects_bad_input():
  p = _params(0, 4, 300, dict(block_rows=64))
  big = jnp.full((4,), 3e38, jnp.float32)
  out = F.fastfood_gram(p, big)
  assert bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match="shape"):
    F.fastfood_gram(p, jnp.ones((5,)))
  with pytest.raises(ValueError, match="chunk"):
    F.fastfood_gram(p, jnp.ones((4,)), chunk=0)


def _encode_temporaries(c, num: int) -> int:
  """XLA temporaries (bytes) of one jitted encode of a 2-leaf `num`-parameter update."""
  sizes = {"a": num // 3, "b": num - num // 3}
  like = {k: jax.ShapeDtypeStruct((n,), jnp.float32) for k, n in sizes.items()}
  state = jax.eval_shape(lambda: c.init({k: jnp.zeros((n,)) for k, n in sizes.items()})[0])
  keys = Keys(jax.random.key(0), jax.random.key(1))
  comp = jax.jit(lambda g, s: c.encode(g, s, keys)).lower(like, state).compile()
  return comp.memory_analysis().temp_size_in_bytes


# 2 GiB per client at D = 124.4M is 17.25 bytes per parameter; the encodes hold the raveled
# update (4 B/param) plus O(chunk), so 6 B/param + 4 MiB leaves room for XLA's choices.
_BYTES_PER_PARAM = 6.0
_SLACK = 4 << 20


def test_static_downlink_temporaries_are_linear_and_small():
  """The static downlink's CG solve keeps no D-sized buffer (was ~9 D-vectors, 36.6 B/param):
  temporaries <= 6 B/param + 4 MiB at D = 2^20 + 12345 (blocked map, cut last block)."""
  num = (1 << 20) + 12_345
  t = _encode_temporaries(C.intrinsic_static_downlink(64), num)
  assert t <= _BYTES_PER_PARAM * num + _SLACK, t / num


@pytest.mark.slow
@pytest.mark.parametrize("name", ["static", "time_varying", "static_solve", "static_down",
                                  "k_down"])
def test_encode_temporaries_scale_linearly(name):
  """Every IGC encode: temporaries <= 6 B/param + 4 MiB at two sizes, and the increase from
  D to 2D is at most 6 B per added parameter (linear, no hidden multiple of D)."""
  make = {"static": lambda: C.intrinsic_static(64), "time_varying": lambda: C.intrinsic_time_varying(64),
          "static_solve": lambda: C.intrinsic_static(64, coordinates="solve"),
          "static_down": lambda: C.intrinsic_static_downlink(64),
          "k_down": lambda: C.intrinsic_k_subspace_downlink(64, 3)}[name]
  num = (1 << 20) + 12_345
  t1, t2 = _encode_temporaries(make(), num), _encode_temporaries(make(), 2 * num)
  assert t1 <= _BYTES_PER_PARAM * num + _SLACK, t1 / num
  assert t2 <= _BYTES_PER_PARAM * 2 * num + _SLACK, t2 / (2 * num)
  assert t2 - t1 <= _BYTES_PER_PARAM * num, (t2 - t1) / num
