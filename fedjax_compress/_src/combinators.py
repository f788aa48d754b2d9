"""Compressor combinators: error feedback and whole-model flattening."""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor


class ErrorFeedbackState(NamedTuple):
  """Sender state of `error_feedback`: inner sender state, residual, mirror of the receiver."""

  inner: Any
  residual: Any
  mirror: Any


def error_feedback(inner: Compressor) -> Compressor:
  """Error feedback (EF-SGD): compress `x = g + e`, keep `e' = x - decode(encode(x))`.

  Telescoping invariant: `sum_t decoded_t + e_T = sum_t g_t`. The sender decodes its own
  message with a mirror of the receiver state, so any deterministic receiver works.
  The receiver side (and `aggregate`) is the inner compressor's. `encode` raises
  `ValueError` (statically) when `updates` differ in structure or shape from `init`'s.
  `x` and `e'` are float32 and saturate at its range for finite inputs (no inf from a
  sum of huge finite values; NaN/Inf inputs still propagate).

  Sparse inners (`top_k`, `random_k`: `decode.sparse_coords` gives their distinct indices
  and values, and their decode keeps its state) skip the dense decode: `e'` is `x` with
  `e'_i = sat(x_i - v_i)` written at the `k` sent indices (the same float32 result).
  Inners whose decode reproduces `x` exactly on a mask and is zero elsewhere (`top_k`:
  `decode.exact_support(payload, keys, x)`) get `e' = where(mask, x - x, x)` instead: one
  elementwise pass over `x`, no scatter (batched scatters are slow under vmap on XLA:CPU;
  `x - x` is 0, or NaN for non-finite `x`, as `sat(x - x)`).

  Warns (`UserWarning`) for unscaled `sign_sgd()`: it decodes to `+-1` whatever the
  magnitude of `x`, so the residual tracks `x - sign(x)` and, at ordinary server learning
  rates, training diverges silently; `sign_sgd(scaled=True)` is the EF-signSGD of
  Karimireddy et al. (2019).
  """
  checks.check_compressor(inner, "error_feedback: inner")
  if getattr(inner.encode, "unscaled_sign", False):
    warnings.warn("error_feedback(sign_sgd()) with unscaled signs: decoded updates are +-1 "
                  "whatever their magnitude, so error feedback diverges at ordinary learning "
                  "rates; use sign_sgd(scaled=True)", UserWarning, stacklevel=2)

  exact_support = getattr(inner.decode, "exact_support", None)
  sparse_coords = (None if exact_support is not None
                   else getattr(inner.decode, "sparse_coords", None))

  def _sum(a, b):
    """`a + b` in float32, saturating where both are finite."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return checks.saturate(a + b, jnp.isfinite(a) & jnp.isfinite(b))

  def init_fn(params):
    sender, receiver = inner.init(params)
    return ErrorFeedbackState(sender, layout.zeros_like_f32(params), receiver), receiver

  def encode_fn(updates, state, keys, params=None):
    layout.check_matches(updates, layout.signature(state.residual),
                         "error_feedback: updates vs the residual of `init(params)`")
    x = jax.tree.map(_sum, updates, state.residual)
    if sparse_coords is not None:  # x once in memory: the selection reads it, not g and e
      # (XLA:CPU strips the barrier before fusion; there x stays in memory anyway, because
      # the residual below is written into its buffer in place.)
      x = jax.lax.optimization_barrier(x)
    payload, sender = inner.encode(x, state.inner, keys, params)
    if exact_support is not None:  # decoded = x on the mask, 0 off it: one pass over x
      mask = exact_support(payload, keys, x)
      residual = jax.tree.map(lambda a, m: jnp.where(m, a - a, a), x, mask)
      return payload, ErrorFeedbackState(sender, residual, state.mirror)
    if sparse_coords is not None:  # decoded = values at distinct idx: change k entries of x
      idx, vals, increasing = sparse_coords(payload, keys, x)
      residual = layout.replace_at(x, idx, -vals.astype(jnp.float32), _sum, increasing)
      return payload, ErrorFeedbackState(sender, residual, state.mirror)
    decoded, mirror = inner.decode(payload, state.mirror, keys, x)
    residual = jax.tree.map(lambda a, b: _sum(a, -b.astype(jnp.float32)), x, decoded)
    return payload, ErrorFeedbackState(sender, residual, mirror)

  return Compressor(init_fn, encode_fn, inner.decode, inner.aggregate, inner.reduce)


def flattened(inner: Compressor) -> Compressor:
  """Run `inner` on the whole model raveled to one float32 vector (pytree leaf order).

  The payload's fields are stamped (static `Field.source`, no bits) with the structure
  and leaf shapes of the encoded updates; `decode`/`aggregate` raise `ValueError` if
  `like` differs, since the inner payload (e.g. `k` values, a fixed-size sketch) need
  not reveal the model size. The inner codec decodes in float32; each leaf is cast to its
  dtype saturating at that dtype's range (`checks.cast_finite`: float16 estimates beyond
  65504 give 65504, not inf).
  """
  checks.check_compressor(inner, "flattened: inner")

  def unravel(like, vec):
    like32 = jax.tree.map(lambda l: jax.ShapeDtypeStruct(jnp.shape(l), jnp.float32), like)
    flat = layout.unraveler(like32)(vec.astype(jnp.float32))
    return jax.tree.map(lambda v, l: checks.cast_finite(v, l.dtype), flat, like)

  def init_fn(params):
    return inner.init(layout.ravel(params))

  def encode_fn(updates, state, keys, params=None):
    flat_params = None if params is None else layout.ravel(params)
    payload, state = inner.encode(layout.ravel(updates), state, keys, flat_params)
    return layout.stamp(payload, updates), state

  def decode_fn(payload, state, keys, like):
    payload = layout.unstamp(payload, like)
    vec, state = inner.decode(payload, state, keys, layout.ravel(like))
    return unravel(like, vec), state

  aggregate_fn = None
  if inner.aggregate is not None:
    def aggregate_fn(payloads, weights, keys, like):
      payloads = layout.unstamp(payloads, like)
      return unravel(like, inner.aggregate(payloads, weights, keys, layout.ravel(like)))

  # The inner `reduce` keeps the (static) stamps: both sides of a reduction share them.
  return Compressor(init_fn, encode_fn, decode_fn, aggregate_fn, inner.reduce)
