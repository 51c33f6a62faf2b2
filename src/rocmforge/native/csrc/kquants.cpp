// The K-quants (Q4_K Q5_K Q6_K) against BlockQ8K activations; Q2_K and Q3_K dequantize only.
//
// Dot products, per 256-element super-block (d_a the activation block's scale, a_i its codes,
// bsum_j the activation sums the block carries):
//   Q4_K / Q5_K  (d_w * d_a) * sum_j scale_j * isum_j  -  sum_j (dmin_w * min_j) * dsums_j
//                over the 8 sub-blocks j of 32, isum_j = sum_i q_i * a_i with the unsigned
//                code q_i, dsums_j = d_a * (bsums[2j] + bsums[2j + 1]) (BlockQ8K); the
//                min term is a float dot product the SIMD kernels take 8 lanes at a time
//   Q6_K         (d_w * d_a) * sum_g scale_g * (isum_g - 32 * bsums[g])
//                over the 16 sub-blocks g of 16, q_i the unsigned 6-bit code
// The integer sums are exact in int32; only the float steps round, and the SIMD versions
// differ from the scalar ones in the order they add the float terms.
//
// Dequantization mirrors gguf-py's float32 order: (d * scale) * q - (dmin * min) for Q2_K /
// Q4_K / Q5_K, (d * scale) * q for Q3_K / Q6_K (q signed there). The products are exact in
// float32 (an fp16 d times integers of at most 13 bits together), so the result rounds once,
// in the subtraction: every version gives the reference's bits, even where the compiler
// fuses the multiply and subtract into an FMA (GCC's default for C++, -ffp-contract=fast).
#include <type_traits>

#include "kernels.h"

namespace rocmforge {
namespace {

// The 12-byte scale field of Q4_K / Q5_K -> four little-endian words whose 16 bytes are the
// 8 six-bit scales, then the 8 six-bit mins.
inline void k_scale_words(const uint8_t* packed, uint32_t out[4]) {
  uint32_t u[3];
  std::memcpy(u, packed, 12);
  out[0] = u[0] & 0x3F3F3F3Fu;                                        // scales 0..3
  out[1] = (u[2] & 0x0F0F0F0Fu) | ((u[0] >> 2) & 0x30303030u);         // scales 4..7
  out[2] = u[1] & 0x3F3F3F3Fu;                                        // mins 0..3
  out[3] = ((u[2] >> 4) & 0x0F0F0F0Fu) | ((u[1] >> 2) & 0x30303030u);  // mins 4..7
}

struct KScales {
  uint8_t scale[8];
  uint8_t min[8];
};
inline KScales k_scales(const uint8_t* packed) {
  uint32_t words[4];
  k_scale_words(packed, words);
  KScales s;
  std::memcpy(&s, words, sizeof(s));
  return s;
}

// Element 32j + i of a Q4_K / Q5_K super-block: nibble j % 2 of qs byte 32 (j / 2) + i.
inline int k_nibble(const uint8_t* qs, int j, int i) { return (qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0F; }
// Its fifth bit in Q5_K: bit j of qh byte i.
inline int k_high_bit(const uint8_t* qh, int j, int i) { return (qh[i] >> j) & 1; }
// Element 128c + 32t + i (i < 32) of a Q6_K super-block: low 4 bits from nibble t / 2 of ql
// byte 64c + 32 (t % 2) + i, high 2 bits from bits 2t..2t+1 of qh byte 32c + i.
inline int q6_code(const BlockQ6_K& x, int c, int t, int i) {
  const int low = (x.ql[64 * c + 32 * (t % 2) + i] >> (4 * (t / 2))) & 0x0F;
  const int high = (x.qh[32 * c + i] >> (2 * t)) & 0x03;
  return low | (high << 4);
}

float dot_q4_k_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_K*>(w);
  const auto* y = static_cast<const BlockQ8K*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQKK; ++b) {
    const KScales s = k_scales(x[b].scales);
    const float dmin = fp16_to_fp32(x[b].dmin);
    int scaled = 0;
    float mins = 0.0f;
    for (int j = 0; j < 8; ++j) {
      int isum = 0;
      for (int i = 0; i < 32; ++i) isum += k_nibble(x[b].qs, j, i) * y[b].qs[32 * j + i];
      scaled += s.scale[j] * isum;
      mins += (dmin * static_cast<float>(s.min[j])) * y[b].dsums[j];
    }
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(scaled) - mins;
  }
  return sum;
}

float dot_q5_k_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_K*>(w);
  const auto* y = static_cast<const BlockQ8K*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQKK; ++b) {
    const KScales s = k_scales(x[b].scales);
    const float dmin = fp16_to_fp32(x[b].dmin);
    int scaled = 0;
    float mins = 0.0f;
    for (int j = 0; j < 8; ++j) {
      int isum = 0;
      for (int i = 0; i < 32; ++i) {
        isum += (k_nibble(x[b].qs, j, i) | (k_high_bit(x[b].qh, j, i) << 4)) * y[b].qs[32 * j + i];
      }
      scaled += s.scale[j] * isum;
      mins += (dmin * static_cast<float>(s.min[j])) * y[b].dsums[j];
    }
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(scaled) - mins;
  }
  return sum;
}

