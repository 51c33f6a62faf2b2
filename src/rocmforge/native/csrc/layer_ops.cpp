// The small per-layer operations of a decoder step, fused so that a CPU decode step makes a
// handful of operator calls per layer instead of dozens (torch.ops.rocmforge_cpu.*):
//
//   add_rms_norm      (x [+ residual]) -> (rms_norm(sum) * weight, sum)
//   rope_write_kv     RoPE on the interleaved pairs of q and k heads, k and v to their slots
//   silu_mul          silu(gate) * up of a fused gate|up row
//   decode_attention  one query per sequence over its paged K/V (grouped-query heads share
//                     each K/V row they load), online softmax
//
// All fp32, any number of threads (ATen's pool). The plain torch references they are tested
// against live in rocmforge.models.layers / rocmforge.attention.torch_ref.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "ops.h"

namespace rocmforge {
namespace {

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, " must be a CPU float32 tensor");
}

// Eight independent partial sums: the compiler turns them into vector FMAs (a single
// running sum is a serial chain it may not reorder).
inline float dot_f32(const float* a, const float* b, int64_t n) {
  float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  }
  float sum = ((partial[0] + partial[4]) + (partial[1] + partial[5])) + ((partial[2] + partial[6]) + (partial[3] + partial[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  const int64_t n = weight.numel();
  TORCH_CHECK(x.size(-1) == n, "x rows must have ", n, " elements");
  at::Tensor rows = x.reshape({-1, n}).contiguous();
  at::Tensor sum = rows;
  if (residual.has_value()) {
    check_f32(*residual, "residual");
    sum = at::empty_like(rows);
  }
  at::Tensor out = at::empty_like(rows);
  const at::Tensor res = residual.has_value() ? residual->reshape({-1, n}).contiguous() : at::Tensor();
  const float* xp = rows.data_ptr<float>();
  const float* rp = residual.has_value() ? res.data_ptr<float>() : nullptr;
  const float* wp = weight.contiguous().data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * n;
      float* sr = sp + r * n;
      double squares = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const float v = rp != nullptr ? xr[i] + rp[r * n + i] : xr[i];
        if (rp != nullptr) sr[i] = v;
        squares += static_cast<double>(v) * v;
      }
      const float inv = 1.0f / std::sqrt(static_cast<float>(squares / n) + static_cast<float>(eps));
      const float* vr = rp != nullptr ? sr : xr;
      for (int64_t i = 0; i < n; ++i) op[r * n + i] = wp[i] * (vr[i] * inv);
    }
  });
  return {out.view(x.sizes()), sum.view(x.sizes())};
}

