"""Per-round diagnostics of the M22 experiment: the fitted model, and direction vs step length.

For each round, from the server model the round starts at, the probe recomputes what the
round sends (same cohort, local training and keys as `federated.build_round`), and reports:

  - `fit_shape[l]`, `fit_scale[l]`, `fit_kept[l]`: per quantized leaf `l` (wire order: leaves
    of `>= min_layer_size` entries), the mean over the cohort of the per-message fit the M22
    codec makes - GenNorm `beta` or double-Weibull `c` and the scale `a` of the z-scored kept
    entries `z = (x - mu)/sd` (profile MLE, `loc = 0`), on the same top-k-kept entries - and
    the mean number of kept entries. Uniform rows get the GenNorm fit of their kept entries.
  - `cos = <g^, g>/(|g^| |g|)` and `len_ratio = |g^|/|g|`, with `g = sum_c w_c delta_c` the
    true (uncompressed) aggregate and `g^ = sum_c w_c decode(encode(delta_c))` the one the
    server applies (`w` = normalized cohort weights); `client_cos` = `sum_c w_c cos(g^_c, delta_c)`;
    `leaf_cos[l]`, `leaf_len_ratio[l]`: the same per quantized leaf (per-layer levels can
    rescale layers differently, which turns the whole-model direction).
    The server step is `lr g^`, so a weight exponent `M` that only rescales `g^` changes
    `len_ratio` and not `cos`: tuning the server lr per row absorbs it.

The fit equals the codec's own when the codec fits on all kept entries (segments below
twice `fit_sample / kept fraction` entries, so every leaf of the experiment's MLP).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import runner
from fedjax_compress import federated, models
from fedjax_compress._src import keys as _keys
from fedjax_compress._src.base import Compressor, Keys
from fedjax_compress.compressors import _m22, _uniform

PROBED = ("m22", "uniform")  # compressor names whose rows get the fit columns


def kept_fit(updates: Any, *, bits: int, top_fraction: Optional[float], iso_bit: bool = True,
             min_layer_size: int = 1000, family: str = "gennorm"
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(shape[S], scale[S], kept[S])` of each quantized leaf's kept entries (jit/vmap-safe).

  Kept = the codec's exact global top-k of `k = ceil(P D / R)` (`iso_bit`) entries minus
  exact zeros; per leaf the weighted z-score and `_m22` profile-MLE fit. A leaf with
  fewer than 2 kept entries or zero spread gets the codec's fallback (shape 2, scale 1).
  """
  _m22._check_family(family)  # pylint: disable=protected-access
  frac = None if top_fraction is None else (top_fraction / bits if iso_bit else top_fraction)
  plan = _uniform.make_plan(updates, min_layer_size=min_layer_size, per_layer=True,
                            keep_fraction=frac)
  leaves = jax.tree.leaves(updates)
  xs = [jnp.ravel(leaves[i]).astype(jnp.float32) for i in plan.order]
  kept = [k & (x != 0) for k, x in zip(_uniform.top_k_masks(xs, plan.keep), xs)]
  shapes, scales, counts = [], [], []
  for x, k in zip(xs[:plan.num_quantized], kept[:plan.num_quantized]):
    w = k.astype(jnp.float32)
    n = jnp.sum(w)
    mu = jnp.sum(w * x) / jnp.maximum(n, 1.0)
    sd = jnp.sqrt(jnp.sum(w * (x - mu)**2) / jnp.maximum(n, 1.0))
    degenerate = (n < 2) | (sd <= 1e-6 * jnp.abs(mu)) | (sd == 0)
    z = (x - mu) / jnp.where(degenerate, 1.0, sd)
    p, a = _m22._fit_rows(z[None], jnp.where(degenerate, 0.0, w)[None], family,  # pylint: disable=protected-access
                          "mle")
    shapes.append(jnp.where(degenerate, 2.0, p[0]))
    scales.append(jnp.where(degenerate, 1.0, a[0]))
    counts.append(n)
  if not shapes:
    z = jnp.zeros((0,), jnp.float32)
    return z, z, z
  return jnp.stack(shapes), jnp.stack(scales), jnp.stack(counts)


def direction_stats(true: Any, sent: Any) -> tuple[jax.Array, jax.Array]:
  """`(cos, len_ratio)` of the flattened `sent` against `true` (0 where a norm is 0)."""
  t = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(true)])
  s = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(sent)])
  nt, ns = jnp.linalg.norm(t), jnp.linalg.norm(s)
  ok = (nt > 0) & (ns > 0)
  cos = jnp.where(ok, jnp.dot(t, s) / jnp.where(ok, nt * ns, 1.0), 0.0)
  return cos, jnp.where(nt > 0, ns / jnp.where(nt > 0, nt, 1.0), 0.0)


