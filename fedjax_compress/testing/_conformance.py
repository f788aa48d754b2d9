"""Reusable conformance checks for any `Compressor` (driven by `REGISTRY` in our own tests).

Each `check_*` takes a `Harness` (a compressor, a small test model and cached jitted
wrappers), or anything `harness()` accepts (an `Entry` or a `Compressor`), and raises
`AssertionError` on a violation. Compilation dominates the cost, so every jitted
wrapper is built once per harness and reused across checks.

>>> from fedjax_compress import compressors
>>> from fedjax_compress.testing import check_bits_and_wire, harness
>>> check_bits_and_wire(harness(compressors.sign_sgd()))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_compress import wire
from fedjax_compress._src import bits as _bits
from fedjax_compress._src.adapters import as_transformation, weighted_decode
from fedjax_compress._src.base import Compressor, Field, Keys
from fedjax_compress._src.keys import round_keys
from fedjax_compress.testing._registry import Entry

PyTree = Any

SHAPES = {"w": (8, 6), "b": (6,), "conv": (3, 3, 2, 4)}


def default_params(*, bf16: bool = True) -> dict:
  """Zero test model `{'w': (8, 6), 'b': (6,), 'conv': (3, 3, 2, 4)}`; `b` is bf16 by default."""
  return {k: jnp.zeros(s, jnp.bfloat16 if (bf16 and k == "b") else jnp.float32)
          for k, s in SHAPES.items()}


def random_like(tree: PyTree, seed: int, scale: float = 1.0) -> PyTree:
  """Standard normal values (times `scale`) with `tree`'s structure, shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, np.shape(x), jnp.float32)).astype(x.dtype)
      for k, x in zip(keys, leaves)])


def message_keys(seed: int, round_index: int, client: int = 0) -> Keys:
  """`Keys` of one client's message, as a federated round derives them."""
  keys = round_keys(jax.random.key(seed), round_index, jnp.array([client]))
  return Keys(keys.shared, keys.private[0])


def roundtrip(compressor: Compressor, updates, sender, receiver, keys, params=None):
  """One message: `(decoded, sender', receiver', payload)`."""
  payload, sender = compressor.encode(updates, sender, keys, params)
  decoded, receiver = compressor.decode(payload, receiver, keys, updates)
  return decoded, sender, receiver, payload


def _stack(tree: PyTree, n: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def _index(tree: PyTree, i: int) -> PyTree:
  return jax.tree.map(lambda x: x[i], tree)


def _payload_leaves(payload: PyTree) -> list:
  """Data (and counts) of a payload's fields, in wire order."""
  out = []
  for f in _bits.fields(payload):
    out.append(f.data)
    if f.count is not None:
      out.append(f.count)
  return out


def assert_trees_close(a: PyTree, b: PyTree, *, rtol: float = 1e-5, atol: float = 1e-6,
                       what: str = "") -> None:
  """Same structure; floats close (compared in float32/64), ints and bools equal."""
  la, ta = jax.tree.flatten(a, is_leaf=_bits.is_field)
  lb, tb = jax.tree.flatten(b, is_leaf=_bits.is_field)
  assert ta == tb, f"{what}: tree structures differ: {ta} vs {tb}"
  for x, y in zip(la, lb):
    if isinstance(x, Field):
      assert isinstance(y, Field) and x.width == y.width, f"{what}: field widths differ"
      assert_trees_close(_payload_leaves(x), _payload_leaves(y), rtol=rtol, atol=atol,
                         what=what)
      continue
    if jax.dtypes.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, (
        f"{what}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}")
    if x.dtype == jnp.bfloat16 and rtol > 0:
      # Different but equally valid float32 paths may round to neighbouring bf16 values.
      np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64),
                                 rtol=max(rtol, 2.0**-7), atol=max(atol, 1e-5), err_msg=what)
    elif np.issubdtype(x.dtype, np.inexact) or x.dtype == jnp.bfloat16:
      np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol,
                                 atol=atol, err_msg=what)
    else:
      np.testing.assert_array_equal(x, y, err_msg=what)


