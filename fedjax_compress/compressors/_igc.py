"""Intrinsic gradient compression (IGC): static, K-subspace and time-varying Fastfood subspaces.

Melas-Kyriazi & Wang, "Intrinsic Gradient Compression for Federated Learning"
(arXiv 2112.02656). With the Fastfood map `V: R^d -> R^D` (`fedjax_compress.ops`), a client
uploads `c = V^T g` (d float32 numbers) and the server applies `V c`. Because `V^T` is linear,
the server sums `sum_k w_k c_k` in the compressed domain and decodes once (`reduce`,
`aggregate`). `V` is never sent: both sides regenerate it from a key (0 bits). The decoded
update is a shrunk estimate (`E[V V^T] ~ (d/D) I`), so learning rates must be re-tuned (spec
IGC 1.2, 2.5). Payloads are stamped with the encoded updates' signature, so a decode template
of another structure or shape raises `ValueError`. Empty leaves (shape `(0,)`) add nothing to
the raveled update; a model without parameters (`D = 0`, e.g. `{}`) has nothing to send and
every variant encodes it to a 0-bit message (no map is built; `0 < d <= D` is required
otherwise). Variants whose map depends on the round (random K-subspace, time-varying) raise
`ValueError` naming `keys` when `keys` is not a `Keys(shared, private)` of PRNG keys.

The protocol carries no round index, so the round-dependent maps come from `keys.shared` (the
same for every party of a round, see `keys.round_keys`) or from a counter state:

- `intrinsic_static`: `V = V(fold_in(seed, 0))`, the same in every round. Stateless.
- `intrinsic_k_subspace(schedule='random')`: subspace `k_t ~ U{0..K-1}` drawn from
  `keys.shared`, `V = V(fold_in(seed, k_t))`. Stateless: correct under partial participation.
- `intrinsic_k_subspace(schedule='cyclic')`: `k_t = t mod K` with `t` an `IgcState` counter
  that sender and receiver each advance once per message. Both sides stay in step only if the
  pair exchanges every round's message (full participation, or one counter per client pair);
  a client that skips rounds falls behind the server. Use 'random' under partial participation.
  No `aggregate`/`reduce` (the receiver is stateful).
- `intrinsic_time_varying`: a fresh `V = V(fold_in(keys.shared, 0))` every round. Stateless.

Server side of the subspace variants: `build_round` applies `server_tx` in `R^D`. Plain SGD
(or heavy-ball momentum) keeps the model in `theta_0 + range(V)`, but an adaptive optimizer
(Adam: per-coordinate scaling in `R^D`) does not, and the `32 d` downlink cannot deliver the
part outside the span. `subspace_server_tx(inner, d, K)` runs any optax optimizer on the
subspace coordinates instead (the paper's `z_{t+1} = ServerOpt(z_t, c)`), and
`subspace_client_tx` trains the static subspace locally (`tau > 1` steps on `z`).

Downlink costs (server -> client) are given by `intrinsic_downlink_bits` (spec IGC 2.4 table);
`intrinsic_static_downlink` (`32 d`) and `intrinsic_k_subspace_downlink` (`32 min(K d, D)`)
send absolute coordinates with those costs (time-varying IGC downloads the dense model).

Map defaults (`block_rows`, `permutation`, `generator` = 'auto', see `ops.fastfood_params`):
up to `next_pow2(D) = 2^16` the spec's exact global map (uniform permutation, `jax.random`
factors); above it blocked square maps of `max(2^16, next_pow2(d))` rows with the Feistel
permutation and hashed factors, which pass the same map tests (adjoint, float64 dense
reference, column norms, `V^T V` off-diagonals, `E[V V^T] = (d/D) I`; tests/test_fastfood.py)
and cost a few FWHT lengths to regenerate instead of a sort of length `2^ceil(log2 D)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, EmptyState, Field, Keys
from fedjax_compress._src.keys import as_key
from fedjax_compress.ops import _fastfood, _hadamard

_SUBSPACE_DRAW = 0x1C  # fold_in tag of the random subspace choice (K-subspace, 'random')
_FLOAT_BITS = 32
_CG_RTOL = 1e-6  # CG stops when ||A^T A z - A^T y|| <= rtol ||A^T y|| (float32 precision)
_BLOCK_RTOL = 1e-4  # subspace_server_tx: coordinate blocks below this (relative) are zero
COORDINATES = ("adjoint", "solve")


class IgcState(NamedTuple):
  """Round counter of the cyclic K-subspace schedule (sender and receiver keep one each)."""

  step: jax.Array  # int32 scalar


# select(keys, state) -> (map key or index into the fixed maps, new state)
_Select = Callable[[Keys, Any], tuple[jax.Array, Any]]


def _map_options(d, block_rows, gaussian, method, permutation, generator) -> tuple[int, dict]:
  """Validate the factory's map arguments; return `d` and the Fastfood map options."""
  d = checks.check_positive_int(d, "d (intrinsic dimension)")
  if isinstance(block_rows, str):
    if block_rows != "auto":
      raise ValueError(f"block_rows must be a positive int, None or 'auto', got {block_rows!r}")
  elif block_rows is not None:
    checks.check_positive_int(block_rows, "block_rows")
  if method not in _hadamard.METHODS:
    raise ValueError(f"method must be one of {_hadamard.METHODS}, got {method!r}")
  if permutation not in _fastfood.PERMUTATIONS:
    raise ValueError(f"permutation must be one of {_fastfood.PERMUTATIONS}, got {permutation!r}")
  if generator not in _fastfood.GENERATORS:
    raise ValueError(f"generator must be one of {_fastfood.GENERATORS}, got {generator!r}")
  return d, dict(block_rows=block_rows, gaussian=bool(gaussian), method=method,
                 permutation=permutation, generator=generator)


