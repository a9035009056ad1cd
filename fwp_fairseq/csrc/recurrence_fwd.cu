// Forward of the causal sum and delta rules, with an optional forget gate a_t = exp(g_t).
//
// One CTA per (head, tile of OUT value columns) (fwp_columns.cuh). Column j of the state S
// (Dk x Dv) evolves on its own given k_t, beta_t, a_t and v_t[j], so each column lives in the
// registers of a group of R lanes for the whole sequence: no atomics, no cross-CTA traffic. Per
// step, one butterfly sums three partial dot products at once:
//   x = S_{t-1}^T k_t,  y = S_{t-1}^T q_t,  c = k_t . q_t        (S'_t = a_t S_{t-1}, a_t = 1 ungated)
//   delta: e = v_t - a_t x, u = beta_t e;   sum: u = v_t
//   S_t = S'_t + k_t u^T;   o_t = S_t^T q_t = a_t y + c u
#include "fwp_api.h"
#include "fwp_columns.cuh"
#include "fwp_launch.cuh"

namespace fwp {
namespace {

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* beta;  // acc_t, delta rule only
  const void* a;     // acc_t forget gate, or nullptr
  const void* h0;    // acc_t or nullptr
  void* o;
  void* ht;    // acc_t or nullptr
  void* ckpt;  // acc_t or nullptr
  void* err;   // acc_t or nullptr (delta rule, for the backward)
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

template <typename scalar_t, int DK, bool DELTA, bool GATED>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdParams p) {
  using Sh = ColumnShape<scalar_t, DK, 2>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = Sh::NV, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dv);  // owner: value column o.own
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T, head = o.bh * Dk * Dv + o.own;
  const auto in = column_inputs<Sh>(smem, o, p.k, p.q, p.v, DELTA ? p.beta : nullptr,
                                    GATED ? p.a : nullptr, T, Dk, Dv);

  acc_t S[PT];  // column o.own of the state
  load_owned(S, offset_or_null<acc_t>(p.h0, head), Dv, Dk, o);
  const long long nck = (T + p.ck_every - 1) / p.ck_every;

  chunk_loop<TC, false>(T, in, [&](long long t0, int steps, int b) {
    if (p.ckpt && t0 % p.ck_every == 0)  // the state before step t0
      store_owned(static_cast<acc_t*>(p.ckpt) + (o.bh * nck + t0 / p.ck_every) * Dk * Dv + o.own,
                  Dv, Dk, o, S);
    const scalar_t *kb = in.k(b), *qb = in.q(b), *vb = in.x(b);
    const acc_t *bb = in.beta(b), *ab = in.a(b);
    for (int s = 0; s < steps; ++s) {
      acc_t kr[PT];
      acc_t part[2][3] = {};  // two interleaved chains per sum shorten the FMA dependency
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        acc_t kk[4], qr[4];
        load4(kb + s * DK + 4 * (o.g + R * m), kk);
        load4(qb + s * DK + 4 * (o.g + R * m), qr);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const acc_t kv = kk[e], sv = S[4 * m + e];
          kr[4 * m + e] = kv;
          part[m & 1][0] += kv * sv;
          part[m & 1][1] += qr[e] * sv;
          part[m & 1][2] += kv * qr[e];
        }
      }
      acc_t sums[3] = {part[0][0] + part[1][0], part[0][1] + part[1][1], part[0][2] + part[1][2]};
      group_sum<R>(sums);
      if constexpr (GATED) {  // the sums of S'_t = a_t S_{t-1}
        sums[0] *= ab[s];
        sums[1] *= ab[s];
      }
      const acc_t vj = to_acc(vb[s * OUT + o.ol]);
      acc_t u, err = acc_t(0);
      if constexpr (DELTA) {
        err = vj - sums[0];
        u = bb[s] * err;
      } else {
        u = vj;
      }
      if constexpr (GATED) {
#pragma unroll
        for (int x = 0; x < PT; ++x) S[x] = ab[s] * S[x] + kr[x] * u;
      } else {
#pragma unroll
        for (int x = 0; x < PT; ++x) S[x] += kr[x] * u;
      }
      if (o.g == 0) {
        in.out(0)[s * OUT + o.ol] = sums[1] + sums[2] * u;
        if constexpr (DELTA) in.out(1)[s * OUT + o.ol] = err;
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = (o.bh * T + t0) * Dv + o.first;
    flush_rows<OUT>(static_cast<scalar_t*>(p.o) + at, Dv, in.out(0), steps, o.count, o.tid);
    if (DELTA && p.err)
      flush_rows<OUT>(static_cast<acc_t*>(p.err) + at, Dv, in.out(1), steps, o.count, o.tid);
  });

  store_owned(offset_or_null<acc_t>(p.ht, head), Dv, Dk, o, S);
}

template <typename scalar_t, int DK, bool DELTA, bool GATED>
const char* launch_fwd(FwdParams p, long long BH, void* stream) {
  using Sh = ColumnShape<scalar_t, DK, 2>;
  if (p.ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (p.Dv + Sh::OUT - 1) / Sh::OUT;
  return launch_tiles(fwd_kernel<scalar_t, DK, DELTA, GATED>, p, BH, Sh::smem, stream);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_forward(int dtype, int delta, const void* q, const void* k,
                                   const void* v, const void* beta, const void* a,
                                   const void* h0, void* o, void* ht, void* ckpt, void* err,
                                   long long BH, long long T, int Dk, int Dv, int ck_every,
                                   void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, ck_every)) return e;
  if (delta && !beta) return "fwp: the delta rule needs beta";
  FwdParams p{q, k, v, beta, a, h0, o, ht, ckpt, err, T, Dk, Dv, ck_every, 0};
  return dispatch<512>(dtype, Dk, delta, a != nullptr, [&](auto tag, auto len, auto dl, auto gt) {
    return launch_fwd<typename decltype(tag)::type, decltype(len)::value, decltype(dl)::value,
                      decltype(gt)::value>(p, BH, stream);
  });
  FWP_CATCH
}
