// Shared by the three kernels: CUDA-or-emulator compatibility, tile shapes, small device helpers.
//
// Compiled two ways: by nvcc for the GPU, and by g++ with -DFWP_EMU, where fwp_emu.h runs every
// CUDA thread as a CPU thread so tests/test_cuda_algorithm.py can check the kernels on a CPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>

#ifdef FWP_EMU
#include "fwp_emu.h"
#define FWP_DEVICE inline
#define FWP_DECLARE_SMEM(name) unsigned char* name = ::fwp_emu::shared_memory()
#define FWP_SHFL_XOR(v, off) ::fwp_emu::shfl_xor((v), (off))
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#define FWP_DEVICE __device__ __forceinline__
#define FWP_DECLARE_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define FWP_SHFL_XOR(v, off) __shfl_xor_sync(0xffffffffu, (v), (off))
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
#ifndef FWP_EMU
FWP_DEVICE float to_acc(__half x) { return __half2float(x); }
FWP_DEVICE float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
FWP_DEVICE void store_out(__half* p, float x) { *p = __float2half_rn(x); }
FWP_DEVICE void store_out(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
#endif

// Four consecutive elements (16-byte aligned for fp32/fp64, 8-byte for 16-bit types) as acc_t.
#ifdef FWP_EMU
template <typename T, typename A> inline void load4(const T* p, A (&x)[4]) {
  for (int e = 0; e < 4; ++e) x[e] = static_cast<A>(p[e]);
}
#else
FWP_DEVICE void load4(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
}
FWP_DEVICE void load4(const double* p, double (&x)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
FWP_DEVICE void load4(const __half* p, float (&x)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y;
}
FWP_DEVICE void load4(const __nv_bfloat16* p, float (&x)[4]) {
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

// Every kernel's chunk length divides 64, so any multiple of 64 is a valid ck_every.
constexpr const char* kBadCkEvery = "fwp: ck_every must be a multiple of 64";

// ---- host-side dispatch over dtype and padded inner length ----
template <typename T> struct Tag { using type = T; };

template <typename F>
const char* dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: return f(Tag<float>{});
    case kF64: return f(Tag<double>{});
#ifndef FWP_EMU
    case kF16: return f(Tag<__half>{});
    case kBF16: return f(Tag<__nv_bfloat16>{});
#endif
    default: return "fwp: unsupported dtype (fp32, fp16, bf16, fp64 on the GPU; fp32, fp64 emulated)";
  }
}

template <int N> struct Len { static constexpr int value = N; };

// The smallest supported inner length L >= n (64, 128, 256, up to MAX).
template <int MAX, typename F>
const char* dispatch_len(int n, F&& f) {
  if (n <= 64) return f(Len<64>{});
  if (n <= 128) return f(Len<128>{});
  if constexpr (MAX >= 256) { if (n <= 256) return f(Len<256>{}); }
  if constexpr (MAX >= 512) { if (n <= 512) return f(Len<512>{}); }
  return "fwp: feature dimension too large (Dk <= 512, Dv <= 256)";
}

// Common argument checks of the three entry points.
inline const char* check_sizes(long long BH, long long T, int Dk, int Dv, int ck_every) {
  if (BH <= 0 || T <= 0 || Dk <= 0 || Dv <= 0) return "fwp: empty input";
  if (Dk % 8 || Dv % 8) return "fwp: Dk and Dv must be multiples of 8 (pad with zeros)";
  if (Dk > 512 || Dv > 256) return "fwp: Dk <= 512 and Dv <= 256";
  if (ck_every <= 0) return "fwp: ck_every must be positive";
  return nullptr;
}

#ifdef FWP_EMU
template <typename K> const char* prepare_launch(K, size_t) { return nullptr; }
inline const char* launch_error() { return nullptr; }
#else
// Kernels above 48 KB of dynamic shared memory must opt in; report launch errors as text.
template <typename K>
const char* prepare_launch(K kernel, size_t smem) {
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      return cudaGetErrorString(cudaGetLastError());
  }
  return nullptr;
}
inline const char* launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
#endif

}  // namespace fwp

// Kernel launch that also works in the emulator.
#ifdef FWP_EMU
#define FWP_LAUNCH(kernel, grid, smem, stream, params) \
  ::fwp_emu::launch((grid), ::fwp::kThreads, (smem), [&]() { kernel(params); })
#else
#define FWP_LAUNCH(kernel, grid, smem, stream, params) \
  kernel<<<(grid), ::fwp::kThreads, (smem), static_cast<cudaStream_t>(stream)>>>(params)
#endif

// Entry points return errors as text; the emulator's exceptions become text too.
#define FWP_TRY try {
#define FWP_CATCH                                                   \
  }                                                                 \
  catch (const std::exception& ex) {                                \
    static thread_local std::string fwp_msg;                        \
    fwp_msg = ex.what();                                            \
    return fwp_msg.c_str();                                         \
  }
