// Host side of the three entry points: argument checks, dispatch over dtype, inner length and
// rule, kernel launch (on the GPU or in the emulator) and errors as text.
#pragma once

#include <exception>
#include <initializer_list>
#include <string>

#include "fwp_common.cuh"

// Kernel launch that also works in the emulator.
#ifdef FWP_EMU
#define FWP_LAUNCH(kernel, grid, smem, stream, params) \
  ::fwp_emu::launch((grid), ::fwp::kThreads, (smem), [&]() { kernel(params); })
#else
#define FWP_LAUNCH(kernel, grid, smem, stream, params) \
  kernel<<<(grid), ::fwp::kThreads, (smem), static_cast<cudaStream_t>(stream)>>>(params)
#endif

namespace fwp {

// Every kernel's chunk length divides 64, so any multiple of 64 is a valid ck_every.
constexpr const char* kBadCkEvery = "fwp: ck_every must be a multiple of 64";

// ---- dispatch over dtype and padded inner length ----
template <typename T> struct Tag { using type = T; };

template <typename F>
const char* dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: return f(Tag<float>{});
    case kF64: return f(Tag<double>{});
#ifdef FWP_EMU
    case kF16: return f(Tag<::fwp_emu::f16>{});
    case kBF16: return f(Tag<::fwp_emu::bf16>{});
#else
    case kF16: return f(Tag<__half>{});
    case kBF16: return f(Tag<__nv_bfloat16>{});
#endif
    default: return "fwp: unsupported dtype (fp32, fp16, bf16, fp64)";
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

// An error message built at run time (one per thread, valid until its next error).
inline const char* error_text(const std::string& s) {
  static thread_local std::string msg;
  msg = s;
  return msg.c_str();
}

// body(), with an exception's text (the emulator's too) returned as the error.
template <typename F>
const char* errors_as_text(F&& body) {
  try {
    return body();
  } catch (const std::exception& ex) {
    return error_text(ex.what());
  }
}

// One pointer argument of an entry point: its name, the pointer (nullptr: not passed), the
// element count the launch reads or writes through it, that count's shape (for the message), and
// whether it may be left out.
struct Buffer {
  const char* name;
  const void* ptr;
  long long need;
  const char* shape;
  bool optional;
};

// The caller's element count of every pointer argument (sizes[i] for bufs[i], in the entry's
// argument order) against what the launch assumes: a passed buffer of any other size is an error
// before anything runs, so a wrong size never turns into an out-of-bounds read or write.
inline const char* check_sizes(const char* who, const long long* sizes,
                               std::initializer_list<Buffer> bufs) {
  if (!sizes) return error_text(std::string(who) + ": the element counts (sizes) are required");
  int i = 0;
  for (const Buffer& b : bufs) {
    const long long n = sizes[i++];
    if (!b.ptr && !b.optional) return error_text(std::string(who) + ": " + b.name + " is required");
    if (b.ptr && n != b.need)
      return error_text(std::string(who) + ": " + b.name + " has " + std::to_string(n) +
                        " elements, the launch needs " + std::to_string(b.need) + " = " + b.shape);
  }
  return nullptr;
}

// An entry point: the size checks the three share, then body(); errors come back as text.
template <typename F>
const char* entry(long long BH, long long T, int Dk, int Dv, int ck_every, F&& body) {
  if (BH <= 0 || T <= 0 || Dk <= 0 || Dv <= 0) return "fwp: empty input";
  if (Dk % 8 || Dv % 8) return "fwp: Dk and Dv must be multiples of 8 (pad with zeros)";
  if (Dk > 512 || Dv > 256) return "fwp: Dk <= 512 and Dv <= 256";
  if (ck_every <= 0) return "fwp: ck_every must be positive";
  return errors_as_text(body);
}

// The current device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 163 KiB on sm_80, 99 KiB on sm_86/sm_89, 227 KiB on sm_90); in the emulator a settable stand-in
// (fwp_emu::smem_optin), so the CPU tests can play each device class.
#ifdef FWP_EMU
inline long long device_smem_optin() { return ::fwp_emu::smem_optin(); }
}  // namespace fwp
// The tests' handle on the emulated limit, in every emulator library (one merged inline copy).
extern "C" inline __attribute__((used)) void fwp_emu_set_smem_optin(long long bytes) {
  ::fwp_emu::smem_optin() = bytes;
}
namespace fwp {
#else
inline long long device_smem_optin() {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch guard below then refuses any opt-in size
    return 48 * 1024;
  }
  return bytes;
}
#endif

// Every launch is bounded by the device's opt-in shared memory per block: a kernel that needs
// more is refused with the numbers (the Python side picks a configuration that fits first,
// ops/chunk_smem.py).
inline const char* check_smem(size_t smem) {
  const long long limit = device_smem_optin();
  if (static_cast<long long>(smem) <= limit) return nullptr;
  return error_text("fwp: the launch needs " + std::to_string(smem) +
                    " bytes of shared memory per block, the device allows " +
                    std::to_string(limit) + " (opt-in); use a smaller configuration");
}

#ifdef FWP_EMU
template <typename K> const char* prepare_launch(K, size_t smem) { return check_smem(smem); }
inline const char* launch_error() { return nullptr; }
#else
// Kernels above 48 KB of dynamic shared memory must opt in; report launch errors as text.
template <typename K>
const char* prepare_launch(K kernel, size_t smem) {
  if (const char* e = check_smem(smem)) return e;
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

// f(Cfg<scalar_t, L, DELTA, GATED>{}) for the runtime dtype, inner length, rule and forget gate.
template <int MAX, typename F>
const char* dispatch(int dtype, int len, bool delta, bool gated, F&& f) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_len<MAX>(len, [&](auto n) {
      constexpr int L = decltype(n)::value;
      if (delta) return gated ? f(Cfg<T, L, true, true>{}) : f(Cfg<T, L, true, false>{});
      return gated ? f(Cfg<T, L, false, true>{}) : f(Cfg<T, L, false, false>{});
    });
  });
}

// One CTA per (head, tile of Sh::OUT of the `extent` owners); ck_every (0 where there are no
// checkpoints) must be a multiple of the chunk length.
template <typename Sh, typename K, typename P>
const char* launch_tiles(K kernel, P p, int extent, int ck_every, long long BH, void* stream) {
  if (ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (extent + Sh::OUT - 1) / Sh::OUT;
  if (BH * p.ntiles > 2147483647LL) return "fwp: more (head, tile) blocks than one grid holds";
  if (const char* e = prepare_launch(kernel, Sh::smem)) return e;
  FWP_LAUNCH(kernel, BH * p.ntiles, Sh::smem, stream, p);
  return launch_error();
}

}  // namespace fwp
