// The operators other C++ code composes (decoder_layer.cpp): the same functions the torch
// library registers, callable without the dispatcher. Defined in ops.cpp (matmul) and
// layer_ops.cpp (the small per-layer ops); their comments say what each computes.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace rocmforge {

void matmul(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& types,
            at::Tensor& out, int64_t isa);

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps);

at::Tensor rope_write_kv(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads);

at::Tensor silu_mul(const at::Tensor& gate_up);

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale);

}  // namespace rocmforge
