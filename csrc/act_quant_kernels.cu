// SiLU(gate) * up fused with FP8 quantization, input [..., 2d] = [gate | up], output [..., d].
//
// Math (vLLM 0.26's unfused path: F.silu(x[..., :d]) * x[..., d:] in the input dtype, then
// QuantFP8 / per_token_group_fp8_quant):
//   s = T(g / (1 + exp(-g)))        silu in fp32 (hardware exp and reciprocal), rounded to T
//   y = T(float(s) * float(u))      the T * T multiply, rounded to T
//   q = fp8(clamp(quant(y)))        see QuantKind in common.cuh
//
// Static and per-group quant need no row-wide value, so the grid covers rows x column chunks;
// per-group scales come from a reduction over the 8 / 16 lanes that hold one group. Per-token
// quant needs the row's absmax: one team per whole row, the row held in registers.
#include "common.cuh"
#include "host_utils.h"
#include "ops.h"

namespace vllm_fusion {
namespace {

struct ActArgs {
  const void* input;
  int64_t in_stride;  // elements between rows
  int64_t rows;
  int d;              // output columns (input has 2d)
  int tpr;
};

// exp and the division run on the hardware's exp2 and reciprocal units (__expf, __fdividef):
// expf and an IEEE division took about 16 of the ~40 instructions per element and made the kernel
// issue-bound (H200: 11-22% faster without them, docs/benchmarks/2026-11-28-h200-silu-fast-math.md).
// Inductor's Triton kernel, which the pass replaces, uses the same approximations. The fp32 silu
// moves by a few ulps, which the rounding to T almost always absorbs (at most one ulp of T).
// __fdividef gives 0 for denominators above 2^126 (g < -87), where silu rounds to -0 anyway.
template <typename T>
__device__ __forceinline__ float silu_mul(float g, float u) {
  const float s = round_to<T>(__fdividef(g, 1.0f + __expf(-g)));
  return round_to<T>(s * u);
}

template <typename T, int NV>
__device__ __forceinline__ void load_gate_up(const ActArgs& a, int64_t row, int64_t vbase,
                                             int lane, int tpr, int64_t nvec,
                                             Vec8<T> (&gin)[NV], Vec8<T> (&uin)[NV]) {
  if (row >= a.rows) return;
  const T* gate = static_cast<const T*>(a.input) + row * a.in_stride;
  const T* up = gate + a.d;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t j = vbase + lane + static_cast<int64_t>(k) * tpr;
    if (j < nvec) {
      gin[k].raw = *reinterpret_cast<const uint4*>(gate + j * kVec);
      uin[k].raw = *reinterpret_cast<const uint4*>(up + j * kVec);
    }
  }
}

// Static and per-group quant: the grid covers (row teams) x (column chunks of tpr * NV
// vectors); nothing row-wide is needed.
template <typename T, int NV, QuantKind Q>
__global__ void __launch_bounds__(max_threads_for_nv(NV))
    silu_mul_quant_chunk_kernel(const ActArgs a, const QuantArgs q) {
  const int tpr = a.tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool row_ok = row < a.rows;
  const int64_t nvec = a.d / kVec;
  const int64_t vbase = static_cast<int64_t>(blockIdx.y) * tpr * NV;
  const QuantConsts qc = load_quant_consts<Q>(q);

  Vec8<T> gin[NV], uin[NV];
  load_gate_up<T, NV>(a, row, vbase, lane, tpr, nvec, gin, uin);
  auto values = [&](int k, float (&y)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      y[i] = silu_mul<T>(to_float(gin[k].h[i]), to_float(uin[k].h[i]));
  };
  quantize_team<T, Q, NV>(values, q, qc, row, row_ok, lane, tpr, vbase, nvec, nullptr);
}

// Per-token quant: one team per whole row (the row's absmax is needed before quantizing).
template <typename T, int NV>
__global__ void __launch_bounds__(max_threads_for_nv(NV))
    silu_mul_quant_row_kernel(const ActArgs a, const QuantArgs q) {
  __shared__ float smem_max[kMaxWarps];
  const QuantConsts qc = load_quant_consts<QuantKind::kPerToken>(q);
  const int tpr = a.tpr;
  const int lane = threadIdx.x % tpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / tpr) + threadIdx.x / tpr;
  const bool row_ok = row < a.rows;
  const int64_t nvec = a.d / kVec;

