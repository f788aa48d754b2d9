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

With `algorithm=` (SCAFFOLD, Mime, MimeLite; `federated._algorithms`) the round adds the
algorithm's broadcast, an optional first phase in which clients send `grad f_i(x)` (Mime), a
gradient correction inside the local steps, an optional extra message after training
(SCAFFOLD's `delta c_i`) and the algorithm's client/server state updates; its per-client
state is gathered and scattered per chunk like the compressor states (step 7), and every
extra message is billed. Without it the round is FedAvg/FedOpt exactly as above.

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
from fedjax_compress.compressors._identity import identity
from fedjax_compress.federated._algorithms import Algorithm
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


def _step_keys(key: jax.Array, local_steps: int) -> jax.Array:
  return jax.random.split(key, local_steps)


def _local_train(loss_fn: LossFn, client_tx: optax.GradientTransformation,
                 local_steps: int) -> Callable[..., tuple[Any, jax.Array, jax.Array]]:
  """`train(params, batches, mask, key, correct=None, anchor=None) -> (p_end, loss, steps)`.

  `correct(grad, grad_at_anchor)` (optional) maps each step's gradient before `client_tx`;
  `grad_at_anchor` is `grad loss_fn(anchor, batch, mask, key)` on the same minibatch and
  key when `anchor` is given, else None. `steps` counts the steps that had an example.
  """

  def train_fn(params, batches, mask, key, correct=None, anchor=None):
    def step(carry, xs):
      p, o = carry
      batch, m, k = xs
      loss, grad = jax.value_and_grad(loss_fn)(p, batch, m, k)
      if correct is not None:
        g_x = None if anchor is None else jax.grad(loss_fn)(anchor, batch, m, k)
        grad = correct(grad, g_x)
      upd, o2 = client_tx.update(grad, o, p)
      p2 = optax.apply_updates(p, upd)
      has = jnp.any(m)
      return (_where(has, p2, p), _where(has, o2, o)), (loss, has)

    (p_end, _), (losses, has) = lax.scan(
        step, (params, client_tx.init(params)), (batches, mask, _step_keys(key, local_steps)))
    n = jnp.sum(has.astype(jnp.float32))
    mean_loss = jnp.sum(jnp.where(has, losses, 0.0)) / jnp.maximum(n, 1.0)
    return p_end, mean_loss.astype(jnp.float32), jnp.sum(has.astype(jnp.int32))

  return train_fn


def build_local_train(loss_fn: LossFn, client_tx: optax.GradientTransformation, *,
                      local_steps: int) -> Callable[..., tuple[Any, jax.Array]]:
  """`train(params, batches[steps,...], mask[steps,B], key) -> (params_end, mean_loss)`.

  A `lax.scan` over `local_steps`; `client_tx` starts from a fresh state every round.
  `mean_loss` averages the losses of the steps that had at least one example.
  """
  local_steps = checks.check_positive_int(local_steps, "local_steps")
  train = _local_train(loss_fn, client_tx, local_steps)

  def train_fn(params, batches, mask, key):
    return train(params, batches, mask, key)[:2]

  return train_fn


def full_batch_grad(loss_fn: LossFn, params: Any, batches: Any, mask: jax.Array,
                    key: jax.Array) -> Any:
  """A client's full local-batch gradient at `params`: `sum_s n_s grad f(params; z_s) / sum_s n_s`.

  `n_s` = examples of step `s` (so it is the gradient of the mean loss over all the
  client's examples, `loss_fn` being a per-minibatch mean); same step keys as training.
  """
  steps = np.shape(mask)[0]

  def step(acc, xs):
    batch, m, k = xs
    n = jnp.sum(m.astype(jnp.float32))
    g = jax.grad(loss_fn)(params, batch, m, k)
    return jax.tree.map(lambda a, g: a + n * g.astype(jnp.float32), acc, g), n

  zero = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  acc, n = lax.scan(step, zero, (batches, mask, _step_keys(key, steps)))
  inv = 1.0 / jnp.maximum(jnp.sum(n), 1.0)
  return jax.tree.map(lambda a, p: (a * inv).astype(jnp.asarray(p).dtype), acc, params)


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
  leaves = jax.tree.leaves((state.senders, state.receivers, state.alg_clients))
  return int(leaves[0].shape[0]) if leaves else 0  # stateless: nothing is scattered


ChunkSize = Optional[int | str]
CPU_CHUNK_BYTES = 6 << 20
"""CPU default chunk: enough clients that one float32 copy of their models fills ~6 MiB."""
CPU_MAX_CLIENTS_PER_CHUNK = 8
"""CPU default chunk is at most this many clients."""


def default_clients_per_chunk(backend: Optional[str] = None,
                              num_params: Optional[int] = None) -> Optional[int]:
  """`clients_per_chunk` used when None is given.

  On CPU `clamp(ceil(CPU_CHUNK_BYTES / (4 D)), 1, CPU_MAX_CLIENTS_PER_CHUNK)` for a model
  of `D = num_params` parameters (1 if unknown): measured (benchmarks/bench_chunks.py,
  BENCHMARKS.md "Client execution"), a small chunk of vmapped clients beats both one client
  at a time (per-op dispatch inside the loop) and one vmap over the cohort (a working set
  far beyond the caches; XLA:CPU parallelises within each op, so batching clients adds no
  parallelism): best were 4-8 clients for D = 14K-290K MLPs and 2 for the 1.2M EMNIST CNN.
  Elsewhere the whole cohort (None): one vmapped program keeps an accelerator busy; pass a
  smaller chunk when per-client memory times the cohort does not fit (`check_memory`).
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu":
    return None
  if not num_params:
    return 1
  per_client = 4 * int(num_params)
  return int(min(CPU_MAX_CLIENTS_PER_CHUNK, max(1, -(-CPU_CHUNK_BYTES // per_client))))


def _over_clients(fn: Callable, in_axes: tuple, vmap_clients: bool) -> Callable:
  """`jax.vmap(fn, in_axes)`, or the same as a `lax.map` over the clients (`vmap_clients=False`).

  `in_axes` entries are None (shared by all clients), 0 (one row per client) or `Keys` of
  those; outputs are stacked along a new leading client axis either way.
  """
  if vmap_clients:
    return jax.vmap(fn, in_axes=in_axes)

  def parts(a, ax):
    if isinstance(ax, Keys):
      return [v for v, x in zip(a, ax) if x == 0]
    return [a] if ax == 0 else []

  def rebuild(args, rows):
    rows = iter(rows)
    out = []
    for a, ax in zip(args, in_axes):
      if isinstance(ax, Keys):
        out.append(Keys(*[next(rows) if x == 0 else v for v, x in zip(a, ax)]))
      else:
        out.append(next(rows) if ax == 0 else a)
    return out

  def mapped(*args):
    rows = [p for a, ax in zip(args, in_axes) for p in parts(a, ax)]
    return lax.map(lambda r: fn(*rebuild(args, r)), rows)

  return mapped


def _check_chunk(clients_per_chunk: ChunkSize) -> ChunkSize:
  if clients_per_chunk is None or clients_per_chunk == "all":
    return clients_per_chunk
  if isinstance(clients_per_chunk, str):
    raise ValueError("clients_per_chunk must be a positive int, 'all' or None (backend "
                     f"default), got {clients_per_chunk!r}")
  return checks.check_positive_int(clients_per_chunk, "clients_per_chunk")


def chunk_plan(num: int, clients_per_chunk: ChunkSize,
               num_params: Optional[int] = None) -> tuple[int, int]:
  """`(num_chunks, chunk)` for a cohort of `num` clients: `num_chunks * chunk >= num`.

  The chunk is at most `clients_per_chunk` and as even as possible, so fewer than
  `num_chunks` weight-0 clients pad the last chunk (13 clients at 8 per chunk: 2 x 7).
  'all' is one chunk of the cohort; None is `default_clients_per_chunk(num_params=)`.
  """
  if clients_per_chunk is None:
    clients_per_chunk = default_clients_per_chunk(num_params=num_params)
  if clients_per_chunk is None or clients_per_chunk == "all":
    return 1, num
  n = -(-num // min(int(clients_per_chunk), num))
  return n, -(-num // n)


def _pad_rows(x: jax.Array, pad: int, value: Any = 0) -> jax.Array:
  if not pad:
    return x
  return jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], value, x.dtype)])


def _chunked(tree: Any, n: int) -> Any:
  """Rows `[n * c]` -> `[n, c]`, chunk j = rows `j, j + n, ..., j + (c - 1) n` (strided).

  Strided, not contiguous: a cohort sharded over devices in contiguous row blocks keeps
  its sharding on the chunk's client axis (each device runs its share of every chunk)
  rather than on the scanned axis, which XLA cannot partition.
  """
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), tree)


def _unchunked(tree: Any, num: int) -> Any:
  """Inverse of `_chunked`: `[n, c]` -> rows `[n * c]`, cut to the first `num`."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])[:num], tree)


def _zeros_like_payload(payload: Any) -> Any:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), payload)