def assert_same_avals(a: PyTree, b: PyTree, what: str = "") -> None:
  """Same tree structure and, leaf by leaf, the same shape and dtype."""
  la, ta = jax.tree.flatten(a, is_leaf=_bits.is_field)
  lb, tb = jax.tree.flatten(b, is_leaf=_bits.is_field)
  assert ta == tb, f"{what}: tree structures differ: {ta} vs {tb}"
  for x, y in zip(la, lb):
    if isinstance(x, Field):
      assert isinstance(y, Field) and x.width == y.width, f"{what}: field widths differ"
      assert_same_avals(_payload_leaves(x), _payload_leaves(y), what)
      continue
    assert (jnp.shape(x), jnp.result_type(x)) == (jnp.shape(y), jnp.result_type(y)), (
        f"{what}: {jnp.shape(x)}/{jnp.result_type(x)} vs {jnp.shape(y)}/{jnp.result_type(y)}")


class Harness:
  """A compressor, a test model and jitted wrappers compiled once and reused by the checks."""

  def __init__(self, compressor: Compressor, entry: Optional[Entry] = None, seed: int = 0,
               like: Optional[PyTree] = None):
    self.compressor = compressor
    self.entry = entry
    self.seed = seed
    # One template for every check (a float32 and a bf16 leaf), so each program compiles once.
    self.like = default_params() if like is None else like
    self.params = random_like(self.like, seed + 1000)  # the model the updates are taken at
    self.step = functools.partial(roundtrip, compressor)
    self.step_jit = jax.jit(self.step)

  def updates(self, index: int = 0, scale: float = 1.0) -> PyTree:
    """Random updates number `index`, shaped like `self.like`."""
    return random_like(self.like, self.seed + index, scale)

  def init(self, params: Optional[PyTree] = None):
    return self.compressor.init(self.like if params is None else params)

  @functools.cached_property
  def decode_jit(self) -> Callable:
    return jax.jit(self.compressor.decode)

  @functools.cached_property
  def step_vmap(self) -> Callable:
    """Jitted roundtrip over a leading client axis (shared key and params broadcast)."""
    return jax.jit(jax.vmap(self.step, in_axes=(0, 0, 0, Keys(None, 0), None)))

  @functools.cached_property
  def step_over_keys(self) -> Callable:
    """Jitted decoded messages of one fixed input under a batch of `Keys`."""
    def fn(updates, sender, receiver, keys):
      return jax.vmap(lambda k: self.step(updates, sender, receiver, k, self.params)[0])(keys)
    return jax.jit(fn)

  def run(self, steps: int, *, step_fn: Optional[Callable] = None, zero: bool = False) -> list:
    """`steps` consecutive messages from the initial states: list of roundtrip outputs."""
    step_fn = self.step_jit if step_fn is None else step_fn
    sender, receiver = self.init()
    outs = []
    for t in range(steps):
      g = self.updates(t)
      if zero:
        g = jax.tree.map(jnp.zeros_like, g)
      out = step_fn(g, sender, receiver, message_keys(self.seed, t), self.params)
      _, sender, receiver, _ = out
      outs.append((g,) + tuple(out))
    return outs


_HARNESSES: dict = {}


def harness(obj: Harness | Entry | Compressor) -> Harness:
  """A (cached, for registry entries and compressors) `Harness` for `obj`."""
  if isinstance(obj, Harness):
    return obj
  key = obj.name if isinstance(obj, Entry) else obj
  if key not in _HARNESSES:
    _HARNESSES[key] = (Harness(obj.make(), obj) if isinstance(obj, Entry) else Harness(obj))
  return _HARNESSES[key]


