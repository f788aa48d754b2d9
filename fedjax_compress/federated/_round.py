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
from fedjax_compress.models import _fastconv

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


ChunkSize = Optional[int | str]
CPU_CLIENTS_PER_CHUNK = 1
"""Default `clients_per_chunk` on CPU (measured, benchmarks/bench_round.py): one client at a
time inside the program. XLA:CPU parallelises within each op, and a chunk of vmapped clients
turns every per-client matmul into a batched one that runs no faster per client while
multiplying the working set; see BENCHMARKS.md "Client execution"."""


def default_clients_per_chunk(backend: Optional[str] = None) -> Optional[int]:
  """`clients_per_chunk` used when None is given: 1 on CPU, the whole cohort (None) elsewhere.

  On accelerators one vmapped program over the cohort keeps the device busy; pass a
  smaller chunk when per-client memory times the cohort does not fit
  (`federated.check_memory`).
  """
  backend = jax.default_backend() if backend is None else backend
  return CPU_CLIENTS_PER_CHUNK if backend == "cpu" else None


def _check_chunk(clients_per_chunk: ChunkSize) -> ChunkSize:
  if clients_per_chunk is None or clients_per_chunk == "all":
    return clients_per_chunk
  if isinstance(clients_per_chunk, str):
    raise ValueError("clients_per_chunk must be a positive int, 'all' or None (backend "
                     f"default), got {clients_per_chunk!r}")
  return checks.check_positive_int(clients_per_chunk, "clients_per_chunk")


def chunk_plan(num: int, clients_per_chunk: ChunkSize) -> tuple[int, int]:
  """`(num_chunks, chunk)` for a cohort of `num` clients: `num_chunks * chunk >= num`.

  The chunk is at most `clients_per_chunk` and as even as possible, so fewer than
  `num_chunks` weight-0 clients pad the last chunk (13 clients at 8 per chunk: 2 x 7).
  'all' is one chunk of the cohort; None is `default_clients_per_chunk()`.
  """
  if clients_per_chunk is None:
    clients_per_chunk = default_clients_per_chunk()
  if clients_per_chunk is None or clients_per_chunk == "all":
    return 1, num
  n = -(-num // min(int(clients_per_chunk), num))
  return n, -(-num // n)


def _pad_rows(x: jax.Array, pad: int, value: Any = 0) -> jax.Array:
  if not pad:
    return x
  return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], value, x.dtype)])


def _chunked(tree: Any, n: int) -> Any:
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


def _unchunked(tree: Any, num: int) -> Any:
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:num], tree)


def _zeros_like_payload(payload: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), payload)


