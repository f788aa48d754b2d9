"""Run a list of compressor variants on one base config and summarise them (per-paper scripts).

Each variant is a `run_experiment` run in `<workdir>/runs/<label>`; summaries hold exact
uplink / downlink totals (Python ints summed from the metric rows), final / best test
accuracy, the test accuracy of the initial model and the wall time.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import time
from typing import Any, NamedTuple, Optional, Sequence

from experiments.common import runner
from fedjax_compress import models


class Variant(NamedTuple):
  """One compressor setting: uplink (+EF), optional downlink and config overrides."""

  label: str
  compressor: str
  kwargs: dict
  ef: bool = False
  downlink: str = ""
  downlink_kwargs: dict = {}
  overrides: dict = {}


def configure(base: Any, v: Variant) -> Any:
  """A copy of `base` running variant `v`."""
  c = copy.deepcopy(base)
  c.compressor, c.compressor_kwargs, c.error_feedback = v.compressor, dict(v.kwargs), v.ef
  c.downlink, c.downlink_kwargs = v.downlink, dict(v.downlink_kwargs)
  for k, val in v.overrides.items():
    setattr(c, k, val)
  return c


def initial_accuracy(config: Any) -> float:
  """Test accuracy of the initial model of `config` (round 0)."""
  exp = runner.build_experiment(config)
  return float(models.evaluate(exp.model, exp.state.params, exp.data.test)["accuracy"])


def summarize(label: str, rows: Sequence[dict], seconds: float) -> dict:
  """Totals and accuracies of one run's metric rows."""
  accs = [r["accuracy"] for r in rows if r["accuracy"] is not None]
  return dict(method=label, rounds=len(rows), final_acc=accs[-1] if accs else None,
              best_acc=max(accs) if accs else None,
              up_bits=sum(int(r["up_bits"]) for r in rows),
              down_bits=sum(int(r["down_bits"]) for r in rows), seconds=round(seconds, 1))


def run_variants(base: Any, variants: Sequence[Variant], workdir: str
                 ) -> tuple[list[dict], dict[str, list[dict]]]:
  """Run every variant; returns (summaries, metric rows by label). Errors are recorded."""
  out, runs = [], {}
  for v in variants:
    t0 = time.time()
    run_dir = os.path.join(workdir, "runs", v.label)
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh run: never resume a stale checkpoint
    try:
      rows = runner.run_experiment(configure(base, v), run_dir, progress=False)
      runs[v.label] = rows
      s = summarize(v.label, rows, time.time() - t0)
    except Exception as e:  # pylint: disable=broad-except
      s = dict(method=v.label, error=f"{type(e).__name__}: {e}"[:300])
    out.append(s)
    print(json.dumps(s), flush=True)
  return out, runs


def write(workdir: str, summaries: Sequence[dict], extra: Optional[dict] = None) -> None:
  """`summary.json` (with `extra`) and `summary.csv` in `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(dict(extra or {}, rows=list(summaries)), f, indent=1)
  keys = sorted({k for s in summaries for k in s}, key=lambda k: (k != "method", k))
  with open(os.path.join(workdir, "summary.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(summaries)