_ANCHOR = 16  # key purposes of the algorithm messages (disjoint from _keys' tags)
_MESSAGE = 17


def _algorithm_client(loss_fn: LossFn, client_tx: optax.GradientTransformation,
                      uplink: Compressor, algorithm: Algorithm, extra: Compressor,
                      local_steps: int) -> Callable[..., tuple]:
  """Per-client work of a round with an `Algorithm`, unbatched (see `_algorithms`).

  `(x, received, anchor, sender, alg_client, batches, mask, train_key, keys, msg_keys) ->
  (payload, sender, loss, finite, msg_payload, msg_sender)`; `finite` covers the model delta
  and the message; a non-finite client sends zeros.
  """
  train = _local_train(loss_fn, client_tx, local_steps)

  def client_fn(x, received, anchor, sender, algc, batches, mask, train_key, keys, mkeys):
    cst = algc["state"]
    correct = lambda g, g_x: algorithm.correct(g, g_x, cst, received, anchor)
    p_end, loss, steps = train(x, batches, mask, train_key, correct,
                               x if algorithm.svrg else None)
    delta = jax.tree.map(lambda a, b: a - b, x, p_end)
    finite = _all_finite(delta)
    mpay, msend = None, algc["sender"]
    if algorithm.message is not None:
      fg = full_batch_grad(loss_fn, x, batches, mask, train_key) if algorithm.full_grad else None
      msg = algorithm.message(cst, received, x, p_end, steps, fg)
      finite = finite & _all_finite(msg)
      msg = jax.tree.map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), msg)
      mpay, msend = extra.encode(msg, msend, mkeys, x)
    delta = jax.tree.map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), delta)
    payload, sender = uplink.encode(delta, sender, keys, x)
    return payload, sender, loss, finite, mpay, msend

  return client_fn


