// Chunkwise-parallel backward of the causal sum and delta rules on tensor cores (fwp_chunk.cuh).
//
// Reverse over chunks with dS, the gradient w.r.t. the state after the chunk (Dk x BV columns of
// this CTA, fp32), starting from dht. Per chunk, from the state S before it (stored by the
// forward) and U (delta: stored by the forward; sum: V), with P = tril(Q K^T), dP = tril(dO U^T):
//   dU = P^T dO + K dS;   dq += dO S^T + dP K;   dk += U dS^T + dP^T Q
//   sum:   dv = dU;   dS <- dS + Q^T dO
//   delta (as ops/delta_rule/chunked.py): (I + A)^T dVb = dU (back substitution in fp32),
//          dA = -strictly_lower(dVb U^T),  dKb = -dVb S^T + dA K,  dk += dA^T (diag(beta) K),
//          dS <- dS + Q^T dO - (diag(beta) K)^T dVb
// dq, dk and dKb sum over all value columns: each CTA writes its own partial (per value tile,
// padded to whole chunks) and the caller sums them; dk += beta dKb, dbeta = rowsum(dKb K) +
// rowsum(dVb V) and dv = beta dVb are element-wise there too.
#include "fwp_api.h"
#include "fwp_chunk.cuh"

namespace fwp {
namespace {

struct ChunkBwdParams {
  const void *q, *k, *v, *beta, *dout, *states, *u, *dht;  // beta, states, u, dht: acc_t
  void *dq, *dk, *dkb, *dv, *dh0;  // acc_t; dq, dk, dkb: (ntiles, BH, Tp, Dk); dkb delta only
  long long BH, T;
  int Dv, ntiles;
};

template <typename Cf>
struct BwdSmem {
  using in_t = typename Cf::in_t;
  using acc_t = typename Cf::acc_t;
  static constexpr int C = Cf::C, DK = Cf::DK;
  in_t *k, *q, *kb, *sh, *dsh, *doh, *uh, *nvb, *ph, *dph, *dah;
  acc_t *ds, *du, *p, *dp, *a, *beta;
  size_t bytes;
  FWP_HD explicit BwdSmem(unsigned char* base) {
    constexpr int D = Cf::DELTA ? 1 : 0;  // arrays only the delta rule needs
    Carver c{base};
    k = c.take<in_t>(C * Cf::LK);
    q = c.take<in_t>(C * Cf::LK);
    kb = c.take<in_t>(D * C * Cf::LK);  // diag(beta) K
    sh = c.take<in_t>(DK * Cf::LV);
    dsh = c.take<in_t>(DK * Cf::LV);
    doh = c.take<in_t>(C * Cf::LV);
    uh = c.take<in_t>(C * Cf::LV);
    nvb = c.take<in_t>(D * C * Cf::LV);  // -dVb
    ph = c.take<in_t>(C * Cf::LC);
    dph = c.take<in_t>(C * Cf::LC);
    dah = c.take<in_t>(D * C * Cf::LC);
    ds = c.take<acc_t>(DK * Cf::AV);
    du = c.take<acc_t>(C * Cf::AV);
    p = c.take<acc_t>(C * Cf::AC);
    dp = c.take<acc_t>(C * Cf::AC);
    a = c.take<acc_t>(D * C * Cf::AC);
    beta = c.take<acc_t>(C);
    bytes = c.used;
  }
};

template <typename Cf>
__global__ void __launch_bounds__(kThreads, 1) chunk_bwd_kernel(ChunkBwdParams p) {
  using in_t = typename Cf::in_t;
  using acc_t = typename Cf::acc_t;
  constexpr int C = Cf::C, DK = Cf::DK, BV = Cf::BV, LK = Cf::LK, LV = Cf::LV, LC = Cf::LC;
  FWP_DECLARE_SMEM(raw);
  const BwdSmem<Cf> m(raw);
  const int tile = static_cast<int>(blockIdx.x % p.ntiles);
  const long long bh = blockIdx.x / p.ntiles, T = p.T, BH = p.BH;
  const int Dv = p.Dv, c0 = tile * BV, cols = imin(BV, Dv - c0);
  const long long nc = (T + C - 1) / C, Tp = nc * C;
  const long long kq = bh * T * DK, vo = bh * T * Dv + c0, st = bh * DK * Dv + c0;
  const long long part = (tile * BH + bh) * Tp * DK;  // this CTA's partials
  const in_t *q = static_cast<const in_t*>(p.q) + kq, *k = static_cast<const in_t*>(p.k) + kq;
  const in_t *v = static_cast<const in_t*>(p.v) + vo, *dout = static_cast<const in_t*>(p.dout) + vo;
  acc_t *dq = static_cast<acc_t*>(p.dq) + part, *dk = static_cast<acc_t*>(p.dk) + part;

  load_tile(m.ds, Cf::AV, p.dht ? static_cast<const acc_t*>(p.dht) + st : nullptr, Dv,
            p.dht ? DK : 0, cols, DK, BV);
  __syncthreads();
  round_tile(m.dsh, LV, m.ds, Cf::AV, DK, BV);

  for (long long c = nc - 1; c >= 0; --c) {
    const long long t0 = c * C;
    const int n = static_cast<int>(lmin(C, T - t0));
    load_tile(m.k, LK, k + t0 * DK, DK, n, DK, C, DK);
    load_tile(m.q, LK, q + t0 * DK, DK, n, DK, C, DK);
    load_tile(m.doh, LV, dout + t0 * Dv, Dv, n, cols, C, BV);
    load_tile(m.sh, LV, static_cast<const acc_t*>(p.states) + (bh * nc + c) * DK * Dv + c0, Dv,
              DK, cols, DK, BV);
    if constexpr (Cf::DELTA) {
      load_tile(m.uh, LV, static_cast<const acc_t*>(p.u) + vo + t0 * Dv, Dv, n, cols, C, BV);
      load_tile(m.beta, 1, static_cast<const acc_t*>(p.beta) + bh * T + t0, 1, n, 1, C, 1);
    } else {
      load_tile(m.uh, LV, v + t0 * Dv, Dv, n, cols, C, BV);
    }
    __syncthreads();

    mma::gemm<in_t>(C, C, m.p, Cf::AC, false, mma::term<false, true>(m.q, LK, m.k, LK, DK));
    mma::gemm<in_t>(C, C, m.dp, Cf::AC, false, mma::term<false, true>(m.doh, LV, m.uh, LV, BV));
    if constexpr (Cf::DELTA) {
      mma::gemm<in_t>(C, C, m.a, Cf::AC, false, mma::term<false, true>(m.k, LK, m.k, LK, DK));
      for (int e = threadIdx.x; e < C * DK; e += kThreads) {
        const int r = e / DK, i = e - r * DK;
        m.kb[r * LK + i] = to_in<in_t>(m.beta[r] * to_acc(m.k[r * LK + i]));
      }
    }
    __syncthreads();

    round_tile(m.ph, LC, m.p, Cf::AC, C, C, 0);
    round_tile(m.dph, LC, m.dp, Cf::AC, C, C, 0);
    __syncthreads();

    // dU = P^T dO + K dS;  dq = dO S^T + dP K  (partial over this CTA's value columns)
    mma::gemm<in_t>(C, BV, m.du, Cf::AV, false, mma::term<true, false>(m.ph, LC, m.doh, LV, C),
                    mma::term<false, false>(m.k, LK, m.dsh, LV, DK));
    mma::gemm<in_t>(C, DK, dq + t0 * DK, DK, false, mma::term<false, true>(m.doh, LV, m.sh, LV, BV),
                    mma::term<false, false>(m.dph, LC, m.k, LK, C));
    if constexpr (!Cf::DELTA) {
      mma::gemm<in_t>(C, DK, dk + t0 * DK, DK, false, mma::term<false, true>(m.uh, LV, m.dsh, LV, BV),
                      mma::term<true, false>(m.dph, LC, m.q, LK, C));
      mma::gemm<in_t>(DK, BV, m.ds, Cf::AV, true, mma::term<true, false>(m.q, LK, m.doh, LV, C));
      __syncthreads();
      store_tile(static_cast<acc_t*>(p.dv) + vo + t0 * Dv, Dv, m.du, Cf::AV, n, cols);
    } else {
      __syncthreads();
      // (I + A)^T dVb = dU, A[r][i] = beta_r k_r.k_i (i < r): back substitution, dVb in du.
      solve_unit_triangular<BV, false>(m.du, Cf::AV, m.a, Cf::AC, m.beta, n);
      __syncthreads();
      store_tile(static_cast<acc_t*>(p.dv) + vo + t0 * Dv, Dv, m.du, Cf::AV, n, cols);
      round_tile(m.nvb, LV, m.du, Cf::AV, C, BV, 1 << 20, acc_t(-1));
      __syncthreads();
      // dA = -strictly_lower(dVb U^T), in dp
      mma::gemm<in_t>(C, C, m.dp, Cf::AC, false, mma::term<false, true>(m.nvb, LV, m.uh, LV, BV));
      __syncthreads();
      round_tile(m.dah, LC, m.dp, Cf::AC, C, C, -1);
      __syncthreads();
      acc_t* dkb = static_cast<acc_t*>(p.dkb) + part;
      mma::gemm<in_t>(C, DK, dk + t0 * DK, DK, false, mma::term<false, true>(m.uh, LV, m.dsh, LV, BV),
                      mma::term<true, false>(m.dph, LC, m.q, LK, C),
                      mma::term<true, false>(m.dah, LC, m.kb, LK, C));
      mma::gemm<in_t>(C, DK, dkb + t0 * DK, DK, false, mma::term<false, true>(m.nvb, LV, m.sh, LV, BV),
                      mma::term<false, false>(m.dah, LC, m.k, LK, C));
      mma::gemm<in_t>(DK, BV, m.ds, Cf::AV, true, mma::term<true, false>(m.q, LK, m.doh, LV, C),
                      mma::term<true, false>(m.kb, LK, m.nvb, LV, C));
    }
    __syncthreads();
    round_tile(m.dsh, LV, m.ds, Cf::AV, DK, BV);
    __syncthreads();
  }
  if (p.dh0) store_tile(static_cast<acc_t*>(p.dh0) + st, Dv, m.ds, Cf::AV, DK, cols);
}

}  // namespace
}  // namespace fwp

