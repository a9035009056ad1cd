// Shared by the three kernels: CUDA-or-emulator compatibility, tile shapes, the device helpers of
// the layout they share (owner groups, chunk pipeline, register rows, output staging).
//
// Compiled two ways: by nvcc for the GPU, and by g++ with -DFWP_EMU, where fwp_emu.h runs every
// CUDA thread as a CPU thread so tests/test_cuda_algorithm.py can check the kernels on a CPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#ifdef FWP_EMU
#include "fwp_emu.h"
#define FWP_DEVICE inline
#define FWP_DECLARE_SMEM(name) unsigned char* name = ::fwp_emu::shared_memory()
#define FWP_SHFL_XOR(v, off) ::fwp_emu::shfl_xor((v), (off))
#define FWP_SYNCWARP() ::fwp_emu::syncwarp()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#define FWP_DEVICE __device__ __forceinline__
// 128-byte aligned: WMMA loads and stores need 32-byte aligned tile pointers (fwp_mma.cuh), and
// the chunk kernels' arrays sit at multiples of 128 bytes from this base (fwp_chunk.cuh's Carver).
#define FWP_DECLARE_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define FWP_SHFL_XOR(v, off) __shfl_xor_sync(0xffffffffu, (v), (off))
#define FWP_SYNCWARP() __syncwarp()
#endif