def _check_model(d: int, num: int) -> None:
  """`init`'s size check: `0 < d <= D`, or `D = 0` (no parameters: 0-bit messages, no map)."""
  if num:
    _fastfood.check_dims(d, num)


def _empty_coords() -> jax.Array:
  """Coordinates (and decoded vector) of a model without parameters: nothing, 0 bits."""
  return jnp.zeros((0,), jnp.float32)


def _least_squares(gram: Callable[[jax.Array], jax.Array], b: jax.Array,
                   iters: int) -> jax.Array:
  """`argmin_z ||A z - y||` by at most `iters` conjugate-gradient steps on `A^T A z = b`,
  `b = A^T y`, `gram(z) = A^T A z` (`ops.fastfood_gram`: blocked, no `D`-sized buffer).

  Started at `b` and stopped once the normal-equation residual is below `_CG_RTOL ||b||`:
  `A^T A = I + E` with `||E|| ~ sqrt(d/D)` for the near-orthonormal Fastfood columns, so a
  few steps reach float32 precision when `d << D`. The loop carries only `d`-sized vectors.
  Differentiated implicitly through the solve, not through the CG iterations.
  """
  def cg(matvec, rhs):
    def cond(carry):
      i, _, _, _, rr = carry
      return (i < iters) & (rr > tol2)

    def body(carry):
      i, z, r, u, rr = carry
      au = matvec(u)
      uau = jnp.vdot(u, au)
      alpha = jnp.where(uau > 0, rr / jnp.where(uau > 0, uau, 1.0), 0.0)
      z, r = z + alpha * u, r - alpha * au
      rr_new = jnp.vdot(r, r)
      beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
      return i + 1, z, r, r + beta * u, rr_new

    tol2 = jnp.float32(_CG_RTOL) ** 2 * jnp.vdot(rhs, rhs)
    r0 = rhs - matvec(rhs)
    return jax.lax.while_loop(cond, body, (0, rhs, r0, r0, jnp.vdot(r0, r0)))[1]

  return jax.lax.custom_linear_solve(gram, b, cg, symmetric=True)


_CACHE_MAX_TABLE = 1 << 20
"""Fixed maps are cached (computed once, embedded as constants) when their stored factor
tables hold at most this many entries; larger tables are regenerated inside each program."""


