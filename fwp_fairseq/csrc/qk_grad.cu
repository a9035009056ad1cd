// Backward pass B: dq and dk, row by row (fwp_rows.cuh), and the forget gate's gradient.
//
// Given the write vectors u_t (delta: beta_t e_t; sum: v_t) and da_t = -beta_t du_t from pass A,
// and with S'_t = a_t S_{t-1} (a_t = 1 ungated), row i of both the state S and its gradient G
// evolves without looking at other rows:
//   dq_t[i] = S_t[i,:] . do_t                      (S_t: the state after step t)
//   G[i,:] += q_t[i] do_t                           (G = dL/dS_t)
//   dk_t[i] = G[i,:] . u_t + S'_t[i,:] . da_t       (the write and the read of k_t)
//   G[i,:] += k_t[i] da_t;   G[i,:] *= a_t
// So one CTA per (head, tile of OUT key rows) keeps its rows of S and G in registers, a row per
// group of R lanes. The recurrence needs no reduction: the per-step butterfly only produces
// outputs, so consecutive steps overlap.
//
// Ungated, one reverse sweep rebuilds S_{t-1} = S_t - k_t u_t^T with the forward's own u and
// restarts from the exact checkpoint every ck_every steps (rounding drift bounded by ck_every
// steps). Gated, that rebuild would divide by a_t, which can be tiny; so a forward sweep runs S
// from the exact checkpoints (dq and dk's read term), then a reverse sweep runs G (dk's write
// term). The gate gradient comes from the same rows: with Lambda_t = g_1 + ... + g_t,
// S_t = exp(Lambda_t) S^_t where S^ is the ungated recurrence with q^_t = exp(Lambda_t) q_t,
// k_t scaled by exp(-Lambda_t) where written and by exp(Lambda_t) where read, so
//   dL/dLambda_t = sum_i (q_t[i] dq_t[i] - k_t[i] dk_write_t[i] + k_t[i] dk_read_t[i])
//                  (+ <dS_T, S_T> at t = T, added in Python),
// and dL/dg_t = sum over t' >= t of dL/dLambda_t'. Each row keeps that sum from the end (`lam`,
// (BH, T, Dk)); Python adds the rows. No division by a_t anywhere.
#include "fwp_api.h"
#include "fwp_launch.cuh"
#include "fwp_rows.cuh"

namespace fwp {
namespace {

struct QkGradParams {
  const void* q;
  const void* k;
  const void* dout;
  const void* u;     // acc_t (BH, T, Dv)
  const void* da;    // acc_t (BH, T, Dv), delta rule only
  const void* a;     // acc_t (BH, T) forget gate, or nullptr
  const void* ht;    // acc_t final state (ungated)
  const void* dht;   // acc_t or nullptr
  const void* ckpt;  // acc_t (BH, nck, Dk, Dv)
  void* dq;
  void* dk;
  void* dkr;  // acc_t (BH, T, Dk) scratch: dk's read term (gated delta rule)
  void* lam;  // acc_t (BH, T, Dk): per row, the gate gradient's terms summed from the end (gated)
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

template <typename scalar_t, int DV, bool DELTA>
__global__ void __launch_bounds__(kThreads) qk_grad_kernel(QkGradParams p) {
  using Sh = RowShape<scalar_t, DV, DELTA, false>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = Sh::NV, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dk);  // owner: row o.own of S and G
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T, head = o.bh * Dk * Dv, row = static_cast<long long>(o.own) * Dv;
  const auto in = row_inputs<Sh>(smem, o, p.k, p.q, p.dout, p.u, DELTA ? p.da : nullptr,
                                 nullptr, T, Dk, Dv);

  acc_t S[PT], G[PT], C[PT];  // this lane's columns of row o.own: S_t, dL/dS_t, a checkpoint
  const long long nck = (T + p.ck_every - 1) / p.ck_every;
  load_owned(S, static_cast<const acc_t*>(p.ht) + head + row, 1, Dv, o);
  load_owned(G, offset_or_null<acc_t>(p.dht, head + row), 1, Dv, o);

