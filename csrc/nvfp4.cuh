// NVFP4 quantization as vLLM 0.26's scaled_fp4_quant computes it (is_sf_swizzled_layout=True):
//
//   16-element blocks along the row; per block, with gs the fp32 global scale:
//     sf   = e4m3_satfinite(gs * (absmax * rcp(6)))          stored as one byte
//     inv  = sf != 0 ? rcp(float(sf) * rcp(gs)) : 0          (rcp: rcp.approx.ftz.f32)
//     q[i] = e2m1_satfinite_rn(x[i] * inv)                   two per byte, low nibble = even
//   Block scales in the 128x4 tile layout of the CUTLASS / FlashInfer FP4 GEMMs:
//     [ceil(rows / 128), ceil(cols / 64), 32, 4, 4] bytes, seen by torch as int32
//     [round_up(rows, 128), round_up(cols / 16, 4) / 4]; padding slots hold 0.
//
// FP4 conversion needs CUDA >= 12.8 and an arch-specific SM100+ target (10.0a, 12.0a, ...); ROCm
// has no NVFP4. VF_NVFP4_BUILD says whether the host code may launch these kernels at all;
// VF_NVFP4_DEVICE whether the device code being compiled has the FP4 conversion instruction.
#pragma once

#include "compat.h"

#if !defined(USE_ROCM) && defined(CUDART_VERSION) && CUDART_VERSION >= 12080
  #define VF_NVFP4_BUILD 1
#else
  #define VF_NVFP4_BUILD 0
#endif

#if VF_NVFP4_BUILD && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1000 &&                     \
    (defined(__CUDA_ARCH_FEAT_SM100_ALL) || defined(__CUDA_ARCH_FEAT_SM101_ALL) ||              \
     defined(__CUDA_ARCH_FEAT_SM103_ALL) || defined(__CUDA_ARCH_FEAT_SM110_ALL) ||              \
     defined(__CUDA_ARCH_FEAT_SM120_ALL) || defined(__CUDA_ARCH_FEAT_SM121_ALL) ||              \
     defined(__CUDA_ARCH_SPECIFIC__) || defined(__CUDA_ARCH_FAMILY_SPECIFIC__))
  #define VF_NVFP4_DEVICE 1
#else
  #define VF_NVFP4_DEVICE 0
#endif

// Device code that must never run (a target without NVFP4): stop the kernel.
#ifdef USE_ROCM
  #define VF_DEVICE_TRAP() __builtin_trap()
#else
  #define VF_DEVICE_TRAP() __trap()
#endif

namespace vllm_fusion {

// Elements sharing one block scale, and the largest e2m1 magnitude.
constexpr int kNvfp4Block = 16;
constexpr float kE2m1Max = 6.0f;

// Block-scale layout: 128 rows x 4 blocks per 512-byte tile.
constexpr int kSfTileRows = 128;
constexpr int kSfTileBlocks = 4;

#if VF_NVFP4_BUILD && defined(__CUDACC__)

// rcp.approx.ftz.f32: what vLLM's kernel uses for every reciprocal of the block-scale math
// (not correctly rounded, so matching it is what keeps the output bit-identical).
__device__ __forceinline__ float rcp_approx_ftz(float a) {
  #if defined(__CUDA_ARCH__)
  float b;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(b) : "f"(a));
  return b;
  #else
  return 1.0f / a;
  #endif
}

// Software e2m1 conversion, round to nearest even, saturating to +-6 (NaN -> 6): the magnitude
// code is the number of thresholds |v| passes; ties sit on the thresholds and go to the even
// code (0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
__device__ __forceinline__ uint32_t e2m1_nibble_soft(float v) {
  const float a = fabsf(v);
  uint32_t code;
  if (!(a <= 5.0f)) code = 7;  // also NaN
  else if (a >= 3.5f) code = 6;
  else if (a > 2.5f) code = 5;
  else if (a >= 1.75f) code = 4;
  else if (a > 1.25f) code = 3;
  else if (a >= 0.75f) code = 2;
  else if (a > 0.25f) code = 1;
  else code = 0;
  return code | (signbit(v) ? 8u : 0u);
}

// Two floats -> one byte of two e2m1 values (lo in bits 0-3).
__device__ __forceinline__ uint32_t float2_to_e2m1x2(float lo, float hi) {
  #if VF_NVFP4_DEVICE
  uint32_t r;
  asm("{\n"
      ".reg .b8 b;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b, %2, %1;\n"
      "cvt.u32.u8 %0, b;\n"
      "}"
      : "=r"(r)
      : "f"(lo), "f"(hi));
  return r;
  #else
  return e2m1_nibble_soft(lo) | (e2m1_nibble_soft(hi) << 4);
  #endif
}

// Eight floats -> 32 bits: element i in bits [4i, 4i + 4).
__device__ __forceinline__ uint32_t float8_to_e2m1x8(const float (&v)[8]) {
  uint32_t r = 0;
  #pragma unroll
  for (int i = 0; i < 4; ++i) r |= float2_to_e2m1x2(v[2 * i], v[2 * i + 1]) << (8 * i);
  return r;
}

// The block scale byte and the factor that maps the block onto the e2m1 range.
struct Nvfp4BlockScale {
  uint8_t sf;
  float inv;
};

__device__ __forceinline__ Nvfp4BlockScale nvfp4_block_scale(float absmax, float global_scale) {
  float s = global_scale * (absmax * rcp_approx_ftz(kE2m1Max));
  Nvfp4BlockScale r;
  r.sf = static_cast<uint8_t>(__nv_cvt_float_to_fp8(s, __NV_SATFINITE, __NV_E4M3));
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(r.sf), __NV_E4M3);
  s = __half2float(__half(h));
  r.inv = s != 0.0f ? rcp_approx_ftz(s * rcp_approx_ftz(global_scale)) : 0.0f;
  return r;
}

// Byte offset of the scale of (row, block) in the 128x4-tiled layout; k_tiles = ceil(blocks / 4).
__device__ __forceinline__ int64_t nvfp4_sf_offset(int64_t row, int block, int64_t k_tiles) {
  const int64_t tile = (row >> 7) * k_tiles + (block >> 2);
  return (tile << 9) | ((row & 31) << 4) | (((row >> 5) & 3) << 2) | (block & 3);
}

// Zeroes the padding slots a row team owns: blocks [blocks, round_up(blocks, 4)) of its row,
// and every slot of the padding rows row + k * rows in [rows, round_up(rows, 128)).
// `lane` / `team` index the threads sharing the work.
__device__ __forceinline__ void nvfp4_zero_sf_padding(uint8_t* sf, int64_t row, int64_t rows,
                                                      int blocks, int64_t k_tiles, int lane,
                                                      int team) {
  const int padded_blocks = static_cast<int>(k_tiles) * kSfTileBlocks;
  for (int b = blocks + lane; b < padded_blocks; b += team) sf[nvfp4_sf_offset(row, b, k_tiles)] = 0;
  const int64_t padded_rows = (rows + kSfTileRows - 1) / kSfTileRows * kSfTileRows;
  for (int64_t p = rows + row; p < padded_rows; p += rows) {
    // The 4 blocks of one k-tile are 4 consecutive bytes: one 32-bit store each.
    for (int64_t t = lane; t < k_tiles; t += team)
      *reinterpret_cast<uint32_t*>(sf + nvfp4_sf_offset(p, static_cast<int>(t) * 4, k_tiles)) =
          0u;
  }
}

#endif  // VF_NVFP4_BUILD && __CUDACC__

}  // namespace vllm_fusion
