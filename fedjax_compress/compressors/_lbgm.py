"""LBGM: look-back gradient multiplier (Azam et al., ICLR 2022) as a wrapper over any compressor."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src import keys as _keys
from fedjax_compress._src import layout
from fedjax_compress._src.base import Compressor, Field, Keys


class LBGMSenderState(NamedTuple):
  """Client side of `lbgm`, one entry per unit (tensor, or the whole model).

  `inner`/`mirror`: the inner compressor's sender state and the client's copy of its
  receiver state (to decode its own message); `lbg`: float32 look-back gradients;
  `has_lbg`: bool[units], False until the first full send.
  """

  inner: tuple
  mirror: tuple
  lbg: tuple
  has_lbg: jax.Array


class LBGMReceiverState(NamedTuple):
  """Server side of `lbgm` for one client: inner receiver states and the server's LBG copy."""

  inner: tuple
  lbg: tuple
  has_lbg: jax.Array


def _select(pred: jax.Array, new: Any, old: Any) -> Any:
  """Leafwise `where(pred, new, old)` over two pytrees of the same structure."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _gate(payload: Any, full: jax.Array) -> Any:
  """Make every inner field variable-length: all its elements when `full`, none otherwise.

  Empty fields stay as they are (0 bits, no length header).
  """

  def gate(f: Field) -> Field:
    if not np.size(f.data):
      return f
    n = f.data.size if f.count is None else f.count
    return f.replace(data=jnp.where(full, f.data, jnp.zeros_like(f.data)),
                     count=jnp.where(full, jnp.asarray(n, jnp.int32), jnp.int32(0)))

  return jax.tree.map(gate, payload, is_leaf=_bits.is_field)


def _stack_flags(flags: list) -> jax.Array:
  """`bool[units]` from per-unit flags (`bool[0]` for a model without units)."""
  return jnp.stack(flags) if flags else jnp.zeros((0,), bool)


def projection(g: Any, b: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Look-back coefficient and phase error of `g` on `b` (pytrees): `(rho, sin^2, ||b|| > 0)`.

  `rho = <g,b>/||b||^2`, `sin^2 = 1 - <g,b>^2/(||g||^2 ||b||^2)` clamped to [0, 1];
  `sin^2 = 0` when `g = 0` (then `rho = 0` reconstructs `g` exactly). All in float32, on
  `g / max|g|` and `b / max|b|` (so no finite input overflows the squared norms); `rho` is
  inf when `||g|| / ||b||` exceeds float32's range.
  """
  gl = [x.astype(jnp.float32).ravel() for x in jax.tree.leaves(g)]
  bl = [x.astype(jnp.float32).ravel() for x in jax.tree.leaves(b)]

  def unit(xs):
    m = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x), initial=0.0) for x in xs],
                         jnp.float32(0.0))
    safe = jnp.where(m > 0, m, 1.0)
    return [checks.ratio(x, safe) for x in xs], safe

  gl, sg = unit(gl)
  bl, sb = unit(bl)
  gb = sum((jnp.vdot(x, y) for x, y in zip(gl, bl)), jnp.float32(0.0))
  gg = sum((jnp.vdot(x, x) for x in gl), jnp.float32(0.0))
  bb = sum((jnp.vdot(y, y) for y in bl), jnp.float32(0.0))
  valid = bb > 0
  rho = gb / jnp.where(valid, bb, 1.0) * checks.ratio(sg, sb)
  denom = jnp.sqrt(gg) * jnp.sqrt(bb)
  cos = gb / jnp.where(denom > 0, denom, 1.0)
  err = jnp.where(gg > 0, jnp.clip(1.0 - cos * cos, 0.0, 1.0), 0.0)
  return rho, err, valid


