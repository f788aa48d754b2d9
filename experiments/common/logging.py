"""JSONL metrics: one row per round, truncated to the checkpoint on resume."""

from __future__ import annotations

import json
import os
from typing import Any


def read_rows(path: str) -> list[dict[str, Any]]:
  """All complete JSON rows of a JSONL file (a torn last line is ignored)."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


class MetricsWriter:
  """Appends rows to `metrics.jsonl`, flushing each; `truncate(r)` keeps rows with round <= r."""

  def __init__(self, path: str):
    self.path = path

  def truncate(self, last_round: int) -> list[dict[str, Any]]:
    """Drop rows after `last_round` (they are recomputed identically) and return the rest."""
    rows = [r for r in read_rows(self.path) if r["round"] <= last_round]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, self.path)
    return rows

  def write(self, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk."""
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
