// RMSNorm (optionally preceded by a residual add) written into a zero-padded hidden dimension.
//
// vLLM pads the MoE input along the hidden dimension to the multiple its GEMM wants (gpt-oss:
// 2880 -> 3072) with F.pad right after the residual add + RMSNorm. Fused, the normalized row
// goes straight into the [rows, padded_hidden] output and the pad columns are written as zeros,
// instead of a normalized [rows, H] tensor that the pad then reads and copies.
//
// Math (vLLM 0.26's vllm_ir.rms_norm / fused_add_rms_norm native impls, then F.pad):
//   x   = float(input) [+ float(residual)]          residual_out = T(x)
//   n   = T(x * rsqrt(sum(x^2) * (1/H) + eps))      (no FMA: mean, then + eps, as torch)
//   y   = T(float(n) * float(weight))               out[:, :H] = y, out[:, H:] = 0
//
// Memory traffic: one read of input (and residual), one read of weight per row (cached), one
// write of the padded output (and residual_out). The fast kernel keeps the row in registers
// between the sum of squares and the output pass: a team of `tpr` threads owns a row, each
// thread NV 16-byte vectors. Rows too wide for that, or not 16-byte aligned (H or
// padded_hidden not a multiple of 8, odd strides), take the scalar kernel, which re-reads the
// row from L2.
#include "common.cuh"
#include "host_utils.h"
#include "ops.h"

namespace vllm_fusion {
namespace {

struct NormPadArgs {
  const void* input;
  int64_t in_stride;  // elements between rows
  const void* residual;
  int64_t res_stride;
  void* residual_out;  // contiguous [rows, H]
  const void* weight;
  void* out;  // contiguous [rows, padded]
  int64_t rows;
  int hidden;
  int padded;
  float inv_hidden;  // 1.0f / hidden: torch's mean() multiplies the sum by this factor
  float eps;
  int tpr;
};

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
template <typename T, int NV, bool RESIDUAL>
__global__ void __launch_bounds__(max_threads_for_nv(NV)) rms_norm_pad_kernel(const NormPadArgs a) {
  __shared__ float smem_sum[kMaxWarps];
  const int tpr = a.tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool row_ok = row < a.rows;
  const int nvec = a.hidden / kVec;
  const int nvec_out = a.padded / kVec;

  Vec8<T> xin[NV], rin[NV], win[NV];
  const T* __restrict__ in = static_cast<const T*>(a.input) + row * a.in_stride;
  const T* __restrict__ res = static_cast<const T*>(a.residual) + row * a.res_stride;
  const T* __restrict__ w = static_cast<const T*>(a.weight);
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + k * tpr;
    if (row_ok && j < nvec) {
      xin[k].raw = *reinterpret_cast<const uint4*>(in + j * kVec);
      if constexpr (RESIDUAL) rin[k].raw = *reinterpret_cast<const uint4*>(res + j * kVec);
      win[k].raw = __ldg(reinterpret_cast<const uint4*>(w + j * kVec));
    }
  }

  T* __restrict__ res_out = static_cast<T*>(a.residual_out) + row * a.hidden;
  T* __restrict__ out = static_cast<T*>(a.out) + row * a.padded;
  // The pad columns do not depend on the row's values: write them while the loads fly.
  if (row_ok) {
    for (int j = nvec + lane; j < nvec_out; j += tpr)
      *reinterpret_cast<uint4*>(out + j * kVec) = make_uint4(0u, 0u, 0u, 0u);
  }

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

#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = lane + k * tpr;
    if (row_ok && j < nvec) {
      float x[kVec], y[kVec];
      row_values<T, RESIDUAL>(xin[k], rin[k], x);
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        y[i] = round_to<T>(x[i] * rinv) * to_float(win[k].h[i]);
      store8(out + j * kVec, y);
    }
  }
}

// Any hidden size / alignment: one block per row, scalar accesses, the row re-read for the
// output pass.
template <typename T, bool RESIDUAL>
__global__ void __launch_bounds__(1024) rms_norm_pad_fallback_kernel(const NormPadArgs a) {
  __shared__ float smem_sum[kMaxWarps];
  const int64_t row = blockIdx.x;
  const int H = a.hidden;
  const T* __restrict__ in = static_cast<const T*>(a.input) + row * a.in_stride;
  const T* __restrict__ res = static_cast<const T*>(a.residual) + row * a.res_stride;
  T* __restrict__ res_out = static_cast<T*>(a.residual_out) + row * H;
  T* __restrict__ out = static_cast<T*>(a.out) + row * a.padded;
  const T* __restrict__ w = static_cast<const T*>(a.weight);

  auto xval = [&](int i) {
    float v = to_float(in[i]);
    if constexpr (RESIDUAL) v += to_float(res[i]);
    return v;
  };

  for (int i = H + threadIdx.x; i < a.padded; i += blockDim.x) out[i] = from_float<T>(0.f);
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = xval(i);
    if constexpr (RESIDUAL) res_out[i] = from_float<T>(v);
    ss += v * v;
  }
  ss = block_reduce(ss, smem_sum, SumOp{}, 0.f);
  const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_hidden), a.eps));
  for (int i = threadIdx.x; i < H; i += blockDim.x)
    out[i] = from_float<T>(round_to<T>(xval(i) * rinv) * to_float(w[i]));
}