def lbgm(inner: Compressor, threshold: Optional[float], *, per_tensor: bool = True) -> Compressor:
  """LBGM over `inner`: per unit, send `rho` when the compressed update is near its look-back gradient.

  Per unit (each tensor with `per_tensor=True`, else the whole model) the client runs
  `inner` on the unit, decodes its own message to `g` (what the server would get) and,
  with `b` its look-back gradient (LBG, the last `g` sent in full):
  `rho = <g,b>/||b||^2`, `err = sin^2(g,b) = 1 - cos^2`. If a non-zero LBG exists and
  `err <= threshold` only `rho` is sent and the server uses `rho * b` (LBGs unchanged);
  otherwise the inner message is sent and both sides set `b <- g`. First messages and
  zero-norm LBGs are always full (spec 3.8). The inner compressor runs per tensor in
  `per_tensor` mode (keys folded with the tensor index), as the official code does for
  top-k; its states only advance on full sends.

  Bits per unit: `1 + 32 + H` on scalar rounds and `1 + bits_inner + H` on full rounds,
  where the 1 is the length header of `rho` (the scalar/full flag) and
  `H = sum over inner fields of length_bits(field size)` their headers (the wire format's
  flags; spec 3.5 counts a single flag bit). `threshold` None or 0 returns `inner`
  itself (never recycle; exactly the wrapped compressor, no flag bits).
  Error feedback goes outside: `error_feedback(lbgm(top_k(fraction=0.1), 0.4))` keeps
  `e' = (g + e) - transmitted` (spec 3.4, without the official code's double residual).

  Reference: Azam, Hosseinalipour, Qiu, Brinton, "Recycling Model Updates in Federated
  Learning: Are Gradient Subspaces Low-Rank?", ICLR 2022; rule of `shams-sam/FedOptim`.

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.lbgm(compressors.identity(), 0.2)
  >>> keys = Keys(jax.random.key(0), jax.random.key(1))
  >>> g = {'w': jnp.arange(1., 5.)}
  >>> s, r = c.init(g)
  >>> p, s = c.encode(g, s, keys)
  >>> int(bits.count(p))  # full: 1 flag + 4 x 32 + 3-bit header of the 4-element field
  132
  >>> p, s = c.encode({'w': -2 * g['w']}, s, keys)
  >>> int(bits.count(p))  # scalar: rho = -2
  36
  """
  checks.check_compressor(inner, "lbgm: inner")
  if not isinstance(per_tensor, bool):
    raise ValueError(f"per_tensor must be a bool, got {per_tensor!r}")
  if threshold is not None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)):
      raise ValueError(f"threshold must be a finite number >= 0 or None, got {threshold!r}")
    threshold = float(threshold)
    if not threshold >= 0 or math.isinf(threshold):
      raise ValueError(f"threshold must be a finite number >= 0 or None, got {threshold}")
  if not threshold:
    # delta = 0 would recycle only exactly collinear tensors (every 1-element tensor, up
    # to rounding); we never recycle so that threshold 0 is exactly the inner compressor.
    return inner
  delta = threshold

  def units(tree: Any) -> list:
    return jax.tree.leaves(tree) if per_tensor else [tree]

  def rebuild(like: Any, parts: list) -> Any:
    return jax.tree.unflatten(jax.tree.structure(like), parts) if per_tensor else parts[0]

  def unit_keys(keys: Optional[Keys], i: int) -> Optional[Keys]:
    if keys is not None:
      checks.check_keys(keys, "lbgm: keys (Keys, or None for an inner codec without randomness)")
    return _keys.fold_keys(keys, i) if per_tensor else keys

  def empty(unit: Any) -> bool:
    """Units without elements send nothing (0 bits) and decode to themselves."""
    return not any(np.size(x) for x in jax.tree.leaves(unit))

  def init_fn(params):
    ps = units(params)
    pairs = [inner.init(p) for p in ps]
    lbg = tuple(layout.zeros_like_f32(p) for p in ps)
    has = jnp.zeros((len(ps),), bool)
    senders = tuple(s for s, _ in pairs)
    receivers = tuple(r for _, r in pairs)
    return LBGMSenderState(senders, receivers, lbg, has), LBGMReceiverState(receivers, lbg, has)

  def encode_fn(updates, state, keys, params=None):
    us = units(updates)
    ps = [None] * len(us) if params is None else units(params)
    msgs, senders, mirrors, lbgs, has = [], [], [], [], []
    for i, (u, p) in enumerate(zip(us, ps)):
      k = unit_keys(keys, i)
      if empty(u):
        msgs.append({"rho": Field(jnp.zeros((0,), jnp.float32), 32), "inner": {}})
        senders.append(state.inner[i])
        mirrors.append(state.mirror[i])
        lbgs.append(state.lbg[i])
        has.append(state.has_lbg[i])
        continue
      payload, sender = inner.encode(u, state.inner[i], k, p)
      decoded, mirror = inner.decode(payload, state.mirror[i], k, u)
      g = jax.tree.map(lambda x: x.astype(jnp.float32), decoded)
      rho, err, nonzero = projection(g, state.lbg[i])
      scalar = state.has_lbg[i] & nonzero & (err <= delta) & jnp.isfinite(rho)
      full = ~scalar
      msgs.append({"rho": Field(jnp.where(scalar, rho, 0.0).reshape(1), 32,
                                scalar.astype(jnp.int32)),
                   "inner": _gate(payload, full)})
      senders.append(_select(full, sender, state.inner[i]))
      mirrors.append(_select(full, mirror, state.mirror[i]))
      lbgs.append(_select(full, g, state.lbg[i]))
      has.append(state.has_lbg[i] | full)
    return layout.stamp(tuple(msgs), updates), LBGMSenderState(
        tuple(senders), tuple(mirrors), tuple(lbgs), _stack_flags(has))

  def decode_fn(payload, state, keys, like):
    payload = layout.unstamp(payload, like)
    ls = units(like)
    outs, receivers, lbgs, has = [], [], [], []
    for i, l in enumerate(ls):
      msg = payload[i]
      if empty(l):
        unit_keys(keys, i)
        outs.append(jax.tree.map(lambda t: jnp.zeros(np.shape(t), t.dtype), l))
        receivers.append(state.inner[i])
        lbgs.append(state.lbg[i])
        has.append(state.has_lbg[i])
        continue
      scalar = msg["rho"].count > 0
      full = ~scalar
      decoded, receiver = inner.decode(msg["inner"], state.inner[i], unit_keys(keys, i), l)
      g = jax.tree.map(lambda x: x.astype(jnp.float32), decoded)
      rho = msg["rho"].data[0]
      outs.append(jax.tree.map(
          lambda b, x, t: checks.cast_finite(
              jnp.where(scalar, checks.saturate(rho * b, jnp.isfinite(b)), x), t.dtype),
          state.lbg[i], g, l))
      receivers.append(_select(full, receiver, state.inner[i]))
      lbgs.append(_select(full, g, state.lbg[i]))
      has.append(state.has_lbg[i] | full)
    return rebuild(like, outs), LBGMReceiverState(tuple(receivers), tuple(lbgs), _stack_flags(has))

  return Compressor(init_fn, encode_fn, decode_fn, None)


__all__ = ["lbgm", "LBGMSenderState", "LBGMReceiverState", "projection"]
