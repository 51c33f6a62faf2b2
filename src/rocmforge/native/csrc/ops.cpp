// The torch operators (torch.ops.rocmforge_cpu.*): argument checks, threading and the two
// matmul strategies over the kernel table.
//
//   matmul          activations quantized once per row, then each thread takes a range of
//                   weight rows in L1-sized blocks and hands each weight row a group of up
//                   to kActRows activation rows (the kernels' DotRowsFn decodes each weight
//                   piece once per few rows): decode, batched decode, K-quant prompts
//   matmul_dequant  the same quantized activations as `matmul`, expanded to fp32, times
//                   weight tiles dequantized to fp32 in parallel, by ATen's GEMM (oneDNN /
//                   MKL) straight into each tile's output slice: the numbers of `matmul` up
//                   to fp32 rounding, for the prompts of the types where it is faster
//   dequantize      weight rows -> fp32 (embedding lookups, the dense reference)
//   quantize        fp32 rows -> activation blocks (exposed for the tests' integer model)
//
// Threads: ATen's intra-op pool (torch.set_num_threads), shared with every other op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "kernels.h"
#include "ops.h"

namespace rocmforge {
namespace {

int64_t block_elements(int64_t type) {
  switch (type) {
    case kF32: case kF16: case kBF16: return 1;
    case kQ2_K: case kQ3_K: case kQ4_K: case kQ5_K: case kQ6_K: return kQKK;
    default: return kQK;
  }
}

const KernelTable& table_for(int64_t isa) {
  if (isa < 0) return best_kernel_table();
  TORCH_CHECK(isa < static_cast<int64_t>(Isa::kNumIsas), "unknown instruction set ", isa);
  const KernelTable* table = kernel_table(static_cast<Isa>(isa));
  TORCH_CHECK(table != nullptr, "instruction set ", isa, " is not available on this CPU");
  return *table;
}

const TypeKernels& kernels_for(const KernelTable& table, int64_t type, bool need_dot) {
  TORCH_CHECK(type >= 0 && type < kNumTypes, "unknown ggml type ", type);
  const TypeKernels& kernels = table.types[type];
  TORCH_CHECK(kernels.dequant != nullptr && (!need_dot || kernels.dot != nullptr),
              "no CPU ", need_dot ? "matmul" : "dequantize", " kernel for ggml type ", type);
  return kernels;
}

void check_weight(const at::Tensor& w, int64_t type, int64_t k) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
              "weight must be a CPU uint8 [rows, row_bytes] tensor");
  TORCH_CHECK(k > 0 && k % block_elements(type) == 0, "in_features ", k,
              " is not a whole number of blocks of ggml type ", type);
  TORCH_CHECK(w.size(1) == row_bytes(type, k), "weight rows are ", w.size(1), " bytes; ", k,
              " elements of ggml type ", type, " take ", row_bytes(type, k));
  TORCH_CHECK(w.size(0) <= 1 || w.stride(0) == w.size(1), "weight rows must be contiguous");
  TORCH_CHECK(w.stride(1) == 1, "weight rows must be contiguous");
}

void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2,
              what, " must be a CPU float32 2-D tensor");
  TORCH_CHECK(t.stride(1) == 1, what, " rows must be contiguous");
}

// Activation rows [M, K] -> [M, act bytes] in `act`'s format (a float copy for kF32).
at::Tensor quantize_rows(const KernelTable& table, const at::Tensor& x, ActFormat act) {
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t bytes = act_row_bytes(act, k);
  at::Tensor out = at::empty({m, bytes}, x.options().dtype(at::kByte));
  if (act == ActFormat::kF32) {
    out.view(at::kFloat).copy_(x);
    return out;
  }
  const QuantizeFn quantize = act == ActFormat::kQ8 ? table.quantize_q8 : table.quantize_q8k;
  const float* src = x.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) quantize(src + i * ld, dst + i * bytes, k);
  });
  return out;
}

at::Tensor quantize(const at::Tensor& x, int64_t type, int64_t isa) {
  check_rows(x, "x");
  const KernelTable& table = table_for(isa);
  const TypeKernels& kernels = kernels_for(table, type, true);
  TORCH_CHECK(x.size(1) % block_elements(type) == 0, "row length is not a whole number of blocks");
  return quantize_rows(table, x, kernels.act);
}

// The weight of one linear layer as parts stacked along the output dimension (a fused
// Q|K|V may mix types); part p fills output columns [offset_p, offset_p + rows_p).
struct Parts {
  std::vector<const uint8_t*> data;
  std::vector<int64_t> row_bytes, rows, offset;
  std::vector<const TypeKernels*> kernels;
  int64_t total_rows = 0;
};

