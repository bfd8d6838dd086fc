// RMSNorm (optionally preceded by a residual add) fused with FP8 quantization.
//
// Math (vLLM 0.26's vllm_ir.rms_norm / fused_add_rms_norm native impls, then QuantFP8):
//   x   = float(input) [+ float(residual)]          residual_out = T(x)
//   n   = T(x * rsqrt(sum(x^2) * (1/H) + eps))      (no FMA: mean, then + eps, as torch)
//   y   = T(float(n) * float(weight))               (a T * T multiply, as torch does it)
//   q   = fp8(clamp(quant(y)))                      see QuantKind in common.cuh
//
// Memory traffic is one read of input (and residual), one read of weight per row (cached),
// one write of the FP8 output (and residual_out, and the scales). The fast kernel keeps a row in
// registers between the sum-of-squares and the quantize pass: a team of `tpr` threads owns the
// row, each thread NV 16-byte vectors. Rows too wide for that, or inputs whose rows are not
// 16-byte aligned, take the scalar fallback kernel, which re-reads the row from L2.
#include "common.cuh"
#include "host_utils.h"
#include "ops.h"

namespace vllm_fusion {
namespace {

struct NormArgs {
  const void* input;
  int64_t in_stride;  // elements between rows
  const void* residual;
  int64_t res_stride;
  void* residual_out;  // contiguous [rows, H]
  const void* weight;
  int64_t rows;
  int hidden;
  float inv_hidden;  // 1.0f / hidden: torch's mean() multiplies the sum by this factor
  float eps;
  int tpr;
};

// Loads the vectors a lane owns of `row` (nothing when the row is out of range).
template <typename T, int NV, bool RESIDUAL>
__device__ __forceinline__ void load_row(const NormArgs& a, int64_t row, int lane, int tpr,
                                         int nvec, Vec8<T> (&xin)[NV], Vec8<T> (&rin)[NV]) {
  if (row >= a.rows) return;
  const T* in = static_cast<const T*>(a.input) + row * a.in_stride;
  const T* res = static_cast<const T*>(a.residual) + row * a.res_stride;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + k * tpr;
    if (j < nvec) {
      xin[k].raw = *reinterpret_cast<const uint4*>(in + j * kVec);
      if constexpr (RESIDUAL) rin[k].raw = *reinterpret_cast<const uint4*>(res + j * kVec);
    }
  }
}

// The fp32 value the norm sees: input [+ residual].
template <typename T, bool RESIDUAL>
__device__ __forceinline__ void row_values(const Vec8<T>& xin, const Vec8<T>& rin,
                                           float (&x)[kVec]) {
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    x[i] = to_float(xin.h[i]);
    if constexpr (RESIDUAL) x[i] += to_float(rin.h[i]);
  }
}

// A team of `tpr` threads per row (several teams per block when tpr <= 32). All loads of the
// row (input, residual, weight) are issued before any of them is used.
template <typename T, int NV, QuantKind Q, bool RESIDUAL>
__global__ void __launch_bounds__(max_threads_for_nv(NV))
    rms_norm_quant_kernel(const NormArgs a, const QuantArgs q) {
  __shared__ float smem_sum[kMaxWarps];
  __shared__ float smem_max[kMaxWarps];
  const QuantConsts qc = load_quant_consts<Q>(q);
  const int tpr = a.tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool row_ok = row < a.rows;
  const int nvec = a.hidden / kVec;

  Vec8<T> xin[NV], rin[NV], win[NV];
  load_row<T, NV, RESIDUAL>(a, row, lane, tpr, nvec, xin, rin);
  const T* __restrict__ w = static_cast<const T*>(a.weight);
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + k * tpr;
    if (row_ok && j < nvec) win[k].raw = __ldg(reinterpret_cast<const uint4*>(w + j * kVec));
  }

  T* __restrict__ res_out = static_cast<T*>(a.residual_out) + row * a.hidden;
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + k * tpr;
    if (row_ok && j < nvec) {
      float x[kVec];
      row_values<T, RESIDUAL>(xin[k], rin[k], x);
      if constexpr (RESIDUAL) store8(res_out + j * kVec, x);
#pragma unroll
      for (int i = 0; i < kVec; ++i) ss += x[i] * x[i];
    }
  }
  ss = team_reduce(ss, tpr, smem_sum, SumOp{}, 0.f);
  // torch: x * rsqrt(mean(x^2) + eps), mean = sum * (1/H); no FMA between the two.
  const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_hidden), a.eps));

  auto values = [&](int k, float (&y)[kVec]) {
    float x[kVec];
    row_values<T, RESIDUAL>(xin[k], rin[k], x);
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      y[i] = round_to<T>(round_to<T>(x[i] * rinv) * to_float(win[k].h[i]));
  };
  quantize_team<T, Q, NV>(values, q, qc, row, row_ok, lane, tpr, 0, nvec, smem_max);
}

