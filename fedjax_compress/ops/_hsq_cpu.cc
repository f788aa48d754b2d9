// HSQ greedy codeword search and decode for XLA:CPU, exposed as XLA FFI handlers.
//
// Input: x[rows, numel] float32 (every leading axis a batch row) and an int32 exponent t[rows];
// attributes: the codebook c[K, dc] (row-major, `codebook`) and K (`size`). Per row, the entries
// are scaled by 2^-t (exactly: one multiply where 2^-t is a normal float, else two) and cut into
// n = ceil(numel / dc) chunks, the last one zero-padded in registers. Per chunk i:
//   k_i = the lowest k with |p_ik| = max_j |p_ij|,  p_ik = <c_k, 2^-t x_i> (float32, one FMA
//         chain in coordinate order),          u_i = p_{i k_i}.
// Rows with a non-finite entry or an infinite score get k = K-1, u = p_{i,K-1} (as the XLA
// key search, where such keys are NaN or the infinite key of K-1).
//
// SIMD across chunks: 16 chunks sit in the lanes of dc vectors X_j (lane l: entry j of chunk l);
// each codeword is dc FMAs with broadcast coefficients (the codebook stays in L1), four codewords
// at a time for independent FMA chains; the running best |p|, p and k are kept per lane with
// compare-and-select. Chunk ranges are spread over XLA's intra-op thread pool.
//
// Decode: y[..., numel] with y[i dc + j] = sat((l_i c[k_i, j]) s) written straight into the
// leaf's entries (no [n, dc] gather and slice).
// Built at run time by fedjax_compress/ops/_hsq_native.py.

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;
constexpr int kMaxDc = 64;              // chunk sizes above this use the scalar loop
constexpr size_t kUnitChunks = 8192;   // chunks per scheduled work unit

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

struct Params {
  const float* cb;  // [K, dc]
  int size;         // K
  int dc;
};

inline vf Splat(float v) { return vf{} + v; }
inline vi SplatI(int32_t v) { return vi{} + v; }

inline vf Abs(vf v) {
  vi b;
  std::memcpy(&b, &v, sizeof(b));
  b &= 0x7fffffff;
  std::memcpy(&v, &b, sizeof(b));
  return v;
}

// One group of `lanes` (<= 16) consecutive chunks starting at `x`; `avail` entries are readable.
template <int DC>
void SearchGroup(const Params& p, const float* x, size_t avail, float m1, float m2, int lanes,
                 int32_t* kout, float* uout) {
  const int dc = DC > 0 ? DC : p.dc;
  const int size = p.size;
  const float* cb = p.cb;
  alignas(64) float buf[(DC > 0 ? DC : kMaxDc) * kLanes];
  if (lanes == kLanes && avail >= static_cast<size_t>(kLanes) * dc) {
    for (int l = 0; l < kLanes; ++l)
      for (int j = 0; j < dc; ++j) buf[j * kLanes + l] = x[l * dc + j];
  } else {
    for (int l = 0; l < kLanes; ++l)
      for (int j = 0; j < dc; ++j) {
        const size_t e = static_cast<size_t>(l) * dc + j;
        buf[j * kLanes + l] = (l < lanes && e < avail) ? x[e] : 0.0f;
      }
  }
  vf xs[DC > 0 ? DC : kMaxDc];
  vf fin = vf{};
  const vf s1 = Splat(m1), s2 = Splat(m2);
  for (int j = 0; j < dc; ++j) {
    vf v;
    std::memcpy(&v, buf + j * kLanes, sizeof(v));
    v = (v * s1) * s2;  // exact: powers of two, the result in [0, 2) in magnitude
    xs[j] = v;
    fin += v - v;       // NaN iff some entry is NaN or infinite
  }
  vf best_a = Splat(-1.0f), best_p = vf{};
  vi best_k = vi{};
  auto take = [&](vf s, int k) {
    const vf a = Abs(s);
    const vi m = a > best_a;
    best_a = m ? a : best_a;
    best_p = m ? s : best_p;
    best_k = m ? SplatI(k) : best_k;
  };
  int k = 0;
  for (; k + 4 <= size; k += 4) {
    const float* c0 = cb + static_cast<size_t>(k) * dc;
    vf p0 = xs[0] * c0[0], p1 = xs[0] * c0[dc], p2 = xs[0] * c0[2 * dc], p3 = xs[0] * c0[3 * dc];
    for (int j = 1; j < dc; ++j) {
      p0 += xs[j] * c0[j];
      p1 += xs[j] * c0[dc + j];
      p2 += xs[j] * c0[2 * dc + j];
      p3 += xs[j] * c0[3 * dc + j];
    }
    take(p0, k);
    take(p1, k + 1);
    take(p2, k + 2);
    take(p3, k + 3);
  }
  auto score = [&](int kk) {
    const float* c = cb + static_cast<size_t>(kk) * dc;
    vf s = xs[0] * c[0];
    for (int j = 1; j < dc; ++j) s += xs[j] * c[j];
    return s;
  };
  for (; k < size; ++k) take(score(k), k);
  const vi bad = (fin != fin) | (best_a == Splat(std::numeric_limits<float>::infinity()));
  bool any_bad = false;
  for (int l = 0; l < kLanes; ++l) any_bad |= bad[l] != 0;
  if (any_bad) {
    const vf last = score(size - 1);
    best_p = bad ? last : best_p;
    best_k = bad ? SplatI(size - 1) : best_k;
  }
  if (lanes == kLanes) {
    std::memcpy(kout, &best_k, sizeof(best_k));
    std::memcpy(uout, &best_p, sizeof(best_p));
  } else {
    for (int l = 0; l < lanes; ++l) {
      kout[l] = best_k[l];
      uout[l] = best_p[l];
    }
  }
}

