// Activations -> BlockQ8 / BlockQ8K (kernels.h). The scalar and SIMD versions give the same
// bits: the block maximum, d = max / 127, 1 / d, x * (1 / d) and round-to-nearest-even are
// each one IEEE operation in both.
#include <cmath>

#include "kernels.h"

namespace rocmforge {

// BlockQ8K's dsums from its d and bsums (one float product each, the same in every version).
inline void set_dsums(BlockQ8K& y) {
  for (int j = 0; j < kQKK / 32; ++j) y.dsums[j] = y.d * static_cast<float>(y.bsums[2 * j] + y.bsums[2 * j + 1]);
}

namespace {

void quantize_q8_scalar(const float* x, void* out, int64_t k) {
  auto* y = static_cast<BlockQ8*>(out);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float* xb = x + b * kQK;
    float amax = 0.0f;
    for (int i = 0; i < kQK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int i = 0; i < kQK; ++i) {
      const int q = static_cast<int>(std::nearbyint(xb[i] * id));
      y[b].qs[i] = static_cast<int8_t>(q);
      sum += q;
    }
    y[b].d = d;
    y[b].s = d * static_cast<float>(sum);
  }
}

void quantize_q8k_scalar(const float* x, void* out, int64_t k) {
  auto* y = static_cast<BlockQ8K*>(out);
  for (int64_t b = 0; b < k / kQKK; ++b) {
    const float* xb = x + b * kQKK;
    float amax = 0.0f;
    for (int i = 0; i < kQKK; ++i) amax = std::fmax(amax, std::fabs(xb[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int g = 0; g < kQKK / 16; ++g) {
      int sum = 0;
      for (int i = 16 * g; i < 16 * g + 16; ++i) {
        const int q = static_cast<int>(std::nearbyint(xb[i] * id));
        y[b].qs[i] = static_cast<int8_t>(q);
        sum += q;
      }
      y[b].bsums[g] = static_cast<int16_t>(sum);
    }
    y[b].d = d;
    set_dsums(y[b]);
  }
}

}  // namespace
}  // namespace rocmforge

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "simd.h"

namespace rocmforge {
namespace {

// 32 floats at x, scaled by id and rounded -> 32 int8 at q; returns their sum.
static inline int quantize32_avx2(const float* x, __m256 id, int8_t* q, int* partial16) {
  __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (partial16 != nullptr) {
    partial16[0] = simd::hsum_i32x8(_mm256_add_epi32(i0, i1));
    partial16[1] = simd::hsum_i32x8(_mm256_add_epi32(i2, i3));
  }
  const int sum = simd::hsum_i32x8(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
  // int32 -> int16 -> int8 packs interleave 128-bit lanes; the permute restores the order.
  __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
  return sum;
}

static inline float absmax_avx2(const float* x, int n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  return simd::hmax_f32x8(m);
}

void quantize_q8_avx2(const float* x, void* out, int64_t k) {
  auto* y = static_cast<BlockQ8*>(out);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float* xb = x + b * kQK;
    const float d = absmax_avx2(xb, kQK) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const int sum = quantize32_avx2(xb, _mm256_set1_ps(id), y[b].qs, nullptr);
    y[b].d = d;
    y[b].s = d * static_cast<float>(sum);
  }
}

void quantize_q8k_avx2(const float* x, void* out, int64_t k) {
  auto* y = static_cast<BlockQ8K*>(out);
  for (int64_t b = 0; b < k / kQKK; ++b) {
    const float* xb = x + b * kQKK;
    const float d = absmax_avx2(xb, kQKK) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    for (int j = 0; j < kQKK / 32; ++j) {
      int partial[2];
      quantize32_avx2(xb + 32 * j, vid, y[b].qs + 32 * j, partial);
      y[b].bsums[2 * j] = static_cast<int16_t>(partial[0]);
      y[b].bsums[2 * j + 1] = static_cast<int16_t>(partial[1]);
    }
    y[b].d = d;
    set_dsums(y[b]);
  }
}

}  // namespace
}  // namespace rocmforge
#pragma GCC pop_options
#define ROCMFORGE_HAVE_AVX2_QUANTIZE 1
#endif

namespace rocmforge {

void fill_quantize(KernelTable& table, Isa isa) {
  if (isa == Isa::kScalar) {
    table.quantize_q8 = quantize_q8_scalar;
    table.quantize_q8k = quantize_q8k_scalar;
  }
#ifdef ROCMFORGE_HAVE_AVX2_QUANTIZE
  if (isa == Isa::kAvx2) {
    table.quantize_q8 = quantize_q8_avx2;
    table.quantize_q8k = quantize_q8k_avx2;
  }
#endif
}

}  // namespace rocmforge