Parts check_parts(const KernelTable& table, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& types,
                  int64_t k, bool need_dot) {
  TORCH_CHECK(!weights.empty() && weights.size() == types.size(), "need one ggml type per weight part");
  Parts parts;
  for (size_t p = 0; p < weights.size(); ++p) {
    check_weight(weights[p], types[p], k);
    parts.data.push_back(weights[p].data_ptr<uint8_t>());
    parts.row_bytes.push_back(weights[p].size(1));
    parts.rows.push_back(weights[p].size(0));
    parts.offset.push_back(parts.total_rows);
    parts.kernels.push_back(&kernels_for(table, types[p], need_dot));
    parts.total_rows += weights[p].size(0);
  }
  return parts;
}

}  // namespace

// How far ahead of the row being computed the decode matmul asks for weight bytes. A decode
// step streams every weight once, and the hardware prefetcher alone keeps too few misses
// in flight at the rate the kernels consume rows (it stops at each 4 KiB page, and each
// call starts a new stream): on the 2-core machine of benchmarks/cpu_decode.py the whole
// default model's matmuls took 10.4 ms per token without, 7.6-7.9 ms at 2 KiB ahead (1.5, 3
// and 4 KiB: 8.3, 8.0, 7.7; 8 KiB: 8.0).
constexpr int64_t kPrefetchBytes = 2048;
// The weight bytes a thread keeps in L1 while groups of kActRows activation rows pass over
// them (prompt-shaped calls), each weight row handed to its DotRowsFn with the whole group.
constexpr int64_t kRowBlockBytes = 16 << 10;
constexpr int64_t kActRows = 16;

void matmul(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& types,
            at::Tensor& out, int64_t isa) {
  check_rows(x, "x");
  check_rows(out, "out");
  const KernelTable& table = table_for(isa);
  const int64_t m = x.size(0), k = x.size(1);
  const Parts parts = check_parts(table, weights, types, k, true);
  const int64_t n = parts.total_rows;
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "out must be [", m, ", ", n, "]");
  if (m == 0) return;
  // One quantization of the activations per format the parts need (Q4_K|Q6_K share Q8K).
  at::Tensor acts[4];
  for (const TypeKernels* kernels : parts.kernels) {
    at::Tensor& act = acts[static_cast<int>(kernels->act)];
    if (!act.defined()) act = quantize_rows(table, x, kernels->act);
  }
  // Raw pointers once, outside the row loop (data_ptr checks its tensor on every call).
  const uint8_t* act_data[4] = {};
  int64_t act_bytes[4] = {};
  for (int f = 0; f < 4; ++f) {
    if (acts[f].defined()) act_data[f] = acts[f].data_ptr<uint8_t>(), act_bytes[f] = acts[f].size(1);
  }
  float* op = out.data_ptr<float>();
  const int64_t ld = out.stride(0);
  // The weight row, its kernels and its activation rows for output column `row`.
  struct Row {
    const uint8_t* w;
    int64_t w_bytes;
    const TypeKernels* kernels;
    const uint8_t* act;
    int64_t act_bytes;
  };
  const auto row_at = [&](int64_t row, size_t& p) {
    while (row >= parts.offset[p] + parts.rows[p]) ++p;
    const int f = static_cast<int>(parts.kernels[p]->act);
    return Row{parts.data[p] + (row - parts.offset[p]) * parts.row_bytes[p], parts.row_bytes[p], parts.kernels[p],
               act_data[f], act_bytes[f]};
  };
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end;) {
      // A block of weight rows that stays in L1 while every group of activation rows passes
      // over it; with m <= kActRows (decode) that is one pass, each weight row read once.
      size_t p = 0;
      const int64_t block_rows = std::max<int64_t>(1, kRowBlockBytes / row_at(first, p).w_bytes);
      const int64_t last = std::min(end, first + block_rows);
      for (int64_t i = 0; i < m; i += kActRows) {
        const int64_t rows = std::min<int64_t>(kActRows, m - i);
        size_t q = p;
        for (int64_t row = first; row < last; ++row) {
          const Row r = row_at(row, q);
          if (i == 0) {
            // A prefetch never faults, so running past the end of the weight is harmless.
            for (int64_t off = 0; off < r.w_bytes; off += 64) __builtin_prefetch(r.w + kPrefetchBytes + off, 0, 3);
          }
          if (r.kernels->dot_rows != nullptr) {
            r.kernels->dot_rows(r.w, r.act + i * r.act_bytes, r.act_bytes, rows, k, op + i * ld + row, ld);
          } else {
            for (int64_t j = i; j < i + rows; ++j) op[j * ld + row] = r.kernels->dot(r.w, r.act + j * r.act_bytes, k);
          }
        }
      }
      first = last;
    }
  });
}

namespace {

void dequantize_into(const TypeKernels& kernels, const uint8_t* w, int64_t w_bytes, int64_t rows, int64_t k,
                     float* out) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) kernels.dequant(w + r * w_bytes, out + r * k, k);
  });
}

