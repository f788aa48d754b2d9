"""The count sketch's counter-based hash: NumPy reference, balance, collisions, independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress.compressors import _sketch

ROWS, COLS, SIZE = 3, 64, 1 << 15


def _np_mix32(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.uint64)
  m = np.uint64(0xFFFFFFFF)
  x ^= x >> np.uint64(16)
  x = (x * np.uint64(0x7FEB352D)) & m
  x ^= x >> np.uint64(15)
  x = (x * np.uint64(0x846CA68B)) & m
  x ^= x >> np.uint64(16)
  return x


def _np_hashes(key, rows, cols, size):
  seeds = np.asarray(jax.random.bits(key, (2, rows, 1), jnp.uint32)).astype(np.uint64)
  i = np.arange(size, dtype=np.uint64)[None, :]
  h = _np_mix32((_np_mix32(i ^ seeds[0]) + seeds[1]) & np.uint64(0xFFFFFFFF))
  top = _np_mix32(h ^ np.uint64(0x9E3779B9)) >> np.uint64(31)
  return (h % np.uint64(cols)).astype(np.int64), 1.0 - 2.0 * top.astype(np.float64)


@pytest.fixture(scope="module")
def hashes():
  b, s = jax.jit(_sketch._hashes, static_argnums=(1, 2, 3))(jax.random.key(3), ROWS, COLS, SIZE)
  return np.asarray(b), np.asarray(s)


def test_hashes_match_numpy_uint32_reference(hashes):
  b, s = hashes
  rb, rs = _np_hashes(jax.random.key(3), ROWS, COLS, SIZE)
  np.testing.assert_array_equal(b, rb)
  np.testing.assert_array_equal(s, rs)
  assert b.dtype == np.int32 and s.dtype == np.float32


def test_buckets_are_balanced_and_signs_unbiased(hashes):
  b, s = hashes
  assert b.min() >= 0 and b.max() < COLS and set(np.unique(s)) == {-1.0, 1.0}
  expected = SIZE / COLS
  for r in range(ROWS):
    chi2 = np.sum((np.bincount(b[r], minlength=COLS) - expected) ** 2 / expected)
    assert chi2 < COLS - 1 + 6 * np.sqrt(2 * (COLS - 1))     # chi^2(63): mean 63, sd 11.2
    assert abs(s[r].mean()) < 5 / np.sqrt(SIZE)


@pytest.mark.parametrize("lag", [1, 2, COLS, 4096])
def test_pair_collisions_and_sign_products_match_independent_hashing(hashes, lag):
  """Structured pairs (i, i + lag), the weak spot of simple hashes: P(h(i) = h(j)) ~ 1/cols."""
  b, s = hashes
  n = SIZE - lag
  rate = np.mean(b[:, :-lag] == b[:, lag:])
  sd = np.sqrt((1 / COLS) * (1 - 1 / COLS) / (ROWS * n))
  assert abs(rate - 1 / COLS) < 5 * sd
  assert abs(np.mean(s[:, :-lag] * s[:, lag:])) < 5 / np.sqrt(ROWS * n)


def test_rows_are_independent_and_signs_independent_of_buckets(hashes):
  b, s = hashes
  same = np.mean(b[0] == b[1])
  assert abs(same - 1 / COLS) < 5 * np.sqrt(1 / COLS / SIZE)
  assert abs(np.mean(s[0] * s[1])) < 5 / np.sqrt(SIZE)
  # E[s | bucket parity] = 0 for both parities.
  for parity in (0, 1):
    sel = s[0][b[0] % 2 == parity]
    assert abs(sel.mean()) < 5 / np.sqrt(sel.size)


def test_median_network_matches_numpy_sort_including_nan():
  rng = np.random.default_rng(0)
  for rows in (2, 3, 4, 5, 7, 9, 10):
    x = rng.normal(size=(rows, 257)).astype(np.float32)
    x[:, :8] = np.round(x[:, :8])                         # ties
    x[rng.integers(rows), 10] = np.nan
    x[:, 11] = np.nan
    got = np.asarray(jax.jit(_sketch._median_rows)(jnp.asarray(x)))
    srt = np.sort(x.astype(np.float64), axis=0)             # NaN last, as jnp.sort
    want = srt[rows // 2] if rows % 2 else 0.5 * srt[rows // 2 - 1] + 0.5 * srt[rows // 2]
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=0, atol=0)
