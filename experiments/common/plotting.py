"""Plots of experiment metrics (matplotlib, headless)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy_vs_bits(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """Test accuracy against cumulative bits (uplink + downlink, log x) to `path`."""
  pts = [(r["cum_bits"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  if pts:
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
    ax.set_xscale("log")
  ax.set_xlabel("cumulative bits (up + down, all clients)")
  ax.set_ylabel("test accuracy")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