  chunk_loop<TC, true>(T, in, [&](long long t0, int steps, int b) {
    const bool at_ck = t0 % p.ck_every == 0;  // the exact state before this chunk, for its end
    if (at_ck)
      load_owned(C, static_cast<const acc_t*>(p.ckpt) + (o.bh * nck + t0 / p.ck_every) * Dk * Dv +
                        row, 1, Dv, o);
    const scalar_t *kb = in.k(b), *qb = in.q(b), *db = in.d(b);
    const acc_t *ub = in.u(b), *ab = in.da(b);
    for (int s = steps - 1; s >= 0; --s) {
      const acc_t ki = to_acc(kb[s * OUT + o.ol]), qi = to_acc(qb[s * OUT + o.ol]);
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
        in.out(0)[s * OUT + o.ol] = part[0];
        in.out(1)[s * OUT + o.ol] = part[1];
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = o.bh * T * Dk + o.first + t0 * Dk;
    flush_rows<OUT>(static_cast<scalar_t*>(p.dq) + at, Dk, in.out(0), steps, o.count, o.tid);
    flush_rows<OUT>(static_cast<scalar_t*>(p.dk) + at, Dk, in.out(1), steps, o.count, o.tid);
  });
}

template <typename scalar_t, int DV, bool DELTA>
__global__ void __launch_bounds__(kThreads) qk_grad_gated_kernel(QkGradParams p) {
  using Sh = RowShape<scalar_t, DV, DELTA, true>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = Sh::NV, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dk);  // owner: row o.own of S and G
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T, head = o.bh * Dk * Dv, row = static_cast<long long>(o.own) * Dv;
  auto in = row_inputs<Sh>(smem, o, p.k, p.q, p.dout, p.u, DELTA ? p.da : nullptr, p.a, T, Dk, Dv);
  acc_t* const dkr = DELTA ? static_cast<acc_t*>(p.dkr) + o.bh * T * Dk + o.first : nullptr;
  acc_t* const lam = static_cast<acc_t*>(p.lam) + o.bh * T * Dk + o.first;
  const long long nck = (T + p.ck_every - 1) / p.ck_every;

  {  // Sweep 1, forward: S from the checkpoints; dq, dk's read term, the q/read part of lam.
    acc_t S[PT];
    chunk_loop<TC, false>(T, in, [&](long long t0, int steps, int b) {
      if (t0 % p.ck_every == 0)  // the exact state before step t0
        load_owned(S, static_cast<const acc_t*>(p.ckpt) + (o.bh * nck + t0 / p.ck_every) * Dk * Dv +
                          row, 1, Dv, o);
      const scalar_t *kb = in.k(b), *qb = in.q(b), *db = in.d(b);
      const acc_t *ub = in.u(b), *dab = in.da(b), *ab = in.a(b);
      for (int s = 0; s < steps; ++s) {
        const acc_t ki = to_acc(kb[s * OUT + o.ol]), qi = to_acc(qb[s * OUT + o.ol]);
        acc_t part[2] = {};  // dq_t[i], dk_t[i]'s read term
#pragma unroll
        for (int m = 0; m < NV; ++m) {
          const int off = s * DV + 4 * (o.g + R * m);
          acc_t dd[4], uu[4], aa[4];
          load4(db + off, dd);
          load4(ub + off, uu);
          if constexpr (DELTA) load4(dab + off, aa);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = 4 * m + e;
            S[x] *= ab[s];  // S'_t
            if constexpr (DELTA) part[1] += S[x] * aa[e];
            S[x] += ki * uu[e];
            part[0] += S[x] * dd[e];
          }
        }
        group_sum<R>(part);
        if (o.g == 0) {
          in.out(0)[s * OUT + o.ol] = part[0];
          in.out(1)[s * OUT + o.ol] = part[1];
          in.out(2)[s * OUT + o.ol] = qi * part[0] + ki * part[1];
        }
      }
      __syncthreads();  // outputs staged; stage b fully read

      const long long at = t0 * Dk;
      flush_rows<OUT>(static_cast<scalar_t*>(p.dq) + o.bh * T * Dk + o.first + at, Dk, in.out(0),
                      steps, o.count, o.tid);
      if (DELTA) flush_rows<OUT>(dkr + at, Dk, in.out(1), steps, o.count, o.tid);
      flush_rows<OUT>(lam + at, Dk, in.out(2), steps, o.count, o.tid);
    });
  }
  __syncthreads();  // sweep 1's rows are in global memory before sweep 2 reads them back

