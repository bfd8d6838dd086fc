// Rotary position embedding of q and k, optionally preceded by a per-head RMSNorm of q and k
// (Qwen3's q_norm / k_norm) and followed by the write of k and v into the paged KV cache.
//
// vLLM 0.26 runs these as three or four kernels: rms_norm on the q and k views of qkv (Qwen3),
// rotary_embedding in place on q and k, and reshape_and_cache_flash reading k and v again. Fused,
// each head is read once and written once (q_out, k_out) plus once into the cache.
//
// Math (the torch reference vllm_fusion/ops/rope.py, qk_norm_rope_kv_cache_ref, is the spec):
//   x  = head (D values of the input dtype T)
//   x  = T(T(x * rsqrt(sum(x^2) * (1/D) + eps)) * weight)          only with q/k weights
//   NeoX pairs (i, i + rot/2), GPT-J pairs (2i, 2i + 1), i < rot/2, cos_i / sin_i of the row of
//   `positions[t]` in cos_sin_cache, all in fp32 with every product and sum rounded (no FMA):
//     a' = a * cos - b * sin,   b' = b * cos + a * sin;   dims >= rot pass through
//   out = T(result); the cache gets k_out (and v) as is, or fp8(clamp(x / scale)).
//
// Work split. Fast path (token kernel): heads of D = 8 * 2^k <= 256 elements with 16-byte
// aligned heads and a rotary dim whose lane slices are wholly rotated or not (every Llama /
// Qwen geometry). Work is token-major: a block owns a range of one token's "items" (its Hq q
// heads, Hkv k heads and, when a cache is written, Hkv v heads); D / 8 lanes hold a head, 8
// contiguous elements (one 16-byte access) each, and a thread handles up to 3 items, all head
// loads issued before any math. The token's position, cache slot, fp8 scales, norm weights and
// the lane's cos / sin run (contiguous in the row: NeoX columns i mod rot/2, GPT-J i / 2) are
// loaded once per thread and serve all its heads; the position / slot loads go first so that
// the dependent cos / sin load overlaps the head loads. NeoX partners are (rot/2) / 8 lanes
// away (a power of two: xor shuffle). Long prefills: one block per token (48 heads at D = 128);
// few tokens: a token's items split over several blocks so that decode still spreads over SMs.
// Other geometries: one warp per (token, head) unit (vector kernel: V contiguous elements per
// lane, the NeoX partner by shuffle when (rot/2) / V is a power of two, else through shared
// memory, as for D = 80, 96, 192 or partial rotary); heads of other sizes or unaligned views
// take the generic kernel (the head staged in shared memory, one element per lane and step).
#include "common.cuh"
#include "host_utils.h"
#include "ops.h"

