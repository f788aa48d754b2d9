"""The experiment runner never loses or mixes up results: corrupt checkpoints, damaged
metrics, changed or missing configs, two writers, SIGTERM, kill -9, bad config fields.

One completed reference run (module fixture) is copied and damaged by each test; the process
tests run this file as a worker script (`python tests/test_runner_safety.py worker ...`).
"""

import functools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from experiments import run as cli
from experiments.common import (ConfigError, RoundMemoryError, Terminated, WorkdirBusy, WorkdirError, available,
                                final_state, make_compressor, run_experiment, runner,
                                validate_config)
from experiments.common.checkpoint import WorkdirLock, config_diff
from experiments.common.logging import MetricsWriter
from experiments.configs import quickstart
from fedjax_compress import data as fdata
from fedjax_compress.checkpoint import _checkpoint as fckpt_impl

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 8


def tiny_config(**over):
  """A ~ms-per-round run with stateful clients (top-k + EF) and an adaptive server."""
  c = quickstart.get_config()
  c.dataset.num_clients, c.dataset.dim, c.dataset.num_classes = 6, 4, 3
  c.dataset.samples_per_client = 12
  c.rounds, c.cohort_size, c.local_steps, c.batch_size = ROUNDS, 2, 1, 4
  c.checkpoint_every = 3  # checkpoints 3, 6, 8; the last two are kept
  c.compressor, c.compressor_kwargs, c.error_feedback = "top_k", {"k": 2}, True
  c.server_opt, c.server_lr = "adam", 0.1
  for k, v in over.items():
    setattr(c, k, v)
  return c


def _leaf_bytes(state):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(state)]


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


@pytest.fixture(scope="module", autouse=True)
def real_build():
  """Each config is built (and its round compiled) once in this module; the runs here differ
  in their workdirs, not their programs. Yields the real `build_experiment`."""
  real, cache = runner.build_experiment, {}

  def cached(config, data=None):
    if data is not None:
      return real(config, data)
    key = json.dumps(dict(runner.normalized_config(validate_config(config)), rounds=None),
                     sort_keys=True)
    if key not in cache:
      cache[key] = real(config)
    return cache[key]
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(runner, "build_experiment", cached)
    yield real


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  rows = run_experiment(tiny_config(), workdir, progress=False)
  return workdir, rows, _leaf_bytes(final_state(tiny_config(), workdir))


