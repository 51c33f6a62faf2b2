// CPU kernels on GGUF blocks: the types, block layouts and the kernel table every
// translation unit of the extension shares.
//
// Weights stay exactly as the GGUF file stores them (ggml's block structs, ggml-common.h);
// activations are quantized per call into this extension's own 8-bit blocks (BlockQ8 for
// the 32-element types, BlockQ8K for the 256-element K-quants), and a weight row times an
// activation row is an integer dot product per block, scaled in float -- the arithmetic of
// ggml's CPU backend. Float weights (F32/F16/BF16) are dotted with float activations.
//
// One KernelTable per instruction set. The scalar table is the portable reference; the
// SIMD tables (compiled under `#pragma GCC target`, chosen at run time by cpu features)
// overwrite the entries they speed up. Every entry of every table is tested against the
// scalar one and against a Python model of the same arithmetic (tests/native).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace rocmforge {

// ggml_type values (gguf.GGMLQuantizationType).
enum GGMLType : int {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBF16 = 30,
  kNumTypes = 31,
};

constexpr int kQK = 32;    // elements per block of the legacy types
constexpr int kQKK = 256;  // elements per K-quant super-block

// --- weight blocks, as stored (fp16 fields as raw bits) ---------------------------------
#pragma pack(push, 1)
struct BlockQ4_0 { uint16_t d; uint8_t qs[kQK / 2]; };
struct BlockQ4_1 { uint16_t d; uint16_t m; uint8_t qs[kQK / 2]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
struct BlockQ5_1 { uint16_t d; uint16_t m; uint8_t qh[4]; uint8_t qs[kQK / 2]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[kQK]; };
struct BlockQ2_K { uint8_t scales[kQKK / 16]; uint8_t qs[kQKK / 4]; uint16_t d; uint16_t dmin; };
struct BlockQ3_K { uint8_t hmask[kQKK / 8]; uint8_t qs[kQKK / 4]; uint8_t scales[12]; uint16_t d; };
struct BlockQ4_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qs[kQKK / 2]; };
struct BlockQ5_K { uint16_t d; uint16_t dmin; uint8_t scales[12]; uint8_t qh[kQKK / 8]; uint8_t qs[kQKK / 2]; };
struct BlockQ6_K { uint8_t ql[kQKK / 2]; uint8_t qh[kQKK / 4]; int8_t scales[kQKK / 16]; uint16_t d; };
#pragma pack(pop)
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210);

// --- activation blocks (this extension's own; never stored in a file) -------------------
// BlockQ8: 32 values x ~= d * qs, qs = nearbyint(x / d) with d = max|x| / 127 (ties to even),
// s = d * sum(qs): the block sum that offset types (Q4_0's -8, Q4_1's +m ...) need.
struct BlockQ8 { float d; float s; int8_t qs[kQK]; };
// BlockQ8K: 256 values, d = max|x| / 127 likewise; bsums[i] = sum of qs[16i .. 16i+15], and
// dsums[j] = d * (bsums[2j] + bsums[2j + 1]), the scaled sums of the 32-element sub-blocks
// that Q4_K / Q5_K's min term dots with dmin * min_j.
struct BlockQ8K { float d; int8_t qs[kQKK]; int16_t bsums[kQKK / 16]; float dsums[kQKK / 32]; };
static_assert(sizeof(BlockQ8) == 40 && sizeof(BlockQ8K) == 324);

enum class ActFormat : int { kNone = 0, kF32 = 1, kQ8 = 2, kQ8K = 3 };

// Dot product of one weight row of k elements (k a multiple of its block size) with one
// activation row in that type's ActFormat (BlockQ8[k/32], BlockQ8K[k/256] or float[k]).
using DotFn = float (*)(const uint8_t* w, const void* act, int64_t k);
// The same dot product of one weight row with m activation rows (act_bytes apart), into
// out[i * ld]: each piece of the weight row is decoded once for a group of activation rows
// (4, or 8 for the 512-bit kernels' 32 registers). Every entry gives, row for row, the bits
// of its table's DotFn (the same operations in the same order), so a batch of m rows
// computes what m single rows would.
using DotRowsFn = void (*)(const uint8_t* w, const uint8_t* act, int64_t act_bytes, int64_t m, int64_t k,
                           float* out, int64_t ld);
