// The one place where the CUDA and HIP builds differ: headers, 16-bit float types, FP8
// conversion, warp shuffles and warp size. Everything else in csrc/ is written once against the
// names defined here. (The HIP build compiles a hipified copy of csrc/, so CUDA spellings outside
// this file are translated; the USE_ROCM branches below are for what hipify cannot translate.)
#pragma once

#include <cstdint>

#ifdef USE_ROCM
  #include <hip/hip_runtime.h>
  #include <hip/hip_fp16.h>
  #include <hip/hip_bf16.h>
  #include <hip/hip_fp8.h>
#else
  #include <cuda_runtime.h>
  #include <cuda_fp16.h>
  #include <cuda_bf16.h>
  #include <cuda_fp8.h>
#endif

namespace vllm_fusion {

#ifdef USE_ROCM
using half_t = __half;
using bf16_t = __hip_bfloat16;
using gpuStream_t = hipStream_t;
using gpuError_t = hipError_t;
  #define VF_GPU_SUCCESS hipSuccess
  #define VF_GET_LAST_ERROR hipGetLastError
  #define VF_GET_ERROR_STRING hipGetErrorString
  // CDNA (gfx9) runs 64-wide wavefronts; RDNA runs 32-wide.
  #if defined(__GFX9__)
    #define VF_WARP_SIZE 64
  #else
    #define VF_WARP_SIZE 32
  #endif
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
using gpuStream_t = cudaStream_t;
using gpuError_t = cudaError_t;
  #define VF_GPU_SUCCESS cudaSuccess
  #define VF_GET_LAST_ERROR cudaGetLastError
  #define VF_GET_ERROR_STRING cudaGetErrorString
  #define VF_WARP_SIZE 32
#endif

// XOR shuffle within groups of `width` lanes (width a power of two <= 32). Every lane of the
// warp executes it (callers never diverge around a shuffle).
__device__ __forceinline__ float shfl_xor(float v, int lane_mask, int width) {
#ifdef USE_ROCM
  return __shfl_xor(v, lane_mask, width);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
#endif
}

// ---------------------------------------------------------------- 16-bit float <-> float
__device__ __forceinline__ float to_float(half_t v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16_t v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
#ifdef USE_ROCM
  return __float2bfloat16(v);  // round to nearest even; HIP before 7.0 lacks the _rn name
#else
  return __float2bfloat16_rn(v);
#endif
}

// ---------------------------------------------------------------- FP8 (e4m3)
// OCP e4m3fn (max 448) everywhere but gfx94x, which uses e4m3fnuz (dtype max 240; vLLM clamps
// to 224 there). Inputs to these conversions are already clamped to the finite range, so the
// saturating conversion equals torch's round-to-nearest-even cast.
//
// Two floats -> two e4m3 bytes (low byte = a).
#ifdef USE_ROCM
// The e4m3 flavour to convert to. gfx94x convert only to fnuz in hardware, gfx950 / gfx12 only
// to OCP, and HIP's fp8 header traps on the other flavour there; the host picks the same one
// from the arch name, so it is fixed at compile time where the chip has only one.
__device__ __forceinline__ __hip_fp8_interpretation_t fp8_format(bool fnuz) {
  #if defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__)
  (void)fnuz;
  return __HIP_E4M3_FNUZ;
  #elif defined(__gfx950__) || defined(__gfx1200__) || defined(__gfx1201__)
  (void)fnuz;
  return __HIP_E4M3;
  #else
  return fnuz ? __HIP_E4M3_FNUZ : __HIP_E4M3;
  #endif
}
#endif

__device__ __forceinline__ uint16_t float2_to_fp8x2(float a, float b, bool fnuz) {
#ifdef USE_ROCM
  return static_cast<uint16_t>(
      __hip_cvt_float2_to_fp8x2(make_float2(a, b), __HIP_SATFINITE, fp8_format(fnuz)));
#else
  (void)fnuz;
  return static_cast<uint16_t>(
      __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
#endif
}

__device__ __forceinline__ uint8_t float_to_fp8(float a, bool fnuz) {
#ifdef USE_ROCM
  return static_cast<uint8_t>(__hip_cvt_float_to_fp8(a, __HIP_SATFINITE, fp8_format(fnuz)));
#else
  (void)fnuz;
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(a, __NV_SATFINITE, __NV_E4M3));
#endif
}

}  // namespace vllm_fusion
