// F32 / F16 / BF16 weight rows: dotted with float activations (no activation quantization)
// and converted to float for the prompt path.
#include "kernels.h"

namespace rocmforge {
namespace {

float dot_f32_scalar(const uint8_t* w, const void* act, int64_t k) {
  const float* a = static_cast<const float*>(act);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    float v;
    std::memcpy(&v, w + 4 * i, 4);
    sum += v * a[i];
  }
  return sum;
}

template <float (*Convert)(uint16_t)>
float dot_half_scalar(const uint8_t* w, const void* act, int64_t k) {
  const float* a = static_cast<const float*>(act);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    uint16_t h;
    std::memcpy(&h, w + 2 * i, 2);
    sum += Convert(h) * a[i];
  }
  return sum;
}

void dequant_f32(const uint8_t* w, float* out, int64_t k) { std::memcpy(out, w, 4 * k); }

template <float (*Convert)(uint16_t)>
void dequant_half(const uint8_t* w, float* out, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    uint16_t h;
    std::memcpy(&h, w + 2 * i, 2);
    out[i] = Convert(h);
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

// The tail (k % 32 elements) falls back to the scalar loop of the same type.
template <typename Load>
static inline float dot_float_avx2(const uint8_t* w, const float* a, int64_t k, Load load, float (*tail)(const uint8_t*, const void*, int64_t), int elem_bytes) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    acc0 = _mm256_fmadd_ps(load(w, i), _mm256_loadu_ps(a + i), acc0);
    acc1 = _mm256_fmadd_ps(load(w, i + 8), _mm256_loadu_ps(a + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(load(w, i + 16), _mm256_loadu_ps(a + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(load(w, i + 24), _mm256_loadu_ps(a + i + 24), acc3);
  }
  float sum = simd::hsum_f32x8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  if (i < k) sum += tail(w + i * elem_bytes, a + i, k - i);
  return sum;
}

float dot_f32_avx2(const uint8_t* w, const void* act, int64_t k) {
  return dot_float_avx2(
      w, static_cast<const float*>(act), k,
      [](const uint8_t* p, int64_t i) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + i); },
      dot_f32_scalar, 4);
}

float dot_f16_avx2(const uint8_t* w, const void* act, int64_t k) {
  return dot_float_avx2(
      w, static_cast<const float*>(act), k,
      [](const uint8_t* p, int64_t i) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i)));
      },
      dot_half_scalar<fp16_to_fp32>, 2);
}

float dot_bf16_avx2(const uint8_t* w, const void* act, int64_t k) {
  return dot_float_avx2(
      w, static_cast<const float*>(act), k,
      [](const uint8_t* p, int64_t i) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
      },
      dot_half_scalar<bf16_to_fp32>, 2);
}

void dequant_f16_avx2(const uint8_t* w, float* out, int64_t k) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i))));
  }
  if (i < k) dequant_half<fp16_to_fp32>(w + 2 * i, out + i, k - i);
}

}  // namespace
}  // namespace rocmforge
#pragma GCC pop_options
#define ROCMFORGE_HAVE_AVX2_FLOAT 1
#endif

namespace rocmforge {

void fill_float(KernelTable& table, Isa isa) {
  if (isa == Isa::kScalar) {
    table.types[kF32] = {ActFormat::kF32, dot_f32_scalar, dequant_f32};
    table.types[kF16] = {ActFormat::kF32, dot_half_scalar<fp16_to_fp32>, dequant_half<fp16_to_fp32>};
    table.types[kBF16] = {ActFormat::kF32, dot_half_scalar<bf16_to_fp32>, dequant_half<bf16_to_fp32>};
  }
#ifdef ROCMFORGE_HAVE_AVX2_FLOAT
  if (isa == Isa::kAvx2) {
    table.types[kF32].dot = dot_f32_avx2;
    table.types[kF16].dot = dot_f16_avx2;
    table.types[kF16].dequant = dequant_f16_avx2;
    table.types[kBF16].dot = dot_bf16_avx2;
  }
#endif
}

}  // namespace rocmforge
