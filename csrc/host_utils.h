// Host-side helpers shared by the op implementations: argument checks with messages that name
// the argument and what was expected, the [rows, cols] view of an input, device queries, the
// current stream, and the launch-configuration choice for row-team kernels.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "compat.h"

namespace vllm_fusion {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ---------------------------------------------------------------- error messages

// VF_CHECK(cond, parts...) throws std::runtime_error (RuntimeError in Python) with the parts
// concatenated. Unlike STD_TORCH_CHECK it formats without iostreams, so it also works where
// the module carries its own (static) C++ runtime.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args>
inline std::string concat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
}  // namespace detail

#define VF_CHECK(cond, ...)                                                  \
  do {                                                                       \
    if (!(cond))                                                             \
      throw std::runtime_error(::vllm_fusion::detail::concat(__VA_ARGS__)); \
  } while (0)

// ---------------------------------------------------------------- argument checks

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::BFloat16:
      return "bfloat16";
    case ScalarType::Half:
      return "float16";
    case ScalarType::Float:
      return "float32";
    // Python's names (str(dtype) without "torch."), as the Python mirrors of the checks say.
    case ScalarType::Float8_e4m3fn:
      return "float8_e4m3fn";
    case ScalarType::Float8_e4m3fnuz:
      return "float8_e4m3fnuz";
    case ScalarType::Byte:
      return "uint8";
    case ScalarType::Long:
      return "int64";
    case ScalarType::Int:
      return "int32";
    case ScalarType::Double:
      return "float64";
    case ScalarType::Short:
      return "int16";
    case ScalarType::Char:
      return "int8";
    case ScalarType::Bool:
      return "bool";
    case ScalarType::ComplexFloat:
      return "complex64";
    case ScalarType::ComplexDouble:
      return "complex128";
    case ScalarType::Float8_e5m2:
      return "float8_e5m2";
    case ScalarType::Float8_e5m2fnuz:
      return "float8_e5m2fnuz";
    default:
      return torch::headeronly::toString(t);
  }
}

inline void check_cuda(const char* op, const char* name, const Tensor& t) {
  VF_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
}

inline void check_same_device(const char* op, const char* name, const Tensor& t,
                              const Tensor& ref) {
  check_cuda(op, name, t);
  VF_CHECK(t.get_device_index() == ref.get_device_index(), op, ": ", name,
                  " must be on the same device as input (cuda:", ref.get_device_index(),
                  "), got cuda:", t.get_device_index());
}

// input / residual: bfloat16 or float16, at least 1-D, contiguous last dimension.
inline void check_activation(const char* op, const char* name, const Tensor& t) {
  check_cuda(op, name, t);
  const ScalarType dt = t.scalar_type();
  VF_CHECK(dt == ScalarType::BFloat16 || dt == ScalarType::Half, op, ": ", name,
                  " must be bfloat16 or float16, got ", dtype_name(dt));
  VF_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dimension");
  VF_CHECK(t.size(-1) > 0, op, ": ", name, " must have a non-empty last dimension");
  VF_CHECK(t.size(-1) <= INT32_MAX / 2, op, ": ", name, " last dimension too large (",
                  t.size(-1), ")");
  VF_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, op, ": ", name,
                  " must be contiguous in its last dimension (stride(-1) == 1), got stride ",
                  t.stride(-1));
}

inline void check_scale_scalar(const char* op, const char* name, const Tensor& t,
                               const Tensor& input) {
  check_same_device(op, name, t, input);
  VF_CHECK(t.scalar_type() == ScalarType::Float, op, ": ", name,
                  " must be a float32 tensor, got ", dtype_name(t.scalar_type()));
  VF_CHECK(t.numel() == 1, op, ": ", name, " must have exactly 1 element, got ",
                  t.numel());
}

inline void check_same_shape(const char* op, const char* name, const Tensor& t,
                             const Tensor& ref) {
  bool same = t.dim() == ref.dim();
  for (int64_t i = 0; same && i < t.dim(); ++i) same = t.size(i) == ref.size(i);
  VF_CHECK(same, op, ": ", name, " must have the same shape as input");
}

// ---------------------------------------------------------------- [rows, cols] view

// An activation viewed as `rows` rows of `cols` elements, `stride` elements apart. Leading
// dimensions that cannot be merged into one stride are made contiguous first (a copy).
struct RowView {
  Tensor tensor;
  int64_t rows;
  int64_t cols;
  int64_t stride;
};

