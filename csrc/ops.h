// Host entry points of the ops registered as torch.ops.vllm_fusion.* (schemas in
// torch_bindings.cpp). Every op is functional: it allocates and returns its outputs.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace vllm_fusion {

using torch::stable::Tensor;

// ---- RMSNorm (+ residual add) + FP8 quant: csrc/norm_quant_kernels.cu

Tensor rms_norm_static_fp8_quant(const Tensor& input, const Tensor& weight, const Tensor& scale,
                                 double epsilon);

// -> (quantized, residual_out)
std::tuple<Tensor, Tensor> fused_add_rms_norm_static_fp8_quant(const Tensor& input,
                                                               const Tensor& residual,
                                                               const Tensor& weight,
                                                               const Tensor& scale,
                                                               double epsilon);

// -> (quantized, scales)
std::tuple<Tensor, Tensor> rms_norm_dynamic_fp8_quant(const Tensor& input, const Tensor& weight,
                                                      double epsilon, int64_t group_size,
                                                      bool scale_transposed, bool scale_ue8m0,
                                                      const std::optional<Tensor>& scale_ub);

// -> (quantized, residual_out, scales)
std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_dynamic_fp8_quant(
    const Tensor& input, const Tensor& residual, const Tensor& weight, double epsilon,
    int64_t group_size, bool scale_transposed, bool scale_ue8m0,
    const std::optional<Tensor>& scale_ub);

// ---- SiLU(x[..., :d]) * x[..., d:] + FP8 quant: csrc/act_quant_kernels.cu

Tensor silu_and_mul_static_fp8_quant(const Tensor& input, const Tensor& scale);

// -> (quantized, scales)
std::tuple<Tensor, Tensor> silu_and_mul_dynamic_fp8_quant(const Tensor& input,
                                                          int64_t group_size,
                                                          bool scale_transposed,
                                                          bool scale_ue8m0,
                                                          const std::optional<Tensor>& scale_ub);

// ---- RMSNorm (+ residual add) into a zero-padded hidden dim: csrc/norm_pad_kernels.cu

// -> out [..., padded_hidden]: the normalized input, then zeros
Tensor rms_norm_pad(const Tensor& input, const Tensor& weight, double epsilon,
                    int64_t padded_hidden);

// -> (out [..., padded_hidden], residual_out)
std::tuple<Tensor, Tensor> fused_add_rms_norm_pad(const Tensor& input, const Tensor& residual,
                                                  const Tensor& weight, double epsilon,
                                                  int64_t padded_hidden);

}  // namespace vllm_fusion
