"""Adapters from a `Compressor` to optax: a lossy-channel transformation and an aggregator."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor, Keys, PRNGKey
from fedjax_compress._src.keys import as_key


class CompressedTransformationState(NamedTuple):
  """State of `as_transformation`: raw key data, both sides' states, last message bits."""

  key_data: jax.Array
  sender: Any
  receiver: Any
  last_bits: _bits.Bits


def _next_keys(key: PRNGKey) -> tuple[jax.Array, Keys]:
  carry, shared, private = jax.random.split(key, 3)
  return jax.random.key_data(carry), Keys(shared, private)


def as_transformation(compressor: Compressor,
                      key: PRNGKey | int) -> optax.GradientTransformationExtraArgs:
  """Use `compressor` as a lossy channel: `update` returns `decode(encode(updates))`.

  The key lives in the state (raw `key_data`, so the state serializes). Each update
  splits it as `carry, shared, private = jax.random.split(key, 3)`, uses
  `Keys(shared, private)` for the message and keeps `carry`; an extra argument `key=`
  replaces the state's key for that update. `state.last_bits` holds the exact bits of
  the last message. Chain it before an optimizer:
  `optax.chain(as_transformation(qsgd(4), 0), optax.sgd(0.1))`.
  """
  key0 = as_key(key)

  def init_fn(params):
    sender, receiver = compressor.init(params)
    return CompressedTransformationState(
        jax.random.key_data(key0), sender, receiver, _bits.Bits.const(0))

  def update_fn(updates, state, params=None, *, key=None, **extra_args):
    del extra_args
    checks.check_finite(updates)
    base_key = as_key(key) if key is not None else jax.random.wrap_key_data(state.key_data)
    key_data, keys = _next_keys(base_key)
    payload, sender = compressor.encode(updates, state.sender, keys, params)
    out, receiver = compressor.decode(payload, state.receiver, keys, updates)
    return out, CompressedTransformationState(key_data, sender, receiver,
                                              _bits.count(payload))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class CompressedMeanState(NamedTuple):
  """State of `compressed_mean`: key data, per-worker states `[W, ...]`, bits `[W]`."""

  key_data: jax.Array
  senders: Any
  receivers: Any
  last_bits: _bits.Bits


def weighted_decode(compressor: Compressor, payloads: Any, receivers: Any, weights: jax.Array,
                    keys: Keys, like: Any) -> tuple[Any, Any]:
  """`sum_c weights[c] * decode(payloads[c])`, via `reduce` or `aggregate` when present.

  With `reduce` the weighted sum is taken in the compressed domain and decoded once (with
  the receiver state of client 0 and `keys.shared`; `reduce` requires stateless receivers).
  """
  if compressor.reduce is not None:
    receiver = jax.tree.map(lambda x: x[0], receivers)
    one = Keys(keys.shared, jax.tree.map(lambda k: k[0], keys.private))
    out, _ = compressor.decode(compressor.reduce(payloads, weights), receiver, one, like)
    return out, receivers
  if compressor.aggregate is not None:
    return compressor.aggregate(payloads, weights, keys, like), receivers
  decoded, receivers = jax.vmap(
      compressor.decode, in_axes=(0, 0, Keys(None, 0), None))(payloads, receivers, keys, like)
  total = jax.tree.map(
      lambda d, l: jnp.tensordot(weights.astype(jnp.float32), d.astype(jnp.float32),
                                 axes=1).astype(l.dtype), decoded, like)
  return total, receivers


def compressed_mean(compressor: Compressor, key: PRNGKey | int, *,
                    num_workers: int) -> aggregating.Aggregator:
  """An optax `Aggregator`: per-worker updates `[W, ...]` -> mean of their decoded messages.

  Each worker keeps its own sender (and the server its receiver) state, so stateful
  compressors such as `error_feedback(top_k(...))` work. Keys per update:
  `carry, shared, private = split(key, 3)`; worker `i` uses
  `Keys(shared, split(private, num_workers)[i])`. Plugs into
  `optax.experimental.aggregating.process(pre, compressed_mean(c, 0, num_workers=8), opt)`.
  """
  num_workers = checks.check_positive_int(num_workers, "num_workers")
  key0 = as_key(key)

  def init_fn(params):
    sender, receiver = compressor.init(params)
    stack = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)), t)
    return CompressedMeanState(jax.random.key_data(key0), stack(sender), stack(receiver),
                               _bits.Bits.const(0, (num_workers,)))

  def update_fn(per_elt_updates, state, params=None, **extra_args):
    del extra_args
    checks.check_finite(per_elt_updates)
    sizes = {x.shape[0] for x in jax.tree.leaves(per_elt_updates)}
    if sizes != {num_workers}:
      raise ValueError(f"expected a leading worker axis of {num_workers}, got sizes {sizes}")
    like = params if params is not None else jax.tree.map(lambda x: x[0], per_elt_updates)
    carry, shared, private = jax.random.split(jax.random.wrap_key_data(state.key_data), 3)
    keys = Keys(shared, jax.random.split(private, num_workers))
    payloads, senders = jax.vmap(compressor.encode, in_axes=(0, 0, Keys(None, 0), None))(
        per_elt_updates, state.senders, keys, params)
    weights = jnp.full((num_workers,), 1.0 / num_workers, jnp.float32)
    mean, receivers = weighted_decode(compressor, payloads, state.receivers, weights, keys,
                                      like)
    return mean, CompressedMeanState(jax.random.key_data(carry), senders, receivers,
                                     _bits.count(payloads, batch_dims=1))

  return aggregating.Aggregator(init_fn, update_fn)
