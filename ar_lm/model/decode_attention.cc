// KV-cache attention for XLA:CPU decode steps (an XLA FFI handler, built and loaded by ar_lm/model/cpu_kernels.py).
//
//   out[b, l, h] = sum_s p[s] v[layer, b, h/G, s],   p = softmax_s(q[b, l, h] . k[layer, b, h/G, s] / sqrt(Dh))
//
// over the slots s with 0 <= kv_pos[b, s] <= q_pos[b, l] (ar_lm.model.attention.attention_mask); a query that
// sees no slot averages all S, as the masked softmax of xla_attention does. The handler reads slice `layer`
// of the whole cache [layers, B, K, S, Dh] where it lies, and only its valid slots: XLA copies the slice
// (all S slots) before its matmuls. float32 throughout, one (b, kv head) pair per task over XLA's threads.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu_pool.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float acc = 0.0f;
#if defined(__AVX512F__)
  __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
  for (; d + 32 <= n; d += 32) {
    v0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), v0);
    v1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), v1);
  }
  for (; d + 16 <= n; d += 16) v0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), v0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
#endif
  for (; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

#if defined(__AVX512F__)
// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n)
__m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// p[i] = exp(p[i] - m) for i < n; returns their sum
float exp_shifted(float* p, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vsum = _mm512_setzero_ps();
  for (; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p + i), vm));
    _mm512_mask_storeu_ps(p + i, lanes, e);
    vsum = _mm512_mask_add_ps(vsum, lanes, vsum, e);
  }
  sum = _mm512_reduce_add_ps(vsum);
#endif
  for (; i < n; ++i) sum += (p[i] = std::exp(p[i] - m));
  return sum;
}

struct Work {
  const float *q, *k, *v;  // q [B, L, H, Dh]; k, v: slice `layer` of [layers, B, K, S, Dh]
  const int32_t *q_pos, *kv_pos;  // [B, L], [B, S]
  float* out;  // [B, L, H, Dh]
  int64_t B, L, H, K, S, Dh;
};

// every query head of kv head kh in row b, at every query position
void run_task(const Work& w, int64_t task) {
  thread_local std::vector<int32_t> slots;  // the slots query l sees
  thread_local std::vector<float> p;  // their scores, then probabilities
  const int64_t b = task / w.K, kh = task % w.K, G = w.H / w.K, Dh = w.Dh, S = w.S;
  const float* k = w.k + (b * w.K + kh) * S * Dh;
  const float* v = w.v + (b * w.K + kh) * S * Dh;
  const int32_t* kv_pos = w.kv_pos + b * S;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  for (int64_t l = 0; l < w.L; ++l) {
    const int32_t q_pos = w.q_pos[b * w.L + l];
    slots.clear();
    for (int32_t s = 0; s < S; ++s)
      if (kv_pos[s] >= 0 && kv_pos[s] <= q_pos) slots.push_back(s);
    const bool none = slots.empty();  // the masked softmax is uniform over all S slots then
    if (none)
      for (int32_t s = 0; s < S; ++s) slots.push_back(s);
    const int64_t n = static_cast<int64_t>(slots.size());
    p.resize(n);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = kh * G + g;
      const float* qh = w.q + ((b * w.L + l) * w.H + h) * Dh;
      float* o = w.out + ((b * w.L + l) * w.H + h) * Dh;
      float m = -INFINITY;
      for (int64_t i = 0; i < n; ++i) {
        p[i] = none ? 0.0f : dot(qh, k + slots[i] * Dh, Dh) * scale;
        m = std::max(m, p[i]);
      }
      const float inv = 1.0f / exp_shifted(p.data(), n, m);
      std::fill(o, o + Dh, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        const float* vs = v + slots[i] * Dh;
        const float pi = p[i] * inv;
        for (int64_t d = 0; d < Dh; ++d) o[d] += pi * vs[d];
      }
    }
  }
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                               ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> layer,
                               ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), cd = k_cache.dimensions();
  if (qd.size() != 4 || cd.size() != 5 || v_cache.dimensions().size() != 5)
    return ffi::Error::InvalidArgument("decode_attention: q must be 4-D and the caches 5-D");
  Work w;
  w.B = qd[0], w.L = qd[1], w.H = qd[2], w.Dh = qd[3];
  w.K = cd[2], w.S = cd[3];
  const int64_t n_layers = cd[0], at = *layer.typed_data();
  if (cd[1] != w.B || cd[4] != w.Dh || w.K == 0 || w.H % w.K != 0 || at < 0 || at >= n_layers ||
      static_cast<int64_t>(q_pos.element_count()) != w.B * w.L ||
      static_cast<int64_t>(kv_pos.element_count()) != w.B * w.S)
    return ffi::Error::InvalidArgument("decode_attention: shapes do not match");
  const int64_t layer_size = w.B * w.K * w.S * w.Dh;
  w.q = q.typed_data();
  w.k = k_cache.typed_data() + at * layer_size;
  w.v = v_cache.typed_data() + at * layer_size;
  w.q_pos = q_pos.typed_data();
  w.kv_pos = kv_pos.typed_data();
  w.out = out->typed_data();
  ar_lm::parallel_for(pool, w.B * w.K, [w](int64_t task) { run_task(w, task); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ArLmDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