namespace fwp {
long long chunk_backward_smem(int dtype, int delta, int Dk, int chunk, int tile) {
  long long bytes = -1;
  chunk_dispatch(dtype, Dk, chunk, tile, delta != 0, [&](auto cfg) -> const char* {
    bytes = static_cast<long long>(BwdSmem<decltype(cfg)>(nullptr).bytes);
    return nullptr;
  });
  return bytes;
}
}  // namespace fwp

extern "C" const char* fwp_chunk_backward(int dtype, int delta, const void* q, const void* k,
                                          const void* v, const void* beta, const void* dout,
                                          const void* states, const void* u, const void* dht,
                                          void* dq, void* dk, void* dkb, void* dv, void* dh0,
                                          long long BH, long long T, int Dk, int Dv, int chunk,
                                          int tile, const long long* sizes, void* stream) {
  using namespace fwp;
  const ChunkShape s{BH, T, Dk, Dv, chunk, tile};
  return chunk_entry(s, [&]() -> const char* {
    const long long kq = BH * T * Dk, vo = BH * T * Dv, st = BH * Dk * Dv;
    const long long part = s.ntiles() * BH * s.nc() * chunk * Dk;
    constexpr const char* kPart = "(ceil(Dv / tile), BH, ceil(T / chunk) * chunk, Dk)";
    if (const char* e = check_sizes(
            "fwp_chunk_backward", sizes,
            {{"q", q, kq, "(BH, T, Dk)", false},
             {"k", k, kq, "(BH, T, Dk)", false},
             {"v", v, vo, "(BH, T, Dv)", false},
             {"beta", beta, BH * T, "(BH, T)", !delta},
             {"dout", dout, vo, "(BH, T, Dv)", false},
             {"states", states, BH * s.nc() * Dk * Dv, "(BH, ceil(T / chunk), Dk, Dv)", false},
             {"u", u, vo, "(BH, T, Dv)", !delta},
             {"dht", dht, st, "(BH, Dk, Dv)", true},
             {"dq", dq, part, kPart, false},
             {"dk", dk, part, kPart, false},
             {"dkb", dkb, part, kPart, !delta},
             {"dv", dv, vo, "(BH, T, Dv)", false},
             {"dh0", dh0, st, "(BH, Dk, Dv)", true}}))
      return e;
    return chunk_dispatch(dtype, Dk, chunk, tile, delta != 0, [&](auto cfg) -> const char* {
      using Cf = decltype(cfg);
      ChunkBwdParams p{q, k, v, beta, dout, states, u, dht, dq, dk, delta ? dkb : nullptr, dv,
                       dh0, BH, T, Dv, static_cast<int>(s.ntiles())};
      return chunk_launch(chunk_bwd_kernel<Cf>, p, BwdSmem<Cf>(nullptr).bytes, BH, p.ntiles, stream);
    });
  });
}