namespace fwp {

// Dtype codes shared with binding.cpp and the emulator's ctypes wrapper.
enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

constexpr int kThreads = 128;  // every kernel: 4 warps per CTA

// State and accumulation are fp32, except fp64 inputs which stay fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// An "owner" (a column of S in the forward, a row of S in the q/k gradient) is held by a group of
// R consecutive lanes; each lane keeps PT of its L inner entries, as PT/4 runs of 4 that interleave
// across the group (lane g holds entries 4*(g + R*m) + e), so a group's shared-memory reads of one
// step are consecutive 16-byte pieces (no bank conflicts) and the sum over the owner's entries is
// a log2(R)-level butterfly inside the warp.
template <int L> struct Split;
template <> struct Split<64> { static constexpr int R = 8, PT = 8; };
template <> struct Split<128> { static constexpr int R = 8, PT = 16; };
template <> struct Split<256> { static constexpr int R = 16, PT = 16; };
template <> struct Split<512> { static constexpr int R = 16, PT = 32; };

// One compiled variant: input type, padded inner length L (Dk in the column layout of the forward
// and pass A, Dv in the row layout of pass B), rule and forget gate, and the Split of L.
template <typename scalar_t, int LEN, bool IS_DELTA, bool IS_GATED>
struct Cfg {
  using scalar = scalar_t;
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int L = LEN, R = Split<LEN>::R, PT = Split<LEN>::PT, NV = PT / 4;
  static constexpr int OUT = kThreads / R;  // owners per tile
  static constexpr bool DELTA = IS_DELTA, GATED = IS_GATED;
};

// Steps per shared-memory stage: about `budget` bytes of per-step inputs, a power of two in
// [8, 64] so that any multiple of 64 is a valid checkpoint interval for every kernel.
constexpr int chunk_steps(int bytes_per_step, int budget = 8192) {
  int tc = 64;
  while (tc > 8 && tc * bytes_per_step > budget) tc /= 2;
  return tc;
}

constexpr size_t align16(size_t x) { return (x + 15) / 16 * 16; }

FWP_DEVICE int imin(int a, int b) { return a < b ? a : b; }
FWP_DEVICE long long lmin(long long a, long long b) { return a < b ? a : b; }

// ---- conversions (explicit intrinsics: torch builds with __CUDA_NO_HALF_CONVERSIONS__) ----
FWP_DEVICE float to_acc(float x) { return x; }
FWP_DEVICE double to_acc(double x) { return x; }
FWP_DEVICE void store_out(float* p, float x) { *p = x; }
FWP_DEVICE void store_out(double* p, double x) { *p = x; }
#ifdef FWP_EMU
inline float to_acc(::fwp_emu::f16 x) { return static_cast<float>(x); }
inline float to_acc(::fwp_emu::bf16 x) { return static_cast<float>(x); }
inline void store_out(::fwp_emu::f16* p, float x) { *p = static_cast<::fwp_emu::f16>(x); }
inline void store_out(::fwp_emu::bf16* p, float x) { *p = ::fwp_emu::bf16(x); }
#else
FWP_DEVICE float to_acc(__half x) { return __half2float(x); }
FWP_DEVICE float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
FWP_DEVICE void store_out(__half* p, float x) { *p = __float2half_rn(x); }
FWP_DEVICE void store_out(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
#endif

// Four consecutive elements (16-byte aligned for fp32/fp64, 8-byte for 16-bit types) as acc_t
// into x[0..3].
#ifdef FWP_EMU
template <typename T, typename A> inline void load4(const T* p, A* x) {
  for (int e = 0; e < 4; ++e) x[e] = static_cast<A>(p[e]);
}
#else
FWP_DEVICE void load4(const float* p, float* x) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
FWP_DEVICE void load4(const double* p, double* x) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
FWP_DEVICE void load4(const __half* p, float* x) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
FWP_DEVICE void load4(const __nv_bfloat16* p, float* x) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
#endif

// ---- global -> shared copies that overlap with compute (cp.async on sm_80+) ----
FWP_DEVICE void copy_async(void* dst, const void* src, int bytes_4_8_16) {
#ifdef FWP_EMU
  std::memcpy(dst, src, bytes_4_8_16);
#else
  __pipeline_memcpy_async(dst, src, bytes_4_8_16);
#endif
}
FWP_DEVICE void copy_commit() {
#ifndef FWP_EMU
  __pipeline_commit();
#endif
}
// Wait until at most one committed stage (the prefetch of the next chunk) is still in flight.
FWP_DEVICE void copy_wait_but_one() {
#ifndef FWP_EMU
  __pipeline_wait_prior(1);
#endif
}
FWP_DEVICE void copy_wait_all() {
#ifndef FWP_EMU
  __pipeline_wait_prior(0);
#endif
}

// Copy `rows` rows of `n` elements (n * sizeof(T) a multiple of 16) from global (row stride gs)
// to shared (row stride ss), cooperatively over the CTA, 16 bytes per copy.
template <typename T>
FWP_DEVICE void stage_rows(T* dst, int ss, const T* src, long long gs, int rows, int n, int tid) {
  constexpr int per = 16 / sizeof(T);
  const int pieces = n / per;
  for (int x = tid; x < rows * pieces; x += kThreads) {
    const int r = x / pieces, c = (x - r * pieces) * per;
    copy_async(dst + r * ss + c, src + r * gs + c, 16);
  }
}

// Copy n consecutive elements of 4 or 8 bytes each (no 16-byte alignment needed).
template <typename T>
FWP_DEVICE void stage_scalars(T* dst, const T* src, int n, int tid) {
  for (int x = tid; x < n; x += kThreads) copy_async(dst + x, src + x, sizeof(T));
}

// Sum N values over the R lanes of a group. The xor butterfly gives every lane of the group the
// bit-identical total (each level adds the same two partial sums, only in swapped order).
template <int R, int N, typename A>
FWP_DEVICE void group_sum(A (&x)[N]) {
#pragma unroll
  for (int off = R / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int n = 0; n < N; ++n) x[n] += FWP_SHFL_XOR(x[n], off);
  }
}

// ---- the layout every kernel shares ----

// This thread: lane g of group ol, the R lanes that own entry own() (a column of S in the forward
// and pass A, a row of S in pass B) of a tile of OUT = kThreads / R owners of head bh. tid, own
// and ok are derived, not stored: fewer live registers.
template <int R>
struct Owner {
  static constexpr int OUT = kThreads / R;
  int g, ol;
  long long bh;
  int first, count;  // the tile's first owner, owners in this tile (the last tile may be partial)
  FWP_DEVICE Owner(int ntiles, int extent)
      : g(threadIdx.x % R), ol(threadIdx.x / R), bh(blockIdx.x / ntiles),
        first(static_cast<int>(blockIdx.x % ntiles) * OUT), count(imin(OUT, extent - first)) {}
  FWP_DEVICE int tid() const { return threadIdx.x; }
  FWP_DEVICE int own() const { return first + ol; }  // this group's owner
  FWP_DEVICE bool ok() const { return ol < count; }  // this group's owner exists
};

// Register x = 4m + e of a lane holds entry 4 * (g + R * m) + e of its owner's entries.
template <int R> FWP_DEVICE int owned_index(int g, int x) { return 4 * (g + R * (x / 4)) + x % 4; }

// A lane's entries from src[idx * stride]; 0 where src is null, the owner is padding or idx >= n.
template <int R, int PT, typename A>
FWP_DEVICE void load_owned(A (&x)[PT], const A* src, long long stride, int n, const Owner<R>& o) {
#pragma unroll
  for (int i = 0; i < PT; ++i) {
    const int idx = owned_index<R>(o.g, i);
    x[i] = (src && o.ok() && idx < n) ? src[idx * stride] : A(0);
  }
}

template <int R, int PT, typename A>
FWP_DEVICE void store_owned(A* dst, long long stride, int n, const Owner<R>& o, const A (&x)[PT]) {
  if (!dst || !o.ok()) return;
#pragma unroll
  for (int i = 0; i < PT; ++i) {
    const int idx = owned_index<R>(o.g, i);
    if (idx < n) dst[idx * stride] = x[i];
  }
}

// p + off as A*, or nullptr for an absent (optional) tensor.
template <typename A> FWP_DEVICE A* offset_or_null(void* p, long long off) {
  return p ? static_cast<A*>(p) + off : nullptr;
}
template <typename A> FWP_DEVICE const A* offset_or_null(const void* p, long long off) {
  return p ? static_cast<const A*>(p) + off : nullptr;
}

// Shared memory of a kernel with shape Sh: two stages of per-step inputs (k at offset 0 and q at
// Sh::q_off in every layout), then Sh's output staging arrays of TC steps x OUT owners.
template <typename Sh>
struct Stages {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  unsigned char* smem;
  template <typename T> FWP_DEVICE T* part(int b, size_t off) const {
    return reinterpret_cast<T*>(smem + b * Sh::stage_bytes + off);
  }
  FWP_DEVICE scalar_t* k(int b) const { return part<scalar_t>(b, 0); }
  FWP_DEVICE scalar_t* q(int b) const { return part<scalar_t>(b, Sh::q_off); }
  FWP_DEVICE acc_t* out(int n) const {
    return reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + n * Sh::out_bytes);
  }
};