def _fixed_maps(d: int, seed, k: int, map_kw: dict) -> Callable[[int], Any]:
  """`maps(num)`: the `K` fixed maps `V_i = fastfood(fold_in(seed, i), d, num)` stacked.

  Computed eagerly once per `num` (also when first called under `jit`) and cached, so static
  and K-subspace programs do not regenerate the normalization (or small factor tables) on
  every call; hashed/Feistel maps cache only their keys and scales (`O(nb)` numbers). Maps
  with large stored tables (`permutation='uniform'` or `generator='threefry'` on a large
  model) are regenerated inside the program instead of being embedded as constants.
  """
  base = as_key(seed)

  def build(num: int):
    return jax.vmap(lambda i: _fastfood.fastfood_params(jax.random.fold_in(base, i), d, num,
                                                        **map_kw))(jnp.arange(k))

  @functools.lru_cache(maxsize=None)
  def cached(num: int):
    with jax.ensure_compile_time_eval():
      return build(num)

  def maps(num: int):
    rows, big_l, perm, gen = _fastfood.resolve(d, num, map_kw["block_rows"],
                                               map_kw["permutation"], map_kw["generator"])
    tables = (perm == "uniform") + (gen == "threefry") * (1 + map_kw["gaussian"])
    if tables * k * -(-num // rows) * big_l > _CACHE_MAX_TABLE:
      return build(num)
    return cached(num)

  return maps


def _stacked(d: int, seed, k: int, map_kw: dict):
  """`(maps(num), project(ps, Z), transpose(ps, y))` of `[V_1 .. V_K]`, `V_i` from
  `fold_in(seed, i)` as in `intrinsic_k_subspace` (`Z` is `[K, d]`).

  The `K` maps are applied one after another (`lax.scan`), so temporaries are those of one map.
  """
  maps = _fixed_maps(d, seed, k, map_kw)

  def project(ps, z):
    def step(acc, pz):
      p, zk = pz
      return acc + _fastfood.fastfood_project(p, zk), None
    return jax.lax.scan(step, jnp.zeros((ps.D,), jnp.float32), (ps, z))[0]

  def transpose(ps, y):
    return jax.lax.map(lambda p: _fastfood.fastfood_transpose(p, y), ps)

  return maps, project, transpose


def _igc(d: int, select: _Select, init_state: Callable[[], Any], stateless: bool,
         map_kw: dict, coordinates: str = "adjoint", cg_iters: int = 32,
         fixed: tuple[Any, int] | None = None) -> Compressor:
  """Compressor `c = V^T ravel(g)` (or `argmin ||V c - g||`) / `ravel(g) = V c`.

  `select(keys, state)` returns the map's key, or with `fixed = (seed, K)` its index into the
  cached maps `fold_in(seed, i)`, `i < K` (`_fixed_maps`).
  """
  maps = None if fixed is None else _fixed_maps(d, fixed[0], fixed[1], map_kw)

  def fastfood(key_or_index, num):
    if maps is None:
      return _fastfood.fastfood_params(key_or_index, d, num, **map_kw)
    return jax.tree.map(lambda x: x[key_or_index], maps(num))

  def init_fn(params):
    _check_model(d, layout.num_params(params))
    return init_state(), init_state()

  def encode_fn(updates, state, keys, params=None):
    del params
    checks.check_finite(updates)
    g = layout.ravel(updates)
    key, state = select(keys, state)
    if g.shape[0] == 0:  # no parameters: a 0-bit message (the counter still advances)
      return layout.stamp(Field(_empty_coords(), _FLOAT_BITS), updates), state
    p = fastfood(key, g.shape[0])
    if coordinates == "adjoint":
      c = _fastfood.fastfood_transpose(p, g)
    else:
      c = _least_squares(lambda z: _fastfood.fastfood_gram(p, z),
                         _fastfood.fastfood_transpose(p, g), cg_iters)
    return layout.stamp(Field(c, _FLOAT_BITS), updates), state

  def decode_fn(payload, state, keys, like):
    payload = layout.unstamp(payload, like)
    key, state = select(keys, state)
    num = layout.num_params(like)
    y = (_fastfood.fastfood_project(fastfood(key, num), payload.data) if num
         else _empty_coords())
    return layout.unraveler(like)(y), state

  def aggregate_fn(payloads, weights, keys, like):
    payloads = layout.unstamp(payloads, like)
    c = jnp.tensordot(weights.astype(jnp.float32), payloads.data, axes=1)
    key, _ = select(keys, None)
    num = layout.num_params(like)
    return layout.unraveler(like)(
        _fastfood.fastfood_project(fastfood(key, num), c) if num else _empty_coords())

  def reduce_fn(payloads, weights):
    # `decode` is linear in the coordinates: sum_k w_k V c_k = V (sum_k w_k c_k).
    return payloads.replace(data=jnp.tensordot(weights.astype(jnp.float32), payloads.data,
                                               axes=1))

  if not stateless:
    return Compressor(init_fn, encode_fn, decode_fn)
  return Compressor(init_fn, encode_fn, decode_fn, aggregate_fn, reduce_fn)


_MAP_ARGS_DOC = """`block_rows` ('auto', None = one global block, or rows per block; spec IGC 1.3),
  `gaussian=False` (`G := 1`, a test map), `method` (FWHT path), `permutation` ('auto',
  'uniform', 'feistel') and `generator` ('auto', 'threefry', 'hash') select the map, see
  `ops.fastfood_params`; the same options apply to every IGC factory and must agree between
  the uplink, downlink and `subspace_*_tx` of one run."""


def intrinsic_static(d: int, *, seed: int | jax.Array = 0, block_rows: int | str | None = "auto",
                     gaussian: bool = True, method: str = "auto", permutation: str = "auto",
                     generator: str = "auto", coordinates: str = "adjoint",
                     cg_iters: int = 32) -> Compressor:
  """Static-subspace IGC: upload `c = V^T g`, decode `V c`, one fixed map `V` from `seed`.

  `V = fastfood(fold_in(seed, 0), d, D)` over the raveled update (`D` parameters, `d <= D`,
  checked when shapes are known). Bits up: `32 d` per message; down: `32 d` (the server
  sends `z_t`; `intrinsic_static_downlink`). Equivalent to SGD on `z` in
  `theta = theta_0 + V z` (see `subspace_reparam`) when clients take one local step.
  `coordinates='solve'` uploads `argmin_c ||V c - g||` instead (at most `cg_iters` CG steps):
  the exact coordinates of an update that lies in `range(V)`, i.e. the local `z_t - z_end`
  of clients trained in the subspace with `subspace_client_tx` (with `'adjoint'` they would
  upload `V^T V (z_t - z_end)`).
  Map options: {map_args}

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.intrinsic_static(4, seed=0)
  >>> k = Keys(jax.random.key(0), jax.random.key(1))
  >>> p, _ = c.encode({'w': jnp.ones((3, 5))}, EmptyState(), k)
  >>> int(bits.count(p))
  128
  """
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  if coordinates not in COORDINATES:
    raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
  iters = checks.check_positive_int(cg_iters, "cg_iters")
  return _igc(d, lambda keys, state: (0, state), EmptyState, True, map_kw, coordinates, iters,
              fixed=(seed, 1))


def intrinsic_k_subspace(d: int, num_subspaces: int, *, seed: int | jax.Array = 0,
                         schedule: str = "random", block_rows: int | str | None = "auto",
                         gaussian: bool = True, method: str = "auto",
                         permutation: str = "auto", generator: str = "auto") -> Compressor:
  """K-subspace IGC: `K` fixed maps `V_k = fastfood(fold_in(seed, k))`, one used per round.

  Round `t` uploads `c = V_{k_t}^T g` (`32 d` bits); the server updates block `z_{k_t}` of
  `theta = theta_0 + sum_k V_k z_k`. `schedule='random'`: `k_t` drawn from `keys.shared`
  (stateless, has `aggregate` and `reduce`); `'cyclic'`: `k_t = t mod K` from an `IgcState`
  counter each side advances per message (stateful; needs every round's message, see module
  doc). Down: `32 min(K d, D)` bits (`intrinsic_k_subspace_downlink`). `K = 1` is
  `intrinsic_static` with the same seed. Clients train in `R^D` and upload the projection of
  their update (the paper's client step for one local step); local training inside the
  round's subspace is offered for the static variant only (`subspace_client_tx`), since a
  client optimizer does not see the round's subspace.
  Map options: {map_args}"""
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  k = checks.check_positive_int(num_subspaces, "num_subspaces")
  if schedule not in ("random", "cyclic"):
    raise ValueError(f"schedule must be 'random' or 'cyclic', got {schedule!r}")
  if schedule == "random":
    def select(keys, state):
      checks.check_keys(keys, "intrinsic_k_subspace(schedule='random'): keys")
      return jax.random.randint(jax.random.fold_in(keys.shared, _SUBSPACE_DRAW), (), 0, k), state
    return _igc(d, select, EmptyState, True, map_kw, fixed=(seed, k))

  def select_cyclic(keys, state):
    del keys
    return state.step % k, IgcState(state.step + 1)

  return _igc(d, select_cyclic, lambda: IgcState(jnp.zeros((), jnp.int32)), False, map_kw,
              fixed=(seed, k))


def intrinsic_time_varying(d: int, *, block_rows: int | str | None = "auto",
                           gaussian: bool = True, method: str = "auto",
                           permutation: str = "auto", generator: str = "auto") -> Compressor:
  """Time-varying IGC: a fresh map `V_t = fastfood(fold_in(keys.shared, 0))` every message.

  Upload `c = V_t^T g` (`32 d` bits), decode `V_t c`; the server keeps the full model (any
  optax optimizer in `R^D` is honoured: the span is not restricted). Down: `32 D` bits
  (every coordinate changes each round; `intrinsic_downlink_bits('time_varying', ...)`).
  With a constant `keys.shared = seed` it equals `intrinsic_static(d, seed=seed)`. With the
  'auto' map the factors of large models are hashed and Feistel-permuted, so the fresh map
  costs no sort and no factor buffers each round.
  Map options: {map_args}"""
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  def select(keys, state):
    checks.check_keys(keys, "intrinsic_time_varying: keys")
    return jax.random.fold_in(keys.shared, 0), state

  return _igc(d, select, EmptyState, True, map_kw)


for _factory in (intrinsic_static, intrinsic_k_subspace, intrinsic_time_varying):
  _factory.__doc__ = _factory.__doc__.replace("{map_args}", _MAP_ARGS_DOC)


class SubspaceCoords(NamedTuple):
  """Absolute coordinates of the broadcast model relative to `theta_0` (IGC downlink state)."""

  z: jax.Array  # (K, d) float32, or (D,) when K d >= D (the dense theta - theta_0)


def _coords_downlink(d: int, seed, k: int, map_kw: dict, iters: int) -> Compressor:
  """Downlink sending the absolute coordinates `Z` of `theta - theta_0` in `[V_1 .. V_K]`."""
  maps, project, transpose = _stacked(d, seed, k, map_kw)

  def dense(num: int) -> bool:
    return k * d >= num

  def init_fn(params):
    num = layout.num_params(params)
    _check_model(d, num)  # D = 0: dense, empty coordinates (0-bit messages)
    z = jnp.zeros((num,) if dense(num) else (k, d), jnp.float32)
    return SubspaceCoords(z), SubspaceCoords(z)

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)
    y = layout.ravel(updates)
    if dense(y.shape[0]):
      dz = y
    else:
      ps = maps(y.shape[0])
      dz = _least_squares(lambda z: _fastfood.fastfood_gram(ps, z), transpose(ps, y), iters)
    z = state.z + dz
    return layout.stamp(Field(z, _FLOAT_BITS), updates), SubspaceCoords(z)

  def decode_fn(payload, state, keys, like):
    del keys
    payload = layout.unstamp(payload, like)
    num = layout.num_params(like)
    if payload.data.shape != state.z.shape:
      raise ValueError(f"decode: coordinates of shape {payload.data.shape} do not match the "
                       f"receiver state {state.z.shape}")
    dz = payload.data - state.z
    y = dz if dense(num) else project(maps(num), dz)
    return layout.unraveler(like)(y), SubspaceCoords(payload.data)

  return Compressor(init_fn, encode_fn, decode_fn)