float dot_q6_k_scalar(const uint8_t* w, const void* act, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ6_K*>(w);
  const auto* y = static_cast<const BlockQ8K*>(act);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQKK; ++b) {
    int scaled = 0;
    for (int c = 0; c < 2; ++c) {
      for (int t = 0; t < 4; ++t) {
        for (int half = 0; half < 2; ++half) {
          const int g = 8 * c + 2 * t + half;  // sub-block of elements 16g .. 16g + 15
          int isum = 0;
          for (int i = 16 * half; i < 16 * half + 16; ++i) isum += q6_code(x[b], c, t, i) * y[b].qs[128 * c + 32 * t + i];
          scaled += x[b].scales[g] * (isum - 32 * y[b].bsums[g]);
        }
      }
    }
    sum += (fp16_to_fp32(x[b].d) * y[b].d) * static_cast<float>(scaled);
  }
  return sum;
}

void dequant_q4_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_K*>(w);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const KScales s = k_scales(x[b].scales);
    const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
    for (int j = 0; j < 8; ++j) {
      const float scale = d * static_cast<float>(s.scale[j]), offset = dmin * static_cast<float>(s.min[j]);
      for (int i = 0; i < 32; ++i) out[32 * j + i] = scale * static_cast<float>(k_nibble(x[b].qs, j, i)) - offset;
    }
  }
}

void dequant_q5_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_K*>(w);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const KScales s = k_scales(x[b].scales);
    const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
    for (int j = 0; j < 8; ++j) {
      const float scale = d * static_cast<float>(s.scale[j]), offset = dmin * static_cast<float>(s.min[j]);
      for (int i = 0; i < 32; ++i) {
        const int q = k_nibble(x[b].qs, j, i) | (k_high_bit(x[b].qh, j, i) << 4);
        out[32 * j + i] = scale * static_cast<float>(q) - offset;
      }
    }
  }
}

void dequant_q6_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ6_K*>(w);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int c = 0; c < 2; ++c) {
      for (int t = 0; t < 4; ++t) {
        for (int half = 0; half < 2; ++half) {
          const int g = 8 * c + 2 * t + half;  // elements 16g .. 16g + 15
          const float scale = d * static_cast<float>(x[b].scales[g]);
          for (int i = 16 * half; i < 16 * half + 16; ++i) {
            out[128 * c + 32 * t + i] = scale * static_cast<float>(q6_code(x[b], c, t, i) - 32);
          }
        }
      }
    }
  }
}

// Q2_K: element 128c + 32s + i = bits 2s..2s+1 of qs byte 32c + i; sub-block g of 16 has a
// 4-bit scale (low nibble of scales[g]) and a 4-bit min (high nibble).
void dequant_q2_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ2_K*>(w);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const float d = fp16_to_fp32(x[b].d), dmin = fp16_to_fp32(x[b].dmin);
    for (int g = 0; g < 16; ++g) {
      const int c = g / 8, s = (g % 8) / 2, first = 16 * (g % 2);
      const float scale = d * static_cast<float>(x[b].scales[g] & 0x0F);
      const float offset = dmin * static_cast<float>(x[b].scales[g] >> 4);
      for (int i = first; i < first + 16; ++i) {
        out[16 * g + i - first] = scale * static_cast<float>((x[b].qs[32 * c + i] >> (2 * s)) & 0x03) - offset;
      }
    }
  }
}

