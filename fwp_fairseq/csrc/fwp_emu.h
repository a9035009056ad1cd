// CPU emulation of the few CUDA features the kernels use, for tests only (g++ -DFWP_EMU).
//
// Each CUDA thread of a block is a std::thread; blocks run one after another. __syncthreads is a
// block barrier, __shfl_xor_sync a warp barrier around an exchange slot, cp.async a memcpy.
// Shared memory is 128-byte aligned like the kernels' declaration and starts as NaN bytes between
// guard bands, so a read of never-written shared memory shows up as NaN in the results and a write
// outside it fails the launch; launches are bounded by an emulated opt-in shared memory per block.
#pragma once

#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __syncthreads() ::fwp_emu::syncthreads()

namespace fwp_emu {

// 16-bit input types of the chunk kernels' tile products. fp16 is the compiler's _Float16 (IEEE
// binary16, round to nearest even); bf16 is storage that rounds like __float2bfloat16_rn (nearest,
// ties to even, NaN kept): same bits as torch's bfloat16, so tensors pass through unchanged.
using f16 = _Float16;
struct bf16 {
  uint16_t bits;
  bf16() = default;
  explicit bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((u >> 16) | 0x40u)
                                           : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// The emulated device's opt-in shared memory per block, which fwp_launch.cuh bounds every launch
// by: unbounded (the fp32/fp64 variants exist only here and need more than any GPU has) unless a
// test plays a device class (fwp_emu_set_smem_optin).
inline long long& smem_optin() {
  static long long bytes = std::numeric_limits<long long>::max();
  return bytes;
}

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3 tl_thread, tl_block;

// Reusable barrier; a thread left waiting 20 s means a deadlock (a divergent barrier or shuffle).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "fwp_emu: barrier deadlock (divergent __syncthreads or shuffle)\n");
      std::abort();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  unsigned gen_ = 0;
};

struct Warp {
  Barrier bar{32};
  unsigned char slot[32][8];
};

// Guard bands; also the alignment of the shared-memory base (the kernels' __align__(128)).
constexpr size_t kGuard = 128;

struct Block {
  Block(int threads, size_t smem) : bar(threads), warps(threads / 32), smem_(smem),
                                    raw(smem + 2 * kGuard + kGuard) {
    const auto addr = reinterpret_cast<uintptr_t>(raw.data());
    lo = raw.data() + (kGuard - addr % kGuard) % kGuard;  // 128-aligned guard band, then smem
    std::memset(lo, 0xA5, kGuard);
    std::memset(lo + kGuard, 0xFF, smem);  // all-ones bytes are NaN in fp32 and fp64
    std::memset(lo + kGuard + smem, 0xA5, kGuard);
  }
  bool guards_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (lo[i] != 0xA5 || lo[kGuard + smem_ + i] != 0xA5) return false;
    return true;
  }
  // A fault seen inside a thread (thrown from the launch once every thread has finished).
  void report(const char* what) {
    std::lock_guard<std::mutex> lock(fault_m);
    if (fault.empty()) fault = what;
  }
  Barrier bar;
  std::vector<Warp> warps;
  size_t smem_;
  std::vector<unsigned char> raw;
  unsigned char* lo;
  std::mutex fault_m;
  std::string fault;
};

inline thread_local Block* tl_blk = nullptr;

inline unsigned char* shared_memory() { return tl_blk->lo + kGuard; }
inline void syncthreads() { tl_blk->bar.wait(); }
inline void report(const char* what) { tl_blk->report(what); }

template <typename T>
T shfl_xor(T v, int off) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int lane = tl_thread.x % 32;
  Warp& w = tl_blk->warps[tl_thread.x / 32];
  std::memcpy(w.slot[lane], &v, sizeof(T));
  w.bar.wait();
  T r;
  std::memcpy(&r, w.slot[lane ^ off], sizeof(T));
  w.bar.wait();  // nobody overwrites a slot before every lane has read it
  return r;
}

// __syncwarp: every lane of the warp waits for the others (the emulated lanes are threads).
inline void syncwarp() { tl_blk->warps[tl_thread.x / 32].bar.wait(); }

template <typename F>
void launch(long long grid, int threads, size_t smem, F&& body) {
  for (long long b = 0; b < grid; ++b) {
    auto blk = std::make_unique<Block>(threads, smem);
    std::vector<std::thread> ts;
    ts.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        tl_thread.x = t;
        tl_block.x = static_cast<unsigned>(b);
        tl_blk = blk.get();
        body();
      });
    }
    for (auto& t : ts) t.join();
    if (!blk->guards_intact()) throw std::runtime_error("fwp_emu: shared-memory write out of bounds");
    if (!blk->fault.empty()) throw std::runtime_error(blk->fault);
  }
}

}  // namespace fwp_emu

#define threadIdx (::fwp_emu::tl_thread)
#define blockIdx (::fwp_emu::tl_block)
