"""FL algorithms beyond FedAvg through the same round: FedProx, FedAvgM/FedAdam/FedYogi, SCAFFOLD, Mime.

Three kinds, by what they need from `build_round`:

- Client optimizers (`fedprox`): an optax transformation passed as `client_tx`. The round
  initialises `client_tx` from the broadcast model every round, so `init` sees `x`.
- Server optimizers (`fedavgm`, `fedadam`, `fedyogi`): `server_tx` applied to the
  pseudo-gradient `g = sum_i w_i (x - y_i)`, i.e. `Delta = -g` in Reddi et al. (2021).
- Round extensions (`scaffold`, `mime`, `mimelite`): an `Algorithm` passed as
  `build_round(..., algorithm=)` and `init_server_state(..., algorithm=)`. It adds per-client
  state (stacked over `num_clients` in `ServerState.alg_clients`, gathered and scattered like
  the compressor states), server state (`ServerState.alg_server`), a broadcast to every
  client (billed dense in `down_bits`) and extra uplink messages (billed in `up_bits`, dense
  or through `Algorithm.compressor`).

Round of an `Algorithm` `A` (x: the model clients start from, S: the cohort):

1. Every client receives `r = A.broadcast(server_state)`.
2. `A.anchor >= 1`: each client sends `grad f_i(x)` (full local batch: the example-weighted
   mean of its minibatch gradients at x); the server forms `a = sum_i w_i decode(.)` over
   finite clients. `A.anchor == 2`: `a` is broadcast back before training (billed dense).
3. Local steps `y <- y + client_tx(A.correct(g, g_x, c_i, r, a))`, `g = grad f(y; z)`,
   `g_x = grad f(x; z)` on the same minibatch and key when `A.svrg`, else None.
4. `A.message` (optional): the client sends `m_i = A.message(c_i, r, x, y, K_i, grad f_i(x))`
   (`K_i` = local steps taken), then `c_i <- A.client_update(c_i, decode(m_i))`.
5. `server_state <- A.server_update(server_state, a, sum_{i valid} decode(m_i) / N)` with N
   = `num_clients`; the model step is the usual `server_tx` on the pseudo-gradient.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_compress._src import checks
from fedjax_compress._src.base import Compressor

Params = Any


# --------------------------------------------------------------------------- client optimizers

class FedProxState(NamedTuple):
  """`fedprox` state: the round's start model and the inner optimizer's state."""

  start: Params
  inner: Any


def fedprox(inner: optax.GradientTransformation, mu: float) -> optax.GradientTransformation:
  """FedProx (Li et al. 2020) as a `client_tx`: `inner` on `grad + mu (p - p_start)`.

  The proximal term `mu/2 ||p - x||^2` of the local objective contributes `mu (p - x)`.
  `init(params)` stores `x = params`; `build_round` re-initialises `client_tx` from the
  broadcast model every round, so `x` is the round's start model. `update` needs `params`.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  mu = float(mu)
  if not mu >= 0:
    raise ValueError(f"mu must be >= 0, got {mu}")

  def init_fn(params):
    return FedProxState(jax.tree.map(jnp.asarray, params), inner.init(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("fedprox.update needs params (the current local model)")
    prox = jax.tree.map(lambda g, p, s: g + mu * (p - s).astype(g.dtype),
                        updates, params, state.start)
    out, inner_state = inner.update(prox, state.inner, params)
    return out, FedProxState(state.start, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------- server optimizers

class FedOptState(NamedTuple):
  """Reddi et al. server moments: `m` (first), `v` (second)."""

  m: Params
  v: Params


def scale_by_fedopt(b1: float, b2: float, eps: float, *, yogi: bool = False,
                    initial_accumulator: Optional[float] = None) -> optax.GradientTransformation:
  """Reddi et al. (2021) Algorithm 2 without learning rate and without bias correction.

  `m <- b1 m + (1 - b1) g`; Adam: `v <- b2 v + (1 - b2) g^2`; Yogi:
  `v <- v - (1 - b2) g^2 sign(v - g^2)`; output `m / (sqrt(v) + eps)`.
  `m_0 = 0`, `v_0 = initial_accumulator` (default `eps^2`, the paper's `v_{-1} >= tau^2`).
  """
  for name, b in (("b1", b1), ("b2", b2)):
    if not 0.0 <= float(b) < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {b}")
  if not float(eps) > 0:
    raise ValueError(f"eps must be > 0, got {eps}")
  v0 = float(eps) ** 2 if initial_accumulator is None else float(initial_accumulator)
  if not v0 >= 0:
    raise ValueError(f"initial_accumulator must be >= 0, got {initial_accumulator}")

  def init_fn(params):
    return FedOptState(jax.tree.map(jnp.zeros_like, params),
                       jax.tree.map(lambda p: jnp.full_like(p, v0), params))

  def update_fn(updates, state, params=None):
    del params
    m = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.m)
    if yogi:
      v = jax.tree.map(lambda g, v: v - (1 - b2) * g * g * jnp.sign(v - g * g), updates, state.v)
    else:
      v = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * g * g, updates, state.v)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), m, v)
    return out, FedOptState(m, v)

  return optax.GradientTransformation(init_fn, update_fn)