// Q3_K: sub-block g has a 6-bit scale stored + 32 (low nibble in byte g % 8, top 2 bits in
// byte 8 + g % 4); the 2 low bits of each code as in Q2_K, and element 32S + i loses 4
// unless bit S of hmask byte i is set.
inline float q3_scale(const BlockQ3_K& x, float d, int g) {
  const int low = (x.scales[g % 8] >> (4 * (g / 8))) & 0x0F;
  const int high = (x.scales[8 + g % 4] >> (2 * (g / 4))) & 0x03;
  return d * static_cast<float>((low | (high << 4)) - 32);
}

void dequant_q3_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ3_K*>(w);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const float d = fp16_to_fp32(x[b].d);
    for (int g = 0; g < 16; ++g) {
      const int c = g / 8, s = (g % 8) / 2, first = 16 * (g % 2), S = g / 2;
      const float scale = q3_scale(x[b], d, g);
      for (int i = first; i < first + 16; ++i) {
        const int low = (x[b].qs[32 * c + i] >> (2 * s)) & 0x03;
        const int keep = (x[b].hmask[i] >> S) & 1;
        out[16 * g + i - first] = scale * static_cast<float>(low - 4 + 4 * keep);
      }
    }
  }
}

}  // namespace
}  // namespace rocmforge

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "simd.h"

namespace rocmforge {
namespace avx2 {
namespace {

// acc + (per int32 lane) the two adjacent products of scale_i16 with the pairwise sums of
// q_u8 * a_s8 (maddubs cannot saturate: codes < 64 and |a| <= 127).
static inline __m256i dot_scaled_acc(__m256i acc, __m256i q, __m256i a, __m256i scale) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), scale));
}

#include "kquants_x86.inc"

// Dequantizers: 8 codes at a time widened to int32 lanes, then the scalar formulas.
static inline __m256i load_u8x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
static inline void store_scaled(float* out, float scale, float offset, __m256i q) {
  _mm256_storeu_ps(out, _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(q)), _mm256_set1_ps(offset)));
}

void dequant_q4_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ4_K*>(w);
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const KScales s = k_scales(x[b].scales);
    const float d = f16(x[b].d), dmin = f16(x[b].dmin);
    float scale[8], offset[8];
    for (int j = 0; j < 8; ++j) {
      scale[j] = d * static_cast<float>(s.scale[j]);
      offset[j] = dmin * static_cast<float>(s.min[j]);
    }
    for (int c = 0; c < 4; ++c) {
      for (int i = 0; i < 32; i += 8) {
        const __m256i q = load_u8x8(x[b].qs + 32 * c + i);
        store_scaled(out + 64 * c + i, scale[2 * c], offset[2 * c], _mm256_and_si256(q, low4));
        store_scaled(out + 64 * c + 32 + i, scale[2 * c + 1], offset[2 * c + 1], _mm256_srli_epi32(q, 4));
      }
    }
  }
}

void dequant_q5_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ5_K*>(w);
  const __m256i low4 = _mm256_set1_epi32(0x0F), bit4 = _mm256_set1_epi32(0x10);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const KScales s = k_scales(x[b].scales);
    const float d = f16(x[b].d), dmin = f16(x[b].dmin);
    float scale[8], offset[8];
    for (int j = 0; j < 8; ++j) {
      scale[j] = d * static_cast<float>(s.scale[j]);
      offset[j] = dmin * static_cast<float>(s.min[j]);
    }
    for (int c = 0; c < 4; ++c) {
      for (int i = 0; i < 32; i += 8) {
        const __m256i q = load_u8x8(x[b].qs + 32 * c + i);
        const __m256i h = _mm256_slli_epi32(load_u8x8(x[b].qh + i), 4);  // bit j of qh at bit 4 + j
        const __m256i lo = _mm256_or_si256(_mm256_and_si256(q, low4), _mm256_and_si256(_mm256_srli_epi32(h, 2 * c), bit4));
        const __m256i hi = _mm256_or_si256(_mm256_srli_epi32(q, 4), _mm256_and_si256(_mm256_srli_epi32(h, 2 * c + 1), bit4));
        store_scaled(out + 64 * c + i, scale[2 * c], offset[2 * c], lo);
        store_scaled(out + 64 * c + 32 + i, scale[2 * c + 1], offset[2 * c + 1], hi);
      }
    }
  }
}

