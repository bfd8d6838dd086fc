// All-reduce over the GPUs of one node fused with what follows it in a tensor-parallel layer:
// the residual add, RMSNorm and (optionally) static per-tensor FP8 quantization.
//
// Every rank owns one buffer that every rank can address (torch symmetric memory, no multicast
// needed): [flags | input half 0 | input half 1 | result half 0 | result half 1], each half
// `capacity` bytes. Calls alternate halves (parity of the call counter), so a call never waits
// for the peers to finish reading the previous call's data: a rank reaches a half again only two
// calls later, after every peer has started the call in between.
//
// one-shot: each block copies its rows of the input into the caller's input half, signals the
//   flag of its block index on every rank, waits for every rank's signal, then sums the rows
//   over all ranks in rank order (every rank gets the same bits), rounds the sum to the input
//   dtype (what the all-reduce returns) and runs add + RMSNorm (+ quant) on it.
// one-shot push: the same, but each block writes its rows into slot `rank` of every rank's input
//   half (world slots of one message each) before the signal, so that after it every rank sums
//   from its own memory: the NVLink traffic is posted writes ahead of the flag instead of reads
//   after it, one round trip less on the critical path of small messages.
// two-shot: rank r owns rows [r * C, (r + 1) * C), C = ceil(rows / world). It reduces them into
//   its result half, signals a second time, and every rank then reads each reduced row from its
//   owner: (world - 1) / world of the data crosses NVLink twice, instead of (world - 1) times.
//
// Flags hold the call counter, which only grows: a peer that is already one call ahead never
// hides its arrival. A block waits only for the blocks of the same index on the other ranks; the
// grid is at most one block per SM, so those blocks are resident together. A peer that has not
// arrived after VLLM_FUSION_ALLREDUCE_TIMEOUT_S stops the kernel with a message naming both
// ranks, as a device-side assert does: a clear error instead of a process that hangs.
//
// Math after the reduction (vLLM 0.26: all_reduce, then vllm_ir.fused_add_rms_norm / rms_norm):
//   a = T(sum over ranks of float(input_r))        the all-reduce result
//   x = float(a) [+ float(residual)]               residual_out = T(x)
//   y = T(T(x * rsqrt(sum(x^2) * (1/H) + eps)) * weight)
//   out = y, or fp8(clamp(y * (1 / scale)))
#include "common.cuh"
#include "host_utils.h"
#include "ops.h"