def check_codec(h, transform: Optional[Callable] = None, steps: int = 2) -> None:
  """Under `transform` (e.g. a chex variant): jit-equal results, honest bits, wire round trip."""
  h = harness(h)
  ref = h.run(steps)
  got = ref if transform is None else h.run(steps, step_fn=transform(h.step))
  for t, (r, g) in enumerate(zip(ref, got)):
    assert_trees_close(r, g, rtol=1e-4, atol=1e-5, what=f"step {t} vs jit")
  _, decoded, _, _, payload = got[0]
  check_payload_wire(h, payload, h.init()[1], decoded)  # receiver state before message 0
  for _, _, _, _, payload in got[1:]:
    check_payload_wire(h, payload)


def check_payload_wire(h, payload: PyTree, receiver: Any = None, decoded: Any = None,
                       keys: Optional[Keys] = None) -> None:
  """bits.count == wire.total_bits, len(raw body) == ceil(bits/8), unpack round-trips.

  With `receiver` and `decoded`, also checks that decoding the unpacked bytes (with the
  receiver state the message was decoded with) gives `decoded`: the payload is all
  the receiver needs.
  """
  h = harness(h)
  nbits = int(_bits.count(payload))
  assert nbits == wire.total_bits(payload), (nbits, wire.total_bits(payload))
  data = wire.pack(payload)
  assert len(data) == wire.FRAME_BYTES + math.ceil(nbits / 8), (len(data), nbits)
  assert len(wire.pack(payload, raw=True)) == math.ceil(nbits / 8), nbits
  back = wire.unpack(data, payload)
  assert wire.pack(back) == data
  for f, b in zip(_bits.fields(payload), _bits.fields(back)):
    n = np.size(f.data) if f.count is None else int(f.count)
    np.testing.assert_array_equal(np.asarray(f.data).ravel()[:n],
                                  np.asarray(b.data).ravel()[:n])
  if receiver is not None and decoded is not None:
    keys = message_keys(h.seed, 0) if keys is None else keys
    again, _ = h.decode_jit(back, receiver, keys, decoded)
    assert_trees_close(decoded, again, rtol=1e-5, atol=1e-6, what="decode(unpack(pack))")


def check_bits_and_wire(h) -> None:
  """Wire checks on the first message of the default inputs."""
  h = harness(h)
  (_, decoded, _, _, payload), = h.run(1)
  check_payload_wire(h, payload, h.init()[1], decoded)


def check_max_bits(h, fraction: float) -> None:
  """Bits of every message in 3 steps <= `fraction` * uncompressed bits."""
  h = harness(h)
  for g, _, _, _, payload in h.run(3):
    nbits, dense = wire.total_bits(payload), _bits.dense_bits(g)
    assert nbits <= fraction * dense, f"{nbits} bits > {fraction} * {dense}"


def check_structure_and_dtypes(h) -> None:
  """Decoded matches the input's avals (incl. a bf16 leaf); states keep their avals (3 steps)."""
  h = harness(h)
  s0, r0 = h.init()
  for g, decoded, sender, receiver, payload in h.run(3):
    assert_same_avals(decoded, g, "decoded vs updates")
    assert_same_avals(sender, s0, "sender state")
    assert_same_avals(receiver, r0, "receiver state")
    check_payload_wire(h, payload)


def check_state(h, stateful: Optional[bool] = None) -> None:
  """States keep structure/shape/dtype over 3 steps; they change iff `stateful` (if given)."""
  h = harness(h)
  s0, r0 = h.init()
  changed = False
  for _, _, sender, receiver, _ in h.run(3):
    assert_same_avals(sender, s0, "sender state")
    assert_same_avals(receiver, r0, "receiver state")
    try:
      assert_trees_close((s0, r0), (sender, receiver), rtol=0, atol=0)
    except AssertionError:
      changed = True
  if stateful is not None:
    assert changed == stateful, f"declared stateful={stateful}, state changed: {changed}"


