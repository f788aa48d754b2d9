"""Sparsifiers: global top-k and random-k over the whole (raveled) model."""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, Field, stateless_init

MAX_SIZE = 2**32 - 1
"""Largest model the sparsifiers address (uint32 indices)."""


def _resolve_k(k: Optional[int], fraction: Optional[float]) -> tuple[Optional[int], Optional[float]]:
  if (k is None) == (fraction is None):
    raise ValueError("give exactly one of k (count) or fraction (of the model size)")
  if k is not None:
    return checks.check_positive_int(k, "k"), None
  return None, checks.check_fraction(fraction, "fraction")


def _static_k(k: Optional[int], fraction: Optional[float], size: int) -> int:
  """Number of kept coordinates for a vector of `size` elements (shape-static; 0 if empty)."""
  if size > MAX_SIZE:
    raise ValueError(f"at most 2^32 - 1 parameters (uint32 indices), got {size}")
  if size == 0:
    return 0
  if k is None:
    return max(1, math.ceil(fraction * size))
  if k > size:
    raise ValueError(f"k={k} exceeds the number of parameters {size}")
  return k


def _scatter_sum(values: jax.Array, indices: jax.Array, size: int) -> jax.Array:
  return jnp.zeros((size,), jnp.float32).at[indices.reshape(-1)].add(
      values.reshape(-1).astype(jnp.float32), mode="drop")


def magnitude_keys(vec: jax.Array) -> jax.Array:
  """int32 sort keys of `|vec|`: the float32 bits without the sign bit.

  For non-negative floats the bit pattern orders like the value, so keys order `|v|`
  exactly, with `-0 == +0`, `+-inf` above every finite value and NaN above inf.
  """
  bits = jax.lax.bitcast_convert_type(vec.astype(jnp.float32), jnp.int32)
  return bits & jnp.int32(0x7FFFFFFF)


SAMPLE = 1 << 15
"""Sample size of `top_indices`' threshold estimate (`n // 4` for vectors below `4 * SAMPLE`)."""
SMALL = 1 << 10
"""Below this many elements `top_indices` calls `lax.top_k`."""
_ROW = 32  # row length of the candidate compaction (one uint32 bit mask per row)


def top_indices(vec: jax.Array, k: int, *, sample: int = SAMPLE) -> jax.Array:
  """uint32 indices, in increasing order, of the `k` largest `|vec|` (ties: lowest index).

  Vectors below `SMALL` elements or `k > D/4` use `lax.top_k`; otherwise
  `_threshold_select` (exact, same result) with a sample of `min(sample, D/4)` keys.
  XLA:CPU's `lax.top_k` is slow at every size: 2.6 ms at D = 14,210 (k = 142) against
  0.2-0.3 ms, and hundreds of memory passes at D = 10M.
  """
  return top_indices_of([vec], k, sample=sample)


