"""Core types of fedjax_compress: `Compressor`, `Keys`, `Field` and state aliases.

A compressor is a pair of pure sender/receiver functions (optax style: configuration
lives in the factory's closure, only arrays cross `jit`). Messages are pytrees whose
leaves are `Field`s, so the bit cost of a message is *derived* from its payload
(`fedjax_compress.bits.count`) and can be checked against real bytes
(`fedjax_compress.wire.pack`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import jax
import numpy as np
from flax import struct

PyTree = Any
Params = PyTree
Updates = PyTree
Payload = PyTree
SenderState = PyTree
ReceiverState = PyTree
PRNGKey = jax.Array


class EmptyState(NamedTuple):
  """State of a compressor side that keeps nothing."""


class Keys(NamedTuple):
  """Randomness of one message, derivable by both parties so it never costs bits.

  `shared` is identical for all parties of a round (e.g. a common random-k mask or a
  Fastfood map); `private` is specific to one client (e.g. QSGD dithering).
  """

  shared: PRNGKey
  private: PRNGKey


MAX_WIDTH = 64
"""Widest element of a wire field (the widest NumPy scalar, uint64/float64)."""


def check_width(width: Any) -> int:
  """Return `width` as int, or raise `ValueError` unless it is an int in `[1, MAX_WIDTH]`."""
  if isinstance(width, bool) or not isinstance(width, (int, np.integer)):
    raise ValueError(f"Field width must be an int number of bits per element, got {width!r}")
  if not 1 <= width <= MAX_WIDTH:
    raise ValueError(f"Field width must be in [1, {MAX_WIDTH}] bits, got {width}")
  return int(width)


@struct.dataclass
class Field:
  """One wire field of a message.

  `data` has a fixed shape; `width` (static) is the number of bits each element takes on
  the wire. `count` (int32 scalar or None) makes the field variable-length: only the
  first `count` elements of `data.ravel()` are sent, preceded by a length header of
  `length_bits(data.size)` bits, which `bits.count` bills as well.

  `width` must be an int in `[1, MAX_WIDTH]`; it is checked here, once, so every bit
  accounting path (`bits.count`, `wire.total_bits`, `wire.pack`) sees valid widths.
  `source` (static, never sent, no bits) is set by `layout.stamp` in encoders whose
  payload does not show the shapes it was encoded from (`flattened`, `sign_sgd`, ...): a
  tuple of `layout.signature(updates)`, one per stamping layer, innermost first; each
  layer's decode checks `like` against its entry (`layout.unstamp`), so a template of
  another structure or shape raises `ValueError` instead of decoding wrongly.
  """

  data: jax.Array
  width: int = struct.field(pytree_node=False)
  count: Optional[jax.Array] = None
  source: Optional[tuple] = struct.field(pytree_node=False, default=None, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "width", check_width(self.width))


class InitFn(Protocol):
  """`init(params) -> (sender_state, receiver_state)`."""

  def __call__(self, params: Params) -> tuple[SenderState, ReceiverState]:
    ...


class EncodeFn(Protocol):
  """`encode(updates, sender_state, keys, params=None) -> (payload, sender_state)`.

  `params` (optional) is the model the updates were computed at, as the sender knows it
  (the simulator passes the broadcast model); compressors whose rule depends on the
  model trajectory (LAQ's skip rule) use it, all others ignore it.
  """

  def __call__(self, updates: Updates, state: SenderState, keys: Keys,
               params: Optional[Params] = None) -> tuple[Payload, SenderState]:
    ...


class DecodeFn(Protocol):
  """`decode(payload, receiver_state, keys, like) -> (updates, receiver_state)`.

  `like` is a pytree with the structure, shapes and dtypes of the decoded updates
  (typically the receiver's current params); only its metadata is used.
  """

  def __call__(self, payload: Payload, state: ReceiverState, keys: Keys,
               like: Params) -> tuple[Updates, ReceiverState]:
    ...


class AggregateFn(Protocol):
  """`aggregate(payloads, weights, keys, like) -> updates`: decode a weighted sum.

  `payloads` carry a leading client axis `[C, ...]`, `weights` is `float[C]` and
  `keys` is a `Keys` whose `private` has a leading client axis. The result must equal
  `sum_c weights[c] * decode(payloads[c])` (so it is linear in `weights` and sums over
  client chunks add up); linear compressors implement it by summing in the compressed
  domain and decoding once. Only for stateless receivers.
  """

  def __call__(self, payloads: Payload, weights: jax.Array, keys: Keys,
               like: Params) -> Updates:
    ...


class ReduceFn(Protocol):
  """`reduce(payloads, weights) -> payload`: a weighted sum in the compressed domain.

  For compressors whose payloads form a vector space that `decode` maps linearly (or
  positively homogeneously, e.g. a sketch unsketched by a median and top-k): `payloads`
  carry a leading client axis `[C, ...]`, `weights` is `float[C]`, and the result is one
  payload of the unbatched structure such that `decode(reduce(P, w))` is the server's
  aggregate. `reduce` must be a weighted sum (`sum_c w_c P_c` in the payload's vector
  space), so partial reductions over client chunks combine: `reduce(stack([reduce(P1, w1), reduce(P2, w2)]), [1, 1]) ==
  reduce(P1 ++ P2, w1 ++ w2)`. Only for stateless receivers whose decode ignores
  `keys.private`. The simulator keeps one reduced payload across client chunks and decodes
  once per round (FetchSGD's sum of sketches; IGC's `sum_k w_k c_k`).
  """

  def __call__(self, payloads: Payload, weights: jax.Array) -> Payload:
    ...


class Compressor(NamedTuple):
  """A pure sender/receiver pair. Configuration lives in the factory's closure.

  Attributes:
    init: `params -> (sender_state, receiver_state)`.
    encode: `(updates, sender_state, keys, params=None) -> (payload, sender_state)`.
    decode: `(payload, receiver_state, keys, like) -> (updates, receiver_state)`.
    aggregate: optional fast path for a weighted sum of many payloads, decoded once; linear
      in the weights (sums over disjoint client chunks add up).
    reduce: optional weighted sum in the compressed domain, decoded once by `decode`
      (takes precedence over `aggregate`; see `ReduceFn`).
  """

  init: InitFn
  encode: EncodeFn
  decode: DecodeFn
  aggregate: Optional[AggregateFn] = None
  reduce: Optional[ReduceFn] = None


def stateless_init(params: Params) -> tuple[EmptyState, EmptyState]:
  """`init` for compressors with no state on either side."""
  del params
  return EmptyState(), EmptyState()


ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]
