// Host entry points of the ops registered as torch.ops.vllm_fusion.* (schemas in
// torch_bindings.cpp). Every op is functional: it allocates and returns its outputs.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

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

// ---- RMSNorm (+ residual add) + NVFP4 quant (SM100+): csrc/norm_quant_kernels.cu
// Output as vLLM's scaled_fp4_quant(y, global_scale, is_sf_swizzled_layout=True): packed e2m1
// [rows, H / 2] uint8 and swizzled e4m3 block scales [round_up(rows, 128), round_up(H / 16, 4) /
// 4] int32, rows = input.numel() / H.

// -> (quantized, block_scales)
std::tuple<Tensor, Tensor> rms_norm_nvfp4_quant(const Tensor& input, const Tensor& weight,
                                                const Tensor& global_scale, double epsilon);

// -> (quantized, residual_out, block_scales)
std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_nvfp4_quant(const Tensor& input,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& global_scale,
                                                                  double epsilon);

// ---- SiLU(x[..., :d]) * x[..., d:] + FP8 quant: csrc/act_quant_kernels.cu

Tensor silu_and_mul_static_fp8_quant(const Tensor& input, const Tensor& scale);

// -> (quantized, scales)
std::tuple<Tensor, Tensor> silu_and_mul_dynamic_fp8_quant(const Tensor& input,
                                                          int64_t group_size,
                                                          bool scale_transposed,
                                                          bool scale_ue8m0,
                                                          const std::optional<Tensor>& scale_ub);

// SiLU-and-Mul + NVFP4 quant (SM100+), outputs as rms_norm_nvfp4_quant's with H = d.
// -> (quantized, block_scales)
std::tuple<Tensor, Tensor> silu_and_mul_nvfp4_quant(const Tensor& input,
                                                    const Tensor& global_scale);

// ---- RMSNorm (+ residual add) into a zero-padded hidden dim: csrc/norm_pad_kernels.cu

// -> out [..., padded_hidden]: the normalized input, then zeros
Tensor rms_norm_pad(const Tensor& input, const Tensor& weight, double epsilon,
                    int64_t padded_hidden);

// -> (out [..., padded_hidden], residual_out)
std::tuple<Tensor, Tensor> fused_add_rms_norm_pad(const Tensor& input, const Tensor& residual,
                                                  const Tensor& weight, double epsilon,
                                                  int64_t padded_hidden);

// ---- [per-head RMSNorm of q and k] + RoPE + paged KV-cache write: csrc/rope_kernels.cu
// query [T, Hq, D], key [T, Hkv, D], value [T, Hkv, Dv] (views with any token / head stride,
// last stride 1); cos_sin_cache [max_pos, rot] (cos | sin halves); key_cache / value_cache
// [num_blocks, block_size, Hkv, D / Dv] with any strides, written in place for the tokens
// t < slot_mapping.size(0) whose slot is >= 0. Contract: docs of vllm_fusion/ops/rope.py.

// -> (q_out [T, Hq, D], k_out [T, Hkv, D]), contiguous
std::tuple<Tensor, Tensor> qk_norm_rope_kv_cache(
    const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& positions,
    const Tensor& cos_sin_cache, bool is_neox, const std::optional<Tensor>& q_weight,
    const std::optional<Tensor>& k_weight, double epsilon, const std::optional<Tensor>& key_cache,
    const std::optional<Tensor>& value_cache, const std::optional<Tensor>& slot_mapping,
    const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale);

// ---- all-reduce over one node + residual add + RMSNorm (+ static FP8): csrc/allreduce_kernels.cu
// `buffers` holds every rank's peer-addressable workspace address (this process's mapping), each
// laid out as all_reduce_flag_bytes() of zeroed flags then four halves of `capacity` bytes;
// `counter` is this rank's int64 [2] call counter (zeroed once, then owned by the kernel).

// Bytes of the flag region at the start of every rank's workspace.
int64_t all_reduce_flag_bytes();

// -> (out: normalized [input dtype] or fp8 when `scale` is given, residual_out)
std::tuple<Tensor, Tensor> all_reduce_rms_norm(const Tensor& input,
                                               const std::optional<Tensor>& residual,
                                               const Tensor& weight, double epsilon,
                                               const std::optional<Tensor>& scale,
                                               const std::vector<int64_t>& buffers,
                                               const Tensor& counter, int64_t rank,
                                               int64_t capacity, bool two_shot, bool push);

}  // namespace vllm_fusion
