"""Federated round: float64 reference, vmap == loop, state gather/scatter, bits, policies."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_compress import bits, compressors, error_feedback, wire
from fedjax_compress import federated
from fedjax_compress._src import keys as K
from fedjax_compress._src.base import Keys

D, STEPS, B = 5, 3, 4


def mse_loss(p, batch, mask, key):
  del key
  m = mask.astype(jnp.float32)
  r = batch["x"] @ p["w"] + p["b"] - batch["y"]
  return jnp.sum(m * r * r) / jnp.maximum(jnp.sum(m), 1.0)


def make_cohort(rng, ids, weight, c=None):
  c = len(ids) if c is None else c
  x = rng.normal(size=(c, STEPS, B, D)).astype(np.float32)
  y = rng.normal(size=(c, STEPS, B)).astype(np.float32)
  mask = rng.random((c, STEPS, B)) < 0.8
  mask[0, 1] = False  # a fully masked step: skipped
  return federated.Cohort(ids=np.asarray(ids, np.int32), batches={"x": x, "y": y},
                          mask=mask, weight=np.asarray(weight, np.float32))


def np_local(w, b, x, y, mask, lr):
  w, b = w.astype(np.float64).copy(), float(b)
  for s in range(STEPS):
    m = mask[s].astype(np.float64)
    if m.sum() == 0:
      continue
    r = x[s].astype(np.float64) @ w + b - y[s]
    w -= lr * 2 * x[s].astype(np.float64).T @ (m * r) / m.sum()
    b -= lr * 2 * np.sum(m * r) / m.sum()
  return w, b


def np_round(w, b, cohort, lr):
  """Float64 FedAvg: weighted mean of deltas (weights normalized over weight > 0)."""
  wt = cohort.weight.astype(np.float64) / cohort.weight.sum()
  dw, db = np.zeros_like(w, np.float64), 0.0
  for c in range(len(cohort.ids)):
    w1, b1 = np_local(w, b, cohort.batches["x"][c], cohort.batches["y"][c], cohort.mask[c], lr)
    dw += wt[c] * (w - w1)
    db += wt[c] * (b - b1)
  return dw, db


def params0():
  return {"w": jnp.asarray(np.linspace(-1, 1, D), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def test_fedavg_matches_float64_reference_with_padding():
  rng = np.random.default_rng(0)
  lr = 0.05
  up = compressors.identity()
  rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(lr), optax.sgd(1.0), up,
                                     local_steps=STEPS))
  state = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=10)
  w, b = np.linspace(-1, 1, D), 0.0
  for r in range(2):
    cohort = make_cohort(rng, [3, 7, 1, 0], [5.0, 2.0, 1.0, 0.0])  # last: padding
    state, m = rnd(state, cohort, jax.random.key(1))
    dw, db = np_round(w, b, cohort, lr)
    w, b = w - dw, b - db
    np.testing.assert_allclose(np.asarray(state.params["w"]), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(state.params["b"]), b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.up_bits), [32 * (D + 1)] * 3 + [0])
    np.testing.assert_array_equal(np.asarray(m.down_bits), [32 * (D + 1)] * 3 + [0])
    np.testing.assert_allclose(np.asarray(m.weight), np.array([5, 2, 1, 0]) / 8, rtol=1e-6)
  assert int(state.round) == 2


def test_fedopt_adam_server_matches_reference():
  rng = np.random.default_rng(1)
  up = compressors.identity()
  tx = optax.adam(0.1, b1=0.9, b2=0.99, eps=1e-3)
  rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(0.05), tx, up, local_steps=STEPS))
  state = federated.init_server_state(params0(), tx, up, num_clients=4)
  cohort = make_cohort(rng, [0, 1, 2], [1.0, 1.0, 2.0])
  state, _ = rnd(state, cohort, jax.random.key(0))
  dw, _ = np_round(np.linspace(-1, 1, D), 0.0, cohort, 0.05)
  # one Adam step from zero moments: update = -lr * g / (|g| + eps) (bias-corrected)
  np.testing.assert_allclose(np.asarray(state.params["w"]),
                             np.linspace(-1, 1, D) - 0.1 * dw / (np.abs(dw) + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("name", ["qsgd", "ef_top_k"])
def test_vmapped_round_equals_per_client_loop(name):
  rng = np.random.default_rng(2)
  up = (compressors.qsgd(4, bucket_size=4) if name == "qsgd"
        else error_feedback(compressors.top_k(2)))
  client_tx, server_tx = optax.sgd(0.1, momentum=0.5), optax.sgd(1.0)
  rnd = jax.jit(federated.build_round(mse_loss, client_tx, server_tx, up, local_steps=STEPS))
  client_fn = jax.jit(federated.build_client_update(mse_loss, client_tx, up, local_steps=STEPS))
  state = federated.init_server_state(params0(), server_tx, up, num_clients=6)
  seed = jax.random.key(5)
  cohort = make_cohort(rng, [4, 1, 2], [1.0, 3.0, 2.0])
  new, metrics = rnd(state, cohort, seed)
  ukeys = K.round_keys(seed, 0, cohort.ids, K.UPLINK)
  tkeys = K.round_keys(seed, 0, cohort.ids, K.LOCAL_TRAINING).private
  agg = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), state.params)
  wn = cohort.weight / cohort.weight.sum()
  for c, cid in enumerate(cohort.ids):
    sender = jax.tree.map(lambda x: x[cid], state.senders)
    k = Keys(ukeys.shared, ukeys.private[c])
    batch = {"x": cohort.batches["x"][c], "y": cohort.batches["y"][c]}
    payload, sender, _, _ = client_fn(state.params, sender, batch, cohort.mask[c], tkeys[c], k)
    dec, _ = up.decode(payload, jax.tree.map(lambda x: x[cid], state.receivers), k,
                       state.params)
    agg = jax.tree.map(lambda a, d: a + wn[c] * np.asarray(d, np.float64), agg, dec)
    assert int(metrics.up_bits[c]) == wire.total_bits(payload)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[cid], new.senders), sender,
                                atol=1e-6)
  chex.assert_trees_all_close(new.params, jax.tree.map(lambda p, a: p - a, state.params, agg),
                              atol=1e-5)


def test_stateful_partial_participation_gather_scatter():
  rng = np.random.default_rng(3)
  up = error_feedback(compressors.top_k(1))
  rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), up,
                                      local_steps=STEPS))
  state = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=6)
  s1, _ = rnd(state, make_cohort(rng, [0, 2, 0], [1.0, 1.0, 0.0]), jax.random.key(0))
  res = lambda s: np.asarray(s.senders.residual["w"])  # noqa: E731
  assert np.abs(res(s1)[[0, 2]]).sum() > 0  # participants got a residual
  np.testing.assert_array_equal(res(s1)[[1, 3, 4, 5]], 0.0)
  # round 2: client 0 appears only as padding (weight 0) -> its state must be kept
  s2, m = rnd(s1, make_cohort(rng, [5, 0, 0, 0], [2.0, 0.0, 0.0, 0.0]), jax.random.key(0))
  r1, r2 = res(s1), res(s2)
  np.testing.assert_array_equal(r2[[0, 1, 2, 3, 4]], r1[[0, 1, 2, 3, 4]])
  assert np.abs(r2[5]).sum() > 0
  np.testing.assert_array_equal(np.asarray(m.up_bits)[1:], 0)
  assert int(s2.round) == 2


def test_stateful_receivers_are_gathered_and_scattered():
  rng = np.random.default_rng(10)
  up = compressors.laq(4, step_size=0.1)  # server keeps each client's last quantized gradient
  assert up.aggregate is None
  rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), up,
                                      local_steps=STEPS))
  state = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=5)
  new, _ = rnd(state, make_cohort(rng, [3, 1, 0], [1.0, 1.0, 0.0]), jax.random.key(0))
  for leaf0, leaf1 in zip(jax.tree.leaves(state.receivers), jax.tree.leaves(new.receivers)):
    a, b = np.asarray(leaf0), np.asarray(leaf1)
    np.testing.assert_array_equal(a[[0, 2, 4]], b[[0, 2, 4]])  # absent or padding: kept
  qhat = np.asarray(jax.tree.leaves(new.receivers)[0])
  assert np.abs(qhat[[1, 3]]).sum() > 0  # first upload is forced: participants updated


@pytest.mark.parametrize("name", ["qsgd", "lbgm"])
def test_up_bits_equal_wire_total_bits(name):
  rng = np.random.default_rng(4)
  up = (compressors.qsgd(2, bucket_size=3) if name == "qsgd"
        else compressors.lbgm(compressors.top_k(fraction=0.5), 0.5))
  tx = optax.sgd(0.1)
  rnd = jax.jit(federated.build_round(mse_loss, tx, optax.sgd(1.0), up, local_steps=STEPS))
  vclient = jax.jit(jax.vmap(federated.build_client_update(mse_loss, tx, up, local_steps=STEPS),
                             in_axes=(None, 0, 0, 0, 0, Keys(None, 0))))
  state = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=5)
  seed = jax.random.key(9)
  for r in range(3):
    cohort = make_cohort(rng, [r, r + 1, 0], [1.0, 2.0, 0.0])
    ids = cohort.ids
    payloads, *_ = vclient(state.params, jax.tree.map(lambda x: x[ids], state.senders),
                           cohort.batches, cohort.mask,
                           K.round_keys(seed, r, ids, K.LOCAL_TRAINING).private,
                           K.round_keys(seed, r, ids, K.UPLINK))
    state, m = rnd(state, cohort, seed)
    real = jax.tree.map(lambda x: x[:2], payloads)
    assert sum(int(b) for b in m.up_bits) == wire.total_bits(real, batch_dims=1)
    for c in range(2):
      one = jax.tree.map(lambda x: x[c], payloads)
      assert int(m.up_bits[c]) == wire.total_bits(one) == int(bits.count(one))
    assert int(m.up_bits[2]) == 0  # padding sends nothing


def test_nonfinite_client_gets_zero_weight_and_keeps_state():
  rng = np.random.default_rng(5)
  up = error_feedback(compressors.top_k(2))
  rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), up,
                                      local_steps=STEPS))
  state = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=4)
  cohort = make_cohort(rng, [1, 2], [1.0, 1.0])
  cohort.batches["x"][1, 0, 0, 0] = np.nan
  cohort.mask[1, 0, 0] = True
  new, m = rnd(state, cohort, jax.random.key(0))
  assert np.asarray(m.finite).tolist() == [True, False]
  np.testing.assert_allclose(np.asarray(m.weight), [1.0, 0.0])
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new.params))
  np.testing.assert_array_equal(np.asarray(new.senders.residual["w"][2]), 0.0)
  # the result equals the round with the bad client dropped
  only, _ = rnd(state, federated.Cohort(ids=cohort.ids[:1],
                                        batches=jax.tree.map(lambda x: x[:1], cohort.batches),
                                        mask=cohort.mask[:1], weight=cohort.weight[:1]),
                jax.random.key(0))
  chex.assert_trees_all_close(new.params, only.params, atol=1e-6)


def test_round_compiles_once_across_rounds():
  rng = np.random.default_rng(6)
  up = compressors.qsgd(4, bucket_size=4)
  rnd = federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), up, local_steps=STEPS)
  jrnd = jax.jit(chex.assert_max_traces(rnd, n=1))
  state = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=8)
  for r in range(3):
    state, _ = jrnd(state, make_cohort(rng, [r, r + 3, 7], [1.0, 1.0, 1.0]), jax.random.key(0))
  assert int(state.round) == 3


def test_identity_downlink_matches_no_downlink_and_bills_model():
  rng = np.random.default_rng(7)
  up, tx = compressors.identity(), optax.sgd(1.0)
  plain = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), tx, up, local_steps=STEPS))
  down = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), tx, up, local_steps=STEPS,
                                       downlink=compressors.identity()))
  s_plain = federated.init_server_state(params0(), tx, up, num_clients=4)
  s_down = federated.init_server_state(params0(), tx, up, num_clients=4,
                                       downlink=compressors.identity())
  for _ in range(2):
    cohort = make_cohort(rng, [0, 3, 1], [1.0, 1.0, 0.0])
    s_plain, _ = plain(s_plain, cohort, jax.random.key(0))
    s_down, m = down(s_down, cohort, jax.random.key(0))
  chex.assert_trees_all_close(s_plain.params, s_down.params, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(m.down_bits), [32 * (D + 1)] * 2 + [0])


def test_compressed_downlink_clients_start_from_broadcast():
  rng = np.random.default_rng(8)
  up, tx = compressors.identity(), optax.sgd(1.0)
  dl = error_feedback(compressors.top_k(2))
  rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), tx, up, local_steps=STEPS,
                                      downlink=dl))
  state = federated.init_server_state(params0(), tx, up, num_clients=4, downlink=dl)
  state, _ = rnd(state, make_cohort(rng, [0, 1], [1.0, 1.0]), jax.random.key(0))
  before = state
  state, m = rnd(state, make_cohort(rng, [2, 3], [1.0, 1.0]), jax.random.key(0))
  # broadcast moved by exactly the top-2 of (params - broadcast + residual): <= 2 entries of w,b
  moved = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in zip(
      jax.tree.leaves(state.broadcast), jax.tree.leaves(before.broadcast))])
  assert 0 < np.count_nonzero(moved) <= 2
  assert int(m.down_bits[0]) == int(m.down_bits[1]) > 0
  assert int(m.down_bits[0]) < 32 * (D + 1)


def test_validation_errors():
  with pytest.raises(ValueError, match="local_steps"):
    federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), compressors.identity(),
                          local_steps=0)
  with pytest.raises(ValueError, match="num_clients"):
    federated.init_server_state(params0(), optax.sgd(1.0), compressors.identity(), num_clients=0)
  rnd = federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), compressors.identity(),
                              local_steps=STEPS + 1)
  state = federated.init_server_state(params0(), optax.sgd(1.0), compressors.identity(),
                                      num_clients=3)
  with pytest.raises(ValueError, match="mask"):
    rnd(state, make_cohort(np.random.default_rng(0), [0, 1], [1.0, 1.0]), jax.random.key(0))


# ------------------------------------------------------------------ client chunks

CHUNK_UPLINKS = {
    "ef_top_k": lambda: error_feedback(compressors.top_k(2)),       # stateful sender
    "laq": lambda: compressors.laq(4, step_size=0.1),                # stateful receiver, no aggregate
    "count_sketch": lambda: compressors.count_sketch(2, 4, k=3),     # reduce: non-linear decode
    "qsgd": lambda: compressors.qsgd(4, bucket_size=4),              # linear aggregate
}


@pytest.mark.parametrize("name", sorted(CHUNK_UPLINKS))
def test_results_equal_for_every_chunk_size(name):
  up = CHUNK_UPLINKS[name]()
  state0 = federated.init_server_state(params0(), optax.sgd(1.0), up, num_clients=8)
  rng = np.random.default_rng(11)
  cohorts = [make_cohort(rng, [5, 1, 7, 0, 2], [1.0, 3.0, 0.0, 2.0, 1.0]),
             make_cohort(rng, [0, 3, 6, 7, 4], [2.0, 1.0, 1.0, 0.0, 1.0])]
  results = {}
  for chunk, vm in [("all", True), (1, True), (2, True), (3, True), ("all", False), (1, False),
                    (3, False)]:  # vmapped clients, or one after another in each chunk
    rnd = jax.jit(federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), up,
                                        local_steps=STEPS, clients_per_chunk=chunk,
                                        vmap_clients=vm))
    state, ms = state0, []
    for cohort in cohorts:
      state, m = rnd(state, cohort, jax.random.key(3))
      ms.append(m)
    results[chunk, vm] = (state, ms)
  ref_state, ref_ms = results["all", True]
  for key in results:
    state, ms = results[key]
    chex.assert_trees_all_close(state.params, ref_state.params, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close((state.senders, state.receivers),
                                (ref_state.senders, ref_state.receivers), atol=1e-6, rtol=1e-5)
    for m, r in zip(ms, ref_ms):
      assert m.up_bits.tolist() == r.up_bits.tolist()
      np.testing.assert_allclose(np.asarray(m.weight), np.asarray(r.weight), rtol=1e-6)
      np.testing.assert_allclose(np.asarray(m.loss), np.asarray(r.loss), rtol=1e-5)


def test_vmap_clients_rejects_non_bools():
  for bad in ("yes", 1, 0.0, None):
    with pytest.raises(ValueError, match="vmap_clients"):
      federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), compressors.identity(),
                            local_steps=1, vmap_clients=bad)


def test_chunk_plan_pads_evenly_and_rejects_bad_sizes():
  from fedjax_compress.federated._round import chunk_plan
  assert chunk_plan(13, 8) == (2, 7)
  assert chunk_plan(13, 1) == (13, 1)
  assert chunk_plan(13, "all") == (1, 13)
  assert chunk_plan(4, 100) == (1, 4)
  for bad in (0, -2, 2.5, "some", True):
    with pytest.raises(ValueError, match="clients_per_chunk"):
      federated.build_round(mse_loss, optax.sgd(0.1), optax.sgd(1.0), compressors.identity(),
                            local_steps=1, clients_per_chunk=bad)


def test_conv_rewrite_is_transparent_in_the_round():
  import flax.linen as nn

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(3, (3, 3), padding="SAME")(x))
      x = nn.Conv(2, (2, 2), strides=(2, 2), padding="VALID")(x)
      return nn.Dense(4)(x.reshape((x.shape[0], -1)))

  from fedjax_compress import models
  model = Tiny()
  params = models.init_params(model, np.zeros((1, 6, 6, 1), np.float32))
  loss = models.classification_loss(model)
  rng = np.random.default_rng(12)
  cohort = federated.Cohort(ids=np.arange(3, dtype=np.int32),
                            batches={"x": rng.normal(size=(3, 2, 4, 6, 6, 1)).astype(np.float32),
                                     "y": rng.integers(0, 4, (3, 2, 4)).astype(np.int32)},
                            mask=np.ones((3, 2, 4), bool), weight=np.ones(3, np.float32))
  out = {}
  for impl in ("xla", "im2col"):
    rnd = jax.jit(federated.build_round(loss, optax.sgd(0.1), optax.sgd(1.0),
                                        compressors.identity(), local_steps=2, conv_impl=impl))
    st = federated.init_server_state(params, optax.sgd(1.0), compressors.identity(),
                                     num_clients=3)
    out[impl] = rnd(st, cohort, jax.random.key(0))[0].params
    text = jax.jit(federated.build_round(loss, optax.sgd(0.1), optax.sgd(1.0),
                                         compressors.identity(), local_steps=2,
                                         conv_impl=impl)).lower(st, cohort,
                                                                jax.random.key(0)).as_text()
    assert ("convolution" in text) == (impl == "xla")
  chex.assert_trees_all_close(out["im2col"], out["xla"], atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="conv_impl"):
    federated.build_round(loss, optax.sgd(0.1), optax.sgd(1.0), compressors.identity(),
                          local_steps=1, conv_impl="fast")


def test_state_with_downlink_can_be_donated():
  """`init_server_state` never hands the same buffer to two leaves (params is also broadcast)."""
  loss = lambda p, b, m, k: jnp.sum(m * (b["x"] @ p["w"] - b["y"]) ** 2) / jnp.sum(m)
  params = {"w": jnp.ones(8)}
  down = compressors.qsgd(4)
  st = federated.init_server_state(params, optax.sgd(1.0), compressors.identity(),
                                   num_clients=2, downlink=down)
  leaves = [x for x in jax.tree.leaves(st) if isinstance(x, jax.Array)]
  assert len({id(x) for x in leaves}) == len(leaves)
  rnd = jax.jit(federated.build_round(loss, optax.sgd(0.1), optax.sgd(1.0),
                                      compressors.identity(), local_steps=1, downlink=down),
                donate_argnums=0)
  cohort = federated.Cohort(ids=jnp.arange(2), weight=jnp.ones(2),
                            batches={"x": jnp.ones((2, 1, 3, 8)), "y": jnp.ones((2, 1, 3))},
                            mask=jnp.ones((2, 1, 3), bool))
  st, m = rnd(st, cohort, jax.random.key(0))
  assert int(st.round) == 1 and np.all(np.isfinite(np.asarray(st.params["w"])))


def test_count_sketch_reduce_of_an_empty_model():
  """An empty model sends no sketch; `reduce` keeps the empty payload and decodes to empty."""
  c = compressors.count_sketch(3, 16)
  like = {"w": jnp.zeros((0,))}
  s, r = c.init(like)
  keys = Keys(jax.random.key(0), jax.random.key(1))
  pay, _ = c.encode(like, s, keys)
  red = c.reduce(jax.tree.map(lambda x: jnp.stack([x, x]), pay), jnp.ones(2))
  out, _ = c.decode(red, r, keys, like)
  assert out["w"].shape == (0,) and int(bits.count(red)) == 0
