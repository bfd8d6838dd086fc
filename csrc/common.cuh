// Device-side building blocks shared by the kernel families: 16-byte vector access, FP8
// packing, and the reductions over a "row team" (the threads that own one row, or one chunk of
// a row).
#pragma once

#include "compat.h"
#include "nvfp4.cuh"

namespace vllm_fusion {

// Elements per 16-byte access for the 16-bit input types.
constexpr int kVec = 8;

// Quantization schemes shared by the norm and activation families.
enum class QuantKind : int {
  kStatic = 0,    // one fp32 scale given by the caller: q = sat(x * (1 / scale))
  kPerToken = 1,  // one scale per row: max(min(absmax, ub) / fp8_max, min_scale)
  kGroup64 = 2,   // one scale per 64 columns: max(min(absmax, ub), 1e-10) / fp8_max
  kGroup128 = 3,  // one scale per 128 columns
  kNvfp4 = 4,     // NVFP4: packed e2m1, one e4m3 scale per 16 columns (see nvfp4.cuh)
};

template <QuantKind Q>
struct QuantTraits {
  static constexpr bool kGroup = (Q == QuantKind::kGroup64 || Q == QuantKind::kGroup128);
  static constexpr int kGroupSize = Q == QuantKind::kGroup64    ? 64
                                    : Q == QuantKind::kGroup128 ? 128
                                    : Q == QuantKind::kNvfp4    ? kNvfp4Block
                                                                : 0;
  // Lanes that hold one group when each lane holds kVec consecutive elements of it.
  static constexpr int kGroupLanes = kGroupSize / kVec;
};

// Same floor as per_token_group_fp8_quant (its `eps`), and as its UE8M0 rounding.
constexpr float kGroupAbsmaxEps = 1e-10f;

// ---------------------------------------------------------------- 16-byte vectors

// Eight 16-bit floats, moved as one 16-byte access.
template <typename T>
union Vec8 {
  uint4 raw;
  T h[kVec];
};

template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float (&out)[kVec]) {
  Vec8<T> v;
  v.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(v.h[i]);
}

// Read-only path (weights: read by every row, so keep them in cache).
template <typename T>
__device__ __forceinline__ void load8_ro(const T* __restrict__ p, float (&out)[kVec]) {
  Vec8<T> v;
  v.raw = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = to_float(v.h[i]);
}

// Rounds to T (round to nearest even) and stores 16 bytes.
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float (&in)[kVec]) {
  Vec8<T> v;
#pragma unroll
  for (int i = 0; i < kVec; ++i) v.h[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = v.raw;
}

// Rounds a float to T and back: the value a T tensor would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// Eight already-clamped floats -> eight e4m3 bytes, stored as one 8-byte access.
__device__ __forceinline__ void store_fp8x8(uint8_t* __restrict__ p, const float (&q)[kVec],
                                            bool fnuz) {
  uint2 packed;
  packed.x = static_cast<uint32_t>(float2_to_fp8x2(q[0], q[1], fnuz)) |
             (static_cast<uint32_t>(float2_to_fp8x2(q[2], q[3], fnuz)) << 16);
  packed.y = static_cast<uint32_t>(float2_to_fp8x2(q[4], q[5], fnuz)) |
             (static_cast<uint32_t>(float2_to_fp8x2(q[6], q[7], fnuz)) << 16);
  *reinterpret_cast<uint2*>(p) = packed;
}

__device__ __forceinline__ float clamp_fp8(float v, float fp8_max) {
  return fminf(fmaxf(v, -fp8_max), fp8_max);
}

// UE8M0 rounding of a scale: the next power of two at or above it (as per_token_group_fp8_quant
// computes it, including its floor).
__device__ __forceinline__ float round_scale_ue8m0(float s) {
  return exp2f(ceilf(log2f(fmaxf(fabsf(s), kGroupAbsmaxEps))));
}

// ---------------------------------------------------------------- reductions

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Reduction over aligned groups of `width` lanes (a power of two <= 32) inside a warp.
template <typename Op>
__device__ __forceinline__ float subwarp_reduce(float v, int width, Op op) {
  for (int mask = width >> 1; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask, 32));
  return v;
}

