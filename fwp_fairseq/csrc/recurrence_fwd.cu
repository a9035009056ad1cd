// Forward of the causal sum and delta rules, with an optional forget gate a_t = exp(g_t).
//
// One CTA per (head, tile of OUT value columns) (fwp_columns.cuh). Column j of the state S
// (Dk x Dv) evolves on its own given k_t, beta_t, a_t and v_t[j], so each column lives in the
// registers of a group of R lanes for the whole sequence: no atomics, no cross-CTA traffic. Per
// step, one butterfly sums three partial dot products at once:
//   x = S_{t-1}^T k_t,  y = S_{t-1}^T q_t,  c = k_t . q_t     (S'_t = a_t S_{t-1}; ungated a_t = 1)
//   delta: e = v_t - a_t x, u = beta_t e;   sum: u = v_t
//   S_t = S'_t + k_t u^T;   o_t = S_t^T q_t = a_t y + c u
#include "fwp_api.h"
#include "fwp_columns.cuh"
#include "fwp_launch.cuh"

namespace fwp {
namespace {

struct FwdParams {
  const void *q, *k, *v, *beta, *a, *h0;  // beta (delta rule), a (gated), h0 or nullptr: acc_t
  void *o, *ht, *ckpt, *err;              // ht, ckpt, err (delta rule) or nullptr: acc_t
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

template <typename C>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdParams p) {
  using Sh = ColumnShape<C, 2>;
  using scalar_t = typename Sh::scalar_t;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, OUT = Sh::OUT;
  FWP_DECLARE_SMEM(smem);
  const auto in = column_inputs<Sh>(smem, p, p.v);
  const auto& o = in.o;
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T, head = o.bh * Dk * Dv + o.own();

  acc_t S[PT];  // column o.own() of the state
  load_owned(S, offset_or_null<acc_t>(p.h0, head), Dv, Dk, o);
  const long long nck = (T + p.ck_every - 1) / p.ck_every;

  chunk_loop<Sh::TC, false>(T, in, [&](long long t0, int steps, int b) {
    if (p.ckpt && t0 % p.ck_every == 0)  // the state before step t0
      store_owned(static_cast<acc_t*>(p.ckpt) + (o.bh * nck + t0 / p.ck_every) * Dk * Dv + o.own(),
                  Dv, Dk, o, S);
    const acc_t *bb = in.beta(b), *ab = in.a(b);
    for (int s = 0; s < steps; ++s) {
      acc_t kr[PT], qr[PT];
      const acc_t vj = in.step(b, s, kr, qr);
      acc_t part[2][3] = {};  // two interleaved chains per sum shorten the FMA dependency
#pragma unroll
      for (int x = 0; x < PT; ++x) {
        part[(x / 4) & 1][0] += kr[x] * S[x];
        part[(x / 4) & 1][1] += qr[x] * S[x];
        part[(x / 4) & 1][2] += kr[x] * qr[x];
      }
      acc_t sums[3] = {part[0][0] + part[1][0], part[0][1] + part[1][1], part[0][2] + part[1][2]};
      group_sum<R>(sums);
      if constexpr (Sh::GATED) {  // the sums of S'_t = a_t S_{t-1}
        sums[0] *= ab[s];
        sums[1] *= ab[s];
      }
      acc_t u, err = acc_t(0);
      if constexpr (Sh::DELTA) {
        err = vj - sums[0];
        u = bb[s] * err;
      } else {
        u = vj;
      }
      if constexpr (Sh::GATED) {
#pragma unroll
        for (int x = 0; x < PT; ++x) S[x] = ab[s] * S[x] + kr[x] * u;
      } else {
#pragma unroll
        for (int x = 0; x < PT; ++x) S[x] += kr[x] * u;
      }
      if (o.g == 0) {
        in.out(0)[s * OUT + o.ol] = sums[1] + sums[2] * u;
        if constexpr (Sh::DELTA) in.out(1)[s * OUT + o.ol] = err;
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = (o.bh * T + t0) * Dv + o.first;
    flush_rows<OUT>(static_cast<scalar_t*>(p.o) + at, Dv, in.out(0), steps, o.count, o.tid());
    if (Sh::DELTA && p.err)
      flush_rows<OUT>(static_cast<acc_t*>(p.err) + at, Dv, in.out(1), steps, o.count, o.tid());
  });

  store_owned(offset_or_null<acc_t>(p.ht, head), Dv, Dk, o, S);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_forward(int dtype, int delta, const void* q, const void* k,
                                   const void* v, const void* beta, const void* a,
                                   const void* h0, void* o, void* ht, void* ckpt, void* err,
                                   long long BH, long long T, int Dk, int Dv, int ck_every,
                                   const long long* sizes, void* stream) {
  return fwp::entry(BH, T, Dk, Dv, ck_every, [&]() -> const char* {
    using namespace fwp;
    const long long kq = BH * T * Dk, vo = BH * T * Dv, st = BH * Dk * Dv;
    if (const char* e = check_sizes(
            "fwp_forward", sizes,
            {{"q", q, kq, "(BH, T, Dk)", false},
             {"k", k, kq, "(BH, T, Dk)", false},
             {"v", v, vo, "(BH, T, Dv)", false},
             {"beta", beta, BH * T, "(BH, T)", !delta},
             {"a", a, BH * T, "(BH, T)", true},
             {"h0", h0, st, "(BH, Dk, Dv)", true},
             {"o", o, vo, "(BH, T, Dv)", false},
             {"ht", ht, st, "(BH, Dk, Dv)", true},
             {"ckpt", ckpt, BH * ((T + ck_every - 1) / ck_every) * Dk * Dv,
              "(BH, ceil(T / ck_every), Dk, Dv)", true},
             {"err", err, vo, "(BH, T, Dv)", true}}))
      return e;
    FwdParams p{q, k, v, beta, a, h0, o, ht, ckpt, err, T, Dk, Dv, ck_every, 0};
    return dispatch<512>(dtype, Dk, delta, a != nullptr, [&](auto c) {
      using C = decltype(c);
      return launch_tiles<ColumnShape<C, 2>>(fwd_kernel<C>, p, Dv, ck_every, BH, stream);
    });
  });
}