namespace vllm_fusion {

// The launch's dynamic shared memory. Declared outside the anonymous namespace: an extern
// __shared__ array there would have internal linkage, which HIP's clang warns about.
__device__ __forceinline__ float* rope_dynamic_smem() {
  extern __shared__ float vf_rope_smem[];
  return vf_rope_smem;
}

namespace {

constexpr int kThreads = 256;
constexpr int kMaxHeadSize = 512;

enum CacheKind : int { kNoCache = 0, kSameDtypeCache = 1, kFp8Cache = 2 };
enum CosSinKind : int { kCosSinF32 = 0, kCosSinBf16 = 1, kCosSinF16 = 2 };

struct RopeArgs {
  const void* q;
  int64_t q_tstride, q_hstride;  // elements between tokens / heads
  const void* k;
  int64_t k_tstride, k_hstride;
  const void* v;
  int64_t v_tstride, v_hstride;
  const void* positions;
  int64_t pos_stride;
  bool pos64;
  const void* cos_sin;  // [max_pos, rot] contiguous
  int cs_kind;
  const void* q_weight;  // nullptr: no norm
  const void* k_weight;
  float eps;
  float inv_d;  // 1.0f / D: torch's mean() multiplies the sum by it
  void* k_cache;
  int64_t kc_s0, kc_s1, kc_s2;  // block, offset-in-block, head strides (elements)
  void* v_cache;
  int64_t vc_s0, vc_s1, vc_s2;
  int64_t block_size;
  const int64_t* slots;
  int64_t slot_stride;
  int64_t nslots;
  const float* k_scale;
  const float* v_scale;
  int cache_kind;
  bool fnuz;
  float fp8_max;
  void* q_out;  // contiguous [T, Hq, D]
  void* k_out;  // contiguous [T, Hkv, D]
  int64_t units;  // T * units_per_token
  int units_per_token;
  int hq, hkv, d, dv, rot, half;
  int half_lanes;  // vector / token kernels, NeoX by shuffle: (rot / 2) / V
  int lh_log2;          // token kernel: log2 of the lanes per head (D / 8)
  int items_per_block;  // token kernel: heads of one token per block
  int groups;           // token kernel: blocks per token
};

// ---------------------------------------------------------------- small device helpers

// Raw storage of N bytes, moved as one access (two for 32 bytes).
template <int N>
struct Raw;
template <>
struct Raw<2> {
  using type = uint16_t;
};
template <>
struct Raw<4> {
  using type = uint32_t;
};
template <>
struct Raw<8> {
  using type = uint2;
};
template <>
struct Raw<16> {
  using type = uint4;
};
template <>
struct Raw<32> {
  struct type {
    uint4 lo, hi;
  };
};

// V elements of E, loaded / stored as one aligned access.
template <typename E, int V>
union Pack {
  typename Raw<V * sizeof(E)>::type raw;
  E h[V];
};

template <typename E, int V>
__device__ __forceinline__ Pack<E, V> load_pack(const E* p) {
  Pack<E, V> v;
  v.raw = *reinterpret_cast<const typename Raw<V * sizeof(E)>::type*>(p);
  return v;
}

template <typename E, int V>
__device__ __forceinline__ void store_pack(E* p, const Pack<E, V>& v) {
  *reinterpret_cast<typename Raw<V * sizeof(E)>::type*>(p) = v.raw;
}

__device__ __forceinline__ int64_t load_position(const RopeArgs& a, int64_t t) {
  return a.pos64 ? static_cast<const int64_t*>(a.positions)[t * a.pos_stride]
                 : static_cast<int64_t>(static_cast<const int32_t*>(a.positions)[t * a.pos_stride]);
}

// Element `j` of a cos_sin_cache row, as fp32.
__device__ __forceinline__ float load_cos_sin(const RopeArgs& a, int64_t row, int j) {
  const int64_t i = row * a.rot + j;
  switch (a.cs_kind) {
    case kCosSinBf16:
      return to_float(static_cast<const bf16_t*>(a.cos_sin)[i]);
    case kCosSinF16:
      return to_float(static_cast<const half_t*>(a.cos_sin)[i]);
    default:
      return __ldg(static_cast<const float*>(a.cos_sin) + i);
  }
}

// The two rotated values of a pair (a, b): a' = a*c - b*s, b' = b*c + a*s, rounded as torch's
// separate fp32 ops round them.
__device__ __forceinline__ float rot_first(float a, float b, float c, float s) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
__device__ __forceinline__ float rot_second(float a, float b, float c, float s) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

__device__ __forceinline__ float fp8_value(float x, float scale, const RopeArgs& a) {
  return clamp_fp8(x / scale, a.fp8_max);  // IEEE division, as torch's x / scale
}

// Which head of which tensor a unit is.
struct Unit {
  int64_t t;
  int kind;  // 0: q head, 1: k head, 2: v head
  int head;  // within its tensor
  int64_t slot;  // cache slot of the token (k / v heads), < 0: not written
};

__device__ __forceinline__ Unit unit_of(const RopeArgs& a, int64_t unit) {
  Unit u;
  u.t = unit / a.units_per_token;
  const int h = static_cast<int>(unit % a.units_per_token);
  u.kind = h < a.hq ? 0 : (h < a.hq + a.hkv ? 1 : 2);
  u.head = u.kind == 0 ? h : (u.kind == 1 ? h - a.hq : h - a.hq - a.hkv);
  u.slot = -1;
  if (a.cache_kind != kNoCache && u.kind != 0 && u.t < a.nslots)  // q heads never need it
    u.slot = a.slots[u.t * a.slot_stride];
  return u;
}

// Offset of (slot, head) in a cache [num_blocks, block_size, H, D] with strides s0, s1, s2.
__device__ __forceinline__ int64_t cache_offset(int64_t slot, int64_t block_size, int head,
                                                int64_t s0, int64_t s1, int64_t s2) {
  return (slot / block_size) * s0 + (slot % block_size) * s1 + head * s2;
}

// ---------------------------------------------------------------- vector kernel

// Stores V values of lane's slice into a cache row: as T, or as fp8 of value / scale.
template <typename T, int V>
__device__ __forceinline__ void store_cache_pack(void* cache, int64_t off, const float (&y)[V],
                                                 const float* scale, const RopeArgs& a) {
  if (a.cache_kind == kFp8Cache) {
    const float s = __ldg(scale);
    Pack<uint8_t, V> p;
#pragma unroll
    for (int e = 0; e < V; e += 2) {
      const uint16_t two =
          float2_to_fp8x2(fp8_value(y[e], s, a), fp8_value(y[e + 1], s, a), a.fnuz);
      p.h[e] = static_cast<uint8_t>(two & 0xff);
      p.h[e + 1] = static_cast<uint8_t>(two >> 8);
    }
    store_pack<uint8_t, V>(static_cast<uint8_t*>(cache) + off, p);
  } else {
    Pack<T, V> p;
#pragma unroll
    for (int e = 0; e < V; ++e) p.h[e] = from_float<T>(y[e]);
    store_pack<T, V>(static_cast<T*>(cache) + off, p);
  }
}

// V contiguous elements per lane. MODE: 0 GPT-J, 1 NeoX with partners by shuffle, 2 NeoX with
// partners through shared memory (one D-float buffer per warp).
template <typename T, int V, int MODE>
__global__ void __launch_bounds__(kThreads) rope_vec_kernel(const RopeArgs a) {
  float* smem = rope_dynamic_smem();
  const int lane = threadIdx.x % VF_WARP_SIZE;
  const int warp = threadIdx.x / VF_WARP_SIZE;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (blockDim.x / VF_WARP_SIZE) + warp;
  const bool unit_ok = unit < a.units;  // warp-uniform
  const Unit u = unit_of(a, unit_ok ? unit : 0);
  const int e0 = lane * V;
  const bool rope_unit = unit_ok && u.kind < 2;
  const bool lane_ok = e0 < a.d;

  if (unit_ok && u.kind == 2) {  // v head: into the cache only
    if (u.slot >= 0) {
      const T* src = static_cast<const T*>(a.v) + u.t * a.v_tstride + u.head * a.v_hstride;
      const int64_t off = cache_offset(u.slot, a.block_size, u.head, a.vc_s0, a.vc_s1, a.vc_s2);
      for (int i = e0; i < a.dv; i += VF_WARP_SIZE * V) {
        const Pack<T, V> p = load_pack<T, V>(src + i);
        float y[V];
#pragma unroll
        for (int e = 0; e < V; ++e) y[e] = to_float(p.h[e]);
        store_cache_pack<T, V>(a.v_cache, off + i, y, a.v_scale, a);
      }
    }
  }

  // ---- phase 1: load (and normalize) this lane's slice; cos / sin of its rotated elements
  float x[V], c[V], s[V];
  const bool is_q = u.kind == 0;
  if (rope_unit) {
    const T* src = is_q ? static_cast<const T*>(a.q) + u.t * a.q_tstride + u.head * a.q_hstride
                        : static_cast<const T*>(a.k) + u.t * a.k_tstride + u.head * a.k_hstride;
    const T* w = static_cast<const T*>(is_q ? a.q_weight : a.k_weight);
    Pack<T, V> xin, win;
    if (lane_ok) {
      xin = load_pack<T, V>(src + e0);
      if (w != nullptr) win = load_pack<T, V>(w + e0);
    }
    const int64_t pos = load_position(a, u.t);
    // GPT-J: one cos / sin per pair (kept in its even element).
    constexpr int kStep = MODE == 0 ? 2 : 1;
#pragma unroll
    for (int e = 0; e < V; e += kStep) {
      const int i = e0 + e;
      c[e] = 1.f;
      s[e] = 0.f;
      if (lane_ok && i < a.rot) {
        const int j = MODE == 0 ? i / 2 : (i < a.half ? i : i - a.half);
        c[e] = load_cos_sin(a, pos, j);
        s[e] = load_cos_sin(a, pos, a.half + j);
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = lane_ok ? to_float(xin.h[e]) : 0.f;
    if (w != nullptr) {
      float ss = 0.f;
#pragma unroll
      for (int e = 0; e < V; ++e) ss += x[e] * x[e];
      ss = warp_reduce(ss, SumOp{});
      // torch: x * rsqrt(mean(x^2) + eps), mean = sum * (1/D); no FMA between the two.
      const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_d), a.eps));
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = round_to<T>(round_to<T>(x[e] * rinv) * to_float(win.h[e]));
    }
    if constexpr (MODE == 2) {
      if (lane_ok) {
#pragma unroll
        for (int e = 0; e < V; ++e) smem[warp * a.d + e0 + e] = x[e];
      }
    }
  }
  if constexpr (MODE == 2) __syncthreads();  // every thread of the block gets here

