// The 32-element legacy types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) against BlockQ8 activations.
//
// Per block the integer sum isum = sum_i q_i * a_i is exact (q_i the signed code: Q4_0's
// nibble - 8, Q5_0's 5-bit code - 16, Q8_0's int8; the unsigned code for Q4_1 / Q5_1), and
// the block adds (d_w * d_a) * isum, plus m_w * s_a for the offset types. The SIMD versions
// (legacy_x86.inc, compiled once per instruction set below) compute the same per-block
// values and differ only in the order blocks are summed.
#include <type_traits>

#include "kernels.h"

namespace rocmforge {
namespace {

// Element j (0..31) of a 4-bit block: low nibbles hold 0..15, high nibbles 16..31.
inline int nibble(const uint8_t* qs, int j) { return j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4); }
inline int high_bit(const uint8_t* qh, int j) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  return static_cast<int>((bits >> j) & 1u);
}

float dot_q4_0_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_0*>(w);
  const auto* y = static_cast<const BlockQ8*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK; ++j) isum += (nibble(x[b].qs, j) - 8) * y[b].qs[j];
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(isum);
  }
  return sum;
}

float dot_q4_1_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_1*>(w);
  const auto* y = static_cast<const BlockQ8*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK; ++j) isum += nibble(x[b].qs, j) * y[b].qs[j];
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(isum) + fp16_to_fp32(x[b].m) * y[b].s;
  }
  return sum;
}

float dot_q5_0_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_0*>(w);
  const auto* y = static_cast<const BlockQ8*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK; ++j) isum += ((nibble(x[b].qs, j) | (high_bit(x[b].qh, j) << 4)) - 16) * y[b].qs[j];
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(isum);
  }
  return sum;
}

float dot_q5_1_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_1*>(w);
  const auto* y = static_cast<const BlockQ8*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK; ++j) isum += (nibble(x[b].qs, j) | (high_bit(x[b].qh, j) << 4)) * y[b].qs[j];
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(isum) + fp16_to_fp32(x[b].m) * y[b].s;
  }
  return sum;
}

float dot_q8_0_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ8_0*>(w);
  const auto* y = static_cast<const BlockQ8*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b) {
    int isum = 0;
    for (int j = 0; j < kQK; ++j) isum += x[b].qs[j] * y[b].qs[j];
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(isum);
  }
  return sum;
}

// Dequantization: x = d * q (+ m), in the order of gguf-py's reference (d * q, then + m).
void dequant_q4_0(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_0*>(w);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < kQK; ++j) out[b * kQK + j] = d * static_cast<float>(nibble(x[b].qs, j) - 8);
  }
}

void dequant_q4_1(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_1*>(w);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    for (int j = 0; j < kQK; ++j) out[b * kQK + j] = d * static_cast<float>(nibble(x[b].qs, j)) + m;
  }
}

void dequant_q5_0(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_0*>(w);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < kQK; ++j) {
      out[b * kQK + j] = d * static_cast<float>((nibble(x[b].qs, j) | (high_bit(x[b].qh, j) << 4)) - 16);
    }
  }
}

void dequant_q5_1(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_1*>(w);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float d = fp16_to_fp32(x[b].d), m = fp16_to_fp32(x[b].m);
    for (int j = 0; j < kQK; ++j) {
      out[b * kQK + j] = d * static_cast<float>(nibble(x[b].qs, j) | (high_bit(x[b].qh, j) << 4)) + m;
    }
  }
}

void dequant_q8_0(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ8_0*>(w);
  for (int64_t b = 0; b < k / kQK; ++b) {
    const float d = fp16_to_fp32(x[b].d);
    for (int j = 0; j < kQK; ++j) out[b * kQK + j] = d * static_cast<float>(x[b].qs[j]);
  }
}

}  // namespace
}  // namespace rocmforge

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#ifndef __clang__
#pragma GCC optimize("fp-contract=off")  // round d * isum before adding, as the scalar code does
#endif
#include "simd.h"

