"""`run_experiment(config, workdir)`: a resumable, crash-safe federated training run.

Writes `<workdir>/config.json`, `metrics.jsonl` (one row per round: round, loss, accuracy,
test_loss, up_bits, down_bits, cumulative bits as Python ints, clients, nonfinite, and
M22's per-bit accuracy `(acc_t - acc_0) / cum_up_bits_t` on evaluated rounds),
`accuracy_vs_bits.png` and library checkpoints (`fedjax_compress.checkpoint`) under `ckpt/`.
Cohorts and keys are pure functions of `(seed, round)`, so a resumed run is bit-identical to
an uninterrupted one. Safety rules:

  - Every config field is validated before anything is touched (`validate_config`), and
    the round is compiled once for its shapes before the first round: if XLA's memory
    analysis says it cannot fit in device memory the run stops with a one-line
    `RoundMemoryError` (a `ConfigError`) and nothing in the workdir is written.
  - One writer per workdir (`WorkdirLock`; a dead process's lock never blocks).
  - Each checkpoint stores, verified by its SHA-256, the config and the metric rows up to its
    round. On restart the newest checkpoint that verifies is restored; newer corrupt or
    truncated ones are reported on stderr and renamed `step_<n>.ckpt.corrupt` (never
    deleted, and no longer counted among the `CKPT_KEEP` kept checkpoints, so pruning does
    not remove the restored one in their favour). If none verifies, the run stops with
    nothing changed. A config that differs from the checkpoint's, or from `config.json`, in
    any field but `rounds` is refused, even when `config.json` is gone.
  - `metrics.jsonl` is reconciled with the checkpoint: rows after it are recomputed; missing
    or malformed rows up to it are restored from the checkpoint after a copy of the file is
    kept as `metrics.jsonl.bak[.n]`; a line is never dropped without such a copy unless it
    is a torn final write or a row after the checkpoint of the same config.
  - Ctrl-C and SIGTERM save a checkpoint of the last completed round, then re-raise
    (`KeyboardInterrupt`, or `Terminated` for SIGTERM); kill -9 loses at most the rounds
    since the last checkpoint, which the rerun recomputes identically.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
import optax
import tqdm

from experiments.common.checkpoint import WorkdirError, WorkdirLock, config_diff
from experiments.common.compressors import available, make_compressor
from experiments.common.logging import MetricsWriter
from experiments.common.plotting import plot_accuracy_vs_bits
from fedjax_compress import checkpoint as fcheckpoint
from fedjax_compress import data as fdata
from fedjax_compress import federated, models
from fedjax_compress._src.base import Compressor
from fedjax_compress.compressors import per_bit_accuracy

CKPT_KEEP = 2  # checkpoints kept per run (the newest and one fallback)


class ConfigError(ValueError):
  """A config that does not fit its data or its workdir (changed config, cohort too large)."""


class RoundMemoryError(ConfigError, federated.InsufficientMemoryError):
  """A config whose round cannot fit in device memory (XLA's figures, before any round)."""


# The round does not donate its input state: that state is the last completed round's, which
# Ctrl-C / SIGTERM checkpoint and `Experiment.state` keeps for reuse, so the memory check
# bills it as live beside the new state.
ROUND_DONATE: tuple[int, ...] = ()


def format_bits(n: int) -> str:
  """`n` bits with an SI prefix and 3 significant digits (progress bar): `12.3 kbit`."""
  value, units = float(n), ["bit", "kbit", "Mbit", "Gbit", "Tbit", "Pbit"]
  unit = 0
  while abs(value) >= 999.5 and unit < len(units) - 1:
    value, unit = value / 1000, unit + 1
  return f"{value:.3g} {units[unit]}"


def _note(msg: str) -> None:
  print(f"experiments: {msg}", file=sys.stderr, flush=True)


def _plain(x: Any) -> Any:
  """ConfigDict / nested mappings -> plain dicts."""
  return x.to_dict() if hasattr(x, "to_dict") else (dict(x) if x is not None else {})


# ---------------------------------------------------------------------------------------
# Datasets by name. A new dataset is one entry: a function returning `FederatedData` whose
# keyword parameters are the `config.dataset` fields it reads (besides `name`), or the name
# of such a function in `fedjax_compress.data` (looked up when used). Names not in the table
# go to `data.load_tfds(name, ...)`.

DATASETS: dict[str, Callable[..., fdata.FederatedData] | str] = {
    "synthetic": "synthetic",
    "digits": "load_digits",  # scikit-learn's 8x8 digits, offline (the `data` extra)
}


def dataset_loader(name: str) -> Callable[..., fdata.FederatedData]:
  """The loader of `config.dataset.name`: `DATASETS[name]`, else tfds `name`."""
  entry = DATASETS.get(name)
  if entry is None:
    return functools.partial(fdata.load_tfds, name)
  if isinstance(entry, str):
    if not hasattr(fdata, entry):
      raise ConfigError(f"dataset {name!r} needs fedjax_compress.data.{entry}, which this "
                        "installation does not have")
    return getattr(fdata, entry)
  return entry


def _params(fn: Callable) -> tuple[dict, bool]:
  """(keyword parameters of `fn` by name, whether it takes **kwargs)."""
  ps = inspect.signature(fn).parameters
  named = {k: p for k, p in ps.items()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  return named, any(p.kind == p.VAR_KEYWORD for p in ps.values())


def _other_dataset_fields() -> set[str]:
  fields = set(_params(fdata.load_tfds)[0]) - {"name"}
  for name, entry in DATASETS.items():
    if not isinstance(entry, str) or hasattr(fdata, entry):
      fields |= set(_params(dataset_loader(name))[0])
  return fields


def dataset_kwargs(cfg: Any) -> tuple[str, dict, list[str]]:
  """`(name, kwargs for its loader, ignored fields)` of a `config.dataset`.

  Fields the loader does not take but another dataset does (e.g. the quickstart's
  synthetic `beta` after `--config.dataset.name=emnist`) are ignored and returned; any
  other unknown field, a missing required one, or a bad `seed` / `num_clients`, is a
  `ConfigError` naming it.
  """
  kw = _plain(cfg)
  if not isinstance(kw, dict) or not isinstance(kw.get("name"), str) or not kw["name"]:
    raise ConfigError(f"config.dataset must be a mapping with a non-empty string 'name', "
                      f"got {cfg!r}")
  name = kw.pop("name")
  named, var_kw = _params(dataset_loader(name))
  if var_kw:
    return name, kw, []
  others = _other_dataset_fields()
  ignored = sorted(k for k in kw if k not in named and k in others)
  unknown = sorted(k for k in kw if k not in named and k not in others)
  if unknown:
    raise ConfigError(f"config.dataset.{unknown[0]} is not a field of dataset {name!r}; "
                      f"it takes {sorted(named)}")
  missing = [k for k, p in named.items() if p.default is p.empty and k not in kw]
  if missing:
    raise ConfigError(f"config.dataset.{missing[0]} is required by dataset {name!r}")
  kw = {k: v for k, v in kw.items() if k in named}
  for field, lo in (("seed", 0), ("num_clients", 1)):  # fields every loader reads alike
    if field in kw:
      _int(kw, field, lo, prefix="config.dataset.")
  return name, kw, ignored


def make_dataset(cfg: Any) -> fdata.FederatedData:
  """`config.dataset` loaded by its loader (`DATASETS`, else tfds; see `dataset_kwargs`)."""
  name, kw, ignored = dataset_kwargs(cfg)
  if ignored:
    _note(f"dataset {name!r} ignores config.dataset fields {ignored} (they belong to "
          "other datasets)")
  try:
    return dataset_loader(name)(**kw)
  except (ValueError, TypeError) as e:  # a field value the loader refuses
    raise ConfigError(f"config.dataset (dataset {name!r}): {e}") from e


def make_server_tx(name: str, lr: float) -> optax.GradientTransformation:
  """Server optimizer applied to the aggregated pseudo-gradient (sgd lr 1 = FedAvg)."""
  table = {"sgd": lambda: optax.sgd(lr), "momentum": lambda: optax.sgd(lr, momentum=0.9),
           "adam": lambda: optax.adam(lr), "adagrad": lambda: optax.adagrad(lr),
           "yogi": lambda: optax.yogi(lr)}
  if name not in table:
    raise ValueError(f"unknown server_opt {name!r}; choose one of {sorted(table)}")
  return table[name]()


# ---------------------------------------------------------------------------------------
# Config validation.

REQUIRED_FIELDS = ("seed", "dataset", "model", "compressor", "compressor_kwargs", "rounds",
                   "cohort_size", "local_steps", "batch_size", "client_lr", "server_opt",
                   "server_lr", "eval_every", "checkpoint_every")
OPTIONAL_FIELDS = {"error_feedback": False, "downlink": "", "downlink_kwargs": {},
                   "weighting": "num_examples", "shard": True, "clients_per_chunk": None}


def _int(cfg: dict, field: str, lo: int, hi: Optional[int] = None, *,
         prefix: str = "config.") -> None:
  v = cfg[field]
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo or (
      hi is not None and v > hi):
    rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    raise ConfigError(f"{prefix}{field} must be an integer {rng}, got {v!r}")


def _positive_float(cfg: dict, field: str) -> None:
  v = cfg[field]
  if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
      or not math.isfinite(v) or v <= 0):
    raise ConfigError(f"config.{field} must be a finite number > 0, got {v!r}")


def _mapping(cfg: dict, field: str) -> None:
  if not isinstance(cfg[field], Mapping):
    raise ConfigError(f"config.{field} must be a mapping, got {cfg[field]!r}")


def normalized_config(config: Any) -> dict:
  """`config` as the plain JSON dict stored with a run (optional fields filled in)."""
  cfg = _plain(config)
  if not isinstance(cfg, dict):
    raise ConfigError(f"config must be a ConfigDict or mapping, got {type(config).__name__}")
  cfg = dict(OPTIONAL_FIELDS, **cfg)
  try:
    return json.loads(json.dumps(cfg))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config must hold JSON values only: {e}") from e


def validate_config(config: Any) -> ml_collections.ConfigDict:
  """Check every field of an experiment config; returns it normalized (`ConfigDict`).

  Raises `ConfigError` (a `ValueError`) naming the first bad field: unknown or missing fields, non-positive
  counts (`eval_every`, `checkpoint_every`, `cohort_size`, ...), `rounds < 0`, a seed out of
  `[0, 2^63)`, non-finite or non-positive learning rates, unknown compressor / downlink /
  server optimizer / model / weighting, bad compressor or model arguments, bad dataset
  fields. (`cohort_size` against the number of clients is checked once the data are loaded.)
  """
  cfg = normalized_config(config)
  unknown = sorted(set(cfg) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise ConfigError(f"unknown config field config.{unknown[0]}; the fields are "
                      f"{sorted(REQUIRED_FIELDS + tuple(OPTIONAL_FIELDS))}")
  for f in REQUIRED_FIELDS:
    if f not in cfg:
      raise ConfigError(f"config.{f} is missing")
  _int(cfg, "seed", 0, 2**63 - 1)
  _int(cfg, "rounds", 0)
  for f in ("cohort_size", "local_steps", "batch_size", "eval_every", "checkpoint_every"):
    _int(cfg, f, 1)
  _positive_float(cfg, "client_lr")
  _positive_float(cfg, "server_lr")
  for f in ("error_feedback", "shard"):
    if not isinstance(cfg[f], bool):
      raise ConfigError(f"config.{f} must be True or False, got {cfg[f]!r}")
  if cfg["weighting"] not in ("num_examples", "uniform"):
    raise ConfigError(f"config.weighting must be 'num_examples' or 'uniform', got "
                      f"{cfg['weighting']!r}")
  chunk = cfg["clients_per_chunk"]
  if chunk is not None and chunk != "all":
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
      raise ConfigError(f"config.clients_per_chunk must be None (backend default), 'all' or "
                        f"an integer >= 1, got {chunk!r}")
  try:
    make_server_tx(cfg["server_opt"], cfg["server_lr"])
  except ValueError as e:
    raise ConfigError(f"config.server_opt: {e}") from None
  _mapping(cfg, "compressor_kwargs")
  _mapping(cfg, "downlink_kwargs")
  for f, kw in (("compressor", "compressor_kwargs"), ("downlink", "downlink_kwargs")):
    name = cfg[f]
    if f == "downlink" and name == "":
      continue
    if not isinstance(name, str) or name not in available():
      raise ConfigError(f"config.{f}: unknown compressor {name!r}; available: {available()}")
    try:
      make_compressor(name, cfg[kw], ef=cfg["error_feedback"] and f == "compressor")
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{kw}: {e}") from None
  model = cfg["model"]
  if not isinstance(model, dict) or not isinstance(model.get("name"), str):
    raise ConfigError(f"config.model must be a mapping with a string 'name', got {model!r}")
  if not isinstance(model.get("kwargs", {}), Mapping):
    raise ConfigError(f"config.model.kwargs must be a mapping, got {model['kwargs']!r}")
  try:
    models.create(model["name"], 2, **dict(model.get("kwargs", {})))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model: {e}") from None
  dataset_kwargs(cfg["dataset"])
  out = ml_collections.ConfigDict(_plain(config) if hasattr(config, "to_dict")
                                  else copy.deepcopy(dict(config)))
  for k, v in OPTIONAL_FIELDS.items():
    if k not in out:
      setattr(out, k, v)
  return out


# ---------------------------------------------------------------------------------------
# Building and running.

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
  step: Optional[Callable] = None  # the un-jitted round: `round_fn = jax.jit(step)`


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

  `config` is validated first (`validate_config`). `data`: the already loaded
  `make_dataset(config.dataset)` (a sweep loads it once).
  """
  config = validate_config(config)
  data = make_dataset(config.dataset) if data is None else data
  if config.cohort_size > data.num_clients:
    raise ConfigError(f"config.cohort_size={config.cohort_size} exceeds the "
                      f"{data.num_clients} clients of dataset {data.name!r}")
  model = models.create(config.model.name, data.num_classes, **_plain(config.model.kwargs))
  train_model = training_model(config.model.name, data.num_classes, _plain(config.model.kwargs))
  params = models.init_params(model, data.clients[0]["x"][:1],
                              jax.random.fold_in(jax.random.key(config.seed), 1))
  uplink = make_compressor(config.compressor, _plain(config.compressor_kwargs),
                           ef=config.error_feedback)
  downlink = (make_compressor(config.downlink, _plain(config.downlink_kwargs))
              if config.downlink else None)
  server_tx = make_server_tx(config.server_opt, config.server_lr)
  step = federated.build_round(
      models.classification_loss(train_model), optax.sgd(config.client_lr), server_tx, uplink,
      local_steps=config.local_steps, downlink=downlink,
      clients_per_chunk=config.clients_per_chunk)
  round_fn = jax.jit(step, donate_argnums=ROUND_DONATE)
  state = federated.init_server_state(params, server_tx, uplink, num_clients=data.num_clients,
                                      downlink=downlink)
  n = len(jax.devices()) if config.shard else 1
  mesh = federated.client_mesh(n) if n > 1 else None
  if mesh is not None:
    state = federated.shard_state(state, mesh)
  return Experiment(data, model, uplink, downlink, round_fn, state, mesh, n, step)


def _cohort(config: Any, exp: Experiment, r: int) -> federated.Cohort:
  """The cohort of round `r` (0-based), sharded over `exp.mesh`: a pure function of
  `(config.seed, r)`."""
  cohort = federated.sample_cohort(
      exp.data, r, cohort_size=config.cohort_size, local_steps=config.local_steps,
      batch_size=config.batch_size, seed=config.seed, pad_to=exp.pad_to,
      weighting=config.weighting)
  return cohort if exp.mesh is None else federated.shard_cohort(cohort, exp.mesh)


def check_round_memory(config: Any, exp: Experiment, first_round: int = 0
                       ) -> federated.MemoryEstimate:
  """Compile one round for the shapes of round `first_round` and check it fits in memory.

  `federated.check_memory` on `exp.step` with the runner's donation: need = arguments +
  outputs - donated + temporaries must be <= 90% of the device memory. The compiled program
  is the one `exp.round_fn` then runs (same function, jit options and shapes), so the first
  round does not compile again. Raises `RoundMemoryError` (a `ConfigError`) otherwise.
  """
  if exp.step is None:
    raise ValueError("exp.step is None: build the experiment with build_experiment")
  what = (f"one round of this config (model {config.model.name!r}, cohort_size="
          f"{config.cohort_size}, clients_per_chunk={config.clients_per_chunk}, batch_size="
          f"{config.batch_size}, local_steps={config.local_steps})")
  try:
    return federated.check_memory(exp.step, exp.state, _cohort(config, exp, first_round),
                                  jax.random.key(config.seed), donate_argnums=ROUND_DONATE,
                                  what=what)
  except federated.InsufficientMemoryError as e:
    raise RoundMemoryError(str(e)) from None


class Terminated(KeyboardInterrupt):
  """SIGTERM during `run_experiment` (raised in the main thread, handled like Ctrl-C)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  """Within the block SIGTERM raises `Terminated` (main thread only; else a no-op)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    raise Terminated(f"signal {signum}")
  old = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, old)


def _read_config_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} is not a readable JSON config ({e}); fix it or delete it "
                      "(each checkpoint stores its own config, which is checked on resume)"
                      ) from None
  if not isinstance(cfg, dict):
    raise ConfigError(f"{path} holds {type(cfg).__name__}, not a config mapping; fix it or "
                      "delete it")
  return dict(OPTIONAL_FIELDS, **cfg)


def _write_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _check_no_legacy_checkpoints(ckpt_dir: str) -> None:
  if os.path.isdir(ckpt_dir) and any(n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n))
                                     for n in os.listdir(ckpt_dir)):
    raise WorkdirError(f"{ckpt_dir} holds orbax checkpoints of an older runner, which this "
                     "version does not resume; use a new workdir (or move ckpt/ away to "
                     "start this one over)")


def _newest_verified(ckpt: fcheckpoint.CheckpointManager
                     ) -> tuple[Optional[int], dict, list[int]]:
  """(step, metadata) of the newest checkpoint that verifies, and the newer steps that do
  not (reported on stderr)."""
  steps = ckpt.steps()
  failed = []
  for step in reversed(steps):
    try:
      meta = fcheckpoint.read_metadata(ckpt.path(step))
    except fcheckpoint.CheckpointError as e:
      failed.append(step)
      _note(f"skipping checkpoint of round {step}: {e}")
      continue
    if failed:
      _note(f"resuming from the previous good checkpoint, round {step}")
    return step, meta, failed
  if failed:
    raise WorkdirError(f"no checkpoint under {ckpt.directory} passes verification (rounds "
                       f"{sorted(failed)}); nothing was changed: move them away to start the "
                       "run over")
  return None, {}, []


def _reconcile_metrics(writer: MetricsWriter, start: int, saved_rows: Optional[list],
                       same_config: bool) -> list[dict]:
  """Rows 1..start for a run resuming after round `start` (see module docstring)."""
  scan = writer.scan()
  problems = []
  if scan.bad is not None:
    problems.append(f"line {scan.bad.line} is malformed ({scan.bad.reason}): "
                    f"{scan.bad.text[:120]!r}")
  if len(scan.rows) >= start:
    rows = scan.rows[:start]
    dropped_rows = len(scan.rows) > start
    backup = scan.bad is not None or (dropped_rows and not same_config)
    if dropped_rows and not same_config:
      problems.append(f"rows after round {start} cannot be checked against this config")
  else:
    if saved_rows is None or len(saved_rows) != start:
      where = f"line {scan.bad.line}" if scan.bad else f"after line {len(scan.rows)}"
      raise WorkdirError(
          f"{writer.path} holds {len(scan.rows)} good rows (problem at {where}"
          f"{': ' + problems[0] if problems else ''}) for the checkpoint of round {start}, "
          "and the checkpoint has no rows to recover them from; nothing was changed")
    rows = list(saved_rows)
    backup = scan.lines > 0
    problems.append(f"it holds {len(scan.rows)} good rows of the {start} completed rounds; "
                    f"rows 1-{start} are restored from the checkpoint")
  if backup:
    kept = writer.backup()
    _note(f"{writer.path}: {'; '.join(problems)}; the previous file is kept as {kept}")
  elif problems:
    _note(f"{writer.path}: {'; '.join(problems)}")
  if not (scan.clean and len(scan.rows) == start):
    writer.rewrite(rows)
  return rows


def run_experiment(config: Any, workdir: str, *, progress: bool = True,
                   callback: Optional[Callable[[int, dict], None]] = None,
                   data: Optional[fdata.FederatedData] = None) -> list[dict]:
  """Run (or resume) `config.rounds` rounds; returns all metric rows. See module docstring.

  `callback(round, row)` is called after each row is written (e.g. for early stopping by
  raising); the experiment state is only ever checkpointed at completed rounds. `data`, if
  given, must be `make_dataset(config.dataset)` (loaded once by the caller). Raises
  `ConfigError` (a `ValueError`) for a bad config, one that differs from the workdir's run
  or whose round cannot fit in device memory (`RoundMemoryError`), `WorkdirBusy` if another process is running in `workdir` and `WorkdirError` if the
  workdir cannot be resumed safely (both before anything in it is changed).
  """
  config = validate_config(config)
  new_cfg = normalized_config(config)
  os.makedirs(workdir, exist_ok=True)
  with WorkdirLock(workdir):
    config_path = os.path.join(workdir, "config.json")
    ckpt_dir = os.path.join(workdir, "ckpt")
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
    _check_no_legacy_checkpoints(ckpt_dir)
    for name in os.listdir(workdir):  # temporaries of a killed run (the lock is ours now)
      if name.startswith(("metrics.jsonl.tmp.", "config.json.tmp.")):
        os.remove(os.path.join(workdir, name))
    stored_cfg = _read_config_json(config_path)
    ckpt = fcheckpoint.CheckpointManager(ckpt_dir, keep=CKPT_KEEP)
    start, meta, failed = _newest_verified(ckpt)
    has_rows = writer.scan().lines > 0
    for source, old in ((f"the checkpoint of round {start}", meta.get("config")),
                        (config_path, stored_cfg if (start is not None or has_rows) else None)):
      changed = config_diff(old, new_cfg) if old is not None else []
      if changed:  # resuming would silently continue, or overwrite, a different experiment
        raise ConfigError(f"{workdir} holds a run with a different config ({source} differs in "
                          f"{changed}); use a new workdir or delete this one (only `rounds` "
                          "may change on resume)")
    start = start or 0
    if config.rounds < start:
      raise ConfigError(f"config.rounds={config.rounds} but {workdir} already holds "
                        f"{start} completed rounds")
    exp = build_experiment(config, data)
    if start < config.rounds:  # before any round, checkpoint restore or write
      check_round_memory(config, exp, start)
    state = exp.state
    if start:
      state = ckpt.restore(start, exp.state)
    for step in failed:  # kept, but no longer counted as a fallback when older ones are pruned
      _note(f"checkpoint of round {step} (unverified) moved to {ckpt.quarantine(step)}")
    rows = _reconcile_metrics(writer, start, meta.get("rows"),
                              same_config=bool(start) or stored_cfg is not None)
    _write_json(config_path, new_cfg)
    return _train(config, exp, state, rows, ckpt, writer, workdir, progress, callback,
                  new_cfg)


def _train(config, exp, state, rows, ckpt, writer, workdir, progress, callback, new_cfg
           ) -> list[dict]:
  """The round loop of `run_experiment` (lock held, state and rows reconciled)."""
  start = len(rows)
  cum_up = rows[-1]["cum_up_bits"] if rows else 0
  cum_down = rows[-1]["cum_down_bits"] if rows else 0
  seed_key = jax.random.key(config.seed)
  # Accuracy of the initial model (deterministic from the seed, so identical on resume):
  # the reference of M22's per-bit accuracy `(acc_t - acc_0) / cum_up_bits_t`.
  acc0 = models.evaluate(exp.model, exp.state.params, exp.data.test)["accuracy"]
  saved = start

  def save(step):
    ckpt.save(step, state, metadata={"config": new_cfg, "rows": rows[:step]})

  bar = tqdm.tqdm(total=config.rounds, initial=start, disable=not progress, desc="rounds")
  try:
    with _sigterm_raises():
      try:
        for r in range(start, config.rounds):
          cohort = _cohort(config, exp, r)
          new_state, m = exp.round_fn(state, cohort, seed_key)
          weight = np.asarray(cohort.weight, np.float64)
          up = int(np.asarray(m.up_bits, np.int64).sum())  # host-side Python ints
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
          bar.set_postfix(loss=f"{row['loss']:.3f}", acc=row["accuracy"],
                          up=format_bits(cum_up))
          if (r + 1) % config.checkpoint_every == 0 or r + 1 == config.rounds:
            save(r + 1)
            saved = r + 1
          if callback is not None:
            callback(r + 1, row)
      except KeyboardInterrupt as e:
        if saved != len(rows):  # last completed round; nothing is lost
          if isinstance(e, Terminated):  # a second SIGTERM must not cut this save short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
          save(len(rows))
        _note(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} after round "
              f"{len(rows)}; checkpoint of round {len(rows)} saved in {workdir}")
        raise
  finally:
    bar.close()
  plot_accuracy_vs_bits(rows, os.path.join(workdir, "accuracy_vs_bits.png"),
                        f"{config.compressor} on {exp.data.name}")
  return rows


def final_state(config: Any, workdir: str) -> federated.ServerState:
  """The latest verified checkpointed `ServerState` of a run (e.g. for analysis or tests)."""
  exp = build_experiment(config)
  got = fcheckpoint.CheckpointManager(os.path.join(workdir, "ckpt"),
                                      keep=CKPT_KEEP).restore_latest(exp.state)
  if got is None or got.step is None:
    raise FileNotFoundError(f"no (verified) checkpoint under {workdir}/ckpt")
  for step, reason in got.skipped:
    _note(f"skipped checkpoint of round {step}: {reason}")
  return got.tree