  // ---- phase 2: rotate, store q_out / k_out and the cache slot
  if (!rope_unit) return;
  float p[V];  // NeoX: the partner of each element
  if constexpr (MODE == 1) {
#pragma unroll
    for (int e = 0; e < V; ++e) p[e] = shfl_xor(x[e], a.half_lanes, VF_WARP_SIZE);
  } else if constexpr (MODE == 2) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int i = e0 + e;
      p[e] = (lane_ok && i < a.rot) ? smem[warp * a.d + (i < a.half ? i + a.half : i - a.half)]
                                    : 0.f;
    }
  }
  if (!lane_ok) return;
  float y[V];
  if constexpr (MODE == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 2) {
      const bool rotated = e0 + e < a.rot;  // rot is even: both or neither of the pair
      y[e] = rotated ? rot_first(x[e], x[e + 1], c[e], s[e]) : x[e];
      y[e + 1] = rotated ? rot_second(x[e], x[e + 1], c[e], s[e]) : x[e + 1];
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int i = e0 + e;
      y[e] = i >= a.rot     ? x[e]
             : i < a.half ? rot_first(x[e], p[e], c[e], s[e])
                          : rot_second(p[e], x[e], c[e], s[e]);
    }
  }
  Pack<T, V> out;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    out.h[e] = from_float<T>(y[e]);
    y[e] = to_float(out.h[e]);  // the cache gets k_out's values
  }
  const int heads = is_q ? a.hq : a.hkv;
  T* dst = static_cast<T*>(is_q ? a.q_out : a.k_out) + (u.t * heads + u.head) * a.d + e0;
  store_pack<T, V>(dst, out);
  if (!is_q && u.slot >= 0) {
    const int64_t off = cache_offset(u.slot, a.block_size, u.head, a.kc_s0, a.kc_s1, a.kc_s2);
    store_cache_pack<T, V>(a.k_cache, off + e0, y, a.k_scale, a);
  }
}

// ---------------------------------------------------------------- token-major kernel

// Elements per lane of the token-major kernel: one 16-byte access of a 16-bit type.
constexpr int kTokVec = 8;
// Largest number of heads one thread handles (all their loads issued before any math).
constexpr int kMaxItemsPerThread = 3;
// Resident blocks per SM the register budget is fitted to (at most 80 registers a thread at 256
// threads; 64 makes the NeoX variants spill): 768 threads with up to three 16-byte head loads
// each in flight per SM keep HBM busy.
constexpr int kTokenBlocksPerSm = 3;

template <typename CS>
__device__ __forceinline__ float cs_float(CS v) {
  return to_float(v);
}
template <>
__device__ __forceinline__ float cs_float<float>(float v) {
  return v;
}

// V values as fp8 of value / scale, one 8-byte store.
template <int V>
__device__ __forceinline__ void store_fp8_pack(uint8_t* dst, const float (&y)[V], float scale,
                                               const RopeArgs& a) {
  Pack<uint8_t, V> p;
#pragma unroll
  for (int e = 0; e < V; e += 2) {
    const uint16_t two =
        float2_to_fp8x2(fp8_value(y[e], scale, a), fp8_value(y[e + 1], scale, a), a.fnuz);
    p.h[e] = static_cast<uint8_t>(two & 0xff);
    p.h[e + 1] = static_cast<uint8_t>(two >> 8);
  }
  store_pack<uint8_t, V>(dst, p);
}

// A block owns `items_per_block` consecutive heads ("items": the Hq q heads, then the Hkv k
// heads, then, when a cache is written, the Hkv v heads) of one token. LH = D / 8 lanes (a
// power of two <= 32) hold one head, 8 contiguous elements each; the block's S = blockDim / LH
// head slots take items slot, slot + S, ... (at most NI per thread). The token's position,
// cache slot, scales, norm weights and this lane's cos / sin values are loaded once and serve
// every head of the thread; all head loads are issued before any math. NeoX partners are
// (rot / 2) / 8 lanes away (a power of two: xor shuffle inside the head's lanes); GPT-J pairs
// are adjacent elements of a lane. rot is a multiple of 8 (GPT-J) / 16 (NeoX), so a lane's
// slice is either wholly rotated or wholly passed through.
template <typename T, typename CS, bool NEOX, int NI>
__global__ void __launch_bounds__(kThreads, kTokenBlocksPerSm) rope_token_kernel(const RopeArgs a) {
  constexpr int V = kTokVec;
  const int li = threadIdx.x & ((1 << a.lh_log2) - 1);
  const int slot_in_block = threadIdx.x >> a.lh_log2;
  const int S = blockDim.x >> a.lh_log2;
  const int64_t t = blockIdx.x / static_cast<unsigned>(a.groups);
  const int first = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.groups)) *
                    a.items_per_block;
  const int count = min(a.items_per_block, a.units_per_token - first);  // items of this block
  const int e0 = li * V;
  const bool norm = a.q_weight != nullptr;

  // Per-token loads first, so that the dependent cos / sin load overlaps the head loads.
  const int64_t pos = load_position(a, t);
  int64_t slot = -1;
  if (a.cache_kind != kNoCache && t < a.nslots) slot = a.slots[t * a.slot_stride];

  Pack<T, V> xin[NI];