  Vec8<T> gin[NV], uin[NV];
  load_gate_up<T, NV>(a, row, 0, lane, tpr, nvec, gin, uin);
  auto values = [&](int k, float (&y)[kVec]) {
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      y[i] = silu_mul<T>(to_float(gin[k].h[i]), to_float(uin[k].h[i]));
  };
  quantize_team<T, QuantKind::kPerToken, NV>(values, q, qc, row, row_ok, lane, tpr, 0, nvec,
                                             smem_max);
}

// Any size / alignment: one block per row, scalar accesses.
template <typename T, QuantKind Q>
__global__ void __launch_bounds__(1024)
    silu_mul_quant_fallback_kernel(const ActArgs a, const QuantArgs q) {
  __shared__ float smem_max[kMaxWarps];
  const int64_t row = blockIdx.x;
  const T* __restrict__ gate = static_cast<const T*>(a.input) + row * a.in_stride;
  const T* __restrict__ up = gate + a.d;
  auto value = [&](int i) { return silu_mul<T>(to_float(gate[i]), to_float(up[i])); };
  quantize_store_row_scalar<Q>(value, a.d, q, load_quant_consts<Q>(q), row, smem_max);
}

// One NVFP4 kernel of this file: its image tells which archs the file was built for.
inline const void* nvfp4_probe_kernel() {
#if VF_NVFP4_BUILD
  return reinterpret_cast<const void*>(&silu_mul_quant_fallback_kernel<bf16_t, QuantKind::kNvfp4>);
#else
  return nullptr;
#endif
}

template <typename T, QuantKind Q>
void launch_typed(const ActArgs& base, const QuantArgs& q, bool vector_ok, int32_t device,
                  gpuStream_t stream) {
  const DeviceInfo& dev = device_info(device);
  ActArgs a = base;
  const int64_t nvec = a.d / kVec;
  TeamConfig c;
  if (vector_ok) {
    constexpr int lanes = QuantTraits<Q>::kGroupLanes;
    c = Q == QuantKind::kPerToken
            ? pick_row_team(nvec, a.rows, lanes, dev.num_sms, dev.warp_size)
            : pick_chunk_team(nvec, a.rows, lanes, dev.num_sms, dev.warp_size);
    if (c.chunks > 65535) c.nv = 0;
  }
  if (c.nv == 0) {
    const int threads = a.d >= 4096 ? 1024 : 256;
    silu_mul_quant_fallback_kernel<T, Q>
        <<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(a, q);
    return;
  }
  a.tpr = c.tpr;
  const int64_t blocks = (a.rows + c.rows_per_block - 1) / c.rows_per_block;
  if constexpr (Q == QuantKind::kPerToken) {
    const dim3 grid(static_cast<unsigned>(blocks));
    switch (c.nv) {
      case 1:
        silu_mul_quant_row_kernel<T, 1><<<grid, c.threads, 0, stream>>>(a, q);
        break;
      case 2:
        silu_mul_quant_row_kernel<T, 2><<<grid, c.threads, 0, stream>>>(a, q);
        break;
      case 4:
        silu_mul_quant_row_kernel<T, 4><<<grid, c.threads, 0, stream>>>(a, q);
        break;
      default:
        silu_mul_quant_row_kernel<T, 8><<<grid, c.threads, 0, stream>>>(a, q);
        break;
    }
  } else {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(c.chunks));
    switch (c.nv) {
      case 1:
        silu_mul_quant_chunk_kernel<T, 1, Q><<<grid, c.threads, 0, stream>>>(a, q);
        break;
      case 2:
        silu_mul_quant_chunk_kernel<T, 2, Q><<<grid, c.threads, 0, stream>>>(a, q);
        break;
      default:
        silu_mul_quant_chunk_kernel<T, 4, Q><<<grid, c.threads, 0, stream>>>(a, q);
        break;
    }
  }
}

template <QuantKind Q>
void launch_quant(ScalarType dt, const ActArgs& a, const QuantArgs& q, bool vector_ok,
                  int32_t device, gpuStream_t stream) {
  if (dt == ScalarType::BFloat16)
    launch_typed<bf16_t, Q>(a, q, vector_ok, device, stream);
  else
    launch_typed<half_t, Q>(a, q, vector_ok, device, stream);
}

