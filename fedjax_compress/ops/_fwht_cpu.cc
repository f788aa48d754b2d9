// Cache-blocked fast Walsh-Hadamard transform for XLA:CPU, exposed as an XLA FFI handler.
//
// y = H_n x over the last axis (unnormalized Sylvester order, H_2n = [[H, H], [H, -H]]),
// every leading axis a batch row. The butterfly stages commute, so they are regrouped for
// the memory hierarchy instead of run as log2 n full-array passes:
//   1. low bits: each contiguous block of kBlockBytes is copied from the input and
//      transformed while it sits in L1 (radix-8 on the first three stages, then radix-4 /
//      radix-2 stages whose inner loop is contiguous and vectorizes);
//   2. high bits: recursively, a length-n row is 8 (or 4, 2) sub-rows transformed first and
//      then combined by one radix-8 pass of stride n / 8. Sub-rows that fit in L2 are
//      combined there, so only the top levels stream from memory: about
//      1 + log2(n / L2) / 3 memory passes instead of log2 n for a plain butterfly.
// Built at run time by fedjax_compress/ops/_native.py.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr size_t kBlockBytes = 16 * 1024;  // L1-resident block of the low-bit pass

// One radix-2 stage of stride h over rows of `len` (len a multiple of 2h).
template <typename T>
inline void Radix2(T* __restrict x, size_t len, size_t h) {
  for (size_t i = 0; i < len; i += 2 * h) {
    T* __restrict p = x + i;
#pragma GCC ivdep
    for (size_t j = 0; j < h; ++j) {
      T a = p[j], b = p[j + h];
      p[j] = a + b;
      p[j + h] = a - b;
    }
  }
}

// Stages h and 2h at once (one read and one write of every entry).
template <typename T>
inline void Radix4(T* __restrict x, size_t len, size_t h) {
  for (size_t i = 0; i < len; i += 4 * h) {
    T* __restrict p = x + i;
#pragma GCC ivdep
    for (size_t j = 0; j < h; ++j) {
      T a = p[j], b = p[j + h], c = p[j + 2 * h], d = p[j + 3 * h];
      T s1 = a + b, d1 = a - b, s2 = c + d, d2 = c - d;
      p[j] = s1 + s2;
      p[j + h] = d1 + d2;
      p[j + 2 * h] = s1 - s2;
      p[j + 3 * h] = d1 - d2;
    }
  }
}

// Stages 1, 2 and 4 on consecutive groups of 8 entries.
template <typename T>
inline void Radix8Base(T* __restrict x, size_t len) {
  for (size_t i = 0; i < len; i += 8) {
    T* __restrict p = x + i;
    T a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
    T a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
    T b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
    T b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
    p[0] = b0 + b4;
    p[4] = b0 - b4;
    p[1] = b1 + b5;
    p[5] = b1 - b5;
    p[2] = b2 + b6;
    p[6] = b2 - b6;
    p[3] = b3 + b7;
    p[7] = b3 - b7;
  }
}

// All stages with stride < len on a contiguous block (len a power of two).
template <typename T>
void TransformBlock(T* __restrict x, size_t len) {
  size_t h = 1;
  if (len >= 8) {
    Radix8Base(x, len);
    h = 8;
  }
  for (; 4 * h <= len; h *= 4) Radix4(x, len, h);
  if (2 * h <= len) Radix2(x, len, h);
}

// Stages h, 2h and 4h at once: eight strided streams, contiguous inner loop.
template <typename T>
inline void Radix8(T* __restrict x, size_t len, size_t h) {
  for (size_t i = 0; i < len; i += 8 * h) {
    T* __restrict p = x + i;
#pragma GCC ivdep
    for (size_t j = 0; j < h; ++j) {
      T v0 = p[j], v1 = p[j + h], v2 = p[j + 2 * h], v3 = p[j + 3 * h];
      T v4 = p[j + 4 * h], v5 = p[j + 5 * h], v6 = p[j + 6 * h], v7 = p[j + 7 * h];
      T a0 = v0 + v1, a1 = v0 - v1, a2 = v2 + v3, a3 = v2 - v3;
      T a4 = v4 + v5, a5 = v4 - v5, a6 = v6 + v7, a7 = v6 - v7;
      T b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
      T b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
      p[j] = b0 + b4;
      p[j + 4 * h] = b0 - b4;
      p[j + h] = b1 + b5;
      p[j + 5 * h] = b1 - b5;
      p[j + 2 * h] = b2 + b6;
      p[j + 6 * h] = b2 - b6;
      p[j + 3 * h] = b3 + b7;
      p[j + 7 * h] = b3 - b7;
    }
  }
}

// Recursive split: transform the 2^r sub-blocks of length n / 2^r (each in cache once it is
// small enough), then combine them with one radix-2^r pass of stride n / 2^r. `src` is copied
// into `dst` block by block at the leaves, so the copy costs no extra pass.
template <typename T>
void Recurse(const T* src, T* dst, size_t n, size_t block) {
  if (n <= block) {
    if (src != dst) std::memcpy(dst, src, n * sizeof(T));
    TransformBlock(dst, n);
    return;
  }
  const size_t ratio = n / block;
  const size_t fan = ratio >= 8 ? 8 : ratio;  // 8, 4 or 2
  const size_t sub = n / fan;
  for (size_t i = 0; i < fan; ++i) Recurse(src + i * sub, dst + i * sub, sub, block);
  if (fan == 8) {
    Radix8(dst, n, sub);
  } else if (fan == 4) {
    Radix4(dst, n, sub);
  } else {
    Radix2(dst, n, sub);
  }
}

template <typename T>
void TransformRow(const T* src, T* dst, size_t n) {
  Recurse(src, dst, n, kBlockBytes / sizeof(T));
}

template <ffi::DataType D>
ffi::Error Fwht(ffi::Buffer<D> x, ffi::ResultBuffer<D> y) {
  using T = ffi::NativeType<D>;
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("fwht: input must have rank >= 1");
  const size_t n = static_cast<size_t>(dims.back());
  if (n == 0 || (n & (n - 1)) != 0)
    return ffi::Error::InvalidArgument("fwht: last axis must be a power of two");
  const size_t total = x.element_count();
  const T* src = x.typed_data();
  T* dst = y->typed_data();
  for (size_t r = 0; r < total; r += n) TransformRow(src + r, dst + r, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxFwhtF32, Fwht<ffi::F32>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxFwhtF64, Fwht<ffi::F64>,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F64>>().Ret<ffi::Buffer<ffi::F64>>());