#pragma unroll
  for (int k = 0; k < NI; ++k) {
    if (k * S >= count) break;  // block-uniform
    const int local = slot_in_block + k * S;
    const int item = first + local;
    xin[k].raw = {};
    if (local < count) {
      const T* src;
      if (item < a.hq)
        src = static_cast<const T*>(a.q) + t * a.q_tstride + item * a.q_hstride;
      else if (item < a.hq + a.hkv)
        src = static_cast<const T*>(a.k) + t * a.k_tstride + (item - a.hq) * a.k_hstride;
      else
        src = static_cast<const T*>(a.v) + t * a.v_tstride + (item - a.hq - a.hkv) * a.v_hstride;
      xin[k] = load_pack<T, V>(src + e0);
    }
  }
  Pack<T, V> wq, wk;
  if (norm) {
    wq = load_pack<T, V>(static_cast<const T*>(a.q_weight) + e0);
    wk = load_pack<T, V>(static_cast<const T*>(a.k_weight) + e0);
  }
  float ks = 1.f, vs = 1.f;
  if (a.cache_kind == kFp8Cache) {
    ks = __ldg(a.k_scale);
    vs = __ldg(a.v_scale);
  }
  // This lane's cos / sin: NeoX element i < rot uses column i mod (rot / 2), V contiguous
  // columns; GPT-J element i uses column i / 2, V / 2 contiguous columns.
  const bool rotated = e0 < a.rot;
  // Kept packed in the cache dtype (fewer registers), converted where used.
  constexpr int NC = NEOX ? V : V / 2;
  Pack<CS, NC> cp, sp;
  cp.raw = {};
  sp.raw = {};
  if (rotated) {
    const CS* row = static_cast<const CS*>(a.cos_sin) + pos * a.rot;
    const int j0 = NEOX ? (e0 < a.half ? e0 : e0 - a.half) : e0 / 2;
    cp = load_pack<CS, NC>(row + j0);
    sp = load_pack<CS, NC>(row + a.half + j0);
  }
  int64_t kc_base = 0, vc_base = 0;
  if (slot >= 0) {
    const int64_t blk = slot / a.block_size, in_blk = slot - blk * a.block_size;
    kc_base = blk * a.kc_s0 + in_blk * a.kc_s1 + e0;
    vc_base = blk * a.vc_s0 + in_blk * a.vc_s1 + e0;
  }