std::pair<Tensor, std::optional<Tensor>> act_quant(const char* op, const Tensor& input,
                                                   QuantKind kind,
                                                   const std::optional<Tensor>& scale,
                                                   const std::optional<Tensor>& scale_ub,
                                                   bool scale_transposed, bool scale_ue8m0) {
  const int64_t two_d = input.size(-1);
  const int64_t d = two_d / 2;
  const bool nvfp4 = kind == QuantKind::kNvfp4;
  if (scale) check_scale_scalar(op, nvfp4 ? "global_scale" : "scale", *scale, input);
  if (scale_ub) check_scale_scalar(op, "scale_ub", *scale_ub, input);

  const int32_t device = input.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const Fp8Format fmt = nvfp4 ? Fp8Format{} : fp8_format(device);
  if (nvfp4) check_nvfp4_kernel(op, nvfp4_probe_kernel(), device);
  std::vector<int64_t> shape = shape_of(input);
  shape.back() = d;

  const RowView in = as_rows(input);
  const Nvfp4Layout fp4 = nvfp4_layout(in.rows, d);
  std::optional<Nvfp4Outputs> fp4_out;
  Tensor out;
  std::optional<Tensor> scales;
  const int64_t group = group_size_of(kind);
  if (nvfp4) {
    fp4_out = alloc_nvfp4_outputs(input, fp4);
    out = fp4_out->out;
    scales = fp4_out->scales;
  } else {
    out = torch::stable::new_empty(input, shape, fmt.dtype);
    if (kind != QuantKind::kStatic)
      scales = alloc_scales(input, shape, group ? d / group : 1, scale_transposed);
  }
  if (in.rows == 0) return {out, scales};

  ActArgs a{};
  a.input = in.tensor.const_data_ptr();
  a.in_stride = in.stride;
  a.rows = in.rows;
  a.d = static_cast<int>(d);
  a.tpr = 0;

  const QuantArgs q = nvfp4 ? make_nvfp4_quant_args(*fp4_out, *scale, fp4)
                            : make_quant_args(out, d, scales, scale, scale_ub, fmt, input,
                                              group, scale_ue8m0, scale_transposed);

  const bool vector_ok = d % kVec == 0 && in.stride % kVec == 0 && aligned16(a.input);
  const gpuStream_t stream = current_stream(device);
  const ScalarType dt = input.scalar_type();
  switch (kind) {
    case QuantKind::kStatic:
      launch_quant<QuantKind::kStatic>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kPerToken:
      launch_quant<QuantKind::kPerToken>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kGroup64:
      launch_quant<QuantKind::kGroup64>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kGroup128:
      launch_quant<QuantKind::kGroup128>(dt, a, q, vector_ok, device, stream);
      break;
    case QuantKind::kNvfp4:
#if VF_NVFP4_BUILD  // else refused by check_nvfp4_kernel
      launch_quant<QuantKind::kNvfp4>(dt, a, q, vector_ok, device, stream);
#endif
      break;
  }
  check_launch(op);
  return {out, scales};
}

void check_act_input(const char* op, const Tensor& input) {
  check_activation(op, "input", input);
  VF_CHECK(input.size(-1) % 2 == 0, op,
                  ": input last dim must be even ([gate | up] halves), got ", input.size(-1));
}

}  // namespace

Tensor silu_and_mul_static_fp8_quant(const Tensor& input, const Tensor& scale) {
  constexpr const char* op = "vllm_fusion::silu_and_mul_static_fp8_quant";
  check_act_input(op, input);
  return act_quant(op, input, QuantKind::kStatic, scale, std::nullopt, false, false).first;
}

std::tuple<Tensor, Tensor> silu_and_mul_dynamic_fp8_quant(const Tensor& input,
                                                          int64_t group_size,
                                                          bool scale_transposed,
                                                          bool scale_ue8m0,
                                                          const std::optional<Tensor>& scale_ub) {
  constexpr const char* op = "vllm_fusion::silu_and_mul_dynamic_fp8_quant";
  check_act_input(op, input);
  const QuantKind kind = dynamic_quant_kind(op, group_size, input.size(-1) / 2,
                                            scale_transposed, scale_ue8m0, input.dim());
  auto r = act_quant(op, input, kind, std::nullopt, scale_ub, scale_transposed, scale_ue8m0);
  return {r.first, *r.second};
}

std::tuple<Tensor, Tensor> silu_and_mul_nvfp4_quant(const Tensor& input,
                                                    const Tensor& global_scale) {
  constexpr const char* op = "vllm_fusion::silu_and_mul_nvfp4_quant";
  check_act_input(op, input);
  check_nvfp4_width(op, input.size(-1) / 2, "output width (half the last dim of input)");
  auto r = act_quant(op, input, QuantKind::kNvfp4, global_scale, std::nullopt, false, false);
  return {r.first, *r.second};
}

}  // namespace vllm_fusion