// Plain loop for chunks longer than kMaxDc (same semantics, one chunk at a time).
void SearchScalar(const Params& p, const float* x, size_t avail, float m1, float m2, int lanes,
                  int32_t* kout, float* uout) {
  const int dc = p.dc;
  for (int l = 0; l < lanes; ++l) {
    const float* xc = x + static_cast<size_t>(l) * dc;
    const size_t have = avail > static_cast<size_t>(l) * dc ? avail - static_cast<size_t>(l) * dc : 0;
    bool bad = false;
    float best_a = -1.0f, best_p = 0.0f, last = 0.0f;
    int32_t best_k = 0;
    for (int k = 0; k < p.size; ++k) {
      const float* c = p.cb + static_cast<size_t>(k) * dc;
      float s = 0.0f;
      for (int j = 0; j < dc; ++j) {
        const float v = static_cast<size_t>(j) < have ? (xc[j] * m1) * m2 : 0.0f;
        if (k == 0 && !std::isfinite(v)) bad = true;
        s = j == 0 ? v * c[0] : std::fma(v, c[j], s);
      }
      if (std::fabs(s) > best_a) {
        best_a = std::fabs(s);
        best_p = s;
        best_k = k;
      }
      last = s;
    }
    if (bad || std::isinf(best_a)) {
      best_k = p.size - 1;
      best_p = last;
    }
    kout[l] = best_k;
    uout[l] = best_p;
  }
}

using GroupFn = void (*)(const Params&, const float*, size_t, float, float, int, int32_t*, float*);

GroupFn PickGroup(int dc) {
  switch (dc) {
    case 4: return SearchGroup<4>;
    case 8: return SearchGroup<8>;
    case 16: return SearchGroup<16>;
    default: return dc <= kMaxDc ? SearchGroup<0> : SearchScalar;
  }
}

// 2^-t as two normal floats whose product is exact (t in [-149, 128) covers every input).
inline void Multipliers(int32_t t, float* m1, float* m2) {
  const int e = -t;
  const int a = e / 2, b = e - a;
  *m1 = std::ldexp(1.0f, a);
  *m2 = std::ldexp(1.0f, b);
  if (e >= -126 && e <= 127) {  // one normal factor: a single rounding, as x / 2^t
    *m1 = std::ldexp(1.0f, e);
    *m2 = 1.0f;
  }
}