#pragma unroll
  for (int k = 0; k < NI; ++k) {
    if (k * S >= count) break;  // block-uniform: every lane below runs the shuffles
    const int local = slot_in_block + k * S;
    const bool valid = local < count;
    const int item = first + local;
    const int kind = item < a.hq ? 0 : (item < a.hq + a.hkv ? 1 : 2);  // q, k, v head
    const int head = kind == 0 ? item : (kind == 1 ? item - a.hq : item - a.hq - a.hkv);
    float x[V];
#pragma unroll
    for (int e = 0; e < V; ++e) x[e] = to_float(xin[k].h[e]);
    if (norm) {
      float ss = 0.f;
#pragma unroll
      for (int e = 0; e < V; ++e) ss += x[e] * x[e];
      ss = subwarp_reduce(ss, 1 << a.lh_log2, SumOp{});
      // torch: x * rsqrt(mean(x^2) + eps), mean = sum * (1/D); no FMA between the two.
      const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_d), a.eps));
      if (kind < 2) {
        Pack<T, V> w;
        w.raw = kind == 0 ? wq.raw : wk.raw;
#pragma unroll
        for (int e = 0; e < V; ++e)
          x[e] = round_to<T>(round_to<T>(x[e] * rinv) * to_float(w.h[e]));
      }
    }
    float y[V];
    if constexpr (NEOX) {
      float p[V];
#pragma unroll
      for (int e = 0; e < V; ++e) p[e] = shfl_xor(x[e], a.half_lanes, VF_WARP_SIZE);
      // Lower half: x*c - p*s (rot_first), upper half: x*c + p*s (rot_second), as x*c + (-p)*s
      // in the lower half, which rounds exactly alike (negation is exact).
      const float sign = e0 < a.half ? -1.f : 1.f;
#pragma unroll
      for (int e = 0; e < V; ++e)
        y[e] = (kind == 2 || !rotated)
                   ? x[e]
                   : __fadd_rn(__fmul_rn(x[e], cs_float(cp.h[e])),
                               __fmul_rn(__fmul_rn(p[e], sign), cs_float(sp.h[e])));
    } else {
#pragma unroll
      for (int e = 0; e < V; e += 2) {
        const bool r = kind != 2 && rotated;
        const float c = cs_float(cp.h[e / 2]), s = cs_float(sp.h[e / 2]);
        y[e] = r ? rot_first(x[e], x[e + 1], c, s) : x[e];
        y[e + 1] = r ? rot_second(x[e], x[e + 1], c, s) : x[e + 1];
      }
    }
    if (valid) {
      Pack<T, V> out;
      if (kind == 2) {
        out = xin[k];  // v goes to the cache unchanged
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) out.h[e] = from_float<T>(y[e]);
      }
      if (kind == 0) {
        store_pack<T, V>(static_cast<T*>(a.q_out) + (t * a.hq + head) * a.d + e0, out);
      } else {
        if (kind == 1)
          store_pack<T, V>(static_cast<T*>(a.k_out) + (t * a.hkv + head) * a.d + e0, out);
        if (slot >= 0) {
          const int64_t off = kind == 1 ? kc_base + head * a.kc_s2 : vc_base + head * a.vc_s2;
          void* cache = kind == 1 ? a.k_cache : a.v_cache;
          if (a.cache_kind == kFp8Cache) {
            float q[V];  // the cache gets k_out's (v's) values
#pragma unroll
            for (int e = 0; e < V; ++e) q[e] = to_float(out.h[e]);
            store_fp8_pack<V>(static_cast<uint8_t*>(cache) + off, q, kind == 1 ? ks : vs, a);
          } else {
            store_pack<T, V>(static_cast<T*>(cache) + off, out);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- generic kernel

template <typename T>
__device__ __forceinline__ void store_cache_scalar(void* cache, int64_t off, float y,
                                                   const float* scale, const RopeArgs& a) {
  if (a.cache_kind == kFp8Cache)
    static_cast<uint8_t*>(cache)[off] = float_to_fp8(fp8_value(y, __ldg(scale), a), a.fnuz);
  else
    static_cast<T*>(cache)[off] = from_float<T>(y);
}

// Any head size (<= kMaxHeadSize), stride or alignment: the head staged in shared memory as
// fp32 (after the norm), one element per lane and step.
template <typename T, bool NEOX>
__global__ void __launch_bounds__(kThreads) rope_generic_kernel(const RopeArgs a) {
  float* smem = rope_dynamic_smem();
  const int lane = threadIdx.x % VF_WARP_SIZE;
  const int warp = threadIdx.x / VF_WARP_SIZE;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (blockDim.x / VF_WARP_SIZE) + warp;
  const bool unit_ok = unit < a.units;
  const Unit u = unit_of(a, unit_ok ? unit : 0);
  const bool rope_unit = unit_ok && u.kind < 2;
  const bool is_q = u.kind == 0;
  float* buf = smem + warp * a.d;

  if (unit_ok && u.kind == 2 && u.slot >= 0) {
    const T* src = static_cast<const T*>(a.v) + u.t * a.v_tstride + u.head * a.v_hstride;
    const int64_t off = cache_offset(u.slot, a.block_size, u.head, a.vc_s0, a.vc_s1, a.vc_s2);
    for (int i = lane; i < a.dv; i += VF_WARP_SIZE)
      store_cache_scalar<T>(a.v_cache, off + i, to_float(src[i]), a.v_scale, a);
  }

  if (rope_unit) {
    const T* src = is_q ? static_cast<const T*>(a.q) + u.t * a.q_tstride + u.head * a.q_hstride
                        : static_cast<const T*>(a.k) + u.t * a.k_tstride + u.head * a.k_hstride;
    const T* w = static_cast<const T*>(is_q ? a.q_weight : a.k_weight);
    float ss = 0.f;
    for (int i = lane; i < a.d; i += VF_WARP_SIZE) {
      const float v = to_float(src[i]);
      buf[i] = v;
      ss += v * v;
    }
    if (w != nullptr) {
      ss = warp_reduce(ss, SumOp{});
      const float rinv = rsqrtf(__fadd_rn(__fmul_rn(ss, a.inv_d), a.eps));
      for (int i = lane; i < a.d; i += VF_WARP_SIZE)  // each lane rewrites only its own elements
        buf[i] = round_to<T>(round_to<T>(buf[i] * rinv) * to_float(w[i]));
    }
  }
  __syncthreads();  // every thread of the block gets here
  if (!rope_unit) return;

  const int64_t pos = load_position(a, u.t);
  const int heads = is_q ? a.hq : a.hkv;
  T* dst = static_cast<T*>(is_q ? a.q_out : a.k_out) + (u.t * heads + u.head) * a.d;
  const bool to_cache = !is_q && u.slot >= 0;
  const int64_t off =
      to_cache ? cache_offset(u.slot, a.block_size, u.head, a.kc_s0, a.kc_s1, a.kc_s2) : 0;
  for (int i = lane; i < a.d; i += VF_WARP_SIZE) {
    float y = buf[i];
    if (i < a.rot) {
      int j, first;
      if (NEOX) {
        first = i < a.half;
        j = first ? i : i - a.half;
      } else {
        first = i % 2 == 0;
        j = i / 2;
      }
      const float c = load_cos_sin(a, pos, j), s = load_cos_sin(a, pos, a.half + j);
      const float pv = NEOX ? buf[first ? i + a.half : i - a.half] : buf[first ? i + 1 : i - 1];
      y = first ? rot_first(y, pv, c, s) : rot_second(pv, y, c, s);
    }
    const T o = from_float<T>(y);
    dst[i] = o;
    if (to_cache) store_cache_scalar<T>(a.k_cache, off + i, to_float(o), a.k_scale, a);
  }
}

// ---------------------------------------------------------------- launch

// Elements per lane of the vector kernel for head sizes D (q/k) and Dv (v): the smallest
// V in {2, 4, 8, 16} that covers D with one warp; 0: none (generic kernel).
int pick_vec(int d, int dv, int warp_size) {
  for (int v : {2, 4, 8, 16})
    if (d % v == 0 && d / v <= warp_size && dv % v == 0) return v;
  return 0;
}

bool is_pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }

template <typename T, int V>
void launch_vec(const RopeArgs& base, bool neox, dim3 grid, int warps, gpuStream_t stream) {
  RopeArgs a = base;
  if (!neox) {
    rope_vec_kernel<T, V, 0><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.half % V == 0 && is_pow2(a.half / V)) {
    a.half_lanes = a.half / V;
    rope_vec_kernel<T, V, 1><<<grid, kThreads, 0, stream>>>(a);
  } else {
    const size_t smem = static_cast<size_t>(warps) * a.d * sizeof(float);
    rope_vec_kernel<T, V, 2><<<grid, kThreads, smem, stream>>>(a);
  }
}

template <typename T>
void launch_typed(const RopeArgs& a, bool neox, int vec, int warp_size, gpuStream_t stream) {
  const int warps = kThreads / warp_size;
  const dim3 grid(static_cast<unsigned>((a.units + warps - 1) / warps));
  switch (vec) {
    case 2:
      return launch_vec<T, 2>(a, neox, grid, warps, stream);
    case 4:
      return launch_vec<T, 4>(a, neox, grid, warps, stream);
    case 8:
      return launch_vec<T, 8>(a, neox, grid, warps, stream);
    case 16:
      return launch_vec<T, 16>(a, neox, grid, warps, stream);
    default: {
      const size_t smem = static_cast<size_t>(warps) * a.d * sizeof(float);
      if (neox)
        rope_generic_kernel<T, true><<<grid, kThreads, smem, stream>>>(a);
      else
        rope_generic_kernel<T, false><<<grid, kThreads, smem, stream>>>(a);
    }
  }
}

// Token-major kernel: NI (max heads per thread) and blocks per token. Large T: NI = 3 (one block
// covers up to 3 * S heads of a token: all 48 of a 32 / 8-head token at D = 128); fewer tokens:
// fewer heads per block, so that the grid still has about four blocks per SM (decode: a token's
// heads spread over several SMs).
template <typename T, typename CS>
void launch_token(RopeArgs a, bool neox, int num_sms, gpuStream_t stream) {
  const int slots_per_block = kThreads >> a.lh_log2;
  const int64_t want_blocks = 4LL * num_sms;
  const int64_t tokens = a.units / a.units_per_token;
  auto groups_for = [&](int n) {
    return (a.units_per_token + n * slots_per_block - 1) / (n * slots_per_block);
  };
  int ni = kMaxItemsPerThread;
  while (ni > 1 && tokens * groups_for(ni) < want_blocks) --ni;
  a.items_per_block = ni * slots_per_block;
  a.groups = groups_for(ni);
  const dim3 grid(static_cast<unsigned>(tokens * a.groups));
  static_assert(kMaxItemsPerThread == 3, "one case per heads-per-thread count");
  // No `return` before a launch: hipify turns the launch into a macro call.
  switch (ni * 2 + (neox ? 1 : 0)) {
    case 2:
      rope_token_kernel<T, CS, false, 1><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 3:
      rope_token_kernel<T, CS, true, 1><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 4:
      rope_token_kernel<T, CS, false, 2><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 5:
      rope_token_kernel<T, CS, true, 2><<<grid, kThreads, 0, stream>>>(a);
      break;
    case 6:
      rope_token_kernel<T, CS, false, 3><<<grid, kThreads, 0, stream>>>(a);
      break;
    default:
      rope_token_kernel<T, CS, true, 3><<<grid, kThreads, 0, stream>>>(a);
      break;
  }
}

template <typename T>
void launch_token_typed(const RopeArgs& a, bool neox, int num_sms, gpuStream_t stream) {
  switch (a.cs_kind) {
    case kCosSinBf16:
      return launch_token<T, bf16_t>(a, neox, num_sms, stream);
    case kCosSinF16:
      return launch_token<T, half_t>(a, neox, num_sms, stream);
    default:
      return launch_token<T, float>(a, neox, num_sms, stream);
  }
}

// ---------------------------------------------------------------- input checks

constexpr const char* kOp = "vllm_fusion::qk_norm_rope_kv_cache";

bool multiple_of(int64_t v, int64_t m) { return v % m == 0; }
bool aligned_to(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

void check_heads(const char* name, const Tensor& t, const Tensor& query) {
  check_activation(kOp, name, t);
  check_same_device(kOp, name, t, query);
  VF_CHECK(t.dim() == 3, kOp, ": ", name, " must be 3-D [num_tokens, num_heads, head_size], got ",
           t.dim(), "-D");
  VF_CHECK(t.scalar_type() == query.scalar_type(), kOp, ": ", name,
           " must have the same dtype as query (", dtype_name(query.scalar_type()), "), got ",
           dtype_name(t.scalar_type()));
  VF_CHECK(t.size(0) == query.size(0), kOp, ": ", name, " must have ", query.size(0),
           " tokens (query.size(0)), got ", t.size(0));
}

void check_weight(const char* name, const Tensor& w, const Tensor& query) {
  check_same_device(kOp, name, w, query);
  VF_CHECK(w.dim() == 1 && w.size(0) == query.size(2), kOp, ": ", name, " must be 1-D of size ",
           query.size(2), " (the head size)");
  VF_CHECK(w.scalar_type() == query.scalar_type(), kOp, ": ", name,
           " must have the same dtype as query (", dtype_name(query.scalar_type()), "), got ",
           dtype_name(w.scalar_type()));
  VF_CHECK(w.size(0) == 1 || w.stride(0) == 1, kOp, ": ", name, " must be contiguous");
}

bool is_fp8_cache_dtype(ScalarType dt) {
  return dt == ScalarType::Float8_e4m3fn || dt == ScalarType::Float8_e4m3fnuz ||
         dt == ScalarType::Byte;
}

void check_cache(const char* name, const Tensor& c, const Tensor& query, int64_t heads,
                 int64_t head_size) {
  check_same_device(kOp, name, c, query);
  VF_CHECK(c.dim() == 4, kOp, ": ", name,
           " must be 4-D [num_blocks, block_size, num_kv_heads, head_size], got ", c.dim(), "-D");
  VF_CHECK(c.size(2) == heads && c.size(3) == head_size, kOp, ": ", name,
           " must have shape [num_blocks, block_size, ", heads, ", ", head_size, "], got [",
           c.size(0), ", ", c.size(1), ", ", c.size(2), ", ", c.size(3), "]");
  VF_CHECK(c.size(3) == 1 || c.stride(3) == 1, kOp, ": ", name,
           " must be contiguous in its last dimension (stride(-1) == 1), got stride ",
           c.stride(3));
  const ScalarType dt = c.scalar_type();
  VF_CHECK(dt == query.scalar_type() || is_fp8_cache_dtype(dt), kOp, ": ", name,
           " must have the dtype of query (", dtype_name(query.scalar_type()),
           ") or be fp8 (float8_e4m3fn, float8_e4m3fnuz or uint8), got ", dtype_name(dt));
}

struct Checked {
  int64_t tokens, hq, hkv, d, dv, rot;
  bool norm, cache, fp8;
};

Checked check_inputs(const Tensor& query, const Tensor& key, const Tensor& value,
                     const Tensor& positions, const Tensor& cos_sin_cache,
                     const std::optional<Tensor>& q_weight, const std::optional<Tensor>& k_weight,
                     const std::optional<Tensor>& key_cache,
                     const std::optional<Tensor>& value_cache,
                     const std::optional<Tensor>& slot_mapping,
                     const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale) {
  Checked r{};
  check_activation(kOp, "query", query);
  VF_CHECK(query.dim() == 3, kOp, ": query must be 3-D [num_tokens, num_heads, head_size], got ",
           query.dim(), "-D");
  r.tokens = query.size(0);
  r.hq = query.size(1);
  r.d = query.size(2);
  VF_CHECK(r.d <= kMaxHeadSize, kOp, ": head size (query.size(2)) must be at most ",
           kMaxHeadSize, ", got ", r.d);
  check_heads("key", key, query);
  VF_CHECK(key.size(2) == r.d, kOp, ": key must have the head size of query (", r.d, "), got ",
           key.size(2));
  r.hkv = key.size(1);

  check_same_device(kOp, "positions", positions, query);
  VF_CHECK(positions.scalar_type() == ScalarType::Long ||
               positions.scalar_type() == ScalarType::Int,
           kOp, ": positions must be int64 or int32, got ", dtype_name(positions.scalar_type()));
  VF_CHECK(positions.dim() == 1 && positions.size(0) == r.tokens, kOp,
           ": positions must be 1-D with one entry per token (", r.tokens, ")");

  check_same_device(kOp, "cos_sin_cache", cos_sin_cache, query);
  const ScalarType cs = cos_sin_cache.scalar_type();
  VF_CHECK(cs == ScalarType::Float || cs == ScalarType::BFloat16 || cs == ScalarType::Half, kOp,
           ": cos_sin_cache must be float32, bfloat16 or float16, got ", dtype_name(cs));
  VF_CHECK(cos_sin_cache.dim() == 2, kOp, ": cos_sin_cache must be 2-D [max_position, rotary_dim]");
  r.rot = cos_sin_cache.size(1);
  VF_CHECK(r.rot > 0 && r.rot % 2 == 0 && r.rot <= r.d, kOp,
           ": rotary_dim (cos_sin_cache.size(1)) must be even and in [2, head size ", r.d,
           "], got ", r.rot);
  VF_CHECK(cos_sin_cache.is_contiguous(), kOp, ": cos_sin_cache must be contiguous");

  VF_CHECK(q_weight.has_value() == k_weight.has_value(), kOp,
           ": q_weight and k_weight must be given together (both or neither)");
  r.norm = q_weight.has_value();
  if (r.norm) {
    check_weight("q_weight", *q_weight, query);
    check_weight("k_weight", *k_weight, query);
  }

  VF_CHECK(key_cache.has_value() == value_cache.has_value(), kOp,
           ": key_cache and value_cache must be given together (both or neither)");
  r.cache = key_cache.has_value();
  r.dv = r.d;
  if (!r.cache) return r;
  check_heads("value", value, query);
  VF_CHECK(value.size(1) == r.hkv, kOp, ": value must have the ", r.hkv,
           " heads of key, got ", value.size(1));
  r.dv = value.size(2);
  VF_CHECK(r.dv <= kMaxHeadSize, kOp, ": value head size must be at most ", kMaxHeadSize,
           ", got ", r.dv);
  check_cache("key_cache", *key_cache, query, r.hkv, r.d);
  check_cache("value_cache", *value_cache, query, r.hkv, r.dv);
  VF_CHECK(value_cache->scalar_type() == key_cache->scalar_type(), kOp,
           ": value_cache must have the dtype of key_cache (",
           dtype_name(key_cache->scalar_type()), "), got ",
           dtype_name(value_cache->scalar_type()));
  VF_CHECK(value_cache->size(0) == key_cache->size(0) &&
               value_cache->size(1) == key_cache->size(1),
           kOp, ": value_cache must have the num_blocks and block_size of key_cache");
  VF_CHECK(key_cache->size(1) > 0, kOp, ": block_size (key_cache.size(1)) must be positive");

  VF_CHECK(slot_mapping.has_value(), kOp, ": slot_mapping must be given with the caches");
  check_same_device(kOp, "slot_mapping", *slot_mapping, query);
  VF_CHECK(slot_mapping->scalar_type() == ScalarType::Long, kOp,
           ": slot_mapping must be int64, got ", dtype_name(slot_mapping->scalar_type()));
  VF_CHECK(slot_mapping->dim() == 1 && slot_mapping->size(0) <= r.tokens, kOp,
           ": slot_mapping must be 1-D with at most ", r.tokens, " entries (one per token), got ",
           slot_mapping->dim() == 1 ? slot_mapping->size(0) : -1);

  r.fp8 = is_fp8_cache_dtype(key_cache->scalar_type());
  if (r.fp8) {
    VF_CHECK(k_scale.has_value() && v_scale.has_value(), kOp,
             ": an fp8 key_cache / value_cache needs k_scale and v_scale");
    check_scale_scalar(kOp, "k_scale", *k_scale, query);
    check_scale_scalar(kOp, "v_scale", *v_scale, query);
  }
  return r;
}

// Every head (and cache row) starts on a V-element boundary, so that V elements move as one
// aligned access.
bool vector_access_ok(const RopeArgs& a, int vec, bool writes_cache, bool fp8) {
  const size_t eb = static_cast<size_t>(vec) * 2;  // bytes of V 16-bit elements
  const size_t cb = static_cast<size_t>(vec) * (fp8 ? 1 : 2);
  bool ok = multiple_of(a.q_tstride, vec) && multiple_of(a.q_hstride, vec) &&
            multiple_of(a.k_tstride, vec) && multiple_of(a.k_hstride, vec) &&
            aligned_to(a.q, eb) && aligned_to(a.k, eb) && aligned_to(a.q_out, eb) &&
            aligned_to(a.k_out, eb);
  if (a.q_weight != nullptr)
    ok = ok && aligned_to(a.q_weight, eb) && aligned_to(a.k_weight, eb);
  if (writes_cache) {
    ok = ok && multiple_of(a.v_tstride, vec) && multiple_of(a.v_hstride, vec) &&
         aligned_to(a.v, eb) && aligned_to(a.k_cache, cb) && aligned_to(a.v_cache, cb) &&
         multiple_of(a.kc_s0, vec) && multiple_of(a.kc_s1, vec) && multiple_of(a.kc_s2, vec) &&
         multiple_of(a.vc_s0, vec) && multiple_of(a.vc_s1, vec) && multiple_of(a.vc_s2, vec);
  }
  return ok;
}

// The token-major kernel takes heads of D = 8 * 2^k <= 256 elements (a power-of-two number of
// lanes, <= 32, per head), v heads of the same size, 16-byte aligned heads, and a rotary
// dimension whose lane slices are wholly rotated or not: rot a multiple of 8 (GPT-J), or rot / 2
// a multiple of 8 with a power-of-two lane distance (rot / 2) / 8 to the NeoX partner.
bool token_kernel_fits(const RopeArgs& a, bool neox, bool writes_cache, bool fp8) {
  const size_t cos_sin_bytes = a.cs_kind == kCosSinF32 ? 4 : 2;
  const int lanes = a.d / kTokVec;
  if (a.d % kTokVec != 0 || !is_pow2(lanes) || lanes > 32) return false;
  if (writes_cache && a.dv != a.d) return false;
  if (neox ? (a.half % kTokVec != 0 || !is_pow2(a.half / kTokVec)) : a.rot % kTokVec != 0)
    return false;
  // cos / sin runs of 8 (NeoX) or 4 (GPT-J) values start on their own size's boundary
  // (rows of rot values, rot a multiple of 8); the base must be aligned alike.
  const size_t run_bytes = (neox ? kTokVec : kTokVec / 2) * cos_sin_bytes;
  if (!aligned_to(a.cos_sin, run_bytes < 16 ? run_bytes : 16)) return false;
  return vector_access_ok(a, kTokVec, writes_cache, fp8);
}

}  // namespace

std::tuple<Tensor, Tensor> qk_norm_rope_kv_cache(
    const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& positions,
    const Tensor& cos_sin_cache, bool is_neox, const std::optional<Tensor>& q_weight,
    const std::optional<Tensor>& k_weight, double epsilon, const std::optional<Tensor>& key_cache,
    const std::optional<Tensor>& value_cache, const std::optional<Tensor>& slot_mapping,
    const std::optional<Tensor>& k_scale, const std::optional<Tensor>& v_scale) {
  const Checked c = check_inputs(query, key, value, positions, cos_sin_cache, q_weight, k_weight,
                                 key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const int32_t device = query.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const ScalarType dt = query.scalar_type();
  Tensor q_out = torch::stable::new_empty(query, {c.tokens, c.hq, c.d}, dt);
  Tensor k_out = torch::stable::new_empty(query, {c.tokens, c.hkv, c.d}, dt);

  Fp8Format fmt{ScalarType::Float8_e4m3fn, 448.0f, false};
  if (c.fp8) {
    fmt = fp8_format(device);
    const ScalarType cdt = key_cache->scalar_type();
    VF_CHECK(cdt == ScalarType::Byte || cdt == fmt.dtype, kOp, ": key_cache is ",
             dtype_name(cdt), " but this GPU's fp8 format is ", dtype_name(fmt.dtype));
  }
  const bool writes_cache = c.cache && slot_mapping->size(0) > 0;
  const int units_per_token = static_cast<int>(c.hq + c.hkv + (writes_cache ? c.hkv : 0));
  const int64_t units = c.tokens * units_per_token;
  if (units == 0) return {q_out, k_out};  // nothing to launch

  RopeArgs a{};
  a.q = query.const_data_ptr();
  a.q_tstride = query.stride(0);
  a.q_hstride = query.stride(1);
  a.k = key.const_data_ptr();
  a.k_tstride = key.stride(0);
  a.k_hstride = key.stride(1);
  a.positions = positions.const_data_ptr();
  a.pos_stride = positions.stride(0);
  a.pos64 = positions.scalar_type() == ScalarType::Long;
  a.cos_sin = cos_sin_cache.const_data_ptr();
  const ScalarType cs = cos_sin_cache.scalar_type();
  a.cs_kind = cs == ScalarType::BFloat16 ? kCosSinBf16 : (cs == ScalarType::Half ? kCosSinF16
                                                                                  : kCosSinF32);
  a.q_weight = c.norm ? q_weight->const_data_ptr() : nullptr;
  a.k_weight = c.norm ? k_weight->const_data_ptr() : nullptr;
  a.eps = static_cast<float>(epsilon);
  a.inv_d = 1.0f / static_cast<float>(c.d);
  a.cache_kind = writes_cache ? (c.fp8 ? kFp8Cache : kSameDtypeCache) : kNoCache;
  if (writes_cache) {
    a.v = value.const_data_ptr();
    a.v_tstride = value.stride(0);
    a.v_hstride = value.stride(1);
    a.k_cache = key_cache->mutable_data_ptr();
    a.kc_s0 = key_cache->stride(0);
    a.kc_s1 = key_cache->stride(1);
    a.kc_s2 = key_cache->stride(2);
    a.v_cache = value_cache->mutable_data_ptr();
    a.vc_s0 = value_cache->stride(0);
    a.vc_s1 = value_cache->stride(1);
    a.vc_s2 = value_cache->stride(2);
    a.block_size = key_cache->size(1);
    a.slots = static_cast<const int64_t*>(slot_mapping->const_data_ptr());
    a.slot_stride = slot_mapping->stride(0);
    a.nslots = slot_mapping->size(0);
    if (c.fp8) {
      a.k_scale = static_cast<const float*>(k_scale->const_data_ptr());
      a.v_scale = static_cast<const float*>(v_scale->const_data_ptr());
    }
  }
  a.fnuz = fmt.fnuz;
  a.fp8_max = fmt.max;
  a.q_out = q_out.mutable_data_ptr();
  a.k_out = k_out.mutable_data_ptr();
  a.units = units;
  a.units_per_token = units_per_token;
  a.hq = static_cast<int>(c.hq);
  a.hkv = static_cast<int>(c.hkv);
  a.d = static_cast<int>(c.d);
  a.dv = static_cast<int>(c.dv);
  a.rot = static_cast<int>(c.rot);
  a.half = a.rot / 2;

  const DeviceInfo& info = device_info(device);
  const int warp_size = info.warp_size;
  const gpuStream_t stream = current_stream(device);
  if (token_kernel_fits(a, is_neox, writes_cache, c.fp8)) {
    a.lh_log2 = 0;
    while ((kTokVec << a.lh_log2) < a.d) ++a.lh_log2;
    if (is_neox) a.half_lanes = a.half / kTokVec;
    if (dt == ScalarType::BFloat16)
      launch_token_typed<bf16_t>(a, is_neox, info.num_sms, stream);
    else
      launch_token_typed<half_t>(a, is_neox, info.num_sms, stream);
    check_launch(kOp);
    return {q_out, k_out};
  }
  int vec = pick_vec(a.d, a.dv, warp_size);
  if (vec && !vector_access_ok(a, vec, writes_cache, c.fp8)) vec = 0;
  if (dt == ScalarType::BFloat16)
    launch_typed<bf16_t>(a, is_neox, vec, warp_size, stream);
  else
    launch_typed<half_t>(a, is_neox, vec, warp_size, stream);
  check_launch(kOp);
  return {q_out, k_out};
}

}  // namespace vllm_fusion