def top_indices_of(parts: list[jax.Array], k: int, *, sample: int = SAMPLE) -> jax.Array:
  """`top_indices(concatenate(parts), k)` without concatenating the 1-D `parts`.

  Indices address the concatenation; each part is read in place (a model's leaves).
  """
  if k == 0:
    return jnp.zeros((0,), jnp.uint32)
  parts = [p for p in parts if int(p.shape[0])]
  n = sum(int(p.shape[0]) for p in parts)
  if n < SMALL or 4 * k > n:
    keys = magnitude_keys(parts[0] if len(parts) == 1 else jnp.concatenate(parts))
    _, idx = jax.lax.top_k(keys, k)  # lax.top_k: equal keys lower index first
    return jnp.sort(idx.astype(jnp.uint32))
  return _threshold_select(parts, k, min(sample, max(SMALL // 4, n // 4)))


def _excl_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _popcount(w: jax.Array) -> jax.Array:
  return jax.lax.population_count(w).astype(jnp.int32)


def _select_bit(word: jax.Array, q: jax.Array) -> jax.Array:
  """uint32 position of the `q`-th (0-based) set bit of uint32 `word` (`q < popcount`)."""
  pos = jnp.zeros(jnp.shape(word), jnp.uint32)
  q = q.astype(jnp.int32)
  for width in (16, 8, 4, 2, 1):  # binary search: is the bit above the low `width` bits?
    low = _popcount(word & jnp.uint32((1 << width) - 1))
    up = q >= low
    q = jnp.where(up, q - low, q)
    word = jnp.where(up, word >> width, word)
    pos = pos + jnp.where(up, jnp.uint32(width), jnp.uint32(0))
  return pos


def _lowest_bits(word: jax.Array, count: jax.Array) -> jax.Array:
  """The lowest `count` set bits of uint32 `word` (all of them if it has fewer)."""
  pc = _popcount(word)
  below = jnp.uint32(1) << _select_bit(word, jnp.clip(count, 0, jnp.maximum(pc - 1, 0)))
  return jnp.where(count >= pc, word, word & (below - 1))


def _row_masks(parts: list[jax.Array], preds) -> list[jax.Array]:
  """Per row of `_ROW` keys (each part cut into whole rows), the bit mask of each predicate.

  `preds`: functions `int32 keys -> bool`. One fused read of the parts (the keys are
  computed on the fly; all predicates packed by one reduction, so XLA reads each part
  once, not once per predicate); a part's short last row is padded with key -1.
  uint32 `[rows]` per predicate.
  """
  npred = len(preds)

  def pack(bits):  # bool [rows, P, 32] -> uint32 [rows, P]; bytes first (a fast reduce on CPU)
    lanes = jax.lax.iota(jnp.uint32, 8)[None, None, None, :]
    b = jnp.sum(bits.astype(jnp.uint32).reshape(bits.shape[0], npred, 4, 8) << lanes, axis=3,
                dtype=jnp.uint32)
    return jnp.sum(b << (8 * jax.lax.iota(jnp.uint32, 4))[None, None, :], axis=2,
                   dtype=jnp.uint32)

  out = []
  for p in parts:  # whole rows read in place (no padded copy of the part)
    n = int(p.shape[0])
    full = n // _ROW
    pieces = [magnitude_keys(p[:full * _ROW]).reshape(full, _ROW)] if full else []
    if n > full * _ROW:
      tail = jnp.pad(magnitude_keys(p[full * _ROW:]), (0, (full + 1) * _ROW - n),
                     constant_values=-1)
      pieces.append(tail.reshape(1, _ROW))
    for kp in pieces:
      out.append(pack(jnp.stack([pred(kp) for pred in preds], axis=1)))
  words = out[0] if len(out) == 1 else jnp.concatenate(out)
  return [words[:, i] for i in range(npred)]


def _set_bits(words: jax.Array, sizes: list[int], cap: int) -> tuple[jax.Array, jax.Array]:
  """uint32 indices (into the concatenated parts) of the first `cap` set bits, in order; valid.

  Slot `j` finds its row by a search of the running popcounts and its lane as the `q`-th
  set bit of the row's word: no row of keys is gathered. Invalid slots hold `sum(sizes)`.
  """
  cnt = _popcount(words)
  rows = int(cnt.shape[0])
  off = jnp.cumsum(cnt)
  j = jax.lax.iota(jnp.int32, cap)
  row = jnp.minimum(jnp.searchsorted(off, j, side="right"), rows - 1).astype(jnp.int32)
  lane = _select_bit(words[row], j - (off[row] - cnt[row]))  # q: rank of slot j in its row
  # Row -> (part, row in part) -> index in the concatenation (static part boundaries).
  part_rows = [-(-n // _ROW) for n in sizes]
  row_start = np.cumsum([0] + part_rows[:-1])
  elem_start = np.cumsum([0] + sizes[:-1])
  base = jnp.zeros((cap,), jnp.uint32)
  for rs, es in zip(row_start[1:], elem_start[1:]):  # rows past each boundary shift on
    base = jnp.where(row >= int(rs), jnp.uint32((int(es) - int(rs) * _ROW) % 2**32), base)
  idx = base + row.astype(jnp.uint32) * jnp.uint32(_ROW) + lane
  valid = j < off[-1]
  return jnp.where(valid, idx, jnp.uint32(sum(sizes))), valid


def _sample_keys(parts: list[jax.Array], sample: int) -> jax.Array:
  """Sorted keys at the strided positions `i (D // sample)`, `i < sample`."""
  n = sum(int(p.shape[0]) for p in parts)
  idx = jnp.asarray(np.arange(sample, dtype=np.int64) * (n // sample), jnp.uint32)
  return jnp.sort(magnitude_keys(layout.take(parts, idx)))


def _threshold_select(parts: list[jax.Array], k: int, sample: int) -> jax.Array:
  """Exact top-`k` of `magnitude_keys(concatenate(parts))` (ties: lowest index), no sort of D.

  1. A threshold `t` from a strided sample of `sample` keys, set a few standard deviations
     below the sample's top-`k D/sample` quantile.
  2. One fused pass builds, per row of `_ROW` keys (rows never straddle two parts), the bit
     masks of `key > t` and `key == t`; their popcounts `G_r`, `E_r`. `t` is valid when
     `G + E >= k` (all of the top `k` are `>= t`) and `G <= cap` (static
     `cap ~ k + 2 margin`); otherwise `t` is bisected over the key range (a `while_loop`,
     one pass per step, normally no step; `t = T`, the `k`-th largest key, is always
     valid, so it terminates within 31 steps).
  3. The `m = min(G + E, cap)` candidates (`key > t`, then the lowest-index ties) are
     compacted in index order from the row counts: output slot `j` finds its row by a
     search of the running counts and its lane as the `q`-th set bit of the row's mask
     (no row is gathered; one key per slot is read back from the parts).
  4. The `k`-th largest candidate `T` and the lowest-index ties at `T` give the result.
  """
  sizes = [int(p.shape[0]) for p in parts]
  n = sum(sizes)
  stride = n // sample
  r = k * sample / n
  margin = 4.0 * math.sqrt(r) + 8.0
  rank = min(sample - 1, math.ceil(r + margin))
  cap = min(n, k + math.ceil(2.0 * margin * stride) + 64)
  t0 = _sample_keys(parts, sample)[sample - 1 - rank]

  def bad(c):
    _, _, t, gw, ew = c
    g = jnp.sum(_popcount(gw))
    return (g + jnp.sum(_popcount(ew)) < k) | (g > cap)

  def step(c):
    lo, hi, t, gw, ew = c
    few = jnp.sum(_popcount(gw)) + jnp.sum(_popcount(ew)) < k  # t above T: lower it
    lo, hi = jnp.where(few, lo, t + 1), jnp.where(few, t - 1, hi)
    t = lo + (hi - lo) // 2
    return (lo, hi, t) + masks(t)

  def masks(t):
    return tuple(_row_masks(parts, [lambda kp: kp > t, lambda kp: kp == t]))

  init = (jnp.int32(0), jnp.int32(0x7FFFFFFF), t0) + masks(t0)
  # The loop sits in a cond so XLA's loop-invariant hoisting (keys of D materialised as
  # loop state) costs only when a bisection step is needed.
  _, _, t, gw, ew = jax.lax.cond(bad(init), lambda c: jax.lax.while_loop(bad, step, c),
                                 lambda c: c, init)

  gt, eq = _popcount(gw), _popcount(ew)
  g = jnp.sum(gt)
  m = jnp.minimum(g + jnp.sum(eq), cap)
  take_eq = jax.lax.cond(  # ties taken per row, lowest first (all of them, usually)
      m - g >= jnp.sum(eq), lambda: eq, lambda: jnp.clip(m - g - _excl_cumsum(eq), 0, eq))
  cidx, valid = _set_bits(gw | _lowest_bits(ew, take_eq), sizes, cap)
  ckey = jnp.where(valid, magnitude_keys(layout.take(parts, cidx)), -1)

  big = jnp.sort(ckey)[cap - k]  # the k-th largest key
  gt2 = ckey > big
  eq2 = ckey == big
  final = gt2 | (eq2 & (_excl_cumsum(eq2.astype(jnp.int32)) < k - jnp.sum(gt2)))
  (slots,) = jnp.nonzero(final, size=k, fill_value=0)
  return cidx[slots]


def top_k(k: Optional[int] = None, *, fraction: Optional[float] = None) -> Compressor:
  """Global top-k by magnitude: send `k` float32 values and their `ceil(log2 D)`-bit indices.

  Keeps the `k` largest `|g_i|`; ties go to the lowest index. NaN counts as larger than
  any number (so a NaN under `jit` is sent and propagates) and `+-inf` as larger than any
  finite value. Indices are sent in increasing order. With `fraction`,
  `k = ceil(fraction D)`; an empty model sends nothing. Biased; pair with `error_feedback`.
  Bits: `k * (32 + ceil(log2 D))`.

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.top_k(2)
  >>> g = {'w': jnp.array([0.5, -3.0, 3.0, 1.0, -3.0])}
  >>> keys = Keys(jax.random.key(0), jax.random.key(1))
  >>> p, _ = c.encode(g, None, keys)
  >>> c.decode(p, None, keys, g)[0]['w'].tolist(), int(bits.count(p))
  ([0.0, -3.0, 3.0, 0.0, 0.0], 70)
  """
  k, fraction = _resolve_k(k, fraction)

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)
    parts = layout.flat_leaves(updates)  # the pieces of ravel(updates), read in place
    size = sum(int(x.shape[0]) for x in parts)
    idx = top_indices_of(parts, _static_k(k, fraction, size))
    payload = {"values": Field(layout.take(parts, idx), 32),
               "indices": Field(idx, _bits.index_bits(size))}
    return layout.stamp(payload, updates), state

  def decode_coords(payload, keys, size):
    return payload["indices"].data, payload["values"].data

  def aggregate_coords(payloads, weights, keys, size):
    return payloads["indices"].data, payloads["values"].data * weights[:, None]

  def exact_support(payload, keys, x):
    return top_k_support(payload["indices"].data, payload["values"].data, x)

  return _global_sparse(encode_fn, decode_coords, aggregate_coords, increasing=True,
                        exact_support=exact_support)


def top_k_support(idx: jax.Array, values: jax.Array, x: Any) -> Any:
  """bool pytree shaped like `x`: where `ravel(x)`'s exact top-`k` (lowest-index ties) are.

  `idx`, `values`: that selection (`values = ravel(x)[idx]`, float32). With keys
  `q = magnitude_keys`, `b = min q(values)` and `l` the largest sent index with `q = b`,
  an exact top-`k` with lowest-index ties is `{i: q_i > b} | {i: q_i = b, i <= l}`; the
  mask is that elementwise predicate (no scatter), so it fuses into one pass over `x`.
  """
  leaves, treedef = jax.tree.flatten(x)
  if int(np.shape(idx)[0]) == 0:
    return jax.tree.unflatten(treedef, [jnp.zeros(np.shape(l), bool) for l in leaves])
  kv = magnitude_keys(values)
  big = jnp.min(kv)
  last = jnp.max(jnp.where(kv == big, idx.astype(jnp.uint32), jnp.uint32(0)))
  out = []
  for leaf, o in zip(leaves, layout.leaf_offsets(leaves)):
    shape = np.shape(leaf)
    q = magnitude_keys(jnp.ravel(leaf))
    gi = jax.lax.iota(jnp.uint32, int(q.shape[0])) + jnp.uint32(o)
    out.append(((q > big) | ((q == big) & (gi <= last))).reshape(shape))
  return jax.tree.unflatten(treedef, out)


def _global_sparse(encode_fn, decode_coords, aggregate_coords,
                   increasing: bool = False, exact_support=None) -> Compressor:
  """Stateless whole-model sparse codec from its encoder and the `(indices, values)` to add.

  `decode_coords(payload, keys, D)` and `aggregate_coords(payloads, weights, keys, D)`
  (batched payloads, values already weighted) give global indices into `ravel(like)` and
  float32 values. As `flattened` (payloads stamped by `encode_fn`, `like` checked, decoded
  in float32 and cast leaf by leaf with `checks.cast_finite`) but without raveling: the
  values are added into the leaves in place (`layout.scatter_add`, one write of D).

  `decode_coords` must give distinct indices (`increasing`: static, also sorted).
  `decode.sparse_coords(payload, keys, like)` returns `(indices, values, increasing)`
  (after the `like` check), so that `error_feedback` can form `e' = x - decode(...)` as
  `x` with `k` entries changed, not a dense decode. With `exact_support(payload, keys, x)`
  (unstamped payload; a bool pytree shaped like `x`, where `decode` gives `x` exactly, zero
  elsewhere), `decode.exact_support(payload, keys, x)` is exposed too: `e' = where(m, x - x,
  x)` is then one elementwise pass that fuses with `x = g + e` (no scatter into `x`).
  """

  def cast(like, tree32):
    return jax.tree.map(lambda v, l: checks.cast_finite(v, jnp.result_type(l)), tree32, like)

  def decode_fn(payload, state, keys, like):
    payload = layout.unstamp(payload, like)
    idx, vals = decode_coords(payload, keys, layout.num_params(like))
    return cast(like, layout.scatter_add(like, idx, vals)), state

  def aggregate_fn(payloads, weights, keys, like):
    payloads = layout.unstamp(payloads, like)
    idx, vals = aggregate_coords(payloads, weights, keys, layout.num_params(like))
    return cast(like, layout.scatter_add(like, idx, vals))

  def sparse_coords(payload, keys, like):
    """`(idx, vals, increasing)`: `decode(payload, s, keys, like)` is `(cast(like, scatter_add(like, idx, vals)), s)`."""
    payload = layout.unstamp(payload, like)
    return decode_coords(payload, keys, layout.num_params(like)) + (increasing,)

  decode_fn.sparse_coords = sparse_coords  # read by `error_feedback` (sparse residual update)
  if exact_support is not None:
    def support(payload, keys, x):
      """bool pytree shaped like `x`: where `decode(payload, ., keys, x)` equals `x` (0 elsewhere)."""
      return exact_support(layout.unstamp(payload, x), keys, x)
    decode_fn.exact_support = support  # read by `error_feedback` (dense residual, no scatter)
  return Compressor(stateless_init, encode_fn, decode_fn, aggregate_fn)


def strata(size: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Static `(start, length)` of the `k` strata of `random_k(sampling='stratified')`.

  `q, r = divmod(size, k)`: the first `r` strata hold `q + 1` coordinates, the others `q`.
  Returned as int64 NumPy arrays (for references); the codec computes them in-graph.
  """
  q, r = divmod(size, k)
  j = np.arange(k, dtype=np.int64)
  return j * q + np.minimum(j, r), q + (j < r)


def random_k(k: Optional[int] = None, *, fraction: Optional[float] = None,
             shared_mask: bool = False, unbiased: bool = True,
             sampling: str = "stratified") -> Compressor:
  """Random-k: `k` distinct coordinates drawn from the message keys; only their values are sent.

  The coordinates come from `keys.private` (or `keys.shared` with `shared_mask=True`, the
  same coordinates for all clients), which the receiver derives too, so only the `k`
  float32 values are sent: bits = `32 k`.

  `sampling='stratified'` (default, `O(k)` work): the `D` coordinates are cut into `k`
  contiguous strata of `q = floor(D/k)` or `q + 1` coordinates (`strata`) and one coordinate
  is drawn uniformly in each. Coordinate `i` of stratum `j` (length `n_j`) is kept with
  probability `1/n_j` (`k/D` when `k` divides `D`), and with `unbiased=True` its value is
  scaled by `n_j`, so `E[decode(encode(g))] = g`. Unlike a uniform `k`-subset, two
  coordinates of one stratum are never both kept. `sampling='uniform'`: a uniform
  `k`-subset (`jax.random.choice` without replacement, a full sort of `D` keys), scaled by
  `D/k`.

  Under `jit`, a NaN/Inf anywhere in the input makes every sent value NaN (it propagates
  even when its coordinate is not drawn). Decoded values saturate at float32's range.
  """
  k, fraction = _resolve_k(k, fraction)
  if sampling not in ("stratified", "uniform"):
    raise ValueError(f"sampling must be 'stratified' or 'uniform', got {sampling!r}")
  for name, flag in (("shared_mask", shared_mask), ("unbiased", unbiased)):
    if not isinstance(flag, bool):
      raise ValueError(f"{name} must be a bool, got {flag!r}")

  def _indices(key, size):
    """(uint32 indices, float32 unbiasing scale per index) for a vector of `size`."""
    kk = _static_k(k, fraction, size)
    if kk == 0:
      return jnp.zeros((0,), jnp.uint32), jnp.zeros((0,), jnp.float32)
    if sampling == "uniform":
      idx = jax.random.choice(key, size, (kk,), replace=False).astype(jnp.uint32)
      return idx, jnp.full((kk,), size / kk if unbiased else 1.0, jnp.float32)
    q, r = divmod(size, kk)
    j = jax.lax.iota(jnp.uint32, kk)
    length = jnp.uint32(q) + (j < r).astype(jnp.uint32)
    start = j * jnp.uint32(q) + jnp.minimum(j, jnp.uint32(r))
    offset = jnp.floor(jax.random.uniform(key, (kk,)) * length.astype(jnp.float32))
    idx = start + jnp.minimum(offset.astype(jnp.uint32), length - 1)
    return idx, (length.astype(jnp.float32) if unbiased else jnp.ones((kk,), jnp.float32))

  def _key(keys):
    checks.check_keys(keys)
    return keys.shared if shared_mask else keys.private

  def encode_fn(updates, state, keys, params=None):
    del params
    checks.check_finite(updates)
    parts = layout.flat_leaves(updates)
    idx, _ = _indices(_key(keys), sum(int(x.shape[0]) for x in parts))
    poison = jnp.where(layout.all_finite(parts), 0.0, jnp.nan)
    payload = {"values": Field(layout.take(parts, idx) + poison, 32)}
    return layout.stamp(payload, updates), state

  def decode_coords(payload, keys, size):
    idx, scale = _indices(_key(keys), size)
    vals = payload["values"].data
    return idx, checks.saturate(vals * scale, jnp.isfinite(vals))

  def aggregate_coords(payloads, weights, keys, size):
    vals = payloads["values"].data
    if shared_mask:
      idx, scale = _indices(_key(keys), size)
      vals = jnp.tensordot(weights, vals, axes=1)
    else:
      checks.check_keys(keys)
      idx, scale = jax.vmap(lambda kk: _indices(kk, size))(keys.private)
      vals = vals * weights[:, None]
    return idx, checks.saturate(vals * scale, jnp.isfinite(vals))

  return _global_sparse(encode_fn, decode_coords, aggregate_coords,
                        increasing=sampling == "stratified")  # one index per stratum, in order