namespace vllm_fusion {
namespace {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 256;  // flag slots per phase: grids never exceed this
constexpr int kPhases = 2;       // one-shot uses phase 0; two-shot both
constexpr int64_t kFlagBytes =
    static_cast<int64_t>(kPhases) * kMaxBlocks * kMaxRanks * sizeof(uint64_t);
constexpr int kMaxThreads = 512;
constexpr int kMaxNv = 4;  // hidden <= kMaxThreads * kMaxNv * 8 = 16384

struct ArArgs {
  uint8_t* bufs[kMaxRanks];  // every rank's buffer, as mapped in this process
  int rank;
  int world;
  int64_t capacity;  // bytes of one half
  const void* input;  // [rows, H], contiguous
  const void* residual;  // [rows, H] contiguous, or nullptr
  void* residual_out;  // [rows, H]
  void* out;  // [rows, H]: T, or fp8 bytes when quantizing
  const void* weight;
  const float* scale;  // static FP8 scale, or nullptr
  int64_t rows;
  int hidden;
  float inv_hidden;  // 1.0f / hidden, as torch's mean() multiplies by it
  float eps;
  float fp8_max;
  bool fnuz;
  uint64_t* counter;  // this rank's [last finished call, blocks done in this call]
  uint64_t timeout_ticks;  // longest wait for a peer, in steady_ticks(); 0: wait forever
};

// ---------------------------------------------------------------- peer synchronization

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
#ifdef USE_ROCM
  __hip_atomic_store(p, v, __ATOMIC_RELEASE, __HIP_MEMORY_SCOPE_SYSTEM);
#else
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#endif
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
#ifdef USE_ROCM
  return __hip_atomic_load(p, __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_SYSTEM);
#else
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#endif
}

// 16 bytes another rank wrote during this call: never served from a stale L1 line.
__device__ __forceinline__ uint4 load_peer16(const void* p) {
#ifdef USE_ROCM
  const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
  uint4 v;
  v.x = __builtin_nontemporal_load(q);
  v.y = __builtin_nontemporal_load(q + 1);
  v.z = __builtin_nontemporal_load(q + 2);
  v.w = __builtin_nontemporal_load(q + 3);
  return v;
#else
  return __ldcv(reinterpret_cast<const uint4*>(p));
#endif
}

__device__ __forceinline__ uint64_t* flag_slot(uint8_t* buf, int phase, int block, int src) {
  return reinterpret_cast<uint64_t*>(buf) + (static_cast<int64_t>(phase) * kMaxBlocks + block) *
                                                kMaxRanks + src;
}

// A clock at a constant rate: nanoseconds on CUDA, the wall clock's ticks on ROCm.
__device__ __forceinline__ uint64_t steady_ticks() {
#ifdef USE_ROCM
  return wall_clock64();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

// Spins until rank `peer` has signalled call `epoch` here. The clock is read once per 1024 polls,
// so waiting for a peer that is on time stays a plain poll loop. Out of line and with scalar
// arguments only, so that the kernels keep their register budget.
__device__ __noinline__ void wait_for_peer(const uint64_t* flag, uint64_t epoch,
                                           uint64_t timeout_ticks, int rank, int phase, int peer) {
  const uint64_t start = steady_ticks();
  for (uint32_t polls = 1; load_acquire_sys(flag) < epoch; ++polls) {
    if (timeout_ticks == 0 || polls % 1024 != 0 || steady_ticks() - start <= timeout_ticks)
      continue;
    printf("vllm_fusion: all_reduce_rms_norm: rank %d (block %d, phase %d) waited longer than "
           "VLLM_FUSION_ALLREDUCE_TIMEOUT_S for rank %d to join call %llu (its last signal here: "
           "call %llu). The ranks of the group did not make the same fused all-reduce calls; "
           "stopping the kernel instead of hanging.\n",
           rank, static_cast<int>(blockIdx.x), phase, peer,
           static_cast<unsigned long long>(epoch),
           static_cast<unsigned long long>(load_acquire_sys(flag)));
    __trap();
  }
}

// Makes this block's writes to its own buffer visible to the blocks of the same index on every
// rank, and waits until theirs are visible here.
__device__ __forceinline__ void peer_barrier(const ArArgs& a, int phase, uint64_t epoch) {
  __syncthreads();
  if (threadIdx.x < a.world) {
    store_release_sys(flag_slot(a.bufs[threadIdx.x], phase, blockIdx.x, a.rank), epoch);
    const uint64_t* mine = flag_slot(a.bufs[a.rank], phase, blockIdx.x, threadIdx.x);
    if (load_acquire_sys(mine) < epoch)
      wait_for_peer(mine, epoch, a.timeout_ticks, a.rank, phase, threadIdx.x);
  }
  __syncthreads();
}

// The last block of the call to finish records the call as done (the next call's epoch).
__device__ __forceinline__ void finish_call(const ArArgs& a, uint64_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    auto* done = reinterpret_cast<unsigned long long*>(a.counter + 1);
    if (atomicAdd(done, 1ull) == gridDim.x - 1) {
      a.counter[1] = 0;
      a.counter[0] = epoch;
    }
  }
}

__device__ __forceinline__ uint64_t call_epoch(const ArArgs& a) {
  return *reinterpret_cast<volatile uint64_t*>(a.counter) + 1;
}

template <typename T>
__device__ __forceinline__ T* input_half(const ArArgs& a, int rank, uint64_t epoch) {
  return reinterpret_cast<T*>(a.bufs[rank] + kFlagBytes + (epoch & 1) * a.capacity);
}

template <typename T>
__device__ __forceinline__ T* result_half(const ArArgs& a, int rank, uint64_t epoch) {
  return reinterpret_cast<T*>(a.bufs[rank] + kFlagBytes + (2 + (epoch & 1)) * a.capacity);
}

// ---------------------------------------------------------------- row steps
// A row is owned by the whole block: thread t holds vectors t, t + blockDim, ... (NV of them).

template <typename T, int NV>
__device__ __forceinline__ void load_row(const T* src, Vec8<T> (&v)[NV], int nvec) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) v[k].raw = *reinterpret_cast<const uint4*>(src + j * kVec);
  }
}

