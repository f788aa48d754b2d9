"""fedjax_compress: communication-efficient federated learning in JAX.

Compressors are pure `(init, encode, decode[, aggregate])` tuples over parameter pytrees;
bits are derived from the payload's `Field`s and match `wire.pack(..., raw=True)` byte for byte.
"""

from fedjax_compress import bits, checkpoint, compressors, wire
from fedjax_compress._src.adapters import (CompressedMeanState, CompressedTransformationState,
                                           as_transformation, compressed_mean, weighted_decode)
from fedjax_compress._src.base import Compressor, EmptyState, Field, Keys
from fedjax_compress._src.combinators import ErrorFeedbackState, error_feedback, flattened
from fedjax_compress._src.host import tune_cpu_allocator
from fedjax_compress._src.keys import round_keys

__version__ = "0.1.0"

__all__ = [
    "Compressor", "Keys", "Field", "EmptyState",
    "as_transformation", "compressed_mean", "weighted_decode",
    "CompressedTransformationState", "CompressedMeanState",
    "error_feedback", "flattened", "ErrorFeedbackState",
    "round_keys", "bits", "wire", "compressors", "checkpoint", "tune_cpu_allocator",
]