def intrinsic_static_downlink(d: int, *, seed: int | jax.Array = 0, cg_iters: int = 32,
                              block_rows: int | str | None = "auto", gaussian: bool = True,
                              method: str = "auto", permutation: str = "auto",
                              generator: str = "auto") -> Compressor:
  """Server -> client channel of static IGC: send the absolute coordinates `z_t`, `32 d` bits.

  The broadcast model is `theta_0 + V z_t` with the map of `intrinsic_static(d, seed=seed)`.
  `encode(delta)` adds `argmin_z ||V z - delta||` (at most `cg_iters` conjugate-gradient steps
  on `V^T V z = V^T delta`, started at `V^T delta`, stopped at float32 precision) to the
  sender's `z` and sends `z_t` itself (the spec's download); `decode` returns
  `V (z_t - z_prev)` and keeps `z_t`, so a client that missed any number of rounds
  resynchronises from its last state and the latest message alone (or from `theta_0`: its
  model is `theta_0 + V z_t`). Deltas of a static-IGC server with SGD, momentum or
  `subspace_server_tx` lie in `range(V)` and are sent exactly up to float rounding; other
  deltas (e.g. plain `optax.adam` in `R^D`) lose their part outside `range(V)`. When `d = D`
  the coordinates are the dense `theta - theta_0`. Stateful on both sides (the coordinates);
  no `aggregate`. Map options as `intrinsic_static`.
  """
  return intrinsic_k_subspace_downlink(d, 1, seed=seed, cg_iters=cg_iters,
                                       block_rows=block_rows, gaussian=gaussian, method=method,
                                       permutation=permutation, generator=generator)