template <typename T, int NV>
__device__ __forceinline__ void load_weight(const ArArgs& a, Vec8<T> (&w)[NV], int nvec) {
  const T* src = static_cast<const T*>(a.weight);
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) w[k].raw = __ldg(reinterpret_cast<const uint4*>(src + j * kVec));
  }
}

template <typename T, int NV>
__device__ __forceinline__ void store_row(T* dst, const Vec8<T> (&v)[NV], int nvec) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) *reinterpret_cast<uint4*>(dst + j * kVec) = v[k].raw;
  }
}

// x = T(sum over ranks of row `row` of `region(rank)`), summed in rank order; this rank's own
// values come from `own` when given (already in registers), else from its region too.
template <typename T, int NV, typename Region>
__device__ __forceinline__ void reduce_row(const ArArgs& a, Region region, int64_t row,
                                           const Vec8<T> (*own)[NV], float (&x)[NV][kVec]) {
  const int nvec = a.hidden / kVec;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j >= nvec) continue;
    Vec8<T> v[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      if (r >= a.world) continue;
      if (own != nullptr && r == a.rank)
        v[r] = (*own)[k];
      else
        v[r].raw = load_peer16(region(r) + row * a.hidden + j * kVec);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[k][i] = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r)
      if (r < a.world) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[k][i] += to_float(v[r].h[i]);
      }
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[k][i] = round_to<T>(x[k][i]);
  }
}

// x = row `row` of `owner`'s result half (already reduced and rounded).
template <typename T, int NV>
__device__ __forceinline__ void load_reduced_row(const ArArgs& a, int owner, int64_t row,
                                                 uint64_t epoch, float (&x)[NV][kVec]) {
  const int nvec = a.hidden / kVec;
  const T* src = result_half<T>(a, owner, epoch) + row * a.hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j >= nvec) continue;
    Vec8<T> v;
    v.raw = load_peer16(src + j * kVec);
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[k][i] = to_float(v.h[i]);
  }
}

// Residual add, RMSNorm and quant of one all-reduced row held by the whole block; the row's
// residual (`rin`, when a.residual is set) and the weight are already loaded.
template <typename T, int NV, bool QUANT>
__device__ __forceinline__ void norm_row(const ArArgs& a, int64_t row, float (&x)[NV][kVec],
                                         const Vec8<T> (&rin)[NV], const Vec8<T> (&win)[NV],
                                         float inv_scale, float* smem) {
  const int nvec = a.hidden / kVec;
  const int64_t base = row * a.hidden;
  T* res_out = static_cast<T*>(a.residual_out);
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j >= nvec) continue;
    if (a.residual != nullptr) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) x[k][i] += to_float(rin[k].h[i]);
    }
    store8(res_out + base + j * kVec, x[k]);