// One weight row of k elements -> k floats.
using DequantFn = void (*)(const uint8_t* w, float* out, int64_t k);
// k floats -> activation blocks (k a multiple of the block size).
using QuantizeFn = void (*)(const float* x, void* out, int64_t k);

struct TypeKernels {
  ActFormat act = ActFormat::kNone;  // kNone: the type has no kernels (dequantize at load)
  DotFn dot = nullptr;
  DequantFn dequant = nullptr;
  DotRowsFn dot_rows = nullptr;  // nullptr: `dot` row by row (the scalar tables)
};

// The DotRowsFn of a kernel written for a fixed number of rows, Kernel<R>::run(w, act,
// act_bytes, k, out, ld) for R = 1 .. Rows: Rows rows at a time, then the rest.
template <template <int> class Kernel, int R>
inline void dot_rest(const uint8_t* w, const uint8_t* act, int64_t act_bytes, int64_t m, int64_t k, float* out,
                     int64_t ld) {
  if constexpr (R > 0) {
    if (m == R) return Kernel<R>::run(w, act, act_bytes, k, out, ld);
    dot_rest<Kernel, R - 1>(w, act, act_bytes, m, k, out, ld);
  }
}

template <template <int> class Kernel, int Rows = 4>
void dot_rows(const uint8_t* w, const uint8_t* act, int64_t act_bytes, int64_t m, int64_t k, float* out,
              int64_t ld) {
  int64_t i = 0;
  for (; i + Rows <= m; i += Rows) Kernel<Rows>::run(w, act + i * act_bytes, act_bytes, k, out + i * ld, ld);
  dot_rest<Kernel, Rows - 1>(w, act + i * act_bytes, act_bytes, m - i, k, out + i * ld, ld);
}

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx2Vnni = 2, kAvx512Vnni = 3, kNumIsas = 4 };

struct KernelTable {
  const char* name = "scalar";
  QuantizeFn quantize_q8 = nullptr;
  QuantizeFn quantize_q8k = nullptr;
  TypeKernels types[kNumTypes];
};

// Each fill function sets the entries it owns for `isa`; for an isa it has no code for it
// leaves the table as it is (the scalar entries, copied in first).
void fill_quantize(KernelTable& table, Isa isa);  // quantize.cpp: BlockQ8 / BlockQ8K
void fill_float(KernelTable& table, Isa isa);     // float_dot.cpp: F32 / F16 / BF16
void fill_legacy(KernelTable& table, Isa isa);    // legacy.cpp: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
void fill_kquants(KernelTable& table, Isa isa);   // kquants.cpp: Q4_K Q5_K Q6_K (+ Q2_K Q3_K dequant)

// dispatch.cpp: the table for `isa`, or nullptr where this CPU (or build) lacks it.
const KernelTable* kernel_table(Isa isa);
// The fastest table this CPU runs.
const KernelTable& best_kernel_table();

// Bytes one row of k elements takes in `type` / in the activation format.
int64_t row_bytes(int type, int64_t k);
int64_t act_row_bytes(ActFormat act, int64_t k);

// --- fp16 / bf16 bits -> float, portable ---------------------------------------------------
inline float fp32_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint32_t fp32_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}
// IEEE half -> float, exact for every input (subnormals, inf, NaN).
inline float fp16_to_fp32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = fp32_from_bits(0x7800000u);  // 2^-112
  const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
  return fp32_from_bits(result);
}
inline float bf16_to_fp32(uint16_t h) { return fp32_from_bits(static_cast<uint32_t>(h) << 16); }

}  // namespace rocmforge