def check_vmap_matches_loop(h, num_clients: int = 5, steps: int = 2) -> None:
  """vmap over a client axis (stacked states, per-client private keys) == a Python loop."""
  h = harness(h)
  s0, r0 = h.init()
  senders, receivers = _stack(s0, num_clients), _stack(r0, num_clients)
  loop_states = [(s0, r0)] * num_clients
  ids = jnp.arange(num_clients)
  for t in range(steps):
    g = jax.tree.map(lambda *xs: jnp.stack(xs),
                     *[h.updates(10 * t + c) for c in range(num_clients)])
    keys = round_keys(jax.random.key(h.seed), t, ids)
    decoded, senders, receivers, payloads = h.step_vmap(g, senders, receivers, keys, h.params)
    per_bits = np.asarray(_bits.count(payloads, batch_dims=1))
    assert wire.total_bits(payloads, batch_dims=1) == int(per_bits.sum())
    for c in range(num_clients):
      out = h.step_jit(_index(g, c), *loop_states[c], Keys(keys.shared, keys.private[c]),
                       h.params)
      loop_states[c] = out[1:3]
      got = (_index(decoded, c), _index(senders, c), _index(receivers, c),
             _index(payloads, c))
      assert_trees_close(out, got, rtol=1e-4, atol=1e-5, what=f"client {c} step {t}")
      assert int(_bits.count(out[3])) == per_bits[c]


def check_unbiased(h, num_samples: int = 2000, sigmas: float = 5.0) -> None:
  """Monte-Carlo `E_keys[decode(encode(g))] == g` within `sigmas` standard errors.

  The standard error of each coordinate's mean comes from the empirical variance of the
  samples; a small relative slack covers float32 rounding of zero-variance coordinates.
  """
  h = harness(h)
  g = h.updates(0)
  s0, r0 = h.init()
  raw = jax.random.split(jax.random.key(h.seed + 7), 2 * num_samples).reshape(num_samples, 2)
  decoded = h.step_over_keys(g, s0, r0, Keys(raw[:, 0], raw[:, 1]))
  x = np.concatenate([np.asarray(l, np.float64).reshape(num_samples, -1)
                      for l in jax.tree.leaves(decoded)], axis=1)
  target = np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree.leaves(g)])
  mean = x.mean(axis=0)
  se = x.std(axis=0, ddof=1) / math.sqrt(num_samples)
  tol = sigmas * se + 1e-5 * np.abs(target) + 1e-7
  # Decoding to a bf16 leaf rounds each sample, which may bias it by half an ulp (2^-9 rel).
  is_bf16 = np.concatenate([np.full(np.size(l), l.dtype == jnp.bfloat16)
                            for l in jax.tree.leaves(g)])
  tol = tol + np.where(is_bf16, 2.0**-8 * np.abs(x).mean(axis=0), 0.0)
  bad = np.abs(mean - target) > tol
  assert not np.any(bad), (
      f"biased at {np.flatnonzero(bad)[:8]}: mean {mean[bad][:4]} vs {target[bad][:4]} "
      f"(tolerance {tol[bad][:4]})")


def check_lossless(h) -> None:
  """`decode(encode(g)) == g` exactly, over 3 steps."""
  h = harness(h)
  for g, decoded, _, _, _ in h.run(3):
    assert_trees_close(decoded, g, rtol=0, atol=0, what="lossless")


def _cohort_payloads(h, num_clients: int):
  """`(r0, keys, payloads)`: one vmapped round of `num_clients` clients from fresh states."""
  s0, r0 = h.init()
  g = jax.tree.map(lambda *xs: jnp.stack(xs), *[h.updates(c_) for c_ in range(num_clients)])
  keys = round_keys(jax.random.key(h.seed), 0, jnp.arange(num_clients))
  _, _, _, payloads = h.step_vmap(g, _stack(s0, num_clients), _stack(r0, num_clients), keys,
                                  h.params)
  return r0, keys, payloads


