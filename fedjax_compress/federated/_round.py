"""One federated round as one pure function: vmap over clients, `lax.scan` over local steps.

`build_round(loss_fn, client_tx, server_tx, uplink, *, local_steps, downlink=None)` returns
`round_fn(state: ServerState, cohort: Cohort, seed_key) -> (ServerState, RoundMetrics)`:

1. Downlink (optional): the server encodes `params - broadcast` once (keys of purpose
   DOWNLINK, client id 0), every client decodes it, `broadcast += decoded`, and clients start
   from `broadcast`. Without a downlink compressor clients start from `params` and each
   participant is billed the dense model (`bits.dense_bits(params)`).
2. Gather the uplink sender/receiver states of `cohort.ids`.
3. Per client (vmapped): local training `p <- p + client_tx(grad loss_fn(p, batch_s, mask_s,
   k_s))` for `s < local_steps` (a step whose mask is all False is skipped), then the update
   sent is the pseudo-gradient `delta = p_start - p_end`, encoded with
   `uplink.encode(delta, sender, round_keys(seed, round, ids)[c], p_start)`.
4. Non-finite policy: a client whose delta has a NaN/Inf gets `finite=False` and weight 0;
   its delta is replaced by zeros before encoding (so the program stays finite) and its
   states are not written back. Its message is still billed in `up_bits`.
5. Aggregate `g = sum_c w_c decode(payload_c)` with `w = weight / sum(weight)` over finite
   participants, via `uplink.aggregate` when present (compressed domain) else vmapped decode.
6. Server step: `params <- params + server_tx(g)`, i.e. `g` is treated as a gradient
   (FedAvg = `optax.sgd(1.0)`, FedOpt = e.g. `optax.adam(lr)`).
7. Scatter states back by id, only for clients with weight > 0 and a finite update (padding
   ids are routed out of bounds and dropped, so they never clobber real states).

Keys: everything derives from `fold_in` chains of `(seed_key, state.round, client id)`, so a
round is deterministic under partial participation and after a resume.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fedjax_compress._src import bits as _bits
from fedjax_compress._src import checks
from fedjax_compress._src import keys as _keys
from fedjax_compress._src.adapters import weighted_decode
from fedjax_compress._src.base import Compressor, Keys
from fedjax_compress.federated._state import Cohort, RoundMetrics, ServerState

LossFn = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
ClientFn = Callable[..., tuple[Any, Any, jax.Array, jax.Array]]
RoundFn = Callable[[ServerState, Cohort, Any], tuple[ServerState, RoundMetrics]]


def _where(cond: jax.Array, a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


def _all_finite(tree: Any) -> jax.Array:
  ok = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(ok)) if ok else jnp.ones((), bool)


def build_local_train(loss_fn: LossFn, client_tx: optax.GradientTransformation, *,
                      local_steps: int) -> Callable[..., tuple[Any, jax.Array]]:
  """`train(params, batches[steps,...], mask[steps,B], key) -> (params_end, mean_loss)`.

  A `lax.scan` over `local_steps`; `client_tx` starts from a fresh state every round.
  `mean_loss` averages the losses of the steps that had at least one example.
  """
  local_steps = checks.check_positive_int(local_steps, "local_steps")

  def train_fn(params, batches, mask, key):
    def step(carry, xs):
      p, o = carry
      batch, m, k = xs
      loss, grad = jax.value_and_grad(loss_fn)(p, batch, m, k)
      upd, o2 = client_tx.update(grad, o, p)
      p2 = optax.apply_updates(p, upd)
      has = jnp.any(m)
      return (_where(has, p2, p), _where(has, o2, o)), (loss, has)

    step_keys = jax.random.split(key, local_steps)
    (p_end, _), (losses, has) = lax.scan(
        step, (params, client_tx.init(params)), (batches, mask, step_keys))
    n = jnp.sum(has.astype(jnp.float32))
    mean_loss = jnp.sum(jnp.where(has, losses, 0.0)) / jnp.maximum(n, 1.0)
    return p_end, mean_loss.astype(jnp.float32)

  return train_fn


def build_client_update(loss_fn: LossFn, client_tx: optax.GradientTransformation,
                        uplink: Compressor, *, local_steps: int) -> ClientFn:
  """Per-client work of a round, unbatched.

  `client_fn(params, sender_state, batches, mask, train_key, keys) -> (payload,
  sender_state, loss, finite)`: local training, `delta = params - params_end` (zeros when
  non-finite), `uplink.encode(delta, sender_state, keys, params)`.
  """
  train_fn = build_local_train(loss_fn, client_tx, local_steps=local_steps)

  def client_fn(params, sender_state, batches, mask, train_key, keys):
    p_end, loss = train_fn(params, batches, mask, train_key)
    delta = jax.tree.map(lambda a, b: a - b, params, p_end)
    finite = _all_finite(delta)
    delta = jax.tree.map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), delta)
    payload, sender_state = uplink.encode(delta, sender_state, keys, params)
    return payload, sender_state, loss, finite

  return client_fn


def _check_ids(ids: Any, num_clients: int) -> None:
  """Host-side range check of concrete ids: `0 <= ids < num_clients` (0: stateless, unknown).

  Traced ids (inside `jit`) cannot be checked and keep the unchecked behaviour: the gather
  clips them into range and the scatter drops ids `>= num_clients` but wraps negative
  ones, so an id `>= num_clients` trains on the last client's state and is not written
  back, and `-1` reads client 0's state and overwrites the last client's.
  """
  if not checks.is_concrete(ids):
    return
  ids = np.asarray(ids)
  bad = ids[(ids < 0) | (ids >= num_clients)] if num_clients else ids[ids < 0]
  if bad.size:
    bound = f"[0, {num_clients})" if num_clients else "[0, num_clients)"
    raise ValueError(f"cohort.ids {sorted(set(bad.tolist()))} are outside {bound}, the "
                     "clients of the server state; they would silently use another "
                     "client's state")


def _check_cohort(cohort: Cohort, local_steps: int) -> None:
  c = np.shape(cohort.ids)
  if len(c) != 1:
    raise ValueError(f"cohort.ids must be 1-D [C], got shape {c}")
  if np.shape(cohort.weight) != c:
    raise ValueError(f"cohort.weight must have shape {c}, got {np.shape(cohort.weight)}")
  if np.shape(cohort.mask)[:2] != (c[0], local_steps) or len(np.shape(cohort.mask)) != 3:
    raise ValueError(f"cohort.mask must be [C={c[0]}, steps={local_steps}, B], "
                     f"got {np.shape(cohort.mask)}")
  for x in jax.tree.leaves(cohort.batches):
    if np.shape(x)[:3] != np.shape(cohort.mask):
      raise ValueError(f"cohort.batches leaves must start with {np.shape(cohort.mask)}, "
                       f"got {np.shape(x)}")


def _gather(tree: Any, ids: jax.Array) -> Any:
  return jax.tree.map(lambda x: jnp.take(x, ids, axis=0, mode="clip"), tree)


def _scatter(tree: Any, ids: jax.Array, values: Any) -> Any:
  return jax.tree.map(lambda x, v: x.at[ids].set(v.astype(x.dtype), mode="drop"), tree, values)


def _num_clients(state: ServerState) -> int:
  leaves = jax.tree.leaves((state.senders, state.receivers))
  return int(leaves[0].shape[0]) if leaves else 0  # stateless: nothing is scattered


def build_round(loss_fn: LossFn, client_tx: optax.GradientTransformation,
                server_tx: optax.GradientTransformation, uplink: Compressor, *,
                local_steps: int, downlink: Optional[Compressor] = None) -> RoundFn:
  """Pure `round_fn(state, cohort, seed_key) -> (state, RoundMetrics)`; see module docstring.

  `loss_fn(params, batch, mask, key) -> scalar` is the mean loss over the unmasked examples
  of one minibatch. Jit the result (`jax.jit(round_fn, donate_argnums=0)`); it retraces only
  when shapes change (cohort size, steps, batch size).

  `cohort.ids` must lie in `[0, num_clients)`. Called eagerly (concrete ids) `round_fn`
  raises `ValueError` otherwise; under `jit` the ids are traced and unchecked, and an
  out-of-range id silently reads (clipped) and writes (dropped, or wrapped if negative)
  other clients' states, so build cohorts on the host with `sample_cohort` or check them.

  >>> import jax, jax.numpy as jnp, optax
  >>> from fedjax_compress import compressors, federated
  >>> loss = lambda p, b, m, k: jnp.sum(m * (b['x'] @ p['w'] - b['y'])**2) / jnp.sum(m)
  >>> params = {'w': jnp.zeros(3)}
  >>> rnd = federated.build_round(loss, optax.sgd(0.1), optax.sgd(1.0),
  ...                             compressors.identity(), local_steps=2)
  >>> st = federated.init_server_state(params, optax.sgd(1.0), compressors.identity(),
  ...                                  num_clients=4)
  >>> cohort = federated.Cohort(ids=jnp.arange(2), weight=jnp.ones(2),
  ...     batches={'x': jnp.ones((2, 2, 5, 3)), 'y': jnp.ones((2, 2, 5))},
  ...     mask=jnp.ones((2, 2, 5), bool))
  >>> st, m = jax.jit(rnd)(st, cohort, jax.random.key(0))
  >>> m.up_bits.tolist(), int(st.round)
  ([96, 96], 1)
  """
  local_steps = checks.check_positive_int(local_steps, "local_steps")
  client_fn = build_client_update(loss_fn, client_tx, uplink, local_steps=local_steps)
  vclient = jax.vmap(client_fn, in_axes=(None, 0, 0, 0, 0, Keys(None, 0)))

  def round_fn(state: ServerState, cohort: Cohort, seed_key) -> tuple[ServerState, RoundMetrics]:
    _check_cohort(cohort, local_steps)
    num_clients = _num_clients(state)
    _check_ids(cohort.ids, num_clients)
    seed_key = _keys.as_key(seed_key)
    ids = jnp.asarray(cohort.ids, jnp.int32)
    present = jnp.asarray(cohort.weight) > 0

    # Downlink: one broadcast message per round, billed to every participant.
    new = {}
    if downlink is not None:
      d = _keys.round_keys(seed_key, state.round, jnp.zeros((1,), jnp.int32), _keys.DOWNLINK)
      dkeys = Keys(d.shared, d.private[0])
      ddelta = jax.tree.map(lambda a, b: a - b, state.params, state.broadcast)
      dpay, new["down_sender"] = downlink.encode(ddelta, state.down_sender, dkeys,
                                                 state.broadcast)
      ddec, new["down_receiver"] = downlink.decode(dpay, state.down_receiver, dkeys,
                                                   state.broadcast)
      start = jax.tree.map(lambda b, x: b + x.astype(b.dtype), state.broadcast, ddec)
      new["broadcast"] = start
      dbits = _bits.count(dpay)
    else:
      start = state.params
      dense = _bits.dense_bits(state.params)
      _bits.check_int32(dense, "the dense model broadcast", "use a downlink compressor")
      dbits = jnp.asarray(dense, jnp.int32)

    # Clients: gather states, train, encode.
    up_keys = _keys.round_keys(seed_key, state.round, ids, _keys.UPLINK)
    train_keys = _keys.round_keys(seed_key, state.round, ids, _keys.LOCAL_TRAINING).private
    payloads, senders, loss, finite = vclient(
        start, _gather(state.senders, ids), cohort.batches, jnp.asarray(cohort.mask, bool),
        train_keys, up_keys)

    # Aggregate over finite participants with normalized weights.
    use = present & finite
    w = jnp.where(use, jnp.asarray(cohort.weight, jnp.float32), 0.0)
    total = jnp.sum(w)
    w = w / jnp.where(total > 0, total, 1.0)
    agg, receivers = weighted_decode(uplink, payloads, _gather(state.receivers, ids), w,
                                     up_keys, start)

    # Server optimizer step on the pseudo-gradient.
    updates, opt_state = server_tx.update(agg, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    dest = jnp.where(use, ids, num_clients)
    state = state.replace(
        params=params, opt_state=opt_state,
        senders=_scatter(state.senders, dest, senders),
        receivers=_scatter(state.receivers, dest, receivers),
        round=state.round + 1, **new)
    zero = jnp.zeros_like(ids)
    metrics = RoundMetrics(
        up_bits=jnp.where(present, _bits.count(payloads, batch_dims=1), zero),
        down_bits=jnp.where(present, dbits, zero),
        loss=jnp.where(present, loss, 0.0), finite=finite, weight=w,
        update_norm=optax.tree.norm(agg).astype(jnp.float32))
    return state, metrics

  return round_fn