// Any hidden size / alignment: one block per row, scalar accesses, the row re-read per pass.
template <typename T, QuantKind Q, bool RESIDUAL>
__global__ void __launch_bounds__(1024)
    rms_norm_quant_fallback_kernel(const NormArgs a, const QuantArgs q) {
  __shared__ float smem_sum[kMaxWarps];
  __shared__ float smem_max[kMaxWarps];
  const int64_t row = blockIdx.x;
  const int H = a.hidden;
  const T* __restrict__ in = static_cast<const T*>(a.input) + row * a.in_stride;
  const T* __restrict__ res = static_cast<const T*>(a.residual) + row * a.res_stride;
  T* __restrict__ res_out = static_cast<T*>(a.residual_out) + row * H;
  const T* __restrict__ w = static_cast<const T*>(a.weight);

  auto xval = [&](int i) {
    float v = to_float(in[i]);
    if constexpr (RESIDUAL) v += to_float(res[i]);
    return v;
  };

  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = xval(i);
    if constexpr (RESIDUAL) res_out[i] = from_float<T>(v);
    ss += v * v;
  }
  ss = block_reduce(ss, smem_sum, SumOp{}, 0.f);
  const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_hidden), a.eps));

  auto yval = [&](int i) {
    return round_to<T>(round_to<T>(xval(i) * rinv) * to_float(w[i]));
  };
  quantize_store_row_scalar<Q>(yval, H, q, load_quant_consts<Q>(q), row, smem_max);
}

// One NVFP4 kernel of this file: its image tells which archs the file was built for.
inline const void* nvfp4_probe_kernel() {
#if VF_NVFP4_BUILD
  return reinterpret_cast<const void*>(
      &rms_norm_quant_fallback_kernel<bf16_t, QuantKind::kNvfp4, false>);
#else
  return nullptr;
#endif
}

template <typename T, QuantKind Q, bool RESIDUAL>
void launch_typed(const NormArgs& base, const QuantArgs& q, bool vector_ok, int32_t device,
                  gpuStream_t stream) {
  const DeviceInfo& dev = device_info(device);
  NormArgs a = base;
  const int64_t nvec = a.hidden / kVec;
  TeamConfig c;
  if (vector_ok)
    c = pick_row_team(nvec, a.rows, QuantTraits<Q>::kGroupLanes, dev.num_sms, dev.warp_size);
  if (c.nv == 0) {
    const int threads = a.hidden >= 4096 ? 1024 : 256;
    rms_norm_quant_fallback_kernel<T, Q, RESIDUAL>
        <<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(a, q);
    return;
  }
  a.tpr = c.tpr;
  const int64_t blocks = (a.rows + c.rows_per_block - 1) / c.rows_per_block;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (c.nv) {
    case 1:
      rms_norm_quant_kernel<T, 1, Q, RESIDUAL><<<grid, c.threads, 0, stream>>>(a, q);
      break;
    case 2:
      rms_norm_quant_kernel<T, 2, Q, RESIDUAL><<<grid, c.threads, 0, stream>>>(a, q);
      break;
    case 4:
      rms_norm_quant_kernel<T, 4, Q, RESIDUAL><<<grid, c.threads, 0, stream>>>(a, q);
      break;
    default:
      rms_norm_quant_kernel<T, 8, Q, RESIDUAL><<<grid, c.threads, 0, stream>>>(a, q);
      break;
  }
}

template <QuantKind Q, bool RESIDUAL>
void launch_quant(ScalarType dt, const NormArgs& a, const QuantArgs& q, bool vector_ok,
                  int32_t device, gpuStream_t stream) {
  if (dt == ScalarType::BFloat16)
    launch_typed<bf16_t, Q, RESIDUAL>(a, q, vector_ok, device, stream);
  else
    launch_typed<half_t, Q, RESIDUAL>(a, q, vector_ok, device, stream);
}

