// Int8 weight-only matmul for XLA:CPU (an XLA FFI handler, built and loaded by ar_lm/model/cpu_kernels.py).
//
//   y[m, n] = scale[n] * sum_k x[m, k] * q[k, n]      (q int8 [K, N], "nn")
//   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]      (q int8 [N, K], "nt": a tied embedding's logits)
//
// x and y are float32 row-major; the weights are read as int8 and widened in registers, never written
// back as float32, so a decode step reads a quarter of the float32 bytes. Sums are float32 (fused
// multiply-add), one output row group of up to 4 rows at a time, so the weights are read once per group.

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// rows m0..m0+R-1 of y, columns n0..n1-1, from q [K, N]
template <int R>
void nn_block(const float* x, const int8_t* q, const float* scale, float* y, int64_t K, int64_t N, int64_t m0,
              int64_t n0, int64_t n1) {
  int64_t n = n0;
#if defined(__AVX512F__)
  for (; n + 64 <= n1; n += 64) {
    constexpr int U = R == 1 ? 4 : R == 2 ? 2 : 1;  // independent accumulator sets: more multiply-adds in flight
    __m512 acc[U][R][4];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[u][r][j] = _mm512_setzero_ps();
    const int8_t* qk = q + n;
    int64_t k = 0;
    for (; k + U <= K; k += U) {
      for (int u = 0; u < U; ++u, qk += N) {
        __m512 w[4];
        for (int j = 0; j < 4; ++j)
          w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qk + 16 * j))));
        for (int r = 0; r < R; ++r) {
          const __m512 xr = _mm512_set1_ps(x[(m0 + r) * K + k + u]);
          for (int j = 0; j < 4; ++j) acc[u][r][j] = _mm512_fmadd_ps(w[j], xr, acc[u][r][j]);
        }
      }
    }
    for (; k < K; ++k, qk += N) {
      for (int j = 0; j < 4; ++j) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qk + 16 * j))));
        for (int r = 0; r < R; ++r) acc[0][r][j] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[(m0 + r) * K + k]), acc[0][r][j]);
      }
    }
    for (int u = 1; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j) acc[0][r][j] = _mm512_add_ps(acc[0][r][j], acc[u][r][j]);
    for (int j = 0; j < 4; ++j) {
      const __m512 s = _mm512_loadu_ps(scale + n + 16 * j);
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (m0 + r) * N + n + 16 * j, _mm512_mul_ps(acc[0][r][j], s));
    }
  }
#endif
  for (; n < n1; ++n) {
    float acc[R] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float w = static_cast<float>(q[k * N + n]);
      for (int r = 0; r < R; ++r) acc[r] += x[(m0 + r) * K + k] * w;
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = acc[r] * scale[n];
  }
}

// rows m0..m0+R-1 of y, columns n0..n1-1, from q [N, K]
template <int R>
void nt_block(const float* x, const int8_t* q, const float* scale, float* y, int64_t K, int64_t N, int64_t m0,
              int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qn = q + n * K;
    float acc[R] = {};
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 vacc[R];
    for (int r = 0; r < R; ++r) vacc[r] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qn + k))));
      for (int r = 0; r < R; ++r) vacc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (m0 + r) * K + k), vacc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_ps(vacc[r]);
#endif
    for (; k < K; ++k) {
      const float w = static_cast<float>(qn[k]);
      for (int r = 0; r < R; ++r) acc[r] += x[(m0 + r) * K + k] * w;
    }
    for (int r = 0; r < R; ++r) y[(m0 + r) * N + n] = acc[r] * scale[n];
  }
}

// Work is cut into column chunks, the tasks of `parallel_for`.
struct Work {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t M, K, N, chunk;
  bool nt;
};

template <int R>
void rows(const Work& w, int64_t m0, int64_t n0, int64_t n1) {
  (w.nt ? nt_block<R> : nn_block<R>)(w.x, w.q, w.scale, w.y, w.K, w.N, m0, n0, n1);
}

void run_chunk(const Work& w, int64_t c) {
  const int64_t n0 = c * w.chunk, n1 = std::min(w.N, n0 + w.chunk);
  int64_t m = 0;
  for (; m + 4 <= w.M; m += 4) rows<4>(w, m, n0, n1);
  switch (w.M - m) {
    case 3: rows<3>(w, m, n0, n1); break;
    case 2: rows<2>(w, m, n0, n1); break;
    case 1: rows<1>(w, m, n0, n1); break;
    default: break;
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  const auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2) return ffi::Error::InvalidArgument("int8_matmul: x and q must be 2-D");
  const int64_t M = xd[0], K = xd[1];
  const int64_t N = transposed ? qd[0] : qd[1];
  if ((transposed ? qd[1] : qd[0]) != K || static_cast<int64_t>(scale.element_count()) != N)
    return ffi::Error::InvalidArgument("int8_matmul: shapes do not match");
  const int64_t chunk = transposed ? 16 : 64;
  const Work w{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), M, K, N, chunk, transposed};
  ar_lm::parallel_for(pool, (N + chunk - 1) / chunk, [w](int64_t c) { run_chunk(w, c); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArLmInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