def fedavgm(learning_rate: float = 1.0, momentum: float = 0.9) -> optax.GradientTransformation:
  """FedAvgM (Hsu et al. 2019) server: `v <- momentum v + g`, `x <- x - lr v` (optax.sgd)."""
  return optax.sgd(learning_rate, momentum=momentum)


def fedadam(learning_rate: float, b1: float = 0.9, b2: float = 0.99,
            eps: float = 1e-3) -> optax.GradientTransformation:
  """FedAdam server (Reddi et al. 2021): `x <- x - lr m / (sqrt(v) + eps)`, no bias correction.

  Defaults are the paper's (beta1 0.9, beta2 0.99, tau 1e-3). `optax.adam` differs: it
  bias-corrects and starts `v` at 0.
  """
  return optax.chain(scale_by_fedopt(b1, b2, eps), optax.scale(-float(learning_rate)))


def fedyogi(learning_rate: float, b1: float = 0.9, b2: float = 0.99,
            eps: float = 1e-3) -> optax.GradientTransformation:
  """FedYogi server (Reddi et al. 2021): Yogi's additive second moment, no bias correction."""
  return optax.chain(scale_by_fedopt(b1, b2, eps, yogi=True), optax.scale(-float(learning_rate)))


# --------------------------------------------------------------------------- round extensions

class Algorithm(NamedTuple):
  """Hooks of an FL algorithm in `build_round`; see the module docstring for the round.

  Attributes:
    init: `params -> (client_state, server_state)`; the client state is one client's
      (replicated over `num_clients` by `init_server_state`).
    broadcast: `server_state -> r`, sent to every client each round (billed dense).
    correct: `(g, g_x, client_state, r, anchor) -> direction` fed to `client_tx`.
    message: optional `(client_state, r, x, y, steps, full_grad_x) -> m`, a params-shaped
      uplink message after local training.
    client_update: `(client_state, decoded m) -> client_state` (kept only for valid clients).
    server_update: `(server_state, anchor_mean, sum of decoded m / num_clients) -> state`;
      absent parts are None.
    anchor: 0 none; 1 clients first send `grad f_i(x)`; 2 and it is broadcast back.
    svrg: `correct` needs `g_x = grad f(x; z)` at every local step.
    full_grad: `message` needs `grad f_i(x)`.
    compressor: compresses the extra uplink messages (None: dense, as `identity()`).
  """

  init: Callable[[Params], tuple[Any, Any]]
  broadcast: Callable[[Any], Any]
  correct: Callable[..., Any]
  message: Optional[Callable[..., Any]]
  client_update: Callable[[Any, Any], Any]
  server_update: Callable[[Any, Any, Any], Any]
  anchor: int = 0
  svrg: bool = False
  full_grad: bool = False
  compressor: Optional[Compressor] = None


def _tmap(f, *trees):
  return jax.tree.map(f, *trees)


def _check_opt_compressor(compressor: Optional[Compressor]) -> None:
  if compressor is not None:
    checks.check_compressor(compressor, "compressor")


