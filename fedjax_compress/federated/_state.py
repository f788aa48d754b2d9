"""Containers of the federated simulator: `Cohort`, `ServerState`, `RoundMetrics`.

All are `flax.struct.dataclass` pytrees holding plain arrays only (no typed PRNG keys), so
they pass through `jit`, shard with `jax.sharding` and serialize with orbax/flax.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor


@struct.dataclass
class Cohort:
  """One round's participants with fixed shapes (`C` = padded cohort size).

  Attributes:
    ids: int32[C] client indices in `[0, num_clients)`; unique among clients with weight > 0.
    batches: pytree of arrays `[C, steps, B, ...]` (one minibatch per local step).
    mask: bool[C, steps, B], False for padding examples; a step with no example is skipped.
    weight: float32[C] aggregation weights (e.g. example counts); 0 marks a padding client,
      which is ignored entirely (no contribution, no bits, state not written back).
  """

  ids: jax.Array
  batches: Any
  mask: jax.Array
  weight: jax.Array


@struct.dataclass
class ServerState:
  """Everything a round reads and writes; no typed keys (round keys derive from `round`).

  Attributes:
    params: the server's model.
    opt_state: `server_tx` state.
    senders: uplink sender states of all clients, leading axis `num_clients`.
    receivers: uplink receiver states (kept by the server), leading axis `num_clients`.
    round: int32 scalar, number of completed rounds.
    broadcast: the model as clients know it (only with a downlink compressor, else None).
    down_sender: downlink sender state (server side, one broadcast message), or None.
    down_receiver: downlink receiver state (shared by all clients), or None.
    aggregator: the server's receiver state for the once-per-round decode of the reduced
      payload (uplinks with `Compressor.reduce`, e.g. FetchSGD's momentum and error in
      sketch space), or None.
    alg_clients: per-client state of the round's `Algorithm` (leading axis `num_clients`):
      `{'state': ..., 'sender': ..., 'receiver': ...}`, the algorithm's own (e.g. SCAFFOLD's
      `c_i`) and its message compressor's; None for FedAvg/FedOpt.
    alg_server: the algorithm's server state (SCAFFOLD's `c`, Mime's optimizer statistics),
      or None.
  """

  params: Any
  opt_state: Any
  senders: Any
  receivers: Any
  round: jax.Array
  broadcast: Any = None
  down_sender: Any = None
  down_receiver: Any = None
  aggregator: Any = None
  alg_clients: Any = None
  alg_server: Any = None


@struct.dataclass
class RoundMetrics:
  """Per-client results of one round (`C` = padded cohort size).

  Attributes:
    up_bits: int32[C] exact uplink bits (`bits.count` of each payload); 0 for padding.
    down_bits: int32[C] downlink bits billed to each participant (the broadcast message,
      or the dense model when there is no downlink compressor); 0 for padding.
    loss: float32[C] mean training loss over the client's local steps (steps with data).
    finite: bool[C] False for clients whose model delta had a NaN/Inf; those clients get
      weight 0, their delta is replaced by zeros before encoding and their states are kept.
    weight: float32[C] normalized aggregation weights actually used (sum 1, or all 0).
    update_norm: float32 scalar, global L2 norm of the aggregated update.
  """

  up_bits: jax.Array
  down_bits: jax.Array
  loss: jax.Array
  finite: jax.Array
  weight: jax.Array
  update_norm: jax.Array


def _stack(tree: Any, n: int) -> Any:
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n,) + jnp.shape(x)), tree)


def init_server_state(params: Any, server_tx: optax.GradientTransformation,
                      uplink: Compressor, *, num_clients: int,
                      downlink: Optional[Compressor] = None,
                      algorithm: Optional[Any] = None) -> ServerState:
  """Initial `ServerState`: `uplink.init(params)` replicated over `num_clients` clients.

  With an `algorithm` (`federated.scaffold()`, `mime()`, ...), its client state and its
  message compressor's states (`identity()` when it has none) are replicated over the
  clients in `alg_clients`, its server state is `alg_server`; pass the same `algorithm` to
  `build_round`.

  With a `downlink` compressor the clients' model starts equal to `params` (the initial
  model is assumed known to every client, e.g. from a shared seed; it is not billed).
  """
  num_clients = checks.check_positive_int(num_clients, "num_clients")
  sender, receiver = uplink.init(params)
  state = ServerState(params=params, opt_state=server_tx.init(params),
                      senders=_stack(sender, num_clients),
                      receivers=_stack(receiver, num_clients),
                      round=jnp.zeros((), jnp.int32))
  if uplink.reduce is not None:
    state = state.replace(aggregator=receiver)
  if algorithm is not None:
    from fedjax_compress.compressors._identity import identity  # pylint: disable=import-outside-toplevel
    from fedjax_compress.federated._algorithms import Algorithm  # pylint: disable=import-outside-toplevel
    if not isinstance(algorithm, Algorithm):
      raise TypeError(f"algorithm must be a federated Algorithm (scaffold(), mime(), ...) or "
                      f"None, got {type(algorithm).__name__}")
    client, server = algorithm.init(params)
    extra = algorithm.compressor if algorithm.compressor is not None else identity()
    m_send, m_recv = extra.init(params)
    state = state.replace(
        alg_clients=_stack(dict(state=client, sender=m_send, receiver=m_recv), num_clients),
        alg_server=server)
  if downlink is not None:
    d_send, d_recv = downlink.init(params)
    state = state.replace(broadcast=jax.tree.map(jnp.asarray, params),
                          down_sender=d_send, down_receiver=d_recv)
  return _unaliased(state)


def _unaliased(tree: Any) -> Any:
  """`tree` with every repeated array object copied, so `jit(..., donate_argnums=0)` of a
  round can donate the state (XLA refuses to donate one buffer twice, e.g. `params` that is
  also the initial `broadcast` or a compressor state)."""
  seen: set[int] = set()

  def fresh(x):
    if isinstance(x, jax.Array) and id(x) in seen:
      return jnp.array(x, copy=True)
    seen.add(id(x))
    return x

  return jax.tree.map(fresh, tree)
