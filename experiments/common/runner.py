"""`run_experiment(config, workdir)`: a resumable federated training run driven by a config.

Writes `<workdir>/config.json`, `metrics.jsonl` (one row per round: round, loss, accuracy,
test_loss, up_bits, down_bits, cumulative bits as Python ints, clients, nonfinite, and
M22's per-bit accuracy `(acc_t - acc_0) / cum_up_bits_t` on evaluated rounds),
`accuracy_vs_bits.png` and orbax checkpoints under `ckpt/`. On restart it restores the latest
checkpoint, drops metric rows after it and recomputes them; since cohorts and keys are pure
functions of `(seed, round)` the resumed run is bit-identical to an uninterrupted one. A
KeyboardInterrupt saves a checkpoint of the last completed round before exiting.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import optax
import tqdm

from experiments.common.checkpoint import Checkpointer
from experiments.common.compressors import make_compressor
from experiments.common.logging import MetricsWriter
from experiments.common.plotting import plot_accuracy_vs_bits
from fedjax_compress import data as fdata
from fedjax_compress import federated, models
from fedjax_compress._src.base import Compressor
from fedjax_compress.compressors import per_bit_accuracy


def format_bits(n: int) -> str:
  """`n` bits with an SI prefix and 3 significant digits (progress bar): `12.3 kbit`."""
  value, units = float(n), ["bit", "kbit", "Mbit", "Gbit", "Tbit", "Pbit"]
  unit = 0
  while abs(value) >= 999.5 and unit < len(units) - 1:
    value, unit = value / 1000, unit + 1
  return f"{value:.3g} {units[unit]}"


def _plain(x: Any) -> Any:
  """ConfigDict / nested mappings -> plain dicts."""
  return x.to_dict() if hasattr(x, "to_dict") else (dict(x) if x is not None else {})


def make_dataset(cfg: Any) -> fdata.FederatedData:
  """`synthetic` (offline) or any tfds name via `data.load_tfds` with the remaining fields."""
  kw = _plain(cfg)
  name = kw.pop("name")
  if name == "synthetic":
    alpha, beta = kw.pop("alpha"), kw.pop("beta")
    return fdata.synthetic(alpha, beta, **kw)
  return fdata.load_tfds(name, **kw)


def make_server_tx(name: str, lr: float) -> optax.GradientTransformation:
  """Server optimizer applied to the aggregated pseudo-gradient (sgd lr 1 = FedAvg)."""
  table = {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=0.9),
           "adam": lambda: optax.adam(lr), "adagrad": lambda: optax.adagrad(lr),
           "yogi": lambda: optax.yogi(lr)}
  if name not in table:
    raise ValueError(f"unknown server_opt {name!r}; choose one of {sorted(table)}")
  return table[name]()


class Experiment(NamedTuple):
  """Everything built from a config before the first round."""

  data: fdata.FederatedData
  model: Any
  uplink: Compressor
  downlink: Optional[Compressor]
  round_fn: Callable
  state: federated.ServerState
  mesh: Any
  pad_to: int


def training_model(name: str, num_classes: int, kwargs: dict) -> Any:
  """The module the clients train: the eval model, except a CPU CNN uses im2col convs.

  Per-client kernels under the round's `vmap` turn `nn.Conv` into a batched-kernel
  convolution that XLA:CPU runs ~10x slower than `models.CNN(conv_impl='im2col')`, while
  for plain (eval) batches it is the other way round; the two have identical parameters
  and outputs, so the round trains with im2col and `evaluate` keeps the XLA conv. An
  explicit `conv_impl` in the model kwargs is respected.
  """
  if name == "cnn" and "conv_impl" not in kwargs and jax.default_backend() == "cpu":
    kwargs = dict(kwargs, conv_impl="im2col")
  return models.create(name, num_classes, **kwargs)


def build_experiment(config: Any, data: Optional[fdata.FederatedData] = None) -> Experiment:
  """Dataset, model, compressors, jitted round and initial (sharded) server state.

  `data`: the already loaded `make_dataset(config.dataset)` (a sweep loads it once).
  """
  data = make_dataset(config.dataset) if data is None else data
  model = models.create(config.model.name, data.num_classes, **_plain(config.model.kwargs))
  train_model = training_model(config.model.name, data.num_classes, _plain(config.model.kwargs))
  params = models.init_params(model, data.clients[0]["x"][:1],
                              jax.random.fold_in(jax.random.key(config.seed), 1))
  uplink = make_compressor(config.compressor, _plain(config.compressor_kwargs),
                           ef=config.error_feedback)
  downlink = (make_compressor(config.downlink, _plain(config.downlink_kwargs))
              if config.downlink else None)
  server_tx = make_server_tx(config.server_opt, config.server_lr)
  round_fn = jax.jit(federated.build_round(
      models.classification_loss(train_model), optax.sgd(config.client_lr), server_tx, uplink,
      local_steps=config.local_steps, downlink=downlink))
  state = federated.init_server_state(params, server_tx, uplink, num_clients=data.num_clients,
                                      downlink=downlink)
  n = len(jax.devices()) if config.shard else 1
  mesh = federated.client_mesh(n) if n > 1 else None
  if mesh is not None:
    state = federated.shard_state(state, mesh)
  return Experiment(data, model, uplink, downlink, round_fn, state, mesh, n)


def run_experiment(config: Any, workdir: str, *, progress: bool = True,
                   callback: Optional[Callable[[int, dict], None]] = None,
                   data: Optional[fdata.FederatedData] = None) -> list[dict]:
  """Run (or resume) `config.rounds` rounds; returns all metric rows. See module docstring.

  `callback(round, row)` is called after each row is written (e.g. for early stopping by
  raising); the experiment state is only ever checkpointed at completed rounds. `data`, if
  given, must be `make_dataset(config.dataset)` (loaded once by the caller).
  """
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "config.json")
  new_cfg = json.loads(json.dumps(_plain(config)))  # normalized as it is stored
  if os.path.exists(config_path) and os.path.isdir(os.path.join(workdir, "ckpt")):
    with open(config_path) as f:
      old_cfg = json.load(f)
    changed = sorted(k for k in set(old_cfg) | set(new_cfg)
                     if k != "rounds" and old_cfg.get(k) != new_cfg.get(k))
    if changed:  # resuming would silently continue a different experiment
      raise ValueError(f"{workdir} holds a run with a different config (fields {changed}); "
                       "use a new workdir or delete it (only `rounds` may change on resume)")
  with open(config_path, "w") as f:
    json.dump(new_cfg, f, indent=2, sort_keys=True)
  exp = build_experiment(config, data)
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
  state, start = exp.state, 0
  latest = ckpt.latest_step()
  if latest is not None:
    state, start = ckpt.restore(latest, exp.state), latest
  rows = writer.truncate(start)
  if len(rows) != start:
    raise RuntimeError(f"metrics.jsonl has {len(rows)} rows for checkpoint round {start}")
  cum_up = rows[-1]["cum_up_bits"] if rows else 0
  cum_down = rows[-1]["cum_down_bits"] if rows else 0
  seed_key = jax.random.key(config.seed)
  # Accuracy of the initial model (deterministic from the seed, so identical on resume):
  # the reference of M22's per-bit accuracy `(acc_t - acc_0) / cum_up_bits_t`.
  acc0 = models.evaluate(exp.model, exp.state.params, exp.data.test)["accuracy"]
  bar = tqdm.tqdm(total=config.rounds, initial=start, disable=not progress, desc="rounds")
  r = start
  try:
    for r in range(start, config.rounds):
      cohort = federated.sample_cohort(
          exp.data, r, cohort_size=config.cohort_size, local_steps=config.local_steps,
          batch_size=config.batch_size, seed=config.seed, pad_to=exp.pad_to,
          weighting=config.weighting)
      if exp.mesh is not None:
        cohort = federated.shard_cohort(cohort, exp.mesh)
      new_state, m = exp.round_fn(state, cohort, seed_key)
      weight = np.asarray(cohort.weight, np.float64)
      up = int(np.asarray(m.up_bits, np.int64).sum())  # host-side Python ints: no overflow
      down = int(np.asarray(m.down_bits, np.int64).sum())
      cum_up, cum_down = cum_up + up, cum_down + down
      row = {"round": r + 1,
             "loss": float(np.sum(weight * np.asarray(m.loss)) / max(weight.sum(), 1e-30)),
             "up_bits": up, "down_bits": down, "cum_up_bits": cum_up,
             "cum_down_bits": cum_down, "cum_bits": cum_up + cum_down,
             "clients": int((weight > 0).sum()),
             "nonfinite": int(((weight > 0) & ~np.asarray(m.finite)).sum()),
             "accuracy": None, "test_loss": None, "per_bit_accuracy": None}
      if (r + 1) % config.eval_every == 0 or r + 1 == config.rounds:
        ev = models.evaluate(exp.model, new_state.params, exp.data.test)
        row["accuracy"], row["test_loss"] = ev["accuracy"], ev["loss"]
        row["per_bit_accuracy"] = float(per_bit_accuracy(
            [ev["accuracy"]], [cum_up], acc0).final)
      writer.write(row)
      rows.append(row)
      state = new_state  # committed: state.round == r + 1 == rows[-1]['round']
      bar.update(1)
      bar.set_postfix(loss=f"{row['loss']:.3f}", acc=row["accuracy"], up=format_bits(cum_up))
      if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.rounds:
        ckpt.save(r + 1, state)
      if callback is not None:
        callback(r + 1, row)
  except KeyboardInterrupt:
    ckpt.save(len(rows), state)  # last completed round; nothing is lost
    raise
  finally:
    bar.close()
  plot_accuracy_vs_bits(rows, os.path.join(workdir, "accuracy_vs_bits.png"),
                        f"{config.compressor} on {exp.data.name}")
  ckpt.close()
  return rows


def final_state(config: Any, workdir: str) -> federated.ServerState:
  """The latest checkpointed `ServerState` of a run (e.g. for analysis or tests)."""
  exp = build_experiment(config)
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/ckpt")
  return ckpt.restore(step, exp.state)