inline RowView as_rows(const Tensor& t) {
  const int64_t d = t.dim();
  const int64_t cols = t.size(d - 1);
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < d; ++i) rows *= t.size(i);
  // Leading dims of size > 1, outermost first.
  std::vector<int64_t> sizes, strides;
  for (int64_t i = 0; i + 1 < d; ++i) {
    if (t.size(i) != 1) {
      sizes.push_back(t.size(i));
      strides.push_back(t.stride(i));
    }
  }
  if (sizes.empty()) return {t, rows, cols, cols};
  bool mergeable = true;
  for (size_t i = 0; i + 1 < sizes.size(); ++i)
    mergeable = mergeable && strides[i] == strides[i + 1] * sizes[i + 1];
  if (mergeable && strides.back() >= cols) return {t, rows, cols, strides.back()};
  return {torch::stable::contiguous(t), rows, cols, cols};
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------- device and stream

inline gpuStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream));
  return static_cast<gpuStream_t>(stream);
}

struct DeviceInfo {
  int num_sms = 0;
  int cc_major = 0;  // CUDA compute capability (0 on ROCm)
  int cc_minor = 0;
  int warp_size = 32;
  bool fp8_fnuz = false;  // gfx94x: float8_e4m3fnuz
  int wall_clock_khz = 0;  // ROCm: rate of wall_clock64()
};

inline const DeviceInfo& device_info(int32_t device_index) {
  constexpr int kMaxDevices = 64;
  VF_CHECK(device_index >= 0 && device_index < kMaxDevices,
                  "vllm_fusion: unsupported device index ", device_index);
  static std::array<std::once_flag, kMaxDevices> once;
  static std::array<DeviceInfo, kMaxDevices> infos;
  std::call_once(once[device_index], [device_index] {
    DeviceInfo info;
#ifdef USE_ROCM
    hipDeviceProp_t prop;
    VF_CHECK(hipGetDeviceProperties(&prop, device_index) == hipSuccess,
                    "vllm_fusion: hipGetDeviceProperties failed");
    info.num_sms = prop.multiProcessorCount;
    info.warp_size = prop.warpSize;
    info.fp8_fnuz = std::strstr(prop.gcnArchName, "gfx94") != nullptr;
    VF_CHECK(hipDeviceGetAttribute(&info.wall_clock_khz, hipDeviceAttributeWallClockRate,
                                   device_index) == hipSuccess,
             "vllm_fusion: hipDeviceGetAttribute(WallClockRate) failed");
#else
    VF_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount,
                                           device_index) == cudaSuccess,
                    "vllm_fusion: cudaDeviceGetAttribute failed");
    VF_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor,
                                    device_index) == cudaSuccess &&
                 cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor,
                                        device_index) == cudaSuccess,
             "vllm_fusion: cudaDeviceGetAttribute failed");
    info.warp_size = 32;
    info.fp8_fnuz = false;
#endif
    infos[device_index] = info;
  });
  return infos[device_index];
}

// FP8 output format of this device, and the clamp bound vLLM uses for it.
struct Fp8Format {
  ScalarType dtype;
  float max;
  bool fnuz;
};

inline Fp8Format fp8_format(int32_t device_index) {
  if (device_info(device_index).fp8_fnuz) return {ScalarType::Float8_e4m3fnuz, 224.0f, true};
  return {ScalarType::Float8_e4m3fn, 448.0f, false};
}

inline void check_launch(const char* op) {
  const gpuError_t err = VF_GET_LAST_ERROR();
  VF_CHECK(err == VF_GPU_SUCCESS, op, ": kernel launch failed: ",
                  VF_GET_ERROR_STRING(err));
}

// ---------------------------------------------------------------- launch configuration

// Largest block size each vectors-per-thread count is compiled for (__launch_bounds__), so that
// a row held in registers does not spill.
constexpr int max_threads_for_nv(int nv) { return nv <= 1 ? 1024 : (nv == 2 ? 512 : 256); }

