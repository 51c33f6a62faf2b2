// One llama-family decoder layer of a decode step (one new token per sequence) in a single
// operator call (torch.ops.rocmforge_cpu.decoder_layer): the composition of the operators
// that rocmforge.models.llama.DecoderLayer calls one by one on the native path, in the same
// order on the same kernels, so the result is the same to the bit; what it removes is the
// Python and dispatcher work between them (a few microseconds per call, dozens of calls per
// layer).
//
//   (x, residual) -> norm -> qkv matmul [+ bias] -> RoPE, K/V written to their slots
//                 -> paged decode attention -> o matmul -> add + norm -> gate|up matmul
//                 -> silu * up -> down matmul -> (delta, residual)
//
// The returned pair has DecoderLayer.forward's meaning: the stream after the layer is
// delta + residual, which the next layer's norm adds (fused).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops.h"

namespace rocmforge {
namespace {

at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& types) {
  int64_t rows = 0;
  for (const at::Tensor& w : weights) rows += w.size(0);
  at::Tensor out = at::empty({x.size(0), rows}, x.options());
  matmul(x, weights, types, out, -1);
  return out;
}

std::tuple<at::Tensor, at::Tensor> decoder_layer(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& input_norm,
    const at::Tensor& post_norm, double eps, const std::vector<at::Tensor>& qkv, const std::vector<int64_t>& qkv_types,
    const c10::optional<at::Tensor>& qkv_bias, const std::vector<at::Tensor>& o, const std::vector<int64_t>& o_types,
    const std::vector<at::Tensor>& gate_up, const std::vector<int64_t>& gate_up_types,
    const std::vector<at::Tensor>& down, const std::vector<int64_t>& down_types, const at::Tensor& cos,
    const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t num_heads, double scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [tokens, hidden]");
  TORCH_CHECK(x.size(0) == seq_lens.numel(), "a decode step has one token per sequence");
  const int64_t tokens = x.size(0), kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  auto [normed, stream] = add_rms_norm(x, residual, input_norm, eps);
  at::Tensor projected = linear(normed, qkv, qkv_types);
  if (qkv_bias.has_value()) projected.add_(*qkv_bias);
  const int64_t qk_width = (num_heads + kv_heads) * head_dim;
  TORCH_CHECK(projected.size(1) == qk_width + kv_heads * head_dim, "qkv rows do not match the heads of the cache");
  const at::Tensor qk = projected.narrow(1, 0, qk_width).view({tokens, num_heads + kv_heads, head_dim});
  const at::Tensor v = projected.narrow(1, qk_width, kv_heads * head_dim).view({tokens, kv_heads, head_dim});
  const at::Tensor q = rope_write_kv(qk, v, cos, sin, k_cache, v_cache, slot_mapping, num_heads);
  const at::Tensor attended = decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale);
  const at::Tensor attn_out = linear(attended.view({tokens, num_heads * head_dim}), o, o_types);
  auto [mlp_in, mlp_stream] = add_rms_norm(attn_out, stream, post_norm, eps);
  const at::Tensor hidden = silu_mul(linear(mlp_in, gate_up, gate_up_types));
  return {linear(hidden, down, down_types), mlp_stream};
}

}  // namespace
}  // namespace rocmforge

TORCH_LIBRARY_FRAGMENT(rocmforge_cpu, m) {
  m.def("decoder_layer(Tensor x, Tensor? residual, Tensor input_norm, Tensor post_norm, float eps, "
        "Tensor[] qkv, int[] qkv_types, Tensor? qkv_bias, Tensor[] o, int[] o_types, Tensor[] gate_up, "
        "int[] gate_up_types, Tensor[] down, int[] down_types, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, int num_heads, "
        "float scale) -> (Tensor, Tensor)",
        &rocmforge::decoder_layer);
}