def build_round(loss_fn: LossFn, client_tx: optax.GradientTransformation,
                server_tx: optax.GradientTransformation, uplink: Compressor, *,
                local_steps: int, downlink: Optional[Compressor] = None,
                clients_per_chunk: ChunkSize = None, conv_impl: str = "auto") -> RoundFn:
  """Pure `round_fn(state, cohort, seed_key) -> (state, RoundMetrics)`; see module docstring.

  `loss_fn(params, batch, mask, key) -> scalar` is the mean loss over the unmasked examples
  of one minibatch. Jit the result (`jax.jit(round_fn, donate_argnums=0)`); it retraces only
  when shapes change (cohort size, steps, batch size).

  Client execution: the cohort runs as a `lax.scan` over chunks of `clients_per_chunk`
  vmapped clients inside the one program ('all': one vmap over the cohort; None: the
  backend default, `default_clients_per_chunk()`). Each chunk's updates are decoded (or
  reduced, see `Compressor.reduce`) into one running sum and its clients' states are
  scattered back before the next chunk runs, so peak memory grows with the chunk, not the
  cohort; results equal for every chunk size up to float rounding. The last chunk is
  padded with weight-0 clients (`chunk_plan`).

  `conv_impl`: 'auto' (im2col on CPU, where XLA runs kernel-gradient convolutions inside
  loops ~4x slower than as matmuls; unchanged elsewhere), 'im2col' or 'xla' (as written).
  The rewrite (`models.im2col_convs`) changes no values beyond float rounding.

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
  clients_per_chunk = _check_chunk(clients_per_chunk)
  loss_fn = _fastconv.with_conv_impl(loss_fn, conv_impl)
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
      dbits = _bits.Bits.const(_bits.dense_bits(state.params))

    # Clients, `chunk` at a time: pad the cohort with weight-0 clients to whole chunks.
    num = ids.shape[0]
    n, chunk = chunk_plan(num, clients_per_chunk)
    pad = n * chunk - num
    pids = _pad_rows(ids, pad, max(num_clients, 1) - 1)
    weight = jnp.where(present, jnp.asarray(cohort.weight, jnp.float32), 0.0)
    up_keys = _keys.round_keys(seed_key, state.round, pids, _keys.UPLINK)
    xs = _chunked(dict(
        ids=pids, weight=_pad_rows(weight, pad),
        batches=jax.tree.map(lambda x: _pad_rows(jnp.asarray(x), pad), cohort.batches),
        mask=_pad_rows(jnp.asarray(cohort.mask, bool), pad, False),
        train=_keys.round_keys(seed_key, state.round, pids, _keys.LOCAL_TRAINING).private,
        private=up_keys.private), n)

    def run_chunk(carry, x):
      acc, senders_all, receivers_all = carry
      keys = Keys(up_keys.shared, x["private"])
      payloads, senders, loss, finite = vclient(
          start, _gather(senders_all, x["ids"]), x["batches"], x["mask"], x["train"], keys)
      w = jnp.where(finite, x["weight"], 0.0)
      receivers = _gather(receivers_all, x["ids"])
      if uplink.reduce is not None:  # one running payload, decoded once after the chunks
        part = uplink.reduce(payloads, w)
        acc = uplink.reduce(jax.tree.map(lambda a, b: jnp.stack([a, b]), acc, part),
                            jnp.ones((2,), jnp.float32))
      else:
        part, receivers = weighted_decode(uplink, payloads, receivers, w, keys, start)
        acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, part)
      dest = jnp.where(w > 0, x["ids"], num_clients)  # padding, absent, non-finite: kept
      carry = (acc, _scatter(senders_all, dest, senders), _scatter(receivers_all, dest, receivers))
      return carry, (loss, finite, w, _bits.count(payloads, batch_dims=1))

    if uplink.reduce is not None:
      first = jax.tree.map(lambda x: x[0], xs)
      acc0 = jax.eval_shape(lambda: uplink.reduce(vclient(
          start, _gather(state.senders, first["ids"]), first["batches"], first["mask"],
          first["train"], Keys(up_keys.shared, first["private"]))[0], first["weight"]))
      acc0 = _zeros_like_payload(acc0)
    else:
      acc0 = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), start)
    carry0 = (acc0, state.senders, state.receivers)
    if n == 1:
      (acc, senders, receivers), per = run_chunk(carry0, jax.tree.map(lambda x: x[0], xs))
      per = jax.tree.map(lambda x: x[:num], per)
    else:
      (acc, senders, receivers), per = lax.scan(run_chunk, carry0, xs)
      per = _unchunked(per, num)
    loss, finite, w, up_bits = per

    # Aggregate over finite participants with normalized weights.
    total = jnp.sum(w)
    inv = 1.0 / jnp.where(total > 0, total, 1.0)
    if uplink.reduce is not None:
      agg_keys = Keys(up_keys.shared, jax.random.fold_in(up_keys.shared, _keys.AGGREGATE))
      acc, _ = uplink.decode(acc, jax.tree.map(lambda r: r[0], state.receivers), agg_keys,
                             start)
    agg = jax.tree.map(lambda a, p: (a.astype(jnp.float32) * inv).astype(jnp.asarray(p).dtype),
                       acc, start)

    # Server optimizer step on the pseudo-gradient.
    updates, opt_state = server_tx.update(agg, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(params=params, opt_state=opt_state, senders=senders,
                          receivers=receivers, round=state.round + 1, **new)
    metrics = RoundMetrics(
        up_bits=_bits.Bits.where(present, up_bits, 0),
        down_bits=_bits.Bits.where(present, dbits, 0),
        loss=jnp.where(present, loss, 0.0), finite=finite, weight=w * inv,
        update_norm=optax.tree.norm(agg).astype(jnp.float32))
    return state, metrics

  return round_fn