// A row team: `tpr` threads own one row (or one chunk of a row), each holding `nv` vectors of
// 8 elements, vector j = chunk * tpr * nv + lane + k * tpr. tpr <= 32 is a power of two and a
// block holds several teams; tpr > 32 is a multiple of the warp size and the team is the block.
struct TeamConfig {
  int nv = 0;  // 0: no register-resident configuration fits (use the fallback kernel)
  int tpr = 0;
  int threads = 0;
  int rows_per_block = 1;
  int64_t chunks = 1;
};

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline TeamConfig finish_team(TeamConfig c, int64_t vecs_per_team_needed, int64_t rows,
                              int min_lanes, int warp_size) {
  int tpr = static_cast<int>((vecs_per_team_needed + c.nv - 1) / c.nv);
  if (tpr <= 32) {
    tpr = next_pow2(tpr);
    if (tpr < min_lanes) tpr = min_lanes;
  }
  if (tpr > 32) {
    tpr = (tpr + warp_size - 1) / warp_size * warp_size;
    c.tpr = tpr;
    c.threads = tpr;
    c.rows_per_block = 1;
    return c;
  }
  c.tpr = tpr;
  int rpb = 256 / tpr;
  if (rows < rpb) rpb = static_cast<int>(rows < 1 ? 1 : rows);
  int threads = rpb * tpr;
  threads = (threads + warp_size - 1) / warp_size * warp_size;
  c.threads = threads;
  c.rows_per_block = threads / tpr;
  return c;
}

// Launch-heuristic overrides, read once per process; for tuning runs only (unset normally).
//   VLLM_FUSION_ROW_THREADS    cap on the threads of a whole-row team
//   VLLM_FUSION_CHUNK_THREADS  threads of a chunk team (SiLU static / per-group)
//   VLLM_FUSION_CHUNK_NV       vectors per thread of a chunk team (1, 2 or 4)
struct TuningOverrides {
  int row_threads = 0;
  int chunk_threads = 0;
  int chunk_nv = 0;
};

inline const TuningOverrides& tuning_overrides() {
  static const TuningOverrides t = [] {
    auto read = [](const char* name) {
      const char* v = std::getenv(name);
      return v ? std::atoi(v) : 0;
    };
    TuningOverrides o;
    o.row_threads = read("VLLM_FUSION_ROW_THREADS");
    o.chunk_threads = read("VLLM_FUSION_CHUNK_THREADS");
    o.chunk_nv = read("VLLM_FUSION_CHUNK_NV");
    return o;
  }();
  return t;
}

// Threads of a whole-row team at most, by rows per SM (bf16, hidden 4096 / 8192). H100: 256 from
// ~4 rows per SM, 512 below. H200 (docs/benchmarks/2026-11-28-h200-row-teams.md): 128 at 31 and
// 124 rows per SM, 1.02-1.19x faster than 256 for RMSNorm+quant and SiLU+per-token quant: more
// vectors in flight per thread and smaller block reductions. `many_rows_threads` is that last cap.
inline int row_thread_cap(int64_t rows, int num_sms, int many_rows_threads) {
  if (tuning_overrides().row_threads > 0) return tuning_overrides().row_threads;
  if (rows >= 16LL * num_sms) return many_rows_threads;
  return rows >= 4LL * num_sms ? 256 : 512;
}

// Whole row in one team (RMSNorm; per-token dynamic quant). Few rows: latency bound, more
// threads per row. Many rows: fewer, fatter threads. A row too wide for the cap's registers
// takes the next larger cap before giving up on registers (nv = 0: the fallback kernel).
inline TeamConfig pick_row_team(int64_t nvec, int64_t rows, int min_lanes, int num_sms,
                                int warp_size, int many_rows_threads = 128) {
  TeamConfig c;
  for (int cap = row_thread_cap(rows, num_sms, many_rows_threads); cap <= 1024 && c.nv == 0;
       cap *= 2) {
    for (int nv : {1, 2, 4, 8}) {
      const int lim = std::min(cap, max_threads_for_nv(nv));
      if (nvec <= static_cast<int64_t>(lim) * nv) {
        c.nv = nv;
        break;
      }
    }
  }
  if (c.nv == 0) return c;
  return finish_team(c, nvec, rows, min_lanes, warp_size);
}

// Row split into chunks (elementwise and per-group quant): many blocks even for few rows.
inline TeamConfig pick_chunk_team(int64_t nvec, int64_t rows, int min_lanes, int num_sms,
                                  int warp_size) {
  const TuningOverrides& o = tuning_overrides();
  TeamConfig c;
  c.nv = rows >= 4LL * num_sms ? 2 : 1;
  if (o.chunk_nv == 1 || o.chunk_nv == 2 || o.chunk_nv == 4) c.nv = o.chunk_nv;
  const int64_t threads = o.chunk_threads > 0 ? std::min(o.chunk_threads, 256) : 128;
  const int64_t team_vecs = std::min<int64_t>(nvec, threads * c.nv);
  c = finish_team(c, team_vecs, rows, min_lanes, warp_size);
  const int64_t chunk_vecs = static_cast<int64_t>(c.tpr) * c.nv;
  c.chunks = (nvec + chunk_vecs - 1) / chunk_vecs;
  return c;
}

