"""Uniform min-max quantization (the M22 paper's baseline) and the sparse per-layer scalar codec.

`uniform` sends each kept entry of a leaf as a `b`-bit code on `2^b` evenly spaced levels
between that leaf's min and max. The shared machinery below (`scalar_codec`) is also M22's:
an optional exact global top-k, leaves below a size threshold sent raw, one level design
per leaf (or pooled), codes compacted into one variable-length field.

Speed: every step is a few passes over the update. Top-k is an exact radix select (two
65,536-bin histograms of the float bits, ties by lowest index) up to `EXACT_SIZE` entries
and above that a magnitude threshold from a sample, corrected by exact counts (`k` within
`KEEP_TOLERANCE`, `threshold_masks`); ranks come from popcounts of 32-bit mask words and
compaction gathers (`set_bit_positions`) instead of scattering over `D`; codes are compacted
and expanded as bit planes with word-level PEXT/PDEP networks (`compact_codes`,
`expand_codes`: no per-entry gather, which XLA:CPU runs as a scalar loop). Robustness: each segment is
rescaled by a power of two (exact) so sums and ranges never overflow, levels saturate at
the float32 range, and decoded values at the range of the template's dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, Field, stateless_init
from fedjax_compress.compressors._sparsify import _popcount, _select_bit, magnitude_keys

F32_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------- layout


class Plan(NamedTuple):
  """Static layout: leaves in wire order = [quantized leaves..., raw leaves...] (tree order)."""

  order: tuple[int, ...]                  # tree-leaf index of each wire-order (non-empty) leaf
  sizes: tuple[int, ...]                  # element count of each wire-order leaf
  num_quantized: int                      # the first `num_quantized` wire leaves are quantized
  segments: tuple[tuple[int, ...], ...]   # wire-order leaf indices of each level design
  keep: Optional[int]                     # entries kept by top-k (None: dense, no positions)

  @property
  def size(self) -> int:
    return sum(self.sizes)

  @property
  def n_q(self) -> int:
    return sum(self.sizes[:self.num_quantized])

  @property
  def n_r(self) -> int:
    return sum(self.sizes[self.num_quantized:])

  @property
  def capacity(self) -> Optional[int]:
    """Static bound on the kept entries: `keep`, plus the tolerance of `threshold_masks`."""
    if self.keep is None:
      return None
    return min(self.size, self.keep + keep_slack(self.keep, self.size))

  @property
  def list_positions(self) -> bool:
    """Positions as an index list (`keep ceil(log2 D) < D`), else a bitmap."""
    return self.keep is not None and self.keep * _bits.index_bits(self.size) < self.size

  @property
  def offsets(self) -> tuple[int, ...]:
    """Wire-order offset of each leaf."""
    return tuple(np.cumsum((0,) + self.sizes[:-1]).tolist()) if self.sizes else ()


def make_plan(tree, *, min_layer_size: int, per_layer: bool, keep_fraction: Optional[float],
              dense: bool = False) -> Plan:
  """The static `Plan` of `tree` (`keep_fraction=None`: keep every non-zero entry)."""
  sizes = [int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree.leaves(tree)]
  quant = [i for i, n in enumerate(sizes) if n >= min_layer_size]
  raw = [i for i, n in enumerate(sizes) if 0 < n < min_layer_size]   # empty leaves: not sent
  nq = len(quant)
  segments = tuple((j,) for j in range(nq)) if per_layer else ((tuple(range(nq)),) if nq else ())
  size = sum(sizes)
  if dense:
    keep = None
  elif keep_fraction is None:
    keep = size
  else:
    keep = min(size, max(1, math.ceil(keep_fraction * size))) if size else 0
  order = tuple(quant + raw)
  return Plan(order, tuple(sizes[i] for i in order), nq, segments, keep)


def cast_saturating(x: jax.Array, dtype) -> jax.Array:
  """`x` cast to `dtype`, clipped first to its finite range (float dtypes; NaN propagates)."""
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    big = float(jnp.finfo(dtype).max)
    x = jnp.clip(x, -big, big)
  return x.astype(dtype)


def pow2_scale(amax: jax.Array) -> jax.Array:
  """The power of two `s` with `amax / s` in `[1, 2)` (1 where `amax` is 0 or not finite)."""
  _, e = jnp.frexp(amax)
  s = jnp.ldexp(jnp.ones_like(amax), e - 1)
  return jnp.where((amax > 0) & jnp.isfinite(amax), s, 1.0)


# ----------------------------------------------------------------------------- selection


def materialize(x: jax.Array) -> jax.Array:
  """`x`, computed as a reduction so XLA keeps it in memory for its consumers.

  XLA:CPU fuses cheap elementwise producers (a cumsum's last stage, a word's popcount) into
  each consumer, so a per-word value broadcast to 32 lanes is recomputed per lane (a
  `D`-sized loop that no longer vectorises: ~10x slower). `optimization_barrier` does not
  stop that on CPU; a reduction is a fusion root. Value unchanged: `max(x, lowest)`.
  """
  low = jnp.iinfo(x.dtype).min if jnp.issubdtype(x.dtype, jnp.integer) else -jnp.inf
  return jnp.max(jnp.stack([x, jnp.full_like(x, low)]), axis=0)


def by_rows32(fn: Callable[[jax.Array], jax.Array], v: jax.Array) -> jax.Array:
  """`fn(rows)` for the rows of 32 of `v[n]` (zero padded), concatenated along axis 0.

  The whole rows are a reshape and only the last short row is padded: a `pad` inside a
  fused reduction makes XLA:CPU check bounds per element (~2x slower).
  """
  n = v.shape[0]
  n0 = n - n % 32
  parts = [fn(v[:n0].reshape(-1, 32))] if n0 else []
  if n0 < n:
    parts.append(fn(jnp.pad(v[n0:], (0, 32 - (n - n0)))[None, :]))
  if not parts:
    return fn(v.reshape(0, 32))
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def pack_words(mask: jax.Array) -> jax.Array:
  """uint32 words of a bool `mask[n]`: bit `l` of word `w` is `mask[32 w + l]` (zero padded)."""
  def pack(rows):
    m = rows.reshape(-1, 4, 8).astype(jnp.uint32)
    b = jnp.sum(m << jnp.arange(8, dtype=jnp.uint32)[None, None, :], axis=2,
                dtype=jnp.uint32)  # bytes first
    return jnp.sum(b << (8 * jnp.arange(4, dtype=jnp.uint32))[None, :], axis=1,
                   dtype=jnp.uint32)
  return by_rows32(pack, mask)


def word_offsets(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(off, total)`: `off[w] = #set bits in words[:w]` (int32, materialised) and their sum."""
  cnt = _popcount(words)
  incl = jnp.cumsum(cnt)
  return materialize(incl - cnt), (incl[-1] if words.shape[0] else jnp.zeros((), jnp.int32))


