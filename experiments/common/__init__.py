"""Shared experiment machinery: compressor table, runner, checkpoints, metrics, plots.

Public API:
  - `run_experiment(config, workdir, *, progress=True, callback=None) -> list[dict]`.
  - `build_experiment(config) -> Experiment`, `final_state(config, workdir) -> ServerState`.
  - `make_compressor(name, kwargs=None, *, ef=False) -> Compressor`, `available()`.
  - `make_dataset(cfg)` (name -> loader table `DATASETS`, else tfds), `make_server_tx(name, lr)`.
  - `validate_config(config) -> ConfigDict`; errors: `ConfigError` (a ValueError naming the
    bad field, or a config that differs from the workdir's run), `Terminated` (SIGTERM
    during a run), `WorkdirBusy` (another process runs in the workdir), `WorkdirError` (the
    workdir cannot be resumed safely as it is; nothing was changed), `RoundMemoryError`
    (a ConfigError: the round cannot fit in device memory; `check_round_memory`).
"""

from experiments.common.compressors import available, make_compressor
from experiments.common.checkpoint import WorkdirBusy, WorkdirError
from experiments.common.runner import (DATASETS, ConfigError, Experiment, RoundMemoryError,
                                       Terminated, build_experiment, check_round_memory,
                                       final_state, make_dataset, make_server_tx,
                                       run_experiment, validate_config)

__all__ = ["run_experiment", "build_experiment", "final_state", "Experiment",
           "make_compressor", "available", "make_dataset", "make_server_tx", "DATASETS",
           "validate_config", "check_round_memory", "ConfigError", "RoundMemoryError",
           "Terminated", "WorkdirBusy", "WorkdirError"]