// Zero the stages once: entries past the tile's owners or past Dk/Dv are never copied and must
// read as 0.
FWP_DEVICE void zero_stages(unsigned char* smem, size_t bytes, int tid) {
  for (size_t x = tid; x < bytes / 4; x += kThreads) reinterpret_cast<uint32_t*>(smem)[x] = 0u;
  __syncthreads();
}

// The double-buffered pass over T steps in chunks of TC, forward or backward in time:
// stage(t0, steps, b) issues the copies of one chunk into buffer b, and body(t0, steps, b) runs
// once that chunk is in shared memory for every thread, while the next chunk's copies fly. The
// body must __syncthreads() after its last read of buffer b (the next prefetch overwrites it).
template <int TC, bool REVERSE, typename Stage, typename Body>
FWP_DEVICE void chunk_loop(long long T, const Stage& stage, Body&& body) {
  const long long n = (T + TC - 1) / TC;
  const long long c0 = REVERSE ? n - 1 : 0;
  stage(c0 * TC, static_cast<int>(lmin(TC, T - c0 * TC)), static_cast<int>(c0 & 1));
  copy_commit();
  for (long long i = 0; i < n; ++i) {
    const long long c = REVERSE ? n - 1 - i : i, next = REVERSE ? c - 1 : c + 1;
    if (i + 1 < n) {
      stage(next * TC, static_cast<int>(lmin(TC, T - next * TC)), static_cast<int>(next & 1));
      copy_commit();
      copy_wait_but_one();
    } else {
      copy_wait_all();
    }
    __syncthreads();
    body(c * TC, static_cast<int>(lmin(TC, T - c * TC)), static_cast<int>(c & 1));
  }
}

// Write `steps` rows of n staged outputs (row stride OUT in shared memory) to global memory (row
// stride gs) with coalesced stores, converting to the output type.
template <int OUT, typename O, typename A>
FWP_DEVICE void flush_rows(O* dst, long long gs, const A* buf, int steps, int n, int tid) {
  for (int x = tid; x < steps * n; x += kThreads) {
    const int s = x / n, c = x - s * n;
    store_out(dst + s * gs + c, buf[s * OUT + c]);
  }
}

}  // namespace fwp