// ---------------------------------------------------------------- dynamic quant arguments

// group_size 0: per-token scales; 64 / 128: per-group scales. Checks the flags that go with it.
inline QuantKind dynamic_quant_kind(const char* op, int64_t group_size, int64_t cols,
                                    bool scale_transposed, bool scale_ue8m0, int64_t dim) {
  VF_CHECK(group_size == 0 || group_size == 64 || group_size == 128, op,
                  ": group_size must be 0 (per-token scales), 64 or 128, got ", group_size);
  VF_CHECK(group_size == 0 || cols % group_size == 0, op, ": hidden size ", cols,
                  " (last dim of the quantized output) must be divisible by group_size ",
                  group_size);
  VF_CHECK(!scale_ue8m0 || group_size > 0, op,
                  ": scale_ue8m0=True requires group_size 64 or 128 (per-group scales), got "
                  "group_size 0");
  VF_CHECK(!scale_transposed || dim >= 2, op,
                  ": scale_transposed=True requires an input of at least 2 dimensions");
  if (group_size == 64) return QuantKind::kGroup64;
  if (group_size == 128) return QuantKind::kGroup128;
  return QuantKind::kPerToken;
}

// Scales of dynamic quant for an output of shape `out_shape` ([..., S, H]): [..., S, ngroups]
// float32, or with scale_transposed the transpose of a contiguous [..., ngroups, S] (what
// per_token_group_fp8_quant's column-major layout is). ngroups is 1 for per-token scales.
inline Tensor alloc_scales(const Tensor& like, const std::vector<int64_t>& out_shape,
                           int64_t ngroups, bool transposed) {
  std::vector<int64_t> shape(out_shape.begin(), out_shape.end() - 1);
  if (!transposed) {
    shape.push_back(ngroups);
    return torch::stable::new_empty(like, shape, ScalarType::Float);
  }
  const int64_t S = shape.back();
  shape.back() = ngroups;
  shape.push_back(S);
  Tensor t = torch::stable::new_empty(like, shape, ScalarType::Float);
  return torch::stable::transpose(t, -1, -2);
}

// Group width of a quant kind: 64 or 128 for per-group scales, 0 otherwise.
inline int64_t group_size_of(QuantKind kind) {
  if (kind == QuantKind::kGroup64) return 64;
  if (kind == QuantKind::kGroup128) return 128;
  return 0;
}

// Kernel arguments of the quantization step writing `out` (rows of `width` fp8 values) and,
// for dynamic quant, `scales`; shared by every fused op family.
inline QuantArgs make_quant_args(Tensor& out, int64_t width, std::optional<Tensor>& scales,
                                 const std::optional<Tensor>& scale,
                                 const std::optional<Tensor>& scale_ub, const Fp8Format& fmt,
                                 const Tensor& input, int64_t group, bool ue8m0,
                                 bool transposed) {
  QuantArgs q{};
  q.out = static_cast<uint8_t*>(out.mutable_data_ptr());
  q.out_stride = width;
  q.scales = scales ? static_cast<float*>(scales->mutable_data_ptr()) : nullptr;
  q.static_scale = scale ? static_cast<const float*>(scale->const_data_ptr()) : nullptr;
  q.scale_ub = scale_ub ? static_cast<const float*>(scale_ub->const_data_ptr()) : nullptr;
  q.fp8_max = fmt.max;
  q.inv_fp8_max = 1.0f / fmt.max;
  q.min_scale = static_cast<float>(1.0 / (static_cast<double>(fmt.max) * 512.0));
  q.scale_inner = input.dim() >= 2 ? input.size(-2) : 1;
  q.ngroups = group ? static_cast<int>(width / group) : 1;
  q.fnuz = fmt.fnuz;
  q.ue8m0 = ue8m0;
  q.transposed = transposed;
  return q;
}

inline std::vector<int64_t> shape_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < t.dim(); ++i) s.push_back(t.size(i));
  return s;
}

// ---------------------------------------------------------------- NVFP4