template <int WIDTH, typename Op>
__device__ __forceinline__ float subwarp_reduce_fixed(float v, Op op) {
#pragma unroll
  for (int mask = WIDTH >> 1; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask, 32));
  return v;
}

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int mask = VF_WARP_SIZE >> 1; mask > 0; mask >>= 1)
    v = op(v, shfl_xor(v, mask, VF_WARP_SIZE));
  return v;
}

// Reduction over a whole block (blockDim.x a multiple of the warp size); every thread gets the
// result. `smem` holds one float per warp and must not be reused by another reduction of the
// same launch without a barrier in between (callers give each reduction its own array).
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* smem, Op op, float identity) {
  const int warp = threadIdx.x / VF_WARP_SIZE;
  const int lane = threadIdx.x % VF_WARP_SIZE;
  const int nwarps = blockDim.x / VF_WARP_SIZE;
  v = warp_reduce(v, op);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : identity;
  return warp_reduce(v, op);
}

// Reduction over a row team: `tpr` threads. tpr <= 32: an aligned group of lanes of one warp
// (several teams per block); tpr > 32: the whole block.
template <typename Op>
__device__ __forceinline__ float team_reduce(float v, int tpr, float* smem, Op op,
                                             float identity) {
  if (tpr <= 32) return subwarp_reduce(v, tpr, op);
  return block_reduce(v, smem, op, identity);
}

// Largest number of warps per block (1024 threads, 32 lanes).
constexpr int kMaxWarps = 32;

// ---------------------------------------------------------------- quantize + store

struct QuantArgs {
  uint8_t* out;               // fp8 (or packed fp4) output, row r at out + r * out_stride
  int64_t out_stride;         // bytes between output rows
  float* scales;              // dynamic quant: per-token [rows]; per-group, see scale_index
  const float* static_scale;  // static quant: one element; NVFP4: the global scale
  const float* scale_ub;      // optional upper bound on the absmax (nullptr: none)
  float fp8_max;              // clamp bound: 448 (e4m3fn) or 224 (e4m3fnuz, as vLLM)
  float inv_fp8_max;          // 1.0f / fp8_max: torch divides by a Python scalar this way
  float min_scale;            // per-token floor of the scale: 1 / (fp8_max * 512)
  int64_t scale_inner;        // column-major group scales: input.size(-2)
  int ngroups;                // groups per row
  bool fnuz;
  bool ue8m0;
  bool transposed;            // column-major group scales
  // NVFP4 only: swizzled block scales (see nvfp4.cuh), the row count they are laid out for,
  // and ceil(blocks per row / 4).
  uint8_t* block_scales;
  int64_t rows;
  int64_t sf_k_tiles;
};

// Storage index of the scale of (row, group). Row-major: [rows, ngroups]. Column-major: the
// transpose of [..., ngroups, S] with S = input.size(-2), as per_token_group_fp8_quant allocates.
__device__ __forceinline__ int64_t group_scale_index(const QuantArgs& q, int64_t row, int g) {
  if (!q.transposed) return row * q.ngroups + g;
  const int64_t S = q.scale_inner;
  return (row / S) * q.ngroups * S + static_cast<int64_t>(g) * S + row % S;
}

// Per-launch constants of the quantization. Their loads are issued at kernel start, so that they
// overlap the row's loads; anything computed from them (1 / scale) is computed only where it is
// used, after the row's loads were issued.
struct QuantConsts {
  float static_scale;  // static quant: the scale
  float ub;            // absmax upper bound (+inf when none)
};

template <QuantKind Q>
__device__ __forceinline__ QuantConsts load_quant_consts(const QuantArgs& q) {
  QuantConsts c;
  c.static_scale =
      (Q == QuantKind::kStatic || Q == QuantKind::kNvfp4) ? __ldg(q.static_scale) : 1.0f;
  c.ub = (Q != QuantKind::kStatic && q.scale_ub != nullptr) ? __ldg(q.scale_ub) : INFINITY;
  return c;
}

// y / s correctly rounded, given inv = RN(1 / s): one multiply and two FMAs (Markstein's
// correction) instead of a full division per element.
__device__ __forceinline__ float div_by(float y, float s, float inv) {
  const float q = __fmul_rn(y, inv);
  const float r = fmaf(-q, s, y);
  return fmaf(r, inv, q);
}

// Group scale from the group's absmax (per_token_group_fp8_quant's formula).
__device__ __forceinline__ float group_scale(float m, const QuantArgs& q, const QuantConsts& c) {
  m = fmaxf(fminf(m, c.ub), kGroupAbsmaxEps);
  float s = m * q.inv_fp8_max;
  if (q.ue8m0) s = round_scale_ue8m0(s);
  return s;
}

