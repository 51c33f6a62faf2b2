// Which kernel tables this CPU runs, built once: scalar first, then each SIMD table as a
// copy of the one below it with its own entries filled in.
#include <array>
#include <mutex>

#include "kernels.h"

namespace rocmforge {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::kScalar:
      return true;
    case Isa::kAvx2:
      return avx2;
    case Isa::kAvx2Vnni:
      return avx2 && __builtin_cpu_supports("avxvnni");
    case Isa::kAvx512Vnni:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    default:
      return false;
  }
#else
  return isa == Isa::kScalar;
#endif
}

Isa base_of(Isa isa) {
  switch (isa) {
    case Isa::kAvx2Vnni:
    case Isa::kAvx512Vnni:
      return Isa::kAvx2;
    default:
      return Isa::kScalar;
  }
}

struct Tables {
  std::array<KernelTable, static_cast<int>(Isa::kNumIsas)> table;
  std::array<bool, static_cast<int>(Isa::kNumIsas)> present{};
};

const char* isa_name(Isa isa) {
  static const char* names[] = {"scalar", "avx2", "avx2_vnni", "avx512_vnni"};
  return names[static_cast<int>(isa)];
}

const Tables& tables() {
  static Tables built = [] {
    Tables t;
    for (int i = 0; i < static_cast<int>(Isa::kNumIsas); ++i) {
      const Isa isa = static_cast<Isa>(i);
      if (!cpu_has(isa)) continue;
      KernelTable table = isa == Isa::kScalar ? KernelTable{} : t.table[static_cast<int>(base_of(isa))];
      table.name = isa_name(isa);
      fill_quantize(table, isa);
      fill_float(table, isa);
      fill_legacy(table, isa);
      fill_kquants(table, isa);
      t.table[i] = table;
      t.present[i] = true;
    }
    return t;
  }();
  return built;
}

}  // namespace

const KernelTable* kernel_table(Isa isa) {
  const int i = static_cast<int>(isa);
  if (i < 0 || i >= static_cast<int>(Isa::kNumIsas) || !tables().present[i]) return nullptr;
  return &tables().table[i];
}

const KernelTable& best_kernel_table() {
  // AVX-512 VNNI first: its 512-bit K-quant kernels measured 1.3-1.4x the 256-bit ones on
  // prompt-shaped products (benchmarks/cpu_matmul.py, 2 Zen 5 cores); its other entries are
  // the 256-bit kernels in EVEX encoding, as fast as the AVX-VNNI ones.
  for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvx2Vnni, Isa::kAvx2, Isa::kScalar}) {
    if (const KernelTable* t = kernel_table(isa)) return *t;
  }
  return tables().table[0];
}

int64_t row_bytes(int type, int64_t k) {
  switch (type) {
    case kF32: return k * 4;
    case kF16:
    case kBF16: return k * 2;
    case kQ4_0: return k / kQK * static_cast<int64_t>(sizeof(BlockQ4_0));
    case kQ4_1: return k / kQK * static_cast<int64_t>(sizeof(BlockQ4_1));
    case kQ5_0: return k / kQK * static_cast<int64_t>(sizeof(BlockQ5_0));
    case kQ5_1: return k / kQK * static_cast<int64_t>(sizeof(BlockQ5_1));
    case kQ8_0: return k / kQK * static_cast<int64_t>(sizeof(BlockQ8_0));
    case kQ2_K: return k / kQKK * static_cast<int64_t>(sizeof(BlockQ2_K));
    case kQ3_K: return k / kQKK * static_cast<int64_t>(sizeof(BlockQ3_K));
    case kQ4_K: return k / kQKK * static_cast<int64_t>(sizeof(BlockQ4_K));
    case kQ5_K: return k / kQKK * static_cast<int64_t>(sizeof(BlockQ5_K));
    case kQ6_K: return k / kQKK * static_cast<int64_t>(sizeof(BlockQ6_K));
    default: return -1;
  }
}

int64_t act_row_bytes(ActFormat act, int64_t k) {
  switch (act) {
    case ActFormat::kF32: return k * 4;
    case ActFormat::kQ8: return k / kQK * static_cast<int64_t>(sizeof(BlockQ8));
    case ActFormat::kQ8K: return k / kQKK * static_cast<int64_t>(sizeof(BlockQ8K));
    default: return -1;
  }
}

}  // namespace rocmforge