namespace rocmforge {
namespace {
namespace avx2 {

static inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
// The pair sums of u * s and off * s stay below 2^13, so the int16 difference is exact.
static inline __m256i dot_u8s8_offset(__m256i u, __m256i off, __m256i s) {
  const __m256i pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(u, s), _mm256_maddubs_epi16(off, s));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

#include "legacy_x86.inc"

// One block's 32 codes (bytes, all within int8) -> d * q, then + m, at out: the scalar
// code's operations, so the same bits.
template <bool kAddMin>
static inline void store_block(float* out, __m256i q, float d, float m) {
  const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
  const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
  for (int h = 0; h < 2; ++h) {
    for (int e = 0; e < 2; ++e) {
      const __m128i bytes = e == 0 ? halves[h] : _mm_srli_si128(halves[h], 8);
      __m256 v = _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
      if (kAddMin) v = _mm256_add_ps(v, vm);
      _mm256_storeu_ps(out + 16 * h + 8 * e, v);
    }
  }
}

template <typename Block>
void dequant_legacy(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const Block*>(w);
  for (int64_t b = 0; b < k / kQK; ++b) {
    if constexpr (kHasMin<Block>) {
      store_block<true>(out + b * kQK, codes(x[b]), fp16_to_fp32(x[b].d), fp16_to_fp32(x[b].m));
    } else {
      const __m256i q = _mm256_sub_epi8(codes(x[b]), _mm256_set1_epi8(kOffset<Block>));
      store_block<false>(out + b * kQK, q, fp16_to_fp32(x[b].d), 0.0f);
    }
  }
}

}  // namespace avx2
}  // namespace
}  // namespace rocmforge
#pragma GCC pop_options
#define ROCMFORGE_HAVE_AVX2_LEGACY 1

// AVX-VNNI needs GCC 11 / clang 12.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#ifndef __clang__
#pragma GCC optimize("fp-contract=off")  // round d * isum before adding, as the scalar code does
#endif
namespace rocmforge {
namespace {
namespace avx2_vnni {

static inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
}
static inline __m256i dot_u8s8_offset(__m256i u, __m256i off, __m256i s) {
  return _mm256_sub_epi32(dot_u8s8(u, s), dot_u8s8(off, s));
}

#include "legacy_x86.inc"

}  // namespace avx2_vnni
}  // namespace
}  // namespace rocmforge
#pragma GCC pop_options
#define ROCMFORGE_HAVE_AVX2_VNNI_LEGACY 1
#endif

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#ifndef __clang__
#pragma GCC optimize("fp-contract=off")  // round d * isum before adding, as the scalar code does
#endif
namespace rocmforge {
namespace {
namespace avx512_vnni {

// The EVEX form of vpdpbusd on 256-bit vectors.
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}
static inline __m256i dot_u8s8_offset(__m256i u, __m256i off, __m256i s) {
  return _mm256_sub_epi32(dot_u8s8(u, s), dot_u8s8(off, s));
}

#include "legacy_x86.inc"

}  // namespace avx512_vnni
}  // namespace
}  // namespace rocmforge
#pragma GCC pop_options
#define ROCMFORGE_HAVE_AVX512_VNNI_LEGACY 1
#endif

namespace rocmforge {

void fill_legacy(KernelTable& table, Isa isa) {
  if (isa == Isa::kScalar) {
    table.types[kQ4_0] = {ActFormat::kQ8, dot_q4_0_scalar, dequant_q4_0};
    table.types[kQ4_1] = {ActFormat::kQ8, dot_q4_1_scalar, dequant_q4_1};
    table.types[kQ5_0] = {ActFormat::kQ8, dot_q5_0_scalar, dequant_q5_0};
    table.types[kQ5_1] = {ActFormat::kQ8, dot_q5_1_scalar, dequant_q5_1};
    table.types[kQ8_0] = {ActFormat::kQ8, dot_q8_0_scalar, dequant_q8_0};
  }
#ifdef ROCMFORGE_HAVE_AVX2_LEGACY
  // The VNNI tables start as copies of this one: they keep its dequantizers.
  if (isa == Isa::kAvx2) {
    avx2::fill_dots(table);
    table.types[kQ4_0].dequant = avx2::dequant_legacy<BlockQ4_0>;
    table.types[kQ4_1].dequant = avx2::dequant_legacy<BlockQ4_1>;
    table.types[kQ5_0].dequant = avx2::dequant_legacy<BlockQ5_0>;
    table.types[kQ5_1].dequant = avx2::dequant_legacy<BlockQ5_1>;
    table.types[kQ8_0].dequant = avx2::dequant_legacy<BlockQ8_0>;
  }
#endif
#ifdef ROCMFORGE_HAVE_AVX2_VNNI_LEGACY
  if (isa == Isa::kAvx2Vnni) avx2_vnni::fill_dots(table);
#endif
#ifdef ROCMFORGE_HAVE_AVX512_VNNI_LEGACY
  if (isa == Isa::kAvx512Vnni) avx512_vnni::fill_dots(table);
#endif
}

}  // namespace rocmforge