def build_probe(config: Any, exp: runner.Experiment, fit_kwargs: Optional[dict]
                ) -> Callable[[federated.ServerState, federated.Cohort, jax.Array], dict]:
  """Jitted `probe(state, cohort, seed_key) -> dict of arrays` for the round `state` starts.

  `fit_kwargs`: `kept_fit` keyword arguments (None: no fit columns). Uses the experiment's
  uplink, client optimizer (`sgd(client_lr)`), local steps and the round's key derivation.
  """
  cfg = runner.validate_config(config)
  loss = models.classification_loss(runner.training_model(
      cfg.model.name, exp.data.num_classes, runner._plain(cfg.model.kwargs)))  # pylint: disable=protected-access
  train = federated.build_local_train(loss, optax.sgd(cfg.client_lr),
                                      local_steps=cfg.local_steps)
  uplink: Compressor = exp.uplink

  @jax.jit
  def probe(state, cohort, seed_key):
    params, ids = state.params, jnp.asarray(cohort.ids, jnp.int32)
    tkeys = _keys.round_keys(seed_key, state.round, ids, _keys.LOCAL_TRAINING).private
    ukeys = _keys.round_keys(seed_key, state.round, ids, _keys.UPLINK)
    senders = jax.tree.map(lambda s: s[ids], state.senders)
    receivers = jax.tree.map(lambda s: s[ids], state.receivers)

    def client(batches, mask, tkey, pkey, snd, rcv):
      p_end, _ = train(params, batches, mask, tkey)
      delta = jax.tree.map(lambda a, b: a - b, params, p_end)
      keys = Keys(ukeys.shared, pkey)
      payload, _ = uplink.encode(delta, snd, keys, params)
      dec, _ = uplink.decode(payload, rcv, keys, params)
      cos, _ = direction_stats(delta, dec)
      fit = kept_fit(delta, **fit_kwargs) if fit_kwargs is not None else ()
      return delta, dec, cos, fit

    delta, dec, ccos, fit = jax.vmap(client)(cohort.batches, cohort.mask, tkeys,
                                             ukeys.private, senders, receivers)
    finite = jax.vmap(lambda t: jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(t)])))(delta)
    w = jnp.where(finite & (jnp.asarray(cohort.weight) > 0),
                  jnp.asarray(cohort.weight, jnp.float32), 0.0)
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    mean = lambda t: jax.tree.map(lambda x: jnp.tensordot(w, jnp.where(
        jnp.isfinite(x), x, 0.0).astype(jnp.float32), axes=1), t)
    g, g_hat = mean(delta), mean(dec)
    cos, ratio = direction_stats(g, g_hat)
    out = dict(cos=cos, len_ratio=ratio, client_cos=jnp.dot(w, ccos))
    if fit_kwargs is not None:
      shape, scale, kept = fit
      out.update(fit_shape=w @ shape, fit_scale=w @ scale, fit_kept=w @ kept)
      big = [(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_hat))
             if a.size >= fit_kwargs.get("min_layer_size", 1000)]   # the quantized leaves
      per = [direction_stats(a, b) for a, b in big]
      out.update(leaf_cos=jnp.stack([c for c, _ in per]) if per else jnp.zeros((0,)),
                 leaf_len_ratio=jnp.stack([r for _, r in per]) if per else jnp.zeros((0,)))
    return out

  return probe


def _host(d: dict) -> dict:
  """Arrays to Python floats / lists of floats (JSON-ready)."""
  out = {}
  for k, v in d.items():
    a = np.asarray(v, np.float64)
    out[k] = float(a) if a.ndim == 0 else [float(x) for x in a]
  return out


def fit_kwargs_of(compressor: str, kwargs: dict) -> Optional[dict]:
  """`kept_fit` arguments for a probed compressor's kwargs (None for others)."""
  if compressor not in PROBED:
    return None
  return dict(bits=int(kwargs.get("bits", 1 if compressor == "m22" else 2)),
              top_fraction=kwargs.get("top_fraction", 0.6 if compressor == "m22" else None),
              iso_bit=bool(kwargs.get("iso_bit", True)),
              min_layer_size=int(kwargs.get("min_layer_size", 1000)),
              family=kwargs.get("family", "gennorm") if compressor == "m22" else "gennorm")


def probe_run(config: Any, fit_kwargs: Optional[dict]) -> tuple[list[dict], float]:
  """Replay `config` round by round; returns (one probe row per round, final accuracy).

  The rounds are the runner's (`build_experiment`, its cohorts and jitted round), so the
  trajectory, and the final accuracy, equal `runner.run_experiment`'s for the same config.
  """
  exp = runner.build_experiment(config)
  cfg = runner.validate_config(config)
  probe = build_probe(cfg, exp, fit_kwargs)
  state, seed_key = exp.state, jax.random.key(cfg.seed)
  rows = []
  for r in range(cfg.rounds):
    cohort = runner._cohort(cfg, exp, r)  # pylint: disable=protected-access
    row = _host(probe(state, cohort, seed_key))  # on the host before `state` is donated
    rows.append(dict(round=r + 1, **row))
    state, _ = exp.round_fn(state, cohort, seed_key)
  acc = float(models.evaluate(exp.model, state.params, exp.data.test)["accuracy"])
  return rows, acc


def summarize(rows: list[dict]) -> dict:
  """Round means of the probe columns (`fit_*` per leaf), and the first / last fitted shape."""
  if not rows:
    return {}
  out = {}
  for k in ("cos", "len_ratio", "client_cos"):
    out[f"{k}_mean"] = float(np.mean([r[k] for r in rows]))
  if "fit_shape" in rows[0]:
    for k in ("fit_shape", "fit_scale", "fit_kept", "leaf_cos", "leaf_len_ratio"):
      out[f"{k}_mean"] = [float(v) for v in np.mean([r[k] for r in rows], axis=0)]
    out["fit_shape_first"], out["fit_shape_last"] = rows[0]["fit_shape"], rows[-1]["fit_shape"]
  return out