  // Sweep 2, reverse: G from dht; dk = write term + read term; lam summed from the end.
  in.back[0] = lam;
  in.back[1] = dkr;
  acc_t G[PT], lam_sum = acc_t(0);
  load_owned(G, offset_or_null<acc_t>(p.dht, head + row), 1, Dv, o);
  chunk_loop<TC, true>(T, in, [&](long long t0, int steps, int b) {
    const scalar_t *kb = in.k(b), *qb = in.q(b), *db = in.d(b);
    const acc_t *ub = in.u(b), *dab = in.da(b), *ab = in.a(b);
    const acc_t *lb = in.read_back(b, 0), *rb = in.read_back(b, 1);
    for (int s = steps - 1; s >= 0; --s) {
      const acc_t ki = to_acc(kb[s * OUT + o.ol]), qi = to_acc(qb[s * OUT + o.ol]);
      acc_t part[1] = {};  // dk_t[i]'s write term
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        const int off = s * DV + 4 * (o.g + R * m);
        acc_t dd[4], uu[4], aa[4];
        load4(db + off, dd);
        load4(ub + off, uu);
        if constexpr (DELTA) load4(dab + off, aa);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = 4 * m + e;
          G[x] += qi * dd[e];
          part[0] += G[x] * uu[e];
          if constexpr (DELTA) G[x] += ki * aa[e];
          G[x] *= ab[s];
        }
      }
      group_sum<R>(part);
      if (o.g == 0) {
        const acc_t read = DELTA ? rb[s * OUT + o.ol] : acc_t(0);
        lam_sum += lb[s * OUT + o.ol] - ki * part[0];
        in.out(0)[s * OUT + o.ol] = part[0] + read;
        in.out(1)[s * OUT + o.ol] = lam_sum;
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = t0 * Dk;
    flush_rows<OUT>(static_cast<scalar_t*>(p.dk) + o.bh * T * Dk + o.first + at, Dk, in.out(0),
                    steps, o.count, o.tid);
    flush_rows<OUT>(lam + at, Dk, in.out(1), steps, o.count, o.tid);
  });
}

template <typename scalar_t, int DV, bool DELTA, bool GATED>
const char* launch_qk_grad(QkGradParams p, long long BH, void* stream) {
  using Sh = RowShape<scalar_t, DV, DELTA, GATED>;
  if (p.ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (p.Dk + Sh::OUT - 1) / Sh::OUT;
  if constexpr (GATED)
    return launch_tiles(qk_grad_gated_kernel<scalar_t, DV, DELTA>, p, BH, Sh::smem, stream);
  else
    return launch_tiles(qk_grad_kernel<scalar_t, DV, DELTA>, p, BH, Sh::smem, stream);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_qk_grad(int dtype, int delta, const void* q, const void* k,
                                   const void* dout, const void* u, const void* da,
                                   const void* a, const void* ht, const void* dht,
                                   const void* ckpt, void* dq, void* dk, void* dkr, void* lam,
                                   long long BH, long long T, int Dk, int Dv, int ck_every,
                                   void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, ck_every)) return e;
  if (!u || !ckpt) return "fwp: qk_grad needs u and the checkpoints";
  if (!a && !ht) return "fwp: qk_grad needs the final state";
  if (a && (!lam || (delta && !dkr))) return "fwp: the gated qk_grad needs lam (and dkr, delta)";
  if (delta && !da) return "fwp: the delta rule needs da";
  QkGradParams p{q, k, dout, u, da, a, ht, dht, ckpt, dq, dk, dkr, lam, T, Dk, Dv, ck_every, 0};
  return dispatch<256>(dtype, Dv, delta, a != nullptr, [&](auto tag, auto len, auto dl, auto gt) {
    return launch_qk_grad<typename decltype(tag)::type, decltype(len)::value,
                          decltype(dl)::value, decltype(gt)::value>(p, BH, stream);
  });
  FWP_CATCH
}
