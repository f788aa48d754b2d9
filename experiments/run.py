"""Experiment CLI: `python -m experiments.run --config=experiments/configs/quickstart.py
--workdir=results/quickstart` (override fields with `--config.rounds=10`, etc.).

Re-running with the same workdir resumes from the latest verified checkpoint (only
`--config.rounds` may change). A bad config field, a config that differs from the
workdir's run, a busy workdir (another process runs in it) or one that cannot be resumed
safely exit with status 1 and a one-line `error: ...` naming the cause, before anything in
the workdir is changed; SIGTERM (like Ctrl-C) checkpoints the last completed round and
exits with status 143.
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import ConfigError, Terminated, WorkdirError, run_experiment
from fedjax_compress import tune_cpu_allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; resumed if present).")
_TUNE = flags.DEFINE_bool(
    "tune_cpu_allocator", True, "Keep freed host memory for reuse (fedjax_compress."
    "tune_cpu_allocator: large CPU buffers stop page-faulting; resident memory stays at its peak).")


def execute(config, workdir: str) -> list[dict]:
  """`run_experiment` with the CLI's exits: `error: <message>` (status 1) for a config or
  workdir error, status 143 for SIGTERM; prints a one-line summary when done."""
  try:
    rows = run_experiment(config, workdir)
  except (ConfigError, WorkdirError) as e:  # WorkdirBusy included
    sys.exit(f"error: {e}")
  except Terminated:
    sys.exit(128 + signal.SIGTERM)
  last = rows[-1] if rows else {}
  print(f"done: {len(rows)} rounds, accuracy={last.get('accuracy')}, "
        f"cum_bits={last.get('cum_bits')} -> {workdir}")
  return rows


def main(argv):
  """Run the configured experiment."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _TUNE.value:  # before the run's first computation starts JAX's CPU backend
    tune_cpu_allocator()
  execute(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
