#!/usr/bin/env bash
# The GPU checks pending for issues 3, 4 and 6, as one script for a lent GPU machine
# (device tool: `run` with command `bash benchmarks/gpu_checks.sh`, timeout_s ~540).
# The device image already has jax (CUDA), flax, optax, chex, orbax, tqdm and matplotlib;
# nothing can be installed there, so PYTHONPATH points at this checkout and no pip runs.
# Each step is bounded so one slow step cannot eat the whole lease; logs go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$OUT/devices.txt"
# Issue 3: compiled Pallas FWHT vs float64 (and its VJP); the other gpu-marked tests.
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_hadamard.py \
  2>&1 | tail -n 30 | tee "$OUT/pytest_gpu.txt"
# Issue 3: FWHT at 2^20 and 2^24 vs plain jnp butterfly and one memory pass (target: within 4x).
timeout 120 python3 benchmarks/bench_fwht.py --log2n 20,24 --reps 20 --fastfood_d 1024 \
  2>&1 | tee "$OUT/bench_fwht.txt"
# Issue 4: vmapped round vs per-client jitted loop (goal >= 50x at 256 clients).
timeout 150 python3 benchmarks/bench_round.py --clients 64,256 --hidden 256 --repeats 3 \
  2>&1 | tee "$OUT/bench_round.txt"
# Issue 6: HSQ codebook search (single matmul vs blocked vs per-chunk loop).
timeout 90 python3 benchmarks/bench_hsq.py --reps 9 2>&1 | tee "$OUT/bench_hsq.txt"