def _anchor_client(loss_fn: LossFn, extra: Compressor) -> Callable[..., tuple]:
  """`(x, alg_client, batches, mask, train_key, keys) -> (payload, alg_client, finite)`: grad f_i(x) sent."""

  def client_fn(x, algc, batches, mask, train_key, keys):
    g = full_batch_grad(loss_fn, x, batches, mask, train_key)
    finite = _all_finite(g)
    g = jax.tree.map(lambda d: jnp.where(finite, d, jnp.zeros_like(d)), g)
    payload, sender = extra.encode(g, algc["sender"], keys, x)
    return payload, dict(algc, sender=sender), finite

  return client_fn


def _anchor_chunk(vanchor: Callable, vdecode: Callable, x0: Any, shared: jax.Array,
                  num_clients: int) -> Callable:
  """Scan body of phase 1: encode/decode `grad f_i(x)`, weighted sum, scatter the states."""

  def body(carry, x):
    acc, algc_all = carry
    keys = Keys(shared, x["a_private"])
    pay, algc, finite = vanchor(x0, _gather(algc_all, x["ids"]), x["batches"], x["mask"],
                                x["train"], keys)
    dec, recv = vdecode(pay, algc["receiver"], keys, x0)
    w = jnp.where(finite, x["weight"], 0.0)
    acc = jax.tree.map(lambda a, d: a + jnp.tensordot(w, d.astype(jnp.float32), 1), acc, dec)
    dest = jnp.where(w > 0, x["ids"], num_clients)
    algc_all = _scatter(algc_all, dest, dict(algc, receiver=recv))
    return (acc, algc_all), (finite, _bits.count(pay, batch_dims=1))

  return body


def _scan_chunks(body: Callable, carry0: Any, xs: dict, n: int, num: int) -> tuple[Any, Any]:
  """`lax.scan(body)` over `n` chunks of `xs` (unchunked rows); per-client outputs cut to `num`."""
  xs = _chunked(xs, n)
  if n == 1:
    carry, per = body(carry0, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda x: x[:num], per)
  carry, per = lax.scan(body, carry0, xs)
  return carry, _unchunked(per, num)