def exclusive_rank(mask: jax.Array) -> jax.Array:
  """`rank[i] = #{j < i : mask[j]}` (int32) from popcounts of 32-bit words (no long cumsum)."""
  n = mask.shape[0]
  if n == 0:
    return jnp.zeros((0,), jnp.int32)
  words = pack_words(mask)
  off, _ = word_offsets(words)
  words = materialize(words)
  lanes = jnp.arange(32, dtype=jnp.uint32)[None, :]
  below = _popcount(words[:, None] & ((jnp.uint32(1) << lanes) - 1))
  return (off[:, None] + below).reshape(-1)[:n]


def set_bit_positions(words: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Bit positions (`32 w + lane`, int32, in order) of the first `capacity` set bits; count.

  Gathers only (XLA:CPU scatters and cumsums cost ~10x a gather per element): slot `j`'s
  word is the `c`-th non-empty word, `c = #(non-empty words starting at <= j)`, read from the
  word starts marked in a `capacity` bitmap (ranked by popcounts); its lane is the `q`-th set
  bit of the word, `q = j - off[word]`. Slots past the count hold position 0.
  """
  nw = words.shape[0]
  if capacity == 0 or nw == 0:
    return jnp.zeros((capacity,), jnp.int32), jnp.zeros((), jnp.int32)
  off, total = word_offsets(words)
  nonempty = words != 0
  ne_rank = exclusive_rank(nonempty)
  ne_list = jnp.zeros((nw,), jnp.int32).at[jnp.where(nonempty, ne_rank, nw)].set(
      jnp.arange(nw, dtype=jnp.int32), mode="drop", unique_indices=True)   # nw/32 of D
  starts = jnp.zeros((capacity,), bool).at[jnp.where(nonempty, off, capacity)].set(
      True, mode="drop", unique_indices=True)
  started = exclusive_rank(starts) + starts.astype(jnp.int32)   # inclusive
  j = jnp.arange(capacity, dtype=jnp.int32)
  word = ne_list[jnp.maximum(started - 1, 0)]
  lane = _select_bit(words[word], j - off[word]).astype(jnp.int32)
  valid = j < total
  return jnp.where(valid, word * 32 + lane, 0), jnp.minimum(total, capacity)


def _padded_concat(parts: Sequence[jax.Array], dtype) -> jax.Array:
  """The parts as `dtype`, each zero-padded to a multiple of 32, concatenated (word layout)."""
  padded = [jnp.pad(v.astype(dtype), (0, -int(v.shape[0]) % 32)) for v in parts]
  return padded[0] if len(padded) == 1 else jnp.concatenate(padded)


def compact(parts: Sequence[jax.Array], masks: Sequence[jax.Array], capacity: int,
            dtype) -> tuple[jax.Array, jax.Array]:
  """Entries of the `parts` where `masks`, in order, in one length-`capacity` array; and their count.

  Entries past `capacity` are dropped (callers size it to the largest possible count);
  slots past the count are 0. Gather-based (`set_bit_positions`), no scatter over `D`.
  """
  parts = [v for v in parts]
  keep = [i for i, v in enumerate(parts) if v.shape[0]]
  if capacity == 0 or not keep:
    count = sum((count_true(m) for m in masks), jnp.zeros((), jnp.int32))
    return jnp.zeros((capacity,), dtype), jnp.minimum(count, capacity)
  words = [pack_words(masks[i]) for i in keep]
  words = words[0] if len(words) == 1 else jnp.concatenate(words)
  pos, count = set_bit_positions(words, capacity)
  values = _padded_concat([parts[i] for i in keep], dtype)
  valid = jnp.arange(capacity) < count
  return jnp.where(valid, values[pos], jnp.zeros((), dtype)), count


def _prefix_xor(v: jax.Array) -> jax.Array:
  """Bit `i` of the result is the XOR of bits `0..i` of uint32 `v`."""
  for s in (1, 2, 4, 8, 16):
    v = v ^ (v << s)
  return v


def _move_masks(m: jax.Array) -> list[jax.Array]:
  """The 5 move masks of the bit compress / expand network for uint32 masks `m`.

  Round `i` moves by `2^i` the bits of `m` whose count of zeros of `m` below them, not yet
  moved, has bit `i` set (Hacker's Delight 7-4). Bit-parallel: a few dozen word operations.
  """
  mk = ~m << 1
  out = []
  for i in range(5):
    mp = _prefix_xor(mk)
    mv = mp & m
    out.append(mv)
    m = (m ^ mv) | (mv >> (1 << i))
    mk = mk & ~mp
  return out


def compress_bits(x: jax.Array, m: jax.Array) -> jax.Array:
  """The bits of uint32 `x` where `m` is set, packed to the low end in order (PEXT)."""
  x = x & m
  for i, mv in enumerate(_move_masks(m)):
    t = x & mv
    x = (x ^ t) | (t >> (1 << i))
  return x


def expand_bits(x: jax.Array, m: jax.Array) -> jax.Array:
  """The low `popcount(m)` bits of uint32 `x` spread, in order, to the set bits of `m` (PDEP)."""
  mvs = _move_masks(m)
  for i in range(4, -1, -1):
    x = (x & ~mvs[i]) | ((x << (1 << i)) & mvs[i])
  return x & m


def _plane_words(codes: jax.Array, bits: int) -> jax.Array:
  """`[ceil(n/32), bits]` uint32: bit `l` of word `(w, b)` is bit `b` of `codes[32 w + l]`."""
  lanes = jnp.arange(32, dtype=jnp.uint32)[None, None, :]
  b = jnp.arange(bits, dtype=jnp.uint32)[None, :, None]
  return by_rows32(lambda rows: jnp.sum(((rows.astype(jnp.uint32)[:, None, :] >> b) & 1) << lanes,
                                        axis=2, dtype=jnp.uint32), codes)


def compact_codes(codes: Sequence[jax.Array], masks: Sequence[jax.Array], capacity: int,
                  bits: int) -> tuple[jax.Array, jax.Array]:
  """`compact(codes, masks, capacity, uint8)` for `bits`-bit codes, with no per-slot gather.

  Bit planes, 32 entries a word: per mask word `w` (`off[w]` set bits before it over all
  masks) and plane, the kept entries' bits are packed to the low end (`compress_bits`) and
  added into the plane stream at bit `off[w]` (two words per `w`: a scatter of `2 D / 32`
  updates instead of `capacity` scalar gathers). Slot `j` reads bit `j` of every plane.
  Same output as `compact`.
  """
  nwp = -(-capacity // 32)
  idx, upd = [], []
  seen = jnp.zeros((), jnp.int32)
  for c, m in zip(codes, masks):
    if m.shape[0] == 0:
      continue
    words = pack_words(m)
    off, total = word_offsets(words)
    e = compress_bits(_plane_words(c, bits), materialize(words)[:, None])   # [nw, bits]
    start = off + seen
    sh = (start & 31).astype(jnp.uint32)[:, None]
    q = start >> 5
    idx += [q, q + 1]
    upd += [e << sh, jnp.where(sh == 0, jnp.uint32(0), e >> ((32 - sh) & 31))]
    seen = seen + total
  count = jnp.minimum(seen, capacity)
  if capacity == 0 or not idx:
    return jnp.zeros((capacity,), jnp.uint8), count
  planes = jnp.zeros((nwp + 1, bits), jnp.uint32).at[jnp.concatenate(idx)].add(
      jnp.concatenate(upd), mode="drop")[:nwp]                  # disjoint bits: add = or
  lanes = jnp.arange(32, dtype=jnp.uint32)[None, None, :]
  code = jnp.sum(((planes[:, :, None] >> lanes) & 1) << jnp.arange(bits, dtype=jnp.uint32)[
      None, :, None], axis=1, dtype=jnp.uint32)
  return code.reshape(-1)[:capacity].astype(jnp.uint8), count


def expand_codes(data: jax.Array, masks: Sequence[jax.Array], bits: int) -> list[jax.Array]:
  """Inverse of `compact_codes`: per mask, the code of its `r`-th set entry (`r` counted over
  all masks in order) at that entry; int32, unspecified where unset.

  No per-entry gather: for mask word `w` each bit plane's 32 bits from bit `off[w]` are read
  once (a funnel shift of 2 plane words) and spread to the word's set bits (`expand_bits`);
  entry `(w, l)` then takes bit `l`.
  """
  cap = data.shape[0]
  nwp = -(-cap // 32)
  planes = jnp.pad(_plane_words(data, bits), ((0, 1), (0, 0)))    # [nwp + 1, bits]
  lanes = jnp.arange(32, dtype=jnp.uint32)[None, None, :]
  plane_bits = jnp.arange(bits, dtype=jnp.uint32)[None, :, None]
  out, seen = [], jnp.zeros((), jnp.int32)
  for m in masks:
    n = m.shape[0]
    if n == 0 or cap == 0:
      out.append(jnp.zeros((n,), jnp.int32))
      continue
    words = pack_words(m)
    off, total = word_offsets(words)
    start = off + seen
    q = jnp.minimum(start >> 5, nwp)
    sh = (start & 31).astype(jnp.uint32)[:, None]
    lo, hi = planes[q], planes[jnp.minimum(q + 1, nwp)]
    window = jnp.where(sh == 0, lo, (lo >> sh) | (hi << ((32 - sh) & 31)))
    spread = materialize(expand_bits(window, materialize(words)[:, None]))   # [nw, bits]
    code = jnp.sum(((spread[:, :, None] >> lanes) & 1) << plane_bits, axis=1, dtype=jnp.uint32)
    out.append(code.reshape(-1)[:n].astype(jnp.int32))
    seen = seen + total
  return out


def _suffix_pick(hist: jax.Array, need: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Largest bin `b` with `#(bins >= b) >= need`, and `#(bins > b)`."""
  suffix = jnp.cumsum(hist[::-1])[::-1]
  b = jnp.sum(suffix >= need).astype(jnp.int32) - 1
  above = jnp.where(b + 1 < hist.shape[0], suffix[jnp.minimum(b + 1, hist.shape[0] - 1)], 0)
  return b, above


def top_k_masks(xs: Sequence[jax.Array], keep: int) -> list[jax.Array]:
  """The `keep` largest magnitudes over all of `xs` (ties by lowest index in order), as masks.

  Radix select on the IEEE bits of `|x|` (monotone for non-negative floats): a histogram
  of the high 16 bits finds the bin of the `keep`-th largest, a histogram of the low 16
  bits within it the exact value `t`; entries above `t` are kept, and of those equal to
  `t` the first `keep - #(> t)` (a prefix count, computed only when ties need breaking).
  """
  n = sum(int(x.shape[0]) for x in xs)
  if keep >= n:
    return [jnp.ones(x.shape, bool) for x in xs]
  if keep <= 0:
    return [jnp.zeros(x.shape, bool) for x in xs]
  bs = [jax.lax.bitcast_convert_type(jnp.abs(jax.lax.stop_gradient(x)), jnp.uint32) for x in xs]
  hist = sum(jnp.bincount((b >> 16).astype(jnp.int32), length=65536) for b in bs)
  h, above_h = _suffix_pick(hist, keep)
  lo_hist = sum(jnp.bincount(jnp.where((b >> 16).astype(jnp.int32) == h,
                                       (b & 0xFFFF).astype(jnp.int32), 65536), length=65537)
                for b in bs)[:65536]
  l, above_l = _suffix_pick(lo_hist, keep - above_h)
  t = (h.astype(jnp.uint32) << 16) | l.astype(jnp.uint32)
  need = keep - above_h - above_l        # entries equal to t to keep (>= 1)

  def break_ties(_):
    out, seen = [], jnp.zeros((), jnp.int32)
    for b in bs:
      ties = b == t
      out.append((b > t) | (ties & (exclusive_rank(ties) + seen < need)))
      seen = seen + jnp.sum(ties, dtype=jnp.int32)
    return out

  return jax.lax.cond(lo_hist[l] == need, lambda _: [b >= t for b in bs], break_ties, None)


EXACT_SIZE = 1 << 18
"""Models of at most this many entries get the exact top-k (`top_k_masks`)."""
KEEP_TOLERANCE = 0.01
"""Above `EXACT_SIZE`, `threshold_masks` keeps `k` entries within this relative tolerance."""
_SAMPLE = 1 << 16   # magnitudes sampled to place the threshold
_ROUNDS = 4         # counting passes tried before the exact fallback


def keep_slack(keep: int, size: int) -> int:
  """Entries `threshold_masks` may keep beyond (or short of) `keep`: `floor(tol keep)`."""
  return 0 if size <= EXACT_SIZE or keep >= size else int(KEEP_TOLERANCE * keep)


def _magnitude_keys(x: jax.Array) -> jax.Array:
  """`magnitude_keys` of `x` outside the gradient (int32 keys ordering `|x|`; 0 for +-0)."""
  return magnitude_keys(jax.lax.stop_gradient(x))


def _sample_positions(sizes: Sequence[int], m: int) -> list[np.ndarray]:
  """Static stratified pseudo-random positions: one in each of `m` equal strata of the
  concatenation, returned per part (local indices)."""
  n = sum(sizes)
  i = np.arange(m, dtype=np.uint64)
  h = (i * np.uint64(2654435761)) % np.uint64(2**32)   # Knuth's multiplicative hash
  u = ((h ^ (h >> np.uint64(15))) >> np.uint64(8)).astype(np.float64) * 2.0**-24
  pos = np.minimum(((np.arange(m) + u) * (n / m)).astype(np.int64), n - 1)
  bounds = np.cumsum([0] + list(sizes))
  return [pos[(pos >= lo) & (pos < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def count_true(mask: jax.Array) -> jax.Array:
  """int32 number of true (non-zero) entries of a 1-D bool/uint8 mask.

  Summed as uint8 per 32 entries, then int32 over the rows: XLA:CPU vectorises that form
  (a flat sum of a comparison runs ~10x slower).
  """
  n = mask.shape[0]
  if n == 0:
    return jnp.zeros((), jnp.int32)
  per_row = by_rows32(lambda rows: jnp.sum(rows.astype(jnp.uint8), axis=1, dtype=jnp.uint8),
                      mask)
  return jnp.sum(per_row.astype(jnp.int32))


def threshold_masks(xs: Sequence[jax.Array], keep: int) -> tuple[list[jax.Array], jax.Array]:
  """uint8 0/1 masks of about the `keep` largest non-zero magnitudes over all of `xs`; count.

  At most `EXACT_SIZE` entries: exactly `top_k_masks` minus exact zeros. Above, the masks
  are `|x| >= t` (a top set: every kept magnitude is >= every dropped one) for a threshold
  `t` placed from a sorted stratified sample of `_SAMPLE` magnitudes and corrected by
  exact counts (one fused read of `xs` each): from a count `c` at `t`, the next `t` is the
  sample quantile shifted by `(keep - c) S / D` ranks. Accepted once
  `|c - keep| <= slack = floor(KEEP_TOLERANCE keep)` (or every non-zero entry is kept and
  they are fewer); after `_ROUNDS` counts, or with ties straddling the band, the exact
  masks are used. So the count is within `keep +- slack` (`<= keep` if the non-zeros are
  fewer) and never exceeds `keep + slack` (`Plan.capacity`).
  """
  n = sum(int(x.shape[0]) for x in xs)
  slack = keep_slack(keep, n)
  def exact(_):
    masks = [(k & (x != 0)).astype(jnp.uint8) for k, x in zip(top_k_masks(xs, keep), xs)]
    return masks, sum((count_true(m) for m in masks), jnp.zeros((), jnp.int32))

  if n <= EXACT_SIZE or keep >= n or keep <= 0:
    return exact(None)
  s = _SAMPLE
  pos = _sample_positions([int(x.shape[0]) for x in xs], s)
  sample = jnp.sort(jnp.concatenate([_magnitude_keys(x[jnp.asarray(p, jnp.int32)])
                                     for x, p in zip(xs, pos) if p.size]))

  def count(t):
    return sum(count_true(_magnitude_keys(x) >= t) for x in xs)

  def at_rank(r):
    """Key at fractional sample rank `r` from the top (linear in key between order stats)."""
    j = jnp.clip(s - r, 0.0, s - 1.0)
    lo = jnp.floor(j).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, s - 1)
    step = (sample[hi] - sample[lo]).astype(jnp.float32) * (j - lo.astype(jnp.float32))
    return jnp.maximum(sample[lo] + step.astype(jnp.int32), 1)   # t >= 1: zeros never kept

  def accepted(t, c):
    return (jnp.abs(c - keep) <= slack) | ((t <= 1) & (c <= keep))

  def refine(state):
    i, t, c = state
    rank = (s - jnp.searchsorted(sample, t, side="left")).astype(jnp.float32)
    t = at_rank(rank + (keep - c).astype(jnp.float32) * (s / n))
    return i + 1, t, count(t)

  t0 = at_rank(jnp.float32(keep * s / n))
  state = (jnp.int32(1), t0, count(t0))
  # The loop sits in a cond so XLA's loop-invariant hoisting (keys of D materialised as
  # loop state) costs only when a correction is needed.
  loop = lambda st: jax.lax.while_loop(
      lambda st: (st[0] < _ROUNDS) & ~accepted(st[1], st[2]), refine, st)
  _, t, c = jax.lax.cond(accepted(state[1], state[2]), lambda st: st, loop, state)

  above = [(_magnitude_keys(x) >= t).astype(jnp.uint8) for x in xs]   # outside the cond:
  return jax.lax.cond(accepted(t, c), lambda _: (above, c), exact, None)  # fused, not hoisted


# ----------------------------------------------------------------------------- codec


class Segment(NamedTuple):
  """One level design's data: its leaves' values, 0/1 weights of the coded entries, a scale."""

  parts: tuple[jax.Array, ...]    # float32 values of each leaf (raw domain, flat)
  weights: tuple[jax.Array, ...]  # uint8 0/1: 1 = kept entry coded with these levels
  scale: jax.Array                # power of two with max|x| / scale < 2 (exact rescaling)


DesignFn = Callable[[Sequence[Segment], jax.Array], tuple[dict, list]]
"""`(segments, key) -> (side fields, per segment a list of int32 codes per part)`."""
LevelsFn = Callable[[dict, int, jax.Array], jax.Array]
"""`(side fields' data, segment index, codes) -> float32 values (raw domain)`."""


def scalar_codec(*, bits: int, top_fraction: Optional[float], iso_bit: bool,
                 min_layer_size: int, per_layer: bool, design: DesignFn, levels: LevelsFn,
                 dense: bool = False, random: bool = False) -> Compressor:
  """Top-k (optional) + per-segment `bits`-bit scalar codes; small leaves sent raw as float32.

  Wire order: leaves with `>= min_layer_size` entries (tree order), then the others.
  Sparse (`dense=False`): `positions` (one bitmap field per leaf, `D` bits in all, or one
  list of `ceil(log2 D)`-bit indices when shorter) of the kept non-zero entries
  (`threshold_masks`: exactly `k` up to `EXACT_SIZE` entries, else `k` within 1 %), `codes` of
  the kept quantized entries, `design`'s side fields, `raw` float32 values of kept
  small-leaf entries. Dense: every entry is coded, one `codes` / `raw` field per leaf.
  Each leaf is processed in place (no concatenation of the model into one vector). Empty
  leaves are not sent (0 bits) and decode to empty leaves. `random`: `design` uses its key
  (`keys.private`, validated); otherwise `keys` is ignored.
  """
  frac = None if top_fraction is None else (top_fraction / bits if iso_bit else top_fraction)

  def plan(tree) -> Plan:
    return make_plan(tree, min_layer_size=min_layer_size, per_layer=per_layer,
                     keep_fraction=frac, dense=dense)

  def encode_fn(updates, state, keys, params=None):
    del params
    if random:
      checks.check_keys(keys)
    checks.check_finite(updates)
    return layout.stamp(encode_core(updates, keys.private if random else None), updates), state

  @jax.jit  # one compilation per model structure; also makes eager use fast
  def encode_core(updates, key):
    key = jax.random.key(0) if key is None else key   # unused by deterministic designs
    p = plan(updates)
    leaves = jax.tree.leaves(updates)
    xs = [jnp.ravel(leaves[i]).astype(jnp.float32) for i in p.order]
    nq = p.num_quantized
    payload = {}
    if dense:
      kept = [jnp.ones(x.shape, jnp.uint8) for x in xs]
    else:
      kept, _ = threshold_masks(xs, p.keep)   # uint8 0/1
      if p.list_positions:
        idx = [jnp.arange(o, o + n, dtype=jnp.uint32) for o, n in zip(p.offsets, p.sizes)]
        data, count = compact(idx, kept, p.capacity, jnp.uint32)
        payload["positions"] = Field(data, _bits.index_bits(p.size), count)
      else:
        payload["positions"] = tuple(Field(k.astype(bool), 1) for k in kept)
    segs = []
    for leaf_ids in p.segments:
      parts = tuple(jax.lax.stop_gradient(xs[j]) for j in leaf_ids)  # side info: no gradient
      amax = jnp.max(jnp.stack([jnp.max(jnp.abs(v), initial=0.0) for v in parts]))
      segs.append(Segment(parts, tuple(kept[j] for j in leaf_ids),
                          pow2_scale(amax)))
    side, codes = design(segs, key)
    payload.update(side)
    if nq:
      leaf_codes = [c for seg_codes in codes for c in seg_codes]  # wire order of quantized
      if dense:
        payload["codes"] = tuple(Field(c.astype(jnp.uint8), bits) for c in leaf_codes)
      else:
        data, count = compact_codes(leaf_codes, kept[:nq], min(p.capacity, p.n_q), bits)
        payload["codes"] = Field(data, bits, count)
    if nq < len(xs):
      if dense:
        payload["raw"] = tuple(Field(x, 32) for x in xs[nq:])
      else:
        data, count = compact(xs[nq:], kept[nq:], min(p.capacity, p.n_r), jnp.float32)
        payload["raw"] = Field(data, 32, count)
    return payload

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)
    return decode_core(payload, like), state  # only like's shapes/dtypes are used

  @jax.jit
  def decode_core(payload, like):
    p = plan(like)
    leaves, treedef = jax.tree.flatten(like)
    nq = p.num_quantized
    if dense:
      kept = [None] * len(p.sizes)
    elif p.list_positions:
      pos = payload["positions"]
      valid = jnp.arange(pos.data.shape[0]) < pos.count
      idx = jnp.where(valid, pos.data.astype(jnp.int32), p.size)
      flat = jnp.zeros((p.size,), bool).at[idx].set(True, mode="drop")
      kept = [flat[o:o + n] for o, n in zip(p.offsets, p.sizes)]
    else:
      kept = [f.data.astype(bool) for f in payload["positions"]]
    side = {k: v.data for k, v in payload.items() if k not in ("positions", "codes", "raw")}

    def gather(field, masks):
      """Per leaf: the compacted values of the kept entries at their places (0 elsewhere)."""
      out, seen = [], jnp.zeros((), jnp.int32)
      cap = field.data.shape[0]
      for m in masks:
        r = jnp.clip(exclusive_rank(m) + seen, 0, max(cap - 1, 0))
        out.append(field.data[r] if cap else jnp.zeros(m.shape, field.data.dtype))
        seen = seen + count_true(m)
      return out

    values = [None] * len(p.sizes)
    if nq:
      codes = ([f.data for f in payload["codes"]] if dense
               else expand_codes(payload["codes"].data, kept[:nq], bits))
      for s, leaf_ids in enumerate(p.segments):
        for j in leaf_ids:
          v = levels(side, s, codes[j].astype(jnp.int32))
          values[j] = v if dense else jnp.where(kept[j], v, 0.0)
    if nq < len(p.sizes):
      raws = ([f.data for f in payload["raw"]] if dense else gather(payload["raw"], kept[nq:]))
      for j, v in zip(range(nq, len(p.sizes)), raws):
        values[j] = v if dense else jnp.where(kept[j], v, 0.0)
    out = [jnp.zeros(np.shape(l), l.dtype) for l in leaves]   # empty leaves stay empty
    for j, i in enumerate(p.order):
      out[i] = cast_saturating(values[j].reshape(np.shape(leaves[i])), leaves[i].dtype)
    return jax.tree.unflatten(treedef, out)

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    like32 = layout.zeros_like_f32(like)  # decode in float32, round to like's dtypes once
    decoded = jax.vmap(lambda q: decode_fn(q, None, None, like32)[0])(payloads)
    return jax.tree.map(lambda d, l: cast_saturating(jnp.tensordot(weights, d, axes=1),
                                                     l.dtype), decoded, like)

  return Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)


# ----------------------------------------------------------------------------- uniform


def _uniform_design(num_levels: int, stochastic: bool) -> DesignFn:
  """Per segment: `lo, hi` = min, max of the coded entries; `c = round((L-1)(x-lo)/(hi-lo))`."""

  def design(segs, key):
    lohi, codes = [], []
    keys = jax.random.split(key, max(sum(len(s.parts) for s in segs), 1))
    k = 0
    for s in segs:
      xs = [v / s.scale for v in s.parts]          # exact, |xs| < 2: ranges never overflow
      lo = jnp.min(jnp.stack([jnp.min(jnp.where(w > 0, v, jnp.inf), initial=jnp.inf)
                              for v, w in zip(xs, s.weights)]))
      hi = jnp.max(jnp.stack([jnp.max(jnp.where(w > 0, v, -jnp.inf), initial=-jnp.inf)
                              for v, w in zip(xs, s.weights)]))
      ok = hi > lo
      none = sum(jnp.sum(w) for w in s.weights) == 0   # nothing coded: a (0, 0) range
      lo, hi = jnp.where(none, 0.0, lo), jnp.where(none, 0.0, hi)  # NaN/Inf input propagates
      inv = (num_levels - 1) / jnp.where(ok, hi - lo, 1.0)
      seg_codes = []
      for v in xs:
        u = (v - lo) * inv
        if stochastic:
          u = jnp.floor(u + jax.random.uniform(keys[k], u.shape))
        else:
          u = jnp.round(u)
        k += 1
        seg_codes.append(jnp.where(ok, jnp.clip(u, 0, num_levels - 1), 0).astype(jnp.int32))
      codes.append(seg_codes)
      lohi.append(jnp.stack([lo, hi]) * s.scale)  # exact: the coded min and max themselves
    data = jnp.stack(lohi) if lohi else jnp.zeros((0, 2), jnp.float32)
    return {"range": Field(data.astype(jnp.float32), 32)}, codes

  return design


def _uniform_levels(num_levels: int) -> LevelsFn:
  def levels(side, s, codes):
    lo, hi = side["range"][s, 0], side["range"][s, 1]
    scale = pow2_scale(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))   # exact; hi - lo cannot overflow
    step = (hi / scale - lo / scale) / (num_levels - 1)
    value = (lo / scale + codes.astype(jnp.float32) * step) * scale
    return jnp.where(codes >= num_levels - 1, hi, value)      # the coded max itself
  return levels


def uniform(bits: int = 2, *, top_fraction: Optional[float] = None, iso_bit: bool = True,
            min_layer_size: int = 1000, per_layer: bool = True,
            stochastic: bool = False) -> Compressor:
  """Uniform min-max scalar quantization at `R` bits per entry (the M22 paper's baseline).

  Per leaf with at least `min_layer_size` entries (pooled over such leaves if
  `per_layer=False`), with `lo, hi` the min and max of its coded entries and `L = 2^R`:
  `c = round((L - 1)(x - lo)/(hi - lo))` in `{0..L-1}`, decoded as `lo + c (hi - lo)/(L - 1)`
  (`stochastic=True`: `c = floor(v + u)`, `u ~ U[0, 1)` from `keys.private`, unbiased given
  `lo, hi`). The official M22 code rounds `2^R (x - lo)/(hi - lo)`, i.e. `2^R + 1` levels
  for `R` bits; we use `2^R` levels so `R` bits are honest. Smaller leaves go raw (float32).

  `top_fraction=None` (default): every entry is coded; bits `R n_q + 64 S + 32 n_r`.
  With `top_fraction = P`: as `m22`, only the `k = ceil(P D / R)` (`iso_bit`; else
  `ceil(P D)`) largest-magnitude entries of the whole model are kept (within 1 % above
  `EXACT_SIZE` entries; exact zeros dropped),
  at `pos + (len + R n_q) + 64 S + (len + 32 n_r)` bits (positions as in `m22`).

  Args:
    bits: `R` in 1..8.
    top_fraction: kept fraction `P` in (0, 1], or None (dense).
    iso_bit: divide `P` by `R` (as M22), so the payload is ~`P D` bits for every `R`.
    min_layer_size: leaves with fewer entries are sent raw.
    per_layer: one `(lo, hi)` per leaf (True) or one for all quantized leaves.
    stochastic: stochastic rounding (unbiased) instead of nearest.

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import Keys, bits as B
  >>> c = uniform(2, min_layer_size=1)
  >>> g = {"w": jnp.array([-1.0, 0.0, 0.2, 0.5, 2.0])}
  >>> keys = Keys(jax.random.key(0), jax.random.key(1))
  >>> payload, _ = c.encode(g, None, keys)
  >>> [round(float(v), 3) for v in c.decode(payload, None, keys, g)[0]["w"]]
  [-1.0, 0.0, 0.0, 1.0, 2.0]
  >>> int(B.count(payload))  # 5 codes of 2 bits + (min, max)
  74
  """
  bits = checks.check_positive_int(bits, "bits")
  if bits > 8:
    raise ValueError(f"bits must be <= 8 (uint8 codes), got {bits}")
  if top_fraction is not None:
    top_fraction = checks.check_fraction(top_fraction, "top_fraction")
  min_layer_size = checks.check_positive_int(min_layer_size, "min_layer_size")
  n = 2**bits
  return scalar_codec(bits=bits, top_fraction=top_fraction, iso_bit=bool(iso_bit),
                      min_layer_size=min_layer_size, per_layer=bool(per_layer),
                      design=_uniform_design(n, bool(stochastic)), levels=_uniform_levels(n),
                      dense=top_fraction is None, random=bool(stochastic))
