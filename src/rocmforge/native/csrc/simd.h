// Helpers shared by the x86 SIMD kernels. Include only inside a `#pragma GCC target`
// region that enables at least avx2,fma,f16c (every function here is static inline, so each
// region gets its own copy compiled for its own target).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ROCMFORGE_X86 1
#else
#define ROCMFORGE_X86 0
#endif

#if ROCMFORGE_X86
namespace rocmforge::simd {

// Horizontal sum of 8 floats.
static inline float hsum_f32x8(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// Horizontal sum of 8 int32.
static inline int hsum_i32x8(__m256i v) {
  __m128i r = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
  r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 1));
  return _mm_cvtsi128_si32(r);
}

// Horizontal max of 8 floats.
static inline float hmax_f32x8(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

}  // namespace rocmforge::simd
#endif
