"""Registry of every compressor, driving the conformance suite (tests/test_conformance.py).

Each entry declares the properties the conformance checks may rely on. Families add their
entries in their own section below.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from fedjax_compress import compressors as C
from fedjax_compress._src.base import Compressor
from fedjax_compress._src.combinators import error_feedback


class Entry(NamedTuple):
  """One registered compressor configuration and its claimed properties."""

  name: str
  make: Callable[[], Compressor]
  unbiased: bool = False          # E[decode(encode(g))] == g over keys
  lossless: bool = False          # decode(encode(g)) == g exactly
  linear_aggregate: bool = True   # aggregate == sum_c w_c decode(payload_c) (when present)
  stateful: bool = False          # sender or receiver state changes across messages
  max_bits_fraction: float | None = None  # bits <= this * uncompressed bits (test params)


REGISTRY: list[Entry] = [
    # --- baselines (issue 2) ---
    Entry("identity", C.identity, unbiased=True, lossless=True),
    Entry("top_k", lambda: C.top_k(fraction=0.1), max_bits_fraction=0.3),
    Entry("random_k", lambda: C.random_k(fraction=0.25), unbiased=True, max_bits_fraction=0.3),
    Entry("random_k_shared", lambda: C.random_k(fraction=0.25, shared_mask=True), unbiased=True,
          max_bits_fraction=0.3),
    Entry("qsgd", lambda: C.qsgd(4, bucket_size=64), unbiased=True, max_bits_fraction=0.3),
    Entry("sign_sgd", C.sign_sgd, max_bits_fraction=0.05),
    Entry("sign_sgd_scaled", lambda: C.sign_sgd(scaled=True), max_bits_fraction=0.2),
    Entry("ef_top_k", lambda: error_feedback(C.top_k(fraction=0.1)), stateful=True,
          max_bits_fraction=0.3),
    # count_sketch: `aggregate` unsketches the sum of sketches (FetchSGD), which is not the
    # sum of per-client decodes unless the decode is linear (one row, no top-k).
    Entry("count_sketch", lambda: C.count_sketch(3, 12, k=20), linear_aggregate=False,
          max_bits_fraction=0.3),
    Entry("count_sketch_1row", lambda: C.count_sketch(1, 32), unbiased=True,
          max_bits_fraction=0.3),
    Entry("ef_count_sketch", lambda: error_feedback(C.count_sketch(3, 12, k=20)),
          linear_aggregate=False, stateful=True, max_bits_fraction=0.3),
    Entry("power_sgd", lambda: C.power_sgd(2, min_compression_rate=1.0), stateful=True,
          max_bits_fraction=0.75),
    Entry("ef_power_sgd", lambda: error_feedback(C.power_sgd(1)), stateful=True,
          max_bits_fraction=0.4),
    # --- intrinsic gradient compression (issue 3) ---
    # IGC decodes a shrunk estimate (E[V V^T] ~ (d/D) I): biased, linear, 32 d bits (D = 126).
    Entry("igc_static", lambda: C.intrinsic_static(16, seed=0), max_bits_fraction=0.15),
    Entry("igc_static_blocked", lambda: C.intrinsic_static(16, seed=1, block_rows=40),
          max_bits_fraction=0.15),
    Entry("igc_k_subspace", lambda: C.intrinsic_k_subspace(16, 3, seed=0),
          max_bits_fraction=0.15),
    Entry("igc_k_subspace_cyclic",
          lambda: C.intrinsic_k_subspace(16, 3, seed=0, schedule="cyclic"), stateful=True,
          max_bits_fraction=0.15),
    Entry("igc_time_varying", lambda: C.intrinsic_time_varying(16), max_bits_fraction=0.15),
    Entry("igc_static_downlink", lambda: C.intrinsic_static_downlink(16, seed=0),
          stateful=True, max_bits_fraction=0.15),
    Entry("igc_k_subspace_downlink", lambda: C.intrinsic_k_subspace_downlink(8, 2, seed=0),
          stateful=True, max_bits_fraction=0.15),
    # --- M22 / HSQ (issue 6) ---
    Entry("m22", lambda: C.m22(2, top_fraction=0.6, min_layer_size=40, lloyd_iters=20)),
    Entry("m22_weibull_pooled", lambda: C.m22(1, m=2.0, family="weibull", top_fraction=None,
                                              per_layer=False, min_layer_size=1, fit="moments")),
    Entry("uniform", lambda: C.uniform(3, min_layer_size=40), max_bits_fraction=0.2),
    Entry("uniform_top_k_pooled", lambda: C.uniform(2, top_fraction=0.6, min_layer_size=40,
                                                    per_layer=False), max_bits_fraction=0.3),
    Entry("uniform_stochastic", lambda: C.uniform(2, min_layer_size=1, stochastic=True),
          unbiased=True, max_bits_fraction=0.15),
    Entry("hsq", lambda: C.hsq(codebook_size=64, chunk=8, error_feedback=True, raw_layer_size=0),
          stateful=True, max_bits_fraction=0.1),
    Entry("hsq_no_ef", lambda: C.hsq(raw_layer_size=0), max_bits_fraction=0.06),
    Entry("hsq_raw_small", lambda: C.hsq(codebook_size=32, chunk=4, raw_layer_size=48),
          max_bits_fraction=0.7),
    Entry("hsq_unbiased", lambda: C.hsq(codebook_size=32, chunk=8, mode="unbiased",
                                        raw_layer_size=0), unbiased=True,
          max_bits_fraction=0.1),
    # --- LBGM / LAQ (issue 5) ---
    Entry("lbgm_identity", lambda: C.lbgm(C.identity(), 0.2), stateful=True),
    Entry("lbgm_whole_model", lambda: C.lbgm(C.identity(), 0.2, per_tensor=False), stateful=True),
    Entry("lbgm_top_k", lambda: C.lbgm(C.top_k(fraction=0.25), 0.4), stateful=True),
    Entry("lbgm_sign_sgd", lambda: C.lbgm(C.sign_sgd(scaled=True), 0.4), stateful=True),
    Entry("ef_lbgm_top_k", lambda: error_feedback(C.lbgm(C.top_k(fraction=0.25), 0.4)),
          stateful=True),
    Entry("laq", lambda: C.laq(4, step_size=0.1), stateful=True),
    Entry("slaq", lambda: C.slaq(3, step_size=0.1), stateful=True),
    # --- the peers' compressors (issue 14) ---
    Entry("drive", C.drive, max_bits_fraction=0.05),
    Entry("drive_unbiased_per_tensor", lambda: C.drive(scale="unbiased", per_tensor=True),
          max_bits_fraction=0.15),
    Entry("eden", lambda: C.eden(2, block_size=64), max_bits_fraction=0.1),
    Entry("rotated_uniform", lambda: C.rotated_uniform(16), unbiased=True,
          max_bits_fraction=0.15),
    Entry("rotated_uniform_per_tensor", lambda: C.rotated_uniform(4, per_tensor=True),
          unbiased=True, max_bits_fraction=0.2),
    Entry("terngrad", C.terngrad, max_bits_fraction=0.1),
    Entry("terngrad_unclipped", lambda: C.terngrad(clip=None), unbiased=True,
          max_bits_fraction=0.1),
    # Natural compression / dithering are unbiased, but some test coordinates round up with
    # probability ~1e-3 (or down with ~1e-3): 2000 Monte-Carlo draws can all agree, leaving no
    # variance to test against. tests/test_peer_compressors.py checks their rounding rule.
    Entry("natural_compression", C.natural_compression, max_bits_fraction=0.3),
    Entry("natural_dithering", lambda: C.natural_dithering(4, bucket_size=64),
          max_bits_fraction=0.2),
    Entry("cast_float16", C.cast, max_bits_fraction=0.55),
    Entry("cast_bfloat16", lambda: C.cast("bfloat16"), max_bits_fraction=0.55),
    Entry("cast_float8_e4m3", lambda: C.cast("float8_e4m3fn"), max_bits_fraction=0.3),
    Entry("cast_float8_e5m2_unscaled", lambda: C.cast("float8_e5m2", scaled=False),
          max_bits_fraction=0.3),
    Entry("threshold", lambda: C.threshold(1.5)),
    Entry("dgc", lambda: C.dgc(0.1), stateful=True, max_bits_fraction=0.3),
    Entry("fetchsgd", lambda: C.fetchsgd(3, 12, 20), linear_aggregate=False, stateful=True,
          max_bits_fraction=0.3),
    Entry("kashin", lambda: C.kashin(2, block_size=64), unbiased=True, max_bits_fraction=0.25),
    Entry("kashin_nearest_per_tensor", lambda: C.kashin(3, redundancy=1.5, stochastic=False,
                                                        per_tensor=True)),
]


def by_name(name: str) -> Entry:
  """The registry entry called `name`."""
  for e in REGISTRY:
    if e.name == name:
      return e
  raise KeyError(name)