// Quantizes one vector with a known inverse scale (static, per-token) and stores it.
__device__ __forceinline__ void store_scaled(const float (&y)[kVec], float inv,
                                             const QuantArgs& q, uint8_t* dst) {
  float v[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = clamp_fp8(y[i] * inv, q.fp8_max);
  store_fp8x8(dst, v, q.fnuz);
}

// Computes, quantizes and stores the values a row team owns: vector j = vbase + lane + k * tpr
// (k < NV) of row `row`, valid when row_ok && j < nvec. values(k, y) fills y with the 8
// (input-dtype-rounded) values of vector k; it is only called for valid vectors. Static and
// per-group quant store each vector as soon as it is computed; per-token quant keeps the row
// (packed in the input dtype, which holds these values exactly) until the row's absmax is known.
// Every thread of the team must call this (shuffles / a block reduction inside).
template <typename T, QuantKind Q, int NV, typename ValuesFn>
__device__ __forceinline__ void quantize_team(ValuesFn values, const QuantArgs& q,
                                              const QuantConsts& c, int64_t row, bool row_ok,
                                              int lane, int tpr, int64_t vbase, int64_t nvec,
                                              float* smem_max) {
  using QT = QuantTraits<Q>;
  uint8_t* out_row = q.out + row * q.out_stride;
  if constexpr (Q == QuantKind::kPerToken) {
    Vec8<T> packed[NV];
    float m = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = vbase + lane + static_cast<int64_t>(k) * tpr;
      if (row_ok && j < nvec) {
        float y[kVec];
        values(k, y);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          m = fmaxf(m, fabsf(y[i]));
          packed[k].h[i] = from_float<T>(y[i]);
        }
      }
    }
    m = fminf(team_reduce(m, tpr, smem_max, MaxOp{}, 0.f), c.ub);
    // torch: (absmax / fp8_max).clamp(min=min_scale), then x * scale.reciprocal(); a tensor
    // divided by a Python scalar is a multiply by the scalar's fp32 reciprocal in torch.
    const float s = fmaxf(m * q.inv_fp8_max, q.min_scale);
    if (lane == 0 && row_ok) q.scales[row] = s;
    const float inv = 1.0f / s;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = vbase + lane + static_cast<int64_t>(k) * tpr;
      if (row_ok && j < nvec) {
        float y[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] = to_float(packed[k].h[i]);
        store_scaled(y, inv, q, out_row + j * kVec);
      }
    }
  } else if constexpr (Q == QuantKind::kStatic) {
    const float inv = 1.0f / c.static_scale;  // torch: x * scale.reciprocal()
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = vbase + lane + static_cast<int64_t>(k) * tpr;
      if (row_ok && j < nvec) {
        float y[kVec];
        values(k, y);
        store_scaled(y, inv, q, out_row + j * kVec);
      }
    }
  } else if constexpr (Q == QuantKind::kNvfp4) {
#if VF_NVFP4_BUILD && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 1000)
    // Lanes (2i, 2i + 1) hold the two halves of one 16-element block.
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = vbase + lane + static_cast<int64_t>(k) * tpr;
      const bool valid = row_ok && j < nvec;
      float y[kVec];
      if (valid) {
        values(k, y);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] = 0.f;
      }
      float m = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) m = fmaxf(m, fabsf(y[i]));
      m = subwarp_reduce_fixed<QT::kGroupLanes>(m, MaxOp{});
      if (valid) {
        const Nvfp4BlockScale bs = nvfp4_block_scale(m, c.static_scale);
        if (j % QT::kGroupLanes == 0)
          q.block_scales[nvfp4_sf_offset(row, static_cast<int>(j / QT::kGroupLanes),
                                         q.sf_k_tiles)] = bs.sf;
        float v[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[i] = y[i] * bs.inv;
        *reinterpret_cast<uint32_t*>(out_row + j * (kVec / 2)) = float8_to_e2m1x8(v);
      }
    }
    if (row_ok && vbase == 0)
      nvfp4_zero_sf_padding(q.block_scales, row, q.rows, q.ngroups, q.sf_k_tiles, lane, tpr);
#else
    VF_DEVICE_TRAP();  // no NVFP4 code for this target: the host refuses to launch it
