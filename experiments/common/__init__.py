"""Shared experiment machinery: compressor table, runner, checkpoints, metrics, plots.

Public API:
  - `run_experiment(config, workdir, *, progress=True, callback=None) -> list[dict]`.
  - `build_experiment(config) -> Experiment`, `final_state(config, workdir) -> ServerState`.
  - `make_compressor(name, kwargs=None, *, ef=False) -> Compressor`, `available()`.
  - `make_dataset(cfg)`, `make_server_tx(name, lr)`.
"""

from experiments.common.compressors import available, make_compressor
from experiments.common.runner import (Experiment, build_experiment, final_state, make_dataset,
                                       make_server_tx, run_experiment)

__all__ = ["run_experiment", "build_experiment", "final_state", "Experiment",
           "make_compressor", "available", "make_dataset", "make_server_tx"]