// Runs fn(unit) for unit in [0, units) on the caller and up to num_threads - 1 pool threads.
// Workers claim units through `next`; one that starts after the work is gone touches nothing,
// so the caller waits only for units already being processed (no deadlock when the pool is busy).
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, size_t units, F fn) {
  struct State {
    explicit State(F f) : fn(std::move(f)) {}
    F fn;
    std::atomic<size_t> next{0}, done{0};
    size_t units = 0;
    void Drain() {
      for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn));
  state->units = units;
  const int64_t threads = units > 1 ? pool.num_threads() : 0;
  for (int64_t h = 1; h < threads && static_cast<size_t>(h) < units; ++h)
    pool.Schedule([state] { state->Drain(); });
  state->Drain();
  while (state->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
}

ffi::Error Search(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> t,
                  ffi::Span<const float> codebook, int32_t size,
                  ffi::ResultBuffer<ffi::S32> kout, ffi::ResultBuffer<ffi::F32> uout) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("hsq_search: x must have rank >= 1");
  if (size < 1 || codebook.size() == 0 || codebook.size() % static_cast<size_t>(size) != 0)
    return ffi::Error::InvalidArgument("hsq_search: codebook is not [size, dc]");
  const size_t numel = static_cast<size_t>(dims.back());
  const size_t rows = numel ? x.element_count() / numel : 0;
  const int dc = static_cast<int>(codebook.size() / size);
  const size_t n = (numel + dc - 1) / dc;
  if (t.element_count() != rows) return ffi::Error::InvalidArgument("hsq_search: t is not [rows]");
  if (kout->element_count() != rows * n || uout->element_count() != rows * n)
    return ffi::Error::InvalidArgument("hsq_search: outputs are not [rows, ceil(numel / dc)]");
  if (rows * n == 0) return ffi::Error::Success();
  const Params p{codebook.begin(), size, dc};
  const GroupFn fn = PickGroup(dc);
  const float* xd = x.typed_data();
  const int32_t* td = t.typed_data();
  int32_t* kd = kout->typed_data();
  float* ud = uout->typed_data();
  const size_t per_row = (n + kUnitChunks - 1) / kUnitChunks;
  ParallelFor(pool, rows * per_row, [=](size_t unit) {
    const size_t row = unit / per_row;
    const size_t c0 = (unit % per_row) * kUnitChunks;
    const size_t c1 = c0 + kUnitChunks < n ? c0 + kUnitChunks : n;
    float m1, m2;
    Multipliers(td[row], &m1, &m2);
    const float* xr = xd + row * numel;
    for (size_t c = c0; c < c1; c += kLanes) {
      const int lanes = static_cast<int>(c1 - c < kLanes ? c1 - c : kLanes);
      const size_t off = c * dc;
      fn(p, xr + off, numel - off, m1, m2, lanes, kd + row * n + c, ud + row * n + c);
    }
  });
  return ffi::Error::Success();
}

// y[i dc + j] = sat((l_i c[k_i, j]) s) for the entries j of chunk i below numel (k clamped to
// [0, K-1] as XLA's gather; sat: clip to float32's range where s is finite).
template <int DC, typename I, typename L>
void DecodeRange(const float* cb, int size, int dcr, const I* k, const L* l, float s, size_t c0,
                 size_t c1, size_t numel, float* y) {
  const int dc = DC > 0 ? DC : dcr;
  const float big = std::numeric_limits<float>::max();
  const bool sat = std::isfinite(s);
  const size_t full = numel / dc;  // chunks with all dc entries inside the row
  for (size_t i = c0; i < c1; ++i) {
    int64_t ki = static_cast<int64_t>(k[i]);
    ki = ki < 0 ? 0 : (ki >= size ? size - 1 : ki);
    const float* c = cb + ki * dc;
    const float li = static_cast<float>(l[i]);
    float* yi = y + i * dc;
    const int m = i < full ? dc : static_cast<int>(numel - i * dc);
    if (sat) {
      for (int j = 0; j < m; ++j) {
        const float v = (li * c[j]) * s;
        yi[j] = v > big ? big : (v < -big ? -big : v);
      }
    } else {
      for (int j = 0; j < m; ++j) yi[j] = (li * c[j]) * s;
    }
  }
}