def check_aggregate(h, num_clients: int = 5, linear: bool = True) -> None:
  """`aggregate` has the decoded avals and, if `linear`, == sum_c w_c decode(payload_c)."""
  h = harness(h)
  c = h.compressor
  if c.aggregate is None:
    return
  r0, keys, payloads = _cohort_payloads(h, num_clients)
  weights = jnp.linspace(0.5, 1.5, num_clients, dtype=jnp.float32) / num_clients
  got = jax.jit(c.aggregate)(payloads, weights, keys, h.like)
  assert_same_avals(got, h.like, "aggregate")
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
  if linear:
    # Reference in float32 (decoding each message to bf16 first would round twice).
    like32 = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), h.like)
    ref, _ = jax.jit(functools.partial(weighted_decode, c._replace(aggregate=None)))(
        payloads, _stack(r0, num_clients), weights, keys, like32)
    ref = jax.tree.map(lambda r, l: r.astype(l.dtype), ref, h.like)
    assert_trees_close(got, ref, rtol=1e-4, atol=1e-5, what="aggregate vs decode sum")


def check_reduce(h, num_clients: int = 5, linear: bool = True) -> None:
  """`reduce` combines over client chunks, decodes to the decoded avals, and (if `linear`)
  `decode(reduce(P, w)) == sum_c w_c decode(P_c)`."""
  h = harness(h)
  c = h.compressor
  if c.reduce is None:
    return
  r0, keys, payloads = _cohort_payloads(h, num_clients)
  weights = jnp.linspace(0.5, 1.5, num_clients, dtype=jnp.float32)
  whole = jax.jit(c.reduce)(payloads, weights)
  split = 2
  part = lambda sl: c.reduce(jax.tree.map(lambda x: x[sl], payloads), weights[sl])  # noqa: E731
  pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), part(slice(0, split)),
                      part(slice(split, None)))
  combined = jax.jit(c.reduce)(pair, jnp.ones((2,), jnp.float32))
  assert jax.tree.structure(whole) == jax.tree.structure(_index(payloads, 0)), "reduce structure"
  assert_trees_close(_payload_leaves(combined), _payload_leaves(whole), rtol=1e-5, atol=1e-5,
                     what="reduce over chunks vs all clients")
  one = Keys(keys.shared, keys.private[0])
  got, _ = jax.jit(c.decode)(whole, r0, one, h.like)
  assert_same_avals(got, h.like, "decode(reduce)")
  if linear:
    like32 = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), h.like)
    ref, _ = jax.jit(functools.partial(weighted_decode, c._replace(reduce=None, aggregate=None)))(
        payloads, _stack(r0, num_clients), weights, keys, like32)
    ref = jax.tree.map(lambda r, l: r.astype(l.dtype), ref, h.like)
    assert_trees_close(got, ref, rtol=1e-4, atol=1e-5, what="decode(reduce) vs decode sum")


def check_zero_input(h, steps: int = 3) -> None:
  """Zero updates give finite decoded values, payloads and states."""
  h = harness(h)
  for _, decoded, sender, receiver, payload in h.run(steps, zero=True):
    for x in jax.tree.leaves((decoded, sender, receiver, _payload_leaves(payload))):
      if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(x))), "non-finite output for a zero input"


def check_rejects_nonfinite(h) -> None:
  """Eager `encode` of updates holding NaN (or Inf) raises `ValueError`."""
  h = harness(h)
  s0, _ = h.init()
  for bad in (jnp.nan, jnp.inf):
    g = h.updates(0)
    g["w"] = g["w"].at[1, 2].set(bad)
    try:
      h.compressor.encode(g, s0, message_keys(h.seed, 0), h.params)
    except ValueError:
      continue
    raise AssertionError(f"encode accepted updates holding {bad}")


