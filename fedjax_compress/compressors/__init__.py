"""Compressor factories, one private module per family."""

from fedjax_compress.compressors._hsq import hsq
from fedjax_compress.compressors._fetchsgd import FetchSGDState, fetchsgd
from fedjax_compress.compressors._identity import identity
from fedjax_compress.compressors._igc import (IgcState, SubspaceCoords, intrinsic_downlink_bits,
                                              intrinsic_k_subspace,
                                              intrinsic_k_subspace_downlink,
                                              intrinsic_static, intrinsic_static_downlink,
                                              intrinsic_time_varying, SubspaceOptState,
                                              subspace_client_tx, subspace_loss,
                                              subspace_reparam, subspace_server_tx)
from fedjax_compress.compressors._kashin import kashin
from fedjax_compress.compressors._laq import laq, slaq
from fedjax_compress.compressors._lbgm import lbgm
from fedjax_compress.compressors._m22 import PerBitAccuracy, m22, per_bit_accuracy
from fedjax_compress.compressors._lowrank import PowerSGDState, power_sgd
from fedjax_compress.compressors._peers import (DgcState, cast, dgc, natural_compression,
                                                natural_dithering, terngrad, threshold)
from fedjax_compress.compressors._quantize import qsgd, sign_sgd
from fedjax_compress.compressors._rotated import drive, eden, rotated_uniform
from fedjax_compress.compressors._sketch import count_sketch
from fedjax_compress.compressors._sparsify import random_k, top_k
from fedjax_compress.compressors._uniform import uniform

__all__ = ["identity", "top_k", "random_k", "qsgd", "sign_sgd", "count_sketch", "power_sgd",
           "PowerSGDState", "lbgm", "laq", "slaq", "hsq", "uniform",
           "m22", "per_bit_accuracy", "PerBitAccuracy",
           "intrinsic_static", "intrinsic_k_subspace", "intrinsic_time_varying",
           "intrinsic_static_downlink", "intrinsic_k_subspace_downlink", "SubspaceCoords",
           "intrinsic_downlink_bits", "subspace_reparam", "subspace_loss", "IgcState",
           "subspace_server_tx", "subspace_client_tx", "SubspaceOptState",
           # the peers' compressors (issue 14)
           "drive", "eden", "rotated_uniform", "terngrad", "natural_compression",
           "natural_dithering", "cast", "threshold", "dgc", "DgcState", "fetchsgd",
           "FetchSGDState", "kashin"]