#endif
  } else {
    static_assert(QT::kGroup, "unhandled quant kind");
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t j = vbase + lane + static_cast<int64_t>(k) * tpr;
      const bool valid = row_ok && j < nvec;
      float y[kVec];
      if (valid) {
        values(k, y);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) y[i] = 0.f;
      }
      float m = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) m = fmaxf(m, fabsf(y[i]));
      m = subwarp_reduce_fixed<QT::kGroupLanes>(m, MaxOp{});
      const float s = group_scale(m, q, c);
      if (valid) {
        if (j % QT::kGroupLanes == 0)
          q.scales[group_scale_index(q, row, static_cast<int>(j / QT::kGroupLanes))] = s;
        // per_token_group_fp8_quant divides (no reciprocal): y / s, correctly rounded.
        const float inv = 1.0f / s;
        float v[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[i] = clamp_fp8(div_by(y[i], s, inv), q.fp8_max);
        store_fp8x8(out_row + j * kVec, v, q.fnuz);
      }
    }
  }
}

// Scalar version of the same math for the fallback kernels: one block per row, values produced
// on demand by `value(i)` (re-read from global memory / L2 on every pass).
template <QuantKind Q, typename ValueFn>
__device__ __forceinline__ void quantize_store_row_scalar(ValueFn value, int cols,
                                                          const QuantArgs& q,
                                                          const QuantConsts& c, int64_t row,
                                                          float* smem_max) {
  uint8_t* out_row = q.out + row * q.out_stride;
  if constexpr (Q == QuantKind::kStatic || Q == QuantKind::kPerToken) {
    float inv;
    if constexpr (Q == QuantKind::kStatic) {
      inv = 1.0f / c.static_scale;
    } else {
      float m = 0.f;
      for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, fabsf(value(i)));
      m = fminf(block_reduce(m, smem_max, MaxOp{}, 0.f), c.ub);
      const float s = fmaxf(m * q.inv_fp8_max, q.min_scale);
      if (threadIdx.x == 0) q.scales[row] = s;
      inv = 1.0f / s;
    }
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
      out_row[i] = float_to_fp8(clamp_fp8(value(i) * inv, q.fp8_max), q.fnuz);
  } else if constexpr (Q == QuantKind::kNvfp4) {
#if VF_NVFP4_BUILD && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 1000)
    // One thread per 16-element block.
    for (int g = threadIdx.x; g < q.ngroups; g += blockDim.x) {
      float y[kNvfp4Block];
      float m = 0.f;
#pragma unroll
      for (int e = 0; e < kNvfp4Block; ++e) {
        y[e] = value(g * kNvfp4Block + e);
        m = fmaxf(m, fabsf(y[e]));
      }
      const Nvfp4BlockScale bs = nvfp4_block_scale(m, c.static_scale);
      q.block_scales[nvfp4_sf_offset(row, g, q.sf_k_tiles)] = bs.sf;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[i] = y[h * kVec + i] * bs.inv;
        *reinterpret_cast<uint32_t*>(out_row + g * (kNvfp4Block / 2) + h * (kVec / 2)) =
            float8_to_e2m1x8(v);
      }
    }
    nvfp4_zero_sf_padding(q.block_scales, row, q.rows, q.ngroups, q.sf_k_tiles, threadIdx.x,
                          blockDim.x);
#else
    VF_DEVICE_TRAP();
#endif
  } else {
    // One warp per group.
    constexpr int G = QuantTraits<Q>::kGroupSize;
    const int warp = threadIdx.x / VF_WARP_SIZE;
    const int lane = threadIdx.x % VF_WARP_SIZE;
    const int nwarps = blockDim.x / VF_WARP_SIZE;
    for (int g = warp; g < q.ngroups; g += nwarps) {
      float m = 0.f;
      for (int e = lane; e < G; e += VF_WARP_SIZE) m = fmaxf(m, fabsf(value(g * G + e)));
      const float s = group_scale(warp_reduce(m, MaxOp{}), q, c);
      const float inv = 1.0f / s;
      if (lane == 0) q.scales[group_scale_index(q, row, g)] = s;
      for (int e = lane; e < G; e += VF_WARP_SIZE)
        out_row[g * G + e] =
            float_to_fp8(clamp_fp8(div_by(value(g * G + e), s, inv), q.fp8_max), q.fnuz);
    }
  }
}

}  // namespace vllm_fusion