// Block scales per row and the int32 shape torch sees of the swizzled scale buffer (what
// vLLM's create_fp4_scale_tensor allocates for is_sf_swizzled_layout=True).
struct Nvfp4Layout {
  int64_t rows;
  int64_t cols;
  int64_t blocks;   // cols / 16
  int64_t k_tiles;  // ceil(blocks / 4)
  int64_t padded_rows;
};

inline Nvfp4Layout nvfp4_layout(int64_t rows, int64_t cols) {
  Nvfp4Layout l;
  l.rows = rows;
  l.cols = cols;
  l.blocks = cols / kNvfp4Block;
  l.k_tiles = (l.blocks + kSfTileBlocks - 1) / kSfTileBlocks;
  l.padded_rows = (rows + kSfTileRows - 1) / kSfTileRows * kSfTileRows;
  return l;
}

// The quantized width `cols` must be a whole number of 16-element blocks.
inline void check_nvfp4_width(const char* op, int64_t cols, const char* what) {
  VF_CHECK(cols % kNvfp4Block == 0, op, ": NVFP4 quantizes blocks of 16 elements: ", what, " (",
           cols, ") must be a multiple of 16");
}

inline void check_global_scale(const char* op, const Tensor& t, const Tensor& input) {
  check_scale_scalar(op, "global_scale", t, input);
}

// The GPU must be SM100+ and this build must hold SM100 code for `kernel`; anything else would
// run the trap body (or no body at all).
template <typename Kernel>
inline void check_nvfp4_kernel(const char* op, Kernel kernel, int32_t device) {
#if VF_NVFP4_BUILD
  const DeviceInfo& dev = device_info(device);
  VF_CHECK(dev.cc_major >= 10, op, ": NVFP4 quantization needs an SM100 or newer GPU (compute "
           "capability >= 10.0); cuda:", device, " has compute capability ", dev.cc_major, ".",
           dev.cc_minor);
  constexpr int kMaxDevices = 64;
  static std::array<int, kMaxDevices> image{};  // per device: 0 unknown, else binaryVersion
  if (image[device] == 0) {
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) (void)cudaGetLastError();  // clear the sticky-free error
    VF_CHECK(err == cudaSuccess, op, ": this build of vllm_fusion has no kernel image for "
             "compute capability ", dev.cc_major, ".", dev.cc_minor,
             " (rebuild with VLLM_FUSION_CUDA_ARCHS including ", dev.cc_major, ".", dev.cc_minor,
             "a): ", cudaGetErrorString(err));
    image[device] = attr.binaryVersion;
  }
  VF_CHECK(image[device] >= 100, op, ": this build of vllm_fusion has no SM100 code for its "
           "NVFP4 kernels (kernel image sm_", image[device],
           "); rebuild with VLLM_FUSION_CUDA_ARCHS including 10.0a");
#else
  (void)kernel;
  (void)device;
  VF_CHECK(false, op, ": NVFP4 kernels are not part of this build (they need CUDA >= 12.8 "
           "and are not available on ROCm)");
#endif
}

// Outputs of NVFP4 quant of `rows` rows of `cols` elements: packed e2m1 [rows, cols / 2] uint8
// and the swizzled block scales [padded_rows, k_tiles] int32 (each int32 holds 4 e4m3 scales).
// The kernels write every byte of both, the scale padding included.
struct Nvfp4Outputs {
  Tensor out;
  Tensor scales;
};

inline Nvfp4Outputs alloc_nvfp4_outputs(const Tensor& like, const Nvfp4Layout& l) {
  return {torch::stable::new_empty(like, {l.rows, l.cols / 2}, ScalarType::Byte),
          torch::stable::new_empty(like, {l.padded_rows, l.k_tiles}, ScalarType::Int)};
}

inline QuantArgs make_nvfp4_quant_args(Nvfp4Outputs& o, const Tensor& global_scale,
                                       const Nvfp4Layout& l) {
  QuantArgs q{};
  q.out = static_cast<uint8_t*>(o.out.mutable_data_ptr());
  q.out_stride = l.cols / 2;
  q.static_scale = static_cast<const float*>(global_scale.const_data_ptr());
  q.ngroups = static_cast<int>(l.blocks);
  q.block_scales = static_cast<uint8_t*>(o.scales.mutable_data_ptr());
  q.rows = l.rows;
  q.sf_k_tiles = l.k_tiles;
  return q;
}

}  // namespace vllm_fusion
