// Tile products of the chunk kernels: 16x16x16 warp products on tensor cores (WMMA, fp16/bf16
// inputs, fp32 accumulation) and, under FWP_EMU, the same warp-collective calls in plain loops.
//
// The kernels never index a fragment's registers: they only load fragments from memory, multiply
// and store them (the WMMA contract: the register layout is opaque). So the emulator's fragment may
// hold its whole 16x16 tile in every lane; its store writes each element from one lane only
// (element e from lane e % 32), as a warp-collective store does. Emulated inputs are fp16
// (_Float16), bf16 (fwp_emu::bf16), float or double; the products accumulate in the accumulation
// type in their own order (not the tensor cores' bit for bit). The emulator also enforces WMMA's
// memory contract: tile pointers 32-byte aligned, leading dimensions multiples of 16 bytes.
#pragma once

#include "fwp_common.cuh"

#ifndef FWP_EMU
#include <mma.h>
#endif

namespace fwp {
namespace mma {

constexpr int kTile = 16;

#ifdef FWP_EMU
template <typename In> struct Frag {  // A, B or accumulator tile, whole in every lane
  using acc_t = typename Acc<In>::type;
  acc_t x[kTile][kTile];
};
template <typename In> using FragA = Frag<In>;
template <typename In> using FragB = Frag<In>;
template <typename In> using FragC = Frag<In>;

// WMMA's requirements on a tile in memory (load_matrix_sync / store_matrix_sync).
template <typename T> inline void check_tile(const T* p, long long ld) {
  if (reinterpret_cast<uintptr_t>(p) % 32)
    ::fwp_emu::report("fwp_emu: WMMA tile pointer not 32-byte aligned");
  if ((ld * static_cast<long long>(sizeof(T))) % 16)
    ::fwp_emu::report("fwp_emu: WMMA leading dimension not a multiple of 16 bytes");
}

// Element (r, c) of a tile at p with leading dimension ld, row- or column-major.
template <bool COL, typename In, typename F>
inline void load(F& f, const In* p, long long ld) {
  check_tile(p, ld);
  for (int r = 0; r < kTile; ++r)
    for (int c = 0; c < kTile; ++c) f.x[r][c] = COL ? p[c * ld + r] : p[r * ld + c];
}
template <typename In> inline void zero(Frag<In>& f) {
  for (auto& row : f.x)
    for (auto& e : row) e = 0;
}
template <typename In> inline void product(Frag<In>& c, const Frag<In>& a, const Frag<In>& b) {
  for (int r = 0; r < kTile; ++r)
    for (int n = 0; n < kTile; ++n) {
      auto s = c.x[r][n];
      for (int k = 0; k < kTile; ++k) s += a.x[r][k] * b.x[k][n];
      c.x[r][n] = s;
    }
}
template <typename In, typename A>
inline void store(A* p, const Frag<In>& f, long long ld) {
  check_tile(p, ld);
  const int lane = threadIdx.x % 32;
  for (int e = lane; e < kTile * kTile; e += 32) p[(e / kTile) * ld + e % kTile] = f.x[e / kTile][e % kTile];
}
template <typename In, typename A> inline void load_acc(Frag<In>& f, const A* p, long long ld) {
  load<false>(f, p, ld);
}
#else
namespace w = nvcuda::wmma;
template <bool COL> using Layout = std::conditional_t<COL, w::col_major, w::row_major>;
template <typename In> struct FragPair {
  template <bool COL> using A = w::fragment<w::matrix_a, kTile, kTile, kTile, In, Layout<COL>>;
  template <bool COL> using B = w::fragment<w::matrix_b, kTile, kTile, kTile, In, Layout<COL>>;
};
template <typename In> using FragC = w::fragment<w::accumulator, kTile, kTile, kTile, float>;

template <typename F, typename In>
FWP_DEVICE void load_in(F& f, const In* p, long long ld) {
  w::load_matrix_sync(f, p, static_cast<unsigned>(ld));
}
template <typename In> FWP_DEVICE void zero(FragC<In>& f) { w::fill_fragment(f, 0.0f); }
template <typename In> FWP_DEVICE void load_acc(FragC<In>& f, const float* p, long long ld) {
  w::load_matrix_sync(f, p, static_cast<unsigned>(ld), w::mem_row_major);
}
template <typename In> FWP_DEVICE void store(float* p, const FragC<In>& f, long long ld) {
  w::store_matrix_sync(p, f, static_cast<unsigned>(ld), w::mem_row_major);
}
#endif

// One operand pair of a product: A (M x K) and B (K x N) in memory, each row-major or, with
// TA/TB, read transposed from a row-major array (A[m][k] = a[k * lda + m]). Element (m, k) of
// A lives at a + m * lda + k (TA: a + k * lda + m); likewise for B with (k, n).
template <bool TA, bool TB, typename In>
struct Term {
  const In* a;
  long long lda;
  const In* b;
  long long ldb;
  int K;
};
template <bool TA, bool TB, typename In>
FWP_DEVICE Term<TA, TB, In> term(const In* a, long long lda, const In* b, long long ldb, int K) {
  return {a, lda, b, ldb, K};
}

// c += A[mi:mi+16, :] B[:, ni:ni+16] for one term, 16 steps of K at a time.
template <bool TA, bool TB, typename In>
FWP_DEVICE void accumulate(FragC<In>& c, int mi, int ni, const Term<TA, TB, In>& t) {
  for (int k0 = 0; k0 < t.K; k0 += kTile) {
    const In* pa = TA ? t.a + k0 * t.lda + mi : t.a + mi * t.lda + k0;
    const In* pb = TB ? t.b + ni * t.ldb + k0 : t.b + k0 * t.ldb + ni;
#ifdef FWP_EMU
    Frag<In> fa, fb;
    load<TA>(fa, pa, t.lda);
    load<TB>(fb, pb, t.ldb);
    product(c, fa, fb);
#else
    // A read transposed from row-major memory is A in column-major order (likewise B).
    typename FragPair<In>::template A<TA> fa;
    typename FragPair<In>::template B<TB> fb;
    load_in(fa, pa, t.lda);
    load_in(fb, pb, t.ldb);
    w::mma_sync(c, fa, fb, c);
#endif
  }
}

// out (M x N, row-major, leading dimension ldo, acc type) = (add ? out : 0) + the sum of the
// terms' products, cooperatively over the CTA: each warp owns whole 16x16 output tiles, so no
// two warps write one element and every element's sum has a fixed order (deterministic).
// M, N and every K are multiples of 16; the caller syncs before reading out.
template <typename In, typename A, typename... Terms>
FWP_DEVICE void gemm(int M, int N, A* out, long long ldo, bool add, const Terms&... terms) {
  const int tiles_n = N / kTile, tiles = (M / kTile) * tiles_n;
  for (int t = threadIdx.x / 32; t < tiles; t += kThreads / 32) {
    const int mi = (t / tiles_n) * kTile, ni = (t % tiles_n) * kTile;
    FragC<In> c;
    if (add)
      load_acc<In>(c, out + mi * ldo + ni, ldo);
    else
      zero<In>(c);
    (accumulate(c, mi, ni, terms), ...);
    store<In>(out + mi * ldo + ni, c, ldo);
  }
}

}  // namespace mma
}  // namespace fwp