template <typename T, bool RESIDUAL>
void launch_typed(const NormPadArgs& base, bool vector_ok, int32_t device, gpuStream_t stream) {
  const DeviceInfo& dev = device_info(device);
  NormPadArgs a = base;
  TeamConfig c;
  // 256 threads for many rows: the 128-thread teams of the quant kernels were not measured here.
  if (vector_ok)
    c = pick_row_team(a.hidden / kVec, a.rows, 1, dev.num_sms, dev.warp_size,
                      /*many_rows_threads=*/256);
  if (c.nv == 0) {
    const int threads = a.padded >= 4096 ? 1024 : 256;
    rms_norm_pad_fallback_kernel<T, RESIDUAL>
        <<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(a);
    return;
  }
  a.tpr = c.tpr;
  const int64_t blocks = (a.rows + c.rows_per_block - 1) / c.rows_per_block;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (c.nv) {
    case 1:
      rms_norm_pad_kernel<T, 1, RESIDUAL><<<grid, c.threads, 0, stream>>>(a);
      break;
    case 2:
      rms_norm_pad_kernel<T, 2, RESIDUAL><<<grid, c.threads, 0, stream>>>(a);
      break;
    case 4:
      rms_norm_pad_kernel<T, 4, RESIDUAL><<<grid, c.threads, 0, stream>>>(a);
      break;
    default:
      rms_norm_pad_kernel<T, 8, RESIDUAL><<<grid, c.threads, 0, stream>>>(a);
      break;
  }
}

template <bool RESIDUAL>
void launch(ScalarType dt, const NormPadArgs& a, bool vector_ok, int32_t device,
            gpuStream_t stream) {
  if (dt == ScalarType::BFloat16)
    launch_typed<bf16_t, RESIDUAL>(a, vector_ok, device, stream);
  else
    launch_typed<half_t, RESIDUAL>(a, vector_ok, device, stream);
}

struct NormPadResult {
  Tensor out;
  std::optional<Tensor> residual_out;
};

NormPadResult norm_pad(const char* op, const Tensor& input, const std::optional<Tensor>& residual,
                       const Tensor& weight, double epsilon, int64_t padded_hidden) {
  check_activation(op, "input", input);
  const int64_t H = input.size(-1);
  VF_CHECK(padded_hidden >= H, op, ": padded_hidden must be at least the hidden size ", H,
           " (the last dim of input), got ", padded_hidden);
  VF_CHECK(padded_hidden <= INT32_MAX / 2, op, ": padded_hidden too large (", padded_hidden,
           ")");
  if (residual) {
    check_activation(op, "residual", *residual);
    check_same_device(op, "residual", *residual, input);
    check_same_shape(op, "residual", *residual, input);
    VF_CHECK(residual->scalar_type() == input.scalar_type(), op,
             ": residual must have the same dtype as input (", dtype_name(input.scalar_type()),
             "), got ", dtype_name(residual->scalar_type()));
  }
  check_same_device(op, "weight", weight, input);
  VF_CHECK(weight.dim() == 1 && weight.size(0) == H, op, ": weight must be 1-D of size ", H,
           " (the last dim of input)");
  VF_CHECK(weight.scalar_type() == input.scalar_type(), op,
           ": weight must have the same dtype as input (", dtype_name(input.scalar_type()),
           "), got ", dtype_name(weight.scalar_type()));
  VF_CHECK(weight.size(0) == 1 || weight.stride(0) == 1, op, ": weight must be contiguous");

  const int32_t device = input.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  std::vector<int64_t> shape = shape_of(input);

  NormPadResult r;
  if (residual) r.residual_out = torch::stable::new_empty(input, shape, input.scalar_type());
  shape.back() = padded_hidden;
  r.out = torch::stable::new_empty(input, shape, input.scalar_type());

  const RowView in = as_rows(input);
  if (in.rows == 0) return r;  // nothing to launch
  std::optional<RowView> res;
  if (residual) res = as_rows(*residual);

  NormPadArgs a{};
  a.input = in.tensor.const_data_ptr();
  a.in_stride = in.stride;
  a.residual = res ? res->tensor.const_data_ptr() : nullptr;
  a.res_stride = res ? res->stride : 0;
  a.residual_out = r.residual_out ? r.residual_out->mutable_data_ptr() : nullptr;
  a.weight = weight.const_data_ptr();
  a.out = r.out.mutable_data_ptr();
  a.rows = in.rows;
  a.hidden = static_cast<int>(H);
  a.padded = static_cast<int>(padded_hidden);
  a.inv_hidden = 1.0f / static_cast<float>(H);
  a.eps = static_cast<float>(epsilon);
  a.tpr = 0;

  // Output rows start 16-byte aligned only when padded_hidden is a multiple of 8.
  const bool vector_ok = H % kVec == 0 && padded_hidden % kVec == 0 && in.stride % kVec == 0 &&
                         aligned16(a.input) && aligned16(a.weight) && aligned16(a.out) &&
                         (!res || (res->stride % kVec == 0 && aligned16(a.residual)));
  const gpuStream_t stream = current_stream(device);
  if (residual)
    launch<true>(input.scalar_type(), a, vector_ok, device, stream);
  else
    launch<false>(input.scalar_type(), a, vector_ok, device, stream);
  check_launch(op);
  return r;
}

}  // namespace

Tensor rms_norm_pad(const Tensor& input, const Tensor& weight, double epsilon,
                    int64_t padded_hidden) {
  return norm_pad("vllm_fusion::rms_norm_pad", input, std::nullopt, weight, epsilon,
                  padded_hidden)
      .out;
}

std::tuple<Tensor, Tensor> fused_add_rms_norm_pad(const Tensor& input, const Tensor& residual,
                                                  const Tensor& weight, double epsilon,
                                                  int64_t padded_hidden) {
  NormPadResult r = norm_pad("vllm_fusion::fused_add_rms_norm_pad", input, residual, weight,
                             epsilon, padded_hidden);
  return {r.out, *r.residual_out};
}

}  // namespace vllm_fusion