void dequant_q6_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ6_K*>(w);
  const __m256i low4 = _mm256_set1_epi32(0x0F), top2 = _mm256_set1_epi32(0x30), bias = _mm256_set1_epi32(32);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const float d = f16(x[b].d);
    float scale[16];
    for (int g = 0; g < 16; ++g) scale[g] = d * static_cast<float>(x[b].scales[g]);
    for (int c = 0; c < 2; ++c) {
      for (int i = 0; i < 32; i += 8) {
        const __m256i l0 = load_u8x8(x[b].ql + 64 * c + i), l1 = load_u8x8(x[b].ql + 64 * c + 32 + i);
        const __m256i h = load_u8x8(x[b].qh + 32 * c + i);
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi32(h, 4), top2)),
            _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi32(h, 2), top2)),
            _mm256_or_si256(_mm256_srli_epi32(l0, 4), _mm256_and_si256(h, top2)),
            _mm256_or_si256(_mm256_srli_epi32(l1, 4), _mm256_and_si256(_mm256_srli_epi32(h, 2), top2)),
        };
        for (int t = 0; t < 4; ++t) {
          const int e = 128 * c + 32 * t + i;
          const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(q[t], bias));
          _mm256_storeu_ps(out + e, _mm256_mul_ps(_mm256_set1_ps(scale[e / 16]), v));
        }
      }
    }
  }
}

void dequant_q2_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ2_K*>(w);
  const __m256i low2 = _mm256_set1_epi32(0x03);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const float d = f16(x[b].d), dmin = f16(x[b].dmin);
    float scale[16], offset[16];
    for (int g = 0; g < 16; ++g) {
      scale[g] = d * static_cast<float>(x[b].scales[g] & 0x0F);
      offset[g] = dmin * static_cast<float>(x[b].scales[g] >> 4);
    }
    for (int c = 0; c < 2; ++c) {
      for (int i = 0; i < 32; i += 8) {
        const __m256i q = load_u8x8(x[b].qs + 32 * c + i);
        for (int s = 0; s < 4; ++s) {
          const int e = 128 * c + 32 * s + i;
          store_scaled(out + e, scale[e / 16], offset[e / 16], _mm256_and_si256(_mm256_srli_epi32(q, 2 * s), low2));
        }
      }
    }
  }
}

void dequant_q3_k(const uint8_t* w, float* out, int64_t k) {
  const auto* x = reinterpret_cast<const BlockQ3_K*>(w);
  const __m256i low2 = _mm256_set1_epi32(0x03), one = _mm256_set1_epi32(1), four = _mm256_set1_epi32(4);
  for (int64_t b = 0; b < k / kQKK; ++b, out += kQKK) {
    const float d = f16(x[b].d);
    float scale[16];
    for (int g = 0; g < 16; ++g) scale[g] = q3_scale(x[b], d, g);
    for (int c = 0; c < 2; ++c) {
      for (int i = 0; i < 32; i += 8) {
        const __m256i q = load_u8x8(x[b].qs + 32 * c + i), hmask = load_u8x8(x[b].hmask + i);
        for (int s = 0; s < 4; ++s) {
          const int e = 128 * c + 32 * s + i;
          // low | (keep << 2) - 4 = low - 4 + 4 * keep
          const __m256i keep = _mm256_and_si256(_mm256_srli_epi32(hmask, e / 32), one);
          const __m256i low = _mm256_and_si256(_mm256_srli_epi32(q, 2 * s), low2);
          const __m256i code = _mm256_sub_epi32(_mm256_or_si256(low, _mm256_slli_epi32(keep, 2)), four);
          _mm256_storeu_ps(out + e, _mm256_mul_ps(_mm256_set1_ps(scale[e / 16]), _mm256_cvtepi32_ps(code)));
        }
      }
    }
  }
}

}  // namespace
}  // namespace avx2
}  // namespace rocmforge
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace rocmforge {
namespace avx2_vnni {
namespace {

// As in the AVX2 region, with the 16-bit madd and the add fused (vpdpwssd).
static inline __m256i dot_scaled_acc(__m256i acc, __m256i q, __m256i a, __m256i scale) {
  return _mm256_dpwssd_avx_epi32(acc, _mm256_maddubs_epi16(q, a), scale);
}

#include "kquants_x86.inc"

}  // namespace
}  // namespace avx2_vnni
}  // namespace rocmforge
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace rocmforge {
namespace avx512_vnni {
namespace {

// The 256-bit helpers in EVEX encoding (32 registers), and the 512-bit kernels on them.
static inline __m256i dot_scaled_acc(__m256i acc, __m256i q, __m256i a, __m256i scale) {
  return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(q, a), scale);
}

#include "kquants_x86.inc"
#include "kquants_avx512.inc"

}  // namespace
}  // namespace avx512_vnni
}  // namespace rocmforge
#pragma GCC pop_options
#define ROCMFORGE_HAVE_X86_KQUANTS 1
#endif

