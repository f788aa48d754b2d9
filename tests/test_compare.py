"""The side-by-side harness `benchmarks/compare.py` on a tiny run: totals match the metric rows."""

import csv
import importlib.util
import json
import math
import os
import pathlib
import sys
import types

import numpy as np
import pytest

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
  for t in table:
    assert math.isfinite(t["codec_seconds"]) and t["codec_seconds"] > 0
    assert math.isfinite(t["time_ratio"]) and t["time_ratio"] > 0
    assert float(csv_rows[t["compressor"]]["codec_seconds"]) == pytest.approx(t["codec_seconds"])
  assert ident["time_ratio"] == 1.0
  # an explicit budget: accuracy of the last round whose cumulative uplink fits it
  runs = {}
  for t in table:
    with open(os.path.join(out, "runs", t["compressor"], "metrics.jsonl")) as f:
      runs[t["compressor"]] = [json.loads(line) for line in f]
  budget = ident["up_bits"] * 2 // 3  # identity fits 2 of its 3 rounds
  cmp.add_relative(table, runs, budget)
  assert ident["acc_at_budget"] == runs["identity"][1]["accuracy"]
  for t in table:
    fit = [r for r in runs[t["compressor"]] if r["cum_up_bits"] <= budget]
    assert t["budget_bits"] == budget and t["acc_at_budget"] == fit[-1]["accuracy"]
  with pytest.raises(ValueError, match="budget_bits"):
    cmp.add_relative(table, runs, 0)


def test_default_methods_cover_every_family_with_their_schedules():
  """K-subspace IGC and SLAQ are rows; IGC uses server lr D/d, LAQ/SLAQ full participation."""
  cmp = _load_compare()
  methods = {m.label: m for m in cmp.default_methods(30, num_params=610)}
  assert {"igc_k_subspace", "slaq", "laq", "igc_static", "igc_time_varying"} <= set(methods)
  assert len({m.label for m in methods.values()}) == len(methods)
  for label in ("igc_static", "igc_k_subspace", "igc_time_varying"):
    m = methods[label]
    assert m.overrides["server_lr"] == pytest.approx(610 / m.kwargs["d"])
  assert methods["igc_k_subspace"].compressor == "intrinsic_k_subspace"
  assert methods["igc_k_subspace"].kwargs["schedule"] == "random"  # partial participation
  for label in ("laq", "slaq"):
    m = methods[label]
    assert m.overrides["cohort_size"] == 30 and m.overrides["local_steps"] == 1
    assert m.overrides["server_lr"] == m.kwargs["step_size"]
  assert methods["laq"].overrides["batch_size"] == -1  # full batch
  assert "batch_size" not in methods["slaq"].overrides  # minibatch (stochastic LAQ)
  assert methods["slaq"].compressor == "slaq"
  assert cmp.model_scaled_sizes(610) == (60, 64)
  assert cmp.model_scaled_sizes(200_000) == (20_000, 2_000)


_CLASSES = 62


def _fake_emnist(split: str) -> dict:
  """Deterministic EMNIST-shaped arrays: uint8 [n, 28, 28, 1], int64 labels covering 62 classes."""
  n = 3 * _CLASSES if split == "train" else _CLASSES
  rng = np.random.default_rng(0 if split == "train" else 1)
  return {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
          "label": (np.arange(n) % _CLASSES).astype(np.int64)}


def _fake_tfds(calls: list, make=_fake_emnist) -> types.ModuleType:
  """A `tensorflow_datasets` stand-in with the two functions `data.load_tfds` uses."""
  mod = types.ModuleType("tensorflow_datasets")

  def load(name, *, split, batch_size, data_dir, download):
    calls.append(dict(name=name, split=split, batch_size=batch_size, data_dir=data_dir,
                      download=download))
    return make(split)

  mod.load = load
  mod.as_numpy = lambda x: x
  return mod


