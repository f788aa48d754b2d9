"""Intrinsic gradient compression (IGC): static, K-subspace and time-varying Fastfood subspaces.

Melas-Kyriazi & Wang, "Intrinsic Gradient Compression for Federated Learning"
(arXiv 2112.02656). With the Fastfood map `V: R^d -> R^D` (`fedjax_compress.ops`), a client
uploads `c = V^T g` (d float32 numbers) and the server applies `V c`. Because `V^T` is linear,
`aggregate` sums `sum_k w_k c_k` in the compressed domain and decodes once. `V` is never sent:
both sides regenerate it from a key (0 bits). The decoded update is a shrunk estimate
(`E[V V^T] ~ (d/D) I`), so learning rates must be re-tuned (spec IGC 1.2, 2.5).

The protocol carries no round index, so the round-dependent maps come from `keys.shared` (the
same for every party of a round, see `keys.round_keys`) or from a counter state:

- `intrinsic_static`: `V = V(fold_in(seed, 0))`, the same in every round. Stateless.
- `intrinsic_k_subspace(schedule='random')`: subspace `k_t ~ U{0..K-1}` drawn from
  `keys.shared`, `V = V(fold_in(seed, k_t))`. Stateless: correct under partial participation.
- `intrinsic_k_subspace(schedule='cyclic')`: `k_t = t mod K` with `t` an `IgcState` counter
  that sender and receiver each advance once per message. Both sides stay in step only if the
  pair exchanges every round's message (full participation, or one counter per client pair);
  a client that skips rounds falls behind the server. Use 'random' under partial participation.
  No `aggregate` (the receiver is stateful).
- `intrinsic_time_varying`: a fresh `V = V(fold_in(keys.shared, 0))` every round. Stateless.

Downlink costs (server -> client; not a property of these uplink compressors) are given by
`intrinsic_downlink_bits` (spec IGC 2.4 table); `intrinsic_static_downlink` (`32 d`) and
`intrinsic_k_subspace_downlink` (`32 min(K d, D)`) are actual downlink compressors with those
costs (time-varying IGC downloads the dense model).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_compress._src import checks, layout
from fedjax_compress._src.base import Compressor, EmptyState, Field, Keys
from fedjax_compress._src.keys import as_key
from fedjax_compress.ops import _fastfood, _hadamard

_SUBSPACE_DRAW = 0x1C  # fold_in tag of the random subspace choice (K-subspace, 'random')
_FLOAT_BITS = 32


class IgcState(NamedTuple):
  """Round counter of the cyclic K-subspace schedule (sender and receiver keep one each)."""

  step: jax.Array  # int32 scalar


# select(keys, state) -> (map key, new state)
_Select = Callable[[Keys, Any], tuple[jax.Array, Any]]


def _igc(d: int, select: _Select, init_state: Callable[[], Any], stateless: bool,
         map_kw: dict) -> Compressor:
  """Compressor `c = V^T ravel(g)` / `ravel(g) = V c` with the map chosen by `select`."""

  def fastfood(key, num):
    return _fastfood.fastfood_params(key, d, num, **map_kw)

  def init_fn(params):
    _fastfood.check_dims(d, layout.num_params(params))
    return init_state(), init_state()

  def encode_fn(updates, state, keys, params=None):
    del params
    checks.check_finite(updates)
    g = layout.ravel(updates)
    key, state = select(keys, state)
    c = _fastfood.fastfood_transpose(fastfood(key, g.shape[0]), g)
    return Field(c, _FLOAT_BITS), state

  def decode_fn(payload, state, keys, like):
    key, state = select(keys, state)
    y = _fastfood.fastfood_project(fastfood(key, layout.num_params(like)), payload.data)
    return layout.unraveler(like)(y), state

  def aggregate_fn(payloads, weights, keys, like):
    c = jnp.tensordot(weights.astype(jnp.float32), payloads.data, axes=1)
    key, _ = select(keys, None)
    return layout.unraveler(like)(
        _fastfood.fastfood_project(fastfood(key, layout.num_params(like)), c))

  return Compressor(init_fn, encode_fn, decode_fn, aggregate_fn if stateless else None)


def _check_common(d, block_rows, gaussian, method, permutation) -> tuple[int, dict]:
  """Validate the factory arguments; return `d` and the Fastfood map options."""
  d = checks.check_positive_int(d, "d (intrinsic dimension)")
  if block_rows is not None:
    checks.check_positive_int(block_rows, "block_rows")
  if method not in _hadamard.METHODS:
    raise ValueError(f"method must be one of {_hadamard.METHODS}, got {method!r}")
  if permutation not in _fastfood.PERMUTATIONS:
    raise ValueError(f"permutation must be one of {_fastfood.PERMUTATIONS}, got {permutation!r}")
  return d, dict(block_rows=block_rows, gaussian=bool(gaussian), method=method,
                 permutation=permutation)


def intrinsic_static(d: int, *, seed: int | jax.Array = 0, block_rows: int | None = None,
                     gaussian: bool = True, method: str = "auto",
                     permutation: str = "uniform") -> Compressor:
  """Static-subspace IGC: upload `c = V^T g`, decode `V c`, one fixed map `V` from `seed`.

  `V = fastfood(fold_in(seed, 0), d, D)` over the raveled update (`D` parameters, `d <= D`,
  checked when shapes are known). Bits up: `32 d` per message; down: `32 d` (the server
  sends `z_t`; `intrinsic_downlink_bits('static', ...)`). `block_rows` selects the blocked
  map (spec IGC 1.3), `gaussian=False` sets `G := 1` (test map), `method` the FWHT path,
  `permutation='feistel'` a sort-free permutation (much cheaper to regenerate for large D;
  see `ops.fastfood_params`). The same options apply to every IGC factory.
  Equivalent to SGD on `z` in `theta = theta_0 + V z` (see `subspace_reparam`).

  >>> import jax, jax.numpy as jnp
  >>> from fedjax_compress import compressors, Keys, bits
  >>> c = compressors.intrinsic_static(4, seed=0)
  >>> k = Keys(jax.random.key(0), jax.random.key(1))
  >>> p, _ = c.encode({'w': jnp.ones((3, 5))}, EmptyState(), k)
  >>> int(bits.count(p))
  128
  """
  d, map_kw = _check_common(d, block_rows, gaussian, method, permutation)
  key = jax.random.fold_in(as_key(seed), 0)
  return _igc(d, lambda keys, state: (key, state), EmptyState, True, map_kw)


def intrinsic_k_subspace(d: int, num_subspaces: int, *, seed: int | jax.Array = 0,
                         schedule: str = "random", block_rows: int | None = None,
                         gaussian: bool = True, method: str = "auto",
                         permutation: str = "uniform") -> Compressor:
  """K-subspace IGC: `K` fixed maps `V_k = fastfood(fold_in(seed, k))`, one used per round.

  Round `t` uploads `c = V_{k_t}^T g` (`32 d` bits); the server updates block `z_{k_t}` of
  `theta = theta_0 + sum_k V_k z_k`. `schedule='random'`: `k_t` drawn from `keys.shared`
  (stateless, has `aggregate`); `'cyclic'`: `k_t = t mod K` from an `IgcState` counter each
  side advances per message (stateful; needs every round's message, see module doc).
  Down: `32 min(K d, D)` bits (`intrinsic_downlink_bits('k_subspace', ...)`). `K = 1` is
  `intrinsic_static` with the same seed.
  """
  d, map_kw = _check_common(d, block_rows, gaussian, method, permutation)
  k = checks.check_positive_int(num_subspaces, "num_subspaces")
  if schedule not in ("random", "cyclic"):
    raise ValueError(f"schedule must be 'random' or 'cyclic', got {schedule!r}")
  base = as_key(seed)
  if schedule == "random":
    def select(keys, state):
      idx = jax.random.randint(jax.random.fold_in(keys.shared, _SUBSPACE_DRAW), (), 0, k)
      return jax.random.fold_in(base, idx), state
    return _igc(d, select, EmptyState, True, map_kw)

  def select_cyclic(keys, state):
    del keys
    return jax.random.fold_in(base, state.step % k), IgcState(state.step + 1)

  return _igc(d, select_cyclic, lambda: IgcState(jnp.zeros((), jnp.int32)), False, map_kw)


def intrinsic_time_varying(d: int, *, block_rows: int | None = None, gaussian: bool = True,
                           method: str = "auto", permutation: str = "uniform") -> Compressor:
  """Time-varying IGC: a fresh map `V_t = fastfood(fold_in(keys.shared, 0))` every message.

  Upload `c = V_t^T g` (`32 d` bits), decode `V_t c`; the server keeps the full model.
  Down: `32 D` bits (every coordinate changes each round;
  `intrinsic_downlink_bits('time_varying', ...)`). With a constant `keys.shared = seed`
  it equals `intrinsic_static(d, seed=seed)`.
  """
  d, map_kw = _check_common(d, block_rows, gaussian, method, permutation)
  return _igc(d, lambda keys, state: (jax.random.fold_in(keys.shared, 0), state), EmptyState,
              True, map_kw)


def _least_squares(project: Callable[[jax.Array], jax.Array],
                   transpose: Callable[[jax.Array], jax.Array], y: jax.Array,
                   iters: int) -> jax.Array:
  """`argmin_z ||A z - y||` by `iters` conjugate-gradient steps on `A^T A z = A^T y`.

  Started at `A^T y` (`A^T A ~ I` for the near-orthonormal Fastfood columns, so a few steps
  reach float32 precision). Differentiated implicitly through the solve, not through the CG
  iterations (whose coefficients are ill-conditioned once the residual vanishes).
  """
  gram = lambda z: transpose(project(z))
  b = transpose(y)

  def cg(matvec, rhs):
    def step(_, carry):
      z, r, u, rr = carry
      au = matvec(u)
      uau = jnp.vdot(u, au)
      alpha = jnp.where(uau > 0, rr / jnp.where(uau > 0, uau, 1.0), 0.0)
      z, r = z + alpha * u, r - alpha * au
      rr_new = jnp.vdot(r, r)
      beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
      return z, r, r + beta * u, rr_new

    r0 = rhs - matvec(rhs)
    return jax.lax.fori_loop(0, iters, step, (rhs, r0, r0, jnp.vdot(r0, r0)))[0]

  return jax.lax.custom_linear_solve(gram, b, cg, symmetric=True)


def intrinsic_static_downlink(d: int, *, seed: int | jax.Array = 0, cg_iters: int = 32,
                              block_rows: int | None = None, gaussian: bool = True,
                              method: str = "auto",
                              permutation: str = "uniform") -> Compressor:
  """Server -> client channel of static IGC: send the subspace coordinates, `32 d` bits.

  `encode(delta)` sends `z* = argmin_z ||V z - delta||` (the same `V` as
  `intrinsic_static(d, seed=seed)`), found by `cg_iters` conjugate-gradient steps on
  `V^T V z = V^T delta` started at `V^T delta` (`V^T V ~ I` for `d << D`, so a few steps
  reach float32 precision); `decode(z) = V z`. Static-IGC model deltas
  `theta_{t+1} - theta_t = V dz` lie in `range(V)`, so they are sent exactly (up to float
  rounding): the spec's `32 d` download. Other inputs get their orthogonal projection onto
  `range(V)`. As `d -> D`, `V^T V` gets ill-conditioned and more steps may be needed.
  """
  d, map_kw = _check_common(d, block_rows, gaussian, method, permutation)
  iters = checks.check_positive_int(cg_iters, "cg_iters")
  key = jax.random.fold_in(as_key(seed), 0)

  def fastfood(num):
    return _fastfood.fastfood_params(key, d, num, **map_kw)

  def init_fn(params):
    _fastfood.check_dims(d, layout.num_params(params))
    return EmptyState(), EmptyState()

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)
    y = layout.ravel(updates)
    p = fastfood(y.shape[0])
    z = _least_squares(lambda z: _fastfood.fastfood_project(p, z),
                       lambda y: _fastfood.fastfood_transpose(p, y), y, iters)
    return Field(z, _FLOAT_BITS), state

  def decode_fn(payload, state, keys, like):
    del keys
    y = _fastfood.fastfood_project(fastfood(layout.num_params(like)), payload.data)
    return layout.unraveler(like)(y), state

  def aggregate_fn(payloads, weights, keys, like):
    del keys
    z = jnp.tensordot(weights.astype(jnp.float32), payloads.data, axes=1)
    return layout.unraveler(like)(
        _fastfood.fastfood_project(fastfood(layout.num_params(like)), z))

  return Compressor(init_fn, encode_fn, decode_fn, aggregate_fn)


class SubspaceCoords(NamedTuple):
  """Coordinates of the broadcast model relative to `theta_0` (K-subspace downlink state)."""

  z: jax.Array  # (K, d) float32, or (D,) when K d >= D (the dense delta)


def intrinsic_k_subspace_downlink(d: int, num_subspaces: int, *, seed: int | jax.Array = 0,
                                  cg_iters: int = 32, block_rows: int | None = None,
                                  gaussian: bool = True, method: str = "auto",
                                  permutation: str = "uniform") -> Compressor:
  """Server -> client channel of K-subspace IGC: all `K` coordinate blocks, `32 min(K d, D)` bits.

  The broadcast model is `theta_0 + sum_k V_k z_k` with the maps of
  `intrinsic_k_subspace(d, K, seed=seed)`. Every message carries the whole `Z = (z_1..z_K)`,
  so a client that missed any number of rounds rebuilds the model from `theta_0` and the
  latest message alone (the spec's `min(K d, D)` download). `encode(delta)` adds
  `argmin_Z ||sum_k V_k z_k - delta||` (CG on the stacked `K d`-column map, see
  `intrinsic_static_downlink`) to the sender's `Z` and sends it; `decode` returns
  `sum_k V_k (Z - Z_prev)`. Deltas of a K-subspace server (SGD, momentum or Adam on the
  decoded updates) lie in `range([V_1 .. V_K])` and are sent exactly up to float rounding.
  When `K d >= D` the coordinates are the dense `theta - theta_0` (`32 D` bits). `K = 1`
  decodes as `intrinsic_static_downlink`. Stateful on both sides; no `aggregate`.
  """
  d, map_kw = _check_common(d, block_rows, gaussian, method, permutation)
  k = checks.check_positive_int(num_subspaces, "num_subspaces")
  iters = checks.check_positive_int(cg_iters, "cg_iters")
  map_keys = jax.vmap(lambda i: jax.random.fold_in(as_key(seed), i))(jnp.arange(k))

  def dense(num: int) -> bool:
    return k * d >= num

  def maps(num):
    return jax.vmap(lambda key: _fastfood.fastfood_params(key, d, num, **map_kw))(map_keys)

  def project(ps, z):
    return jnp.sum(jax.vmap(_fastfood.fastfood_project)(ps, z), axis=0)

  def transpose(ps, y):
    return jax.vmap(lambda p: _fastfood.fastfood_transpose(p, y))(ps)

  def init_fn(params):
    num = layout.num_params(params)
    _fastfood.check_dims(d, num)
    z = jnp.zeros((num,) if dense(num) else (k, d), jnp.float32)
    return SubspaceCoords(z), SubspaceCoords(z)

  def encode_fn(updates, state, keys, params=None):
    del keys, params
    checks.check_finite(updates)
    y = layout.ravel(updates).astype(jnp.float32)
    if dense(y.shape[0]):
      dz = y
    else:
      ps = maps(y.shape[0])
      dz = _least_squares(lambda z: project(ps, z), lambda v: transpose(ps, v), y, iters)
    z = state.z + dz
    return Field(z, _FLOAT_BITS), SubspaceCoords(z)

  def decode_fn(payload, state, keys, like):
    del keys
    num = layout.num_params(like)
    dz = payload.data - state.z
    y = dz if dense(num) else project(maps(num), dz)
    return layout.unraveler(like)(y), SubspaceCoords(payload.data)

  return Compressor(init_fn, encode_fn, decode_fn, None)


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
                     block_rows: int | None = None, gaussian: bool = True,
                     method: str = "auto",
                     permutation: str = "uniform") -> Callable[[jax.Array], Any]:
  """`z -> theta_0 + V z` (unraveled to `theta_0`'s structure/dtypes), spec IGC 2.1/2.2.

  Uses the same map as `intrinsic_static(d, seed=seed, ...)`, so SGD on `z` with
  `loss(theta_0 + V z)` (gradient `V^T grad loss`) is static IGC. `z` starts at zeros(d).
  """
  d, map_kw = _check_common(d, block_rows, gaussian, method, permutation)
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
           "intrinsic_downlink_bits", "subspace_reparam", "subspace_loss", "IgcState"]
