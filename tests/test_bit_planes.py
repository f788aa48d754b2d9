"""Gather-free code compaction (bit planes, PEXT/PDEP networks) and M22's raw-domain cuts.

Each is checked against a NumPy reference; the codec's payload must not change.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress.compressors import _m22
from fedjax_compress.compressors import _uniform as U

_EDGE_WORDS = [0, 0xFFFFFFFF, 1, 0x80000000, 0x80000001, 0x55555555, 0xAAAAAAAA, 0xF0F0F0F0]


def _pext(x: int, m: int) -> int:
  out, k = 0, 0
  for lane in range(32):
    if (m >> lane) & 1:
      out |= ((x >> lane) & 1) << k
      k += 1
  return out


def _pdep(x: int, m: int) -> int:
  out, k = 0, 0
  for lane in range(32):
    if (m >> lane) & 1:
      out |= ((x >> k) & 1) << lane
      k += 1
  return out


def test_compress_and_expand_bits_match_bit_loops():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2**32, 600, dtype=np.uint64).astype(np.uint32)
  m = rng.integers(0, 2**32, 600, dtype=np.uint64).astype(np.uint32)
  m[:len(_EDGE_WORDS)] = _EDGE_WORDS
  m[len(_EDGE_WORDS):100] &= rng.integers(0, 2**32, 100 - len(_EDGE_WORDS),
                                          dtype=np.uint64).astype(np.uint32)   # sparser
  c = np.asarray(jax.jit(U.compress_bits)(jnp.asarray(x), jnp.asarray(m)))
  e = np.asarray(jax.jit(U.expand_bits)(jnp.asarray(x), jnp.asarray(m)))
  assert [int(v) for v in c] == [_pext(int(a), int(b)) for a, b in zip(x, m)]
  assert [int(v) for v in e] == [_pdep(int(a), int(b)) for a, b in zip(x, m)]


@pytest.mark.parametrize("bits,sizes,p", [(1, [5], 1.0), (2, [31, 33, 64], 0.3),
                                          (2, [1000, 0, 77, 3000], 0.01), (8, [4000, 1234], 0.6),
                                          (3, [64], 0.0)])
def test_compact_codes_matches_compact_and_expand_inverts(bits, sizes, p):
  rng = np.random.default_rng(bits + len(sizes))
  codes = [rng.integers(0, 2**bits, n).astype(np.uint8) for n in sizes]
  masks = [(rng.random(n) < p).astype(np.uint8) for n in sizes]
  ref = np.concatenate([v[m > 0] for v, m in zip(codes, masks)])
  jc, jm = [jnp.asarray(v) for v in codes], [jnp.asarray(m) for m in masks]
  for cap in sorted({ref.size + 7, max(ref.size - 3, 0)}):   # room to spare; truncated
    out, cnt = jax.jit(lambda a, b, cap=cap: U.compact_codes(a, b, cap, bits))(jc, jm)
    want, wcnt = jax.jit(lambda a, b, cap=cap: U.compact(a, b, cap, jnp.uint8))(jc, jm)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert int(cnt) == int(wcnt) == min(cap, ref.size)
    back = jax.jit(lambda d: U.expand_codes(d, [m.astype(bool) for m in jm], bits))(out)
    seen = 0
    for v, m, b in zip(codes, masks, back):
      sel = np.flatnonzero(m)
      ok = seen + np.arange(sel.size) < cap   # entries past the capacity were dropped
      np.testing.assert_array_equal(np.asarray(b)[sel[ok]], v[sel[ok]])
      seen += sel.size


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 1000])
def test_pack_words_and_count_true_with_short_last_row(n):
  m = np.random.default_rng(n).random(n) < 0.4
  words = np.asarray(U.pack_words(jnp.asarray(m)))
  padded = np.pad(m, (0, -n % 32)).reshape(-1, 32)
  np.testing.assert_array_equal(
      words, (padded.astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1))
  assert int(U.count_true(jnp.asarray(m))) == m.sum()


def test_raw_cuts_match_exact_z_score_codes_up_to_float32_rounding():
  """Codes against the cuts equal `#{j : z >= t_j}` for the exact (float64) z-score, except
  for entries within float32 rounding of a threshold (XLA:CPU's float32 divide, which the
  per-entry z-scores used before, is not correctly rounded: ~1 ulp)."""
  rng = np.random.default_rng(5)
  for trial in range(6):
    scale = np.float32(2.0 ** rng.integers(-8, 8))
    mu, sd = np.float32(rng.normal()), np.float32(rng.uniform(0.01, 3.0))
    t = np.sort(rng.normal(size=3)).astype(np.float32)
    if trial == 0:
      mu, t = np.float32(0.0), np.array([-1.0, 0.0, 1.0], np.float32)   # a cut at z = 0
    cuts = np.asarray(jax.jit(_m22._raw_cuts)(jnp.asarray(t), scale, mu, sd))
    x = (rng.normal(size=20_000) * sd + mu).astype(np.float32) * scale
    near = np.concatenate([cuts, np.nextafter(cuts, -np.inf), np.nextafter(cuts, np.inf),
                           np.nextafter(np.nextafter(cuts, np.inf), np.inf)]).astype(np.float32)
    x = np.concatenate([x, near, np.float32([0.0, -0.0, np.inf, -np.inf])])
    got = np.asarray(jax.jit(_m22._digitize)(jnp.asarray(x), jnp.asarray(cuts)))
    with np.errstate(invalid="ignore"):
      z = (x.astype(np.float64) / float(scale) - float(mu)) / float(sd)
    want = (z[:, None] >= t[None, :].astype(np.float64)).sum(1)
    off = got != want
    gap = np.min(np.abs(z[off, None] - t[None, :]), axis=1) if off.any() else np.zeros(0)
    assert np.all(gap <= 1e-6 * np.maximum(1.0, np.abs(t).max())), (trial, gap)
    assert off.sum() <= 8                          # only the probes next to the cuts
    assert np.all(np.diff(got[np.argsort(x[:20_000])]) >= 0)   # a monotone quantizer
  # No reachable cut (t = NaN): NaN, so nothing is coded above it.
  cut = jax.jit(_m22._raw_cuts)(jnp.float32([jnp.nan]), 1.0, 0.0, 1.0)
  assert np.isnan(np.asarray(cut)).all()