at::Tensor dequantize(const at::Tensor& w, int64_t type, int64_t k, int64_t isa) {
  check_weight(w, type, k);
  const TypeKernels& kernels = kernels_for(table_for(isa), type, false);
  at::Tensor out = at::empty({w.size(0), k}, w.options().dtype(at::kFloat));
  dequantize_into(kernels, w.data_ptr<uint8_t>(), w.size(1), w.size(0), k, out.data_ptr<float>());
  return out;
}

// Activation blocks -> the float values they stand for (d * q): the prompt path multiplies
// these, so a prompt sees the same quantized activations as a decode step would.
at::Tensor act_values(const at::Tensor& act, ActFormat format, int64_t k) {
  const int64_t m = act.size(0), bytes = act.size(1);
  at::Tensor out = at::empty({m, k}, act.options().dtype(at::kFloat));
  const uint8_t* src = act.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = dst + i * k;
      if (format == ActFormat::kQ8) {
        const auto* blocks = reinterpret_cast<const BlockQ8*>(src + i * bytes);
        for (int64_t b = 0; b < k / kQK; ++b) {
          for (int j = 0; j < kQK; ++j) row[b * kQK + j] = blocks[b].d * static_cast<float>(blocks[b].qs[j]);
        }
      } else {
        const auto* blocks = reinterpret_cast<const BlockQ8K*>(src + i * bytes);
        for (int64_t b = 0; b < k / kQKK; ++b) {
          for (int j = 0; j < kQKK; ++j) row[b * kQKK + j] = blocks[b].d * static_cast<float>(blocks[b].qs[j]);
        }
      }
    }
  });
  return out;
}

void matmul_dequant(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& types,
                    at::Tensor& out, int64_t tile_rows, int64_t isa) {
  check_rows(x, "x");
  check_rows(out, "out");
  TORCH_CHECK(tile_rows > 0, "tile_rows must be positive");
  const KernelTable& table = table_for(isa);
  const int64_t m = x.size(0), k = x.size(1);
  const Parts parts = check_parts(table, weights, types, k, false);
  TORCH_CHECK(out.size(0) == m && out.size(1) == parts.total_rows, "out must be [", m, ", ", parts.total_rows, "]");
  if (m == 0) return;
  // The activations each part multiplies: quantized as `matmul` would (its type's format),
  // then expanded back to floats; types without a dot kernel take x as it is.
  at::Tensor values[4];
  at::Tensor dense = at::empty({std::min(tile_rows, parts.total_rows), k}, x.options());
  for (size_t p = 0; p < parts.data.size(); ++p) {
    const ActFormat format = parts.kernels[p]->dot != nullptr ? parts.kernels[p]->act : ActFormat::kF32;
    at::Tensor& lhs = values[static_cast<int>(format)];
    if (!lhs.defined()) {
      lhs = format == ActFormat::kF32 || format == ActFormat::kNone
                ? x
                : act_values(quantize_rows(table, x, format), format, k);
    }
    for (int64_t start = 0; start < parts.rows[p]; start += tile_rows) {
      const int64_t rows = std::min(tile_rows, parts.rows[p] - start);
      at::Tensor tile = dense.narrow(0, 0, rows);
      dequantize_into(*parts.kernels[p], parts.data[p] + start * parts.row_bytes[p], parts.row_bytes[p], rows, k,
                      tile.data_ptr<float>());
      at::Tensor target = out.narrow(1, parts.offset[p] + start, rows);
      at::mm_out(target, lhs, tile.t());
    }
  }
}

std::vector<int64_t> available_isas() {
  std::vector<int64_t> out;
  for (int i = 0; i < static_cast<int>(Isa::kNumIsas); ++i) {
    if (kernel_table(static_cast<Isa>(i)) != nullptr) out.push_back(i);
  }
  return out;
}

std::string isa_name(int64_t isa) { return table_for(isa).name; }

}  // namespace
}  // namespace rocmforge

TORCH_LIBRARY(rocmforge_cpu, m) {
  m.def("quantize(Tensor x, int ggml_type, int isa=-1) -> Tensor", &rocmforge::quantize);
  m.def("matmul(Tensor x, Tensor[] weights, int[] ggml_types, Tensor(a!) out, int isa=-1) -> ()", &rocmforge::matmul);
  m.def("matmul_dequant(Tensor x, Tensor[] weights, int[] ggml_types, Tensor(a!) out, int tile_rows, int isa=-1) -> ()",
        &rocmforge::matmul_dequant);
  m.def("dequantize(Tensor weight, int ggml_type, int in_features, int isa=-1) -> Tensor", &rocmforge::dequantize);
  m.def("available_isas() -> int[]", &rocmforge::available_isas);
  m.def("isa_name(int isa=-1) -> str", &rocmforge::isa_name);
}
