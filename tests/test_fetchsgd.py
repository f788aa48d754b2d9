"""FetchSGD (Rothchild et al. 2020) against a float64 NumPy reference of its server loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_compress import Keys, bits, compressors as C
from fedjax_compress.compressors import _fetchsgd as F

ROWS, COLS, SIZE, K, SEED = 3, 16, 120, 6, 5
KEYS = Keys(jax.random.key(0), jax.random.key(1))


def _hashes():
  b, s = F.sketch_hashes(SEED, ROWS, COLS, SIZE)
  return np.asarray(b), np.asarray(s, np.float64)


def _np_sketch(v, b, s):
  out = np.zeros((ROWS, COLS))
  for r in range(ROWS):
    np.add.at(out[r], b[r], s[r] * v)
  return out


def _np_unsketch(t, b, s):
  return np.median(np.stack([s[r] * t[r, b[r]] for r in range(ROWS)]), axis=0)


def _np_server(u, e, table, b, s, rho, reset):
  u = rho * u + table
  e = e + u
  est = _np_unsketch(e, b, s)
  idx = np.sort(np.argsort(-np.abs(est), kind="stable")[:K])
  delta = np.zeros(SIZE)
  delta[idx] = est[idx]
  sd = _np_sketch(delta, b, s)
  hit = sd != 0
  e = np.where(hit, 0.0, e) if reset == "zero" else e - sd
  return delta, np.where(hit, 0.0, u), e


def _grads(t, n):
  return [np.asarray(jax.random.normal(jax.random.key(100 * t + c), (SIZE,)), np.float64)
          for c in range(n)]


def test_sketch_matches_numpy():
  b, s = _hashes()
  v = _grads(0, 1)[0]
  got = jax.jit(F.sketch, static_argnums=3)(jnp.asarray(v, jnp.float32), jnp.asarray(b), jnp.asarray(s, jnp.float32), COLS)
  np.testing.assert_allclose(np.asarray(got), _np_sketch(v, b, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reset", ["zero", "subtract"])
def test_rounds_match_numpy_reference(reset):
  """Clients sketch, `reduce` sums, `decode` carries (momentum, error) across 4 rounds."""
  c = C.fetchsgd(ROWS, COLS, K, momentum=0.9, seed=SEED, error_reset=reset)
  like = {"w": jnp.zeros((SIZE,))}
  _, server = c.init(like)
  b, s = _hashes()
  u = np.zeros((ROWS, COLS))
  e = np.zeros((ROWS, COLS))
  w = jnp.asarray([0.5, 0.3, 0.2])
  reduce, encode = jax.jit(c.reduce), jax.jit(c.encode)
  decode = jax.jit(c.decode)
  for t in range(4):
    gs = _grads(t, 3)
    ps = [encode({"w": jnp.asarray(g, jnp.float32)}, None, KEYS)[0] for g in gs]
    assert int(bits.count(ps[0])) == 32 * ROWS * COLS
    table = reduce(jax.tree.map(lambda *x: jnp.stack(x), *ps), w)
    delta, server = decode(table, server, KEYS, like)
    ref, u, e = _np_server(u, e, sum(float(wi) * _np_sketch(g, b, s) for wi, g in zip(w, gs)),
                           b, s, 0.9, reset)
    np.testing.assert_allclose(np.asarray(delta["w"]), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(server.momentum), u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(server.error), e, rtol=1e-4, atol=1e-4)
    assert int(np.sum(np.asarray(delta["w"]) != 0)) <= K


def test_subtract_reset_telescopes_in_sketch_space():
  """'subtract': e_T == sum_t u'_t - sum_t A D_t (u'_t: momentum before masking)."""
  b, s = _hashes()
  bj, sj = jnp.asarray(b), jnp.asarray(s, jnp.float32)
  z = jnp.zeros((ROWS, COLS))
  state = F.FetchSGDState(z, z)
  step = jax.jit(lambda st, tb: F.fetchsgd_server_step(st, tb, bj, sj, k=K, momentum=0.5,
                                                       error_reset="subtract"))
  added = np.zeros((ROWS, COLS))
  sent = np.zeros((ROWS, COLS))
  for t in range(5):
    table = _np_sketch(_grads(t, 1)[0], b, s)
    added += 0.5 * np.asarray(state.momentum, np.float64) + table
    delta, state = step(state, jnp.asarray(table, jnp.float32))
    sent += _np_sketch(np.asarray(delta, np.float64), b, s)
  np.testing.assert_allclose(np.asarray(state.error), added - sent, rtol=1e-4, atol=1e-4)


def test_heavy_hitters_recovered_exactly_without_memory():
  """A k-sparse update through a wide sketch: the first (memoryless) step returns it."""
  c = C.fetchsgd(5, 64, 3, momentum=0.0, seed=1)
  g = np.zeros(SIZE)
  g[[4, 50, 99]] = [3.0, -2.0, 5.0]
  like = {"w": jnp.zeros((SIZE,))}
  _, server = c.init(like)
  p, _ = jax.jit(c.encode)({"w": jnp.asarray(g, jnp.float32)}, None, KEYS)
  out, _ = jax.jit(c.decode)(p, server, KEYS, like)
  np.testing.assert_allclose(np.asarray(out["w"]), g, atol=1e-6)


def test_byte_conventions_vs_honest_bits():
  conv = F.fetchsgd_convention_bytes(5, 1000, changed=300)
  assert conv == {"upload_bytes": 20_000, "download_bytes": 1200}
  # the honest download of 300 of 10^6 weights also sends 20-bit indices and a count
  assert F.sparse_download_bits(300, 10**6) == 300 * (32 + 20) + 20
  old = {"a": jnp.zeros(5), "b": jnp.ones(3)}
  new = {"a": jnp.zeros(5).at[1].set(2.0), "b": jnp.asarray([1.0, 0.0, 0.0])}
  assert int(F.changed_weights(old, new)) == 3


def test_bad_arguments_raise():
  for kw, name in [({"momentum": 1.0}, "momentum"), ({"error_reset": "keep"}, "error_reset"),
                   ({"seed": 1.5}, "seed")]:
    with pytest.raises(ValueError, match=name):
      C.fetchsgd(2, 8, 3, **kw)
  with pytest.raises(ValueError, match="k"):
    C.fetchsgd(2, 8, 0)


@pytest.mark.parametrize("chunk", [1, "all"])
def test_build_round_runs_full_fetchsgd(chunk):
  """In `build_round` the server's sketch momentum and error persist (`ServerState.aggregator`):
  3 rounds of clients whose delta is a known vector equal the NumPy server loop."""
  import optax
  from fedjax_compress import federated
  c = C.fetchsgd(ROWS, COLS, K, momentum=0.9, seed=SEED)
  loss = lambda p, batch, m, k: jnp.sum(p["w"] * batch["g"][0])  # one SGD step (lr 1): delta = g
  params = {"w": jnp.zeros((SIZE,))}
  rnd = jax.jit(federated.build_round(loss, optax.sgd(1.0), optax.sgd(1.0), c, local_steps=1,
                                      clients_per_chunk=chunk))
  st = federated.init_server_state(params, optax.sgd(1.0), c, num_clients=3)
  b, s = _hashes()
  u, e, x = np.zeros((ROWS, COLS)), np.zeros((ROWS, COLS)), np.zeros(SIZE)
  w = np.asarray([2.0, 1.0, 1.0])
  for t in range(3):
    gs = _grads(t, 3)
    cohort = federated.Cohort(ids=jnp.arange(3), weight=jnp.asarray(w, jnp.float32),
                              batches={"g": jnp.asarray(np.stack(gs), jnp.float32)[:, None, None]},
                              mask=jnp.ones((3, 1, 1), bool))
    st, _ = rnd(st, cohort, jax.random.key(0))
    table = sum(wi / w.sum() * _np_sketch(g, b, s) for wi, g in zip(w, gs))
    delta, u, e = _np_server(u, e, table, b, s, 0.9, "zero")
    x = x - delta
    np.testing.assert_allclose(np.asarray(st.params["w"]), x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(st.aggregator.momentum), u, rtol=1e-4, atol=1e-4)
