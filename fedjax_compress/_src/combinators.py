"""Compressor combinators: error feedback and whole-model flattening."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_compress._src import layout
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
  """

  def init_fn(params):
    sender, receiver = inner.init(params)
    return ErrorFeedbackState(sender, layout.zeros_like_f32(params), receiver), receiver

  def encode_fn(updates, state, keys, params=None):
    layout.check_matches(updates, layout.signature(state.residual),
                         "error_feedback: updates vs the residual of `init(params)`")
    x = jax.tree.map(lambda g, e: g.astype(jnp.float32) + e, updates, state.residual)
    payload, sender = inner.encode(x, state.inner, keys, params)
    decoded, mirror = inner.decode(payload, state.mirror, keys, x)
    residual = jax.tree.map(lambda a, b: a - b.astype(jnp.float32), x, decoded)
    return payload, ErrorFeedbackState(sender, residual, mirror)

  return Compressor(init_fn, encode_fn, inner.decode, inner.aggregate)


def flattened(inner: Compressor) -> Compressor:
  """Run `inner` on the whole model raveled to one float32 vector (pytree leaf order).

  The payload's fields are stamped (static `Field.source`, no bits) with the structure
  and leaf shapes of the encoded updates; `decode`/`aggregate` raise `ValueError` if
  `like` differs, since the inner payload (e.g. `k` values, a fixed-size sketch) need
  not reveal the model size.
  """

  def init_fn(params):
    return inner.init(layout.ravel(params))

  def encode_fn(updates, state, keys, params=None):
    flat_params = None if params is None else layout.ravel(params)
    payload, state = inner.encode(layout.ravel(updates), state, keys, flat_params)
    return layout.stamp(payload, updates), state

  def decode_fn(payload, state, keys, like):
    payload = layout.unstamp(payload, like)
    vec, state = inner.decode(payload, state, keys, layout.ravel(like))
    return layout.unraveler(like)(vec), state

  aggregate_fn = None
  if inner.aggregate is not None:
    def aggregate_fn(payloads, weights, keys, like):
      payloads = layout.unstamp(payloads, like)
      return layout.unraveler(like)(inner.aggregate(payloads, weights, keys, layout.ravel(like)))

  return Compressor(init_fn, encode_fn, decode_fn, aggregate_fn)
