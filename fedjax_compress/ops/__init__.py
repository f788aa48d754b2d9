"""Structured linear operators: fast Walsh-Hadamard transform and Fastfood projections."""

from fedjax_compress.ops._fastfood import (FastfoodParams, fastfood_gram, fastfood_params,
                                           fastfood_project, fastfood_transpose,
                                           feistel_permutation)
from fedjax_compress.ops._hadamard import default_method, fwht

__all__ = ["fwht", "default_method", "FastfoodParams", "fastfood_params", "fastfood_project",
           "fastfood_transpose", "fastfood_gram", "feistel_permutation"]
