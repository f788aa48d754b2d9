"""LBGM experiment (experiments/lbgm/run.py): data, per-tensor baseline, exact bits, tiny run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.lbgm import run
from fedjax_compress import Keys, bits, compressors as C, data, models

FEATURES, DENSE, CLIENTS, ROUNDS = (6,), 32, 4, 30  # a one-conv CNN: compiles fast


def _cnn_param_sizes(cfg: run.Config) -> list[int]:
  model = run.make_model(cfg, np.zeros((1, 28, 28, 1), np.float32))
  params = models.init_params(model, np.zeros((1, 28, 28, 1), np.float32))
  return [int(x.size) for x in jax.tree.leaves(params)]


def test_synthetic_images_deterministic_balanced_and_noise_controlled():
  a_tr, a_te = data.synthetic_images(50, 20, seed=3)
  b_tr, _ = data.synthetic_images(50, 20, seed=3)
  c_tr, _ = data.synthetic_images(50, 20, seed=4)
  np.testing.assert_array_equal(a_tr["x"], b_tr["x"])
  np.testing.assert_array_equal(a_tr["y"], b_tr["y"])
  assert not np.array_equal(a_tr["x"], c_tr["x"])
  assert a_tr["x"].shape == (50, 28, 28, 1) and a_te["x"].shape == (20, 28, 28, 1)
  assert np.bincount(a_tr["y"], minlength=10).tolist() == [5] * 10
  clean, _ = data.synthetic_images(50, 1, noise=0.0, seed=3)
  # same templates, shifts and amplitudes: the difference is exactly the pixel noise
  resid = a_tr["x"] - clean["x"]
  assert abs(float(resid.std()) - 0.3) < 0.01
  assert clean["x"].min() >= 0.0 and clean["x"].max() <= 1.4 + 1e-6
  with pytest.raises(ValueError, match="noise"):
    data.synthetic_images(5, 5, noise=-1.0)


def test_deal_classes_gives_each_client_its_classes_disjointly():
  labels = np.repeat(np.arange(10), 30)
  parts = run.deal_classes(labels, 20, 3, seed=0)
  allidx = np.concatenate(parts)
  assert sorted(allidx.tolist()) == list(range(300))  # a partition of the examples
  for i, p in enumerate(parts):
    assert set(labels[p].tolist()) == {(3 * i + j) % 10 for j in range(3)}
    assert len(p) == 15  # each class has 6 holders: 30 / 6 = 5 examples of each of 3 classes


def test_per_tensor_top_k_is_lbgm_inner_compressor():
  rng = np.random.default_rng(0)
  g = {"a": jnp.asarray(rng.normal(size=(7, 9)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(13,)), jnp.float32)}
  keys = Keys(jax.random.key(0), jax.random.key(1))
  base = run.per_tensor(C.top_k(fraction=0.1))
  lb = C.lbgm(C.top_k(fraction=0.1), 0.4)
  (bs, br), (ls, lr) = base.init(g), lb.init(g)
  bp, _ = base.encode(g, bs, keys)
  lp, _ = lb.encode(g, ls, keys)  # first message: always full
  bd, _ = base.decode(bp, br, keys, g)
  ld, _ = lb.decode(lp, lr, keys, g)
  for n in g:
    np.testing.assert_array_equal(np.asarray(bd[n]), np.asarray(ld[n]))
  ks = {n: math.ceil(0.1 * x.size) for n, x in g.items()}
  assert int(bits.count(bp)) == sum(k * (32 + bits.index_bits(g[n].size)) for n, k in ks.items())
  # LBGM's full message adds a 1-bit rho header and the two inner length headers per tensor
  overhead = sum(1 + 2 * bits.length_bits(k) for k in ks.values())
  assert int(bits.count(lp)) == int(bits.count(bp)) + overhead
  # the global top-k keeps the largest entries of the whole model instead (different support)
  glob, _ = C.top_k(fraction=0.1).encode(g, None, keys)
  assert int(bits.count(glob)) != int(bits.count(bp))


def test_mnist_without_prepared_tfds_is_a_clear_error(tmp_path):
  with pytest.raises(RuntimeError, match="--dataset=mnist"):
    run.make_data(run.Config(dataset="mnist", data_dir=str(tmp_path)))
  with pytest.raises(ValueError, match="--model=mlp"):
    cfg = run.Config(dataset="teacher", samples=40, test_samples=10)
    run.make_model(cfg, run.make_data(cfg).clients[0]["x"])


@pytest.mark.slow  # ~130 s on 2 cores
def test_tiny_cnn_experiment_bits_and_learning(tmp_path):
  argv = ["--workdir", str(tmp_path), "--rounds", str(ROUNDS), "--clients", str(CLIENTS),
          "--samples", "160", "--test_samples", "200", "--image_noise", "0.1", "--lr", "0.02",
          "--cnn_features", ",".join(map(str, FEATURES)), "--cnn_dense", str(DENSE),
          "--deltas", "0,0.5", "--eval_every", "10"]
  run.main(argv)
  with open(tmp_path / "summary.json") as f:
    out = json.load(f)
  cfg, _ = run.parse_args(argv)
  assert out["config"]["cnn_features"] == list(FEATURES) and out["config"]["deltas"] == [0, 0.5]
  by = {r["method"]: r for r in out["rows"]}
  curves = out["curves"]
  assert list(by) == [name for name, _, _, _ in run.method_table(cfg)]
  sizes = _cnn_param_sizes(cfg)
  d, t = sum(sizes), len(sizes)

  for name, r in by.items():
    up = curves[name]["up_bits"]
    assert len(up) == ROUNDS and all(isinstance(b, int) and b > 0 for b in up)
    assert r["uplink_bits"] == sum(up) and r["round1_bits"] == up[0]
    assert curves[name]["eval_rounds"] == [10, 20, 30]
    assert all(0.0 <= a <= 1.0 for a in curves[name]["test_acc"])
    assert r["best_acc"] == max(curves[name]["test_acc"])

  # exact per-round bills of the base methods (all clients participate every round)
  topk = "top-10% (per tensor) + EF"
  ks = [math.ceil(0.1 * n) for n in sizes]
  assert curves["FedSGD"]["up_bits"] == [CLIENTS * 32 * d] * ROUNDS
  assert curves["signSGD (scaled)"]["up_bits"] == [CLIENTS * (d + 32 * t)] * ROUNDS
  assert curves[topk]["up_bits"] == [
      CLIENTS * sum(k * (32 + bits.index_bits(n)) for k, n in zip(ks, sizes))] * ROUNDS

  # the official "# params shared" (floats) beside the bits: values sent, indices not counted
  assert curves["FedSGD"]["floats"] == curves["signSGD (scaled)"]["floats"] == [CLIENTS * d] * ROUNDS
  assert curves[topk]["floats"] == [CLIENTS * sum(ks)] * ROUNDS
  for name in ("LBGM d=0.5", "signSGD + LBGM d=0.4", "EF(top-10% + LBGM d=0.4)"):
    base = curves[by[name]["base"]]["floats"]
    assert curves[name]["floats"][0] == base[0]          # round 1: every tensor full
    assert all(t <= b for t, b in zip(curves[name]["floats"], base))
    assert all(f >= CLIENTS * t for f in curves[name]["floats"])  # >= 1 float per tensor
    assert by[name]["floats_shared"] == sum(curves[name]["floats"])
  assert by["LBGM d=0.5"]["floats_shared"] < by["FedSGD"]["floats_shared"]

  # threshold 0 never recycles: exactly FedSGD (bits, accuracy and loss curves)
  assert curves["LBGM d=0"] == curves["FedSGD"] and by["LBGM d=0"]["overhead_bits"] == 0

  # the first LBGM round is all full: the base bill plus the flag / length headers exactly
  headers = {"LBGM d=0.5": [bits.length_bits(n) for n in sizes],
             "signSGD + LBGM d=0.4": [bits.length_bits(n) + 1 for n in sizes],
             "EF(top-10% + LBGM d=0.4)": [2 * bits.length_bits(k) for k in ks]}
  for name, h in headers.items():
    r = by[name]
    assert r["overhead_bits"] == CLIENTS * sum(1 + x for x in h)
    # never more than the base plus the headers; recycling makes it cheaper
    assert r["uplink_bits"] <= by[r["base"]]["uplink_bits"] + ROUNDS * r["overhead_bits"]
    assert r["uplink_saved_vs_base"] == pytest.approx(
        1 - r["uplink_bits"] / by[r["base"]]["uplink_bits"])
  assert by["LBGM d=0.5"]["uplink_bits"] < by["FedSGD"]["uplink_bits"]
  assert by["signSGD + LBGM d=0.4"]["uplink_bits"] < by["signSGD (scaled)"]["uplink_bits"]

  # the easy synthetic task is learnt: well above chance (0.1) after 30 FedSGD rounds
  assert by["FedSGD"]["best_acc"] > 0.25
  assert curves["FedSGD"]["train_loss"][-1] < curves["FedSGD"]["train_loss"][0]
