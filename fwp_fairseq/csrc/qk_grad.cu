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
  const void *q, *k, *dout, *u, *da, *a;  // u, da (delta rule), a (gated): acc_t
  const void *ht, *dht, *ckpt;            // acc_t final state (ungated), its gradient or nullptr
  void *dq, *dk, *dkr, *lam;              // gated: dkr (delta rule) and lam, acc_t (BH, T, Dk)
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

// Ungated: one reverse sweep, S rebuilt by subtraction and restarted from the checkpoints.
template <typename Sh>
FWP_DEVICE void rebuild_sweep(const QkGradParams& p, const RowInputs<Sh>& in) {
  using scalar_t = typename Sh::scalar_t;
  using acc_t = typename Sh::acc_t;
  constexpr int PT = Sh::PT, OUT = Sh::OUT;
  const auto& o = in.o;
  const long long head_row = (o.bh * p.Dk + o.own()) * static_cast<long long>(p.Dv);
  acc_t S[PT], G[PT], Ck[PT];  // this lane's columns of row o.own(): S_t, dL/dS_t, a checkpoint
  load_owned(S, static_cast<const acc_t*>(p.ht) + head_row, 1, p.Dv, o);
  load_owned(G, offset_or_null<acc_t>(p.dht, head_row), 1, p.Dv, o);

  chunk_loop<Sh::TC, true>(p.T, in, [&](long long t0, int steps, int b) {
    const bool at_ck = t0 % p.ck_every == 0;  // the exact state before this chunk, for its end
    if (at_ck) load_owned(Ck, checkpoint_row<acc_t>(p, o, t0), 1, p.Dv, o);
    for (int s = steps - 1; s >= 0; --s) {
      const bool exact = at_ck && s == 0;
      acc_t ki, qi, dd[PT], uu[PT], aa[PT], part[2] = {};  // part: dq_t[i], dk_t[i]
      in.step(b, s, ki, qi, dd, uu, aa);
#pragma unroll
      for (int x = 0; x < PT; ++x) {
        part[0] += S[x] * dd[x];
        G[x] += qi * dd[x];
        part[1] += G[x] * uu[x];
        S[x] = exact ? Ck[x] : S[x] - ki * uu[x];
        if constexpr (Sh::DELTA) {
          part[1] += S[x] * aa[x];
          G[x] += ki * aa[x];
        }
      }
      group_sum<Sh::R>(part);
      if (o.g == 0) {
        in.out(0)[s * OUT + o.ol] = part[0];
        in.out(1)[s * OUT + o.ol] = part[1];
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = (o.bh * p.T + t0) * p.Dk + o.first;
    flush_rows<OUT>(static_cast<scalar_t*>(p.dq) + at, p.Dk, in.out(0), steps, o.count, o.tid());
    flush_rows<OUT>(static_cast<scalar_t*>(p.dk) + at, p.Dk, in.out(1), steps, o.count, o.tid());
  });
}

// Gated: S forward from the checkpoints, then G backward; no division by a_t.
template <typename Sh>
FWP_DEVICE void gated_sweeps(const QkGradParams& p, RowInputs<Sh>& in) {
  using scalar_t = typename Sh::scalar_t;
  using acc_t = typename Sh::acc_t;
  constexpr int PT = Sh::PT, OUT = Sh::OUT;
  const auto& o = in.o;
  const int Dk = p.Dk;
  const long long rows = o.bh * p.T * Dk + o.first;  // (bh, t = 0, this tile's first row)
  acc_t* const dkr = Sh::DELTA ? static_cast<acc_t*>(p.dkr) + rows : nullptr;
  acc_t* const lam = static_cast<acc_t*>(p.lam) + rows;

  {  // Sweep 1, forward: S; dq, dk's read term, the q and read terms of lam.
    acc_t S[PT];
    chunk_loop<Sh::TC, false>(p.T, in, [&](long long t0, int steps, int b) {
      if (t0 % p.ck_every == 0) load_owned(S, checkpoint_row<acc_t>(p, o, t0), 1, p.Dv, o);
      const acc_t* ab = in.a(b);
      for (int s = 0; s < steps; ++s) {
        acc_t ki, qi, dd[PT], uu[PT], aa[PT];
        in.step(b, s, ki, qi, dd, uu, aa);
        acc_t part[2] = {};  // dq_t[i], dk_t[i]'s read term
#pragma unroll
        for (int x = 0; x < PT; ++x) {
          S[x] *= ab[s];  // S'_t
          if constexpr (Sh::DELTA) part[1] += S[x] * aa[x];
          S[x] += ki * uu[x];
          part[0] += S[x] * dd[x];
        }
        group_sum<Sh::R>(part);
        if (o.g == 0) {
          in.out(0)[s * OUT + o.ol] = part[0];
          in.out(1)[s * OUT + o.ol] = part[1];
          in.out(2)[s * OUT + o.ol] = qi * part[0] + ki * part[1];
        }
      }
      __syncthreads();  // outputs staged; stage b fully read

      const long long at = t0 * Dk;
      flush_rows<OUT>(static_cast<scalar_t*>(p.dq) + rows + at, Dk, in.out(0), steps, o.count,
                      o.tid());
      if (Sh::DELTA) flush_rows<OUT>(dkr + at, Dk, in.out(1), steps, o.count, o.tid());
      flush_rows<OUT>(lam + at, Dk, in.out(2), steps, o.count, o.tid());
    });
  }
  __syncthreads();  // sweep 1's rows are in global memory before sweep 2 reads them back

  // Sweep 2, reverse: G from dht; dk = write term + read term; lam summed from the end.
  in.back[0] = lam;
  in.back[1] = dkr;
  acc_t G[PT], lam_sum = acc_t(0);
  load_owned(G, offset_or_null<acc_t>(p.dht, (o.bh * Dk + o.own()) * static_cast<long long>(p.Dv)),
             1, p.Dv, o);
  chunk_loop<Sh::TC, true>(p.T, in, [&](long long t0, int steps, int b) {
    const acc_t *ab = in.a(b), *lb = in.read_back(b, 0), *rb = in.read_back(b, 1);
    for (int s = steps - 1; s >= 0; --s) {
      acc_t part[1] = {};  // dk_t[i]'s write term
      acc_t ki, qi, dd[PT], uu[PT], aa[PT];
      in.step(b, s, ki, qi, dd, uu, aa);
#pragma unroll
      for (int x = 0; x < PT; ++x) {
        G[x] += qi * dd[x];
        part[0] += G[x] * uu[x];
        if constexpr (Sh::DELTA) G[x] += ki * aa[x];
        G[x] *= ab[s];
      }
      group_sum<Sh::R>(part);
      if (o.g == 0) {
        const acc_t read = Sh::DELTA ? rb[s * OUT + o.ol] : acc_t(0);
        lam_sum += lb[s * OUT + o.ol] - ki * part[0];
        in.out(0)[s * OUT + o.ol] = part[0] + read;
        in.out(1)[s * OUT + o.ol] = lam_sum;
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = t0 * Dk;
    flush_rows<OUT>(static_cast<scalar_t*>(p.dk) + rows + at, Dk, in.out(0), steps, o.count,
                    o.tid());
    flush_rows<OUT>(lam + at, Dk, in.out(1), steps, o.count, o.tid());
  });
}

template <typename C>
__global__ void __launch_bounds__(kThreads) qk_grad_kernel(QkGradParams p) {
  using Sh = RowShape<C>;
  FWP_DECLARE_SMEM(smem);
  auto in = row_inputs<Sh>(smem, p);
  if constexpr (Sh::GATED)
    gated_sweeps<Sh>(p, in);
  else
    rebuild_sweep<Sh>(p, in);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_qk_grad(int dtype, int delta, const void* q, const void* k,
                                   const void* dout, const void* u, const void* da, const void* a,
                                   const void* ht, const void* dht, const void* ckpt, void* dq,
                                   void* dk, void* dkr, void* lam, long long BH, long long T,
                                   int Dk, int Dv, int ck_every, const long long* sizes,
                                   void* stream) {
  return fwp::entry(BH, T, Dk, Dv, ck_every, [&]() -> const char* {
    using namespace fwp;
    if (!u || !ckpt) return "fwp: qk_grad needs u and the checkpoints";
    if (!a && !ht) return "fwp: qk_grad needs the final state";
    if (a && (!lam || (delta && !dkr))) return "fwp: the gated qk_grad needs lam (and dkr, delta)";
    if (delta && !da) return "fwp: the delta rule needs da";
    const long long kq = BH * T * Dk, vo = BH * T * Dv, st = BH * Dk * Dv;
    if (const char* e = check_sizes(
            "fwp_qk_grad", sizes,
            {{"q", q, kq, "(BH, T, Dk)", false},
             {"k", k, kq, "(BH, T, Dk)", false},
             {"dout", dout, vo, "(BH, T, Dv)", false},
             {"u", u, vo, "(BH, T, Dv)", false},
             {"da", da, vo, "(BH, T, Dv)", true},
             {"a", a, BH * T, "(BH, T)", true},
             {"ht", ht, st, "(BH, Dk, Dv)", true},
             {"dht", dht, st, "(BH, Dk, Dv)", true},
             {"ckpt", ckpt, BH * ((T + ck_every - 1) / ck_every) * Dk * Dv,
              "(BH, ceil(T / ck_every), Dk, Dv)", false},
             {"dq", dq, kq, "(BH, T, Dk)", false},
             {"dk", dk, kq, "(BH, T, Dk)", false},
             {"dkr", dkr, kq, "(BH, T, Dk)", true},
             {"lam", lam, kq, "(BH, T, Dk)", true}}))
      return e;
    QkGradParams p{q, k, dout, u, da, a, ht, dht, ckpt, dq, dk, dkr, lam, T, Dk, Dv, ck_every, 0};
    return dispatch<256>(dtype, Dv, delta, a != nullptr, [&](auto c) {
      using C = decltype(c);
      return launch_tiles<RowShape<C>>(qk_grad_kernel<C>, p, Dk, ck_every, BH, stream);
    });
  });
}
