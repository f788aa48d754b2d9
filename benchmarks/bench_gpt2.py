"""A GPT-2-small-sized federated run: time per round, peak memory and exact bits per uplink.

The model is `models.TransformerLM.gpt2_small()` (12 layers, width 768, 12 heads, vocabulary
50,257: 124,439,808 parameters) on the built-in `data.synthetic_tokens`. Each configuration
runs in its own process (so its peak RSS is its own) for `--rounds` rounds of `--cohort`
clients (`clients_per_chunk` clients at a time), and prints seconds per round (compile
excluded: the first round is timed separately), the process's peak resident memory, and the
exact uplink/downlink bits per client and round from `RoundMetrics` (Python ints, no cap).

  python benchmarks/bench_gpt2.py                          # all configurations, seq_len 64
  python benchmarks/bench_gpt2.py --configs qsgd --seq_len 128
  python benchmarks/bench_gpt2.py --tiny                   # a 2-layer width-64 model (smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = ("uncompressed", "igc_static", "igc_k_subspace", "igc_time_varying", "ef_top_k", "qsgd")


def build(name: str, d: int, k: int):
  """(uplink, downlink, server_tx) of a configuration."""
  import optax
  from fedjax_compress import compressors as C, error_feedback
  sgd = optax.sgd(1.0)
  if name == "uncompressed":
    return C.identity(), None, sgd
  if name == "igc_static":
    return (C.intrinsic_static(d, seed=0, permutation="feistel"),
            C.intrinsic_static_downlink(d, seed=0, permutation="feistel"), sgd)
  if name == "igc_k_subspace":
    return (C.intrinsic_k_subspace(d, k, seed=0, permutation="feistel"),
            C.intrinsic_k_subspace_downlink(d, k, seed=0, permutation="feistel"), sgd)
  if name == "igc_time_varying":
    return C.intrinsic_time_varying(d, permutation="feistel"), None, sgd
  if name == "ef_top_k":
    return error_feedback(C.top_k(fraction=0.001)), None, sgd
  if name == "qsgd":
    return C.qsgd(15, bucket_size=4096), None, sgd
  raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")


def run_one(a) -> dict:
  """One configuration in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from fedjax_compress import data, federated, models

  model = (models.TransformerLM(vocab_size=a.vocab, width=64, layers=2, heads=4,
                                max_len=max(a.seq_len, 8)) if a.tiny
           else models.TransformerLM.gpt2_small(vocab_size=a.vocab))
  fd = data.synthetic_tokens(a.cohort, vocab_size=a.vocab, seq_len=a.seq_len,
                             sequences_per_client=a.batch * a.local_steps, seed=0)
  params = model.init(jax.random.key(0), jnp.zeros((1, a.seq_len), jnp.int32))["params"]
  num = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  uplink, downlink, server_tx = build(a.config, a.d, a.k)
  round_fn = jax.jit(federated.build_round(
      models.classification_loss(model), optax.sgd(a.client_lr), server_tx, uplink,
      local_steps=a.local_steps, downlink=downlink, clients_per_chunk=a.chunk),
      donate_argnums=0)
  state = federated.init_server_state(params, server_tx, uplink, num_clients=a.cohort,
                                      downlink=downlink)
  seed = jax.random.key(0)
  times, ups, downs, losses = [], [], [], []
  for r in range(a.rounds + 1):
    cohort = federated.sample_cohort(fd, r, cohort_size=a.cohort, local_steps=a.local_steps,
                                     batch_size=a.batch)
    t = time.perf_counter()
    state, m = round_fn(state, cohort, seed)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t)
    ups.append(np.asarray(m.up_bits, np.int64).tolist())
    downs.append(np.asarray(m.down_bits, np.int64).tolist())
    losses.append(float(np.mean(np.asarray(m.loss))))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return {"config": a.config, "params": num, "seq_len": a.seq_len, "cohort": a.cohort,
          "chunk": a.chunk, "first_round_s": times[0], "round_s": times[1:],
          "peak_rss_gib": peak / 2**30, "up_bits_per_client": ups[-1],
          "down_bits_per_client": downs[-1], "up_bits_round": int(sum(ups[-1])),
          "down_bits_round": int(sum(downs[-1])), "loss": losses}


def _without_configs(argv: list[str]) -> list[str]:
  """`argv` less `--configs X` / `--configs=X` (the parent's selection)."""
  out, skip = [], False
  for x in argv:
    if skip:
      skip = False
    elif x == "--configs":
      skip = True
    elif not x.startswith("--configs="):
      out.append(x)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--config", default="", help=argparse.SUPPRESS)
  p.add_argument("--rounds", type=int, default=2, help="timed rounds after the first")
  p.add_argument("--cohort", type=int, default=4)
  p.add_argument("--chunk", type=int, default=1, help="clients_per_chunk")
  p.add_argument("--local_steps", type=int, default=1)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--vocab", type=int, default=50_257)
  p.add_argument("--d", type=int, default=1 << 16, help="IGC intrinsic dimension")
  p.add_argument("--k", type=int, default=4, help="K-subspace IGC: number of subspaces")
  p.add_argument("--client_lr", type=float, default=0.05)
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--json", default="")
  p.add_argument("--timeout", type=float, default=3600)
  a = p.parse_args()
  if a.config:
    print(json.dumps(run_one(a)), flush=True)
    return
  for name in a.configs.split(","):
    args = [sys.executable, os.path.abspath(__file__), "--config", name] + _without_configs(
        sys.argv[1:])
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=a.timeout)
    rows = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode or not rows:
      print(f"{name}: FAILED ({out.returncode})\n{out.stderr[-2000:]}", flush=True)
      continue
    r = json.loads(rows[-1])
    per = sum(r["round_s"]) / max(len(r["round_s"]), 1)
    print(f"{name:>17}: params={r['params']:,} round={per:.1f}s (first {r['first_round_s']:.1f}s) "
          f"peak={r['peak_rss_gib']:.2f}GiB up/client={r['up_bits_per_client'][0]:,} bits "
          f"down/client={r['down_bits_per_client'][0]:,} bits loss={r['loss'][-1]:.3f}",
          flush=True)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
