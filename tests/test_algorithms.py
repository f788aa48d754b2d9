"""FL algorithms (FedProx, FedAvgM/FedAdam/FedYogi, SCAFFOLD, Mime/MimeLite) vs float64 NumPy.

Per-client quadratics: `f_i(z; batch) = 0.5 mean_j m_j (a_j . w + bias - b_j)^2`, a few rounds
with partial participation, a padding client and a step without examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_compress import Keys, bits, compressors, error_feedback, federated

D, STEPS, B, N = 4, 3, 5, 6
LR, LR_G = 0.1, 0.7


def loss_fn(p, batch, mask, key):
  del key
  m = mask.astype(jnp.float32)
  r = batch["a"] @ p["w"] + p["bias"] - batch["b"]
  return 0.5 * jnp.sum(m * r * r) / jnp.maximum(jnp.sum(m), 1.0)


def params0():
  return {"w": jnp.asarray(np.linspace(-0.5, 0.5, D), jnp.float32),
          "bias": jnp.asarray(0.3, jnp.float32)}


def z_of(p):
  return np.concatenate([np.asarray(p["w"], np.float64), [float(p["bias"])]])


def cohort(rng, ids, weight):
  c = len(ids)
  scale = 1.0 + np.arange(c)[:, None, None, None]  # heterogeneous curvature per client
  a = (rng.normal(size=(c, STEPS, B, D)) * scale / 2).astype(np.float32)
  b = (rng.normal(size=(c, STEPS, B)) + np.arange(c)[:, None, None]).astype(np.float32)
  mask = rng.random((c, STEPS, B)) < 0.8
  mask[:, :, 0] = True
  mask[0, 1] = False  # a step without examples: skipped, not counted in K_i
  return federated.Cohort(ids=np.asarray(ids, np.int32), batches={"a": a, "b": b},
                          mask=mask, weight=np.asarray(weight, np.float32))


def np_grad(z, a, b, m):
  a1 = np.concatenate([a.astype(np.float64), np.ones((a.shape[0], 1))], 1)
  m = m.astype(np.float64)
  return a1.T @ (m * (a1 @ z - b)) / max(m.sum(), 1.0)


def np_full_grad(z, co, c):
  n = co.mask[c].sum(1).astype(np.float64)
  g = sum(n[s] * np_grad(z, co.batches["a"][c, s], co.batches["b"][c, s], co.mask[c, s])
          for s in range(STEPS))
  return g / max(n.sum(), 1.0)


def np_local(z, co, c, direction):
  """SGD steps `y -= LR direction(g(y), g(x))` over the client's steps with data -> (y, K)."""
  y, k = z.copy(), 0
  for s in range(STEPS):
    a, b, m = co.batches["a"][c, s], co.batches["b"][c, s], co.mask[c, s]
    if not m.any():
      continue
    y = y - LR * direction(np_grad(y, a, b, m), np_grad(z, a, b, m), y)
    k += 1
  return y, k


def norm_weights(co):
  w = co.weight.astype(np.float64)
  return w / w.sum()


def cohorts(seed=0, rounds=3):
  rng = np.random.default_rng(seed)
  idsets = [[0, 2, 5, 1], [3, 2, 4, 0], [5, 1, 3, 2]]
  weights = [[3.0, 1.0, 2.0, 0.0], [1.0, 2.0, 2.0, 1.0], [2.0, 2.0, 1.0, 0.0]]
  return [cohort(rng, idsets[r], weights[r]) for r in range(rounds)]


def run(client_tx, server_tx, algorithm=None, cos=None, chunk="all", uplink=None,
        vmap_clients=True):
  up = compressors.identity() if uplink is None else uplink
  rnd = jax.jit(federated.build_round(loss_fn, client_tx, server_tx, up, local_steps=STEPS,
                                      clients_per_chunk=chunk, algorithm=algorithm,
                                      vmap_clients=vmap_clients))
  st = federated.init_server_state(params0(), server_tx, up, num_clients=N, algorithm=algorithm)
  ms = []
  for co in (cohorts() if cos is None else cos):
    st, m = rnd(st, co, jax.random.key(3))
    ms.append(m)
  return st, ms


def assert_close(actual, desired):
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=1e-5, atol=1e-5)


DENSE = 32 * (D + 1)


# --------------------------------------------------------------------------- FedProx

