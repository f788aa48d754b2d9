"""LBGM wrapper: spec ALGORITHMS_IGC_LBGM.md 3.10 invariants and a NumPy float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from fedjax_compress import Keys, bits, compressors as C, error_feedback, wire
from fedjax_compress.compressors._lbgm import projection

SHAPES = {"w": (6, 5), "b": (5,), "v": (7,)}


def _keys(i, j=0):
  return Keys(jax.random.fold_in(jax.random.key(1), i), jax.random.fold_in(jax.random.key(2), j))


def _rand_tree(key, scale=1.0):
  ks = jax.random.split(key, len(SHAPES))
  return {n: scale * jax.random.normal(k, s) for (n, s), k in zip(sorted(SHAPES.items()), ks)}


def _near_lbg_sequence(rounds, seed):
  """Per round a gradient tree: per tensor either c * base + small noise or large noise."""
  rng = np.random.default_rng(seed)
  base = {n: rng.normal(size=s) for n, s in SHAPES.items()}
  seq = []
  for _ in range(rounds):
    g = {}
    for n, s in SHAPES.items():
      c = rng.choice([-2.0, 0.5, 1.5])
      noise = rng.choice([0.03, 4.0])  # sin^2 ~ 1e-3 or ~0.9: far from the thresholds used
      g[n] = (c * base[n] + noise * rng.normal(size=s)).astype(np.float32)
      if rng.random() < 0.3:
        base[n] = rng.normal(size=s)
    seq.append(g)
  return seq


def _ref_lbgm(seq, delta):
  """Float64 NumPy reference of the per-tensor rule with the identity base compressor."""
  lbg = {n: None for n in SHAPES}
  outs, scalars = [], []
  for g in seq:
    out, sc = {}, {}
    for n, x in g.items():
      x = x.astype(np.float64)
      b = lbg[n]
      scalar = False
      if b is not None and b.ravel() @ b.ravel() > 0:
        gb, gg, bb = x.ravel() @ b.ravel(), x.ravel() @ x.ravel(), b.ravel() @ b.ravel()
        err = 0.0 if gg == 0 else min(max(1 - gb**2 / (gg * bb), 0.0), 1.0)
        scalar = err <= delta
      if scalar:
        out[n] = gb / bb * b
      else:
        out[n] = x
        lbg[n] = x
      sc[n] = scalar
    outs.append(out)
    scalars.append(sc)
  return outs, scalars


class LBGMTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_reference(self):
    delta = 0.2
    c = C.lbgm(C.identity(), delta)
    seq = _near_lbg_sequence(12, seed=0)
    ref, ref_scalar = _ref_lbgm(seq, delta)
    like = {n: jnp.zeros(s) for n, s in SHAPES.items()}
    s, r = c.init(like)
    enc, dec = self.variant(c.encode), self.variant(c.decode)
    n_scalar = 0
    for t, g in enumerate(seq):
      g = jax.tree.map(jnp.asarray, g)
      p, s = enc(g, s, _keys(t))
      out, r = dec(p, r, _keys(t), like)
      # payload leaves are in sorted-name order (dict pytree); flags are the rho counts
      for i, n in enumerate(sorted(SHAPES)):
        self.assertEqual(bool(p[i]["rho"].count), ref_scalar[t][n])
        n_scalar += ref_scalar[t][n]
        np.testing.assert_allclose(out[n], ref[t][n], rtol=2e-5, atol=2e-6)
    self.assertGreater(n_scalar, 5)
    self.assertLess(n_scalar, 12 * 3 - 5)

  @parameterized.parameters(None, 0, 0.0)
  def test_threshold_off_is_inner(self, threshold):
    inner = C.top_k(fraction=0.2)
    self.assertIs(C.lbgm(inner, threshold), inner)

  @chex.variants(with_jit=True, without_jit=True)
  def test_tiny_threshold_full_sends_equal_inner(self):
    # Random (non-collinear) updates are never recycled: every message is the inner one.
    inner = error_feedback(C.qsgd(3, bucket_size=8))
    c = C.lbgm(inner, 1e-9)
    like = _rand_tree(jax.random.key(0))
    s, r = c.init(like)
    s_in, r_in = jax.tree.map(lambda x: x, inner.init(like["w"]))
    enc, dec = self.variant(c.encode), self.variant(c.decode)
    for t in range(4):
      g = _rand_tree(jax.random.key(10 + t))
      p, s = enc(g, s, _keys(t, 3))
      out, r = dec(p, r, _keys(t, 3), like)
      self.assertTrue(all(int(m["rho"].count) == 0 for m in p))
      # tensor "w" is unit index 2 in sorted order; its keys are folded with that index
      kw = Keys(jax.random.fold_in(_keys(t, 3).shared, 2),
                jax.random.fold_in(_keys(t, 3).private, 2))
      p_in, s_in = inner.encode(g["w"], s_in, kw)
      out_in, r_in = inner.decode(p_in, r_in, kw, like["w"])
      # same ops, but jit may fuse differently from the eager reference: ulp-level only
      np.testing.assert_allclose(out["w"], out_in, rtol=1e-6, atol=1e-7)
      self.assertEqual(int(bits.count(p[2]["inner"])),
                       int(bits.count(p_in)) + sum(bits.length_bits(f.data.size)
                                                   for f in bits.fields(p_in)))

  def test_threshold_one_recycles_everything_after_first_round(self):
    c = C.lbgm(C.identity(), 1.0)
    like = _rand_tree(jax.random.key(0))
    s, r = c.init(like)
    first = None
    for t in range(4):
      g = _rand_tree(jax.random.key(20 + t))
      p, s = c.encode(g, s, _keys(t))
      out, r = c.decode(p, r, _keys(t), like)
      if t == 0:
        first = g
        self.assertEqual(int(bits.count(p)), sum(1 + 32 * x.size + bits.length_bits(x.size)
                                                 for x in jax.tree.leaves(like)))
        continue
      self.assertTrue(all(int(m["rho"].count) == 1 for m in p))
      self.assertEqual(int(bits.count(p)), sum(1 + 32 + bits.length_bits(x.size)
                                               for x in jax.tree.leaves(like)))
      for n in SHAPES:  # the update stays in span{LBG} = span{first round's tensor}
        b = np.asarray(first[n], np.float64).ravel()
        o = np.asarray(out[n], np.float64).ravel()
        rho = (o @ b) / (b @ b)
        np.testing.assert_allclose(o, rho * b, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(-3.0, -0.5, 0.25, 7.0)
  def test_collinear_is_exact(self, c_mult):
    c = C.lbgm(C.identity(), 0.01)
    base = _rand_tree(jax.random.key(5))
    s, r = c.init(base)
    p, s = c.encode(base, s, _keys(0))
    _, r = c.decode(p, r, _keys(0), base)
    g = jax.tree.map(lambda x: c_mult * x, base)
    p, s = c.encode(g, s, _keys(1))
    out, r = c.decode(p, r, _keys(1), base)
    for m in p:
      self.assertEqual(int(m["rho"].count), 1)
      np.testing.assert_allclose(m["rho"].data[0], c_mult, rtol=1e-6)
    chex.assert_trees_all_close(out, g, rtol=1e-6, atol=1e-6)

  def test_projection_pythagoras(self):
    rng = np.random.default_rng(3)
    for _ in range(5):
      g, b = rng.normal(size=40), rng.normal(size=40) + 0.5 * rng.normal() * 0
      g = g + rng.normal() * b
      rho, err, valid = projection(jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32))
      rho_ref = g @ b / (b @ b)
      resid = g - rho_ref * b
      self.assertTrue(bool(valid))
      np.testing.assert_allclose(rho, rho_ref, rtol=1e-5)
      np.testing.assert_allclose(g @ g, (rho_ref * b) @ (rho_ref * b) + resid @ resid, rtol=1e-10)
      np.testing.assert_allclose(resid @ b, 0.0, atol=1e-10)
      np.testing.assert_allclose(err, resid @ resid / (g @ g), rtol=1e-4, atol=1e-6)

  def test_zero_norm_lbg_and_zero_gradient(self):
    c = C.lbgm(C.identity(), 0.5)
    like = {"w": jnp.zeros(4)}
    s, r = c.init(like)
    # Round 0: g = 0 is sent in full, so the LBG is zero-norm ...
    p, s = c.encode({"w": jnp.zeros(4)}, s, _keys(0))
    out, r = c.decode(p, r, _keys(0), like)
    self.assertEqual(int(p[0]["rho"].count), 0)
    # ... and is treated as absent: the next message is full again, never NaN.
    g = {"w": jnp.array([1.0, 2.0, 0.0, -1.0])}
    p, s = c.encode(g, s, _keys(1))
    out, r = c.decode(p, r, _keys(1), like)
    self.assertEqual(int(p[0]["rho"].count), 0)
    chex.assert_trees_all_equal(out, g)
    # With a valid LBG, g = 0 is a scalar round with rho = 0.
    p, s = c.encode({"w": jnp.zeros(4)}, s, _keys(2))
    out, r = c.decode(p, r, _keys(2), like)
    self.assertEqual(int(p[0]["rho"].count), 1)
    self.assertEqual(float(p[0]["rho"].data[0]), 0.0)
    chex.assert_trees_all_equal(out, {"w": jnp.zeros(4)})
    chex.assert_tree_all_finite((out, s, r))

  def test_copies_identical_with_sampling_and_wire_roundtrip(self):
    # Three clients, random participation; the server decodes unpacked bytes.
    c = C.lbgm(C.sign_sgd(scaled=True), 0.3)
    like = _rand_tree(jax.random.key(0))
    s0, r0 = c.init(like)
    senders, receivers = [s0] * 3, [r0] * 3
    seqs = [_near_lbg_sequence(10, seed=100 + i) for i in range(3)]
    rng = np.random.default_rng(7)
    n_scalar = n_full = 0
    for t in range(10):
      for i in np.flatnonzero(rng.random(3) < 0.6):
        g = jax.tree.map(jnp.asarray, seqs[i][t])
        p, senders[i] = c.encode(g, senders[i], _keys(t, i))
        q = wire.unpack(wire.pack(p), p)
        self.assertEqual(len(wire.pack(p, raw=True)) * 8 - int(bits.count(p)) in range(8), True)
        out, receivers[i] = c.decode(q, receivers[i], _keys(t, i), like)
        out2, _ = c.decode(p, receivers[i], _keys(t, i), like)
        for m in p:
          n_scalar += int(m["rho"].count)
          n_full += 1 - int(m["rho"].count)
      for i in range(3):
        chex.assert_trees_all_equal(senders[i].lbg, receivers[i].lbg)
        chex.assert_trees_all_equal(senders[i].has_lbg, receivers[i].has_lbg)
    self.assertGreater(n_scalar, 0)
    self.assertGreater(n_full, 0)

  def test_stacked_bits(self):
    # top-k per tensor: full rounds bill the inner values+indices, scalar rounds 32 bits.
    inner = C.top_k(fraction=0.4)
    c = C.lbgm(inner, 0.5)
    base = _rand_tree(jax.random.key(1))
    s, r = c.init(base)
    p, s = c.encode(base, s, _keys(0))
    for m, x in zip(p, jax.tree.leaves(base)):
      p_in, _ = inner.encode(x, None, None)
      hdr = sum(bits.length_bits(f.data.size) for f in bits.fields(p_in))
      self.assertEqual(int(bits.count(m)), 1 + int(bits.count(p_in)) + hdr)
      self.assertEqual(int(bits.count(m)), wire.total_bits(m))
    p, s = c.encode(jax.tree.map(lambda x: 2 * x, base), s, _keys(1))
    for m, x in zip(p, jax.tree.leaves(base)):
      p_in, _ = inner.encode(x, None, None)
      hdr = sum(bits.length_bits(f.data.size) for f in bits.fields(p_in))
      self.assertEqual(int(bits.count(m)), 1 + 32 + hdr)

  def test_error_feedback_telescopes(self):
    c = error_feedback(C.lbgm(C.top_k(fraction=0.3), 0.6))
    like = _rand_tree(jax.random.key(0))
    s, r = c.init(like)
    total_g = jax.tree.map(jnp.zeros_like, like)
    total_out = jax.tree.map(jnp.zeros_like, like)
    seq = _near_lbg_sequence(8, seed=4)
    for t, g in enumerate(seq):
      g = jax.tree.map(jnp.asarray, g)
      p, s = c.encode(g, s, _keys(t))
      out, r = c.decode(p, r, _keys(t), like)
      total_g = jax.tree.map(jnp.add, total_g, g)
      total_out = jax.tree.map(jnp.add, total_out, out)
    chex.assert_trees_all_close(jax.tree.map(jnp.add, total_out, s.residual), total_g,
                                rtol=1e-5, atol=1e-4)

  def test_per_tensor_equals_whole_model_for_one_tensor(self):
    seq = _near_lbg_sequence(8, seed=9)
    like = {"w": jnp.zeros(SHAPES["w"])}
    a, b = C.lbgm(C.identity(), 0.2), C.lbgm(C.identity(), 0.2, per_tensor=False)
    (sa, ra), (sb, rb) = a.init(like), b.init(like)
    for t, g in enumerate(seq):
      g = {"w": jnp.asarray(g["w"])}
      pa, sa = a.encode(g, sa, _keys(t))
      pb, sb = b.encode(g, sb, _keys(t))
      oa, ra = a.decode(pa, ra, _keys(t), like)
      ob, rb = b.decode(pb, rb, _keys(t), like)
      chex.assert_trees_all_equal(oa, ob)
      self.assertEqual(int(bits.count(pa)), int(bits.count(pb)))

  def test_vmap_over_clients_equals_loop(self):
    c = C.lbgm(C.identity(), 0.3)
    like = _rand_tree(jax.random.key(0))
    s, r = c.init(like)
    n = 3
    stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * n), t)  # noqa: E731
    ss, rs = stack(s), stack(r)
    seqs = [_near_lbg_sequence(4, seed=30 + i) for i in range(n)]
    for t in range(4):
      gs = jax.tree.map(lambda *x: jnp.stack(x), *[seqs[i][t] for i in range(n)])
      keys = Keys(_keys(t).shared, jax.random.split(jax.random.key(t), n))
      ps, ss = jax.vmap(c.encode, in_axes=(0, 0, Keys(None, 0)))(gs, ss, keys)
      outs, rs = jax.vmap(c.decode, in_axes=(0, 0, Keys(None, 0), None))(ps, rs, keys, like)
      self.assertEqual(bits.count(ps, batch_dims=1).shape, (n,))
    # replay client 1 alone
    s1, r1 = s, r
    for t in range(4):
      k1 = Keys(_keys(t).shared, jax.random.split(jax.random.key(t), n)[1])
      p1, s1 = c.encode(jax.tree.map(jnp.asarray, seqs[1][t]), s1, k1)
      o1, r1 = c.decode(p1, r1, k1, like)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], outs), o1, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], rs.lbg), r1.lbg, rtol=1e-6)

  def test_grad_through_decode(self):
    c = C.lbgm(C.identity(), 0.3)
    like = _rand_tree(jax.random.key(0))
    s, r = c.init(like)
    p, s = c.encode(like, s, _keys(0))
    _, r = c.decode(p, r, _keys(0), like)

    def f(g):
      p, _ = c.encode(g, s, _keys(1))
      out, _ = c.decode(p, r, _keys(1), like)
      return sum(jnp.sum(x) for x in jax.tree.leaves(out))

    chex.assert_tree_all_finite(jax.grad(f)(jax.tree.map(lambda x: 2 * x, like)))

  def test_compressed_mean_aggregator_keeps_copies_in_sync(self):
    # Through the optax Aggregator adapter (vmapped encode, vmapped decode, mean).
    from fedjax_compress import compressed_mean
    c = C.lbgm(C.identity(), 0.3)
    agg = compressed_mean(c, 0, num_workers=3)
    like = _rand_tree(jax.random.key(0))
    state = agg.init(like)
    seqs = [_near_lbg_sequence(6, seed=50 + i) for i in range(3)]
    for t in range(6):
      gs = jax.tree.map(lambda *x: jnp.stack(x), *[seqs[i][t] for i in range(3)])
      mean, state = jax.jit(agg.update)(gs, state, like)
      chex.assert_trees_all_equal(state.senders.lbg, state.receivers.lbg)
    self.assertTrue(bool(state.senders.has_lbg.all()))
    chex.assert_tree_all_finite(mean)

  def test_federated_simulator(self):
    # Partial participation: LBG copies stay identical, non-participants are untouched,
    # and a near-zero threshold gives the FedSGD trajectory (spec 3.10.1, .5, .9).
    import optax
    from fedjax_compress import federated
    rng = np.random.default_rng(0)
    nc, n, d = 6, 12, 5
    xs = rng.normal(size=(nc, n, d)).astype(np.float32)
    ys = (xs @ rng.normal(size=d) + rng.normal(size=(nc, n))).astype(np.float32)

    def loss(p, batch, mask, key):
      del key
      r = batch["x"] @ p["w"] + p["b"][0] - batch["y"]
      return jnp.sum(jnp.where(mask, r * r, 0.0)) / jnp.sum(mask)

    params = {"w": jnp.zeros(d), "b": jnp.zeros(1)}
    server_tx = optax.sgd(0.1, momentum=0.9)

    def trajectory(uplink, check):
      st = federated.init_server_state(params, server_tx, uplink, num_clients=nc)
      rnd = jax.jit(federated.build_round(loss, optax.sgd(1.0), server_tx, uplink,
                                          local_steps=1))
      out = []
      for t in range(12):
        ids = np.sort(np.random.default_rng(t).choice(nc, 3, replace=False))
        cohort = federated.Cohort(ids=jnp.asarray(ids, jnp.int32), weight=jnp.ones(3),
                                  batches={"x": jnp.asarray(xs[ids])[:, None],
                                           "y": jnp.asarray(ys[ids])[:, None]},
                                  mask=jnp.ones((3, 1, n), bool))
        new, m = rnd(st, cohort, jax.random.key(0))
        if check:
          chex.assert_trees_all_equal(new.senders.lbg, new.receivers.lbg)
          chex.assert_trees_all_equal(new.senders.has_lbg, new.receivers.has_lbg)
          out_ids = np.setdiff1d(np.arange(nc), ids)
          chex.assert_trees_all_equal(jax.tree.map(lambda v: v[out_ids], new.senders),
                                      jax.tree.map(lambda v: v[out_ids], st.senders))
          chex.assert_trees_all_equal(jax.tree.map(lambda v: v[out_ids], new.receivers),
                                      jax.tree.map(lambda v: v[out_ids], st.receivers))
        st = new
        out.append((st.params, np.asarray(m.up_bits)))
      return out

    lb = trajectory(C.lbgm(C.identity(), 0.5), check=True)
    full_bits = sum(1 + 32 * x.size + bits.length_bits(x.size) for x in jax.tree.leaves(params))
    self.assertTrue(any((b < full_bits).any() for _, b in lb))  # some scalar rounds happened
    base = trajectory(C.identity(), check=False)
    tiny = trajectory(C.lbgm(C.identity(), 1e-9), check=False)
    for (pb, _), (pt, _) in zip(base, tiny):
      chex.assert_trees_all_close(pt, pb, rtol=1e-6, atol=1e-6)

  def test_invalid_threshold(self):
    for bad in (-0.1, float("nan"), float("inf")):
      with self.assertRaises(ValueError):
        C.lbgm(C.identity(), bad)


if __name__ == "__main__":
  pytest.main([__file__])