#pragma unroll
    for (int i = 0; i < kVec; ++i) ss += x[k][i] * x[k][i];
  }
  __syncthreads();  // the previous row's reduction is done reading smem
  ss = block_reduce(ss, smem, SumOp{}, 0.f);
  // torch: x * rsqrt(mean(x^2) + eps), mean = sum * (1/H); no FMA between the two.
  const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_hidden), a.eps));
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j >= nvec) continue;
    float y[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i)
      y[i] = round_to<T>(round_to<T>(x[k][i] * rinv) * to_float(win[k].h[i]));
    if constexpr (QUANT) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] = clamp_fp8(y[i] * inv_scale, a.fp8_max);
      store_fp8x8(static_cast<uint8_t*>(a.out) + base + j * kVec, y, a.fnuz);
    } else {
      store8(static_cast<T*>(a.out) + base + j * kVec, y);
    }
  }
}

template <typename T, int NV>
__device__ __forceinline__ void load_residual(const ArArgs& a, int64_t row, Vec8<T> (&rin)[NV]) {
  if (a.residual != nullptr)
    load_row<T, NV>(static_cast<const T*>(a.residual) + row * a.hidden, rin, a.hidden / kVec);
}

// ---------------------------------------------------------------- kernels

// Where rank `src`'s rows of this call are read from: its own input half (pull), or slot `src`
// of this rank's input half, where it wrote them (push).
template <typename T, bool PUSH>
__device__ __forceinline__ const T* source_rows(const ArArgs& a, int src, uint64_t epoch) {
  if constexpr (PUSH) return input_half<T>(a, a.rank, epoch) + src * a.rows * a.hidden;
  return input_half<T>(a, src, epoch);
}

// Publishes this rank's row `row` for the sum: into its own input half (pull), or into slot
// `rank` of every other rank's input half (push; the own copy only when `with_own`).
template <typename T, int NV, bool PUSH>
__device__ __forceinline__ void publish_row(const ArArgs& a, int64_t row, uint64_t epoch,
                                            const Vec8<T> (&v)[NV], bool with_own) {
  const int nvec = a.hidden / kVec;
  if constexpr (PUSH) {
    for (int r = 0; r < a.world; ++r)
      if (r != a.rank || with_own)
        store_row<T, NV>(input_half<T>(a, r, epoch) + (a.rank * a.rows + row) * a.hidden, v,
                         nvec);
  } else {
    store_row<T, NV>(input_half<T>(a, a.rank, epoch) + row * a.hidden, v, nvec);
  }
}

template <typename T, int NV, bool QUANT, bool PUSH>
__global__ void __launch_bounds__(kMaxThreads) all_reduce_rms_norm_one_shot(const ArArgs a) {
  __shared__ float smem[kMaxWarps];
  const int nvec = a.hidden / kVec;
  const uint64_t epoch = call_epoch(a);
  const float inv_scale = QUANT ? 1.0f / __ldg(a.scale) : 1.0f;  // torch: x * scale.reciprocal()
  Vec8<T> win[NV], rin[NV];
  load_weight<T, NV>(a, win, nvec);
  auto inputs = [&](int r) { return source_rows<T, PUSH>(a, r, epoch); };
  if (a.rows <= gridDim.x) {
    // One row per block (decode sizes): every load of the row is issued before the barrier.
    const int64_t row = blockIdx.x;
    Vec8<T> xin[NV];
    load_row<T, NV>(static_cast<const T*>(a.input) + row * a.hidden, xin, nvec);
    load_residual<T, NV>(a, row, rin);
    publish_row<T, NV, PUSH>(a, row, epoch, xin, /*with_own=*/false);
    peer_barrier(a, 0, epoch);
    float x[NV][kVec];
    reduce_row<T, NV>(a, inputs, row, &xin, x);
    norm_row<T, NV, QUANT>(a, row, x, rin, win, inv_scale, smem);
  } else {
    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
      Vec8<T> xin[NV];
      load_row<T, NV>(static_cast<const T*>(a.input) + row * a.hidden, xin, nvec);
      publish_row<T, NV, PUSH>(a, row, epoch, xin, /*with_own=*/true);
    }
    peer_barrier(a, 0, epoch);
    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
      load_residual<T, NV>(a, row, rin);
      float x[NV][kVec];
      reduce_row<T, NV>(a, inputs, row, static_cast<const Vec8<T>(*)[NV]>(nullptr), x);
      norm_row<T, NV, QUANT>(a, row, x, rin, win, inv_scale, smem);
    }
  }
  finish_call(a, epoch);
}