# ------------------------------------------------------------------ bad inputs (issue 13)


def _float_leaves(tree: PyTree) -> list:
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def _all_finite(*trees: PyTree) -> bool:
  return all(bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32))))
             for t in trees for x in _float_leaves(t))


def _outputs(decoded: PyTree, payload: PyTree) -> tuple:
  return decoded, _payload_leaves(payload)


def scaled_like(tree: PyTree, seed: int, peak: float) -> PyTree:
  """Random values with `tree`'s avals, each leaf scaled so its largest `|x|` is `peak`."""
  def leaf(x):
    x = np.asarray(x, np.float64)
    m = np.max(np.abs(x)) if x.size else 1.0
    return x / (m if m > 0 else 1.0) * peak
  return jax.tree.map(lambda r, l: jnp.asarray(leaf(r), l.dtype),
                      random_like(jax.tree.map(lambda l: jnp.zeros(np.shape(l), jnp.float32),
                                               tree), seed), tree)


def check_huge_finite(h, peaks: tuple = (1e19, 1e38), steps: int = 2) -> None:
  """Finite inputs as large as `peaks` (max |x| per leaf) give finite outputs.

  Under `jit` (the cached round trip, `steps` messages from the initial states) decoded
  values and payloads must be finite; eagerly, the first message at the largest peak
  must be finite too, or `encode` may raise a `ValueError` that does not blame NaN/Inf.
  """
  h = harness(h)
  for peak in peaks:
    sender, receiver = h.init()
    for t in range(steps):
      g = scaled_like(h.like, h.seed + t, peak)
      decoded, sender, receiver, payload = h.step_jit(g, sender, receiver,
                                                      message_keys(h.seed, t), h.params)
      assert _all_finite(*_outputs(decoded, payload)), (
          f"non-finite output under jit for finite input of peak {peak:g} (message {t})")
  g = scaled_like(h.like, h.seed, max(peaks))
  sender, receiver = h.init()
  try:
    decoded, _, _, payload = h.step(g, sender, receiver, message_keys(h.seed, 0), h.params)
  except ValueError as err:
    assert "nan" not in str(err).lower(), f"finite input rejected as non-finite: {err}"
    return
  assert _all_finite(*_outputs(decoded, payload)), (
      f"non-finite eager output for finite input of peak {max(peaks):g}")


LOW_PRECISION = {"w": jnp.float16, "b": jnp.bfloat16, "conv": jnp.float16}
_LOW: dict = {}


def low_precision_harness(obj: Harness | Entry | Compressor) -> Harness:
  """A (cached) `Harness` of `obj`'s compressor on the test model in float16 / bfloat16."""
  h = harness(obj)
  key = h.entry.name if h.entry is not None else h.compressor
  if key not in _LOW:
    like = {k: jnp.zeros(SHAPES[k], LOW_PRECISION[k]) for k in SHAPES}
    _LOW[key] = Harness(h.compressor, h.entry, h.seed, like=like)
  return _LOW[key]


def check_low_precision(h, peak: float = 6e4, steps: int = 2) -> None:
  """float16 / bfloat16 updates with `max|x| = peak` (inside float16's range) decode finite.

  Decoded values keep the updates' dtypes (under `jit`, `steps` messages).
  """
  lh = low_precision_harness(h)
  sender, receiver = lh.init()
  for t in range(steps):
    g = scaled_like(lh.like, lh.seed + t, peak)
    decoded, sender, receiver, payload = lh.step_jit(g, sender, receiver,
                                                     message_keys(lh.seed, t), lh.params)
    assert_same_avals(decoded, g, "decoded vs low-precision updates")
    assert _all_finite(*_outputs(decoded, payload)), (
        f"non-finite output for float16/bfloat16 input of peak {peak:g} (message {t})")