def build_round(loss_fn: LossFn, client_tx: optax.GradientTransformation,
                server_tx: optax.GradientTransformation, uplink: Compressor, *,
                local_steps: int, downlink: Optional[Compressor] = None,
                clients_per_chunk: ChunkSize = None, conv_impl: str = "auto",
                algorithm: Optional[Algorithm] = None,
                vmap_clients: bool = True) -> RoundFn:
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
  padded with weight-0 clients (`chunk_plan`). Inside a chunk the clients' local training
  and encoding are vmapped (`vmap_clients=True`, the default; the form XLA partitions when
  the cohort is sharded) or run one after another with `lax.map` (False: unbatched ops and
  per-client temporaries; on one CPU device an EMNIST CNN client's training alone ran
  1.2-1.3x faster so, but whole rounds measured the same within noise, BENCHMARKS.md
  "Sixth pass"). Decoding and aggregation are vmapped over the chunk either way.

  `conv_impl`: 'auto' (im2col on CPU, where XLA runs kernel-gradient convolutions inside
  loops ~4x slower than as matmuls, and non-overlapping max pools as reshape + max, whose
  gradient XLA:CPU runs ~6x slower as `select_and_scatter`; unchanged elsewhere), 'im2col'
  or 'xla' (as written). The rewrite (`models.im2col_convs`) changes no values beyond float
  rounding (pool values and gradients are identical).

  `algorithm`: None is FedAvg/FedOpt (`server_tx` on the pseudo-gradient); an
  `Algorithm` (`scaffold`, `mime`, `mimelite`, see `federated._algorithms`) adds per-client
  and server state (the state must come from `init_server_state(..., algorithm=)`), a
  broadcast and extra uplink messages, all billed in `RoundMetrics`: `down_bits` adds the
  dense bits of the broadcast (and of Mime's `c`), `up_bits` the bits of each extra message
  (dense, or `algorithm.compressor`'s). A client is valid (weight > 0, state written back)
  only if all its messages are finite.

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
  if algorithm is not None and not isinstance(algorithm, Algorithm):
    raise TypeError(f"algorithm must be a federated Algorithm (scaffold(), mime(), ...) or "
                    f"None, got {type(algorithm).__name__}")
  loss_fn = _fastconv.with_conv_impl(loss_fn, conv_impl)
  if not isinstance(vmap_clients, (bool, np.bool_)):
    raise ValueError(f"vmap_clients must be True or False, got {vmap_clients!r}")
  client_fn = build_client_update(loss_fn, client_tx, uplink, local_steps=local_steps)
  vclient = _over_clients(client_fn, (None, 0, 0, 0, 0, Keys(None, 0)), vmap_clients)
  if algorithm is not None:
    extra = algorithm.compressor if algorithm.compressor is not None else identity()
    valg = _over_clients(
        _algorithm_client(loss_fn, client_tx, uplink, algorithm, extra, local_steps),
        (None, None, None, 0, 0, 0, 0, 0, Keys(None, 0), Keys(None, 0)), vmap_clients)
    vanchor = _over_clients(_anchor_client(loss_fn, extra), (None, 0, 0, 0, 0, Keys(None, 0)),
                            vmap_clients)
    vdecode = jax.vmap(extra.decode, in_axes=(0, 0, Keys(None, 0), None))

  def round_fn(state: ServerState, cohort: Cohort, seed_key) -> tuple[ServerState, RoundMetrics]:
    _check_cohort(cohort, local_steps)
    if algorithm is not None and state.alg_clients is None:
      raise ValueError("build_round(..., algorithm=...) needs a state made by "
                       "init_server_state(..., algorithm=...) (state.alg_clients is None)")
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
    n, chunk = chunk_plan(num, clients_per_chunk,
                          sum(int(np.size(x)) for x in jax.tree.leaves(start)))
    pad = n * chunk - num
    pids = _pad_rows(ids, pad, max(num_clients, 1) - 1)
    weight = jnp.where(present, jnp.asarray(cohort.weight, jnp.float32), 0.0)
    up_keys = _keys.round_keys(seed_key, state.round, pids, _keys.UPLINK)
    xs = dict(
        ids=pids, weight=_pad_rows(weight, pad),
        batches=jax.tree.map(lambda x: _pad_rows(jnp.asarray(x), pad), cohort.batches),
        mask=_pad_rows(jnp.asarray(cohort.mask, bool), pad, False),
        train=_keys.round_keys(seed_key, state.round, pids, _keys.LOCAL_TRAINING).private,
        private=up_keys.private)
    if algorithm is not None:
      a_keys = _keys.round_keys(seed_key, state.round, pids, _ANCHOR)
      m_keys = _keys.round_keys(seed_key, state.round, pids, _MESSAGE)
      xs.update(a_private=a_keys.private, m_private=m_keys.private)
      received = algorithm.broadcast(state.alg_server)
      dbits = dbits + _bits.dense_bits(received)
      alg_clients, anchor, anchor_bits = state.alg_clients, None, None
      if algorithm.anchor:  # phase 1: grad f_i(x) up, its weighted mean at the server
        (anchor, alg_clients), (a_ok, anchor_bits) = _scan_chunks(
            _anchor_chunk(vanchor, vdecode, start, a_keys.shared, num_clients),
            (jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), start), alg_clients),
            xs, n, num)
        a_w = jnp.where(a_ok, weight, 0.0)
        a_inv = 1.0 / jnp.where(jnp.sum(a_w) > 0, jnp.sum(a_w), 1.0)
        anchor = jax.tree.map(lambda a, p: (a * a_inv).astype(jnp.asarray(p).dtype), anchor, start)
        xs["weight"] = _pad_rows(a_w, pad)
        if algorithm.anchor == 2:  # Mime: c is broadcast before local training
          dbits = dbits + _bits.dense_bits(anchor)
    xs = _chunked(xs, n)

    def run_chunk(carry, x):
      acc, senders_all, receivers_all = carry[:3]
      keys = Keys(up_keys.shared, x["private"])
      if algorithm is None:
        payloads, senders, loss, finite = vclient(
            start, _gather(senders_all, x["ids"]), x["batches"], x["mask"], x["train"], keys)
      else:
        algc_all, msum = carry[3:]
        algc = _gather(algc_all, x["ids"])
        payloads, senders, loss, finite, mpay, msend = valg(
            start, received, anchor, _gather(senders_all, x["ids"]), algc, x["batches"],
            x["mask"], x["train"], keys, Keys(m_keys.shared, x["m_private"]))
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
      up = _bits.count(payloads, batch_dims=1)
      if algorithm is not None:
        cst = algc["state"]
        mrecv = algc["receiver"]
        if algorithm.message is not None:
          dec, mrecv = vdecode(mpay, mrecv, Keys(m_keys.shared, x["m_private"]), start)
          cst = jax.vmap(algorithm.client_update)(cst, dec)
          valid = (w > 0).astype(jnp.float32)
          msum = jax.tree.map(lambda a, d: a + jnp.tensordot(valid, d.astype(jnp.float32), 1),
                              msum, dec)
          up = up + _bits.count(mpay, batch_dims=1)
        algc = dict(state=cst, sender=msend, receiver=mrecv)
        carry = carry + (_scatter(algc_all, dest, algc), msum)
      return carry, (loss, finite, w, up)

    if uplink.reduce is not None:
      first = jax.tree.map(lambda x: x[0], xs)
      acc0 = jax.eval_shape(lambda: uplink.reduce(vclient(
          start, _gather(state.senders, first["ids"]), first["batches"], first["mask"],
          first["train"], Keys(up_keys.shared, first["private"]))[0], first["weight"]))
      acc0 = _zeros_like_payload(acc0)
    else:
      acc0 = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), start)
    carry0 = (acc0, state.senders, state.receivers)
    if algorithm is not None:
      carry0 = carry0 + (alg_clients,
                         jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), start))
    if n == 1:
      carry, per = run_chunk(carry0, jax.tree.map(lambda x: x[0], xs))
      per = jax.tree.map(lambda x: x[:num], per)
    else:
      carry, per = lax.scan(run_chunk, carry0, xs)
      per = _unchunked(per, num)
    acc, senders, receivers = carry[:3]
    loss, finite, w, up_bits = per

    # Aggregate over finite participants with normalized weights.
    total = jnp.sum(w)
    inv = 1.0 / jnp.where(total > 0, total, 1.0)
    if uplink.reduce is not None:
      # Normalise in the compressed domain, then decode once with the server's own receiver
      # state (`ServerState.aggregator`, e.g. FetchSGD's sketch momentum and error), which
      # persists across rounds; states built without one decode with client 0's (stateless).
      agg_keys = Keys(up_keys.shared, jax.random.fold_in(up_keys.shared, _keys.AGGREGATE))
      acc = uplink.reduce(jax.tree.map(lambda a: a[None], acc), jnp.reshape(inv, (1,)))
      aggregator = state.aggregator
      if aggregator is None:
        aggregator = jax.tree.map(lambda r: r[0], state.receivers)
      acc, aggregator = uplink.decode(acc, aggregator, agg_keys, start)
      if state.aggregator is not None:
        new["aggregator"] = aggregator
      inv = jnp.ones((), jnp.float32)
    agg = jax.tree.map(lambda a, p: (a.astype(jnp.float32) * inv).astype(jnp.asarray(p).dtype),
                       acc, start)

    if algorithm is not None:
      new["alg_clients"], msum = carry[3:]
      if algorithm.anchor:
        finite = finite & a_ok
        up_bits = up_bits + anchor_bits
      mean_sum = None
      if algorithm.message is not None:
        mean_sum = jax.tree.map(lambda a, p: (a / max(num_clients, 1)).astype(
            jnp.asarray(p).dtype), msum, start)
      new["alg_server"] = algorithm.server_update(state.alg_server, anchor, mean_sum)

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
