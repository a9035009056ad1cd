// Forward of the causal sum and delta rules.
//
// One CTA per (head, tile of OUT value columns). Column j of the state S (Dk x Dv) evolves on its
// own given k_t, beta_t and v_t[j], so each column lives in the registers of a group of R lanes
// (Split<DK>) for the whole sequence: no atomics, no cross-CTA traffic. Per step, one butterfly
// sums three partial dot products at once:
//   a = S_{t-1}^T k_t,  b = S_{t-1}^T q_t,  c = k_t . q_t
//   delta: e = v_t - a, u = beta_t e;   sum: u = v_t
//   S_t = S_{t-1} + k_t u^T;   o_t = S_t^T q_t = b + c u
// Inputs arrive through double-buffered shared-memory stages of TC steps (cp.async).
#include "fwp_api.h"
#include "fwp_launch.cuh"

namespace fwp {
namespace {

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* beta;  // acc_t, delta rule only
  const void* h0;    // acc_t or nullptr
  void* o;
  void* ht;    // acc_t or nullptr
  void* ckpt;  // acc_t or nullptr
  void* err;   // acc_t or nullptr (delta rule, for the backward)
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

template <typename scalar_t, int DK>
struct FwdShape {
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int R = Split<DK>::R, PT = Split<DK>::PT, OUT = kThreads / R;
  static constexpr int TC = chunk_steps(2 * DK * int(sizeof(scalar_t)));
  // Byte offsets: [stage 0 | stage 1] of (k, q, v, beta), then the per-chunk output staging.
  static constexpr size_t k_bytes = align16(size_t(TC) * DK * sizeof(scalar_t));
  static constexpr size_t v_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t b_bytes = align16(size_t(TC) * sizeof(acc_t));
  static constexpr size_t b_off = 2 * k_bytes + v_bytes;
  static constexpr size_t stage_bytes = b_off + b_bytes;
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + 2 * out_bytes;
};

template <typename scalar_t, int DK, bool DELTA>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdParams p) {
  using Sh = FwdShape<scalar_t, DK>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = PT / 4, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dv);  // owner: value column o.own
  const int Dk = p.Dk, Dv = p.Dv, tid = o.tid;
  const long long T = p.T, bh = o.bh;

  const scalar_t* qg = static_cast<const scalar_t*>(p.q) + bh * T * Dk;
  const scalar_t* kg = static_cast<const scalar_t*>(p.k) + bh * T * Dk;
  const scalar_t* vg = static_cast<const scalar_t*>(p.v) + bh * T * Dv + o.first;
  const acc_t* bg = offset_or_null<acc_t>(p.beta, bh * T);
  auto in = [&](int b, size_t off) { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, off); };
  auto acc_in = [&](int b, size_t off) { return stage_part<acc_t>(smem, Sh::stage_bytes, b, off); };
  acc_t* obuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes);
  acc_t* ebuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + Sh::out_bytes);
  zero_stages(smem, 2 * Sh::stage_bytes, tid);

  auto stage = [&](long long t0, int steps, int b) {
    stage_rows(in(b, 0), DK, kg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(in(b, Sh::k_bytes), DK, qg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(in(b, 2 * Sh::k_bytes), OUT, vg + t0 * Dv, Dv, steps, o.count, tid);
    if constexpr (DELTA) stage_scalars(acc_in(b, Sh::b_off), bg + t0, steps, tid);
  };

  acc_t S[PT];  // column o.own of the state
  load_owned(S, offset_or_null<acc_t>(p.h0, bh * Dk * Dv + o.own), Dv, Dk, o);
  const long long nck = (T + p.ck_every - 1) / p.ck_every;

  chunk_loop<TC, false>(T, stage, [&](long long t0, int steps, int b) {
    if (p.ckpt && t0 % p.ck_every == 0)  // the state before step t0
      store_owned(static_cast<acc_t*>(p.ckpt) + (bh * nck + t0 / p.ck_every) * Dk * Dv + o.own, Dv,
                  Dk, o, S);
    const scalar_t* kb = in(b, 0);
    const scalar_t* qb = in(b, Sh::k_bytes);
    const scalar_t* vb = in(b, 2 * Sh::k_bytes);
    const acc_t* bb = acc_in(b, Sh::b_off);
    for (int s = 0; s < steps; ++s) {
      acc_t kr[PT];
      acc_t sum[2][3] = {};  // two interleaved chains per sum shorten the FMA dependency
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        acc_t kk[4], qr[4];
        load4(kb + s * DK + 4 * (o.g + R * m), kk);
        load4(qb + s * DK + 4 * (o.g + R * m), qr);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const acc_t kv = kk[e], sv = S[4 * m + e];
          kr[4 * m + e] = kv;
          sum[m & 1][0] += kv * sv;
          sum[m & 1][1] += qr[e] * sv;
          sum[m & 1][2] += kv * qr[e];
        }
      }
      acc_t sums[3] = {sum[0][0] + sum[1][0], sum[0][1] + sum[1][1], sum[0][2] + sum[1][2]};
      group_sum<R>(sums);
      const acc_t vj = to_acc(vb[s * OUT + o.ol]);
      acc_t u, err = acc_t(0);
      if constexpr (DELTA) {
        err = vj - sums[0];
        u = bb[s] * err;
      } else {
        u = vj;
      }
#pragma unroll
      for (int x = 0; x < PT; ++x) S[x] += kr[x] * u;
      if (o.g == 0) {
        obuf[s * OUT + o.ol] = sums[1] + sums[2] * u;
        if constexpr (DELTA) ebuf[s * OUT + o.ol] = err;
      }
    }
    __syncthreads();  // outputs staged; stage b fully read

    const long long at = (bh * T + t0) * Dv + o.first;
    flush_rows<OUT>(static_cast<scalar_t*>(p.o) + at, Dv, obuf, steps, o.count, tid);
    if (DELTA && p.err) flush_rows<OUT>(static_cast<acc_t*>(p.err) + at, Dv, ebuf, steps, o.count, tid);
  });

  store_owned(offset_or_null<acc_t>(p.ht, bh * Dk * Dv + o.own), Dv, Dk, o, S);
}

template <typename scalar_t, int DK, bool DELTA>
const char* launch_fwd(FwdParams p, long long BH, void* stream) {
  using Sh = FwdShape<scalar_t, DK>;
  if (p.ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (p.Dv + Sh::OUT - 1) / Sh::OUT;
  return launch_tiles(fwd_kernel<scalar_t, DK, DELTA>, p, BH, Sh::smem, stream);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_forward(int dtype, int delta, const void* q, const void* k,
                                   const void* v, const void* beta, const void* h0, void* o,
                                   void* ht, void* ckpt, void* err, long long BH, long long T,
                                   int Dk, int Dv, int ck_every, void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, ck_every)) return e;
  if (delta && !beta) return "fwp: the delta rule needs beta";
  FwdParams p{q, k, v, beta, h0, o, ht, ckpt, err, T, Dk, Dv, ck_every, 0};
  return dispatch<512>(dtype, Dk, delta, [&](auto tag, auto len, auto dl) {
    return launch_fwd<typename decltype(tag)::type, decltype(len)::value, decltype(dl)::value>(p, BH, stream);
  });
  FWP_CATCH
}
