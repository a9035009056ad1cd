// Backward pass B: dq and dk, run backwards in time, row by row.
//
// Given the write vectors u_t (delta: beta_t e_t; sum: v_t) and da_t = -beta_t du_t from pass A,
// row i of both the state S and its gradient G evolves without looking at other rows:
//   dq_t[i] = S_t[i,:] . do_t                     (S_t: the state after step t)
//   G[i,:] += q_t[i] do_t                          (G = dL/dS_t)
//   dk_t[i] = G[i,:] . u_t + S_{t-1}[i,:] . da_t
//   S_{t-1}[i,:] = S_t[i,:] - k_t[i] u_t           (exact checkpoint every ck_every steps)
//   G[i,:] += k_t[i] da_t
// So one CTA per (head, tile of OUT key rows) keeps its rows of S and G in registers, a row per
// group of R lanes. The recurrence needs no reduction: the per-step butterfly only produces
// outputs, so consecutive steps overlap. Reconstructing S_{t-1} by subtraction uses the same u as
// the forward's write; the checkpoints bound the rounding drift to ck_every steps.
#include "fwp_api.h"
#include "fwp_launch.cuh"

namespace fwp {
namespace {

struct QkGradParams {
  const void* q;
  const void* k;
  const void* dout;
  const void* u;     // acc_t (BH, T, Dv)
  const void* da;    // acc_t (BH, T, Dv), delta rule only
  const void* ht;    // acc_t final state
  const void* dht;   // acc_t or nullptr
  const void* ckpt;  // acc_t (BH, nck, Dk, Dv)
  void* dq;
  void* dk;
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

template <typename scalar_t, int DV, bool DELTA>
struct QkGradShape {
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int R = Split<DV>::R, PT = Split<DV>::PT, OUT = kThreads / R;
  static constexpr int TC = chunk_steps(int(2 * OUT * sizeof(scalar_t) + DV * sizeof(scalar_t) +
                                            (DELTA ? 2 : 1) * DV * sizeof(acc_t)));
  static constexpr size_t k_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t d_bytes = align16(size_t(TC) * DV * sizeof(scalar_t));
  static constexpr size_t u_bytes = align16(size_t(TC) * DV * sizeof(acc_t));
  static constexpr size_t u_off = 2 * k_bytes + d_bytes, a_off = u_off + u_bytes;
  static constexpr size_t stage_bytes = a_off + (DELTA ? u_bytes : 0);
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + 2 * out_bytes;
};

template <typename scalar_t, int DV, bool DELTA>
__global__ void __launch_bounds__(kThreads) qk_grad_kernel(QkGradParams p) {
  using Sh = QkGradShape<scalar_t, DV, DELTA>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = PT / 4, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dk);  // owner: row o.own of S and G
  const int Dk = p.Dk, Dv = p.Dv, tid = o.tid;
  const long long T = p.T, bh = o.bh;

