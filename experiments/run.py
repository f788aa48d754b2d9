"""Experiment CLI: `python -m experiments.run --config=experiments/configs/quickstart.py
--workdir=results/quickstart` (override fields with `--config.rounds=10`, etc.).

Re-running with the same workdir resumes from the latest verified checkpoint (only
`--config.rounds` may change). A bad config field exits with a message naming it; a second
process on a busy workdir exits with a message naming the running one; SIGTERM (like Ctrl-C)
checkpoints the last completed round and exits with status 143.
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import Terminated, WorkdirBusy, run_experiment, validate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; resumed if present).")


def main(argv):
  """Run the configured experiment."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    validate_config(_CONFIG.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    rows = run_experiment(_CONFIG.value, _WORKDIR.value)
  except WorkdirBusy as e:
    sys.exit(f"error: {e}")
  except Terminated:
    sys.exit(128 + signal.SIGTERM)
  last = rows[-1] if rows else {}
  print(f"done: {len(rows)} rounds, accuracy={last.get('accuracy')}, "
        f"cum_bits={last.get('cum_bits')} -> {_WORKDIR.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
