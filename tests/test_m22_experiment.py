"""The M22 experiment's per-round probe (experiments/m22/probe.py): the fitted shape it logs is
the fit of the codec's kept entries, it recovers a known distribution, and cos / length ratio
match NumPy. The end-to-end run (probe columns in rows and summary) is marked slow."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments.m22 import probe
from fedjax_compress.compressors import _m22


def _gennorm(beta, n, seed, scale=1.0):
  return (stats.gennorm.rvs(beta, scale=scale, size=n, random_state=seed)).astype(np.float32)


@pytest.mark.parametrize("beta", [0.7, 1.5])
def test_logged_shape_recovers_a_known_gennorm(beta):
  x = _gennorm(beta, 20000, 0, scale=0.01) + 0.002        # location and scale: z-scored away
  tree = {"a_small": jnp.ones(7), "w": jnp.asarray(x.reshape(200, 100))}
  # top_fraction = R: every entry kept, so the fitted sample is the whole leaf
  shape, scale, kept = probe.kept_fit(tree, bits=1, top_fraction=1.0, min_layer_size=100)
  assert shape.shape == (1,) and int(kept[0]) == x.size
  assert abs(float(shape[0]) - beta) < 0.05 * beta          # MLE on 20k draws
  _, _, p_ref, a_ref = _m22.fit(x)                          # the codec's fit on the same entries
  np.testing.assert_allclose(shape[0], p_ref, rtol=1e-4)
  np.testing.assert_allclose(scale[0], a_ref, rtol=1e-4)
  # z-scored GenNorm(beta, a): var = a^2 Gamma(3/b)/Gamma(1/b) = 1
  from scipy.special import gammaln  # pylint: disable=import-outside-toplevel
  a_theory = np.exp(0.5 * (gammaln(1 / beta) - gammaln(3 / beta)))
  assert abs(float(scale[0]) - a_theory) < 0.05 * a_theory


def test_logged_fit_is_the_fit_of_the_top_k_kept_entries():
  rng = np.random.default_rng(1)
  w1 = _gennorm(0.8, 3000, 2)
  w1[:50] = 0.0                                             # exact zeros are never kept
  w2 = rng.standard_normal(1500).astype(np.float32) * 0.3
  bias = rng.standard_normal(20).astype(np.float32)
  tree = {"b": jnp.asarray(bias), "k1": jnp.asarray(w1), "k2": jnp.asarray(w2)}
  bits, p_frac = 2, 0.6
  fam = "weibull"
  shape, scale, kept = jax.jit(lambda t: probe.kept_fit(
      t, bits=bits, top_fraction=p_frac, min_layer_size=100, family=fam))(tree)
  # NumPy reference of the kept set: the k largest |x| over the whole model (no ties here)
  allx = np.concatenate([w1, w2, bias])                    # wire order: k1, k2, then raw b
  k = int(np.ceil(p_frac / bits * allx.size))
  thr = np.sort(np.abs(allx))[-k]
  for j, x in enumerate((w1, w2)):
    sel = x[(np.abs(x) >= thr) & (x != 0)]
    assert int(kept[j]) == sel.size
    _, _, p_ref, a_ref = _m22.fit(sel, fam)
    np.testing.assert_allclose(shape[j], p_ref, rtol=1e-4)
    np.testing.assert_allclose(scale[j], a_ref, rtol=1e-4)


def test_direction_stats_match_numpy():
  rng = np.random.default_rng(3)
  t = {"a": rng.standard_normal((4, 5)), "b": rng.standard_normal(3)}
  s = {"a": 2.5 * t["a"] + 0.3 * rng.standard_normal((4, 5)), "b": -t["b"]}
  cos, ratio = probe.direction_stats(t, s)
  tv = np.concatenate([t["a"].ravel(), t["b"]])
  sv = np.concatenate([s["a"].ravel(), s["b"]])
  np.testing.assert_allclose(cos, tv @ sv / np.linalg.norm(tv) / np.linalg.norm(sv), rtol=1e-5)
  np.testing.assert_allclose(ratio, np.linalg.norm(sv) / np.linalg.norm(tv), rtol=1e-5)
  c2, r2 = probe.direction_stats(t, jax.tree.map(lambda x: 3.0 * x, t))   # scaling: cos 1
  assert abs(float(c2) - 1) < 1e-6 and abs(float(r2) - 3) < 1e-5
  z = jax.tree.map(np.zeros_like, t)
  assert probe.direction_stats(t, z) == (0.0, 0.0)


def test_fit_kwargs_follow_the_variant():
  kw = probe.fit_kwargs_of("m22", {"bits": 3, "m": 2.0, "family": "weibull",
                                   "top_fraction": 0.6, "min_layer_size": 100})
  assert kw == dict(bits=3, top_fraction=0.6, iso_bit=True, min_layer_size=100,
                    family="weibull")
  assert probe.fit_kwargs_of("uniform", {"bits": 2, "top_fraction": 0.6})["family"] == "gennorm"
  assert probe.fit_kwargs_of("qsgd", {"levels": 1}) is None
  with pytest.raises(ValueError, match="family"):
    probe.kept_fit({"w": jnp.ones(10)}, bits=1, top_fraction=None, family="laplace")


@pytest.mark.slow  # a tiny sweep (16 runs) plus 5 replays: ~3 min CPU, 7.5 min on 2 busy cores
def test_m22_experiment_logs_probe_columns(tmp_path):
  from experiments.m22 import run  # pylint: disable=import-outside-toplevel
  run.main(["--workdir", str(tmp_path), "--rounds", "2", "--hidden", "4", "--lloyd-iters", "5",
            "--bits", "1", "--server-lrs", "2,1"])  # first lr != 1: labels untagged
  with open(os.path.join(tmp_path, "summary.json")) as f:
    out = json.load(f)
  by = {r["method"]: r for r in out["rows"]}
  assert not [r for r in out["rows"] if "error" in r]
  assert not [m for m in by if "@lr" in m]                 # one untagged row per method
  for s in out["rows"]:                                    # the tuned lr is the best one
    assert s["best_acc"] == max(s["best_acc_by_lr"].values())
    assert set(s["best_acc_by_lr"]) == {"1", "2"}
  for name in ("uniform R=1", "M22 R=1 gennorm M=0", "M22 R=1 weibull M=2"):
    s = by[name]
    assert s["probe_final_acc"] == pytest.approx(s["final_acc"], abs=1e-6)  # same trajectory
    assert len(s["fit_shape_mean"]) == 1                    # one quantized leaf (60x4)
    assert _m22.SHAPE_BOUNDS[0] <= s["fit_shape_mean"][0] <= _m22.SHAPE_BOUNDS[1]
    assert 0 < s["len_ratio_mean"] and -1 <= s["cos_mean"] <= 1
    with open(os.path.join(tmp_path, "runs", s["run"], "probe.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert [r["round"] for r in rows] == [1, 2] and "fit_shape" in rows[0]
    assert len(rows[0]["leaf_cos"]) == 1                   # one leaf: whole model = the leaf
    assert -1 <= rows[0]["leaf_cos"][0] <= 1 and rows[0]["leaf_len_ratio"][0] > 0
  assert "fit_shape_mean" not in by["QSGD s=1 (2 bit)"]