template <typename T, int NV, bool QUANT>
__global__ void __launch_bounds__(kMaxThreads) all_reduce_rms_norm_two_shot(const ArArgs a) {
  __shared__ float smem[kMaxWarps];
  const uint64_t epoch = call_epoch(a);
  const float inv_scale = QUANT ? 1.0f / __ldg(a.scale) : 1.0f;
  const int64_t chunk = (a.rows + a.world - 1) / a.world;
  const int nvec = a.hidden / kVec;
  Vec8<T> win[NV], rin[NV];
  load_weight<T, NV>(a, win, nvec);
  // Block b handles chunk offsets b, b + grid, ... of every rank's chunk.
  for (int64_t i = blockIdx.x; i < chunk; i += gridDim.x)
    for (int p = 0; p < a.world; ++p) {
      const int64_t row = p * chunk + i;
      if (row >= a.rows) continue;
      Vec8<T> xin[NV];
      load_row<T, NV>(static_cast<const T*>(a.input) + row * a.hidden, xin, nvec);
      store_row<T, NV>(input_half<T>(a, a.rank, epoch) + row * a.hidden, xin, nvec);
    }
  peer_barrier(a, 0, epoch);
  auto inputs = [&](int r) { return static_cast<const T*>(input_half<T>(a, r, epoch)); };
  for (int64_t i = blockIdx.x; i < chunk; i += gridDim.x) {
    const int64_t row = a.rank * chunk + i;
    if (row >= a.rows) break;
    float x[NV][kVec];
    reduce_row<T, NV>(a, inputs, row, static_cast<const Vec8<T>(*)[NV]>(nullptr), x);
    T* dst = result_half<T>(a, a.rank, epoch) + row * a.hidden;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      if (j < nvec) store8(dst + j * kVec, x[k]);
    }
  }
  peer_barrier(a, 1, epoch);
  for (int64_t i = blockIdx.x; i < chunk; i += gridDim.x)
    for (int p = 0; p < a.world; ++p) {
      const int64_t row = p * chunk + i;
      if (row >= a.rows) continue;
      load_residual<T, NV>(a, row, rin);
      float x[NV][kVec];
      load_reduced_row<T, NV>(a, p, row, epoch, x);
      norm_row<T, NV, QUANT>(a, row, x, rin, win, inv_scale, smem);
    }
  finish_call(a, epoch);
}

enum class Algorithm { kOneShot, kOneShotPush, kTwoShot };

template <typename T, int NV, bool QUANT>
void launch_nv(const ArArgs& a, Algorithm algo, int blocks, int threads, gpuStream_t stream) {
  switch (algo) {
    case Algorithm::kTwoShot:
      all_reduce_rms_norm_two_shot<T, NV, QUANT><<<blocks, threads, 0, stream>>>(a);
      break;
    case Algorithm::kOneShotPush:
      all_reduce_rms_norm_one_shot<T, NV, QUANT, true><<<blocks, threads, 0, stream>>>(a);
      break;
    default:
      all_reduce_rms_norm_one_shot<T, NV, QUANT, false><<<blocks, threads, 0, stream>>>(a);
      break;
  }
}

template <typename T, bool QUANT>
void launch_typed(const ArArgs& a, int nv, Algorithm algo, int blocks, int threads,
                  gpuStream_t stream) {
  switch (nv) {
    case 1:
      launch_nv<T, 1, QUANT>(a, algo, blocks, threads, stream);
      break;
    case 2:
      launch_nv<T, 2, QUANT>(a, algo, blocks, threads, stream);
      break;
    default:
      launch_nv<T, kMaxNv, QUANT>(a, algo, blocks, threads, stream);
      break;
  }
}