def test_fedprox_matches_reference():
  mu = 0.5
  st, ms = run(federated.fedprox(optax.sgd(LR), mu), optax.sgd(LR_G))
  z = z_of(params0())
  for co in cohorts():
    wt = norm_weights(co)
    g = sum(wt[c] * (z - np_local(z, co, c, lambda g, gx, y: g + mu * (y - z))[0])
            for c in range(4))
    z = z - LR_G * g
  assert_close(z_of(st.params), z)
  assert [m.up_bits.tolist() for m in ms][0] == [DENSE] * 3 + [0]


def test_fedprox_mu0_is_inner_optimizer_and_validates():
  a, _ = run(federated.fedprox(optax.sgd(LR), 0.0), optax.sgd(LR_G))
  b, _ = run(optax.sgd(LR), optax.sgd(LR_G))
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  with pytest.raises(ValueError, match="mu"):
    federated.fedprox(optax.sgd(LR), -1.0)
  with pytest.raises(TypeError, match="inner"):
    federated.fedprox(0.1, 1.0)


# --------------------------------------------------------------------------- server optimizers

def np_server(name, lr, b1=0.9, b2=0.99, eps=1e-3):
  """Reddi et al. Algorithm 2 (no bias correction, v_0 = eps^2) / FedAvgM on g = x - mean y."""
  state = {}

  def step(z, g):
    if name == "fedavgm":
      state["v"] = b1 * state.get("v", 0.0) + g
      return z - lr * state["v"]
    m = b1 * state.get("m", 0.0) + (1 - b1) * g
    v = state.get("v", eps ** 2)
    v = b2 * v + (1 - b2) * g * g if name == "fedadam" else v - (1 - b2) * g * g * np.sign(v - g * g)
    state.update(m=m, v=v)
    return z - lr * m / (np.sqrt(v) + eps)

  return step


@pytest.mark.parametrize("name,make", [
    ("fedavgm", lambda: federated.fedavgm(LR_G, momentum=0.9)),
    ("fedadam", lambda: federated.fedadam(0.05)),
    ("fedyogi", lambda: federated.fedyogi(0.05)),
])
def test_server_optimizers_match_reddi_reference(name, make):
  st, _ = run(optax.sgd(LR), make())
  step = np_server(name, LR_G if name == "fedavgm" else 0.05)
  z = z_of(params0())
  for co in cohorts():
    wt = norm_weights(co)
    g = sum(wt[c] * (z - np_local(z, co, c, lambda g, gx, y: g)[0]) for c in range(4))
    z = step(z, g)
  assert_close(z_of(st.params), z)


def test_fedopt_validation():
  for kw in (dict(b1=1.0), dict(b2=-0.1), dict(eps=0.0)):
    with pytest.raises(ValueError, match=next(iter(kw))):
      federated.fedadam(0.1, **kw)


# --------------------------------------------------------------------------- SCAFFOLD

def np_scaffold(option, cos=None):
  z = z_of(params0())
  c, ci = np.zeros(D + 1), np.zeros((N, D + 1))
  for co in (cohorts() if cos is None else cos):
    wt = norm_weights(co)
    g, dc_sum = np.zeros(D + 1), np.zeros(D + 1)
    for j, i in enumerate(co.ids):
      if co.weight[j] <= 0:
        continue
      y, k = np_local(z, co, j, lambda g, gx, y, i=i: g - ci[i] + c)
      if option == 2:
        new = ci[i] - c + (z - y) / (k * LR) if k else ci[i]
      else:
        new = np_full_grad(z, co, j)
      dc_sum += new - ci[i]
      ci[i] = new
      g += wt[j] * (z - y)
    z = z - LR_G * g
    c = c + dc_sum / N
  return z, c, ci


def flat(tree):
  """[..., D+1] from a {'w': [..., D], 'bias': [...]} tree."""
  return np.concatenate([np.asarray(tree["w"], np.float64),
                         np.asarray(tree["bias"], np.float64)[..., None]], -1)


@pytest.mark.parametrize("option", [2, 1])
def test_scaffold_matches_reference(option):
  alg = federated.scaffold(LR, option=option)
  st, ms = run(optax.sgd(LR), optax.sgd(LR_G), alg)
  z, c, ci = np_scaffold(option)
  assert_close(z_of(st.params), z)
  assert_close(flat(st.alg_server), c)
  assert_close(flat(st.alg_clients["state"]), ci)
  # c stays the mean of all N control variates (absent clients keep theirs).
  assert_close(flat(st.alg_server), flat(st.alg_clients["state"]).mean(0))
  # Billing: model + delta c_i up, model + c down, per participant; padding pays nothing.
  assert ms[0].up_bits.tolist() == [2 * DENSE] * 3 + [0]
  assert ms[0].down_bits.tolist() == [2 * DENSE] * 3 + [0]


