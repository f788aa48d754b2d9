"""Experiment CLI: `python -m experiments.run --config=experiments/configs/quickstart.py
--workdir=results/quickstart` (override fields with `--config.rounds=10`, etc.).

Re-running with the same workdir resumes from the latest checkpoint.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import run_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created; resumed if present).")


def main(argv):
  """Run the configured experiment."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  rows = run_experiment(_CONFIG.value, _WORKDIR.value)
  last = rows[-1] if rows else {}
  print(f"done: {len(rows)} rounds, accuracy={last.get('accuracy')}, "
        f"cum_bits={last.get('cum_bits')} -> {_WORKDIR.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
