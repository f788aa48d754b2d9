"""Experiment runner: outputs, exact bit totals, bit-identical resume after interruption."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.common import final_state, make_compressor, run_experiment, runner
from experiments.configs import quickstart
from fedjax_compress import compressors, federated, models


def small_config(**over):
  c = quickstart.get_config()
  c.dataset.num_clients = 8
  c.dataset.dim = 6
  c.dataset.num_classes = 3
  c.dataset.samples_per_client = 20
  c.rounds = 6
  c.cohort_size = 3
  c.local_steps = 2
  c.batch_size = 4
  c.checkpoint_every = 2
  c.compressor = "top_k"
  c.compressor_kwargs = {"k": 4}
  c.error_feedback = True  # stateful: per-client residuals must survive the checkpoint
  c.server_opt = "adam"
  c.server_lr = 0.1
  for k, v in over.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module", autouse=True)
def _build_once():
  """Each config is built (and its round compiled) once in this module: the runs compared
  here share a program and differ in their workdirs."""
  real, cache = runner.build_experiment, {}

  def cached(config, data=None):
    if data is not None:
      return real(config, data)
    cfg = runner.normalized_config(runner.validate_config(config))
    key = json.dumps(dict(cfg, rounds=None), sort_keys=True)
    if key not in cache:
      cache[key] = real(config)
    return cache[key]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(runner, "build_experiment", cached)
    yield


def params_bytes(state):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(state)]


def test_resume_after_crash_is_bit_identical(tmp_path):
  cfg = small_config()
  ref_rows = run_experiment(cfg, str(tmp_path / "ref"), progress=False)
  ref_state = final_state(cfg, str(tmp_path / "ref"))

  def crash(r, row):
    if r == 5:
      raise RuntimeError("simulated crash")
  with pytest.raises(RuntimeError, match="simulated"):
    run_experiment(cfg, str(tmp_path / "int"), progress=False, callback=crash)
  lines = open(tmp_path / "int" / "metrics.jsonl").read().splitlines()
  assert len(lines) == 5  # rows 1..5 written; checkpoint only at 4
  rows = run_experiment(cfg, str(tmp_path / "int"), progress=False)
  assert rows == ref_rows
  assert [json.loads(l) for l in open(tmp_path / "int" / "metrics.jsonl")] == ref_rows
  assert params_bytes(final_state(cfg, str(tmp_path / "int"))) == params_bytes(ref_state)
  assert int(ref_state.round) == 6


def test_resume_with_zero_size_state_leaves(tmp_path):
  # PowerSGD keeps zero-size placeholders for 1-D leaves; checkpoints must still round-trip.
  cfg = small_config(compressor="power_sgd", compressor_kwargs={"rank": 1}, rounds=4)
  ref_rows = run_experiment(cfg, str(tmp_path / "ref"), progress=False)

  def crash(r, row):
    if r == 3:
      raise RuntimeError("simulated crash")
  with pytest.raises(RuntimeError, match="simulated"):
    run_experiment(cfg, str(tmp_path / "int"), progress=False, callback=crash)
  assert run_experiment(cfg, str(tmp_path / "int"), progress=False) == ref_rows
  assert (params_bytes(final_state(cfg, str(tmp_path / "int")))
          == params_bytes(final_state(cfg, str(tmp_path / "ref"))))


def test_changed_config_does_not_resume_silently(tmp_path):
  cfg = small_config(rounds=2)
  run_experiment(cfg, str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="different config"):
    run_experiment(small_config(rounds=2, client_lr=0.5), str(tmp_path), progress=False)
  rows = run_experiment(small_config(rounds=3), str(tmp_path), progress=False)  # extend: ok
  assert [r["round"] for r in rows] == [1, 2, 3]


def test_keyboard_interrupt_saves_last_round(tmp_path):
  cfg = small_config(rounds=4, checkpoint_every=100)

  def stop(r, row):
    if r == 3:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    run_experiment(cfg, str(tmp_path), progress=False, callback=stop)
  assert int(final_state(cfg, str(tmp_path)).round) == 3
  rows = run_experiment(cfg, str(tmp_path), progress=False)
  assert [r["round"] for r in rows] == [1, 2, 3, 4]


def test_outputs_and_exact_bit_totals(tmp_path):
  cfg = small_config(compressor="identity", compressor_kwargs={}, error_feedback=False,
                     rounds=3, server_opt="sgd", server_lr=1.0)
  rows = run_experiment(cfg, str(tmp_path), progress=False)
  for f in ["config.json", "metrics.jsonl", "accuracy_vs_bits.png"]:
    assert os.path.getsize(tmp_path / f) > 0
  assert json.load(open(tmp_path / "config.json"))["compressor"] == "identity"
  dense = 32 * (6 * 3 + 3)  # logistic regression on dim 6, 3 classes
  cum = 0
  for r in rows:
    assert r["clients"] == 3
    assert r["up_bits"] == r["down_bits"] == 3 * dense
    cum += r["up_bits"] + r["down_bits"]
    assert r["cum_bits"] == cum and isinstance(r["cum_bits"], int)
    assert 0.0 <= r["accuracy"] <= 1.0
  # per-bit accuracy (acc_t - acc_0) / cum_up_t: every row implies the same initial accuracy
  acc0 = [r["accuracy"] - r["per_bit_accuracy"] * r["cum_up_bits"] for r in rows]
  np.testing.assert_allclose(acc0, acc0[0], atol=1e-9)
  assert 0.0 <= acc0[0] <= 1.0


def test_compressor_table():
  assert "qsgd" in make_compressor.__globals__["available"]()
  c = make_compressor("lbgm", {"inner": {"name": "top_k", "kwargs": {"fraction": 0.5}},
                               "threshold": 0.3})
  assert isinstance(c, compressors.identity().__class__)
  with pytest.raises(ValueError, match="unknown compressor"):
    make_compressor("zip9000")


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, rounds):
  """Run `python -m experiments.run` on the quickstart config; returns the completed process."""
  env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py",
       f"--workdir={workdir}", f"--config.rounds={rounds}"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=120, check=True)


def _check_cli_rows(workdir):
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["round"] for r in rows] == [1, 2]
  for r in rows:
    assert isinstance(r["up_bits"], int) and isinstance(r["down_bits"], int)
    assert r["up_bits"] > 0 and r["down_bits"] > 0 and r["clients"] == 10
  assert rows[1]["cum_up_bits"] == rows[0]["up_bits"] + rows[1]["up_bits"]
  assert json.load(open(workdir / "config.json"))["rounds"] == 2
  return rows


def test_cli_entry_point_writes_metrics(tmp_path):
  """README's main command (`python -m experiments.run` on the quickstart config) runs."""
  out = _cli(tmp_path / "run", 2)
  assert "done: 2 rounds" in out.stdout
  _check_cli_rows(tmp_path / "run")


