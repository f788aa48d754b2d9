"""Bad inputs of the foundation: field widths, decode templates, cohort ids (bits: test_bits.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.common.runner import format_bits
from fedjax_compress import (Field, Keys, as_transformation, bits, compressors, error_feedback,
                             federated, flattened, wire)
from fedjax_compress._src import layout

KEYS = Keys(jax.random.key(0), jax.random.key(1))


def _sds(n, dtype=jnp.float32):
  return jax.ShapeDtypeStruct((n,), dtype)


# ------------------------------------------------------------------ widths


@pytest.mark.parametrize("width", [0, -3, 2.5, True, 65, "8", None])
def test_field_rejects_bad_width(width):
  with pytest.raises(ValueError, match="width"):
    Field(jnp.ones(3), width)


def test_field_width_normalized_and_checked_on_every_path():
  f = Field(jnp.ones(3, jnp.int32), np.int64(5))
  assert type(f.width) is int and f.width == 5
  assert int(bits.count(f)) == wire.total_bits(f) == 15 == 8 * len(wire.pack(f, raw=True)) - 1
  out = jax.jit(lambda g: g)(f)  # unflattening rebuilds a valid Field
  assert out.width == 5
  with pytest.raises(ValueError, match="width"):
    jax.eval_shape(lambda x: bits.count(Field(x, 0)), _sds(3))


# ------------------------------------------------------------------ decode templates


def _g(n=10):
  return {"w": jnp.linspace(-1.0, 1.0, n)}


CODECS = {
    "identity": compressors.identity,
    "top_k": lambda: compressors.top_k(3),
    "top_k_fraction": lambda: compressors.top_k(fraction=0.3),
    "random_k": lambda: compressors.random_k(3),
    "random_k_shared": lambda: compressors.random_k(3, shared_mask=True),
    "qsgd": lambda: compressors.qsgd(4, bucket_size=4),
    "count_sketch": lambda: compressors.count_sketch(2, 8),
    "hsq": lambda: compressors.hsq(error_feedback=False, chunk=4, codebook_size=4),
    "sign_sgd": compressors.sign_sgd,
    "power_sgd": lambda: compressors.power_sgd(1),
    "m22": compressors.m22,
    "ef_top_k": lambda: error_feedback(compressors.top_k(3)),
    "lbgm_top_k": lambda: compressors.lbgm(compressors.top_k(3), 0.3),
    "flattened_twice": lambda: flattened(compressors.top_k(3)),
}
BAD_LIKES = {
    "bigger": ({"w": jnp.zeros(12)}, r"\['w'\]: expected \(10,\), got \(12,\)"),
    "extra_leaf": ({"w": jnp.zeros(10), "b": jnp.zeros(2)}, "structure mismatch"),
    "other_key": ({"v": jnp.zeros(10)}, "structure mismatch"),
}


@pytest.mark.parametrize("bad", BAD_LIKES)
@pytest.mark.parametrize("name", CODECS)
def test_decode_rejects_template_of_other_shape(name, bad):
  c = CODECS[name]()
  s, r = c.init(_g())
  p, _ = c.encode(_g(), s, KEYS)
  assert jax.tree.map(jnp.shape, c.decode(p, r, KEYS, _g())[0]) == {"w": (10,)}
  like, match = BAD_LIKES[bad]
  with pytest.raises(ValueError, match=match):
    c.decode(p, r, KEYS, like)
  with pytest.raises(ValueError, match=match):
    jax.jit(lambda q: c.decode(q, r, KEYS, like))(p)


@pytest.mark.parametrize("name", ["identity", "top_k", "random_k", "qsgd", "count_sketch",
                                  "power_sgd", "m22"])
def test_vmapped_decode_and_aggregate_compare_per_client_shapes(name):
  c = CODECS[name]()
  n = 3
  g = {"w": jnp.stack([jnp.linspace(-1.0, 1.0, 10) * (i + 1) for i in range(n)])}
  s, _ = c.init(_g())
  keys = Keys(KEYS.shared, jax.random.split(KEYS.private, n))
  p, _ = jax.vmap(lambda u, k: c.encode(u, s, Keys(KEYS.shared, k)))(g, keys.private)
  dec = jax.vmap(lambda q, k: c.decode(q, None, Keys(KEYS.shared, k), _g())[0])
  assert dec(p, keys.private)["w"].shape == (n, 10)
  with pytest.raises(ValueError, match=r"expected \(10,\), got \(12,\)"):
    jax.vmap(lambda q, k: c.decode(q, None, Keys(KEYS.shared, k), {"w": jnp.zeros(12)}))(
        p, keys.private)
  if c.aggregate is not None:
    w = jnp.full((n,), 1.0 / n)
    assert c.aggregate(p, w, keys, _g())["w"].shape == (10,)
    with pytest.raises(ValueError, match=r"expected \(10,\), got \(12,\)"):
      c.aggregate(p, w, keys, {"w": jnp.zeros(12)})


def test_template_check_survives_wire_roundtrip():
  c = compressors.count_sketch(2, 8)
  p, _ = c.encode(_g(), None, KEYS)
  back = wire.unpack(wire.pack(p), jax.eval_shape(lambda: p))
  np.testing.assert_array_equal(c.decode(back, None, KEYS, _g())[0]["w"],
                                c.decode(p, None, KEYS, _g())[0]["w"])
  with pytest.raises(ValueError, match="expected"):
    c.decode(back, None, KEYS, {"w": jnp.zeros(12)})


def test_hand_built_payload_is_decoded_unchecked():
  # Payloads without a recorded source (e.g. built by hand) keep working.
  c = compressors.top_k(2)
  p = {"values": Field(jnp.array([1.0, 2.0]), 32),
       "indices": Field(jnp.array([0, 3], jnp.uint32), 4)}
  np.testing.assert_array_equal(c.decode(p, None, KEYS, _g())[0]["w"][:4], [1, 0, 0, 2])


def test_unraveler_rejects_vector_of_other_length():
  unravel = layout.unraveler({"a": jnp.zeros((2, 3)), "b": jnp.zeros(2)})
  assert unravel(jnp.arange(8.0))["a"].shape == (2, 3)
  with pytest.raises(ValueError, match=r"shape \(8,\).*got shape \(9,\)"):
    unravel(jnp.arange(9.0))


def test_error_feedback_rejects_updates_of_other_shape():
  c = error_feedback(compressors.top_k(3))
  s, _ = c.init(_g())
  with pytest.raises(ValueError, match=r"error_feedback.*\['w'\]: expected \(10,\), got \(12,\)"):
    c.encode({"w": jnp.zeros(12)}, s, KEYS)
  with pytest.raises(ValueError, match="error_feedback.*structure"):
    c.encode({"w": jnp.zeros(10), "b": jnp.zeros(1)}, s, KEYS)
  # Under vmap each client's update is compared with its own residual.
  n = 4
  states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), s)
  g = {"w": jnp.ones((n, 10))}
  p, s2 = jax.vmap(lambda u, st: c.encode(u, st, KEYS))(g, states)
  assert s2.residual["w"].shape == (n, 10)
  with pytest.raises(ValueError, match=r"expected \(10,\), got \(12,\)"):
    jax.vmap(lambda u, st: c.encode(u, st, KEYS))({"w": jnp.ones((n, 12))}, states)


# ------------------------------------------------------------------ cohort ids


def _loss(p, batch, mask, key):
  del key
  m = mask.astype(jnp.float32)
  return jnp.sum(m * (batch["x"] @ p["w"] - batch["y"]) ** 2) / jnp.maximum(jnp.sum(m), 1.0)


def _cohort(ids):
  c = len(ids)
  rng = np.random.default_rng(0)
  return federated.Cohort(ids=np.asarray(ids, np.int32),
                          batches={"x": rng.normal(size=(c, 1, 2, 3)).astype(np.float32),
                                   "y": rng.normal(size=(c, 1, 2)).astype(np.float32)},
                          mask=np.ones((c, 1, 2), bool), weight=np.ones(c, np.float32))


def _stateful_round():
  uplink = error_feedback(compressors.top_k(1))
  rnd = federated.build_round(_loss, optax.sgd(0.1), optax.sgd(1.0), uplink, local_steps=1)
  state = federated.init_server_state({"w": jnp.zeros(3)}, optax.sgd(1.0), uplink,
                                      num_clients=3)
  return rnd, state


@pytest.mark.parametrize("ids, bad", [([0, 3], r"\[3\]"), ([-1, 1], r"\[-1\]"),
                                      ([5, 3, 0], r"\[3, 5\]")])
def test_round_rejects_out_of_range_ids(ids, bad):
  rnd, state = _stateful_round()
  with pytest.raises(ValueError, match=bad + r" are outside \[0, 3\)"):
    rnd(state, _cohort(ids), jax.random.key(0))


def test_round_ids_checks_stateless_and_jit():
  rnd, state = _stateful_round()
  rnd(state, _cohort([0, 2]), jax.random.key(0))  # in range: fine
  # Stateless uplink: no state slots to index, but negative ids are still rejected.
  srnd = federated.build_round(_loss, optax.sgd(0.1), optax.sgd(1.0), compressors.identity(),
                               local_steps=1)
  sstate = federated.init_server_state({"w": jnp.zeros(3)}, optax.sgd(1.0),
                                       compressors.identity(), num_clients=3)
  with pytest.raises(ValueError, match="outside"):
    srnd(sstate, _cohort([-1]), jax.random.key(0))
  # Under jit the ids are traced: documented unchecked behaviour (clip on gather, drop
  # on scatter), so id 3 trains on client 2's state and writes nothing back.
  new, _ = jax.jit(rnd)(state, _cohort([3]), jax.random.key(0))
  np.testing.assert_array_equal(new.senders.residual["w"], state.senders.residual["w"])


# ------------------------------------------------------------------ progress bar


@pytest.mark.parametrize("n, text", [(0, "0 bit"), (999, "999 bit"), (12_345, "12.3 kbit"),
                                     (480_000, "480 kbit"), (2_500_000, "2.5 Mbit"),
                                     (3_210_000_000, "3.21 Gbit")])
def test_progress_bits_are_readable_for_small_runs(n, text):
  assert format_bits(n) == text


# ------------------------------------------------------------------ factories and keys (issue 13)


@pytest.mark.parametrize("make, match", [
    (lambda: compressors.qsgd(levels=2**31), "levels must be <= 2\\*\\*23"),
    (lambda: compressors.qsgd(levels=4.0), "levels must be a positive integer"),
    (lambda: compressors.lbgm(None, 0.3), "lbgm: inner must be a Compressor, got NoneType"),
    (lambda: error_feedback(None), "error_feedback: inner must be a Compressor"),
    (lambda: error_feedback(compressors.top_k), "a factory: call it"),
    (lambda: flattened(compressors.qsgd), "flattened: inner must be a Compressor"),
    (lambda: compressors.count_sketch(0, 4), "rows must be >= 1"),
    (lambda: compressors.power_sgd(2.5), "rank"),
    (lambda: compressors.random_k(fraction=0.0), "fraction must be in \\(0, 1\\]"),
    (lambda: compressors.sign_sgd(scaled="yes"), "scaled must be a bool"),
])
def test_factories_reject_bad_arguments_naming_them(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("keys", [None, (jax.random.key(0), jax.random.key(1)), Keys(0, 1)])
@pytest.mark.parametrize("name", ["random_k", "random_k_shared", "qsgd", "count_sketch",
                                  "lbgm_random_k"])
def test_randomized_codecs_reject_malformed_keys(name, keys):
  c = {**CODECS, "lbgm_random_k": lambda: compressors.lbgm(compressors.random_k(3), 0.3)}[name]()
  s, r = c.init(_g())
  p, _ = c.encode(_g(), s, KEYS)
  with pytest.raises(ValueError, match="keys"):
    c.encode(_g(), s, keys)
  if name != "qsgd":  # qsgd decodes without randomness
    with pytest.raises(ValueError, match="keys"):
      c.decode(p, r, keys, _g())


def test_laq_decode_rejects_transposed_template():
  c = compressors.laq(4, step_size=0.1)
  g = {"w": jnp.arange(6.0).reshape(2, 3)}
  s, r = c.init(g)
  p, _ = c.encode(g, s, KEYS)
  assert c.decode(p, r, KEYS, g)[0]["w"].shape == (2, 3)
  with pytest.raises(ValueError, match=r"expected \(2, 3\), got \(3, 2\)"):
    c.decode(p, r, KEYS, {"w": jnp.zeros((3, 2))})


@pytest.mark.parametrize("name", ["top_k", "top_k_fraction", "random_k", "lbgm_top_k",
                                  "sign_sgd", "sign_scaled", "qsgd", "count_sketch"])
def test_empty_leaves_cost_nothing_and_decode_empty(name):
  make = {**CODECS, "sign_scaled": lambda: compressors.sign_sgd(scaled=True)}[name]
  c = make()
  for g in ({"e": jnp.zeros((0,))}, {}, {"e": jnp.zeros((0, 3)), "f": jnp.zeros((0,))}):
    s, r = c.init(g)
    p, _ = c.encode(g, s, KEYS)
    assert int(bits.count(p)) == 0 == wire.total_bits(p)
    assert all(bool(jnp.all(jnp.isfinite(f.data))) for f in bits.fields(p))  # no NaN scale
    out, _ = c.decode(p, r, KEYS, g)
    assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, g)