namespace rocmforge {

void fill_kquants(KernelTable& table, Isa isa) {
  if (isa == Isa::kScalar) {
    table.types[kQ4_K] = {ActFormat::kQ8K, dot_q4_k_scalar, dequant_q4_k};
    table.types[kQ5_K] = {ActFormat::kQ8K, dot_q5_k_scalar, dequant_q5_k};
    table.types[kQ6_K] = {ActFormat::kQ8K, dot_q6_k_scalar, dequant_q6_k};
    table.types[kQ2_K] = {ActFormat::kNone, nullptr, dequant_q2_k};
    table.types[kQ3_K] = {ActFormat::kNone, nullptr, dequant_q3_k};
  }
#ifdef ROCMFORGE_HAVE_X86_KQUANTS
  if (isa == Isa::kAvx2) {
    table.types[kQ4_K] = {ActFormat::kQ8K, avx2::dot_one<avx2::DotQ4K>, avx2::dequant_q4_k, dot_rows<avx2::DotQ4K>};
    table.types[kQ5_K] = {ActFormat::kQ8K, avx2::dot_one<avx2::DotQ5K>, avx2::dequant_q5_k, dot_rows<avx2::DotQ5K>};
    table.types[kQ6_K] = {ActFormat::kQ8K, avx2::dot_one<avx2::DotQ6K>, avx2::dequant_q6_k, dot_rows<avx2::DotQ6K>};
    table.types[kQ2_K].dequant = avx2::dequant_q2_k;
    table.types[kQ3_K].dequant = avx2::dequant_q3_k;
  }
  // The VNNI tables keep the AVX2 dequantization (no VNNI in it) and replace the dots.
  const auto set_dots = [&table](auto q4, auto q4_rows, auto q5, auto q5_rows, auto q6, auto q6_rows) {
    table.types[kQ4_K].dot = q4, table.types[kQ4_K].dot_rows = q4_rows;
    table.types[kQ5_K].dot = q5, table.types[kQ5_K].dot_rows = q5_rows;
    table.types[kQ6_K].dot = q6, table.types[kQ6_K].dot_rows = q6_rows;
  };
  if (isa == Isa::kAvx2Vnni) {
    using namespace avx2_vnni;
    set_dots(dot_one<DotQ4K>, dot_rows<DotQ4K>, dot_one<DotQ5K>, dot_rows<DotQ5K>, dot_one<DotQ6K>, dot_rows<DotQ6K>);
  }
  if (isa == Isa::kAvx512Vnni) {
    using namespace avx512_vnni;
    set_dots(dot_one<DotQ4KWide>, dot_rows<DotQ4KWide, 8>, dot_one<DotQ5KWide>, dot_rows<DotQ5KWide, 8>,
             dot_one<DotQ6KWide>, dot_rows<DotQ6KWide, 8>);
  }
#endif
}

}  // namespace rocmforge
