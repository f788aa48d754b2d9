"""IGC compressors: float64 references, spec IGC 2.7 invariants, bits, errors."""

import chex
import fastfood_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fedjax_compress import EmptyState, Keys, bits, compressors as C, ops, wire
from fedjax_compress._src import layout
from fedjax_compress._src.keys import round_keys

LIKE = {"b": jnp.zeros((7,), jnp.float32), "w": jnp.zeros((6, 5), jnp.float32)}
D = 37


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), LIKE)


def _keys(round_index, client=0, seed=0):
  k = round_keys(jax.random.key(seed), round_index, jnp.array([client]))
  return Keys(k.shared, k.private[0])


def _dense(key, d, **kw):
  p = ops.fastfood_params(key, d, D, **kw)
  return ref.dense_from_factors(p.signs, p.perm, p.gauss, d, D, p.block_rows)


def _roundtrip(c, g, keys, state=None):
  s, r = c.init(LIKE) if state is None else state
  payload, s = c.encode(g, s, keys)
  out, r = c.decode(payload, r, keys, LIKE)
  return payload, out, (s, r)


class IgcTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(None, 8)
  def test_static_matches_float64_reference(self, rows):
    d = 5
    c = C.intrinsic_static(d, seed=3, block_rows=rows)
    v = _dense(jax.random.fold_in(jax.random.key(3), 0), d, block_rows=rows)
    g = _tree(0)
    payload, out, _ = self.variant(lambda g, k: _roundtrip(c, g, k))(g, _keys(0))
    gv = np.asarray(layout.ravel(g), np.float64)
    np.testing.assert_allclose(payload.data, v.T @ gv, atol=1e-5)
    np.testing.assert_allclose(layout.ravel(out), v @ np.asarray(payload.data, np.float64),
                               atol=1e-5)
    assert payload.width == 32 and payload.data.shape == (d,)

  def test_feistel_permutation_option(self):
    d, g = 5, _tree(12)
    c = C.intrinsic_time_varying(d, permutation="feistel")
    keys = _keys(1)
    v = _dense(jax.random.fold_in(keys.shared, 0), d, permutation="feistel")
    payload, out, _ = _roundtrip(c, g, keys)
    np.testing.assert_allclose(payload.data, v.T @ np.asarray(layout.ravel(g)), atol=1e-5)
    np.testing.assert_allclose(layout.ravel(out), v @ np.asarray(payload.data, np.float64),
                               atol=1e-5)
    with self.assertRaisesRegex(ValueError, "permutation"):
      C.intrinsic_static(d, permutation="sorted")

  def test_time_varying_uses_round_shared_key(self):
    d = 6
    c = C.intrinsic_time_varying(d)
    g = _tree(1)
    for t in range(2):
      keys = _keys(t)
      v = _dense(jax.random.fold_in(keys.shared, 0), d)
      payload, out, _ = _roundtrip(c, g, keys)
      np.testing.assert_allclose(payload.data, v.T @ np.asarray(layout.ravel(g)), atol=1e-5)
      np.testing.assert_allclose(layout.ravel(out), v @ np.asarray(payload.data, np.float64),
                                 atol=1e-5)
    assert not np.allclose(_roundtrip(c, g, _keys(0))[0].data, _roundtrip(c, g, _keys(1))[0].data)

  def test_bits_and_wire(self):
    g = _tree(2)
    for c in (C.intrinsic_static(9), C.intrinsic_k_subspace(9, 2),
              C.intrinsic_k_subspace(9, 2, schedule="cyclic"), C.intrinsic_time_varying(9)):
      payload, _, _ = _roundtrip(c, g, _keys(0))
      assert int(bits.count(payload)) == 32 * 9 == wire.total_bits(payload)
      assert len(wire.pack(payload)) == 36
      back = wire.unpack(wire.pack(payload), payload)
      np.testing.assert_array_equal(back.data, payload.data)
    assert C.intrinsic_downlink_bits("static", 9, D) == 32 * 9
    assert C.intrinsic_downlink_bits("k_subspace", 9, D, num_subspaces=3) == 32 * 27
    assert C.intrinsic_downlink_bits("k_subspace", 9, D, num_subspaces=5) == 32 * D
    assert C.intrinsic_downlink_bits("time_varying", 9, D) == 32 * D
    with self.assertRaisesRegex(ValueError, "variant"):
      C.intrinsic_downlink_bits("dense", 9, D)
    with self.assertRaisesRegex(ValueError, "exceeds"):
      C.intrinsic_downlink_bits("static", 40, D)

  def test_errors(self):
    for make in (lambda d: C.intrinsic_static(d), lambda d: C.intrinsic_time_varying(d),
                 lambda d: C.intrinsic_k_subspace(d, 2)):
      with self.assertRaisesRegex(ValueError, "intrinsic dimension"):
        make(0)
      c = make(D + 1)  # d > D is only known once the model is seen
      with self.assertRaisesRegex(ValueError, "d=38 exceeds the number of parameters D=37"):
        c.init(LIKE)
      with self.assertRaisesRegex(ValueError, "exceeds the number of parameters"):
        jax.jit(lambda g: c.encode(g, EmptyState(), _keys(0)))(LIKE)
      with self.assertRaisesRegex(ValueError, "NaN or Inf"):
        make(3).encode({"b": LIKE["b"].at[0].set(jnp.inf), "w": LIKE["w"]}, EmptyState(),
                       _keys(0))
    with self.assertRaisesRegex(ValueError, "num_subspaces"):
      C.intrinsic_k_subspace(3, 0)
    with self.assertRaisesRegex(ValueError, "schedule"):
      C.intrinsic_k_subspace(3, 2, schedule="roundrobin")
    with self.assertRaisesRegex(ValueError, "block_rows"):
      C.intrinsic_static(3, block_rows=0)
    with self.assertRaisesRegex(ValueError, "method"):
      C.intrinsic_time_varying(3, method="fft")
    assert C.intrinsic_k_subspace(3, 2, schedule="cyclic").aggregate is None

  def test_static_igc_is_sgd_on_z(self):
    """Spec 2.7 inv. 1 and 2: FedSGD with static IGC == GD on z; theta_t - theta_0 in range(V)."""
    d, eta, rounds, n = 6, 0.3, 4, 3
    theta0 = _tree(10, 0.1)
    targets = [_tree(20 + k) for k in range(n)]
    w = jnp.asarray([0.5, 0.3, 0.2], jnp.float32)

    def loss(theta, target):
      return 0.5 * sum(jnp.sum((a - b) ** 2) for a, b in
                       zip(jax.tree.leaves(theta), jax.tree.leaves(target)))

    c = C.intrinsic_static(d, seed=4)
    loss_z = C.subspace_loss(loss, theta0, d, seed=4)
    theta, z = theta0, jnp.zeros(d)
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *targets)
    for t in range(rounds):
      grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(theta, stack)
      keys = round_keys(jax.random.key(0), t, jnp.arange(n))
      payloads, _ = jax.vmap(c.encode, in_axes=(0, None, Keys(None, 0)))(
          grads, EmptyState(), keys)
      step = c.aggregate(payloads, w, keys, LIKE)
      theta = jax.tree.map(lambda a, s: a - eta * s, theta, step)
      gz = sum(wk * jax.grad(loss_z)(z, tk) for wk, tk in zip(w, targets))
      z = z - eta * gz
    np.testing.assert_allclose(layout.ravel(theta),
                               layout.ravel(C.subspace_reparam(theta0, d, seed=4)(z)), atol=1e-5)
    v = _dense(jax.random.fold_in(jax.random.key(4), 0), d)
    delta = np.asarray(layout.ravel(theta), np.float64) - np.asarray(layout.ravel(theta0))
    coef = np.linalg.lstsq(v, delta, rcond=None)[0]
    assert np.linalg.norm(v @ coef - delta) <= 1e-5 * np.linalg.norm(delta)
    np.testing.assert_allclose(coef, z, atol=1e-4)

  @parameterized.parameters("static", "k_subspace", "time_varying")
  def test_aggregate_equals_compressing_the_aggregate(self, variant):
    """Spec 2.7 inv. 3 (linearity) and 7 (vmap == loop)."""
    c = {"static": C.intrinsic_static(7, seed=1), "k_subspace": C.intrinsic_k_subspace(7, 3),
         "time_varying": C.intrinsic_time_varying(7)}[variant]
    n = 4
    gs = [_tree(30 + k) for k in range(n)]
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *gs)
    w = jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32)
    keys = round_keys(jax.random.key(2), 5, jnp.arange(n))
    payloads, _ = jax.jit(jax.vmap(c.encode, in_axes=(0, None, Keys(None, 0))))(
        stack, EmptyState(), keys)
    for k in range(n):
      one, _ = c.encode(gs[k], EmptyState(), Keys(keys.shared, keys.private[k]))
      np.testing.assert_allclose(payloads.data[k], one.data, rtol=1e-5, atol=1e-6)
    agg = jax.jit(c.aggregate)(payloads, w, keys, LIKE)
    mean_g = jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), stack)
    k0 = Keys(keys.shared, keys.private[0])
    _, direct, _ = _roundtrip(c, mean_g, k0)
    np.testing.assert_allclose(layout.ravel(agg), layout.ravel(direct), atol=1e-5)

  def test_k1_and_constant_seed_equal_static(self):
    """Spec 2.7 inv. 4: K=1 == static; time-varying with a constant shared seed == static."""
    g, d = _tree(3), 8
    static, _, _ = _roundtrip(C.intrinsic_static(d, seed=11), g, _keys(0))
    for t in range(3):
      for c in (C.intrinsic_k_subspace(d, 1, seed=11),):
        p, _, _ = _roundtrip(c, g, _keys(t))
        np.testing.assert_array_equal(p.data, static.data)
      p, _, _ = _roundtrip(C.intrinsic_time_varying(d), g,
                           Keys(jax.random.key(11), _keys(t).private))
      np.testing.assert_array_equal(p.data, static.data)
    cyc = C.intrinsic_k_subspace(d, 1, seed=11, schedule="cyclic")
    state = cyc.init(LIKE)
    for t in range(3):
      p, _, state = _roundtrip(cyc, g, _keys(t), state)
      np.testing.assert_array_equal(p.data, static.data)
      assert int(state[0].step) == int(state[1].step) == t + 1

  def test_k_subspace_schedules(self):
    g, d, k = _tree(4), 5, 3
    # subspace j of K-subspace(seed=2) is the Fastfood map of fold_in(key(2), j)
    dense = [_dense(jax.random.fold_in(jax.random.key(2), j), d) for j in range(k)]
    coef = [v.T @ np.asarray(layout.ravel(g), np.float64) for v in dense]
    cyc = C.intrinsic_k_subspace(d, k, seed=2, schedule="cyclic")
    state = cyc.init(LIKE)
    for t in range(2 * k):
      p, out, state = _roundtrip(cyc, g, _keys(t), state)
      np.testing.assert_allclose(p.data, coef[t % k], atol=1e-5)
      np.testing.assert_allclose(layout.ravel(out), dense[t % k] @ np.asarray(p.data, np.float64),
                                 atol=1e-5)
    rnd = C.intrinsic_k_subspace(d, k, seed=2)
    used = set()
    for t in range(12):
      p, _, _ = _roundtrip(rnd, g, _keys(t))
      hits = [j for j in range(k) if np.allclose(p.data, coef[j], atol=1e-5)]
      assert len(hits) == 1
      used.add(hits[0])
    assert used == set(range(k))

  def test_orthogonal_map_reproduces_uncompressed(self):
    """Spec 2.7 inv. 5: G := 1 and d = D = L -> decode(encode(g)) == g (FedSGD unchanged)."""
    like = {"a": jnp.zeros((4, 8)), "b": jnp.zeros((32,))}
    c = C.intrinsic_static(64, seed=5, gaussian=False)
    g = {"a": jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), jnp.float32),
         "b": jnp.asarray(np.random.default_rng(1).standard_normal(32), jnp.float32)}
    payload, _ = c.encode(g, EmptyState(), _keys(0))
    out, _ = c.decode(payload, EmptyState(), _keys(0), like)
    np.testing.assert_allclose(layout.ravel(out), layout.ravel(g), atol=1e-5)
    w = jnp.asarray([0.25, 0.75])
    agg = c.aggregate(jax.tree.map(lambda x: jnp.stack([x, 2 * x]), payload), w,
                      Keys(_keys(0).shared, jnp.stack([_keys(0).private] * 2)), like)
    np.testing.assert_allclose(layout.ravel(agg), 1.75 * layout.ravel(g), atol=1e-5)

  def test_determinism_across_jitted_paths(self):
    """Spec 2.7 inv. 8: client and server programs regenerate the same map bitwise."""
    g, d = _tree(6), 9
    for make in (lambda: C.intrinsic_static(d, seed=7), lambda: C.intrinsic_time_varying(d)):
      c1, c2 = make(), make()
      p1, _ = jax.jit(c1.encode)(g, EmptyState(), _keys(2))
      p2, _ = jax.jit(lambda g, s, k: c2.encode(g, s, k))(g, EmptyState(), _keys(2))
      np.testing.assert_array_equal(p1.data, p2.data)
      o1, _ = jax.jit(c1.decode)(p1, EmptyState(), _keys(2), LIKE)
      o2, _ = jax.jit(lambda p, s, k, l: c2.decode(p, s, k, l))(p1, EmptyState(), _keys(2),
                                                                 LIKE)
      for a, b in zip(jax.tree.leaves(o1), jax.tree.leaves(o2)):
        np.testing.assert_array_equal(a, b)
    a, _ = jax.jit(C.intrinsic_static(d, seed=7).encode)(g, EmptyState(), _keys(0))
    b, _ = jax.jit(C.intrinsic_static(d, seed=jax.random.key(7)).encode)(
        g, EmptyState(), _keys(0))
    np.testing.assert_array_equal(a.data, b.data)

  def test_static_downlink_sends_subspace_coordinates(self):
    """Static download = 32 d bits: deltas V dz are recovered exactly; others are projected."""
    d = 6
    up, dn = C.intrinsic_static(d, seed=8), C.intrinsic_static_downlink(d, seed=8)
    v = _dense(jax.random.fold_in(jax.random.key(8), 0), d)
    dz = np.random.default_rng(0).standard_normal(d)
    delta = layout.unraveler(LIKE)(jnp.asarray(v @ dz, jnp.float32))
    enc = jax.jit(dn.encode)
    payload, _ = enc(delta, EmptyState(), _keys(0))
    assert int(bits.count(payload)) == 32 * d == C.intrinsic_downlink_bits("static", d, D)
    np.testing.assert_allclose(payload.data, dz, atol=1e-5)
    out, _ = dn.decode(payload, EmptyState(), _keys(0), LIKE)
    np.testing.assert_allclose(layout.ravel(out), v @ dz, atol=1e-5)
    # the decoder is the uplink decoder: same map
    out_up, _ = up.decode(payload, EmptyState(), _keys(3), LIKE)
    np.testing.assert_array_equal(layout.ravel(out_up), layout.ravel(out))
    g = np.asarray(layout.ravel(_tree(9)), np.float64)
    p2, _ = enc(layout.unraveler(LIKE)(jnp.asarray(g, jnp.float32)), EmptyState(), _keys(0))
    np.testing.assert_allclose(p2.data, np.linalg.lstsq(v, g, rcond=None)[0], atol=1e-4)
    # gradients go through the solve implicitly: d<w, P g>/dg = P w (P the projection)
    proj = v @ np.linalg.solve(v.T @ v, v.T)
    wv = np.random.default_rng(1).standard_normal(D)
    grad = jax.jit(jax.grad(lambda gf: jnp.vdot(layout.ravel(dn.decode(
        dn.encode(layout.unraveler(LIKE)(gf), EmptyState(), _keys(0))[0], EmptyState(),
        _keys(0), LIKE)[0]), jnp.asarray(wv, jnp.float32))))(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(grad, proj @ wv, atol=1e-4)
    zero, _ = enc(LIKE, EmptyState(), _keys(0))
    np.testing.assert_array_equal(zero.data, np.zeros(d))
    with self.assertRaisesRegex(ValueError, "cg_iters"):
      C.intrinsic_static_downlink(3, cg_iters=0)

  def test_subspace_reparam(self):
    theta0 = {"b": jnp.ones((7,), jnp.bfloat16), "w": jnp.full((6, 5), 2.0)}
    theta = C.subspace_reparam(theta0, 4, seed=1)
    out = theta(jnp.zeros(4))
    assert out["b"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(theta0)):
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    z = jnp.asarray([1.0, -2.0, 0.5, 0.0])
    v = _dense(jax.random.fold_in(jax.random.key(1), 0), 4)
    np.testing.assert_allclose(layout.ravel(jax.jit(theta)(z)) - layout.ravel(theta0),
                               v @ np.asarray(z, np.float64), atol=2e-2)  # bf16 leaf
    with self.assertRaisesRegex(ValueError, "exceeds"):
      C.subspace_reparam(theta0, 38)


if __name__ == "__main__":
  pytest.main([__file__])