template <typename I, typename L>
ffi::Error DecodeTyped(ffi::ThreadPool& pool, const I* k, const L* l, const float* s,
                       const float* cb, int size, int dc, size_t rows, size_t n, size_t numel,
                       float* y) {
  using Fn = void (*)(const float*, int, int, const I*, const L*, float, size_t, size_t, size_t,
                      float*);
  const Fn fn = dc == 8 ? DecodeRange<8, I, L> : (dc == 16 ? DecodeRange<16, I, L>
                                                           : DecodeRange<0, I, L>);
  constexpr size_t kDecodeChunks = 4 * kUnitChunks;
  const size_t per_row = (n + kDecodeChunks - 1) / kDecodeChunks;
  ParallelFor(pool, rows * per_row, [=](size_t unit) {
    const size_t row = unit / per_row;
    const size_t c0 = (unit % per_row) * kDecodeChunks;
    const size_t c1 = c0 + kDecodeChunks < n ? c0 + kDecodeChunks : n;
    fn(cb, size, dc, k + row * n, l + row * n, s[row], c0, c1, numel, y + row * numel);
  });
  return ffi::Error::Success();
}

template <typename I>
ffi::Error DecodeLevels(ffi::ThreadPool& pool, const I* k, ffi::AnyBuffer l, const float* s,
                        const float* cb, int size, int dc, size_t rows, size_t n, size_t numel,
                        float* y) {
  switch (l.element_type()) {
    case ffi::S8:
      return DecodeTyped(pool, k, l.typed_data<int8_t>(), s, cb, size, dc, rows, n, numel, y);
    case ffi::S16:
      return DecodeTyped(pool, k, l.typed_data<int16_t>(), s, cb, size, dc, rows, n, numel, y);
    case ffi::F32:
      return DecodeTyped(pool, k, l.typed_data<float>(), s, cb, size, dc, rows, n, numel, y);
    default:
      return ffi::Error::InvalidArgument("hsq_decode: levels must be int8, int16 or float32");
  }
}

ffi::Error Decode(ffi::ThreadPool pool, ffi::AnyBuffer k, ffi::AnyBuffer l,
                  ffi::Buffer<ffi::F32> s, ffi::Span<const float> codebook, int32_t size,
                  ffi::ResultBuffer<ffi::F32> y) {
  if (size < 1 || codebook.size() == 0 || codebook.size() % static_cast<size_t>(size) != 0)
    return ffi::Error::InvalidArgument("hsq_decode: codebook is not [size, dc]");
  auto ydims = y->dimensions();
  auto kdims = k.dimensions();
  if (ydims.size() == 0 || kdims.size() != ydims.size())
    return ffi::Error::InvalidArgument("hsq_decode: y and k must be [..., numel], [..., n]");
  const int dc = static_cast<int>(codebook.size() / size);
  const size_t numel = static_cast<size_t>(ydims.back());
  const size_t n = static_cast<size_t>(kdims.back());
  const size_t rows = numel ? y->element_count() / numel : 0;
  if (n != (numel + dc - 1) / dc || k.element_count() != rows * n ||
      l.element_count() != rows * n || s.element_count() != rows)
    return ffi::Error::InvalidArgument("hsq_decode: shapes of k, levels, scale and y differ");
  if (rows * numel == 0) return ffi::Error::Success();
  const float* cb = codebook.begin();
  float* yd = y->typed_data();
  const float* sd = s.typed_data();
  switch (k.element_type()) {
    case ffi::U8:
      return DecodeLevels(pool, k.typed_data<uint8_t>(), l, sd, cb, size, dc, rows, n, numel, yd);
    case ffi::U16:
      return DecodeLevels(pool, k.typed_data<uint16_t>(), l, sd, cb, size, dc, rows, n, numel, yd);
    case ffi::S32:
      return DecodeLevels(pool, k.typed_data<int32_t>(), l, sd, cb, size, dc, rows, n, numel, yd);
    default:
      return ffi::Error::InvalidArgument("hsq_decode: indices must be uint8, uint16 or int32");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxHsqSearchF32, Search,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<ffi::Span<const float>>("codebook")
                                  .Attr<int32_t>("size")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxHsqDecodeF32, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const float>>("codebook")
                                  .Attr<int32_t>("size")
                                  .Ret<ffi::Buffer<ffi::F32>>());
