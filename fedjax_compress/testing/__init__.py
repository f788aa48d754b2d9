"""Testing utilities: the compressor registry and reusable conformance checks."""

from fedjax_compress.testing._conformance import (Harness, assert_same_avals, assert_trees_close,
                                                  check_aggregate, check_bits_and_wire,
                                                  check_codec, check_entry,
                                                  check_lossless, check_max_bits,
                                                  check_optax_transformation,
                                                  check_payload_wire, check_reduce,
                                                  check_rejects_nonfinite,
                                                  check_state, check_structure_and_dtypes,
                                                  check_unbiased, check_vmap_matches_loop,
                                                  check_zero_input, default_params, harness,
                                                  message_keys, random_like, roundtrip)
from fedjax_compress.testing._conformance import (BAD_INPUT_CHECKS, bad_templates,
                                                  check_bad_keys, check_empty,
                                                  check_huge_finite, check_low_precision,
                                                  check_nonfinite_propagates,
                                                  check_rejects_bad_template,
                                                  low_precision_harness, scaled_like)
from fedjax_compress.testing._registry import REGISTRY, Entry, by_name

__all__ = [
    "REGISTRY", "Entry", "by_name",
    "Harness", "harness", "default_params", "random_like", "message_keys", "roundtrip",
    "assert_trees_close", "assert_same_avals",
    "check_codec", "check_payload_wire", "check_bits_and_wire", "check_max_bits",
    "check_structure_and_dtypes", "check_state", "check_vmap_matches_loop", "check_unbiased",
    "check_lossless", "check_aggregate", "check_reduce", "check_zero_input", "check_rejects_nonfinite",
    "check_optax_transformation", "check_entry",
    "BAD_INPUT_CHECKS", "check_huge_finite", "check_low_precision", "check_nonfinite_propagates",
    "check_empty", "check_rejects_bad_template", "check_bad_keys", "bad_templates",
    "low_precision_harness", "scaled_like",
]
