"""Per-client evaluation (float64 NumPy references) and the fairness summaries."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import evaluation, models


def _ce_hits(logits, y):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  return nll, (logits.argmax(-1) == y).astype(np.float64)


def _clients(rng, sizes, d=5, classes=4):
  return [{"x": rng.normal(size=(n, d)).astype(np.float32),
           "y": rng.integers(0, classes, n).astype(np.int32)} for n in sizes]


@pytest.fixture(scope="module")
def logistic():
  m = models.LogisticRegression(4)
  p = models.init_params(m, np.zeros((1, 5), np.float32), 3)
  return m, p


def test_classification_matches_float64_reference_and_chunking(logistic):
  m, p = logistic
  rng = np.random.default_rng(0)
  cl = _clients(rng, [7, 0, 1, 12, 3])
  w, b = np.asarray(p["Dense_0"]["kernel"], np.float64), np.asarray(p["Dense_0"]["bias"])
  r = evaluation.evaluate_clients(m, p, cl, batch_size=4, clients_per_chunk=2)
  for k, c in enumerate(cl):
    assert r["num_examples"][k] == len(c["y"]) and r["count"][k] == len(c["y"])
    if not len(c["y"]):
      assert np.isnan(r["loss"][k]) and np.isnan(r["accuracy"][k])
      continue
    nll, hit = _ce_hits(c["x"].astype(np.float64) @ w + b, c["y"])
    np.testing.assert_allclose(r["loss"][k], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(r["accuracy"][k], hit.mean(), rtol=1e-12)
  # the result does not depend on how clients and examples are batched
  r2 = evaluation.evaluate_clients(m, p, cl, batch_size=5, clients_per_chunk=16)
  for key in r:
    np.testing.assert_allclose(r[key], r2[key], rtol=1e-6)
  # count-weighted client accuracy is the pooled accuracy of models.evaluate
  pooled = {k: np.concatenate([c[k] for c in cl]) for k in ("x", "y")}
  s = evaluation.summarize(r["accuracy"], r["count"])
  np.testing.assert_allclose(s["weighted_mean"], models.evaluate(m, p, pooled)["accuracy"],
                             rtol=1e-6)


class _Bigram(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(self.vocab, self.vocab)(tokens)


def test_sequences_ignore_labels_and_excluded_predictions():
  v = 6
  m = _Bigram(v)
  rng = np.random.default_rng(1)
  x0 = rng.integers(0, v, (1, 4)).astype(np.int32)
  p = models.init_params(m, x0, 0)
  table = np.asarray(p["Embed_0"]["embedding"], np.float64)
  table[:, 3] += 0.5  # make label 3 the argmax often, so excluding it matters
  p = {"Embed_0": {"embedding": jnp.asarray(table, jnp.float32)}}
  cl = [{"x": rng.integers(0, v, (n, 4)).astype(np.int32),
         "y": rng.integers(0, v, (n, 4)).astype(np.int32)} for n in (3, 5)]
  cl[0]["y"][0] = 0  # a fully padded row
  r = evaluation.evaluate_clients(m, p, cl, batch_size=2, ignore_labels=(0, 2),
                                  exclude_predictions=(3,))
  for k, c in enumerate(cl):
    logits = table[c["x"]]
    nll, _ = _ce_hits(logits, c["y"])
    masked = logits.copy()
    masked[..., 3] = -np.inf
    hit = (masked.argmax(-1) == c["y"]).astype(np.float64)
    keep = ~np.isin(c["y"], (0, 2))
    assert r["count"][k] == keep.sum() and r["num_examples"][k] == len(c["y"])
    np.testing.assert_allclose(r["loss"][k], nll[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(r["accuracy"][k], hit[keep].mean(), rtol=1e-12)
  plain = evaluation.evaluate_clients(m, p, cl, batch_size=2)
  assert (plain["count"] == [12, 20]).all()


def test_per_client_params(logistic):
  m, p = logistic
  rng = np.random.default_rng(2)
  cl = _clients(rng, [4, 6, 2])
  stacked = jax.tree.map(lambda a: jnp.stack([a * (1 + k) for k in range(3)]), p)
  r = evaluation.evaluate_clients(m, stacked, cl, batch_size=4, clients_per_chunk=2,
                                  per_client_params=True)
  for k in range(3):
    own = evaluation.evaluate_clients(m, jax.tree.map(lambda a: a[k], stacked), [cl[k]],
                                      batch_size=4, clients_per_chunk=2)
    np.testing.assert_allclose(r["loss"][k], own["loss"][0], rtol=1e-6)
    np.testing.assert_allclose(r["accuracy"][k], own["accuracy"][0])
  with pytest.raises(ValueError, match="leading"):
    evaluation.evaluate_clients(m, stacked, cl[:2], per_client_params=True)
  with pytest.raises(ValueError, match="batch_size"):
    evaluation.evaluate_clients(m, p, cl, batch_size=0)
  with pytest.raises(ValueError, match="at least one client"):
    evaluation.evaluate_clients(m, p, [])


def test_summarize_against_numpy_on_random_inputs():
  rng = np.random.default_rng(3)
  for _ in range(20):
    n = int(rng.integers(1, 30))
    v = rng.random(n)
    w = rng.integers(0, 5, n).astype(float)
    w[0] += 1
    v[rng.random(n) < 0.2] = np.nan
    v[int(rng.integers(0, n))] = rng.random()
    s = evaluation.summarize(v, w, percentiles=(5, 10, 50, 90, 100))
    keep = ~np.isnan(v)
    kv, kw = v[keep], w[keep]
    assert s["num_clients"] == keep.sum()
    np.testing.assert_allclose(s["mean"], kv.mean())
    np.testing.assert_allclose(s["std"], kv.std())
    if kw.sum():
      np.testing.assert_allclose(s["weighted_mean"], (kv * kw).sum() / kw.sum())
    for q in (5, 10, 50, 90, 100):
      np.testing.assert_allclose(s[f"p{q}"], np.percentile(kv, q))
    assert s["min"] == kv.min() == v[s["worst_client"]]
    assert s["max"] == kv.max() == v[s["best_client"]] == s["p100"]
    assert s["min"] <= s["p10"] <= s["p50"] <= s["p90"] <= s["max"]


def test_fairness_report_and_validation():
  per = {"accuracy": np.array([0.2, 0.8, np.nan, 0.5]), "loss": np.array([2.0, 0.5, np.nan, 1.0]),
         "count": np.array([10, 30, 0, 10])}
  rep = evaluation.fairness_report(per)
  assert rep["accuracy/worst_client"] == 0 and rep["loss/worst_client"] == 1  # min of each
  np.testing.assert_allclose(rep["accuracy/weighted_mean"], (2 + 24 + 5) / 50)
  assert rep["accuracy/p50"] == 0.5 and rep["accuracy/num_clients"] == 3
  with pytest.raises(ValueError, match="metric 'f1'"):
    evaluation.fairness_report(per, metrics=("f1",))
  with pytest.raises(ValueError, match="percentiles"):
    evaluation.summarize([1.0], percentiles=(101,))
  with pytest.raises(ValueError, match="weights must match"):
    evaluation.summarize([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match=">= 0"):
    evaluation.summarize([1.0], [-1.0])
  with pytest.raises(ValueError, match="no client"):
    evaluation.summarize([np.nan])