@pytest.mark.slow  # ~100 s: two CNN compiles; the digits/synthetic compare tests stay default
def test_compare_on_tfds_images_uses_cnn_and_exact_bits(tmp_path, monkeypatch):
  """EMNIST-shaped fake tfds: CNN chosen, flags reach the loader, bits equal the metric rows."""
  calls = []
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _fake_tfds(calls))
  cmp = _load_compare()
  out = str(tmp_path / "out")
  wanted = ["identity", "qsgd", "slaq", "igc_k_subspace"]  # in default_methods order
  table = cmp.main(["--out", out, "--dataset", "emnist", "--data_dir", "/fake/tfds",
                    "--num_clients", "5", "--partition", "iid", "--rounds", "2",
                    "--methods", ",".join(wanted), "--time-reps", "1",
                    "--model_kwargs", '{"features": [4], "dense": 16}'])
  # one train + one test load for the whole comparison (loaded once, shared by all methods)
  assert sorted(c["split"] for c in calls) == ["test", "train"]
  assert all(c["name"] == "emnist" and c["data_dir"] == "/fake/tfds" and c["batch_size"] == -1
             and c["download"] is False for c in calls)
  assert [t["compressor"] for t in table] == wanted
  assert all(t.get("error") is None for t in table), table
  # CNN(features=(4,), dense=16) on 28x28x1 with 62 classes: conv 40 + dense 12560 + out 1054
  dense_params = (3 * 3 * 1 * 4 + 4) + (14 * 14 * 4 * 16 + 16) + (16 * _CLASSES + _CLASSES)
  for t in table:
    run = os.path.join(out, "runs", t["compressor"])
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["model"]["name"] == "cnn"
    assert cfg["dataset"] == dict(name="emnist", data_dir="/fake/tfds", num_clients=5,
                                  partition="iid", alpha=0.5, download=False, seed=0)
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(rows) == 2
    assert t["up_bits"] == sum(r["up_bits"] for r in rows) == rows[-1]["cum_up_bits"]
    assert t["down_bits"] == sum(r["down_bits"] for r in rows)
    for r in rows:
      assert r["accuracy"] is not None and 0.0 <= r["accuracy"] <= 1.0
      assert r["clients"] == 5  # cohort 10 capped at the 5 clients
    assert math.isfinite(t["codec_seconds"]) and t["codec_seconds"] > 0
  ident = table[0]
  assert ident["up_bits"] == 2 * 5 * 32 * dense_params
  assert all(t["up_bits"] < ident["up_bits"] for t in table[1:])
  for name in ("results.md", "results.csv", "accuracy_vs_uplink.png", "accuracy_vs_downlink.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  md = open(os.path.join(out, "results.md")).read()
  assert all(f"| {label} |" in md for label in wanted)


def test_compare_missing_dataset_exits_with_what_to_do(tmp_path, monkeypatch):
  """Absent tfds data or package: SystemExit naming --data_dir / the data extra, nothing run."""
  cmp = _load_compare()
  fake = types.ModuleType("tensorflow_datasets")

  def load(name, **kw):
    raise AssertionError(f"Dataset {name}: could not find data in {kw['data_dir']}")

  fake.load, fake.as_numpy = load, (lambda x: x)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  args = ["--out", str(tmp_path), "--dataset", "cifar10", "--data_dir", "/nowhere", "--rounds", "1"]
  with pytest.raises(SystemExit, match="--data_dir") as err:
    cmp.main(args)
  assert "cifar10" in str(err.value) and "/nowhere" in str(err.value)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(SystemExit, match=r"fedjax_compress\[data\]"):
    cmp.main(args)
  assert not os.path.exists(tmp_path / "runs")


def test_compare_dataset_flags():
  """Synthetic honours num_clients / iid and rejects dirichlet; models default by dataset."""
  cmp = _load_compare()
  c = cmp.base_config("synthetic", 2, 0, num_clients=7, partition="iid")
  assert c.dataset.num_clients == 7 and c.dataset.iid is True and c.model.name == "logistic"
  with pytest.raises(ValueError, match="dirichlet"):
    cmp.base_config("synthetic", 2, 0, partition="dirichlet")
  with pytest.raises(SystemExit, match="dirichlet"):
    cmp.main(["--partition", "dirichlet", "--rounds", "1"])
  c = cmp.base_config("cifar10", 2, 0, alpha=0.1, model="mlp")
  assert c.dataset.partition == "dirichlet" and c.dataset.alpha == 0.1
  assert c.dataset.num_clients == 100 and c.model.name == "mlp"
  assert [cmp.default_model(n) for n in ("synthetic", "emnist", "cifar10", "tiny_shakespeare")
          ] == ["logistic", "cnn", "cnn", "char_lm"]


def test_compare_digits_option():
  """`--dataset digits`: offline sklearn digits, 20 label-skewed clients, MLP 64 (4,810 params)."""
  pytest.importorskip("sklearn")
  cmp = _load_compare()
  c = cmp.base_config("digits", 2, 0)
  assert dict(c.dataset) == dict(name="digits", num_clients=20, partition="dirichlet",
                                 alpha=0.5, seed=0)
  assert c.model.name == "mlp" and dict(c.model.kwargs) == {"hidden": (64,)}
  data = cmp.load_data(c)
  assert data.num_clients == 20 and data.num_classes == 10
  assert cmp.num_params(c, data) == 64 * 64 + 64 + 64 * 10 + 10
  labels = [set(np.unique(cl["y"]).tolist()) for cl in data.clients if len(cl["y"])]
  assert min(len(s) for s in labels) < 10  # label skew: some client lacks some digit
  c = cmp.base_config("digits", 2, 0, num_clients=5, partition="iid", model="logistic")
  assert c.dataset.num_clients == 5 and c.dataset.partition == "iid"
  assert c.model.name == "logistic" and dict(c.model.kwargs) == {}
  labels = {m.label for m in cmp.default_methods(20, 4810)}
  assert {"uniform", "m22", "drive", "fetchsgd", "cast_bf16", "kashin"} <= labels
  assert cmp._fmt("|g| > 0.02") == "\\|g\\| > 0.02"  # a markdown cell never splits its row


def test_digits_config_is_the_compare_task():
  """experiments/configs/digits.py validates and is `compare.py --dataset digits`'s task."""
  pytest.importorskip("sklearn")
  from experiments.common import validate_config
  from experiments.configs import digits
  cfg, base = validate_config(digits.get_config()), _load_compare().base_config("digits", 50, 0)
  for field in ("dataset", "model", "cohort_size", "local_steps", "batch_size", "client_lr",
                "server_opt", "server_lr", "rounds", "seed"):
    assert json.dumps(cfg[field].to_dict() if hasattr(cfg[field], "to_dict") else cfg[field]
                      ) == json.dumps(base[field].to_dict() if hasattr(base[field], "to_dict")
                                      else base[field]), field