def intrinsic_k_subspace_downlink(d: int, num_subspaces: int, *, seed: int | jax.Array = 0,
                                  cg_iters: int = 32, block_rows: int | str | None = "auto",
                                  gaussian: bool = True, method: str = "auto",
                                  permutation: str = "auto",
                                  generator: str = "auto") -> Compressor:
  """Server -> client channel of K-subspace IGC: all `K` coordinate blocks, `32 min(K d, D)` bits.

  The broadcast model is `theta_0 + sum_k V_k z_k` with the maps of
  `intrinsic_k_subspace(d, K, seed=seed)`. Every message carries the whole `Z = (z_1..z_K)`,
  so a client that missed any number of rounds rebuilds the model from `theta_0` and the
  latest message alone (the spec's `min(K d, D)` download). `encode(delta)` adds
  `argmin_Z ||sum_k V_k z_k - delta||` (CG on the stacked `K d`-column map, see
  `intrinsic_static_downlink`) to the sender's `Z` and sends it; `decode` returns
  `sum_k V_k (Z - Z_prev)`. Deltas that lie in `range([V_1 .. V_K])` are sent exactly up to
  float rounding: those of a server running SGD or heavy-ball momentum in `R^D`, or any optax
  optimizer through `subspace_server_tx(inner, d, K)`. A plain adaptive optimizer in `R^D`
  (`optax.adam`) leaves the span (per-coordinate scaling does not commute with the maps), and
  only the orthogonal projection of its delta reaches the clients. When `K d >= D` the
  coordinates are the dense `theta - theta_0` (`32 D` bits). `K = 1` is
  `intrinsic_static_downlink`. Stateful on both sides; no `aggregate`. Map options as
  `intrinsic_static`.
  """
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  k = checks.check_positive_int(num_subspaces, "num_subspaces")
  iters = checks.check_positive_int(cg_iters, "cg_iters")
  return _coords_downlink(d, seed, k, map_kw, iters)


