"""Library checkpoints (`fedjax_compress.checkpoint`): exact round trips of a `ServerState`,
integrity checks against every corruption, fallback, keep-last-N, atomicity, shardings."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_compress import checkpoint, compressors, error_feedback, federated

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _server_state():
  """A ServerState with every part populated: Adam state, EF + PowerSGD per-client states
  (zero-size placeholders for the 1-D leaf), a downlink with its broadcast and states."""
  params = {"w": jnp.arange(12.0).reshape(4, 3) / 7, "b": jnp.array([0.5, -1.0, 2.0])}
  uplink = error_feedback(compressors.power_sgd(rank=1))
  downlink = error_feedback(compressors.top_k(k=2))
  state = federated.init_server_state(params, optax.adam(0.1), uplink, num_clients=5,
                                      downlink=downlink)
  rng = np.random.default_rng(0)  # distinct values everywhere, so a swapped leaf would show
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))
                      if jnp.issubdtype(x.dtype, jnp.floating) else x + 3, state)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype and np.shape(x) == np.shape(y)
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_server_state_round_trip_is_bit_exact(tmp_path):
  state = _server_state()
  assert state.broadcast is not None and state.down_sender is not None
  assert any(x.size == 0 for x in jax.tree.leaves(state.senders))  # PowerSGD placeholder
  path = str(tmp_path / "s.ckpt")
  checkpoint.save(path, state, step=7, metadata={"loss": math.nan, "rows": [{"round": 1}]})
  zeros = jax.tree.map(jnp.zeros_like, state)
  got, meta = checkpoint.load(path, zeros)
  _assert_same(got, state)
  assert isinstance(got, federated.ServerState)
  assert math.isnan(meta["loss"]) and meta["rows"] == [{"round": 1}]
  assert checkpoint.read_metadata(path)["rows"] == [{"round": 1}]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  _assert_same(checkpoint.restore(path, abstract), state)


def test_other_leaf_kinds_round_trip(tmp_path):
  tree = {"bf16": jnp.array([1.5, -2.25], jnp.bfloat16), "empty": jnp.zeros((0, 3)),
          "np": np.arange(6, dtype=np.uint8).reshape(2, 3)[:, ::2],  # non-contiguous
          "scalar": np.float32(2.5), "u64": np.array([2**63 + 5], np.uint64), "py": 3}
  path = str(tmp_path / "t.ckpt")
  checkpoint.save(path, tree)
  like = jax.tree.map(lambda x: np.zeros_like(x) if isinstance(x, np.ndarray) else x, tree)
  got = checkpoint.restore(path, like)
  _assert_same(got, tree)
  assert isinstance(got["np"], np.ndarray) and isinstance(got["bf16"], jax.Array)
  assert got["py"] == 3 and type(got["py"]) is int


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ck") / "s.ckpt")
  state = _server_state()
  checkpoint.save(path, state, step=3, metadata={"config": {"seed": 0}})
  with open(path, "rb") as f:
    return path, f.read(), state


def test_every_corruption_is_detected(saved, tmp_path):
  """Flipped bytes anywhere (magic, header, data, digest), truncation at any length and
  appended bytes all raise CheckpointError; nothing restores a different state."""
  _, blob, state = saved
  rng = np.random.default_rng(1)
  path = str(tmp_path / "bad.ckpt")
  positions = sorted(set([0, 9, 20, len(blob) // 2, len(blob) - 33, len(blob) - 1]
                         + rng.integers(0, len(blob), 30).tolist()))
  cases = [blob[:i] + bytes([blob[i] ^ (1 << int(rng.integers(8)))]) + blob[i + 1:]
           for i in positions]
  cases += [blob[:n] for n in (0, 5, 16, 100, len(blob) // 3, len(blob) - 32, len(blob) - 1)]
  cases += [blob + b"\0", blob + blob[-32:]]
  for bad in cases:
    with open(path, "wb") as f:
      f.write(bad)
    with pytest.raises(checkpoint.CheckpointError):
      checkpoint.load(path, state)
  with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
    checkpoint.load(str(tmp_path / "missing.ckpt"), state)


def test_template_mismatch_names_the_leaf(saved):
  path, _, state = saved
  other = state.replace(params={"w": state.params["w"], "b": jnp.zeros(4)})
  with pytest.raises(ValueError, match=r"\['b'\]"):
    checkpoint.restore(path, other)
  with pytest.raises(ValueError, match="leaves"):
    checkpoint.restore(path, state.params)


def test_manager_keep_last_n_and_fallback(tmp_path):
  m = checkpoint.CheckpointManager(str(tmp_path), keep=3)
  like = {"w": jnp.zeros(2)}
  for s in range(1, 6):
    m.save(s, {"w": jnp.full(2, float(s))}, metadata={"s": s})
  assert m.steps() == [3, 4, 5] and m.latest_step() == 5
  m.save(2, {"w": jnp.full(2, 2.0)})  # redoing an older step never deletes newer ones
  assert m.steps() == [2, 3, 4, 5]
  with open(m.path(5), "r+b") as f:  # one flipped bit in the newest's data
    at = os.path.getsize(m.path(5)) - 33
    f.seek(at)
    b = f.read(1)
    f.seek(at)
    f.write(bytes([b[0] ^ 4]))
  with open(m.path(4), "r+b") as f:  # the next one truncated
    f.truncate(os.path.getsize(m.path(4)) - 1)
  got = m.restore_latest(like)
  assert got.step == 3 and got.tree["w"].tolist() == [3.0, 3.0] and got.metadata == {"s": 3}
  assert [s for s, _ in got.skipped] == [5, 4]
  assert "SHA-256" in got.skipped[0][1] and "truncated" in got.skipped[1][1]
  assert m.steps() == [2, 3, 4, 5]  # reported, not removed
  got = m.restore_latest(like, quarantine=True)
  assert got.step == 3 and m.steps() == [2, 3]
  assert sorted(os.listdir(tmp_path))[-2:] == ["step_4.ckpt.corrupt", "step_5.ckpt.corrupt"]
  for s in (2, 3):
    os.truncate(m.path(s), 10)
  none = m.restore_latest(like)
  assert none.step is None and none.tree is None and [s for s, _ in none.skipped] == [3, 2]
  assert checkpoint.CheckpointManager(str(tmp_path / "empty")).restore_latest(like) is None


class _Unconvertible:
  """A leaf that fails half-way through a save (after earlier leaves were written)."""

  shape, dtype = (2,), np.dtype(np.float32)

  def __array__(self, *a, **k):
    raise RuntimeError("device lost")


def test_failed_save_leaves_the_old_file_and_no_temporaries(tmp_path):
  m = checkpoint.CheckpointManager(str(tmp_path), keep=2)
  m.save(1, {"a": jnp.ones(3), "b": jnp.ones(2)})
  before = open(m.path(1), "rb").read()
  with pytest.raises(RuntimeError, match="device lost"):
    m.save(1, {"a": jnp.zeros(3), "b": _Unconvertible()})
  assert open(m.path(1), "rb").read() == before and os.listdir(tmp_path) == ["step_1.ckpt"]
  # A temporary file of a dead process is swept by the next manager; a live one's is kept.
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  dead = tmp_path / f".step_2.ckpt.tmp.{proc.pid}.0a1b"
  live = tmp_path / f".step_3.ckpt.tmp.{os.getpid()}.0a1b"
  dead.write_bytes(b"x")
  live.write_bytes(b"x")
  checkpoint.CheckpointManager(str(tmp_path))
  assert not dead.exists() and live.exists()


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(ValueError, match="keep"):
    checkpoint.CheckpointManager(str(tmp_path), keep=0)
  with pytest.raises(ValueError, match="step"):
    checkpoint.save(str(tmp_path / "x"), {"a": jnp.ones(1)}, step=-1)
  with pytest.raises(ValueError, match="metadata"):
    checkpoint.save(str(tmp_path / "x"), {"a": jnp.ones(1)}, metadata={"f": object()})
  with pytest.raises(ValueError, match=r"\['k'\].*PRNG key"):
    checkpoint.save(str(tmp_path / "x"), {"k": jax.random.key(0)})
  assert not os.path.exists(tmp_path / "x")


def test_restore_into_template_shardings(saved):
  path, _, state = saved
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("clients",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)
  got = checkpoint.restore(path, like)
  _assert_same(got, state)
  assert all(x.sharding == sh for x in jax.tree.leaves(got))


_TWO_DEVICES = r"""
import jax, jax.numpy as jnp, numpy as np, optax, sys
from fedjax_compress import checkpoint, compressors, error_feedback, federated
state = federated.init_server_state({"w": jnp.ones((3, 2))}, optax.sgd(1.0),
                                    error_feedback(compressors.top_k(k=1)), num_clients=4)
state = state.replace(senders=jax.tree.map(lambda x: x + jnp.arange(4.0).reshape(
    (4,) + (1,) * (x.ndim - 1)), state.senders))
mesh = federated.client_mesh(2)
sharded = federated.shard_state(state, mesh)
checkpoint.save(sys.argv[1], sharded)
got = checkpoint.restore(sys.argv[1], sharded)          # into the sharded template
plain = checkpoint.restore(sys.argv[1], state)          # or onto one device
for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(sharded), jax.tree.leaves(plain)):
  assert a.sharding == b.sharding, (a.sharding, b.sharding)
  assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(c), np.asarray(b))
assert len(jax.tree.leaves(got.senders)[0].sharding.device_set) == 2
print("ok")
"""


def test_sharded_state_restores_with_its_shardings(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-c", _TWO_DEVICES, str(tmp_path / "s.ckpt")],
                       env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