// VLLM_FUSION_ALLREDUCE_TIMEOUT_S: how long a block waits for a peer before it stops the kernel.
// The default is NCCL's watchdog timeout (10 minutes): ranks may legitimately be far apart while
// one of them still compiles a graph. 0 waits forever.
double peer_timeout_s() {
  static const double seconds = [] {
    const char* v = std::getenv("VLLM_FUSION_ALLREDUCE_TIMEOUT_S");
    if (v == nullptr || *v == '\0') return 600.0;
    char* end = nullptr;
    const double s = std::strtod(v, &end);
    VF_CHECK(end != v && *end == '\0' && s >= 0.0,
             "VLLM_FUSION_ALLREDUCE_TIMEOUT_S must be a number of seconds >= 0 (0: wait "
             "forever), got '", v, "'");
    return s;
  }();
  return seconds;
}

uint64_t peer_timeout_ticks(int32_t device) {
#ifdef USE_ROCM
  const double ticks_per_s = 1000.0 * device_info(device).wall_clock_khz;
#else
  (void)device;
  const double ticks_per_s = 1e9;  // %globaltimer counts nanoseconds
#endif
  return static_cast<uint64_t>(peer_timeout_s() * ticks_per_s);
}

void check_contiguous(const char* op, const char* name, const Tensor& t) {
  VF_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace

int64_t all_reduce_flag_bytes() { return kFlagBytes; }

std::tuple<Tensor, Tensor> all_reduce_rms_norm(const Tensor& input,
                                               const std::optional<Tensor>& residual,
                                               const Tensor& weight, double epsilon,
                                               const std::optional<Tensor>& scale,
                                               const std::vector<int64_t>& buffers,
                                               const Tensor& counter, int64_t rank, int64_t capacity,
                                               bool two_shot, bool push) {
  constexpr const char* op = "all_reduce_rms_norm";
  // The RMSNorm checks in norm_quant's order and words (csrc/norm_quant_kernels.cu), then what
  // the all-reduce adds.
  check_activation(op, "input", input);
  const int64_t H = input.size(-1);
  const ScalarType dt = input.scalar_type();
  if (residual) {
    check_activation(op, "residual", *residual);
    check_same_device(op, "residual", *residual, input);
    check_same_shape(op, "residual", *residual, input);
    VF_CHECK(residual->scalar_type() == dt, op, ": residual must have the same dtype as input (",
             dtype_name(dt), "), got ", dtype_name(residual->scalar_type()));
  }
  check_same_device(op, "weight", weight, input);
  VF_CHECK(weight.dim() == 1 && weight.size(0) == H, op, ": weight must be 1-D of size ", H,
           " (the last dim of input)");
  VF_CHECK(weight.scalar_type() == dt, op, ": weight must have the same dtype as input (",
           dtype_name(dt), "), got ", dtype_name(weight.scalar_type()));
  VF_CHECK(weight.size(0) == 1 || weight.stride(0) == 1, op, ": weight must be contiguous");
  check_contiguous(op, "input", input);
  if (residual) check_contiguous(op, "residual", *residual);
  if (scale) check_scale_scalar(op, "scale", *scale, input);
  VF_CHECK(H % kVec == 0 && H <= kMaxThreads * kMaxNv * kVec, op,
           ": the last dim of input must be a multiple of ", kVec, " and at most ",
           kMaxThreads * kMaxNv * kVec, ", got ", H);
  const int64_t world = static_cast<int64_t>(buffers.size());
  VF_CHECK(world >= 2 && world <= kMaxRanks, op, ": buffers must hold one address per rank, 2 to ",
           kMaxRanks, " ranks, got ", world);
  VF_CHECK(rank >= 0 && rank < world, op, ": rank must be in [0, ", world, "), got ", rank);
  for (int64_t b : buffers)
    VF_CHECK(b != 0 && (b & 15) == 0, op, ": every buffer address must be 16-byte aligned");
  VF_CHECK(capacity > 0 && capacity % 16 == 0, op,
           ": capacity must be a positive multiple of 16 bytes, got ", capacity);
  check_same_device(op, "counter", counter, input);
  VF_CHECK(counter.scalar_type() == ScalarType::Long && counter.numel() >= 2, op,
           ": counter must be an int64 tensor of at least 2 elements");

  const int32_t device = input.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const std::vector<int64_t> shape = shape_of(input);
  const Fp8Format fmt = fp8_format(device);
  Tensor out = torch::stable::new_empty(input, shape, scale ? fmt.dtype : dt);
  Tensor residual_out = torch::stable::new_empty(input, shape, dt);
  const int64_t rows = input.numel() / H;
  const int64_t elt = dt == ScalarType::BFloat16 || dt == ScalarType::Half ? 2 : 0;
  VF_CHECK(rows * H * elt <= capacity, op, ": ", rows, " x ", H,
           " elements do not fit the workspace (", capacity, " bytes)");
  VF_CHECK(!(push && two_shot), op, ": push is a one-shot algorithm; two_shot must be False");
  VF_CHECK(!push || world * rows * H * elt <= capacity, op, ": push needs one slot per rank: ",
           world, " x ", rows, " x ", H, " elements do not fit the workspace (", capacity,
           " bytes)");
  if (rows == 0) return {out, residual_out};

  ArArgs a{};
  for (int64_t r = 0; r < world; ++r) a.bufs[r] = reinterpret_cast<uint8_t*>(buffers[r]);
  a.rank = static_cast<int>(rank);
  a.world = static_cast<int>(world);
  a.capacity = capacity;
  a.input = input.const_data_ptr();
  a.residual = residual ? residual->const_data_ptr() : nullptr;
  a.residual_out = residual_out.mutable_data_ptr();
  a.out = out.mutable_data_ptr();
  a.weight = weight.const_data_ptr();
  a.scale = scale ? static_cast<const float*>(scale->const_data_ptr()) : nullptr;
  a.rows = rows;
  a.hidden = static_cast<int>(H);
  a.inv_hidden = 1.0f / static_cast<float>(H);
  a.eps = static_cast<float>(epsilon);
  a.fp8_max = fmt.max;
  a.fnuz = fmt.fnuz;
  a.counter = static_cast<uint64_t*>(counter.mutable_data_ptr());
  a.timeout_ticks = peer_timeout_ticks(device);

  const int64_t nvec = H / kVec;
  const int nv = nvec <= kMaxThreads ? 1 : nvec <= 2 * kMaxThreads ? 2 : kMaxNv;
  const int threads = static_cast<int>(std::max<int64_t>(
      VF_WARP_SIZE, (nvec + nv - 1) / nv + VF_WARP_SIZE - 1) / VF_WARP_SIZE * VF_WARP_SIZE);
  const int64_t work = two_shot ? (rows + world - 1) / world : rows;
  const int blocks = static_cast<int>(std::min<int64_t>(
      work, std::min<int64_t>(device_info(device).num_sms, kMaxBlocks)));
  const gpuStream_t stream = current_stream(device);
  const Algorithm algo = two_shot ? Algorithm::kTwoShot
                         : push   ? Algorithm::kOneShotPush
                                  : Algorithm::kOneShot;
  if (dt == ScalarType::BFloat16) {
    if (scale)
      launch_typed<bf16_t, true>(a, nv, algo, blocks, threads, stream);
    else
      launch_typed<bf16_t, false>(a, nv, algo, blocks, threads, stream);
  } else {
    if (scale)
      launch_typed<half_t, true>(a, nv, algo, blocks, threads, stream);
    else
      launch_typed<half_t, false>(a, nv, algo, blocks, threads, stream);
  }
  check_launch(op);
  return {out, residual_out};
}

}  // namespace vllm_fusion