def test_scaffold_is_chunk_size_invariant():
  outs = [run(optax.sgd(LR), optax.sgd(LR_G), federated.scaffold(LR), chunk=k,
              cos=cohorts(rounds=2)) for k in (1, 2, "all")]
  for st, ms in outs[1:]:
    for a, b in zip(jax.tree.leaves((st.params, st.alg_server, st.alg_clients)),
                    jax.tree.leaves((outs[0][0].params, outs[0][0].alg_server,
                                     outs[0][0].alg_clients))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert [m.up_bits.tolist() for m in ms] == [m.up_bits.tolist() for m in outs[0][1]]


def test_scaffold_compressed_control_variates_are_billed_and_consistent():
  comp = compressors.top_k(fraction=0.4)
  alg = federated.scaffold(LR, compressor=comp)
  st, ms = run(optax.sgd(LR), optax.sgd(LR_G), alg)
  like = params0()
  msg_bits = int(bits.count(jax.eval_shape(
      lambda: comp.encode(like, comp.init(like)[0], Keys(jax.random.key(0),
                                            jax.random.key(1)), like)[0])))
  assert msg_bits < DENSE
  assert ms[1].up_bits.tolist() == [DENSE + msg_bits] * 4
  # c_i moves by what the server decoded, so c = mean_i c_i still holds exactly.
  assert_close(flat(st.alg_server), flat(st.alg_clients["state"]).mean(0))
  ci = flat(st.alg_clients["state"])
  assert np.any(ci != 0) and np.sum(ci[0] != 0) <= D + 1


def test_scaffold_nonfinite_client_is_excluded():
  cos = cohorts()
  cos[0].batches["a"][1, 0, 0, 0] = np.inf
  st, ms = run(optax.sgd(LR), optax.sgd(LR_G), federated.scaffold(LR), cos=cos)
  assert ms[0].finite.tolist() == [True, False, True, True]
  assert float(ms[0].weight[1]) == 0.0
  # Reference: round 0 without client 1 (id 2), which keeps c_2 = 0 until round 1.
  cos2 = cohorts()
  cos2[0] = cos2[0].replace(weight=np.asarray([3.0, 0.0, 2.0, 0.0], np.float32))
  z, c, ci = np_scaffold(2, cos2)
  assert_close(z_of(st.params), z)
  assert_close(flat(st.alg_clients["state"]), ci)
  assert_close(flat(st.alg_server), c)


# --------------------------------------------------------------------------- Mime / MimeLite

def np_mime(lite, beta=0.9):
  z, mom = z_of(params0()), np.zeros(D + 1)
  for co in cohorts():
    wt = norm_weights(co)
    live = [j for j in range(4) if co.weight[j] > 0]
    anchor = sum(wt[j] * np_full_grad(z, co, j) for j in live)

    def direction(g, gx, y):
      if not lite:
        g = g - gx + anchor
      return (1 - beta) * g + beta * mom

    g = sum(wt[j] * (z - np_local(z, co, j, direction)[0]) for j in live)
    mom = (1 - beta) * anchor + beta * mom
    z = z - LR_G * g
  return z, mom


@pytest.mark.parametrize("lite", [False, True])
def test_mime_matches_reference(lite):
  alg = federated.mimelite(momentum=0.9) if lite else federated.mime(momentum=0.9)
  st, ms = run(optax.sgd(LR), optax.sgd(LR_G), alg)
  z, mom = np_mime(lite)
  assert_close(z_of(st.params), z)
  assert_close(flat(st.alg_server.ema), mom)
  # Up: model delta + grad f_i(x). Down: model + statistics s (ema and its int32 count)
  # + Mime's c.
  assert ms[0].up_bits.tolist() == [2 * DENSE] * 3 + [0]
  s_bits = DENSE + 32
  assert ms[0].down_bits.tolist() == [DENSE + s_bits + (0 if lite else DENSE)] * 3 + [0]


def test_mime_chunk_size_invariant_with_compressed_gradient():
  alg = federated.mime(compressor=compressors.qsgd(levels=8))
  a, ma = run(optax.sgd(LR), optax.sgd(LR_G), alg, chunk=1, cos=cohorts(rounds=2))
  b, mb = run(optax.sgd(LR), optax.sgd(LR_G), alg, chunk="all", cos=cohorts(rounds=2))
  for x, y in zip(jax.tree.leaves((a.params, a.alg_server)),
                  jax.tree.leaves((b.params, b.alg_server))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert [m.up_bits.tolist() for m in ma] == [m.up_bits.tolist() for m in mb]
  assert ma[0].up_bits.tolist()[0] < 2 * DENSE


# --------------------------------------------------------------------------- errors

def test_algorithm_validation():
  with pytest.raises(ValueError, match="option"):
    federated.scaffold(LR, option=3)
  with pytest.raises(ValueError, match="local_lr"):
    federated.scaffold()
  with pytest.raises(ValueError, match="compressor"):
    federated.scaffold(LR, compressor=compressors.top_k)
  with pytest.raises(ValueError, match="momentum"):
    federated.mime(momentum=1.0)
  with pytest.raises(TypeError, match="algorithm"):
    federated.build_round(loss_fn, optax.sgd(LR), optax.sgd(1.0), compressors.identity(),
                          local_steps=STEPS, algorithm="scaffold")
  rnd = federated.build_round(loss_fn, optax.sgd(LR), optax.sgd(1.0), compressors.identity(),
                              local_steps=STEPS, algorithm=federated.scaffold(LR))
  st = federated.init_server_state(params0(), optax.sgd(1.0), compressors.identity(),
                                   num_clients=N)
  with pytest.raises(ValueError, match="init_server_state"):
    rnd(st, cohorts(rounds=1)[0], jax.random.key(0))


@pytest.mark.parametrize("make", [lambda: federated.scaffold(LR),
                                  lambda: federated.mime(momentum=0.9)], ids=["scaffold", "mime"])
def test_vmapped_and_mapped_clients_agree(make):
  """Anchor gradients, messages and per-client states: the same with the chunk's clients
  vmapped or run one after another (`vmap_clients`), chunks of 3 over 4 clients (padded)."""
  alg = make()
  up = error_feedback(compressors.top_k(3))
  a, ma = run(optax.sgd(LR), optax.sgd(LR_G), alg, chunk=3, uplink=up, vmap_clients=True)
  b, mb = run(optax.sgd(LR), optax.sgd(LR_G), alg, chunk=3, uplink=up, vmap_clients=False)
  for x, y in zip(jax.tree.leaves((a.params, a.alg_server, a.alg_clients, a.senders)),
                  jax.tree.leaves((b.params, b.alg_server, b.alg_clients, b.senders))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  for x, y in zip(ma, mb):
    assert x.up_bits.tolist() == y.up_bits.tolist()
    assert x.down_bits.tolist() == y.down_bits.tolist()


def test_scaffold_sharded_equals_unsharded():
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  mesh = federated.client_mesh(2)
  alg = federated.scaffold(LR)
  up = compressors.identity()
  rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(LR), optax.sgd(LR_G), up,
                                      local_steps=STEPS, clients_per_chunk="all", algorithm=alg))
  st = federated.shard_state(federated.init_server_state(
      params0(), optax.sgd(LR_G), up, num_clients=N, algorithm=alg), mesh)
  assert st.alg_clients["state"]["w"].sharding.spec == jax.sharding.PartitionSpec("clients")
  for co in cohorts():
    st, _ = rnd(st, federated.shard_cohort(co, mesh), jax.random.key(3))
  ref, _ = run(optax.sgd(LR), optax.sgd(LR_G), alg)
  for a, b in zip(jax.tree.leaves((st.params, st.alg_server, st.alg_clients)),
                  jax.tree.leaves((ref.params, ref.alg_server, ref.alg_clients))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_scaffold_state_checkpoint_round_trip_then_resume(tmp_path):
  from fedjax_compress import checkpoint  # pylint: disable=import-outside-toplevel
  alg = federated.scaffold(LR)
  st, _ = run(optax.sgd(LR), optax.sgd(LR_G), alg, cos=cohorts()[:2])
  checkpoint.save(str(tmp_path / "s"), st, step=2)
  like = federated.init_server_state(params0(), optax.sgd(LR_G), compressors.identity(),
                                     num_clients=N, algorithm=alg)
  got = checkpoint.restore(str(tmp_path / "s"), like)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(st)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rnd = jax.jit(federated.build_round(loss_fn, optax.sgd(LR), optax.sgd(LR_G),
                                      compressors.identity(), local_steps=STEPS,
                                      clients_per_chunk="all", algorithm=alg))
  got, _ = rnd(got, cohorts()[2], jax.random.key(3))
  z, c, _ = np_scaffold(2)
  assert_close(z_of(got.params), z)
  assert_close(flat(got.alg_server), c)