template <bool RESIDUAL>
void launch(QuantKind kind, ScalarType dt, const NormArgs& a, const QuantArgs& q, bool vector_ok,
            int32_t device, gpuStream_t stream) {
  switch (kind) {
    case QuantKind::kStatic:
      launch_quant<QuantKind::kStatic, RESIDUAL>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kPerToken:
      launch_quant<QuantKind::kPerToken, RESIDUAL>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kGroup64:
      launch_quant<QuantKind::kGroup64, RESIDUAL>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kGroup128:
      launch_quant<QuantKind::kGroup128, RESIDUAL>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kNvfp4:
#if VF_NVFP4_BUILD  // else refused by check_nvfp4_kernel
      launch_quant<QuantKind::kNvfp4, RESIDUAL>(dt, a, q, vector_ok, device, stream);
#endif
      break;
  }
}

struct NormQuantResult {
  Tensor out;
  std::optional<Tensor> residual_out;
  std::optional<Tensor> scales;
};

NormQuantResult norm_quant(const char* op, const Tensor& input,
                           const std::optional<Tensor>& residual, const Tensor& weight,
                           double epsilon, QuantKind kind,
                           const std::optional<Tensor>& scale,  // static scale / NVFP4 global
                           const std::optional<Tensor>& scale_ub, bool scale_transposed,
                           bool scale_ue8m0) {
  check_activation(op, "input", input);
  const int64_t H = input.size(-1);
  if (residual) {
    check_activation(op, "residual", *residual);
    check_same_device(op, "residual", *residual, input);
    check_same_shape(op, "residual", *residual, input);
    VF_CHECK(residual->scalar_type() == input.scalar_type(), op,
                    ": residual must have the same dtype as input (",
                    dtype_name(input.scalar_type()), "), got ",
                    dtype_name(residual->scalar_type()));
  }
  check_same_device(op, "weight", weight, input);
  VF_CHECK(weight.dim() == 1 && weight.size(0) == H, op,
                  ": weight must be 1-D of size ", H, " (the last dim of input)");
  VF_CHECK(weight.scalar_type() == input.scalar_type(), op,
                  ": weight must have the same dtype as input (", dtype_name(input.scalar_type()),
                  "), got ", dtype_name(weight.scalar_type()));
  VF_CHECK(weight.size(0) == 1 || weight.stride(0) == 1, op,
                  ": weight must be contiguous");
  if (scale)
    check_scale_scalar(op, kind == QuantKind::kNvfp4 ? "global_scale" : "scale", *scale, input);
  if (scale_ub) check_scale_scalar(op, "scale_ub", *scale_ub, input);

  const int32_t device = input.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const std::vector<int64_t> shape = shape_of(input);
  const bool nvfp4 = kind == QuantKind::kNvfp4;
  const Fp8Format fmt = nvfp4 ? Fp8Format{} : fp8_format(device);
  if (nvfp4) check_nvfp4_kernel(op, nvfp4_probe_kernel(), device);

  NormQuantResult r;
  const RowView in = as_rows(input);
  const Nvfp4Layout fp4 = nvfp4_layout(in.rows, H);
  std::optional<Nvfp4Outputs> fp4_out;
  if (nvfp4) {
    fp4_out = alloc_nvfp4_outputs(input, fp4);
    r.out = fp4_out->out;
    r.scales = fp4_out->scales;
  } else {
    r.out = torch::stable::new_empty(input, shape, fmt.dtype);
  }
  if (residual) r.residual_out = torch::stable::new_empty(input, shape, input.scalar_type());
  const int64_t group = group_size_of(kind);
  if (kind != QuantKind::kStatic && !nvfp4)
    r.scales = alloc_scales(input, shape, group ? H / group : 1, scale_transposed);

  if (in.rows == 0) return r;  // nothing to launch
  std::optional<RowView> res;
  if (residual) res = as_rows(*residual);

  NormArgs a{};
  a.input = in.tensor.const_data_ptr();
  a.in_stride = in.stride;
  a.residual = res ? res->tensor.const_data_ptr() : nullptr;
  a.res_stride = res ? res->stride : 0;
  a.residual_out = r.residual_out ? r.residual_out->mutable_data_ptr() : nullptr;
  a.weight = weight.const_data_ptr();
  a.rows = in.rows;
  a.hidden = static_cast<int>(H);
  a.inv_hidden = 1.0f / static_cast<float>(H);
  a.eps = static_cast<float>(epsilon);
  a.tpr = 0;

  const QuantArgs q = nvfp4 ? make_nvfp4_quant_args(*fp4_out, *scale, fp4)
                            : make_quant_args(r.out, H, r.scales, scale, scale_ub, fmt, input,
                                              group, scale_ue8m0, scale_transposed);

  const bool vector_ok = H % kVec == 0 && in.stride % kVec == 0 && aligned16(a.input) &&
                         aligned16(a.weight) &&
                         (!res || (res->stride % kVec == 0 && aligned16(a.residual)));
  const gpuStream_t stream = current_stream(device);
  if (residual)
    launch<true>(kind, input.scalar_type(), a, q, vector_ok, device, stream);
  else
    launch<false>(kind, input.scalar_type(), a, q, vector_ok, device, stream);
  check_launch(op);
  return r;
}

}  // namespace

