"""The side-by-side harness `benchmarks/compare.py` on a tiny run: totals match the metric rows."""

import csv
import importlib.util
import json
import os
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


def _load_compare():
  """Import benchmarks/compare.py as a module (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location("compare_harness", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_compare_tables_match_metric_rows(tmp_path):
  """Bits in results.csv equal the summed metrics.jsonl rows; identity's ratio is exactly 1."""
  cmp = _load_compare()
  base = cmp.base_config("synthetic", rounds=3, seed=0)
  base.eval_every = 1
  wanted = {"identity", "top_k_ef", "qsgd"}
  methods = [m for m in cmp.default_methods(30) if m.label in wanted]
  out = str(tmp_path)
  table = cmp.run_all(methods, base, out, time_reps=1)
  assert {t["compressor"] for t in table} == wanted
  assert all(t.get("error") is None for t in table)
  with open(os.path.join(out, "results.csv")) as f:
    csv_rows = {r["compressor"]: r for r in csv.DictReader(f)}
  for t in table:
    with open(os.path.join(out, "runs", t["compressor"], "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == 3
    up, down = sum(r["up_bits"] for r in rows), sum(r["down_bits"] for r in rows)
    assert t["up_bits"] == up and t["down_bits"] == down
    assert int(csv_rows[t["compressor"]]["up_bits"]) == up
    assert int(csv_rows[t["compressor"]]["down_bits"]) == down
    assert t["up_bits"] == rows[-1]["cum_up_bits"]
  ident = next(t for t in table if t["compressor"] == "identity")
  assert ident["compression_ratio"] == 1.0
  assert float(csv_rows["identity"]["compression_ratio"]) == 1.0
  assert all(t["compression_ratio"] > 1 for t in table if t["compressor"] != "identity")
  budget = min(t["up_bits"] for t in table)
  assert all(t["budget_bits"] == budget for t in table)
  for name in ("accuracy_vs_uplink.png", "accuracy_vs_downlink.png", "results.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0