class SubspaceOptState(NamedTuple):
  """State of `subspace_server_tx` / `subspace_client_tx`: coordinates and inner state."""

  z: jax.Array   # (K, d) coordinates of params - params_at_init, or (D,) when dense
  inner: Any     # the inner optimizer's state (over `z`)


def subspace_server_tx(inner: optax.GradientTransformation, d: int, num_subspaces: int = 1, *,
                       seed: int | jax.Array = 0, cg_iters: int = 32,
                       block_rows: int | str | None = "auto", gaussian: bool = True,
                       method: str = "auto", permutation: str = "auto",
                       generator: str = "auto") -> optax.GradientTransformation:
  """Server optimizer of static / K-subspace IGC in coordinate space: `z <- z + inner(c)`.

  For `build_round(..., server_tx=subspace_server_tx(optax.adam(lr), d, K, seed=s), ...)`
  with the uplink `intrinsic_static(d, seed=s)` (`K = 1`) or `intrinsic_k_subspace(d, K,
  seed=s)` and the same map options. `update(g)` maps the aggregated `R^D` update
  `g = sum_k V_k c_k` back to its coordinates `C = argmin ||sum_k V_k c_k - g||` (CG, as
  `intrinsic_k_subspace_downlink`; exact up to float rounding since `g` lies in the span),
  applies `inner` to `C` (`[K, d]`; params of `inner` are the accumulated coordinates `Z`)
  and returns `sum_k V_k inner(C)_k`. Hence with any optax optimizer (Adam included) the
  model stays in `theta_0 + range([V_1 .. V_K])` and the IGC downlink delivers it exactly:
  the paper's `z_{t+1} = ServerOpt(z_t, c)`. With `optax.sgd` it equals plain SGD in `R^D`.
  For `K > 1`, coordinate blocks whose norm is below `1e-4` of the largest are set to exactly
  zero (solver noise in the blocks a round did not update; an aggregate spanning several
  blocks at very different scales would lose the small ones).
  When `K d >= D` the coordinates are `R^D` itself (the wrapper is `inner`). Costs per round:
  a few Fastfood applications (CG stops at float32 precision) over the `K` maps.
  """
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  k = checks.check_positive_int(num_subspaces, "num_subspaces")
  iters = checks.check_positive_int(cg_iters, "cg_iters")
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  maps, project, transpose = _stacked(d, seed, k, map_kw)

  def init_fn(params):
    num = layout.num_params(params)
    _fastfood.check_dims(d, num)
    z = jnp.zeros((num,) if k * d >= num else (k, d), jnp.float32)
    return SubspaceOptState(z, inner.init(z))

  def update_fn(updates, state, params=None):
    del params
    y = layout.ravel(updates)
    if k * d >= y.shape[0]:
      c = y
    else:
      ps = maps(y.shape[0])
      c = _least_squares(lambda z: _fastfood.fastfood_gram(ps, z), transpose(ps, y), iters)
      if k > 1:
        # A K-subspace round updates one block; the solve leaves float32 noise (~1e-7
        # relative) in the others, which a scale-invariant optimizer (Adam) would turn into
        # full-size steps. Blocks below _BLOCK_RTOL of the largest are exactly zero.
        norms = jnp.sqrt(jnp.sum(jnp.square(c), axis=-1, keepdims=True))
        c = jnp.where(norms > _BLOCK_RTOL * jnp.max(norms), c, 0.0)
    u, inner_state = inner.update(c, state.inner, state.z)
    out = u if k * d >= y.shape[0] else project(ps, u)
    return layout.unraveler(updates)(out), SubspaceOptState(state.z + u, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def subspace_client_tx(inner: optax.GradientTransformation, d: int, *,
                       seed: int | jax.Array = 0, block_rows: int | str | None = "auto",
                       gaussian: bool = True, method: str = "auto", permutation: str = "auto",
                       generator: str = "auto") -> optax.GradientTransformation:
  """Client optimizer training the static subspace: `z <- z + inner(V^T grad)`, `theta += V dz`.

  As `client_tx` of `build_round` it makes every local step a step of `inner` on `z` in
  `theta = theta_start + V z` (`grad_z = V^T grad_theta`), so after `tau` steps the update
  `theta_start - theta_end = V (z_0 - z_tau)` lies in `range(V)`: the paper's client update
  for `tau > 1`. Pair it with `intrinsic_static(d, seed=seed, coordinates='solve')`, which
  uploads exactly `z_0 - z_tau`, and `subspace_server_tx`. Same map as
  `intrinsic_static(d, seed=seed)` with the same options. Static IGC only: a K-subspace or
  time-varying round's map is chosen by the round keys, which a client optimizer does not see.
  """
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  maps = _fixed_maps(d, seed, 1, map_kw)

  def init_fn(params):
    _fastfood.check_dims(d, layout.num_params(params))
    z = jnp.zeros((d,), jnp.float32)
    return SubspaceOptState(z, inner.init(z))

  def update_fn(updates, state, params=None):
    del params
    g = layout.ravel(updates)
    p = jax.tree.map(lambda x: x[0], maps(g.shape[0]))
    u, inner_state = inner.update(_fastfood.fastfood_transpose(p, g), state.inner, state.z)
    return (layout.unraveler(updates)(_fastfood.fastfood_project(p, u)),
            SubspaceOptState(state.z + u, inner_state))

  return optax.GradientTransformation(init_fn, update_fn)


def intrinsic_downlink_bits(variant: str, d: int, num_params: int, *,
                            num_subspaces: int = 1) -> int:
  """Per-client, per-round downlink bits of an IGC variant (spec IGC 2.4, float32 values).

  'static': `32 d` (the server broadcasts `z_t`); 'k_subspace': `32 min(K d, D)` (all `z_k`,
  or the dense model when cheaper); 'time_varying': `32 D` (the dense model). Map seeds
  cost 0 bits (derived from the round keys both sides know). `intrinsic_static_downlink`
  and `intrinsic_k_subspace_downlink` are compressors that send exactly these bits.

  >>> intrinsic_downlink_bits('k_subspace', 10, 25, num_subspaces=3)
  800
  """
  d, D = _fastfood.check_dims(d, num_params)  # pylint: disable=invalid-name
  k = checks.check_positive_int(num_subspaces, "num_subspaces")
  if variant == "static":
    return _FLOAT_BITS * d
  if variant == "k_subspace":
    return _FLOAT_BITS * min(k * d, D)
  if variant == "time_varying":
    return _FLOAT_BITS * D
  raise ValueError(f"variant must be 'static', 'k_subspace' or 'time_varying', got {variant!r}")


def subspace_reparam(theta_0: Any, d: int, *, seed: int | jax.Array = 0,
                     block_rows: int | str | None = "auto", gaussian: bool = True,
                     method: str = "auto", permutation: str = "auto",
                     generator: str = "auto") -> Callable[[jax.Array], Any]:
  """`z -> theta_0 + V z` (unraveled to `theta_0`'s structure/dtypes), spec IGC 2.1/2.2.

  Uses the same map as `intrinsic_static(d, seed=seed, ...)`, so SGD on `z` with
  `loss(theta_0 + V z)` (gradient `V^T grad loss`) is static IGC. `z` starts at zeros(d).
  """
  d, map_kw = _map_options(d, block_rows, gaussian, method, permutation, generator)
  num = layout.num_params(theta_0)
  _fastfood.check_dims(d, num)
  key = jax.random.fold_in(as_key(seed), 0)
  flat0 = layout.ravel(theta_0)
  unravel = layout.unraveler(theta_0)

  def theta(z: jax.Array) -> Any:
    p = _fastfood.fastfood_params(key, d, num, **map_kw)
    return unravel(flat0 + _fastfood.fastfood_project(p, z))

  return theta


def subspace_loss(loss_fn: Callable[..., jax.Array], theta_0: Any, d: int,
                  **map_kwargs) -> Callable[..., jax.Array]:
  """`loss_z(z, *args, **kw) = loss_fn(theta_0 + V z, *args, **kw)` (see `subspace_reparam`)."""
  theta = subspace_reparam(theta_0, d, **map_kwargs)
  return lambda z, *args, **kwargs: loss_fn(theta(z), *args, **kwargs)


__all__ = ["intrinsic_static", "intrinsic_k_subspace", "intrinsic_time_varying",
           "intrinsic_static_downlink", "intrinsic_k_subspace_downlink", "SubspaceCoords",
           "intrinsic_downlink_bits", "subspace_reparam", "subspace_loss", "IgcState",
           "subspace_server_tx", "subspace_client_tx", "SubspaceOptState"]
