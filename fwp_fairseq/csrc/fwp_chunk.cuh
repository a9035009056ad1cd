// Shared by the chunk kernels (chunk_fwd.cu, chunk_bwd.cu): tile shapes, shared-memory arrays,
// the element-wise copies between global memory and shared memory, and the host-side dispatch.
//
// Layout: one CTA per (head, tile of BV value columns). For both rules column j of the state S
// needs only k, beta, q and column j of v, so value tiles never talk to each other; the key-side
// gradients (dq, dk) are sums over all value columns and come back as one partial per value tile,
// summed afterwards in a fixed order (no atomics). Time runs in chunks of C steps; the products of
// a chunk run on tensor cores (fwp_mma.cuh), the triangular solve of the delta rule in fp32.
#pragma once

#include "fwp_launch.cuh"
#include "fwp_mma.cuh"

// Host and device (the host counts shared-memory bytes with the kernels' own layout code).
#ifdef FWP_EMU
#define FWP_HD inline
#else
#define FWP_HD __host__ __device__ __forceinline__
#endif

namespace fwp {

// The preferred configuration: chunks of 64 steps, 32 for Dk >= 128, and value tiles of 32
// columns (16 for Dv = 16). Every variant's shared memory then fits an sm_80 or sm_90 CTA (163,
// 227 KiB; at most 159 KiB, the delta rule's backward with Dk = 256) and Dk = 128 runs two CTAs
// per SM on sm_90.
constexpr int chunk_len(int Dk) { return Dk >= 128 ? 32 : 64; }
constexpr int value_tile(int Dv) { return Dv >= 32 ? 32 : 16; }

// The configurations compiled for a key size, in order of preference (chunk_configs): the
// preferred one, the chunk halved, the chunk halved with 16-column tiles. The halved chunk is for
// devices with 99 KiB per block (sm_86, sm_89): it brings every variant under it, Dk = 256 with
// 16-column tiles (the table in README.md; tests/test_cuda_chunk.py checks every variant).
constexpr int kMaxConfigs = 3;
struct ChunkConfig { int chunk, tile; };
inline int chunk_configs(int Dk, int Dv, ChunkConfig (&out)[kMaxConfigs]) {
  const int c = chunk_len(Dk), t = value_tile(Dv);
  int n = 0;
  out[n++] = {c, t};
  out[n++] = {c / 2, t};
  if (t != 16) out[n++] = {c / 2, 16};
  return n;
}

template <typename In, int DK_, int BV_, bool DELTA_, int C_>
struct ChunkCfg {
  using in_t = In;
  using acc_t = typename Acc<In>::type;
  static constexpr int DK = DK_, BV = BV_, C = C_;
  static constexpr bool DELTA = DELTA_;
  // Leading dimensions: padded against bank conflicts, multiples of 16 bytes (WMMA).
  static constexpr int LK = DK + 8, LV = BV + 8, LC = C + 8;  // in_t arrays
  static constexpr int AK = DK + 4, AV = BV + 4, AC = C + 4;  // acc_t arrays
};

// Carves named arrays out of dynamic shared memory, each 128-byte aligned; with smem == nullptr
// it only counts the bytes (the host's size).
struct Carver {
  unsigned char* base;
  size_t used = 0;
  template <typename T> FWP_HD T* take(size_t n) {
    used = (used + 127) / 128 * 128;
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += n * sizeof(T);
    return p;
  }
};

// ---- element-wise copies (any thread count, bounds-checked, zero-filled) ----

FWP_DEVICE float round_in(float x, float*) { return x; }
FWP_DEVICE double round_in(double x, double*) { return x; }
#ifdef FWP_EMU
inline ::fwp_emu::f16 round_in(float x, ::fwp_emu::f16*) { return static_cast<::fwp_emu::f16>(x); }
inline ::fwp_emu::bf16 round_in(float x, ::fwp_emu::bf16*) { return ::fwp_emu::bf16(x); }
#else
FWP_DEVICE __half round_in(float x, __half*) { return __float2half_rn(x); }
FWP_DEVICE __nv_bfloat16 round_in(float x, __nv_bfloat16*) { return __float2bfloat16_rn(x); }
#endif
template <typename In, typename A> FWP_DEVICE In to_in(A x) {
  return round_in(x, static_cast<In*>(nullptr));
}

// dst[r][c] (shared, ld) = src[r * gs + c] (global) for r < rows, c < cols, else 0, over a
// rows_pad x cols_pad tile; S is the source type, D the destination type (rounded if narrower).
template <typename D, typename S>
FWP_DEVICE void load_tile(D* dst, int ld, const S* src, long long gs, int rows, int cols,
                          int rows_pad, int cols_pad) {
  for (int x = threadIdx.x; x < rows_pad * cols_pad; x += kThreads) {
    const int r = x / cols_pad, c = x - r * cols_pad;
    dst[r * ld + c] = (r < rows && c < cols) ? to_in<D>(to_acc(src[r * gs + c])) : to_in<D>(0.0f);
  }
}

// dst[r * gs + c] (global) = src[r][c] (shared, ld) for r < rows, c < cols.
template <typename D, typename S>
FWP_DEVICE void store_tile(D* dst, long long gs, const S* src, int ld, int rows, int cols) {
  for (int x = threadIdx.x; x < rows * cols; x += kThreads) {
    const int r = x / cols, c = x - r * cols;
    store_out(dst + r * gs + c, src[r * ld + c]);
  }
}

// dst = rounded copy of src (rows x cols), optionally masked to the lower triangle: keep (r, c)
// for c <= r + diag (diag 0: with the diagonal, -1: strictly lower), scaled by `scale`.
template <typename D, typename S>
FWP_DEVICE void round_tile(D* dst, int ldd, const S* src, int lds, int rows, int cols,
                           int diag = 1 << 20, S scale = S(1)) {
  for (int x = threadIdx.x; x < rows * cols; x += kThreads) {
    const int r = x / cols, c = x - r * cols;
    dst[r * ldd + c] = to_in<D>(c <= r + diag ? scale * src[r * lds + c] : S(0));
  }
}

// The triangular solves of the delta rule, in place on x (C x BV, leading dimension ld), rows
// 0..n-1, where the unit lower-triangular system has off-diagonal (r, i) = beta_r a[r * lda + i]:
//   forward  (FORWARD):  (I + L) y = x, row r from the rows before it,
//   backward (!FORWARD): (I + L)^T y = x, row i from the rows after it.
// Column j belongs to a group of R = kThreads / BV consecutive lanes (all 128 threads busy); each
// lane sums every R-th term, a butterfly gives the group the (bit-identical) total, lane 0 of the
// group writes the row, and __syncwarp makes it visible before the next row.
template <int BV, bool FORWARD, typename A>
FWP_DEVICE void solve_unit_triangular(A* x, int ld, const A* a, int lda, const A* beta, int n) {
  constexpr int R = kThreads / BV;
  static_assert(R * BV == kThreads && R <= 32, "a group of lanes per value column");
  const int j = threadIdx.x / R, g = threadIdx.x % R;
  for (int step = 1; step < n; ++step) {
    const int r = FORWARD ? step : n - 1 - step;
    A s[1] = {A(0)};
    if (FORWARD) {
      for (int i = g; i < r; i += R) s[0] += a[r * lda + i] * x[i * ld + j];
    } else {
      for (int i = r + 1 + g; i < n; i += R) s[0] += beta[i] * a[i * lda + r] * x[i * ld + j];
    }
    group_sum<R>(s);
    if (g == 0) x[r * ld + j] -= FORWARD ? beta[r] * s[0] : s[0];
    FWP_SYNCWARP();
  }
}

// ---- host side ----

// f(ChunkCfg<In, DK, BV, DELTA, C>{}) for the runtime dtype, key size, chunk length, value tile
// and rule; the chunk must be one of the key size's compiled lengths (chunk_configs).
template <typename F>
const char* chunk_dispatch(int dtype, int Dk, int chunk, int bv, bool delta, F&& f) {
  if (bv != 16 && bv != 32) return "fwp_chunk: the value tile must be 16 or 32";
  auto by_dtype = [&](auto tag) -> const char* {
    using In = typename decltype(tag)::type;
    auto by_dk = [&](auto dk) -> const char* {
      constexpr int DK = decltype(dk)::value, C0 = chunk_len(DK);
      auto by_c = [&](auto c) -> const char* {
        constexpr int C = decltype(c)::value;
        if (bv == 16)
          return delta ? f(ChunkCfg<In, DK, 16, true, C>{}) : f(ChunkCfg<In, DK, 16, false, C>{});
        return delta ? f(ChunkCfg<In, DK, 32, true, C>{}) : f(ChunkCfg<In, DK, 32, false, C>{});
      };
      if (chunk == C0) return by_c(Len<C0>{});
      if (chunk == C0 / 2) return by_c(Len<C0 / 2>{});
      return "fwp_chunk: the chunk length must be one compiled for this Dk (fwp_chunk_configs)";
    };
    switch (Dk) {
      case 16: return by_dk(Len<16>{});
      case 32: return by_dk(Len<32>{});
      case 64: return by_dk(Len<64>{});
      case 128: return by_dk(Len<128>{});
      case 256: return by_dk(Len<256>{});
      default: return "fwp_chunk: Dk must be 16, 32, 64, 128 or 256 (pad to the next one)";
    }
  };
  switch (dtype) {
#ifdef FWP_EMU
    case kF32: return by_dtype(Tag<float>{});
    case kF64: return by_dtype(Tag<double>{});
    case kF16: return by_dtype(Tag<::fwp_emu::f16>{});
    case kBF16: return by_dtype(Tag<::fwp_emu::bf16>{});
#else
    case kF16: return by_dtype(Tag<__half>{});
    case kBF16: return by_dtype(Tag<__nv_bfloat16>{});
#endif
    default: return "fwp_chunk: unsupported dtype (fp16, bf16; fp32, fp64 only emulated)";
  }
}

// The shapes one chunk launch assumes: BH heads of T steps, key size Dk, Dv value columns in
// ntiles tiles, NC chunks (Tp = NC * chunk steps, the partials' padded length).
struct ChunkShape {
  long long BH, T;
  int Dk, Dv, chunk, tile;
  long long nc() const { return (T + chunk - 1) / chunk; }
  long long ntiles() const { return (Dv + tile - 1) / tile; }
};

// The checks both chunk entry points share, then body(); errors come back as text.
template <typename F>
const char* chunk_entry(const ChunkShape& s, F&& body) {
  if (s.BH <= 0 || s.T <= 0 || s.Dk <= 0 || s.Dv <= 0) return "fwp_chunk: empty input";
  if (s.Dk != 16 && s.Dk != 32 && s.Dk != 64 && s.Dk != 128 && s.Dk != 256)
    return "fwp_chunk: Dk must be 16, 32, 64, 128 or 256 (pad to the next one)";
  if (s.Dv % 16 || s.Dv > 128) return "fwp_chunk: Dv must be a multiple of 16, at most 128 (pad)";
  if (s.chunk <= 0 || s.tile <= 0) return "fwp_chunk: chunk and tile must be positive";
  return errors_as_text(body);
}

// One CTA per (head, value tile); smem from the kernel's own Carver count, bounded by the
// device's opt-in shared memory (prepare_launch).
template <typename K, typename P>
const char* chunk_launch(K kernel, const P& p, size_t smem, long long BH, int ntiles, void* stream) {
  if (BH * ntiles > 2147483647LL) return "fwp_chunk: more (head, tile) blocks than one grid holds";
  if (const char* e = prepare_launch(kernel, smem)) return e;
  FWP_LAUNCH(kernel, BH * ntiles, smem, stream, p);
  return launch_error();
}

// Shared memory per block of one pass (chunk_fwd.cu, chunk_bwd.cu: the kernels' own counts), or
// -1 for a configuration that is not compiled.
long long chunk_forward_smem(int dtype, int delta, int Dk, int chunk, int tile);
long long chunk_backward_smem(int dtype, int delta, int Dk, int chunk, int tile);

}  // namespace fwp