def check_nonfinite_propagates(h) -> None:
  """Under `jit` (no eager check possible) a NaN, or an Inf, in the input is not turned
  into a finite message: the decoded update holds a NaN or Inf somewhere."""
  h = harness(h)
  for bad in (jnp.nan, jnp.inf):
    sender, receiver = h.init()
    g = h.updates(0)
    g["w"] = g["w"].at[1, 2].set(bad)
    decoded, _, _, _ = h.step_jit(g, sender, receiver, message_keys(h.seed, 0), h.params)
    assert not _all_finite(decoded), f"a {bad} input decoded to finite values under jit"


def _zz(tree: PyTree) -> PyTree:
  """`tree` plus an empty float32 leaf sorting last (`'zz_empty'`, shape (0,))."""
  return {**tree, "zz_empty": jnp.zeros((0,), jnp.float32)}


def check_empty(h) -> None:
  """Empty leaves cost 0 bits and decode to empty leaves; empty trees send 0 bits.

  A `(0,)` leaf added to the test model leaves the bits and the other decoded leaves
  unchanged (one eager message); `{}` and `{'e': float32[0]}` encode to 0 bits and decode
  to themselves.
  """
  h = harness(h)
  c = h.compressor
  keys = message_keys(h.seed, 0)
  g = h.updates(0)
  sender, receiver = h.init()
  ref, _, _, ref_payload = h.step_jit(g, sender, receiver, keys, h.params)
  sender, receiver = c.init(_zz(h.like))
  decoded, _, _, payload = roundtrip(c, _zz(g), sender, receiver, keys, _zz(h.params))
  assert int(_bits.count(payload)) == int(_bits.count(ref_payload)), (
      f"an empty leaf changed the bits: {int(_bits.count(payload))} vs "
      f"{int(_bits.count(ref_payload))}")
  assert jnp.shape(decoded["zz_empty"]) == (0,) and decoded["zz_empty"].dtype == jnp.float32
  assert_trees_close({k: v for k, v in decoded.items() if k != "zz_empty"}, ref,
                     rtol=1e-5, atol=1e-6, what="other leaves with an empty leaf")
  for tree in ({}, {"e": jnp.zeros((0,), jnp.float32)}):
    sender, receiver = c.init(tree)
    decoded, _, _, payload = roundtrip(c, tree, sender, receiver, keys, tree)
    assert int(_bits.count(payload)) == 0, f"{tree}: {int(_bits.count(payload))} bits"
    assert_same_avals(decoded, tree, f"decoded empty tree {tree}")


def bad_templates(like: PyTree) -> dict:
  """Decode templates that do not match `like` (the encoded updates): name -> template."""
  w = like["w"]
  return {
      "transposed": {**like, "w": jnp.zeros(w.shape[::-1], w.dtype)},
      "bigger": {**like, "w": jnp.zeros((w.shape[0] + 1,) + w.shape[1:], w.dtype)},
      "extra_leaf": {**like, "x": jnp.zeros((3,), jnp.float32)},
      "missing_leaf": {k: v for k, v in like.items() if k != "w"},
  }


def check_rejects_bad_template(h) -> None:
  """`decode` raises `ValueError` for every template in `bad_templates` (eagerly)."""
  h = harness(h)
  (_, _, _, _, payload), = h.run(1)
  _, receiver = h.init()
  for name, like in bad_templates(h.like).items():
    try:
      h.compressor.decode(payload, receiver, message_keys(h.seed, 0), like)
    except ValueError:
      continue
    raise AssertionError(f"decode accepted a template that does not match ({name})")


def bad_keys() -> dict:
  """`keys` arguments that are not `Keys` of PRNG keys (built on call: a module-level PRNG key
  would start JAX's backend when `fedjax_compress.testing` is imported)."""
  return {"none": None, "tuple": (jax.random.key(0), jax.random.key(1)), "ints": Keys(0, 1)}


