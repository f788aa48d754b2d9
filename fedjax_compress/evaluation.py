"""Per-client evaluation and fairness summaries of a federated model.

Public API:
  - `evaluate_clients(model, params, clients, *, batch_size=64, clients_per_chunk=16,
    ignore_labels=(), exclude_predictions=(), per_client_params=False)
    -> {'num_examples', 'count', 'loss', 'accuracy'}` (one entry per client).
  - `summarize(values, weights=None, percentiles=(10, 50, 90)) -> dict` (mean, weighted
    mean, std, worst / best client, percentiles).
  - `fairness_report(per_client, metrics=('accuracy', 'loss'), percentiles=(10, 50, 90))
    -> {'accuracy/mean': ..., 'accuracy/p10': ..., ...}`, flat, for metric logs.

Client `k` with scored targets `t in T_k` (examples, or tokens of a sequence whose label is
not in `ignore_labels`) gets `loss_k = sum_t CE_t / |T_k|` and `accuracy_k = sum_t
[argmax_t = y_t] / |T_k|`; the `|T_k|`-weighted mean of `accuracy_k` is the pooled accuracy.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_compress._src import checks

Clients = Sequence[dict[str, np.ndarray]]


@functools.lru_cache(maxsize=32)
def _chunk_fn(model: nn.Module, per_client: bool, ignore: tuple[int, ...],
              exclude: tuple[int, ...]):
  """Jitted `(params, x[C, B, ...], y[C, B, ...], mask[C, B]) -> (loss, correct, count)[C]` sums."""

  def one(params, x, y, mask):
    logits = model.apply({"params": params}, x).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if exclude:
      logits = logits.at[..., jnp.asarray(exclude)].set(-jnp.inf)
    hit = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    valid = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - 1)), y.shape)
    if ignore:
      valid = valid & ~jnp.isin(y, jnp.asarray(ignore))
    v = valid.astype(jnp.float32)
    return jnp.sum(v * nll), jnp.sum(v * hit), jnp.sum(v)

  return jax.jit(jax.vmap(one, in_axes=(0 if per_client else None, 0, 0, 0)))


def evaluate_clients(model: nn.Module, params: Any, clients: Clients, *, batch_size: int = 64,
                     clients_per_chunk: int = 16, ignore_labels: Sequence[int] = (),
                     exclude_predictions: Sequence[int] = (),
                     per_client_params: bool = False) -> dict[str, np.ndarray]:
  """Loss and accuracy of every client's examples, `clients_per_chunk` clients vmapped at once.

  `clients[k] = {'x': [n_k, ...], 'y': [n_k] or [n_k, T]}` (e.g. `FederatedData.clients`,
  or per-client held-out sets). Each chunk walks its clients' examples in `[C, batch_size]`
  steps (one compile for all). `ignore_labels` drops targets with those labels (e.g. PAD 0
  and EOS of FedJAX's language models); `exclude_predictions` forbids predicting those
  labels in the accuracy (FedJAX's `logits_mask`, e.g. PAD, BOS, EOS, OOV for
  'accuracy_in_vocab'). `per_client_params=True`: `params` leaves have a leading client axis
  (e.g. personalised models), client `k` is scored with `params[k]`.

  Returns float64/int64 arrays of length `len(clients)`: `num_examples` (`n_k`), `count`
  (scored targets `|T_k|`), `loss` and `accuracy` (NaN for a client with nothing scored).

  >>> from fedjax_compress import models
  >>> m = models.LogisticRegression(2)
  >>> p = jax.tree.map(jnp.zeros_like, models.init_params(m, np.zeros((1, 3), np.float32)))
  >>> cl = [{'x': np.ones((3, 3), np.float32), 'y': np.array([0, 0, 1])},
  ...       {'x': np.ones((1, 3), np.float32), 'y': np.array([1])}]
  >>> r = evaluate_clients(m, p, cl)
  >>> r['accuracy'].round(3).tolist(), r['loss'].round(4).tolist()  # argmax ties -> label 0
  ([0.667, 0.0], [0.6931, 0.6931])
  """
  batch_size = checks.check_positive_int(batch_size, "batch_size")
  clients_per_chunk = checks.check_positive_int(clients_per_chunk, "clients_per_chunk")
  if not len(clients):
    raise ValueError("clients must hold at least one client")
  ignore = tuple(int(v) for v in ignore_labels)
  exclude = tuple(int(v) for v in exclude_predictions)
  k = len(clients)
  sizes = np.array([len(c["y"]) for c in clients], np.int64)
  if per_client_params:
    lead = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(params)}
    if lead != {k}:
      raise ValueError(f"per_client_params=True needs every params leaf to lead with "
                       f"len(clients)={k}, got leading sizes {sorted(lead, key=str)}")
  fn = _chunk_fn(model, bool(per_client_params), ignore, exclude)
  first = next((c for c in clients if len(c["y"])), clients[0])
  xs, ys = np.asarray(first["x"]), np.asarray(first["y"])
  sums = np.zeros((3, k), np.float64)
  order = np.argsort(-sizes, kind="stable")  # similar sizes share a chunk: less padding
  c = min(clients_per_chunk, k)
  for start in range(0, k, c):
    rows = order[start:start + c]
    slots = np.concatenate([rows, np.full(c - len(rows), rows[0])])  # pad: repeat, masked
    steps = max(1, -(-int(sizes[rows].max()) // batch_size))
    p = jax.tree.map(lambda a: a[slots], params) if per_client_params else params
    for s in range(steps):
      idx = s * batch_size + np.arange(batch_size)
      x = np.zeros((c, batch_size) + xs.shape[1:], xs.dtype)
      y = np.zeros((c, batch_size) + ys.shape[1:], ys.dtype)
      m = np.zeros((c, batch_size), bool)
      for j, r in enumerate(rows):
        n = sizes[r]
        if n == 0 or idx[0] >= n:
          continue
        take = idx[idx < n]
        x[j, :len(take)] = np.asarray(clients[r]["x"])[take]
        y[j, :len(take)] = np.asarray(clients[r]["y"])[take]
        m[j, :len(take)] = True
      out = fn(p, x, y, m)
      sums[:, rows] += np.stack([np.asarray(o, np.float64)[:len(rows)] for o in out])
  count = sums[2]
  with np.errstate(invalid="ignore", divide="ignore"):
    loss = np.where(count > 0, sums[0] / count, np.nan)
    acc = np.where(count > 0, sums[1] / count, np.nan)
  return {"num_examples": sizes, "count": count, "loss": loss, "accuracy": acc}


def summarize(values: Any, weights: Optional[Any] = None,
              percentiles: Sequence[float] = (10, 50, 90)) -> dict[str, float]:
  """Distribution of a per-client metric: mean, weighted mean, std, min/max, percentiles.

  NaN entries (clients with nothing scored) are left out. `weighted_mean = sum_k w_k v_k /
  sum_k w_k` (`weights` default: all 1; with `count` it is the pooled metric); `std` is the
  population std over clients; `pXX` are linearly interpolated percentiles
  (`np.percentile`); `worst_client` / `best_client` are the indices of the min / max.

  >>> s = summarize([0.9, 0.5, float('nan'), 0.7], weights=[1, 3, 0, 1])
  >>> [round(s[k], 6) for k in ('mean', 'weighted_mean', 'min', 'p50')], s['worst_client']
  ([0.7, 0.62, 0.5, 0.7], 1)
  """
  v = np.asarray(values, np.float64).reshape(-1)
  w = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).reshape(-1)
  if w.shape != v.shape:
    raise ValueError(f"weights must match values, got shapes {w.shape} and {v.shape}")
  if (w < 0).any() or not np.isfinite(w).all():
    raise ValueError("weights must be finite and >= 0")
  ps = [float(p) for p in percentiles]
  if any(not 0 <= p <= 100 for p in ps):
    raise ValueError(f"percentiles must lie in [0, 100], got {ps}")
  keep = ~np.isnan(v)
  if not keep.any():
    raise ValueError("values hold no client with a (non-NaN) metric")
  kv, kw = v[keep], w[keep]
  idx = np.flatnonzero(keep)
  out = {"num_clients": int(keep.sum()), "mean": float(kv.mean()), "std": float(kv.std()),
         "min": float(kv.min()), "max": float(kv.max()),
         "weighted_mean": float((kw * kv).sum() / kw.sum()) if kw.sum() > 0 else float("nan"),
         "worst_client": int(idx[np.argmin(kv)]), "best_client": int(idx[np.argmax(kv)])}
  for p in ps:
    out[f"p{p:g}"] = float(np.percentile(kv, p))
  return out


def fairness_report(per_client: dict[str, np.ndarray],
                    metrics: Sequence[str] = ("accuracy", "loss"),
                    percentiles: Sequence[float] = (10, 50, 90)) -> dict[str, float]:
  """`summarize` of each metric of `evaluate_clients`, weighted by `count`, as flat keys.

  Keys are `'<metric>/<stat>'` (e.g. 'accuracy/p10', 'accuracy/worst_client',
  'loss/weighted_mean'), ready to log next to the round metrics.
  """
  out: dict[str, float] = {}
  for name in metrics:
    if name not in per_client:
      raise ValueError(f"metric {name!r} is not in per_client (keys {sorted(per_client)})")
    for stat, val in summarize(per_client[name], per_client.get("count"), percentiles).items():
      out[f"{name}/{stat}"] = val
  return out