def _copy(ref, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(ref[0], dst)
  return dst


def _ckpt(workdir, step):
  return os.path.join(workdir, "ckpt", f"step_{step}.ckpt")


def _assert_like_ref(workdir, rows, ref):
  assert rows == ref[1]
  assert [json.loads(line) for line in _lines(os.path.join(workdir, "metrics.jsonl"))] == ref[1]
  assert _leaf_bytes(final_state(tiny_config(), workdir)) == ref[2]


def test_reference_run_layout(ref):
  workdir, rows, _ = ref
  assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["step_6.ckpt", "step_8.ckpt"]
  meta = runner.fcheckpoint.read_metadata(_ckpt(workdir, 8))
  assert meta["rows"] == rows and meta["config"] == json.load(
      open(os.path.join(workdir, "config.json")))


def _flip(path):
  with open(path, "r+b") as f:
    at = os.path.getsize(path) - 40  # inside the leaf data, before the digest
    f.seek(at)
    b = f.read(1)
    f.seek(at)
    f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(ref, tmp_path, capfd, damage):
  workdir = _copy(ref, tmp_path)
  path = _ckpt(workdir, 8)
  if damage == "flip":
    _flip(path)
  else:
    os.truncate(path, 0 if damage == "empty" else os.path.getsize(path) // 2)
  # the last two rows are gone too, as after a crash right after the checkpoint
  mpath = os.path.join(workdir, "metrics.jsonl")
  with open(mpath, "w") as f:
    f.writelines(line + "\n" for line in _lines(os.path.join(ref[0], "metrics.jsonl"))[:6])
  damaged = open(path, "rb").read()
  rows = run_experiment(tiny_config(), workdir, progress=False)
  err = capfd.readouterr().err
  assert "skipping checkpoint of round 8" in err and "previous good checkpoint, round 6" in err
  assert "checkpoint of round 8 (unverified) moved to " in err
  _assert_like_ref(workdir, rows, ref)
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == [
      "step_6.ckpt", "step_8.ckpt", "step_8.ckpt.corrupt"]
  assert open(path + ".corrupt", "rb").read() == damaged  # kept as it was


def test_extending_past_a_damaged_checkpoint_keeps_the_restored_one(ref, tmp_path):
  """Rounds 1-9 after step 8 is damaged: the save of round 9 prunes below it, and must keep
  the verified step 6 rather than count the damaged step 8 as the fallback."""
  workdir = _copy(ref, tmp_path)
  _flip(_ckpt(workdir, 8))
  rows = run_experiment(tiny_config(rounds=ROUNDS + 1), workdir, progress=False)
  assert rows[:ROUNDS] == ref[1] and len(rows) == ROUNDS + 1
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == [
      "step_6.ckpt", "step_8.ckpt.corrupt", "step_9.ckpt"]


def test_no_verified_checkpoint_stops_and_touches_nothing(ref, tmp_path):
  workdir = _copy(ref, tmp_path)
  _flip(_ckpt(workdir, 8))
  os.truncate(_ckpt(workdir, 6), 100)
  before = {n: open(os.path.join(dp, n), "rb").read()
            for dp, _, ns in os.walk(workdir) for n in ns}
  with pytest.raises(WorkdirError, match="passes verification.*nothing was changed"):
    run_experiment(tiny_config(), workdir, progress=False)
  after = {n: open(os.path.join(dp, n), "rb").read()
           for dp, _, ns in os.walk(workdir) for n in ns}
  assert after == before


@pytest.mark.parametrize("damage", ["garbage_line", "duplicated_row", "deleted", "torn_tail"])
def test_damaged_metrics_are_recovered_and_kept(ref, tmp_path, capfd, damage):
  workdir = _copy(ref, tmp_path)
  mpath = os.path.join(workdir, "metrics.jsonl")
  lines = _lines(mpath)
  if damage == "garbage_line":
    lines[2] = '{"round": 3, "loss": 0.4'
  elif damage == "duplicated_row":
    lines.insert(4, lines[3])
  if damage == "deleted":
    os.remove(mpath)
  else:
    with open(mpath, "w") as f:
      f.write("\n".join(lines) + ("\n" if damage != "torn_tail" else '\n{"round": 9, "lo'))
  original = None if damage == "deleted" else open(mpath).read()
  rows = run_experiment(tiny_config(), workdir, progress=False)
  err = capfd.readouterr().err
  _assert_like_ref(workdir, rows, ref)
  backups = sorted(n for n in os.listdir(workdir) if n.startswith("metrics.jsonl.bak"))
  if damage in ("garbage_line", "duplicated_row"):
    assert f"line {3 if damage == 'garbage_line' else 5} is malformed" in err
    assert backups == ["metrics.jsonl.bak"]
    assert open(os.path.join(workdir, backups[0])).read() == original  # nothing lost
  else:  # a missing file is rebuilt; a torn last write (round 9 > checkpoint) is dropped
    assert backups == []


def test_extending_a_run_keeps_metrics_without_backup(ref, tmp_path):
  workdir = _copy(ref, tmp_path)
  rows = run_experiment(tiny_config(rounds=ROUNDS + 1), workdir, progress=False)
  assert rows[:ROUNDS] == ref[1] and rows[-1]["round"] == ROUNDS + 1
  assert not [n for n in os.listdir(workdir) if ".bak" in n]
  with pytest.raises(ValueError, match=r"config.rounds=3 .* 9 completed rounds"):
    run_experiment(tiny_config(rounds=3), workdir, progress=False)


@pytest.mark.parametrize("config_json", ["deleted", "garbage"])
def test_changed_config_is_refused_without_config_json(ref, tmp_path, config_json):
  workdir = _copy(ref, tmp_path)
  cpath = os.path.join(workdir, "config.json")
  if config_json == "deleted":
    os.remove(cpath)
    with pytest.raises(ValueError, match=r"checkpoint of round 8 differs in \['client_lr'\]"):
      run_experiment(tiny_config(client_lr=0.5), workdir, progress=False)
    with pytest.raises(ValueError, match=r"dataset.num_clients"):
      run_experiment(tiny_config(dataset=dict(tiny_config().dataset, num_clients=7)), workdir,
                     progress=False)
    assert not os.path.exists(cpath)
  else:
    with open(cpath, "w") as f:
      f.write("{not json")
    with pytest.raises(ConfigError, match="config.json is not a readable JSON config"):
      run_experiment(tiny_config(), workdir, progress=False)
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == open(
      os.path.join(ref[0], "metrics.jsonl")).read()


def test_config_diff_names_nested_fields():
  old = {"rounds": 1, "a": 1, "d": {"x": 1, "y": [1, 2]}}
  assert config_diff(old, dict(old, rounds=5)) == []
  assert config_diff(old, {"rounds": 1, "a": 2, "d": {"x": 1, "y": [1, 3]}, "z": 0}) == [
      "a", "d.y", "z"]


_BAD_FIELDS = [
    ("eval_every", 0, "config.eval_every"), ("checkpoint_every", 0, "config.checkpoint_every"),
    ("rounds", -1, "config.rounds"), ("seed", -1, "config.seed"),
    ("cohort_size", 0, "config.cohort_size"), ("local_steps", 1.5, "config.local_steps"),
    ("batch_size", True, "config.batch_size"), ("client_lr", float("nan"), "config.client_lr"),
    ("server_lr", 0.0, "config.server_lr"), ("server_opt", "rmsprop", "config.server_opt"),
    ("compressor", "zip9000", "config.compressor"),
    ("compressor", "per_bit_accuracy", "config.compressor"),
    ("compressor_kwargs", {"kk": 1}, "config.compressor_kwargs"),
    ("compressor_kwargs", {"k": -2}, "config.compressor_kwargs"),
    ("downlink", "subspace_loss", "config.downlink"),
    ("weighting", "by_size", "config.weighting"), ("shard", "yes", "config.shard"),
    ("clients_per_chunk", 0, "config.clients_per_chunk"),
    ("clients_per_chunk", "most", "config.clients_per_chunk"),
    ("eval_evry", 1, "config.eval_evry"),
    ("model", {"name": "transformer", "kwargs": {}}, "config.model"),
    ("model", {"name": "mlp", "kwargs": {"hiden": 3}}, "config.model"),
    ("dataset", {"name": "synthetic", "alpha": 0.5, "betta": 0.5}, "config.dataset.betta"),
    ("dataset", {"name": "synthetic", "alpha": 0.5}, "config.dataset.beta"),
    ("dataset", {"name": "synthetic", "alpha": 0.5, "beta": 0.5, "seed": -1},
     "config.dataset.seed"),
    ("dataset", {"name": "digits", "num_clients": 0}, "config.dataset.num_clients"),
]


@pytest.mark.parametrize("field,value,match", _BAD_FIELDS)
def test_bad_config_fields_are_named_before_anything_is_written(tmp_path, field, value, match):
  cfg = tiny_config().to_dict()  # a plain dict: ConfigDict would refuse some types itself
  cfg[field] = value
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    run_experiment(cfg, str(tmp_path / "run"), progress=False)
  assert not os.path.exists(tmp_path / "run")


def test_missing_field_and_cohort_above_clients(tmp_path):
  cfg = tiny_config().to_dict()
  del cfg["eval_every"]
  with pytest.raises(ValueError, match=r"config\.eval_every is missing"):
    validate_config(cfg)
  cfg = validate_config(tiny_config(clients_per_chunk="all"))  # valid values pass
  assert cfg.clients_per_chunk == "all" and validate_config(tiny_config()).clients_per_chunk is None
  with pytest.raises(ValueError, match=r"config\.cohort_size=7 exceeds the 6 clients"):
    run_experiment(tiny_config(cohort_size=7), str(tmp_path / "run"), progress=False)
  assert os.listdir(tmp_path / "run") == [".lock"]  # no config.json, metrics or checkpoint


def test_clients_per_chunk_reaches_the_round(monkeypatch, real_build):
  seen = []
  real = runner.federated.build_round

  def spy(*a, **k):
    seen.append(k.get("clients_per_chunk"))
    return real(*a, **k)
  monkeypatch.setattr(runner.federated, "build_round", spy)
  real_build(tiny_config(clients_per_chunk=2))
  assert seen == [2]


def test_round_memory_is_checked_once_before_round_one_and_a_misfit_stops_it(
    tmp_path, monkeypatch, caplog):
  """The round is compiled once, for the memory check, and that program is the one the
  rounds run; a device too small for it stops the run (one CLI line) before anything is
  written."""
  cfg = tiny_config(rounds=2, cohort_size=3, local_steps=2)  # not in the build cache yet
  seen = []
  real_check = runner.federated.check_memory

  def spy(fn, *args, **kw):
    seen.append((args, kw, real_check(fn, *args, **kw)))
    return seen[-1][2]
  monkeypatch.setattr(runner.federated, "check_memory", spy)
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    rows = run_experiment(cfg, str(tmp_path / "ok"), progress=False)
  compiles = [r for r in caplog.records
              if "Finished XLA compilation of jit(round_fn)" in r.getMessage()]
  assert len(rows) == 2 and len(seen) == 1 and len(compiles) == 1, compiles
  (state, cohort, _), kw, est = seen[0]
  assert kw["donate_argnums"] == runner.ROUND_DONATE
  pad = runner.build_experiment(cfg).pad_to  # (cached) clients padded to the device count
  assert cohort.batches["x"].shape == (-(-3 // pad) * pad, 2, 4, 4)  # clients, steps, batch
  assert int((np.asarray(cohort.weight) > 0).sum()) == 3
  live = sum(x.addressable_shards[0].data.nbytes  # per device, as XLA's figures are
             for x in jax.tree.leaves((state, cohort)))
  assert est.argument_bytes >= live and est.need_bytes >= live + est.temp_bytes
  fits = -(-est.need_bytes * 10 // 9)  # 90% of it is exactly the need
  monkeypatch.setattr(runner.federated._memory, "device_memory_limit", lambda *a: fits)
  runner.check_round_memory(validate_config(cfg), runner.build_experiment(cfg))
  monkeypatch.setattr(runner.federated._memory, "device_memory_limit", lambda *a: fits - 2)
  work = tmp_path / "small"
  with pytest.raises(RoundMemoryError, match=r"one round of this config \(model 'logistic', "
                     r"cohort_size=3.* but the device has .*smaller clients_per_chunk"):
    run_experiment(cfg, str(work), progress=False)
  assert os.listdir(work) == [".lock"]  # no config.json, metrics or checkpoint
  with pytest.raises(SystemExit) as e:
    cli.execute(cfg, str(work))
  assert e.value.code.startswith("error: one round") and "\n" not in e.value.code
  assert issubclass(RoundMemoryError, ConfigError) and issubclass(
      RoundMemoryError, runner.federated.InsufficientMemoryError)


def test_available_lists_only_compressor_factories():
  names = available()
  assert {"top_k", "qsgd", "lbgm", "intrinsic_static_downlink"} <= set(names)
  for helper in ("per_bit_accuracy", "subspace_loss", "subspace_reparam",
                 "intrinsic_downlink_bits"):
    assert helper not in names
  with pytest.raises(ValueError, match="unknown compressor 'per_bit_accuracy'"):
    make_compressor("per_bit_accuracy")


def test_tfds_name_on_the_quickstart_config_drops_synthetic_fields(monkeypatch, capfd):
  """`--config.dataset.name=emnist` on the quickstart config used to pass `beta` to
  load_tfds; now the synthetic-only fields are dropped with a note."""
  calls = []
  real = fdata.load_tfds

  @functools.wraps(real)
  def fake(name, **kw):
    calls.append((name, kw))
    return "data"
  monkeypatch.setattr(fdata, "load_tfds", fake)
  cfg = quickstart.get_config()
  cfg.dataset.name = "emnist"
  assert runner.make_dataset(cfg.dataset) == "data"
  assert calls == [("emnist", {"alpha": 0.5, "num_clients": 30, "seed": 0})]
  assert "ignores config.dataset fields ['beta', 'dim', 'num_classes', " in capfd.readouterr().err
  cfg.dataset.shards = 3
  with pytest.raises(ValueError, match=r"config\.dataset\.shards is not a field of dataset "
                                       r"'emnist'"):
    runner.make_dataset(cfg.dataset)


def test_a_new_dataset_is_one_table_entry(monkeypatch):
  def tiny(num_clients: int = 3, seed: int = 0):
    return fdata.synthetic(0.5, 0.5, num_clients, dim=4, num_classes=3,
                           samples_per_client=8, seed=seed)
  monkeypatch.setitem(runner.DATASETS, "tiny", tiny)
  data = runner.make_dataset({"name": "tiny", "num_clients": 4})
  assert data.num_clients == 4
  cfg = tiny_config(dataset={"name": "tiny", "num_clients": 4, "alpha": 0.5})  # alpha: other's
  assert validate_config(cfg).dataset.name == "tiny"
  with pytest.raises(ValueError, match=r"config\.dataset\.colour"):
    validate_config(tiny_config(dataset={"name": "tiny", "colour": 1}))


def test_lock_refuses_a_second_writer_in_process(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirBusy, match=f"in use by process {os.getpid()}"):
      run_experiment(tiny_config(), str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_bad_dataset_value_is_named_and_nothing_is_written(tmp_path):
  cfg = tiny_config(dataset=dict(tiny_config().dataset, alpha=-1.0))
  with pytest.raises(ConfigError, match=r"config\.dataset \(dataset 'synthetic'\): alpha"):
    run_experiment(cfg, str(tmp_path / "run"), progress=False)
  assert os.listdir(tmp_path / "run") == [".lock"]


def test_unscaled_sign_sgd_with_error_feedback_warns():
  with pytest.warns(UserWarning, match="unscaled signs"):
    validate_config(tiny_config(compressor="sign_sgd", compressor_kwargs={}))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    validate_config(tiny_config(compressor="sign_sgd", compressor_kwargs={"scaled": True}))


def test_sigterm_checkpoints_the_last_completed_round(ref, tmp_path):
  workdir = str(tmp_path / "run")
  before = signal.getsignal(signal.SIGTERM)

  def term(r, row):
    if r == 4:
      os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(Terminated):
    run_experiment(tiny_config(), workdir, progress=False, callback=term)
  assert signal.getsignal(signal.SIGTERM) is before  # the handler is only ours during a run
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["step_3.ckpt", "step_4.ckpt"]
  assert runner.fcheckpoint.read_metadata(_ckpt(workdir, 4))["rows"] == ref[1][:4]
  assert len(_lines(os.path.join(workdir, "metrics.jsonl"))) == 4
  _assert_like_ref(workdir, run_experiment(tiny_config(), workdir, progress=False), ref)


class _Killed(BaseException):
  """Stands in for kill -9: nothing in the runner catches it (no final checkpoint)."""


def _finished_pid():
  """The pid of a process that has exited."""
  p = subprocess.Popen(["true"])
  p.wait()
  return p.pid


def test_crash_at_random_points_then_resume_is_identical(ref, tmp_path, monkeypatch):
  """In-process stand-in for kill -9 (the slow test below does it for real): a crash at a
  random row write (torn or whole) or checkpoint save (half-written temporary of a dead
  process, or after the file but before pruning), a stale lock file, then a rerun."""
  workdir = str(tmp_path / "run")
  rng = random.Random(0)
  plan = {}
  real_write, real_save = MetricsWriter.write, fckpt_impl.save

  def write(self, row):
    plan["rows"] = plan.get("rows", 0) + 1
    if plan.get("at") == ("row", plan["rows"]):
      if plan["how"] == "torn":
        with open(self.path, "a") as f:
          f.write(json.dumps(row)[:17])
      else:
        real_write(self, row)
      raise _Killed(plan)
    real_write(self, row)

  def save(path, tree, **kw):
    plan["saves"] = plan.get("saves", 0) + 1
    if plan.get("at") == ("save", plan["saves"]):
      if plan["how"] == "torn":
        tmp = os.path.join(os.path.dirname(path),
                           f".{os.path.basename(path)}.tmp.{_finished_pid()}.0badc0de")
        with open(tmp, "wb") as f:
          f.write(fckpt_impl.MAGIC + b"\x00" * 20)
      else:
        real_save(path, tree, **kw)
      raise _Killed(plan)
    real_save(path, tree, **kw)
  monkeypatch.setattr(MetricsWriter, "write", write)
  monkeypatch.setattr(fckpt_impl, "save", save)
  crashes = []
  for _ in range(4):
    plan.clear()
    plan.update(at=rng.choice([("row", rng.randint(1, 3)), ("save", rng.randint(1, 2))]),
                how=rng.choice(["torn", "whole"]))
    try:
      run_experiment(tiny_config(), workdir, progress=False)
    except _Killed:
      crashes.append((plan["at"], plan["how"],
                      len(_lines(os.path.join(workdir, "metrics.jsonl")))))
    with open(os.path.join(workdir, ".lock"), "w") as f:
      f.write(f"{_finished_pid()} elsewhere\n")  # a dead writer's lock never blocks
  assert len(crashes) >= 3 and {c[1] for c in crashes} == {"torn", "whole"}, crashes
  assert {c[0][0] for c in crashes} == {"row", "save"}, crashes
  plan.clear()
  _assert_like_ref(workdir, run_experiment(tiny_config(), workdir, progress=False), ref)
  assert not [n for n in os.listdir(workdir) if ".bak" in n or ".tmp" in n]
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["step_6.ckpt", "step_8.ckpt"]


def _quickstart(**over):
  """The quickstart config with `--config.x=...` style overrides (dotted names as `x__y`)."""
  c = quickstart.get_config()
  for k, v in over.items():
    *parents, leaf = k.split("__")
    setattr(functools.reduce(getattr, parents, c), leaf, v)
  return c


def test_cli_runs_digits_and_reports_errors_in_one_line(ref, tmp_path, capsys):
  pytest.importorskip("sklearn")
  work = str(tmp_path / "digits")
  digits = dict(tiny_config().dataset, name="digits", num_clients=6)  # + synthetic's fields
  rows = cli.execute(tiny_config(dataset=digits, rounds=2), work)
  out = capsys.readouterr()
  assert f"done: 2 rounds, accuracy={rows[-1]['accuracy']}" in out.out
  assert "ignores config.dataset fields ['beta'," in out.err
  assert [r["round"] for r in rows] == [1, 2] and 0 <= rows[-1]["accuracy"] <= 1
  assert json.load(open(os.path.join(work, "config.json")))["dataset"]["name"] == "digits"
  ref_copy = _copy(ref, tmp_path)
  with open(os.path.join(ref_copy, "config.json"), "w") as f:
    f.write("[1, 2")
  cases = [(_quickstart(eval_every=0), str(tmp_path / "a"), "config.eval_every must be"),
           (_quickstart(cohort_size=31), str(tmp_path / "b"), "cohort_size=31 exceeds the 30"),
           (tiny_config(dataset=digits, rounds=3, client_lr=0.5), work,
            "differs in ['client_lr']"),
           (tiny_config(), ref_copy, "config.json is not a readable JSON config")]
  for cfg, workdir, msg in cases:
    with pytest.raises(SystemExit) as e:
      cli.execute(cfg, workdir)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    assert msg in e.value.code and "\n" not in e.value.code
  with WorkdirLock(work):
    with pytest.raises(SystemExit, match=f"error: .* in use by process {os.getpid()}"):
      cli.execute(tiny_config(dataset=digits, rounds=2), work)
  assert [json.loads(line) for line in _lines(os.path.join(work, "metrics.jsonl"))] == rows


@pytest.mark.slow
def test_cli_digits_by_flag(tmp_path):
  """`python -m experiments.run --config.dataset.name=digits` (the real flag parsing)."""
  pytest.importorskip("sklearn")
  argv = [sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py",
          f"--workdir={tmp_path}", "--config.dataset.name=digits"]
  p = subprocess.run(argv + ["--config.rounds=2"], cwd=_ROOT, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and "done: 2 rounds" in p.stdout, p.stderr[-2000:]
  bad = subprocess.run(argv + ["--config.client_lr=9"], cwd=_ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1, bad.stderr[-2000:]
  assert bad.stderr.strip().splitlines()[-1].startswith("error: "), bad.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# Processes (slow): the lock between processes, SIGTERM, kill -9 at random points.

def _env():
  return dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
              JAX_PLATFORMS="cpu")


def _worker(workdir, delay, hold_at=0):
  return subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "worker", workdir, str(delay), str(hold_at)],
      cwd=_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_rows(path, n, proc, timeout=120.0):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if os.path.exists(path) and len(_lines(path)) >= n:
      return
    if proc.poll() is not None:
      return
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"no {n} rows in {path} after {timeout} s")


@pytest.mark.slow
def test_second_process_refused_then_sigterm_checkpoints_last_round(ref, tmp_path):
  workdir = str(tmp_path / "run")
  mpath = os.path.join(workdir, "metrics.jsonl")
  p1 = _worker(workdir, delay=0.0, hold_at=4)  # waits after round 4 until signalled
  try:
    _wait_rows(mpath, 4, p1)
    assert p1.poll() is None, p1.communicate()[1][-2000:]
    p2 = subprocess.run(  # the CLI on the same workdir
        [sys.executable, "-m", "experiments.run", "--config=experiments/configs/quickstart.py",
         f"--workdir={workdir}"], cwd=_ROOT, env=_env(), capture_output=True, text=True,
        timeout=120)
    assert p2.returncode != 0 and f"in use by process {p1.pid}" in p2.stderr, p2.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["step_3.ckpt"]
    p1.send_signal(signal.SIGTERM)
    _, err = p1.communicate(timeout=60)
  finally:
    p1.kill()
  assert p1.returncode == 143, err[-2000:]
  assert "terminated after round 4; checkpoint of round 4 saved" in err
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["step_3.ckpt", "step_4.ckpt"]
  assert runner.fcheckpoint.read_metadata(_ckpt(workdir, 4))["rows"] == ref[1][:4]
  assert len(_lines(mpath)) == 4
  rows = run_experiment(tiny_config(), workdir, progress=False)
  _assert_like_ref(workdir, rows, ref)


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_identical(ref, tmp_path):
  workdir = str(tmp_path / "run")
  mpath = os.path.join(workdir, "metrics.jsonl")
  rng = random.Random(0)
  killed_at = []
  for _ in range(2):
    have = len(_lines(mpath)) if os.path.exists(mpath) else 0
    p = _worker(workdir, delay=0.02)
    try:
      _wait_rows(mpath, have + 1, p)
      time.sleep(rng.uniform(0.0, 0.12))
      p.send_signal(signal.SIGKILL)
      p.communicate(timeout=60)
    finally:
      p.kill()
    killed_at.append(len(_lines(mpath)))
    lock = open(os.path.join(workdir, ".lock")).read().split()
    assert lock[0] == str(p.pid)  # the dead process's lock file is left behind ...
  rows = run_experiment(tiny_config(), workdir, progress=False)  # ... and does not block
  _assert_like_ref(workdir, rows, ref)
  assert not [n for n in os.listdir(workdir) if ".bak" in n or ".tmp" in n]
  assert not [n for n in os.listdir(os.path.join(workdir, "ckpt")) if not n.endswith(".ckpt")]
  assert killed_at[0] >= 1


def _worker_main(workdir, delay, hold_at):
  """Run the tiny config in `workdir`, sleeping `delay` s after each round and forever after
  round `hold_at` (until a signal); exits 143 on SIGTERM like the CLI."""
  from experiments.common import Terminated  # pylint: disable=import-outside-toplevel

  def callback(r, row):
    time.sleep(delay)
    while r == hold_at:
      time.sleep(0.05)
  try:
    run_experiment(tiny_config(), workdir, progress=False, callback=callback)
  except Terminated:
    sys.exit(143)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
  _worker_main(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