def check_bad_keys(h) -> None:
  """`keys` that are not `Keys` of PRNG keys: `encode`/`decode` succeed (codecs that use no
  randomness) or raise a `ValueError` naming `keys`, never an AttributeError or TypeError."""
  h = harness(h)
  sender, receiver = h.init()
  g = h.updates(0)
  payload, _ = h.compressor.encode(g, sender, message_keys(h.seed, 0), h.params)
  for name, keys in bad_keys().items():
    for side in ("encode", "decode"):
      try:
        if side == "encode":
          h.compressor.encode(g, sender, keys, h.params)
        else:
          h.compressor.decode(payload, receiver, keys, g)
      except ValueError as err:
        assert "keys" in str(err), f"{side} with {name} keys: ValueError not naming keys: {err}"
      except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{side} with {name} keys raised {type(err).__name__}: {err}")


BAD_INPUT_CHECKS = {
    "huge_finite": check_huge_finite,
    "low_precision": check_low_precision,
    "nonfinite_jit": check_nonfinite_propagates,
    "empty": check_empty,
    "bad_template": check_rejects_bad_template,
    "bad_keys": check_bad_keys,
}
"""The registry-driven bad-input checks (tests/test_codec_properties.py runs each on every entry)."""


def check_optax_transformation(h, learning_rate: float = 0.1) -> None:
  """`chain(as_transformation(c), sgd)` under jit, and `jax.grad` through it.

  Checks, over 2 steps: the update is `-lr * decode(encode(g))` (keys derived from the
  `key=` argument as `as_transformation` documents), `last_bits` is the message's exact
  bits, and the gradient of the linear loss `<w, update(g)>` with respect to `g` is
  finite with `g`'s avals (`-lr * w` exactly for lossless compressors). Value and
  gradient come from one compiled program.
  """
  h = harness(h)
  tx = optax.chain(as_transformation(h.compressor, 0), optax.sgd(learning_rate))
  weights = random_like(h.like, h.seed + 55)

  def loss(g, state, key):
    out, state = tx.update(g, state, h.params, key=key)
    value = sum(jnp.vdot(o.astype(jnp.float32), w.astype(jnp.float32))
                for o, w in zip(jax.tree.leaves(out), jax.tree.leaves(weights)))
    return value, (out, state)

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  state = tx.init(h.like)
  sender, receiver = h.init()
  for t in range(2):
    g = h.updates(t)
    key = jax.random.key(100 + t)
    _, shared, private = jax.random.split(key, 3)
    decoded, sender, receiver, payload = h.step_jit(g, sender, receiver,
                                                    Keys(shared, private), h.params)
    (_, (out, state)), grad = value_and_grad(g, state, key)
    expected = jax.tree.map(lambda d: -learning_rate * d, decoded)
    assert_trees_close(out, expected, rtol=1e-5, atol=1e-6, what=f"optax step {t}")
    assert int(state[0].last_bits) == wire.total_bits(payload)
    assert_same_avals(grad, g, "grad")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grad)), (
        "non-finite grad through the codec")
    if h.entry is not None and h.entry.lossless:
      assert_trees_close(grad, jax.tree.map(lambda w: -learning_rate * w, weights),
                         rtol=1e-6, atol=0, what="grad of a lossless codec")


def check_entry(entry: Entry) -> None:
  """Every check that `entry`'s declared properties call for (slow: for one-off use)."""
  h = harness(entry)
  check_codec(h, jax.jit)
  check_vmap_matches_loop(h)
  check_structure_and_dtypes(h)
  check_state(h, entry.stateful)
  if entry.max_bits_fraction is not None:
    check_max_bits(h, entry.max_bits_fraction)
  if entry.unbiased:
    check_unbiased(h)
  if entry.lossless:
    check_lossless(h)
  check_aggregate(h, linear=entry.linear_aggregate)
  check_reduce(h, linear=entry.linear_aggregate)
  check_zero_input(h)
  check_rejects_nonfinite(h)
  check_optax_transformation(h)
