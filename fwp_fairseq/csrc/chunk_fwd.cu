// Chunkwise-parallel forward of the causal sum and delta rules on tensor cores (fwp_chunk.cuh).
//
// Per chunk of C steps from the state S (Dk x BV columns of this CTA), as in
// ops/sum_rule/chunked.py and ops/delta_rule/chunked.py:
//   sum:   U = V
//   delta: (I + A) U = diag(beta) (V - K S), A = strictly_lower(diag(beta) K K^T)  (the UT form,
//          solved by forward substitution in fp32: each thread owns value columns)
//   O = Q S + tril(Q K^T) U,   S <- S + K^T U
// The products take the inputs' type (fp16/bf16) with fp32 accumulation; S and U are kept in
// fp32 and rounded to the input type only as product operands.
#include "fwp_api.h"
#include "fwp_chunk.cuh"

namespace fwp {
namespace {

struct ChunkFwdParams {
  const void *q, *k, *v, *beta, *h0;  // beta (delta), h0 (or nullptr): acc_t
  void *o, *ht, *states, *u;          // ht, states, u (delta) or nullptr: acc_t
  long long T;
  int Dv, ntiles;
};

template <typename Cf>
struct FwdSmem {
  using in_t = typename Cf::in_t;
  using acc_t = typename Cf::acc_t;
  static constexpr int C = Cf::C, DK = Cf::DK;
  in_t *k, *q, *sh, *uh, *ph;
  acc_t *s, *x, *o, *p, *a, *beta;
  size_t bytes;
  FWP_HD explicit FwdSmem(unsigned char* base) {
    Carver c{base};
    k = c.take<in_t>(C * Cf::LK);
    q = c.take<in_t>(C * Cf::LK);
    sh = c.take<in_t>(DK * Cf::LV);  // S rounded to the input type
    uh = c.take<in_t>(C * Cf::LV);
    ph = c.take<in_t>(C * Cf::LC);   // tril(Q K^T) rounded
    s = c.take<acc_t>(DK * Cf::AV);  // the state, fp32
    x = c.take<acc_t>(C * Cf::AV);   // K S, then U (delta)
    o = c.take<acc_t>(C * Cf::AV);
    p = c.take<acc_t>(C * Cf::AC);   // Q K^T
    a = c.take<acc_t>(Cf::DELTA ? C * Cf::AC : 0);  // K K^T
    beta = c.take<acc_t>(C);
    bytes = c.used;
  }
};

template <typename Cf>
__global__ void __launch_bounds__(kThreads, 1) chunk_fwd_kernel(ChunkFwdParams p) {
  using in_t = typename Cf::in_t;
  using acc_t = typename Cf::acc_t;
  constexpr int C = Cf::C, DK = Cf::DK, BV = Cf::BV;
  FWP_DECLARE_SMEM(raw);
  const FwdSmem<Cf> m(raw);
  const long long bh = blockIdx.x / p.ntiles, T = p.T;
  const int Dv = p.Dv, c0 = static_cast<int>(blockIdx.x % p.ntiles) * BV;
  const int cols = imin(BV, Dv - c0);
  const long long kq = bh * T * DK, vo = bh * T * Dv + c0, st = bh * DK * Dv + c0;
  const long long nc = (T + C - 1) / C;
  const in_t *q = static_cast<const in_t*>(p.q) + kq, *k = static_cast<const in_t*>(p.k) + kq;
  const in_t* v = static_cast<const in_t*>(p.v) + vo;

  if (p.h0)
    load_tile(m.s, Cf::AV, static_cast<const acc_t*>(p.h0) + st, Dv, DK, cols, DK, BV);
  else
    load_tile(m.s, Cf::AV, static_cast<const acc_t*>(nullptr), Dv, 0, 0, DK, BV);
  __syncthreads();
  round_tile(m.sh, Cf::LV, m.s, Cf::AV, DK, BV);

  for (long long c = 0; c < nc; ++c) {
    const long long t0 = c * C;
    const int n = static_cast<int>(lmin(C, T - t0));
    load_tile(m.k, Cf::LK, k + t0 * DK, DK, n, DK, C, DK);
    load_tile(m.q, Cf::LK, q + t0 * DK, DK, n, DK, C, DK);
    if constexpr (Cf::DELTA)
      load_tile(m.beta, 1, static_cast<const acc_t*>(p.beta) + bh * T + t0, 1, n, 1, C, 1);
    else
      load_tile(m.uh, Cf::LV, v + t0 * Dv, Dv, n, cols, C, BV);
    if (p.states)  // the state before this chunk, for the backward
      store_tile(static_cast<acc_t*>(p.states) + (bh * nc + c) * DK * Dv + c0, Dv, m.s, Cf::AV,
                 DK, cols);
    __syncthreads();

    mma::gemm<in_t>(C, BV, m.o, Cf::AV, false, mma::term<false, false>(m.q, Cf::LK, m.sh, Cf::LV, DK));
    mma::gemm<in_t>(C, C, m.p, Cf::AC, false, mma::term<false, true>(m.q, Cf::LK, m.k, Cf::LK, DK));
    if constexpr (Cf::DELTA) {
      mma::gemm<in_t>(C, C, m.a, Cf::AC, false, mma::term<false, true>(m.k, Cf::LK, m.k, Cf::LK, DK));
      mma::gemm<in_t>(C, BV, m.x, Cf::AV, false, mma::term<false, false>(m.k, Cf::LK, m.sh, Cf::LV, DK));
    }
    __syncthreads();

    round_tile(m.ph, Cf::LC, m.p, Cf::AC, C, C, 0);
    if constexpr (Cf::DELTA) {
      // x = beta (v - K S), then (I + A) U = x row by row; padded rows have beta = 0, so U = 0.
      for (int e = threadIdx.x; e < C * BV; e += kThreads) {
        const int r = e / BV, j = e - r * BV;
        const acc_t vj = (r < n && j < cols) ? to_acc(v[(t0 + r) * Dv + j]) : acc_t(0);
        m.x[r * Cf::AV + j] = m.beta[r] * (vj - m.x[r * Cf::AV + j]);
      }
      __syncthreads();
      solve_unit_triangular<BV, true>(m.x, Cf::AV, m.a, Cf::AC, m.beta, n);
      __syncthreads();
      round_tile(m.uh, Cf::LV, m.x, Cf::AV, C, BV);
      if (p.u) store_tile(static_cast<acc_t*>(p.u) + vo + t0 * Dv, Dv, m.x, Cf::AV, n, cols);
    }
    __syncthreads();

    mma::gemm<in_t>(C, BV, m.o, Cf::AV, true, mma::term<false, false>(m.ph, Cf::LC, m.uh, Cf::LV, C));
    mma::gemm<in_t>(DK, BV, m.s, Cf::AV, true, mma::term<true, false>(m.k, Cf::LK, m.uh, Cf::LV, C));
    __syncthreads();

    round_tile(m.sh, Cf::LV, m.s, Cf::AV, DK, BV);
    store_tile(static_cast<in_t*>(p.o) + vo + t0 * Dv, Dv, m.o, Cf::AV, n, cols);
    __syncthreads();
  }
  if (p.ht) store_tile(static_cast<acc_t*>(p.ht) + st, Dv, m.s, Cf::AV, DK, cols);
}

}  // namespace
}  // namespace fwp

