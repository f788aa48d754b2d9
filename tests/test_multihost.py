"""Multi-host: the sharded round over two CPU processes (jax.distributed + gloo, 2 devices each)
equals the single-process round."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_sharding import make_cohorts, make_round

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_round_equals_single_process(tmp_path):
  out = str(tmp_path / "multihost.npz")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "_multihost_worker.py"),
                             str(port), str(pid), out], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for pid in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("multi-host workers timed out")
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = np.load(out)
  rnd, state = make_round()
  bits = []
  for r, cohort in enumerate(make_cohorts()):
    state, m = rnd(state, cohort, jax.random.key(r))
    bits.append(np.asarray(m.up_bits))
  np.testing.assert_allclose(got["w"], state.params["w"], atol=1e-6)
  np.testing.assert_allclose(got["b"], state.params["b"], atol=1e-6)
  np.testing.assert_allclose(got["residual"], state.senders.residual["w"], atol=1e-6)
  np.testing.assert_array_equal(got["bits"], np.stack(bits))