at::Tensor rope_write_kv(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads) {
  check_f32(qk, "qk");
  check_f32(v, "v");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(qk.dim() == 3 && v.dim() == 3, "qk and v must be [tokens, heads, head_dim]");
  const int64_t tokens = qk.size(0), heads = qk.size(1), dim = qk.size(2), kv_heads = heads - num_heads;
  TORCH_CHECK(kv_heads > 0 && v.size(0) == tokens && v.size(1) == kv_heads && v.size(2) == dim && dim % 2 == 0,
              "qk must be [T, heads + kv_heads, D] and v [T, kv_heads, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.size(-2) == kv_heads &&
                  k_cache.size(-1) == dim && v_cache.sizes() == k_cache.sizes(),
              "the KV caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == tokens, "one int64 slot per token");
  const at::Tensor c = cos.reshape({tokens, dim / 2}).contiguous(), s = sin.reshape({tokens, dim / 2}).contiguous();
  const int64_t num_slots = k_cache.numel() / (kv_heads * dim);
  at::Tensor q = at::empty({tokens, num_heads, dim}, qk.options());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "slot ", slots[t], " out of range");
  }
  float* qp = q.data_ptr<float>();
  float* kp = k_cache.data_ptr<float>();
  float* vp = v_cache.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const bool is_q = h < num_heads;
        if (!is_q && slots[t] < 0) break;
        float* dst = is_q ? qp + (t * num_heads + h) * dim : kp + (slots[t] * kv_heads + (h - num_heads)) * dim;
        const float* src = qk.data_ptr<float>() + t * qk.stride(0) + h * qk.stride(1);
        const int64_t step = qk.stride(2);
        for (int64_t i = 0; i < dim / 2; ++i) {
          const float a = src[2 * i * step], b = src[(2 * i + 1) * step];
          const float co = cp[t * (dim / 2) + i], si = sp[t * (dim / 2) + i];
          dst[2 * i] = a * co - b * si;
          dst[2 * i + 1] = b * co + a * si;
        }
      }
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const float* src = v.data_ptr<float>() + t * v.stride(0) + h * v.stride(1);
        float* dst = vp + (slots[t] * kv_heads + h) * dim;
        for (int64_t i = 0; i < dim; ++i) dst[i] = src[i * v.stride(2)];
      }
    }
  });
  return q;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1) / 2;
  at::Tensor rows = gate_up.reshape({-1, 2 * width}).contiguous();
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty({rows.size(0), width}, rows.options());
  const float* gp = rows.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows.size(0) * width, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / width, j = i % width;
      const float g = gp[r * 2 * width + j];
      op[i] = g / (1.0f + std::exp(-g)) * gp[r * 2 * width + width + j];
    }
  });
  return out.view(shape);
}

// q [B, H, D]: one query per sequence b, at position seq_lens[b] - 1, attending to keys
// 0 .. seq_lens[b] - 1 of its block table. Per (sequence, kv head): the group of H / KVH
// query heads walks the K rows once (scores), then the V rows once (weighted sum).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  check_f32(q, "q");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q must be [B, H, D], the caches contiguous [blocks, block_size, KVH, D]");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "head_dim / grouped heads mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  block_tables.size(0) == batch && seq_lens.numel() == batch,
              "block_tables [B, max_blocks] and seq_lens [B], int64");
  const at::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous(), queries = q.contiguous();
  const int64_t max_blocks = tables.size(1), group = heads / kv_heads;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * block_size, "sequence length ", lp[b], " outside its table");
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i) {
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < num_blocks, "block id out of range");
    }
  }
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  const float* qp = queries.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, kvh = item % kv_heads, len = lp[b];
      scores.assign(static_cast<size_t>(group * len), 0.0f);
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = tp[b * max_blocks + p / block_size] * block_size + p % block_size;
        const float* key = kp + (slot * kv_heads + kvh) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* query = qp + (b * heads + kvh * group + g) * dim;
          scores[g * len + p] = dot_f32(query, key, dim) * fscale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * len;
        float peak = row[0];
        for (int64_t p = 1; p < len; ++p) peak = std::fmax(peak, row[p]);
        float total = 0.0f;
        for (int64_t p = 0; p < len; ++p) total += (row[p] = std::exp(row[p] - peak));
        const float inv = 1.0f / total;
        for (int64_t p = 0; p < len; ++p) row[p] *= inv;
        float* dst = op + (b * heads + kvh * group + g) * dim;
        for (int64_t i = 0; i < dim; ++i) dst[i] = 0.0f;
      }
      for (int64_t p = 0; p < len; ++p) {
        const int64_t slot = tp[b * max_blocks + p / block_size] * block_size + p % block_size;
        const float* value = vp + (slot * kv_heads + kvh) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * len + p];
          float* dst = op + (b * heads + kvh * group + g) * dim;
          for (int64_t i = 0; i < dim; ++i) dst[i] += w * value[i];
        }
      }
    }
  });
  return out;
}

}  // namespace rocmforge

TORCH_LIBRARY_FRAGMENT(rocmforge_cpu, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &rocmforge::add_rms_norm);
  m.def("rope_write_kv(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, int num_heads) -> Tensor",
        &rocmforge::rope_write_kv);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &rocmforge::silu_mul);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "float scale) -> Tensor",
        &rocmforge::decode_attention);
}