Tensor rms_norm_static_fp8_quant(const Tensor& input, const Tensor& weight, const Tensor& scale,
                                 double epsilon) {
  return norm_quant("vllm_fusion::rms_norm_static_fp8_quant", input, std::nullopt, weight,
                    epsilon, QuantKind::kStatic, scale, std::nullopt, false, false)
      .out;
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_static_fp8_quant(const Tensor& input,
                                                               const Tensor& residual,
                                                               const Tensor& weight,
                                                               const Tensor& scale,
                                                               double epsilon) {
  NormQuantResult r =
      norm_quant("vllm_fusion::fused_add_rms_norm_static_fp8_quant", input, residual, weight,
                 epsilon, QuantKind::kStatic, scale, std::nullopt, false, false);
  return {r.out, *r.residual_out};
}

std::tuple<Tensor, Tensor> rms_norm_dynamic_fp8_quant(const Tensor& input, const Tensor& weight,
                                                      double epsilon, int64_t group_size,
                                                      bool scale_transposed, bool scale_ue8m0,
                                                      const std::optional<Tensor>& scale_ub) {
  constexpr const char* op = "vllm_fusion::rms_norm_dynamic_fp8_quant";
  check_activation(op, "input", input);
  const QuantKind kind = dynamic_quant_kind(op, group_size, input.size(-1), scale_transposed,
                                            scale_ue8m0, input.dim());
  NormQuantResult r = norm_quant(op, input, std::nullopt, weight, epsilon, kind, std::nullopt,
                                 scale_ub, scale_transposed, scale_ue8m0);
  return {r.out, *r.scales};
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_dynamic_fp8_quant(
    const Tensor& input, const Tensor& residual, const Tensor& weight, double epsilon,
    int64_t group_size, bool scale_transposed, bool scale_ue8m0,
    const std::optional<Tensor>& scale_ub) {
  constexpr const char* op = "vllm_fusion::fused_add_rms_norm_dynamic_fp8_quant";
  check_activation(op, "input", input);
  const QuantKind kind = dynamic_quant_kind(op, group_size, input.size(-1), scale_transposed,
                                            scale_ue8m0, input.dim());
  NormQuantResult r = norm_quant(op, input, residual, weight, epsilon, kind, std::nullopt,
                                 scale_ub, scale_transposed, scale_ue8m0);
  return {r.out, *r.residual_out, *r.scales};
}

std::tuple<Tensor, Tensor> rms_norm_nvfp4_quant(const Tensor& input, const Tensor& weight,
                                                const Tensor& global_scale, double epsilon) {
  constexpr const char* op = "vllm_fusion::rms_norm_nvfp4_quant";
  check_activation(op, "input", input);
  check_nvfp4_width(op, input.size(-1), "hidden size (last dim of input)");
  NormQuantResult r = norm_quant(op, input, std::nullopt, weight, epsilon, QuantKind::kNvfp4,
                                 global_scale, std::nullopt, false, false);
  return {r.out, *r.scales};
}

std::tuple<Tensor, Tensor, Tensor> fused_add_rms_norm_nvfp4_quant(const Tensor& input,
                                                                  const Tensor& residual,
                                                                  const Tensor& weight,
                                                                  const Tensor& global_scale,
                                                                  double epsilon) {
  constexpr const char* op = "vllm_fusion::fused_add_rms_norm_nvfp4_quant";
  check_activation(op, "input", input);
  check_nvfp4_width(op, input.size(-1), "hidden size (last dim of input)");
  NormQuantResult r = norm_quant(op, input, residual, weight, epsilon, QuantKind::kNvfp4,
                                 global_scale, std::nullopt, false, false);
  return {r.out, *r.residual_out, *r.scales};
}

}  // namespace vllm_fusion
