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
#include "fwp_common.cuh"

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
  static constexpr size_t stage_bytes = 2 * k_bytes + d_bytes + (DELTA ? 2 : 1) * u_bytes;
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + 2 * out_bytes;
};

template <typename scalar_t, int DV, bool DELTA>
__global__ void __launch_bounds__(kThreads) qk_grad_kernel(QkGradParams p) {
  using Sh = QkGradShape<scalar_t, DV, DELTA>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = PT / 4, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);

  const int tid = threadIdx.x, g = tid % R, ol = tid / R;
  const long long bh = blockIdx.x / p.ntiles;
  const int row0 = (blockIdx.x % p.ntiles) * OUT;
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T;
  const int nrows = imin(OUT, Dk - row0);
  const bool row_ok = ol < nrows;
  const int i = row0 + ol;

  const scalar_t* qg = static_cast<const scalar_t*>(p.q) + bh * T * Dk + row0;
  const scalar_t* kg = static_cast<const scalar_t*>(p.k) + bh * T * Dk + row0;
  const scalar_t* dg = static_cast<const scalar_t*>(p.dout) + bh * T * Dv;
  const acc_t* ug = static_cast<const acc_t*>(p.u) + bh * T * Dv;
  const acc_t* ag = DELTA ? static_cast<const acc_t*>(p.da) + bh * T * Dv : nullptr;

  auto kbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes); };
  auto qbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes + Sh::k_bytes); };
  auto dbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes); };
  auto ubuf = [&](int b) {
    return reinterpret_cast<acc_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes + Sh::d_bytes);
  };
  auto abuf = [&](int b) {
    return reinterpret_cast<acc_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes + Sh::d_bytes +
                                    Sh::u_bytes);
  };
  acc_t* dqbuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes);
  acc_t* dkbuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + Sh::out_bytes);

  // Zero the stages once: rows past nrows and columns past Dv are never copied and must read 0.
  for (size_t x = tid; x < 2 * Sh::stage_bytes / 4; x += kThreads)
    reinterpret_cast<uint32_t*>(smem)[x] = 0u;
  __syncthreads();

  auto stage = [&](long long c, int b) {
    const long long t0 = c * TC;
    const int steps = static_cast<int>(lmin(TC, T - t0));
    stage_rows(kbuf(b), OUT, kg + t0 * Dk, Dk, steps, nrows, tid);
    stage_rows(qbuf(b), OUT, qg + t0 * Dk, Dk, steps, nrows, tid);
    stage_rows(dbuf(b), DV, dg + t0 * Dv, Dv, steps, Dv, tid);
    stage_rows(ubuf(b), DV, ug + t0 * Dv, Dv, steps, Dv, tid);
    if constexpr (DELTA) stage_rows(abuf(b), DV, ag + t0 * Dv, Dv, steps, Dv, tid);
    copy_commit();
  };

  // This lane's columns of row i: 4 * (g + R * m) + e. S starts at the final state, G at its grad.
  acc_t S[PT], G[PT], C[PT];
  const long long nck = (T + p.ck_every - 1) / p.ck_every;
  auto load_row = [&](const void* src, acc_t (&dst)[PT]) {
    const acc_t* base = static_cast<const acc_t*>(src) + static_cast<long long>(i) * Dv;
#pragma unroll
    for (int m = 0; m < NV; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 4 * (g + R * m) + e;
        dst[4 * m + e] = (src && row_ok && col < Dv) ? base[col] : acc_t(0);
      }
  };
  load_row(static_cast<const acc_t*>(p.ht) + bh * Dk * Dv, S);
  load_row(p.dht ? static_cast<const acc_t*>(p.dht) + bh * Dk * Dv : nullptr, G);
#pragma unroll
  for (int x = 0; x < PT; ++x) C[x] = acc_t(0);

  const long long nchunks = (T + TC - 1) / TC;
  stage(nchunks - 1, static_cast<int>((nchunks - 1) & 1));
  for (long long c = nchunks - 1; c >= 0; --c) {
    const int b = static_cast<int>(c & 1);
    if (c > 0) {
      stage(c - 1, b ^ 1);
      copy_wait_but_one();
    } else {
      copy_wait_all();
    }
    const long long t0 = c * TC;
    const int steps = static_cast<int>(lmin(TC, T - t0));
    // The exact state before this chunk, used after its first step; loaded early to hide latency.
    const bool at_ck = t0 % p.ck_every == 0;
    if (at_ck)
      load_row(static_cast<const acc_t*>(p.ckpt) + (bh * nck + t0 / p.ck_every) * Dk * Dv, C);
    __syncthreads();

    const scalar_t* kb = kbuf(b);
    const scalar_t* qb = qbuf(b);
    const scalar_t* db = dbuf(b);
    const acc_t* ub = ubuf(b);
    const acc_t* ab = abuf(b);
    for (int s = steps - 1; s >= 0; --s) {
      const acc_t ki = to_acc(kb[s * OUT + ol]);
      const acc_t qi = to_acc(qb[s * OUT + ol]);
      const bool exact = at_ck && s == 0;
      acc_t part[2] = {};  // dq_t[i], dk_t[i]
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        const int off = s * DV + 4 * (g + R * m);
        acc_t dd[4], uu[4];
        load4(db + off, dd);
        load4(ub + off, uu);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int x = 4 * m + e;
          part[0] += S[x] * dd[e];
          G[x] += qi * dd[e];
          part[1] += G[x] * uu[e];
          S[x] = exact ? C[x] : S[x] - ki * uu[e];
        }
        if constexpr (DELTA) {
          acc_t aa[4];
          load4(ab + off, aa);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = 4 * m + e;
            part[1] += S[x] * aa[e];
            G[x] += ki * aa[e];
          }
        }
      }
      group_sum<R>(part);
      if (g == 0) {
        dqbuf[s * OUT + ol] = part[0];
        dkbuf[s * OUT + ol] = part[1];
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    scalar_t* dqg = static_cast<scalar_t*>(p.dq) + (bh * T + t0) * Dk + row0;
    scalar_t* dkg = static_cast<scalar_t*>(p.dk) + (bh * T + t0) * Dk + row0;
    for (int x = tid; x < steps * nrows; x += kThreads) {
      const int s = x / nrows, r = x - s * nrows;
      store_out(dqg + s * Dk + r, dqbuf[s * OUT + r]);
      store_out(dkg + s * Dk + r, dkbuf[s * OUT + r]);
    }
  }
}

template <typename scalar_t, int DV, bool DELTA>
const char* launch_qk_grad(QkGradParams p, long long BH, void* stream) {
  using Sh = QkGradShape<scalar_t, DV, DELTA>;
  if (p.ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (p.Dk + Sh::OUT - 1) / Sh::OUT;
  auto kernel = qk_grad_kernel<scalar_t, DV, DELTA>;
  if (BH * p.ntiles > 2147483647LL) return "fwp: more (head, tile) blocks than one grid holds";
  if (const char* e = prepare_launch(kernel, Sh::smem)) return e;
  FWP_LAUNCH(kernel, BH * p.ntiles, Sh::smem, stream, p);
  return launch_error();
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
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return dispatch_len<256>(Dv, [&](auto len) {
      constexpr int DV = decltype(len)::value;
      return delta ? launch_qk_grad<scalar_t, DV, true>(p, BH, stream)
                   : launch_qk_grad<scalar_t, DV, false>(p, BH, stream);
    });
  });
  FWP_CATCH
}