@pytest.mark.slow
def test_cli_entry_point_writes_metrics_and_resumes(tmp_path):
  """The absl CLI runs the config's rounds; a second call on the workdir continues from the
  checkpoint (the first rounds' rows are kept, not recomputed)."""
  workdir = tmp_path / "run"
  out = _cli(workdir, 2)
  assert "done: 2 rounds" in out.stdout
  path = workdir / "metrics.jsonl"
  rows = _check_cli_rows(workdir)
  # Mark the stored rows: a run that redid rounds 1-2 would overwrite the marks.
  for r in rows:
    r["loss"] = -1.0
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  out = _cli(workdir, 3)
  assert "done: 3 rounds" in out.stdout
  resumed = [json.loads(line) for line in open(path)]
  assert [r["round"] for r in resumed] == [1, 2, 3]
  assert resumed[:2] == rows  # kept as stored
  assert resumed[2]["loss"] > 0 and isinstance(resumed[2]["up_bits"], int)
  assert resumed[2]["cum_up_bits"] == rows[1]["cum_up_bits"] + resumed[2]["up_bits"]


def test_cpu_cnn_trains_with_im2col_and_matches_xla_convs():
  """`training_model` swaps in im2col convs on CPU; a round trains exactly as with nn.Conv."""
  kw = {"features": (4,), "dense": 8}
  fast = runner.training_model("cnn", 3, kw)
  assert fast.conv_impl == ("im2col" if jax.default_backend() == "cpu" else "xla")
  assert runner.training_model("cnn", 3, dict(kw, conv_impl="xla")).conv_impl == "xla"
  assert runner.training_model("mlp", 3, {}) == models.create("mlp", 3)
  slow = models.create("cnn", 3, conv_impl="xla", **kw)
  rng = np.random.default_rng(0)
  c, steps, b = 3, 2, 4
  cohort = federated.Cohort(
      ids=np.arange(c, dtype=np.int32),
      batches={"x": rng.random((c, steps, b, 8, 8, 1)).astype(np.float32),
               "y": rng.integers(0, 3, (c, steps, b)).astype(np.int32)},
      mask=np.ones((c, steps, b), bool), weight=np.ones(c, np.float32))
  params = models.init_params(slow, jnp.zeros((1, 8, 8, 1)))
  out = []
  for m in (fast, slow):
    rnd = jax.jit(federated.build_round(models.classification_loss(m), optax.sgd(0.5),
                                        optax.sgd(1.0), compressors.identity(),
                                        local_steps=steps))
    state = federated.init_server_state(params, optax.sgd(1.0), compressors.identity(),
                                        num_clients=c)
    out.append(rnd(state, cohort, jax.random.key(0))[0].params)
  for a, b_ in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)
  assert not all(np.array_equal(np.asarray(a), np.asarray(p))
                 for a, p in zip(jax.tree.leaves(out[0]), jax.tree.leaves(params)))