def scaffold(local_lr: Optional[float] = None, *, option: int = 2,
             compressor: Optional[Compressor] = None) -> Algorithm:
  """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1) with control variates `c` and `c_i`.

  Clients receive `c` and step `y <- y + client_tx(g - c_i + c)` (SCAFFOLD's
  `y <- y - lr (g - c_i + c)` with `client_tx = optax.sgd(local_lr)`). Then
  option II: `c_i+ = c_i - c + (x - y) / (K_i local_lr)` (`K_i` local steps taken; a client
  that took none keeps `c_i`), option I: `c_i+ = grad f_i(x)` (full local batch). The
  client sends `delta c_i = c_i+ - c_i` (dense, or through `compressor`), and sets
  `c_i <- c_i + decode(delta c_i)`, the value the server knows. The server sets
  `c <- c + (1/N) sum_{i in S} decode(delta c_i)` (= `(|S|/N) mean`), which keeps
  `c = mean_i c_i` over all N clients; `x` moves by `server_tx` on the weighted mean of
  `x - y_i` (`optax.sgd(lr_global)` is the paper's `x += lr_global mean(delta y)`).
  """
  if option not in (1, 2):
    raise ValueError(f"option must be 1 or 2 (SCAFFOLD's control variate options), got {option!r}")
  if option == 2:
    if local_lr is None or not float(local_lr) > 0:
      raise ValueError(f"local_lr must be > 0 for option 2 (the client SGD step size), "
                       f"got {local_lr!r}")
    local_lr = float(local_lr)
  _check_opt_compressor(compressor)

  def init(params):
    z = _tmap(jnp.zeros_like, params)
    return z, z

  def correct(g, g_x, c_i, c, anchor):
    del g_x, anchor
    return _tmap(lambda g, ci, c: g - ci.astype(g.dtype) + c.astype(g.dtype), g, c_i, c)

  def message(c_i, c, x, y, steps, full_grad):
    if option == 1:
      return _tmap(lambda f, ci: f - ci, full_grad, c_i)
    k = jnp.asarray(steps, jnp.float32)
    inv = jnp.where(k > 0, 1.0 / (jnp.maximum(k, 1.0) * local_lr), 0.0)
    return _tmap(lambda c, a, b: jnp.where(k > 0, -c + ((a - b) * inv).astype(c.dtype),
                                           jnp.zeros_like(c)), c, x, y)

  def client_update(c_i, decoded):
    return _tmap(lambda ci, d: ci + d.astype(ci.dtype), c_i, decoded)

  def server_update(c, anchor, mean_sum):
    del anchor
    return _tmap(lambda c, d: c + d.astype(c.dtype), c, mean_sum)

  return Algorithm(init=init, broadcast=lambda c: c, correct=correct, message=message,
                   client_update=client_update, server_update=server_update,
                   full_grad=option == 1, compressor=compressor)


def _mime(base: Optional[optax.GradientTransformation], momentum: float, lite: bool,
          compressor: Optional[Compressor]) -> Algorithm:
  if base is None:
    if not 0.0 <= float(momentum) < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    base = optax.ema(float(momentum), debias=False)
  elif not isinstance(base, optax.GradientTransformation):
    raise TypeError(f"base must be an optax.GradientTransformation, got {type(base).__name__}")
  _check_opt_compressor(compressor)

  def init(params):
    return (), base.init(params)

  def correct(g, g_x, c_i, s, anchor):
    del c_i
    if not lite:  # SVRG: grad f(y; z) - grad f(x; z) + c
      g = _tmap(lambda g, gx, a: g - gx + a.astype(g.dtype), g, g_x, anchor)
    return base.update(g, s)[0]  # U(g, s): the server statistics, frozen

  def server_update(s, anchor, mean_sum):
    del mean_sum
    return base.update(anchor, s)[1]  # V(mean_i grad f_i(x), s)

  return Algorithm(init=init, broadcast=lambda s: s, correct=correct, message=None,
                   client_update=lambda c, d: c, server_update=server_update,
                   anchor=1 if lite else 2, svrg=not lite, compressor=compressor)


def mime(base: Optional[optax.GradientTransformation] = None, *, momentum: float = 0.9,
         compressor: Optional[Compressor] = None) -> Algorithm:
  """Mime (Karimireddy et al. 2021, Algorithm 1) with base optimizer statistics `s` on the server.

  Clients first send `grad f_i(x)` (full local batch); the server broadcasts
  `c = sum_i w_i grad f_i(x)` and `s`. Local steps use the SVRG-corrected gradient with the
  frozen statistics: `y <- y + client_tx(U(grad f(y; z) - grad f(x; z) + c, s))`, where
  `U(g, s) = base.update(g, s)[0]`; `client_tx = optax.sgd(lr)` is Mime's `y -= lr U`. The
  server then updates `s <- V(c, s)` (`base.update(c, s)[1]`) and `x` by `server_tx`
  (`optax.sgd(1.0)`: the paper's `x <- mean_i y_i`). Default base: Mime's SGD momentum,
  `U = V = (1 - momentum) g + momentum m` (`optax.ema(momentum, debias=False)`).
  The weights `w_i` are the cohort's (normalized); with example counts as weights `c` is
  the gradient pooled over all the round's examples, as FedJAX's `mime` computes it. `c` and
  `s` are billed dense in `down_bits` even with a downlink compressor; `grad f_i(x)` goes
  through `compressor` (decoded per client, no compressed-domain sum).
  """
  return _mime(base, momentum, False, compressor)


def mimelite(base: Optional[optax.GradientTransformation] = None, *, momentum: float = 0.9,
             compressor: Optional[Compressor] = None) -> Algorithm:
  """MimeLite: Mime without the SVRG correction; local steps `y <- y + client_tx(U(grad f(y; z), s))`.

  Clients still send `grad f_i(x)` so the server can update `s <- V(mean, s)`; nothing but
  `s` is broadcast.
  """
  return _mime(base, momentum, True, compressor)
