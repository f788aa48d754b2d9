"""JSONL metrics: one row per round (`round` = 1, 2, ...), read strictly, rewritten atomically."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, NamedTuple, Optional


class BadLine(NamedTuple):
  """The first line of a metrics file that is not the next row."""

  line: int  # 1-based
  text: str
  reason: str


class MetricsScan(NamedTuple):
  """What a metrics file holds.

  Attributes:
    rows: the rows before the first bad line (rounds 1..len(rows), in order).
    bad: the first malformed line (not JSON, not a row, round out of sequence), or None.
    torn: True if the last line is unterminated and unreadable (a write cut by a crash).
    lines: the number of lines in the file (0 if it does not exist).
    clean: True if the file is exactly `rows`, each line terminated (safe to append to).
  """

  rows: list
  bad: Optional[BadLine]
  torn: bool
  lines: int
  clean: bool


def scan_metrics(path: str) -> MetricsScan:
  """Parse `path` line by line (see `MetricsScan`); a missing file is empty."""
  if not os.path.exists(path):
    return MetricsScan([], None, False, 0, True)
  with open(path, "rb") as f:
    raw = f.read().decode("utf-8", errors="replace")
  lines = raw.splitlines(keepends=True)
  rows, bad, torn = [], None, False
  for i, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
      reason = None
      if not isinstance(row, dict) or not isinstance(row.get("round"), int):
        reason = "not a metrics row (no integer 'round')"
      elif row["round"] != len(rows) + 1:
        reason = f"round {row['round']} where round {len(rows) + 1} was expected"
    except json.JSONDecodeError as e:
      if i == len(lines) and not line.endswith("\n"):
        torn = True
        break
      reason = f"not JSON ({e.msg})"
    if reason is not None:
      bad = BadLine(i, line.rstrip("\n"), reason)
      break
    rows.append(row)
  clean = bad is None and not torn and (not raw or raw.endswith("\n"))
  return MetricsScan(rows, bad, torn, len(lines), clean)


def read_rows(path: str) -> list[dict[str, Any]]:
  """The well-formed rows of a JSONL metrics file, up to the first bad line."""
  return scan_metrics(path).rows


def _write_lines(path: str, rows: list[dict[str, Any]]) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsWriter:
  """Appends rows to `metrics.jsonl` (each flushed and fsynced); `rewrite` is atomic."""

  def __init__(self, path: str):
    self.path = path

  def scan(self) -> MetricsScan:
    """`scan_metrics` of the file."""
    return scan_metrics(self.path)

  def rewrite(self, rows: list[dict[str, Any]]) -> None:
    """Replace the file by exactly `rows` (temporary file, fsync, rename)."""
    _write_lines(self.path, rows)

  def backup(self) -> Optional[str]:
    """Copy the file to an unused `<path>.bak[.n]` and return that name (None if no file)."""
    if not os.path.exists(self.path):
      return None
    dst, n = self.path + ".bak", 0
    while os.path.exists(dst):
      n += 1
      dst = f"{self.path}.bak.{n}"
    shutil.copyfile(self.path, dst)
    return dst

  def write(self, row: dict[str, Any]) -> None:
    """Append one row and flush it to disk."""
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
      f.flush()
      os.fsync(f.fileno())