namespace fwp {
long long chunk_forward_smem(int dtype, int delta, int Dk, int chunk, int tile) {
  long long bytes = -1;
  chunk_dispatch(dtype, Dk, chunk, tile, delta != 0, [&](auto cfg) -> const char* {
    bytes = static_cast<long long>(FwdSmem<decltype(cfg)>(nullptr).bytes);
    return nullptr;
  });
  return bytes;
}
}  // namespace fwp

extern "C" int fwp_chunk_configs(int Dk, int Dv, int* chunks, int* tiles) {
  fwp::ChunkConfig c[fwp::kMaxConfigs];
  const int n = fwp::chunk_configs(Dk, Dv, c);
  for (int i = 0; i < n; ++i) chunks[i] = c[i].chunk, tiles[i] = c[i].tile;
  return n;
}

extern "C" long long fwp_chunk_smem(int dtype, int delta, int backward, int Dk, int chunk,
                                    int tile) {
  return backward ? fwp::chunk_backward_smem(dtype, delta, Dk, chunk, tile)
                  : fwp::chunk_forward_smem(dtype, delta, Dk, chunk, tile);
}

extern "C" long long fwp_device_smem_optin() { return fwp::device_smem_optin(); }

extern "C" const char* fwp_chunk_forward(int dtype, int delta, const void* q, const void* k,
                                         const void* v, const void* beta, const void* h0, void* o,
                                         void* ht, void* states, void* u, long long BH,
                                         long long T, int Dk, int Dv, int chunk, int tile,
                                         const long long* sizes, void* stream) {
  using namespace fwp;
  const ChunkShape s{BH, T, Dk, Dv, chunk, tile};
  return chunk_entry(s, [&]() -> const char* {
    const long long kq = BH * T * Dk, vo = BH * T * Dv, st = BH * Dk * Dv;
    if (const char* e = check_sizes(
            "fwp_chunk_forward", sizes,
            {{"q", q, kq, "(BH, T, Dk)", false},
             {"k", k, kq, "(BH, T, Dk)", false},
             {"v", v, vo, "(BH, T, Dv)", false},
             {"beta", beta, BH * T, "(BH, T)", !delta},
             {"h0", h0, st, "(BH, Dk, Dv)", true},
             {"o", o, vo, "(BH, T, Dv)", false},
             {"ht", ht, st, "(BH, Dk, Dv)", true},
             {"states", states, BH * s.nc() * Dk * Dv, "(BH, ceil(T / chunk), Dk, Dv)", true},
             {"u", u, vo, "(BH, T, Dv)", true}}))
      return e;
    return chunk_dispatch(dtype, Dk, chunk, tile, delta != 0, [&](auto cfg) -> const char* {
      using Cf = decltype(cfg);
      ChunkFwdParams p{q, k, v, beta, h0, o, ht, states, delta ? u : nullptr, T, Dv,
                       static_cast<int>(s.ntiles())};
      return chunk_launch(chunk_fwd_kernel<Cf>, p, FwdSmem<Cf>(nullptr).bytes, BH, p.ntiles, stream);
    });
  });
}