  const scalar_t* qg = static_cast<const scalar_t*>(p.q) + bh * T * Dk + o.first;
  const scalar_t* kg = static_cast<const scalar_t*>(p.k) + bh * T * Dk + o.first;
  const scalar_t* dg = static_cast<const scalar_t*>(p.dout) + bh * T * Dv;
  const acc_t* ug = static_cast<const acc_t*>(p.u) + bh * T * Dv;
  const acc_t* ag = offset_or_null<acc_t>(p.da, bh * T * Dv);
  auto in = [&](int b, size_t off) { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, off); };
  auto acc_in = [&](int b, size_t off) { return stage_part<acc_t>(smem, Sh::stage_bytes, b, off); };
  acc_t* dqbuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes);
  acc_t* dkbuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + Sh::out_bytes);
  zero_stages(smem, 2 * Sh::stage_bytes, tid);

  auto stage = [&](long long t0, int steps, int b) {
    stage_rows(in(b, 0), OUT, kg + t0 * Dk, Dk, steps, o.count, tid);
    stage_rows(in(b, Sh::k_bytes), OUT, qg + t0 * Dk, Dk, steps, o.count, tid);
    stage_rows(in(b, 2 * Sh::k_bytes), DV, dg + t0 * Dv, Dv, steps, Dv, tid);
    stage_rows(acc_in(b, Sh::u_off), DV, ug + t0 * Dv, Dv, steps, Dv, tid);
    if constexpr (DELTA) stage_rows(acc_in(b, Sh::a_off), DV, ag + t0 * Dv, Dv, steps, Dv, tid);
  };

  // This lane's columns of row o.own. S starts at the final state, G at its gradient.
  acc_t S[PT], G[PT], C[PT];
  const long long nck = (T + p.ck_every - 1) / p.ck_every;
  const long long row = bh * Dk * Dv + static_cast<long long>(o.own) * Dv;
  load_owned(S, static_cast<const acc_t*>(p.ht) + row, 1, Dv, o);
  load_owned(G, offset_or_null<acc_t>(p.dht, row), 1, Dv, o);

  chunk_loop<TC, true>(T, stage, [&](long long t0, int steps, int b) {
    // The exact state before this chunk, used after its first step.
    const bool at_ck = t0 % p.ck_every == 0;
    if (at_ck)
      load_owned(C, static_cast<const acc_t*>(p.ckpt) + (bh * nck + t0 / p.ck_every) * Dk * Dv +
                        static_cast<long long>(o.own) * Dv, 1, Dv, o);
    const scalar_t* kb = in(b, 0);
    const scalar_t* qb = in(b, Sh::k_bytes);
    const scalar_t* db = in(b, 2 * Sh::k_bytes);
    const acc_t* ub = acc_in(b, Sh::u_off);
    const acc_t* ab = acc_in(b, Sh::a_off);
    for (int s = steps - 1; s >= 0; --s) {
      const acc_t ki = to_acc(kb[s * OUT + o.ol]);
      const acc_t qi = to_acc(qb[s * OUT + o.ol]);
      const bool exact = at_ck && s == 0;
      acc_t part[2] = {};  // dq_t[i], dk_t[i]
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        const int off = s * DV + 4 * (o.g + R * m);
        acc_t dd[4], uu[4], aa[4];
        load4(db + off, dd);
        load4(ub + off, uu);
        if constexpr (DELTA) load4(ab + off, aa);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = 4 * m + e;
          part[0] += S[x] * dd[e];
          G[x] += qi * dd[e];
          part[1] += G[x] * uu[e];
          S[x] = exact ? C[x] : S[x] - ki * uu[e];
          if constexpr (DELTA) {
            part[1] += S[x] * aa[e];
            G[x] += ki * aa[e];
          }
        }
      }
      group_sum<R>(part);
      if (o.g == 0) {
        dqbuf[s * OUT + o.ol] = part[0];
        dkbuf[s * OUT + o.ol] = part[1];
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = (bh * T + t0) * Dk + o.first;
    flush_rows<OUT>(static_cast<scalar_t*>(p.dq) + at, Dk, dqbuf, steps, o.count, tid);
    flush_rows<OUT>(static_cast<scalar_t*>(p.dk) + at, Dk, dkbuf, steps, o.count, tid);
  });
}

template <typename scalar_t, int DV, bool DELTA>
const char* launch_qk_grad(QkGradParams p, long long BH, void* stream) {
  using Sh = QkGradShape<scalar_t, DV, DELTA>;
  if (p.ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (p.Dk + Sh::OUT - 1) / Sh::OUT;
  return launch_tiles(qk_grad_kernel<scalar_t, DV, DELTA>, p, BH, Sh::smem, stream);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_qk_grad(int dtype, int delta, const void* q, const void* k,
                                   const void* dout, const void* u, const void* da,
                                   const void* ht, const void* dht, const void* ckpt, void* dq,
                                   void* dk, long long BH, long long T, int Dk, int Dv,
                                   int ck_every, void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, ck_every)) return e;
  if (!u || !ht || !ckpt) return "fwp: qk_grad needs u, the final state and the checkpoints";
  if (delta && !da) return "fwp: the delta rule needs da";
  QkGradParams p{q, k, dout, u, da, ht, dht, ckpt, dq, dk, T, Dk, Dv, ck_every, 0};
  return dispatch<256>(dtype, Dv, delta, [&](auto tag, auto len, auto dl) {
    return launch_qk_grad<typename decltype(tag)::type, decltype(len)::value,
                          decltype(dl)::value>(p, BH, stream);
  });
  FWP_CATCH
}
